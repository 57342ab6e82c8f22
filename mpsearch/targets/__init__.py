"""Targets: the quantizer that will execute the plan decides the options.

A :class:`Target` describes one consumer (llama.cpp, GPTQModel, vLLM, torchao, ModelOpt, AutoRound,
or ``mpsearch``'s own integer options, the default):

- ``options``: every option it can execute, named as the consumer names them, and
  ``default_options``, the set a search uses unless told otherwise;
- the per-tensor rules (:meth:`Target.legal_options`): which options a weight of a given shape may
  take (K-quants need columns divisible by 256; group sizes must divide the input features...);
- which layers it plans (:meth:`Target.plans_layer`) and why it leaves the others
  (:meth:`Target.unplanned_reason`): a tied ``lm_head`` is one tensor in GGUF; routers of
  mixture-of-experts blocks stay in 16 bits (llama.cpp keeps ``ffn_gate_inp`` in F32);
- its runtime ties (``fused_runtime``: q/k/v and gate/up fused into one matrix; ``moe_ties``: the
  expert tensors one decision covers), applied when the table is built so that every solver honours
  them;
- ``exporter``: the ``mpsearch export --to`` format that writes what the consumer reads;
- :meth:`Target.recipes`: the consumer's own default recipes (uniform types, built-in mixes) as
  ``{layer: option}`` plans, measured beside mpsearch's frontier.

Each option's exact storage, rounding and shape rule live in its :mod:`mpsearch.formats` format, so
a target is mostly data: which formats, for which layers. The consumer targets
(:class:`DeclaredTarget`) do not list their options: each format declares the targets that offer it
(:class:`mpsearch.formats.Offer`: in the default set or not, its rank), and the target's ``options``,
``default_options`` and ``imatrix_default_options`` are a query over the format registry
(:func:`mpsearch.formats.offered_by`), so a format registered by a plugin joins its target's options.
"""

from __future__ import annotations

from ..errors import close_matches, MpsearchError, name_list
from ..formats import offered_by
from ..options import expand_presets, Option, parse_option
from ..plan import BitPlan
from ..registry import REGISTRIES, TARGETS  # noqa: F401  (TARGETS: the names, re-exported)

DEFAULT_TARGET = "mpsearch"


class Target:
    """One consumer. Subclasses (or instances) set the attributes; methods hold the rules."""

    name: str = ""
    consumer: str = ""
    description: str = ""
    exporter: str | None = None
    options: tuple[str, ...] = ()
    default_options: tuple[str, ...] = ()
    #: the default set when the rounding uses an importance matrix (None: ``default_options``)
    imatrix_default_options: tuple[str, ...] | None = None
    #: options whose imatrix rounding is too slow for the CPU's default set (named in its warning)
    cpu_imatrix_left_out: tuple[str, ...] = ()
    fused_runtime: bool = False
    #: tie regexes over expert layers: the expert tensors the consumer stores under one decision
    moe_ties: tuple[str, ...] = ()
    #: whether one expert of a stacked tensor may be a layer of its own (``per_expert``)
    per_expert: bool = False
    notes: str = ""

    # ------------------------------------------------------------------ options
    def default_option_names(self, imatrix: bool = False) -> tuple[str, ...]:
        """The options a search uses unless told otherwise (with an importance matrix in effect,
        ``imatrix_default_options`` where the target has them)."""
        if imatrix and self.imatrix_default_options:
            return self.imatrix_default_options
        return self.default_options or self.options

    def parsed_options(self, names=None, imatrix: bool = False) -> list[Option]:
        """The target's options (``names``: a subset, as a comma list or list), checked.

        ``imatrix``: whether the rounding uses an importance matrix; without one, a format the
        consumer writes only with one (llama.cpp's iq2_xxs...) is refused."""
        if names is None:
            names = self.default_option_names(imatrix)
        items = [s.strip() for s in names.split(",") if s.strip()] if isinstance(names, str) else list(names)
        items = expand_presets(items)
        if not items:
            raise MpsearchError(f"target {self.name!r}: the option list is empty")
        out, seen = [], set()
        for item in items:
            opt = parse_option(item)
            if opt.name not in self.options:
                raise MpsearchError(
                    f"target {self.name!r} cannot execute option {opt.name!r}"
                    f"{close_matches(opt.name, self.options)}; its options: {name_list(self.options, 20)}"
                )
            if opt.name not in seen:
                seen.add(opt.name)
                out.append(opt)
        if not imatrix:
            need = [o.name for o in out if o.fmt is not None and getattr(o.format, "needs_imatrix", None)]
            if need:
                raise MpsearchError(
                    f"{self.consumer.split()[0]} writes {', '.join(need)} only with an importance matrix: "
                    f"quantize with one (--imatrix, or imatrix rounding from calibration data) or "
                    f"leave {'it' if len(need) == 1 else 'them'} out of the options")
        return out

    def legal_options(self, layer, options: list[Option]) -> list[Option]:
        """The options of ``options`` that ``layer`` may take under this target's rules."""
        return [o for o in options if self.option_reason(layer, o) is None]

    def option_reason(self, layer, option: Option) -> str | None:
        """``None`` if ``layer`` may take ``option``, else why not. Shape rules hold per expert matrix
        for stacked experts; options that also quantize the layer's input are not offered to experts
        (their inputs live inside the experts module's forward, where mpsearch's applier cannot
        quantize them)."""
        if (getattr(layer, "role", None) == "expert" and option.act_bits < 16
                and "stack" not in getattr(layer, "extra", {})):
            return ("quantizes activations, which mpsearch cannot reproduce inside a fused experts "
                    "module (weight-only options only)")
        return option.check_shape(layer.out_channels, layer.in_features)

    def plans_layer(self, layer, model=None) -> bool:
        """Whether this target stores ``layer`` as a tensor of its own (and so plans it)."""
        return self.unplanned_reason(layer, model) is None

    def unplanned_reason(self, layer, model=None) -> str | None:
        """Why this target leaves ``layer`` out of its plans (``None``: it plans it)."""
        if getattr(layer, "role", None) == "router":
            return ("router: kept in 16 bits (routing decisions; vLLM, llm-compressor, GPTQModel, "
                    "ModelOpt and AutoRound leave the gate unquantized)")
        return None

    def recipes(self, layers, imatrix: bool = False) -> dict[str, dict[str, str]]:
        """The consumer's own recipes: recipe name -> {layer: option name}. Uniform by default.
        ``imatrix``: whether the rounding uses an importance matrix (some recipes need one)."""
        out = {}
        for name in self.default_option_names(imatrix):
            opt = parse_option(name)
            if all(self.option_reason(lay, opt) is None for lay in layers):
                out[f"uniform-{opt.name}"] = {lay.name: opt.name for lay in layers}
        return out

    def describe(self) -> list[dict]:
        """One row per option: name, nominal bits, bits per weight (for a 4096-wide row), whether it
        is in the default set (without and with an importance matrix), whether it needs one."""
        rows = []
        for name in self.options:
            opt = parse_option(name)
            fmt = opt.format
            bpw = fmt.bits_per_weight() if fmt is not None else opt.size_bits(1, 4096) / 4096
            rows.append({
                "option": opt.name, "bits": opt.bits,
                "bits_per_weight": round(bpw, 6),
                "act_bits": opt.act_bits,
                "default": name in self.default_options,
                "default_with_imatrix": name in self.default_option_names(imatrix=True),
                "needs_imatrix": bool(getattr(fmt, "needs_imatrix", None)),
                "about": fmt.description if fmt is not None else "",
            })
        return rows

    def __repr__(self) -> str:
        return f"<target {self.name}>"


class DeclaredTarget(Target):
    """A target whose options are the registered formats that declare an :class:`~mpsearch.formats.Offer`
    for its ``name``, in the order of their ranks, then ``keep``; its default sets are those whose
    offer says so (``imatrix_default_options`` is ``None`` unless some offer sets ``imatrix_default``)."""

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(name for name, _ in offered_by(self.name)) + ("keep",)

    @property
    def default_options(self) -> tuple[str, ...]:
        return tuple(name for name, offer in offered_by(self.name) if offer.default)

    @property
    def imatrix_default_options(self) -> tuple[str, ...] | None:
        offers = offered_by(self.name)
        if all(offer.imatrix_default is None for _, offer in offers):
            return None
        return tuple(name for name, offer in offers if offer.in_imatrix_default)


def is_output_layer(model, name: str, *, tied_only: bool = False) -> bool:
    """Whether module ``name`` is the model's output projection (``get_output_embeddings()``), with
    ``tied_only``: only when it shares its weight with the input embedding."""
    try:
        out = model.get_output_embeddings()
        inp = model.get_input_embeddings() if tied_only else None
    except (AttributeError, NotImplementedError):
        return False
    if out is None or (tied_only and (inp is None or out.weight is not inp.weight)):
        return False
    from ..layers import get_module  # start-up: keeps this module free of torch/numpy

    try:
        return get_module(model, name) is out
    except MpsearchError:  # a name the model does not have is not its output layer
        return False


def get_target(name: str | Target | None) -> Target:
    """The target called ``name`` (``None``: the default, mpsearch's own integer options); a
    :class:`Target` is returned as it is. Resolve a target once where a command starts and pass the
    object on."""
    if isinstance(name, Target):
        return name
    return REGISTRIES["target"].load(DEFAULT_TARGET if name is None else name)


def target_names() -> list[str]:
    return REGISTRIES["target"].names()


#: fused-projection siblings as tie regexes (one capture: the parent module), for runtimes that fuse
_FUSED_TIES = (
    r"^(.*)\.(?:q_proj|k_proj|v_proj)$",
    r"^(.*)\.(?:query|key|value)$",
    r"^(.*)\.(?:gate_proj|up_proj)$",
    r"^(.*)\.(?:w1|w3)$",
)


#: fused-MoE runtimes (vLLM's FusedMoE: one quantization scheme for w13 and w2 of a layer's experts)
FUSED_MOE_TIES = (r"^(.*\.experts)\.(?:gate_up_proj|gate_proj|up_proj|down_proj|[^.\[]+\.[^.\[]+)$",)
#: one stacked GGUF tensor per projection: llama.cpp's ffn_*_exps from one Linear per expert
STACKED_EXPERT_TIES = (r"^(.*\.experts)\.[^.\[]+\.([^.\[]+)$",)


def runtime_ties(target) -> list[str]:
    """Tie regexes for the target's runtime (fused q/k/v and gate/up, and the expert tensors that
    share one decision), applied at solve time."""
    chosen = get_target(target)
    return (list(_FUSED_TIES) if chosen.fused_runtime else []) + list(chosen.moe_ties)


def table_target(table, target=None) -> Target:
    """The target a table is solved for: ``target`` if given (checked against the table's own),
    else the one the table was estimated for (``mpsearch`` for tables made without one). Every
    option of the table must be one the target executes."""
    made_for = table.metadata.get("target") if isinstance(table.metadata, dict) else None
    chosen = get_target(target if target is not None else made_for)
    if made_for and target is not None and get_target(made_for).name != chosen.name:
        raise MpsearchError(
            f"the table was estimated for target {made_for!r}, not {chosen.name!r}: re-estimate with "
            f"--target {chosen.name} (options, sizes and rounding differ between targets)"
        )
    if chosen.name != DEFAULT_TARGET:
        chosen.parsed_options(list(table.options), imatrix=table_uses_imatrix(table))
    return chosen


def solve_budget(table, budget, target=None):
    """``budget`` with the target's runtime ties added (a new Budget; the input is unchanged)."""
    import copy

    chosen = table_target(table, target)
    ties = runtime_ties(chosen)
    if not ties:
        return budget
    out = copy.deepcopy(budget)
    out.ties = list(out.ties) + [t for t in ties if t not in out.ties]
    return out


def export_format(plan, to=None, target=None) -> str:
    """The export format for ``plan``: ``to`` if given, else the format of ``target``, else of the
    target the plan was solved for."""
    if to:
        return to
    made_for = (plan.provenance.get("table") or {}).get("target") if isinstance(plan.provenance, dict) else None
    chosen = get_target(target if target is not None else made_for)
    if not chosen.exporter:
        raise MpsearchError(
            f"target {chosen.name!r} has no consumer file to write: name one with --to "
            f"(torchao, gptqmodel, llm-compressor, llama.cpp, autoround, modelopt)"
        )
    return chosen.exporter


def table_uses_imatrix(table) -> bool:
    """Whether ``table`` was estimated with importance-matrix rounding (its metadata's ``imatrix``
    entry, when the estimate recorded one)."""
    md = table.metadata if isinstance(table.metadata, dict) else {}
    return bool(md.get("imatrix"))


def recipe_plans(table, target, layers) -> dict:
    """The target's own recipes (uniform types with the consumer's fallbacks, llama.cpp's built-in
    mixes...) as plans over ``table``'s layers: ``{recipe name: BitPlan}``. ``layers`` are the
    :class:`~mpsearch.layers.Layer` objects of the table's layers (their shapes decide the rules).
    A recipe that needs an option the table does not offer for some layer is left out."""
    chosen = get_target(target)
    by_name = {lay.name: lay for lay in layers}
    missing = [n for n in table.layers if n not in by_name]
    if missing:
        raise MpsearchError(f"recipe_plans: no shape for table layer(s) {name_list(missing, 4)}")
    offered = table.frame.groupby("layer")["option"].apply(set).to_dict()
    bits = table.option_bits()
    out = {}
    recipes = chosen.recipes([by_name[n] for n in table.layers], imatrix=table_uses_imatrix(table))
    for name, choice in recipes.items():
        if set(choice) != set(table.layers) or any(choice[n] not in offered[n] for n in table.layers):
            continue
        options = {}
        for n in table.layers:
            opt = parse_option(choice[n])
            options[n] = {**opt.to_dict(), "name": choice[n]}
        out[name] = BitPlan(bits={n: int(bits[choice[n]]) for n in table.layers}, options=options,
                            provenance={"solver": f"recipe:{name}", "table": {"target": chosen.name}})
    return out
