"""Hand a bit plan to the quantizer a user already runs, and read plans back.

One plan, every consumer's own per-layer format::

    from mpsearch.export import export_plan, save_export, import_plan
    doc = export_plan(plan, "gptqmodel")               # plain data: the consumer's JSON/YAML as a dict
    save_export(plan, "llama.cpp", "types.txt")        # written atomically
    plan2 = import_plan("types.txt", "llama.cpp")      # torchao, gptqmodel and llama.cpp read back

| format           | file                                   | import |
|------------------|----------------------------------------|--------|
| `torchao`        | FqnToConfig as torchao's config JSON   | yes    |
| `gptqmodel`      | QuantizeConfig kwargs with `dynamic`   | yes (needs layer names) |
| `llm-compressor` | recipe YAML with `config_groups`       | no     |
| `llama.cpp`      | `--tensor-type-file` for llama-quantize| yes    |
| `autoround`      | AutoRound `layer_config` JSON          | no     |
| `modelopt`       | `hf_quant_config.json` (MIXED_PRECISION, `quantized_layers`) | no |

Formats served by runtimes that fuse q/k/v and gate/up (vLLM, SGLang, TensorRT-LLM) refuse plans
whose fused siblings disagree unless ``force=True``.

Mixture-of-experts plans (stacked expert tensors ``...experts.gate_up_proj``): ``llama.cpp`` writes
them as the GGUF tensors ``blk.N.ffn_{gate,up,down}_exps`` (a fused ``gate_up_proj`` as both gate and
up, with its one type) and ``llm-compressor`` as regex targets over the per-expert Linears that
llm-compressor unfuses them into (``experts.<e>.gate_proj``...), the experts of one layer sharing one
scheme as vLLM's FusedMoE requires. ``gptqmodel`` writes ``dynamic`` patterns and ``autoround``
``layer_config`` regex keys over the same per-expert modules (GPTQModel and AutoRound unfuse the
experts before quantizing); ``modelopt`` writes one ``quantized_layers`` entry per experts module
(``model.layers.0.mlp.experts``), as ModelOpt's own ``get_quant_config`` does. torchao refuses such
plans in one line (its ``IntxWeightOnlyConfig`` refuses 3-D tensors). Per-expert plans
(``--target mpsearch``, ``...down_proj[3]``) are refused by every exporter: consumers store a
projection's experts with one type.

Each exporter declares the consumers whose formats (:mod:`mpsearch.formats`) it writes exactly
(``Exporter.consumers``): llm-compressor the compressed-tensors formats, torchao, modelopt,
autoround, gptqmodel and llama.cpp their own. A plan naming another consumer's format is refused with
the ``--to`` that writes it; integer formats are written as their exact bits, group and symmetry.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MpsearchError
from ..fileio import atomic_write_text
from ..plan import BitPlan
from ..registry import REGISTRIES
from ..registry import EXPORTERS as FORMATS  # format name -> "module:Class" (the one registry)
from ._base import check_consumers, check_experts, check_fused, Exporter, ExportError

__all__ = ["FORMATS", "ExportError", "Exporter", "export_plan", "export_text", "save_export",
           "import_plan", "get_exporter", "format_names"]


def format_names() -> list[str]:
    return list(FORMATS)


def get_exporter(fmt: str, **opts) -> Exporter:
    """An exporter instance by format name, with its settings (``get_exporter("llama.cpp", arch="qwen2")``)."""
    key = REGISTRIES["exporter"].resolve(fmt)
    klass = REGISTRIES["exporter"].load(key)
    try:
        return klass(**opts)
    except TypeError:
        import inspect

        valid = [p for p in inspect.signature(klass.__init__).parameters if p != "self"]
        raise ExportError(
            f"format {key!r} does not take the settings {sorted(opts)}; it takes: "
            f"{', '.join(valid) or 'none'}"
        ) from None


def exporter_for_consumer(consumer: str) -> str | None:
    """The ``--to`` name of the exporter that declares ``consumer`` (None if none does)."""
    return next((n for n in FORMATS if consumer in get_exporter(n).consumers), None)


def export_plan(plan: BitPlan, fmt: str, *, force: bool = False, **opts):
    """The consumer's document for ``plan`` as plain Python data (dict), checked first.

    Raises :class:`ExportError` for an unknown format, an option the format cannot express, or
    (unless ``force``) fused siblings with different options in a format whose runtime fuses them.
    """
    if not isinstance(plan, BitPlan):
        raise ExportError(f"export_plan needs a BitPlan, got {type(plan).__name__}")
    exporter = get_exporter(fmt, **opts)
    check_consumers(plan, exporter, exporter_for_consumer)
    check_experts(plan, exporter, force)
    if exporter.fused_runtime and not force:
        check_fused(plan, exporter)
    exporter.check(plan)
    return exporter.build(plan)


def export_text(plan: BitPlan, fmt: str, *, force: bool = False, **opts) -> str:
    """The consumer's file content for ``plan``."""
    doc = export_plan(plan, fmt, force=force, **opts)
    return get_exporter(fmt, **opts).dumps(doc)


def save_export(plan: BitPlan, fmt: str, path: str | os.PathLike, *, force: bool = False, **opts) -> Path:
    """Write the consumer's file atomically (nothing is written if the plan is refused)."""
    text = export_text(plan, fmt, force=force, **opts)
    atomic_write_text(path, text)
    return Path(path)


def import_plan(source, fmt: str, *, layers=None, **opts) -> BitPlan:
    """Read a plan back from a consumer's file, text-free document, or (torchao) config object.

    ``source`` is a path, or the document itself (a dict; for torchao also an ``FqnToConfig``).
    ``layers`` (names, or an ``nn.Module`` whose quantizable layers are used) is needed where the
    format names layers by regex (GPTQModel ``dynamic``, torchao ``re:`` keys) and to map llama.cpp
    tensor names back to the model's own names.
    """
    exporter = get_exporter(fmt, **opts)
    if not exporter.can_import:
        importable = [n for n in FORMATS if get_exporter(n).can_import]
        raise ExportError(f"format {exporter.name!r} has no importer; plans can be read back from "
                          f"{', '.join(repr(n) for n in importable)}")
    layers = _layer_names(layers, exporter)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ExportError(f"{fmt} file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise ExportError(f"{path}: not a text file") from None
        return _read(exporter, lambda: exporter.read(exporter.loads(text, str(path)), layers, str(path)),
                     str(path))
    return _read(exporter, lambda: exporter.read(source, layers, f"{fmt} document"), f"{fmt} document")


def _read(exporter, read, source: str) -> BitPlan:
    """Run an importer; a document whose shape its checks missed still gives one clear line."""
    import re

    try:
        return read()
    except MpsearchError:
        raise
    except (AttributeError, TypeError, KeyError, IndexError, ValueError, re.error, RecursionError,
            OverflowError) as exc:
        raise ExportError(f"{source}: not a {exporter.name} document mpsearch can read "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None


def _layer_names(layers, exporter: Exporter):
    if layers is None:
        return None
    if hasattr(layers, "named_modules"):  # a model: the layers the consumer can have quantized
        from ..layers import quantizable_names  # start-up: keeps the export package free of torch

        return quantizable_names(layers, keep=exporter.reads_layer)
    if isinstance(layers, BitPlan):
        return layers.layers
    if isinstance(layers, str):
        raise ExportError("layers must be a list of layer names or a model, not a single string")
    return [str(n) for n in layers]
