"""What every exporter shares: the base class, the runtime-tie check, option checks, compact regexes.

An exporter turns a :class:`~mpsearch.plan.BitPlan` into a *document* (plain Python data: the dict a
consumer's JSON or YAML holds, or the ordered ``tensor -> type`` mapping of a llama.cpp file) and
that document into text. Importers, where the format carries per-layer bits, go the other way. All
of it is torch-free; the optional consumer packages are imported only by the helpers that need them.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable

from ..errors import ExportError, name_list  # noqa: F401  (ExportError re-exported)
from ..formats import format_names, get_format
from ..options import Option, option_sort_key
from ..plan import BitPlan
from ..ties import tie_groups


class Exporter:
    """One consumer format. Constructors only store the format's settings.

    Class attributes:

    - ``name``: the format name (``--to NAME``); ``suffix``: the usual file suffix.
    - ``fused_runtime``: the runtime that serves this format fuses sibling projections (q/k/v,
      gate/up) into one matrix, so they must share one option; ``runtime`` names it in messages.
    - ``can_import``: whether :meth:`read` turns a document back into a plan.
    - ``consumers``: the consumers (:attr:`mpsearch.formats.Format.consumer`) whose formats this
      exporter writes exactly; a plan option of another consumer's format is refused before
      :meth:`check` (see :func:`check_consumers`). mpsearch's own integer options (``fmt`` None)
      are each exporter's to accept or refuse, as before.
    """

    name = ""
    consumers: tuple[str, ...] = ()
    suffix = ".json"
    fused_runtime = False
    runtime = ""
    can_import = False
    #: ``None`` if the format writes stacked expert tensors (``...experts.gate_up_proj``), else why not
    stacked_experts: str | None = "mpsearch does not write stacked expert tensors to this format"

    # ------------------------------------------------------------------ export
    def check(self, plan: BitPlan) -> None:
        """Raise :class:`ExportError` if some layer's option has no form in this format."""

    def build(self, plan: BitPlan):
        raise NotImplementedError

    def dumps(self, doc) -> str:
        return json.dumps(doc, indent=2) + "\n"

    # ------------------------------------------------------------------ import
    def loads(self, text: str, source: str):
        try:
            return json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ExportError(f"{source}: not valid JSON ({exc})") from None

    def read(self, doc, layers: list[str] | None, source: str) -> BitPlan:
        raise ExportError(f"format {self.name!r} has no importer")  # import_plan names the ones that have

    def reads_layer(self, layer) -> bool:
        """Whether a model's layer (:class:`~mpsearch.layers.Layer`) is one the consumer may have
        quantized, so that importing with a model reads its option (others are left out)."""
        return True


# ---------------------------------------------------------------------- consumer formats
def check_consumers(plan: BitPlan, exporter: Exporter, exporter_for_consumer=lambda consumer: None) -> None:
    """Refuse a plan naming a format that another consumer executes (one line: layer, format, and the
    ``--to`` that ``exporter_for_consumer(consumer)`` names)."""
    bad = []
    for lay in plan.layers:
        fmt = plan.option(lay).format
        if fmt is not None and fmt.consumer not in exporter.consumers:
            bad.append((lay, fmt))
    if not bad:
        return
    lay, fmt = bad[0]
    to = exporter_for_consumer(fmt.consumer)
    fix = f"export it with --to {to}" if to else "no exporter writes that consumer's format"
    more = f" ({len(bad) - 1} more layer(s) name formats {exporter.name} does not write)" if len(bad) > 1 else ""
    raise ExportError(f"{exporter.name}: layer {lay!r} has {fmt.name!r}, a {fmt.consumer} format: {fix}{more}")


def int_settings(opt: Option) -> Option:
    """The option as plain integer settings: an integer format (``IntFormat``: ``bits``, ``group``,
    ``symmetric``) becomes the equivalent mpsearch option, so an exporter reads its exact bits, group
    size and symmetry; other options are returned as they are."""
    fmt = opt.format
    if fmt is not None and all(hasattr(fmt, a) for a in ("group", "symmetric")):
        return Option(fmt.bits, group_size=fmt.group, symmetric=fmt.symmetric)
    return opt


def format_name(opt: Option, consumer: str) -> str | None:
    """The option's format name if it is a format of ``consumer``, else None."""
    fmt = opt.format
    return fmt.name if fmt is not None and fmt.consumer == consumer else None


def format_option(name: str) -> Option:
    """The plan option of a registered format."""
    fmt = get_format(name)
    return Option(bits=fmt.bits, fmt=fmt.name)


def consumer_config(opt: Option, consumer: str) -> dict | None:
    """A copy of what the format of ``opt`` declares that ``consumer``'s file says for it
    (:attr:`mpsearch.formats.Format.consumer_config`), if it is a format of ``consumer`` that
    declares one; else None (the exporter writes its integer settings)."""
    if format_name(opt, consumer) is None or opt.format.consumer_config is None:
        return None
    return copy.deepcopy(opt.format.consumer_config)


def formats_by_settings(consumer: str) -> dict[tuple, str]:
    """``(bits, group size, symmetric)`` -> the registered format of ``consumer`` with exactly those
    integer settings (the importers give a consumer's format back where the document is exactly it)."""
    out = {}
    for name in format_names():
        fmt = get_format(name)
        if fmt.consumer == consumer and fmt.consumer_config is None and hasattr(fmt, "group"):
            out.setdefault((fmt.bits, fmt.group, fmt.symmetric), name)
    return out


# ---------------------------------------------------------------------- mixture of experts
#: a stacked expert tensor of transformers (one 3-D parameter for all experts of a projection)
STACKED_EXPERT = re.compile(r"^(?P<container>.*\.experts)\.(?P<proj>gate_up_proj|gate_proj|up_proj|down_proj)$")
#: one expert's layer of a stacked tensor (``--target mpsearch`` with per_expert)
EXPERT_SLICE = re.compile(r"^.*\[\d+\]$")


def unfused_projections(name: str) -> tuple[str, tuple[str, ...]] | None:
    """``(container, projections)`` of a stacked expert tensor as the consumers that unfuse it see
    it: one ``nn.Linear`` per expert and projection, ``<container>.<e>.<projection>``, a fused
    ``gate_up_proj`` split into ``gate_proj`` and ``up_proj`` (llm-compressor's ``linearize.py``,
    AutoRound's ``moe_experts_interface.py``, GPTQModel's defuser, ModelOpt's export); ``None``
    for any other layer."""
    m = STACKED_EXPERT.match(name)
    if m is None:
        return None
    projs = ("gate_proj", "up_proj") if m["proj"] == "gate_up_proj" else (m["proj"],)
    return m["container"], projs


def check_experts(plan: BitPlan, exporter: Exporter, force: bool = False) -> None:
    """Refuse per-expert layers (every consumer stores a projection's experts with one type),
    stacked expert tensors where the format does not write them, and, for fused runtimes (vLLM's
    FusedMoE), a layer's experts with different options unless ``force``."""
    sliced = [n for n in plan.layers if EXPERT_SLICE.match(n)]
    if sliced:
        raise ExportError(
            f"{exporter.name}: {sliced[0]!r} is one expert of a stacked expert tensor; consumers store all "
            f"experts of a projection with one type, so per-expert plans are for --target mpsearch (apply, "
            f"validate); solve per tensor to export")
    stacked = [n for n in plan.layers if STACKED_EXPERT.match(n)]
    if stacked and exporter.stacked_experts is not None:
        raise ExportError(f"{exporter.name}: the plan has stacked expert tensors ({stacked[0]!r}, "
                          f"{len(stacked)} in all): {exporter.stacked_experts}")
    if not exporter.fused_runtime or force:
        return
    by_container: dict[str, list[str]] = {}
    for n in plan.layers:
        m = STACKED_EXPERT.match(n) or re.match(r"^(?P<container>.*\.experts)\.\d+\.[^.]+$", n)
        if m:
            by_container.setdefault(m["container"], []).append(n)
    for container, members in by_container.items():
        if len({plan.option(m).name for m in members}) > 1:
            shown = ", ".join(f"{m}={plan.option(m).name}" for m in members[:4])
            raise ExportError(
                f"{exporter.name}: {exporter.runtime} runs the experts of {container!r} as one fused MoE layer "
                f"with one quantization scheme, but the plan gives them different options: {shown}; solve "
                f"with --target vllm (it ties them) or export anyway with --force (force=True)")


# ---------------------------------------------------------------------- checks
def check_fused(plan: BitPlan, exporter: Exporter) -> None:
    """Refuse a plan whose fused siblings (see :data:`mpsearch.ties.FUSED_SIBLINGS`) disagree."""
    groups: dict[str, list[str]] = {}
    for layer, gid in tie_groups(plan.layers, fuse_projections=True).items():
        groups.setdefault(gid, []).append(layer)
    bad = []
    for members in groups.values():
        names = {plan.option(m).name for m in members}
        if len(names) > 1:
            bad.append(", ".join(f"{m}={plan.option(m).name}" for m in members))
    if bad:
        more = f" (and {len(bad) - 1} more groups)" if len(bad) > 1 else ""
        raise ExportError(
            f"{exporter.name}: these layers are fused into one matrix by {exporter.runtime}, but the plan "
            f"gives them different options: {bad[0]}{more}; re-solve with a tie (e.g. mpsearch solve ... "
            f"--tie 'layers\\.(\\d+)\\.self_attn\\.[qkv]_proj' --tie 'layers\\.(\\d+)\\.mlp\\.(?:gate|up)_proj') "
            f"or export anyway with --force (force=True)"
        )


def refuse(plan: BitPlan, fmt: str, ok, why: str) -> None:
    """Raise naming every layer whose option fails ``ok(option)``; ``why`` says what the format has."""
    bad = [f"{lay} ({plan.option(lay).name})" for lay in plan.layers if not ok(plan.option(lay))]
    if bad:
        raise ExportError(
            f"{fmt} cannot express the option of {len(bad)} layer(s): {name_list(bad, limit=4)}; "
            f"{why}. Re-solve with options this format has (e.g. mpsearch estimate --bits ...)"
        )


def group_by_option(plan: BitPlan) -> list[tuple[Option, list[str]]]:
    """Layers per option, options in the canonical order, layers in plan order."""
    groups: dict[Option, list[str]] = {}
    for lay in plan.layers:
        groups.setdefault(plan.option(lay), []).append(lay)
    return sorted(groups.items(), key=lambda kv: option_sort_key(kv[0]))


def plan_from_options(options: dict[str, Option], fmt: str, source: str) -> BitPlan:
    """The plan an importer returns: bits, options, and where it came from."""
    if not options:
        raise ExportError(f"{source}: the {fmt} document names no layer")
    return BitPlan(
        bits={k: o.bits for k, o in options.items()},
        options={k: o.to_dict() for k, o in options.items()},
        provenance={"solver": "import", "imported_from": fmt, "source": source},
    )


def need_layers(layers, fmt: str, source: str) -> list[str]:
    if layers is None:
        raise ExportError(
            f"{source}: a {fmt} document names layers by regex, so importing it needs the model's "
            f"layer names: pass layers=[...] (or a model), or --layers FILE / --model SPEC on the CLI"
        )
    return list(layers)


# ---------------------------------------------------------------------- regexes
def compact_pattern(names: Iterable[str]) -> str:
    """One anchored regex that matches exactly ``names`` (module names), as short as is simple.

    Names that differ only in one numeric component (the block index) share a template; templates
    with the same set of indices share one alternation of suffixes::

        model.layers.0.mlp.up_proj, model.layers.3.mlp.up_proj, model.layers.3.self_attn.q_proj
        -> ^(?:model\\.layers\\.(?:0|3)\\.mlp\\.up_proj|model\\.layers\\.3\\.self_attn\\.q_proj)$
    """
    templates: dict[tuple[str, str], list[str]] = {}
    plain: list[str] = []
    for name in dict.fromkeys(names):
        parts = name.split(".")
        i = next((k for k, p in enumerate(parts) if p.isdigit()), None)
        if i is None:
            plain.append(re.escape(name))
            continue
        key = (".".join(parts[:i]), ".".join(parts[i + 1:]))
        templates.setdefault(key, []).append(parts[i])
    merged: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for (prefix, suffix), idx in templates.items():
        ids = tuple(sorted(set(idx), key=int))
        merged.setdefault((prefix, ids), []).append(suffix)
    alts = list(plain)
    for (prefix, ids), suffixes in merged.items():
        head = re.escape(prefix) + r"\." if prefix else ""
        num = ids[0] if len(ids) == 1 else "(?:" + "|".join(ids) + ")"
        tails = [r"\." + re.escape(s) if s else "" for s in suffixes]
        tail = tails[0] if len(tails) == 1 else "(?:" + "|".join(tails) + ")"
        alts.append(head + num + tail)
    return "^(?:" + "|".join(alts) + ")$" if len(alts) > 1 else "^" + alts[0] + "$"


_KIND = {dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "true or false",
         float: "a number", type(None): "null"}


def expect(value, types, what: str, source: str):
    """``value`` if it is one of ``types`` (booleans are not integers), else an ExportError naming
    ``what`` in ``source`` (the importers check a document's shape with it before reading it)."""
    types = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        want = " or ".join(_KIND.get(t, t.__name__) for t in types)
        raise ExportError(f"{source}: {what} must be {want}, got {type(value).__name__} {str(value)[:60]!r}")
    return value
