"""The estimator interface: model + calibration data -> CostTable.

An estimator implements :meth:`Estimator._damage`, returning a ``[layers, options]`` array of
damage; the base class discovers the layers (and their MACs with one forward pass), builds the table
with its resource columns (``size_bits`` with scale overhead, ``params``, ``macs``, ``bops``),
and writes the metadata: estimator and settings, model fingerprint, data description, cost.
Constructors only store settings, so they can be copied into the table's metadata.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..checks import check_batches, check_weights
from ..coverage import model_coverage
from ..data import as_batches, float_dtype, model_device, move_batch, split_batch
from ..diagnose import annotate
from ..distributed import current, Shard, stats
from ..errors import MpsearchError
from ..filemodels import record_file_model
from ..gptq import gptq_rounding, input_hessians
from ..imatrix import imatrix_expected, imatrix_rounding, layer_weights, resolve_imatrix
from ..layers import discover_layers, Layer, weight_tensor
from ..moe import apply_fallback, per_expert_errors, routed_tokens_column, routing_counts, scan, split_name
from ..options import Option, parse_options
from ..quant import quantization_error
from ..recipe import target_default_options
from ..table import CostTable
from ..targets import DEFAULT_TARGET, get_target
from .cache import cache_key, Checkpoint
from .cache import model_fingerprint  # noqa: F401  (re-exported)

#: the options an estimator costs when given none (mpsearch's own target): the library's default
DEFAULT_OPTIONS = "2,3,4,8"


@dataclass
class Context:
    """What ``_damage`` gets besides the model: the layers, options, batches, and bookkeeping."""

    layers: list[Layer]
    options: list[Option]
    batches: list
    device: torch.device
    progress: bool = True
    cost: dict = field(default_factory=dict)  # passes, probes... written into the metadata
    extra_metadata: dict = field(default_factory=dict)
    seed: int = 0
    checkpoint: object = None  # a cache.Checkpoint when the estimator has a cache_dir, else None
    extra_columns: dict = field(default_factory=dict)  # name -> [L, K] array (e.g. damage_std)
    legal: np.ndarray | None = None  # [L, K] bool: the options each layer may take (None: all)
    shard: Shard = field(default_factory=Shard)  # a distributed.Shard: which work units are this rank's, and the reduction

    def count(self, key: str, n: int = 1) -> None:
        self.cost[key] = self.cost.get(key, 0) + n

    def layer_options(self, i: int):
        """``(k, option)`` for the options layer ``i`` may take (the target's per-tensor rules);
        damage of the others is never computed and their rows are left out of the table."""
        for k, opt in enumerate(self.options):
            if self.legal is None or self.legal[i, k]:
                yield k, opt


class Estimator:
    """Base class. Subclasses set ``name`` (and ``needs_data``) and implement :meth:`_damage`.

    ``routed_damage``: the damage of a stacked expert tensor weighs each expert by the calibration
    tokens routed to it (output-distance, fisher, hessian; weighted weight-error), so experts with few
    tokens get the fallback of :func:`mpsearch.moe.apply_fallback`.
    """

    name = "base"
    needs_data = False
    #: what a default means where its value does not say it (shown by ``mpsearch list``)
    _setting_notes = {"options": "None: 2,3,4,8, or a consumer target's default set; on the CLI: --bits, "
                                 "default the recipe's options",
                      "cache_dir": "None: no cache in Python; 'mpsearch estimate' keeps one in "
                                   "$MPSEARCH_ESTIMATOR_CACHE or ~/.cache/mpsearch/estimator (--param cache_dir=None: "
                                   "none), 'frontier --model' in its output folder",
                      "device": "None: where the model is; a device the model is not on is refused (move the model "
                                "first)"}
    routed_damage = False

    def __init__(self, *, options: str | list | tuple | None = None, seed: int = 0, device: str | None = None):
        self.options = options
        self.seed = seed
        self.device = device

    def get_params(self) -> dict:
        import inspect

        params = {}
        for p in inspect.signature(type(self).__init__).parameters:
            if p != "self" and hasattr(self, p):
                v = getattr(self, p)
                params[p] = v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
        return params

    def parsed_options(self, target=None, imatrix: bool = False, gpu: bool = False) -> list[Option]:
        """The options to estimate, checked against ``target`` (a name or a
        :class:`~mpsearch.targets.Target`). ``options=None`` (the default) stands for the target's
        default set (llama.cpp's i-quants join it when the rounding uses an ``imatrix`` on a ``gpu``:
        :func:`mpsearch.recipe.target_default_options`), and for
        mpsearch's own target for :data:`DEFAULT_OPTIONS` (the library's default; the CLI and
        :func:`mpsearch.recipe.resolve` always pass the options they decided)."""
        target = get_target(target)
        if target.name == DEFAULT_TARGET:
            return parse_options(DEFAULT_OPTIONS if self.options is None else self.options)
        if self.options is None:
            return target.parsed_options(target_default_options(target, imatrix, gpu), imatrix=imatrix)
        return target.parsed_options(self.options, imatrix=imatrix)

    def estimate(
        self,
        model: torch.nn.Module,
        data=None,
        *,
        layers: list[Layer] | None = None,
        ties=(),
        fuse_projections: bool = False,
        include_embedding: bool = False,
        exclude=(),
        progress: bool = True,
        act_bits: int = 16,
        target=None,
        quantizer: str = "rtn",
        per_expert: bool = False,
        min_coverage: float = 1.0,
        min_expert_tokens: int = 8,
        imatrix="auto",
    ) -> CostTable:
        """Fill a cost table for ``model``.

        ``data`` is a batch or an iterable of batches (see :mod:`mpsearch.data`); the first batch
        also measures MACs. ``ties``/``fuse_projections`` write the ``group`` column. ``target``
        (a :class:`~mpsearch.targets.Target`, or its name, resolved here once) decides the options,
        which layers are planned, which options each layer may take (the table is then ragged) and
        the runtime ties. ``imatrix`` (llama.cpp): the importance matrix llama.cpp's types are
        rounded with, as ``llama-quantize --imatrix`` does (:func:`mpsearch.imatrix.resolve_imatrix`:
        ``"auto"`` computes it from ``data`` for the llama.cpp target, ``None`` rounds without one,
        or an :class:`~mpsearch.imatrix.Imatrix` / file); the table records it (``rounding``,
        ``imatrix``) and keeps the object as ``table.imatrix``.

        Mixture-of-experts models (:mod:`mpsearch.moe`): ``per_expert`` makes each expert of a
        stacked tensor a layer of its own (``mpsearch`` target only); the tokens routed to each
        expert are counted on ``data`` (``metadata["moe"]``, column ``routed_tokens``), and experts
        with fewer than ``min_expert_tokens`` get the fallback (column ``damage_fallback``). The
        table's coverage of the model's matrix weights is recorded (``metadata["coverage"]``), and
        the estimate is refused when less than ``min_coverage`` of what the target can quantize would
        be planned (:mod:`mpsearch.coverage`; ``exclude`` accepts leaving tensors out).
        """
        batches, target_obj, options = self._checked_inputs(model, data, target, imatrix, quantizer, per_expert,
                                                            min_expert_tokens)
        fuse_projections = fuse_projections or target_obj.fused_runtime
        device = model_device(model)  # the estimator's own device setting is the model's (check_device)
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % (2**32))
        check_batches(model, batches, device)  # one line naming a batch the model cannot run on
        if layers is None:
            layers = discover_layers(model, move_batch(batches[0], device) if batches else None,
                                     include_embedding=include_embedding, ties=list(ties) + list(target_obj.moe_ties),
                                     fuse_projections=fuse_projections, exclude=exclude, per_expert=per_expert)
        shard = current()
        layers, legal, target_obj = _target_layers(model, layers, options, target_obj)
        coverage = model_coverage(model, [lay.name for lay in layers], target=target_obj, exclude=exclude,
                                  min_coverage=min_coverage).check()
        check_weights(model, [lay.name for lay in layers])

        imx = resolve_imatrix(imatrix, model, batches, target_obj, progress=progress and shard.is_main)
        imatrix_weights, legal = _with_imatrix(imx, quantizer, layers, options, legal, target_obj)
        ctx = Context(layers=layers, options=options, batches=batches, device=device,
                      progress=progress and shard.is_main, seed=self.seed, legal=legal, shard=shard)
        ctx.checkpoint = self._checkpoint(model, batches, layers, options,
                                          f"imatrix-{imx.sha256[:16]}" if imx is not None else quantizer, shard)
        t0 = time.perf_counter()
        routing = _routing(model, layers, batches, device, ctx)
        damage, cached = self._damage_or_resume(model, ctx, quantizer, imatrix_weights)
        if routing is not None:
            damage = _moe_columns(self, model, ctx, damage, routing, int(min_expert_tokens))
        seconds = time.perf_counter() - t0
        spread = stats(shard, seconds, {"cost": dict(ctx.cost)}) if not cached else None
        if spread is not None:
            ctx.extra_metadata["distributed"] = spread
        if damage.shape != (len(layers), len(options)):
            raise AssertionError(f"{self.name}: damage has shape {damage.shape}, expected {(len(layers), len(options))}")
        metadata = self._metadata(model, ctx, seconds, target_obj, quantizer, coverage, imx)
        record_file_model(metadata, model, [lay.name for lay in layers], target_obj)  # for size=/file=/bpw=
        table = annotate(build_table(layers, options, damage, metadata, act_bits=act_bits,
                                     extra_columns=ctx.extra_columns, legal=legal))
        table.imatrix = imx  # the Imatrix itself, for the caller to write (not part of the file)
        return table

    def _checked_inputs(self, model, data, target, imatrix, quantizer, per_expert, min_expert_tokens):
        """``estimate``'s inputs checked before any work: the batches (float data in the model's
        dtype), the target and the parsed options."""
        if not isinstance(model, torch.nn.Module):
            raise MpsearchError(f"estimate() takes a torch.nn.Module, got {type(model).__name__}")
        check_device(model, self.device)
        batches = [move_batch(b, None, float_dtype(model)) for b in as_batches(data)]  # float data in the model's dtype
        if self.needs_data and not batches:
            raise MpsearchError(
                f"estimator {self.name!r} needs calibration data: pass data (or --data on the CLI)"
            )

        target_obj = get_target(target)
        options = self.parsed_options(target_obj, imatrix=imatrix_expected(imatrix, target_obj, batches),
                                      gpu=on_gpu(model, self.device))
        check_choice("quantizer", quantizer, ("rtn", "gptq"))
        if quantizer == "gptq" and not batches:
            raise MpsearchError("quantizer 'gptq' needs calibration data (the layers' input Hessians)")
        if per_expert and not target_obj.per_expert:
            raise MpsearchError(
                f"per_expert: target {target_obj.name!r} stores all experts of a projection as one tensor "
                f"with one type; per-expert decisions are for --target mpsearch")
        check_positive("min_expert_tokens", min_expert_tokens, integer=True, allow_zero=True)
        return batches, target_obj, options

    def _metadata(self, model, ctx: Context, seconds: float, target_obj, quantizer: str, coverage, imx) -> dict:
        """The table's record of how it was made (settings, model, data, cost, target, rounding)."""
        metadata = {
            "estimator": self.name,
            "params": {**self.get_params(), "options": ",".join(o.name for o in ctx.options)},  # as estimated
            "options": [o.name for o in ctx.options],
            "model": {"fingerprint": model_fingerprint(model), "class": type(model).__name__},
            "data": describe_data(ctx.batches),
            "cost": {"seconds": round(seconds, 4), **ctx.cost},
            "mpsearch": __version__,
            "target": target_obj.name,
            "quantizer": quantizer,
            "coverage": coverage.to_dict(),
            "rounding": "imatrix" if imx is not None else quantizer,
            **({"imatrix": imx.describe()} if imx is not None else {}),
            **ctx.extra_metadata,
        }
        if getattr(model, "mpsearch_source_grid", None):  # weights dequantized from a quantized file
            metadata["source_grid"] = model.mpsearch_source_grid

        return metadata

    def _checkpoint(self, model, batches, layers, options, quantizer, shard):
        """The run's cache file (one per shard) when the estimator has a ``cache_dir``, else ``None``."""
        cache_dir = getattr(self, "cache_dir", None)
        if not cache_dir:
            return None

        key = cache_key(self, model, batches, layers, options)
        stem = f"{self.name}-{key}" if quantizer == "rtn" else f"{self.name}-{quantizer}-{key}"
        return Checkpoint(cache_dir, stem + shard.suffix(), every=getattr(self, "cache_every", 0.0))

    def _damage_or_resume(self, model, ctx: Context, quantizer: str, imatrix_weights=None) -> tuple[np.ndarray, bool]:
        """The damage matrix and whether it came from a finished earlier run with the same
        settings, model and data; otherwise it is computed (resuming partial state) and stored."""
        done = ctx.checkpoint.result() if ctx.checkpoint is not None else None
        if ctx.shard.enabled and not ctx.shard.min_int([done is not None])[0]:
            done = None  # every rank takes the cached result, or none does
        if done is not None:
            ctx.cost.update(done["cost"], from_cache=True)
            ctx.extra_metadata.update(done["extra_metadata"])
            ctx.extra_columns.update({k: np.asarray(v) for k, v in done["extra_columns"].items()})
            return np.asarray(done["damage"], dtype=float), True
        was_training = model.training
        model.eval()
        try:
            with _rounding(model, ctx, quantizer, imatrix_weights):
                damage = np.asarray(self._damage(model, ctx), dtype=float)
        finally:
            model.train(was_training)
        if ctx.checkpoint is not None:
            if ctx.checkpoint.previous_seconds:
                ctx.cost["resumed_after_seconds"] = round(ctx.checkpoint.previous_seconds, 4)
            ctx.checkpoint.save_result({
                "damage": damage.tolist(), "cost": dict(ctx.cost),
                "extra_metadata": ctx.extra_metadata,
                "extra_columns": {k: np.asarray(v).tolist() for k, v in ctx.extra_columns.items()},
            })
        return damage, False

    def _damage(self, model: torch.nn.Module, ctx: Context) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


def build_table(layers, options, damage, metadata=None, *, act_bits: int = 16,
                extra_columns: dict | None = None, legal=None) -> CostTable:
    """Assemble the long-form table from layers, options and a ``[L, K]`` damage array.

    ``extra_columns`` maps a column name (``damage_std``...) to another ``[L, K]`` array; ``legal``
    (``[L, K]`` bool) leaves out the rows of options a layer may not take (a ragged table).
    """
    rows = []
    damage = np.asarray(damage, dtype=float)
    extra = {k: np.asarray(v, dtype=float) for k, v in (extra_columns or {}).items()}
    for i, lay in enumerate(layers):
        for k, opt in enumerate(options):
            if legal is not None and not legal[i, k]:
                continue
            row = {
                "layer": lay.name,
                "option": opt.name,
                "bits": opt.bits,
                "damage": max(float(damage[i, k]), 0.0),
                "size_bits": lay.size_bits(opt) if hasattr(lay, "size_bits") else opt.size_bits(
                    lay.out_channels, lay.in_features),
                "params": lay.params,
            }
            for col, values in extra.items():
                row[col] = float(values[i, k])
            if lay.macs is not None:
                row["macs"] = lay.macs
                row["bops"] = lay.macs * opt.bits * min(act_bits, opt.act_bits)
            if lay.group:
                row["group"] = lay.group
            rows.append(row)
    frame = pd.DataFrame(rows)
    if "group" in frame:
        frame["group"] = frame["group"].where(frame["group"].notna(), None)
    return CostTable(frame, metadata, complete=legal is None)


def _routing(model, layers, batches, device, ctx: Context):
    """Tokens routed to each expert on the calibration batches (``None`` without experts or data)."""
    if not batches or not any(lay.role == "expert" for lay in layers):
        return None

    routing = routing_counts(model, batches, scan(model), device)
    ctx.count("routing_passes", routing.passes)
    return routing


def _moe_columns(estimator, model, ctx: Context, damage, routing, min_tokens: int):
    """The routed-token counts and the fallback for experts with few tokens (:mod:`mpsearch.moe`)."""
    report = {}
    added = np.zeros_like(damage)
    if estimator.routed_damage:
        damage, added, report = apply_fallback(lambda lay: weight_of(model, lay), ctx.layers, ctx.options,
                                               damage, routing, min_tokens=min_tokens, legal=ctx.legal)
    L, K = damage.shape
    ctx.extra_columns["routed_tokens"] = np.repeat(routed_tokens_column(ctx.layers, routing)[:, None], K, 1)
    ctx.extra_columns["damage_fallback"] = added
    ctx.extra_metadata["moe"] = {
        "routed_tokens": routing.to_dict(), "min_expert_tokens": min_tokens,
        "fallback": {k: [int(e) for e in v] for k, v in report.items()},
        "fallback_rule": ("experts with fewer than min_expert_tokens calibration tokens are given their "
                          "uniform-routing share: + max(1/E - share, 0) * their squared rounding error * "
                          "(the tensor's damage per unit of routed squared error)") if estimator.routed_damage
        else "none needed: this estimator weighs every expert alike, whatever its tokens",
    }
    return damage


def _rounding(model, ctx: Context, quantizer: str, imatrix_weights=None):
    """The rounding the damage is measured with (GPTQ: the layers' input Hessians, collected once;
    llama.cpp's types with an imatrix: :func:`mpsearch.imatrix.imatrix_rounding`)."""
    import contextlib

    if imatrix_weights is not None:
        return imatrix_rounding(imatrix_weights)
    if quantizer != "gptq":
        return contextlib.nullcontext()

    hessians = input_hessians(model, ctx.layers, ctx.batches, ctx.device)
    ctx.count("forward_passes", len(ctx.batches))
    return gptq_rounding(hessians)


def _target_layers(model, layers, options, target):
    """The layers ``target`` (a :class:`~mpsearch.targets.Target`) plans, and the ``[L, K]`` mask of
    options each may take (tied layers share the options all of them may take). Refuses a layer left
    with no option."""
    layers = [lay for lay in layers if target.plans_layer(lay, model)]
    if not layers:
        raise MpsearchError(f"target {target.name!r} plans none of the model's quantizable layers")
    legal = np.array([[target.option_reason(lay, o) is None for o in options] for lay in layers],
                     dtype=bool).reshape(len(layers), len(options))
    groups: dict[str, list[int]] = {}
    for i, lay in enumerate(layers):
        if lay.group:
            groups.setdefault(lay.group, []).append(i)
    for members in groups.values():
        legal[members] = legal[members].all(axis=0)
    for i, lay in enumerate(layers):
        if not legal[i].any():
            reasons = "; ".join(
                f"{o.name}: {target.option_reason(lay, o) or 'not shared by its tied layers'}"
                for o in options
            )
            raise MpsearchError(
                f"layer {lay.name!r} ({lay.out_channels}x{lay.in_features}) can take none of the "
                f"options under target {target.name!r} ({reasons}); add a legal option or --exclude it"
            )
    return layers, (None if legal.all() else legal), target


def check_device(model, device) -> None:
    """An estimator's ``device`` setting names where the model is: a model elsewhere is refused (one
    line) instead of being run on one device with its inputs on another."""
    if device is None:
        return
    try:
        want = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise MpsearchError(f"device {device!r} is not a torch device ({exc})") from None
    have = {p.device for p in model.parameters()}
    if have and any(d.type != want.type or (want.index is not None and d.index != want.index) for d in have):
        where = ", ".join(sorted(str(d) for d in have))
        raise MpsearchError(f"device={device!r}, but the model's parameters are on {where}: move the model there "
                            f"first (model.to({str(want)!r})) or leave device out (the model's own device is used)")


def on_gpu(model, device=None) -> bool:
    """Whether the estimate runs on an accelerator (``device``, else the model's parameters')."""
    if device is not None:
        return torch.device(device).type != "cpu"
    p = next(model.parameters(), None)
    return p is not None and p.device.type != "cpu"


def _with_imatrix(imx, quantizer: str, layers, options, legal, target_obj):
    """The layers' imatrix weights (``None`` without an imatrix) and the legal options with it: types
    llama-quantize writes only from an imatrix entry are refused without one."""
    if imx is not None and quantizer != "rtn":
        raise MpsearchError(f"quantizer {quantizer!r} and an imatrix do not combine: llama.cpp rounds its "
                            f"types with the imatrix (leave --quantizer out)")
    imatrix_weights = layer_weights(imx, layers) if imx is not None else None
    if imx is None and any(o.fmt is not None and getattr(o.format, "needs_imatrix", None) for o in options):
        target_obj.parsed_options([o.name for o in options])  # i-quants without the imatrix: refused
    else:
        legal = _imatrix_legal(layers, options, legal, imatrix_weights)
    return imatrix_weights, legal


def _imatrix_legal(layers, options, legal, weights: dict):
    """``legal`` without the options llama-quantize writes only from an imatrix entry (iq1/iq2
    types) for the layers the imatrix has no entry for (the output layer, the token embedding):
    llama-quantize stops at such a tensor ("missing importance matrix")."""
    need = np.array([o.fmt is not None and bool(getattr(o.format, "needs_imatrix", None)) for o in options])
    if not need.any():
        return legal
    mask = np.ones((len(layers), len(options)), dtype=bool) if legal is None else legal.copy()
    for i, lay in enumerate(layers):
        parts = weights.get(lay.name)
        if parts is None or any(w is None for w in parts):
            mask[i] &= ~need
            if not mask[i].any():
                raise MpsearchError(f"layer {lay.name!r} has no entry in the imatrix, and every option given "
                                    f"needs one: add an option such as q4_K, or --exclude it")
    return None if mask.all() else mask


def weight_of(model: torch.nn.Module, layer: Layer) -> torch.Tensor:
    """The weight of a discovered layer: a module's weight, a stacked expert parameter, or one
    expert's 2-D view of it."""
    return weight_tensor(model, layer.name)


def leaf_weights(model: torch.nn.Module, layers) -> tuple[list[torch.Tensor], list[str], list[tuple[int, int | None]]]:
    """The distinct parameters behind ``layers`` (a per-expert layer is a view of its stacked
    tensor, which gradients are taken of), their names, and per layer ``(parameter index, expert
    index or None)``."""
    params, names, where, index = [], [], [], {}
    for lay in layers:
        base, e = split_name(lay.name)
        p = weight_of(model, lay) if e is None else weight_tensor_of(model, base)
        if id(p) not in index:
            index[id(p)] = len(params)
            params.append(p)
            names.append(base if lay.kind in _EXPERT_KIND_NAMES or e is not None else f"{lay.name}.weight")
        where.append((index[id(p)], e))
    return params, names, where


_EXPERT_KIND_NAMES = ("expert", "expert_t")


def weight_tensor_of(model, name):
    return weight_tensor(model, name)


def expert_errors(model: torch.nn.Module, ctx: Context, i: int) -> np.ndarray:
    """``[experts, K]`` squared rounding errors of each expert matrix of stacked layer ``i``."""
    legal = np.ones(len(ctx.options), bool) if ctx.legal is None else ctx.legal[i]
    return per_expert_errors(weight_of(model, ctx.layers[i]), ctx.layers[i], ctx.options, legal)


def rounding_damage(model: torch.nn.Module, ctx: Context, reduce, *, desc: str = "rounding") -> np.ndarray:
    """``[L, K]``: ``reduce(i, dW)`` for every option each layer may take, ``dW = Q(W_l) - W_l`` the
    rounding error of that option (the layer's weight shape, float32). A progress bar counts the
    weights rounded: a consumer's option set on an LLM (llama.cpp's K-quants and iq4_nl search their
    scales) takes minutes on a CPU, so this phase is never silent."""
    out = np.zeros((len(ctx.layers), len(ctx.options)))
    total = sum(lay.params for i, lay in enumerate(ctx.layers) for _ in ctx.layer_options(i))
    bar = progress_bar(None, enabled=ctx.progress, desc=desc, total=total)
    bar.unit, bar.unit_scale = " weights", True
    try:
        for i, lay in enumerate(ctx.layers):
            w = weight_of(model, lay)
            for k, opt in ctx.layer_options(i):
                out[i, k] = float(reduce(i, quantization_error(w, opt, lay.kind, lay.name)))
                bar.update(lay.params)
    finally:
        bar.close()
    return out


def weight_errors(model: torch.nn.Module, ctx: Context, *, relative: bool = False) -> np.ndarray:
    """``[L, K]`` squared rounding errors ``||Q_b(W_l) - W_l||^2`` (``/ ||W_l||^2`` if relative)."""
    norms = [float(weight_of(model, lay).detach().float().pow(2).sum()) if relative else 1.0 for lay in ctx.layers]
    return rounding_damage(model, ctx, lambda i, dw: float(dw.pow(2).sum()) / norms[i] if norms[i] > 0 else 0.0,
                           desc="rounding errors")


def check_choice(name: str, value, choices) -> None:
    """Refuse a setting that is not one of ``choices``, listing them."""
    if value not in choices:
        raise MpsearchError(
            f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"
        )


def check_positive(name: str, value, *, integer: bool = False, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = ">= 0" if allow_zero else "> 0"
        raise MpsearchError(f"{name} must be {kind} {bound}, got {value!r}")


def describe_data(batches) -> dict:
    if not batches:
        return {"batches": 0}
    args, kwargs, labels = split_batch(batches[0])
    shapes = [list(a.shape) for a in args if isinstance(a, torch.Tensor)]
    shapes += [f"{k}:{list(v.shape)}" for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return {"batches": len(batches), "first_batch": shapes, "targets": labels is not None}


def progress_bar(iterable, *, enabled: bool = True, desc: str = "", total=None):
    """A tqdm progress bar on stderr (disabled when not wanted)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False)


class EstimatorWarning(UserWarning):
    """Something an estimator had to decide for the user (negative traces, a fallback path)."""


def probe_seed(seed: int, *indices: int) -> int:
    """A reproducible seed for one unit of random work (a probe, a chunk), independent of order."""
    h = hashlib.sha1(repr((int(seed),) + tuple(int(i) for i in indices)).encode()).hexdigest()
    return int(h[:15], 16)


class only_weights_require_grad:
    """Context manager: ``requires_grad`` on the given weights only, restored on exit.

    Gradients of biases and norms are never needed, and not building them saves time and memory.
    """

    def __init__(self, model: torch.nn.Module, weights):
        self.model, self.weights = model, list(weights)

    def __enter__(self):
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        for w in self.weights:
            w.requires_grad_(True)
        return self

    def __exit__(self, *exc):
        for p, flag in self.saved:
            p.requires_grad_(flag)
        return False


def math_attention():
    """Run scaled-dot-product attention on the math path, which has a double backward."""
    import contextlib

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)
