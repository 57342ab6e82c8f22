"""Model and data specs: how the CLI names what to load.

Models:

- ``package.module:callable``: an importable callable returning an ``nn.Module``;
- ``path/to/file.py:callable``: the same, from a Python file;
- a local Hugging Face directory (with ``config.json``): a causal LM, a sequence classifier or an
  encoder, by the architecture its config names (loaded offline);
- a short name of a packaged real model: ``minilm``, ``fashion-cnn``, ``digits-mlp``
  (see :mod:`mpsearch.zoo`).

Data:

- ``package.module:callable`` or ``path/to/file.py:callable`` returning a batch or a list of batches
  (see :mod:`mpsearch.data`);
- ``file.pt``: a tensor or a list of batches saved with ``torch.save``;
- ``file.txt``: one text per non-empty line, tokenized with the model's tokenizer (pass
  ``tokenizer=``; :func:`load_tokenizer` gives the one of a Hugging Face directory or ``minilm``);
- an IDX file (``*-idx3-ubyte``, optionally ``.gz``): images as a float tensor ``[N, 1, H, W]``;
- a short name: ``shakespeare`` (calibration passages for ``minilm``), ``fashion-mnist``, ``digits``.
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
        except (TypeError, ValueError) as exc:  # relative or malformed module names
            raise SpecError(f"{what} spec {spec!r}: {target!r} is not a module name ({exc})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise SpecError(f"{what} spec {spec!r}: module {target!r} has no attribute {attr!r}")
    if not callable(fn):
        raise SpecError(f"{what} spec {spec!r}: {attr!r} is not callable")
    return fn


def _hf_model(path: Path) -> torch.nn.Module:
    from .zoo import _offline_transformers

    if not (path / "config.json").is_file():
        raise SpecError(
            f"model spec {str(path)!r}: the directory has no config.json, so it is not a Hugging Face "
            f"model directory"
        )
    transformers = _offline_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        arch = " ".join(getattr(config, "architectures", None) or [])
        if "ForCausalLM" in arch or "LMHeadModel" in arch:
            auto = transformers.AutoModelForCausalLM
        elif "ForSequenceClassification" in arch:
            auto = transformers.AutoModelForSequenceClassification
        else:
            auto = transformers.AutoModel
        return auto.from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise SpecError(f"model spec {str(path)!r}: loading the Hugging Face model failed: {exc}") from None


def load_tokenizer(spec):
    """The tokenizer of a Hugging Face directory or of ``minilm``."""
    from .zoo import _offline_transformers, minilm_path

    path = minilm_path() if str(spec) == "minilm" else Path(str(spec))
    if not path.is_dir():
        raise SpecError(f"text data needs a tokenizer: {str(spec)!r} is not a Hugging Face directory or 'minilm'")
    try:
        return _offline_transformers().AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SpecError(f"cannot load a tokenizer from {str(path)!r}: {exc}") from None


def _check_model(model, spec) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise SpecError(f"model spec {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    from .layers import iter_quantizable

    if next(iter_quantizable(model), None) is None:
        raise SpecError(
            f"model spec {spec!r}: the model has no quantizable layer (Linear, Conv1d, Conv2d, "
            f"transformers Conv1D): nothing to allocate bits to"
        )
    return model.eval()


def load_model(spec) -> torch.nn.Module:
    """Load a model from a spec (or return an ``nn.Module`` as it is), in eval mode."""
    if isinstance(spec, torch.nn.Module):
        return spec
    spec = str(spec)
    from .zoo import MODELS

    if spec in MODELS:
        return _check_model(MODELS[spec](), spec)
    path = Path(spec)
    if ":" not in spec and (path.is_dir() or "/" in spec or spec.startswith(".")):
        if path.is_dir():
            return _check_model(_hf_model(path), spec)
        raise SpecError(
            f"model spec {spec!r}: no such directory; give a Hugging Face model directory, "
            f"'package.module:callable', 'file.py:callable' or a short name ({', '.join(MODELS)})"
        )
    fn = _load_callable(spec, "model")
    try:
        model = fn()
    except Exception as exc:
        raise SpecError(f"model spec {spec!r}: calling it failed: {type(exc).__name__}: {exc}") from exc
    return _check_model(model, spec)


def _text_data(path: Path, tokenizer, batch_size: int, max_length: int):
    if not path.is_file():
        raise SpecError(f"data spec {str(path)!r}: the text file does not exist")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise SpecError(f"data spec {str(path)!r}: the text file is empty; put one text per line")
    if tokenizer is None:
        raise SpecError(
            f"data spec {str(path)!r}: text data needs the model's tokenizer; use a Hugging Face "
            f"directory or 'minilm' as the model"
        )
    from .zoo import tokenize

    return tokenize(tokenizer, lines, batch_size, max_length)


def _idx_data(path: Path):
    from .zoo import read_idx

    x = read_idx(path)
    if x.dim() == 3:  # images [N, H, W] -> [N, 1, H, W] in [0, 1]
        return (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()).unsqueeze(1)
    return x


def load_data(spec, *, tokenizer=None, batch_size: int = 16, max_length: int = 64):
    """Load calibration data (a batch or a list of batches) from a spec.

    ``tokenizer`` is needed for text files; ``batch_size``/``max_length`` shape tokenized text.
    """
    if spec is None:
        return None
    if not isinstance(spec, (str, Path)):
        return spec
    spec = str(spec)
    from .zoo import DATASETS

    if spec in DATASETS:
        return DATASETS[spec]()
    path = Path(spec)
    if path.suffix == ".txt" and ":" not in spec:
        return _text_data(path, tokenizer, batch_size, max_length)
    if "idx" in path.name and ":" not in spec:
        return _idx_data(path)
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
