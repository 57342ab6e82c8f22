"""Model and data specs: how the CLI names what to load.

Models:

- ``package.module:callable``: an importable callable returning an ``nn.Module``;
- ``path/to/file.py:callable``: the same, from a Python file.

Data:

- ``package.module:callable`` or ``path/to/file.py:callable`` returning a batch or a list of batches
  (see :mod:`mpsearch.data`);
- ``file.pt``: a tensor or a list of batches saved with ``torch.save``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

from .errors import SpecError


def _load_callable(spec: str, what: str):
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise SpecError(
            f"{what} spec {spec!r}: write 'package.module:callable' or 'path/to/file.py:callable'"
        )
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise SpecError(f"{what} spec {spec!r}: the file {target!r} does not exist")
        name = f"_mpsearch_spec_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise SpecError(f"{what} spec {spec!r}: importing {target} failed: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise SpecError(f"{what} spec {spec!r}: cannot import {target!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise SpecError(f"{what} spec {spec!r}: module {target!r} has no attribute {attr!r}")
    if not callable(fn):
        raise SpecError(f"{what} spec {spec!r}: {attr!r} is not callable")
    return fn


def load_model(spec) -> torch.nn.Module:
    """Load a model from a spec (or return an ``nn.Module`` as it is), in eval mode."""
    if isinstance(spec, torch.nn.Module):
        return spec
    spec = str(spec)
    fn = _load_callable(spec, "model")
    try:
        model = fn()
    except Exception as exc:
        raise SpecError(f"model spec {spec!r}: calling it failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise SpecError(
            f"model spec {spec!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model.eval()


def load_data(spec):
    """Load calibration data (a batch or a list of batches) from a spec."""
    if spec is None:
        return None
    if not isinstance(spec, (str, Path)):
        return spec
    spec = str(spec)
    path = Path(spec)
    if path.suffix in (".pt", ".pth") and ":" not in spec:
        if not path.is_file():
            raise SpecError(f"data spec {spec!r}: the file does not exist")
        try:
            return torch.load(path, weights_only=True)
        except Exception as exc:
            raise SpecError(f"data spec {spec!r}: torch.load failed: {exc}") from exc
    fn = _load_callable(spec, "data")
    try:
        data = fn()
    except Exception as exc:
        raise SpecError(f"data spec {spec!r}: calling it failed: {type(exc).__name__}: {exc}") from exc
    if data is None:
        raise SpecError(f"data spec {spec!r} returned None; return a batch or a list of batches")
    return data
