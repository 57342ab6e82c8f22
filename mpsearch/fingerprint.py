"""Fingerprints: short hashes of a model's weights and of calibration data, the keys of every cache
(estimators' checkpoints, metrics' reference logits). Below both :mod:`mpsearch.sensitivity` and
:mod:`mpsearch.metrics` in the layer contract (tests/test_seams.py)."""

from __future__ import annotations

import hashlib

import torch

from .data import split_batch


def _feed_tensor(h, t: torch.Tensor) -> None:
    """Hash a tensor's dtype, shape and the bytes of its values."""
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's parameters and buffers: names, dtypes, shapes and the bytes of
    every value (two models share it only when their weights are bit for bit the same)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, t in named:
                h.update(f"{kind}:{name}:".encode())
                _feed_tensor(h, t)
    return h.hexdigest()[:16]


def data_fingerprint(batches) -> str:
    """A hash of every tensor in the calibration batches (values, shapes, dtypes)."""
    h = hashlib.sha1()

    def feed(obj):
        if isinstance(obj, torch.Tensor):
            _feed_tensor(h, obj)
        elif isinstance(obj, dict):
            for k in sorted(obj):
                h.update(str(k).encode())
                feed(obj[k])
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                feed(v)
        else:
            h.update(repr(obj).encode())

    for batch in batches:
        feed(split_batch(batch))
    return h.hexdigest()[:16]
