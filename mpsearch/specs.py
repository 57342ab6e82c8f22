"""Model and data specs: how the CLI names what to load.

Models:

- ``package.module:callable``: an importable callable returning an ``nn.Module``;
- ``path/to/file.py:callable``: the same, from a Python file;
- a local Hugging Face directory (with ``config.json``): a causal LM, a sequence classifier or an
  encoder, by the architecture its config names (loaded offline);
- a short name of a packaged real model: ``minilm``, ``smollm2``, ``fashion-cnn``, ``digits-mlp``
  (see :mod:`mpsearch.zoo`).

``load_model(spec, device=, dtype=)`` puts the model on ``device`` (``cpu``, ``cuda``, ``cuda:N``,
``auto`` = CUDA when available) in ``dtype`` (``float32``, ``bfloat16``, ``float16``, ``auto`` = the
checkpoint's own; ``None`` keeps what the loader gives, float32 for every packaged model). Hugging Face
directories load in that dtype straight onto that device (``device_map``), with no float32 copy in host
memory first; other specs are built and then moved.

Data:

- ``package.module:callable`` or ``path/to/file.py:callable`` returning a batch or a list of batches
  (see :mod:`mpsearch.data`);
- ``file.pt``: a tensor or a list of batches saved with ``torch.save``;
- ``file.txt``: text, tokenized with the model's tokenizer (pass ``tokenizer=``; :func:`load_tokenizer`
  gives the one of a Hugging Face directory, ``minilm`` or ``smollm2``). For a causal LM
  (``causal=True``) the whole file is one token stream cut into ``samples`` windows of ``max_length``
  tokens (GPTQ/AWQ-style calibration); otherwise each non-empty line is one text, truncated to
  ``max_length`` tokens;
- an IDX file (``*-idx3-ubyte``, optionally ``.gz``): images as a float tensor ``[N, 1, H, W]``;
- a short name: ``shakespeare`` (calibration text: passages for ``minilm``, a token stream for causal
  LMs when a tokenizer is given), ``fashion-mnist``, ``digits``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

from .data import as_batches, first_batch, model_device
from .errors import SpecError
from .hf import DTYPES, load_checkpoint, offline_transformers as _offline_transformers  # noqa: F401
from .hf import resolve_device, resolve_dtype  # noqa: F401  (part of this module's API)
from .layers import iter_quantizable
from .metrics import CAUSAL_METRICS, default_metric_name, FunctionMetric, make_metric
from .recipe import is_callable_spec, is_causal_lm  # noqa: F401  (is_causal_lm: re-exported)
from .sources import model_source, ModelSource
from .zoo import (DATASETS, HF_MODELS, minilm_path, MODELS, read_idx, shakespeare_text, smollm2_tokenizer,
                  token_stream, token_windows, tokenize)


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


def load_tokenizer(spec):
    """The tokenizer of a model spec that names a checkpoint (a Hugging Face folder, a cached
    Hugging Face id, a GGUF file), ``minilm`` or ``smollm2``."""
    if str(spec) == "smollm2":
        return smollm2_tokenizer()
    source = ModelSource(minilm_path()) if str(spec) == "minilm" else model_source(spec)
    if source is None:
        raise SpecError(f"text data needs a tokenizer: {str(spec)!r} is not a Hugging Face folder, a cached "
                        f"Hugging Face id, a .gguf file, 'minilm' or 'smollm2'")
    path, extra = source.folder, {}
    if source.gguf_file:
        extra["gguf_file"] = source.gguf_file
    else:
        files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
        if not any((path / f).is_file() for f in files):
            raise SpecError(f"text data needs the model's tokenizer, and {str(path)!r} holds none "
                            f"({', '.join(files)}); save the tokenizer there or give token ids (.pt)")
    try:
        tok = _offline_transformers().AutoTokenizer.from_pretrained(path, local_files_only=True, **extra)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"cannot load a tokenizer from {str(source.path)!r}: {first}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_for(spec):
    """The tokenizer of a model spec that has one (a checkpoint, ``minilm``, ``smollm2``), else None."""
    if isinstance(spec, torch.nn.Module) or spec is None:
        return None
    spec = str(spec)
    if spec in ("minilm", "smollm2") or model_source(spec) is not None:
        return load_tokenizer(spec)
    return None


def has_tokenizer(spec) -> bool:
    """Whether :func:`tokenizer_for` would find a tokenizer for ``spec`` (no tokenizer is loaded)."""
    if isinstance(spec, torch.nn.Module) or spec is None:
        return False
    return str(spec) in ("minilm", "smollm2") or model_source(str(spec)) is not None


def _check_model(model, spec) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise SpecError(f"model spec {spec!r} returned {type(model).__name__}, not a torch.nn.Module")

    if next(iter_quantizable(model), None) is None:
        raise SpecError(
            f"model spec {spec!r}: the model has no quantizable layer (Linear, Conv1d, Conv2d, "
            f"transformers Conv1D): nothing to allocate bits to"
        )
    return model.eval()


def load_model(spec, *, device=None, dtype=None) -> torch.nn.Module:
    """Load a model from a spec (an ``nn.Module`` is taken as it is), in eval mode, on ``device`` in
    ``dtype`` (see the module doc)."""
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if isinstance(spec, torch.nn.Module):
        return _place(spec, dev, dt)
    spec = str(spec)

    if spec in HF_MODELS:  # packaged Hugging Face checkpoints: loaded straight onto the device
        return _check_model(HF_MODELS[spec](device=dev, dtype=dt), spec)
    if spec in MODELS:
        return _place(_check_model(MODELS[spec](), spec), dev, dt)
    source = model_source(spec)
    if source is not None:
        return _check_model(load_checkpoint(source, dev, dt), spec)
    if ":" not in spec:
        raise SpecError(
            f"model spec {spec!r}: not a file, folder or short name; give a Hugging Face model folder, a .gguf "
            f"file, a Hugging Face id in the local cache (owner/name), 'package.module:callable', "
            f"'file.py:callable' or a short name ({', '.join([*HF_MODELS, *MODELS])})")
    fn = _load_callable(spec, "model")
    try:
        model = fn()
    except Exception as exc:
        raise SpecError(f"model spec {spec!r}: calling it failed: {type(exc).__name__}: {exc}") from exc
    return _place(_check_model(model, spec), dev, dt)


def _place(model: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """Move a built model to ``device``/``dtype`` (``auto`` keeps its dtype)."""
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device)
    return model


def read_text_file(path: Path) -> str:
    if not path.is_file():
        raise SpecError(f"data spec {str(path)!r}: the text file does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise SpecError(f"data spec {str(path)!r}: the text file is empty; put text in it")
    return text


def _text_data(path: Path, tokenizer, batch_size: int, max_length: int, causal: bool = False,
               samples: int | None = None):
    text = read_text_file(path)
    if tokenizer is None:
        raise SpecError(
            f"data spec {str(path)!r}: text data needs the model's tokenizer; use a Hugging Face "
            f"directory, 'minilm' or 'smollm2' as the model"
        )

    if causal:
        return token_windows(tokenizer, text, max_length, samples, batch_size, source=str(path))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return tokenize(tokenizer, lines[:samples] if samples else lines, batch_size, max_length)


def _idx_data(path: Path):
    x = read_idx(path)
    if x.dim() == 3:  # images [N, H, W] -> [N, 1, H, W] in [0, 1]
        return (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()).unsqueeze(1)
    return x


def load_data(spec, *, tokenizer=None, batch_size: int = 16, max_length: int = 64, causal: bool = False,
              samples: int | None = None):
    """Load calibration data (a batch or a list of batches) from a spec.

    ``tokenizer`` is needed for text files; ``batch_size``/``max_length`` shape tokenized text;
    ``causal=True`` cuts text into ``samples`` windows of ``max_length`` tokens (see the module doc).
    """
    if spec is None:
        return None
    if not isinstance(spec, (str, Path)):
        return spec
    spec = str(spec)

    if spec == "shakespeare" and causal:
        if tokenizer is None:
            raise SpecError("data 'shakespeare' for a causal LM needs the model's tokenizer: use a Hugging Face "
                            "directory or 'smollm2' as the model, or give token ids (.pt)")
        return token_windows(tokenizer, shakespeare_text("calib"), max_length, samples, batch_size,
                             source="shakespeare")
    if spec in DATASETS:
        return DATASETS[spec]()
    path = Path(spec)
    if path.suffix == ".txt" and ":" not in spec:
        return _text_data(path, tokenizer, batch_size, max_length, causal, samples)
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


# ------------------------------------------------------------- LLM data: calibration and evaluation
#: sizes of tokenized text for causal LMs: on a GPU 128 windows x 512 tokens of calibration (the
#: GPTQ/AWQ practice) and 32k evaluation tokens; on a CPU smaller ones that run in minutes
LLM_DEFAULTS = {"cuda": {"seq_len": 512, "calib_samples": 128, "eval_tokens": 32768},
                "cpu": {"seq_len": 128, "calib_samples": 16, "eval_tokens": 4096}}
#: encoders keep the line-per-text defaults (64 tokens, every line)
ENCODER_DEFAULTS = {"seq_len": 64, "calib_samples": None}


def text_defaults(model, device=None) -> dict:
    """The default ``seq_len``/``calib_samples``/``eval_tokens`` for ``model`` on ``device``."""
    dev = resolve_device(device) or model_device(model)
    if is_causal_lm(model):
        return dict(LLM_DEFAULTS["cuda" if dev.type == "cuda" else "cpu"])
    return dict(ENCODER_DEFAULTS, eval_tokens=None)


def _check_size(name, value):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise SpecError(f"{name} must be a positive integer, got {value!r}")


def load_calibration(spec, model, model_spec=None, *, seq_len=None, samples=None, batch_size=8,
                     tokenizer=None):
    """Calibration batches for ``model`` from a data spec; text is tokenized with the model's
    tokenizer (``tokenizer``, or the one of ``model_spec``): a causal LM gets ``samples`` windows of
    ``seq_len`` tokens of one token stream, an encoder one text per line (at most ``seq_len``
    tokens). Unset sizes take :func:`text_defaults`."""
    if spec is None:
        return None
    for name, v in (("seq_len", seq_len), ("calib_samples", samples), ("batch_size", batch_size)):
        _check_size(name, v)
    d = text_defaults(model)
    tok = tokenizer if tokenizer is not None else (
        tokenizer_for(model_spec) if _is_text(spec) else None)
    return load_data(spec, tokenizer=tok, batch_size=batch_size, max_length=seq_len or d["seq_len"],
                     causal=is_causal_lm(model), samples=samples or d["calib_samples"])


def _is_text(spec) -> bool:
    return isinstance(spec, (str, Path)) and (str(spec).endswith(".txt") or str(spec) == "shakespeare")


def eval_token_ids(spec, model, model_spec=None, *, eval_tokens=None, tokenizer=None) -> torch.Tensor:
    """A 1-D stream of ``eval_tokens`` evaluation token ids for a causal LM: a text file (or
    ``shakespeare``: the held-out plays) tokenized with the model's tokenizer, or the non-padding
    ``input_ids`` of batches (``.pt``, a callable)."""
    _check_size("eval_tokens", eval_tokens)
    n = eval_tokens or text_defaults(model)["eval_tokens"]
    if _is_text(spec):
        tok = tokenizer if tokenizer is not None else tokenizer_for(model_spec)
        if tok is None:
            raise SpecError(f"eval data {str(spec)!r} is text: it needs the model's tokenizer; use a Hugging "
                            f"Face directory, 'minilm' or 'smollm2' as the model, or give token ids (.pt)")
        text = shakespeare_text("eval") if str(spec) == "shakespeare" else read_text_file(Path(spec))
        return token_stream(tok, text, n, source=str(spec))

    ids = []
    for b in as_batches(load_data(spec)):
        if isinstance(b, dict) and "input_ids" in b:
            x = b["input_ids"]
            ids.append(x[b["attention_mask"].bool()] if "attention_mask" in b else x.reshape(-1))
        elif isinstance(b, torch.Tensor) and not b.is_floating_point():
            ids.append(b.reshape(-1))
        else:
            raise SpecError(f"eval data {str(spec)!r}: a causal LM needs token ids (a text file, a tensor of "
                            f"ids, or batches with input_ids)")
    out = torch.cat(ids).long()
    return out[:n] if n else out


def load_metric(name, eval_spec, model, model_spec=None, *, eval_tokens=None, window=None, stride=None,
                batch_size=8, seq_len=None, tokenizer=None, cache_dir=None):
    """The quality metric of ``validate`` and ``frontier --model``: ``name`` (a metric name,
    ``package.module:callable``, or ``None`` for the model's default: ``kld`` for causal LMs, which
    also reports top-1 agreement and perplexity) on the evaluation data ``eval_spec``.

    Causal LMs are measured on ``eval_tokens`` tokens in windows of ``window`` tokens (default
    ``seq_len``, else the device default) advancing by ``stride`` (default: ``window``)."""
    if is_callable_spec(name):
        return FunctionMetric(_load_callable(name, "metric"))
    if eval_spec is None:
        raise SpecError("measuring quality needs evaluation data (--eval-data), disjoint from the "
                        "calibration data, or --metric package.module:callable")
    for key, v in (("eval_window", window), ("eval_stride", stride), ("batch_size", batch_size)):
        _check_size(key, v)
    if is_causal_lm(model):
        name = name or default_metric_name(model)
        if name not in CAUSAL_METRICS:
            raise SpecError(f"metric {name!r} is not one for a causal LM: use {', '.join(CAUSAL_METRICS)}")
        ids = eval_token_ids(eval_spec, model, model_spec, eval_tokens=eval_tokens, tokenizer=tokenizer)
        window = window or seq_len or text_defaults(model)["seq_len"]
        return make_metric(name, ids, window=min(window, max(ids.numel(), 2)), stride=stride,
                           batch_size=batch_size, cache_dir=cache_dir)
    evals = load_calibration(eval_spec, model, model_spec, seq_len=seq_len, batch_size=32, tokenizer=tokenizer)

    name = name or default_metric_name(model, first_batch(evals))
    return make_metric(name, evals)
