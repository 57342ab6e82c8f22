"""Loading Hugging Face models offline: device and dtype names, transformers imported quietly.

A module of its own (it imports nothing of mpsearch but its errors and the import silencer) so that
the specs, the zoo and the distributed helpers share it without importing each other.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ._quiet import import_transformers_quietly
from .errors import SpecError
from .sources import warn_source_grid


def offline_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    try:  # transformers imports torchao, whose import logs native-library and pytree warnings
        transformers = import_transformers_quietly()
    except ImportError:
        raise SpecError("Hugging Face models need transformers: pip install 'mpsearch[hf]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import_torchao_quietly()
    return transformers


def import_torchao_quietly() -> None:
    """Import torchao (when installed) before transformers does so on its first model load.

    On import, torchao logs a warning for each CUDA-only kernel library that a CPU build of torch
    cannot load ("Failed to load ..._C_mxfp8...so"), and torch's pytree logs a deprecation for each
    Enum torchao registers. Those two loggers are raised to ERROR for this import only.
    """
    import importlib.util
    import logging

    if "torchao" in sys.modules or importlib.util.find_spec("torchao") is None:
        return
    loggers = [logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import transformers.quantizers.auto  # noqa: F401  (what imports torchao's submodules)
    except Exception:  # noqa: BLE001 - a broken optional torchao must not stop a model load
        pass
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_device(device) -> torch.device | None:
    """``None`` (leave as is), ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``."""
    if device is None or isinstance(device, torch.device):
        return device
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise SpecError(f"device {device!r}: write cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise SpecError(f"device {device!r}: write cpu, cuda, cuda:N or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError(f"device {device!r}: this torch sees no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SpecError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def resolve_dtype(dtype):
    """``None``, ``"auto"`` or a torch dtype from a name (float32, bfloat16, float16)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    text = str(dtype).strip().lower().removeprefix("torch.")
    if text == "auto":
        return "auto"
    if text not in DTYPES:
        raise SpecError(f"dtype {dtype!r}: write float32, bfloat16, float16 or auto (the checkpoint's)")
    return DTYPES[text]


def hf_model(path: Path, device=None, dtype=None, **kwargs) -> torch.nn.Module:
    """A Hugging Face model directory (or a GGUF file in it) loaded offline, in ``dtype``, straight onto
    ``device``; the Auto class follows the config's architecture."""
    if not (path / "config.json").is_file() and "gguf_file" not in kwargs:
        raise SpecError(
            f"model spec {str(path)!r}: the directory has no config.json, so it is not a Hugging Face "
            f"model directory"
        )
    transformers = offline_transformers()
    load = dict(kwargs, local_files_only=True)
    if dtype is not None:
        load["dtype"] = dtype  # "auto": the checkpoint's own dtype
    if device is not None:
        load["device_map"] = {"": device}  # weights are placed on the device as they load
    try:
        config = transformers.AutoConfig.from_pretrained(path, **{k: v for k, v in load.items()
                                                                  if k in ("gguf_file", "local_files_only")})
        arch = " ".join(getattr(config, "architectures", None) or [])
        if "ForCausalLM" in arch or "LMHeadModel" in arch or "gguf_file" in kwargs:
            auto = transformers.AutoModelForCausalLM
        elif "ForSequenceClassification" in arch:
            auto = transformers.AutoModelForSequenceClassification
        else:
            auto = transformers.AutoModel
        return auto.from_pretrained(path, **load).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise SpecError(f"model spec {str(path)!r}: loading the Hugging Face model failed: {exc}") from None


def load_checkpoint(source, device=None, dtype=None) -> torch.nn.Module:
    """A checkpoint on disk (a :class:`~mpsearch.sources.ModelSource`) loaded offline: a folder, or a
    GGUF dequantized by transformers, its source-grid caveat warned
    (:class:`~mpsearch.sources.SourceGridWarning`) and kept on the model as ``mpsearch_source_grid``
    (the estimators copy it into the table's metadata)."""
    if source.gguf_file is None:
        return hf_model(source.folder, device, dtype)
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SpecError("loading a GGUF file needs the gguf package: pip install gguf") from None
    model = hf_model(source.folder, device, dtype, gguf_file=source.gguf_file)
    model.mpsearch_source_grid = warn_source_grid(source)
    return model
