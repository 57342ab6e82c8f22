"""Checks of a model and its data before an estimator does any work.

:func:`check_batches` runs the model once on each batch of a distinct structure (shapes, dtypes,
keys) and turns a failure inside the model's forward into one line naming the batch and its inputs;
:func:`check_weights` names the first planned layer whose weight holds NaN or Inf values.
"""

from __future__ import annotations

import torch

from .data import float_dtype, move_batch, split_batch
from .errors import MpsearchError, QuantizationError
from .layers import weight_tensor


class DataError(MpsearchError):
    """Calibration or evaluation data that does not fit the model."""


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


def _signature(args, kwargs) -> tuple:
    def sig(v):
        return (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else type(v).__name__

    return tuple(sig(a) for a in args), tuple(sorted((k, sig(v)) for k, v in kwargs.items()))


def describe_inputs(args, kwargs) -> str:
    parts = [f"input {i}: {_describe(a)}" for i, a in enumerate(args)]
    parts += [f"{k!r}: {_describe(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "no inputs"


def check_batches(model: torch.nn.Module, batches, device=None) -> None:
    """Refuse, in one line, a batch the model cannot run on (wrong shape, dtype, keys, or no tensor)."""
    seen = set()
    for i, batch in enumerate(batches, 1):
        args, kwargs, _ = split_batch(batch)
        values = list(args) + list(kwargs.values())
        if not any(isinstance(v, torch.Tensor) for v in values):
            raise DataError(f"data batch {i} holds no tensor ({describe_inputs(args, kwargs)}); give "
                            f"tensors, a dict of tensors, or (inputs, targets) tuples")
        key = _signature(args, kwargs)
        if key in seen:
            continue
        seen.add(key)
        args, kwargs, _ = split_batch(move_batch(batch, device, float_dtype(model)))
        try:
            with torch.no_grad():
                model(*args, **kwargs)
        except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
            first = " ".join(str(exc).split())[:300]
            raise DataError(f"data batch {i} does not fit the model ({describe_inputs(args, kwargs)}): "
                            f"{type(exc).__name__}: {first}") from None


def check_weights(model: torch.nn.Module, layer_names) -> None:
    """Refuse the first layer whose weight holds NaN or Inf, naming it."""
    for name in layer_names:
        try:
            weight = weight_tensor(model, name)
        except (AttributeError, MpsearchError):
            continue
        if isinstance(weight, torch.Tensor) and not torch.isfinite(weight.detach()).all():
            bad = int((~torch.isfinite(weight.detach())).sum())
            raise QuantizationError(f"layer {name!r} holds {bad} NaN or Inf values and cannot be "
                                    f"quantized; check the checkpoint or exclude the layer")
