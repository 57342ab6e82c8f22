"""Batches: how mpsearch feeds calibration data to a model.

A *batch* is one of

- a tensor: the model's single positional input;
- a dict: keyword inputs (Hugging Face style ``input_ids``/``attention_mask``); a ``labels`` or
  ``targets`` key is taken out as the target;
- a tuple or list ``(inputs, targets)``: inputs as above (tensor, dict, or tuple of positional
  inputs), targets a tensor or ``None``.

*Data* is a batch or an iterable of batches (a list, a DataLoader).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .errors import MpsearchError

_TARGET_KEYS = ("labels", "targets", "target", "label")


def split_batch(batch):
    """Return ``(args, kwargs, target)`` for one batch."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, dict):
        kwargs = {k: v for k, v in batch.items() if k not in _TARGET_KEYS}
        target = next((batch[k] for k in _TARGET_KEYS if k in batch), None)
        return (), kwargs, target
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise MpsearchError(
                f"a batch given as a tuple must be (inputs, targets), got {len(batch)} items"
            )
        inputs, target = batch
        if isinstance(inputs, torch.Tensor):
            return (inputs,), {}, target
        if isinstance(inputs, dict):
            return (), dict(inputs), target
        if isinstance(inputs, (tuple, list)):
            return tuple(inputs), {}, target
    raise MpsearchError(
        f"cannot read a batch of type {type(batch).__name__}: give a tensor, a dict of tensors, "
        f"or an (inputs, targets) tuple"
    )


def move_batch(batch, device, dtype: torch.dtype | None = None):
    """Move every tensor of a batch to ``device`` (``None``: where it is) and, with ``dtype`` (the
    model's: :func:`float_dtype`), its floating-point tensors to that dtype: float32 images or
    embeddings feed a bfloat16 or float16 model. Token ids and masks keep their dtype."""
    if isinstance(batch, torch.Tensor):
        if dtype is not None and batch.is_floating_point() and batch.dtype != dtype:
            return batch.to(device=device, dtype=dtype)
        return batch if device is None else batch.to(device)
    if isinstance(batch, dict):
        return {k: move_batch(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(v, device, dtype) for v in batch)
    return batch


def model_device(model) -> torch.device:
    """The device of the model's first parameter (cpu for a model without any): where its inputs go."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def float_dtype(model) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (what its float inputs must be)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def batch_size(batch) -> int:
    """Samples in one batch (the first axis of its inputs)."""

    args, kwargs, _ = split_batch(batch)
    return leading_size(args) if args else leading_size(kwargs)


def slice_batch(obj, lo: int, hi: int, n: int):
    """Samples ``lo:hi`` of every tensor in ``obj`` whose first axis has length ``n``."""
    if isinstance(obj, torch.Tensor) and obj.dim() and obj.shape[0] == n:
        return obj[lo:hi]
    if isinstance(obj, dict):
        return {k: slice_batch(v, lo, hi, n) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(slice_batch(v, lo, hi, n) for v in obj)
    return obj


def micro_batches(batch, size: int | None) -> list:
    """``batch`` cut into pieces of at most ``size`` samples (the batch itself when ``size`` is None)."""
    n = batch_size(batch)
    if not size or size >= n:
        return [batch]
    return [slice_batch(batch, lo, min(lo + size, n), n) for lo in range(0, n, size)]


def run_model(model, batch):
    """Run ``model`` on one batch; returns the raw output."""
    args, kwargs, _ = split_batch(batch)
    return model(*args, **kwargs)


def model_output_tensor(output) -> torch.Tensor:
    """The main tensor of a model's output (logits, last hidden state, or the output itself)."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state", "sentence_embedding"):
        value = getattr(output, key, None)
        if value is None and isinstance(output, dict):
            value = output.get(key)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise MpsearchError(
        f"cannot find a tensor in the model output of type {type(output).__name__}"
    )


def as_batches(data) -> list:
    """Normalise data to a list of batches."""
    if data is None:
        return []
    if isinstance(data, (torch.Tensor, dict)):
        return [data]
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], (torch.Tensor, dict)):
        if isinstance(data[1], torch.Tensor) or data[1] is None:
            return [data]
    if isinstance(data, Iterable):
        return list(data)
    raise MpsearchError(
        f"cannot read data of type {type(data).__name__}: give a batch or a list of batches"
    )


def first_batch(data):
    batches = as_batches(data)
    if not batches:
        raise MpsearchError("the data holds no batch")
    return batches[0]


def leading_size(inputs) -> int:
    """The leading dimension of the first tensor in ``inputs`` (a tensor, dict, list or tuple); 1 if none."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    if isinstance(inputs, dict):
        for v in inputs.values():
            if isinstance(v, torch.Tensor):
                return leading_size(v)
    if isinstance(inputs, (list, tuple)) and inputs:
        return leading_size(inputs[0])
    return 1
