r"""GPTQModel: ``QuantizeConfig`` keyword arguments with a compact ``dynamic`` override table.

GPTQModel (``gptqmodel/quantization/config.py``) takes default ``bits`` / ``group_size`` / ``sym``
and a ``dynamic`` dict of regex -> overrides. Its lookup (``dynamic_get``) walks the keys in order
(``-:`` keys first): a ``-:REGEX`` key that ``re.match``-es a module name means "do not quantize
it"; a ``+:REGEX`` (or bare) key returns its overrides. Group size ``-1`` means one scale per
output channel; bits must be 2, 3, 4 or 8.

The export makes the most common quantized option the default and writes one anchored pattern per
other option (one key for all the layers that share it, however many), plus one ``-:`` key for the
``keep`` layers. ``lm_head`` is only quantized by GPTQModel with ``lm_head=True``, which is set when
the plan quantizes a layer named ``lm_head``. Use it as ``QuantizeConfig(**json.load(f))``.

The GPTQModel formats of ``--target gptqmodel`` (``gptq-intB-g128``) are written as ``bits: B,
group_size: 128, sym: true``. The importer resolves each given layer name with the same rules; it
needs the layer names because the keys are regexes. A layer whose resolved settings are exactly a
GPTQModel format's reads back as that format (``gptq-int4-g128``), else as the integer option.

Mixture-of-experts: GPTQModel quantizes experts as one module per expert and projection
(``Qwen3MoeQModel.module_tree``: ``mlp.experts.#.gate_proj/up_proj/down_proj``; transformers'
stacked experts are unfused into those by its ``defuser`` dependency, ``gate_up_proj`` split in
two), so a stacked tensor ``model.layers.0.mlp.experts.gate_up_proj`` is written into the patterns
as its modules ``model\.layers\.0\.mlp\.experts\.\d+\.gate_proj`` and ``...up_proj``: every expert
of the layer gets its option. Routers are not plan layers (GPTQModel's module trees mark ``mlp.gate`` ``:!``,
never quantized). Reading back, a stacked tensor takes the settings of its experts' modules, and a
file that gives the experts of one tensor different settings (checked for expert indices below
``EXPERTS_CHECKED``) is refused: mpsearch plans one option per stacked tensor.
"""

from __future__ import annotations

import re
from collections import Counter

from ..options import KEEP, Option
from ..plan import BitPlan
from ._base import (compact_pattern, expect, Exporter, ExportError, format_option, formats_by_settings,
                    group_by_option, int_settings, need_layers, plan_from_options, refuse, unfused_projections)

BITS = (2, 3, 4, 8)
#: stand-in for the expert index in :func:`module_templates` (not a digit, so ``compact_pattern``
#: templates the block index, and no regex character, so ``re.escape`` leaves it alone)
_EXPERT = "EXPERTINDEX"
#: the importer checks that experts 0..EXPERTS_CHECKED-1 of a stacked tensor resolve alike
EXPERTS_CHECKED = 512


def module_templates(name: str) -> list[str]:
    """The GPTQModel module names a plan layer stands for: itself, or for a stacked expert tensor
    its per-expert modules with the expert index as ``_EXPERT``."""
    unfused = unfused_projections(name)
    if unfused is None:
        return [name]
    container, projs = unfused
    return [f"{container}.{_EXPERT}.{p}" for p in projs]


def modules_pattern(names) -> str:
    """One anchored regex for the GPTQModel modules of plan layers ``names`` (see
    :func:`~mpsearch.export._base.compact_pattern`; an expert index matches ``\\d+``)."""
    return compact_pattern(t for n in names for t in module_templates(n)).replace(_EXPERT, r"\d+")


def expert_modules(name: str, experts) -> list[str]:
    """The GPTQModel module names of plan layer ``name`` for expert indices ``experts``."""
    return [t.replace(_EXPERT, str(e)) for t in module_templates(name) for e in experts]


def _fields(opt: Option) -> dict:
    opt = int_settings(opt)
    return {"bits": opt.bits, "group_size": -1 if opt.group_size is None else opt.group_size,
            "sym": opt.symmetric}


def resolve(doc: dict, name: str) -> Option:
    """The option GPTQModel gives module ``name`` under config ``doc`` (its ``dynamic_get`` rules)."""
    if name == "lm_head" and not doc.get("lm_head", False):
        return KEEP
    dynamic = doc.get("dynamic") or {}
    keys = [k for k in dynamic if k.startswith("-")] + [k for k in dynamic if not k.startswith("-")]
    fields = {"bits": doc.get("bits", 4), "group_size": doc.get("group_size", 128), "sym": doc.get("sym", True)}
    for key in keys:
        if key.startswith("-:"):
            if re.match(key[2:], name):
                return KEEP
        elif re.match(key.removeprefix("+:"), name):
            fields.update({k: v for k, v in (dynamic[key] or {}).items() if k in fields})
            break
    group = int(fields["group_size"])
    return Option(int(fields["bits"]), group_size=None if group == -1 else group, symmetric=bool(fields["sym"]))


class GPTQModelExporter(Exporter):
    """GPTQModel ``QuantizeConfig(bits=..., group_size=..., sym=..., dynamic={...})`` as JSON."""

    name = "gptqmodel"
    suffix = ".json"
    fused_runtime = True
    runtime = "GPTQModel's serving back ends (vLLM, SGLang)"
    can_import = True
    consumers = ("gptqmodel",)
    stacked_experts = None  # patterns over the per-expert modules GPTQModel quantizes

    def check(self, plan: BitPlan) -> None:
        refuse(plan, self.name, lambda o: o.is_keep or int_settings(o).bits in BITS,
               "GPTQModel quantizes to 2, 3, 4 or 8 bits (or keeps 16)")

    def build(self, plan: BitPlan) -> dict:
        groups = group_by_option(plan)
        quantized = [(o, names) for o, names in groups if not o.is_keep]
        if not quantized:
            raise ExportError("gptqmodel: the plan keeps every layer at 16 bits; there is nothing to quantize")
        counts = Counter({o: len(names) for o, names in quantized})
        default = max(quantized, key=lambda g: (counts[g[0]], -quantized.index(g)))[0]
        doc = {**_fields(default), "dynamic": {}}
        for opt, names in groups:
            if opt.is_keep:
                doc["dynamic"]["-:" + modules_pattern(names)] = {}
        for opt, names in quantized:
            if opt != default:
                doc["dynamic"]["+:" + modules_pattern(names)] = _fields(opt)
        if any(lay == "lm_head" and not plan.option(lay).is_keep for lay in plan.layers):
            doc["lm_head"] = True
        for lay in plan.layers:  # self-check: GPTQModel's lookup gives every module its layer's option
            for module in expert_modules(lay, (0, 1, 10, 127)):
                if _option_kwargs(resolve(doc, module)) != _option_kwargs(plan.option(lay)):
                    raise ExportError(f"gptqmodel: internal error, pattern for {module!r} does not round-trip")
        return doc

    def reads_layer(self, layer) -> bool:
        """GPTQModel quantizes the Linears of its module trees: never embeddings or MoE routers
        (``gate:!``), so importing with a model leaves them out instead of giving them the default."""
        return layer.kind != "embedding" and layer.role != "router"

    def read(self, doc, layers, source) -> BitPlan:
        if not isinstance(doc, dict) or ("bits" not in doc and "dynamic" not in doc):
            raise ExportError(
                f"{source}: not a GPTQModel QuantizeConfig (expected a JSON object with 'bits', "
                f"'group_size', 'sym' and 'dynamic')"
            )
        check_shape(doc, source)
        names = need_layers(layers, self.name, source)
        formats = formats_by_settings("gptqmodel")
        try:
            options = {name: _as_format(_resolve_layer(doc, name, source), formats) for name in names}
        except (re.error, TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise ExportError(f"{source}: cannot read the GPTQModel config: {exc}") from None
        return plan_from_options(options, self.name, source)


def _resolve_layer(doc: dict, name: str, source: str) -> Option:
    """The option of plan layer ``name``: its module's, or the one option all modules of a stacked
    expert tensor resolve to (refused if they differ)."""
    if unfused_projections(name) is None:
        return resolve(doc, name)
    seen: dict[tuple, str] = {}
    for module in expert_modules(name, range(EXPERTS_CHECKED)):
        seen.setdefault(tuple(_option_kwargs(resolve(doc, module)).items()), module)
    if len(seen) > 1:
        a, b = list(seen.values())[:2]
        raise ExportError(f"{source}: the GPTQModel config gives the experts of {name!r} different settings "
                          f"({a!r} and {b!r}); mpsearch plans one option per stacked expert tensor")
    return resolve(doc, next(iter(seen.values())))


def _as_format(opt: Option, formats: dict[tuple, str]) -> Option:
    """The GPTQModel format with exactly these settings (``gptq-int4-g128``; ``formats``:
    :func:`~mpsearch.export._base.formats_by_settings`), else ``opt``."""
    name = None if opt.is_keep else formats.get((opt.bits, opt.group_size, opt.symmetric))
    return format_option(name) if name is not None else opt


def _option_kwargs(opt: Option) -> dict:
    opt = int_settings(opt)
    return {"bits": opt.bits, "group_size": opt.group_size, "symmetric": opt.symmetric}


def check_shape(doc: dict, source: str) -> None:
    """The fields a GPTQModel config must have the types of, before any is read."""
    for key, types in (("bits", int), ("group_size", int), ("sym", bool), ("lm_head", bool)):
        if key in doc:
            expect(doc[key], types, f"{key!r}", source)
    dynamic = doc.get("dynamic")
    if dynamic is None:
        return
    expect(dynamic, dict, "'dynamic'", source)
    for key, override in dynamic.items():
        expect(key, str, "a 'dynamic' key", source)
        if override is None:
            continue
        expect(override, dict, f"the 'dynamic' override of {key!r}", source)
        for field, types in (("bits", int), ("group_size", int), ("sym", bool)):
            if field in override:
                expect(override[field], types, f"{field!r} of the 'dynamic' override {key!r}", source)
