"""``output-distance`` (measured) and ``lim`` (layer-importance score).

``output-distance``: for every layer x option, quantize only that layer and measure how far the
model's output moves from full precision, averaged over the calibration batches (weighted by batch
size): ``metric="cosine"`` (1 - cos of output rows, for embeddings), ``"mse"``, ``"kl"``
(KL(p_fp || p_q) of logits), or ``"auto"`` (cosine for embeddings, KL for logits). For models made of
sequential blocks only the suffix after the changed block runs, from cached block outputs
(:mod:`mpsearch.sensitivity.blocks`); ``prefix_cache=False`` runs whole forwards instead, and
``max_cache_mb`` bounds the cache (default 1024 MB on CPU, 8192 MB on a GPU). A layer's quantized weights
are made once and kept for the next calibration batches while they fit in ``max_variant_mb`` (default
512 MB on CPU, 4096 MB on a GPU; 0 quantizes again for every batch); the cost record counts
``quantizations`` and ``quantizations_reused``. ``damage_std`` is the
standard error of that mean across the batches (0 with one batch).

Throughput: all options of a layer are measured in one suffix pass (``stack_options=None``; or
``stack_options=k`` per pass; ``1`` is one pass per option): the batch is repeated once per option
along the batch axis and the layer, for that pass only, multiplies copy ``i`` of its input by option
``i``'s quantized weight (Linear, Conv1d/2d, transformers' Conv1D, Embedding; other kinds take one
pass per option). The first stacked layer is checked once against separate passes (a model that
mixes samples across the batch axis is detected, warned about, and measured one option per pass).
Distances accumulate on the device (float64 on CPU, float32 on GPU, where KL is computed from logit
differences, :func:`kl_from_logits`, to stay accurate for nearby distributions; the forward passes
run in the model's own dtype: bf16 compute for a bf16 model) and reach the host once, at the end.
``micro_batch=k`` measures each calibration batch in pieces of at most ``k`` samples (the same
weighted mean, a fraction of the memory). :meth:`OutputDistanceEstimator.layer_distances` is the per-layer unit of work.

``base``: the operating point. By default every other layer stays at full precision, so the table is
the additive model expanded around the fp model. With ``base`` (an option name, given to every planned
layer that may take it, or a mapping layer -> option name, or a :class:`~mpsearch.plan.BitPlan`) the
other layers are quantized as the base says and damage(l, o) = d(l at o) - d(l at full precision),
both distances to the full-precision output with the rest at the base: the marginal damage of each
choice around a quantized model (what a plan near the base is made of), which includes how layer l's
noise adds to the others'. Each layer takes one more (stacked) option, its fp weight; weight-only base
options only.

``lim``: the layer-importance score of "Layer-wise quantization" (Dumitru et al. 2024): for block k,
LIM_k = 1 - cos(block input, block output) averaged over tokens/samples (a block that barely changes
its input matters less). When a block changes the shape of its input, the cosine between the
sample-similarity (Gram) matrices of input and output is used instead. The score is bit-independent;
damage(l, b) = LIM_block(l) x ||Q_b(W_l) - W_l||^2 / ||W_l||^2. Layers outside every block get the
largest block score (conservative).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..apply import activation_quantized
from ..data import micro_batches, model_output_tensor, move_batch, run_model
from ..distributed import assign
from ..errors import MpsearchError
from ..layers import _batch_size, get_module
from ..metrics import kl_from_logits  # noqa: F401  (defined beside the metrics that use it)
from ..moe import EXPERT_KINDS
from ..options import parse_option
from ..plan import BitPlan
from ..quant import quantize_weight
from .base import (check_choice, check_positive, Context, Estimator, EstimatorWarning, progress_bar,
                   weight_errors, weight_of)
from .blocks import find_blocks, PrefixRunner
from .losses import check_output, forward, METRICS, output_kind


def _size(batch) -> int:
    return _batch_size(batch)


def check_suffix_settings(est) -> None:
    """The settings shared by the estimators that measure suffix passes (output-distance, response)."""
    check_choice("metric", est.metric, METRICS)
    check_output(est.output)
    if est.max_cache_mb is not None:
        check_positive("max_cache_mb", est.max_cache_mb, allow_zero=True)
    if est.micro_batch is not None:
        check_positive("micro_batch", est.micro_batch, integer=True)


class OutputDistanceEstimator(Estimator):
    """Measured output distance of the model with one layer quantized, per layer x option."""

    name = "output-distance"
    needs_data = True
    routed_damage = True

    def __init__(self, *, options: str | list | tuple | None = None, seed: int = 0, device=None, metric: str = "auto",
                 output: str = "auto", prefix_cache: bool = True, max_cache_mb: float | None = None,
                 stack_options: int | None = None, micro_batch: int | None = None,
                 max_variant_mb: float | None = None, cache_dir=None, cache_every: float = 30.0, base=None):
        super().__init__(options=options, seed=seed, device=device)
        self.base = _base_spec(base)
        self._fp = None  # run state with a base: layer index -> full-precision weight
        self.metric = metric
        self.output = output
        self.prefix_cache = prefix_cache
        self.max_cache_mb = max_cache_mb
        self.stack_options = stack_options
        self.micro_batch = micro_batch
        self.max_variant_mb = max_variant_mb
        self._variants = None  # run state: (layer index, option) -> quantized weight, kept across batches
        self.cache_dir = cache_dir
        self.cache_every = cache_every

    def _check(self):
        check_suffix_settings(self)
        if self.max_variant_mb is not None:
            check_positive("max_variant_mb", self.max_variant_mb, allow_zero=True)
        if self.stack_options is not None:
            check_positive("stack_options", self.stack_options, integer=True)

    def _damage(self, model, ctx: Context) -> np.ndarray:
        self._check()
        names = [lay.name for lay in ctx.layers]
        limit = self.max_cache_mb
        if limit is None:
            limit = _DEFAULT_CACHE_MB[ctx.device.type == "cuda"]
        runner = PrefixRunner(model, find_blocks(model, names), max_cache_mb=limit,
                              enabled=bool(self.prefix_cache))
        batches = [part for b in ctx.batches for part in micro_batches(b, self.micro_batch)]
        L, K, B = len(ctx.layers), len(ctx.options), len(batches)
        acc = torch.float64 if ctx.device.type == "cpu" else torch.float32
        st = ctx.checkpoint.load() if ctx.checkpoint else None
        if not st or "values" not in st:  # none, or from an older layout: start over
            st = {"batch": 0, "layer": 0, "values": torch.zeros(B, L, K, dtype=torch.float64),
                  "done": torch.zeros(B, L, K, dtype=torch.bool)}
        st["values"] = st["values"].to(ctx.device, acc)  # stays on the device (no host sync)
        mine = _my_units(runner, ctx, names, st, batches)
        self._stack_checked, self._stack_ok = False, True  # run state: the stacked pass is checked once
        based = _BasePoint(model, ctx, self.base) if self.base is not None else None
        self._fp = based.fp if based else None
        vlimit = self.max_variant_mb
        if vlimit is None:
            vlimit = _DEFAULT_VARIANT_MB[ctx.device.type == "cuda"]
        # a layer's quantized weights are the same for every batch: kept (within the bound) when
        # more than one batch will use them, instead of quantizing again per batch
        self._variants = VariantCache(vlimit if int(mine.any(-1).any(-1).sum()) > 1 else 0)
        try:
            self._measure_batches(model, ctx, runner, names, batches, st, mine, based)
        finally:
            self._fp = None
            ctx.cost.update(quantizations=self._variants.made, quantizations_reused=self._variants.reused,
                            variant_cache_mb=round(self._variants.peak / 2**20, 3))
            self._variants = None
            if based:
                based.restore()
        return self._finish(ctx, runner, batches, st)

    def _measure_batches(self, model, ctx, runner, names, batches, st, mine, based):
        B, L, K = len(batches), len(ctx.layers), len(ctx.options)
        acc = st["values"].dtype
        total = int(mine.sum()) + int(st["done"].sum())
        bar = progress_bar(None, enabled=ctx.progress, desc="output-distance", total=total)
        bar.update(int(st["done"].sum()))
        for bi in range(st["batch"], B):
            if not mine[bi].any():
                st.update(batch=bi + 1, layer=0)
                continue
            batch = move_batch(batches[bi], ctx.device)
            if based:  # the reference is the fp model's output; the cached prefix is the base's
                with torch.no_grad():
                    based.restore()
                    ref, raw = forward(model, batch)
                    based.apply()
                    runner.reference(batch, names)
                ctx.count("forward_passes", 2)
            else:
                ref, raw = runner.reference(batch, names)
                ctx.count("forward_passes")
            kind = output_kind(raw, self.output)
            reference = _prepare(ref, self.metric, kind, acc)
            for li in range(st["layer"], L):
                todo = [k for k in range(K) if mine[bi, li, k]]
                if todo:
                    st["values"][bi, li] += self.layer_distances(model, runner, batch, ctx.layers[li], ctx,
                                                                 reference, kind, acc, li, todo)
                    st["done"][bi, li, todo] = True
                    bar.update(len(todo))
                st["layer"] = li + 1
                if ctx.checkpoint:
                    ctx.checkpoint.save(st)
            st.update(batch=bi + 1, layer=0)
            if ctx.checkpoint:
                ctx.checkpoint.save(st, force=True)
            runner.release()
        bar.close()

    def _finish(self, ctx, runner, batches, st):
        B, L, K = len(batches), len(ctx.layers), len(ctx.options)
        # each unit is one rank's and exact zeros elsewhere: the sum over ranks is exact
        values = ctx.shard.sum(st["values"].to("cpu", torch.float64))
        sums = torch.zeros(L, K, dtype=torch.float64)
        for bi in range(B):  # batches in order, as one process adds them
            sums += _size(batches[bi]) * values[bi]
        n_blocks = len(runner.blocks.names) if runner.blocks else 0
        ctx.cost.update(
            blocks=n_blocks, block_list=runner.blocks.name if runner.blocks else None,
            prefix_cache=runner.enabled, cached_blocks=runner.peak_blocks,
            cache_mb=round(runner.peak_bytes / 2**20, 6), block_evaluations=runner.block_runs,
            stacked_options=bool(self._stack_checked and self._stack_ok),
        )
        weight = float(sum(_size(b) for b in batches))
        mean = sums / max(weight, 1e-300)
        wb = torch.tensor([float(_size(b)) for b in batches], dtype=torch.float64)[:, None, None]
        var = (wb * (values - mean) ** 2).sum(0) / max(weight, 1e-300)  # across batches
        ctx.extra_columns["damage_std"] = (var / (B - 1)).sqrt().numpy() if B > 1 else np.zeros((L, K))
        return mean.clamp(min=0).numpy()

    def layer_distances(self, model, runner, batch, layer, ctx: Context, reference, kind: str,
                        acc=torch.float64, index: int | None = None, options=None) -> torch.Tensor:
        """The unit of work: the output distance of ``batch`` with ``layer`` (number ``index`` of
        ``ctx.layers``) at each option it may take (those of ``options``, indices, when given): a
        ``[K]`` tensor on the device, 0 for ``keep`` and for options not measured, from the runner's
        cached prefix. Weight-only options share stacked passes; options that also quantize the
        layer's input activations take one pass each."""
        w = weight_of(model, layer)
        expert = layer.kind in EXPERT_KINDS
        module = None if expert else get_module(model, layer.name)
        index = ctx.layers.index(layer) if index is None else index
        wanted = None if options is None else set(options)
        active = [k for k, opt in ctx.layer_options(index)
                  if not opt.is_keep and (wanted is None or k in wanted)]
        K = len(ctx.options)
        out = torch.zeros(K + 1, dtype=acc, device=ctx.device)  # [K]: the layer at fp, with a base
        if not active:
            return out[:K]
        start = runner.start_of(layer.name)
        src = w if self._fp is None else self._fp.get(index, w)  # with a base, w holds the base's weight
        if expert:  # a stacked expert tensor is large: one quantized copy at a time, one option per pass
            src = src.detach().clone() if src is w else src  # w is overwritten while the options run
            variants = _Variants(lambda k: quantize_weight(src, ctx.options[k], layer.kind, layer.name))
        else:
            cache = self._variants if self._variants is not None else VariantCache(0)
            variants = {k: cache.get((index, k), lambda k=k: quantize_weight(src, ctx.options[k], layer.kind,
                                                                              layer.name)) for k in active}
        measured = list(active)
        acts = [k for k in active if _quantizes_activations(ctx.options[k])]
        if acts:
            out[acts] = self._single(w, runner, batch, start, acts, variants, reference, kind, acc, ctx, module)
            active = [k for k in active if k not in acts]
        if self._fp is not None:  # the layer at full precision, the rest at the base
            variants[K] = src
            active.append(K)
        if not active:
            return out[:K]
        stack = len(active) if self.stack_options is None else int(self.stack_options)
        if stack > 1 and layer.kind in _STACKABLE and self._stack_ok:
            stacked = self._stacked(module, layer, runner, batch, start, active, variants, stack,
                                    reference, kind, acc, ctx)
            if not self._stack_checked:  # once: the stacked pass must equal separate passes
                self._stack_checked = True
                runs, passes = runner.block_runs, ctx.cost.get("suffix_passes", 0)
                single = self._single(w, runner, batch, start, active, variants, reference, kind, acc, ctx)
                # the check is counted apart from the work (which it repeats)
                ctx.count("check_passes", ctx.cost["suffix_passes"] - passes)
                ctx.count("check_block_evaluations", runner.block_runs - runs)
                ctx.cost["suffix_passes"], runner.block_runs = passes, runs
                close = torch.allclose(stacked, single, rtol=2e-2, atol=1e-3 * float(single.abs().max()))
                self._stack_ok = bool(close) or _warn_stack(layer.name, stacked, single)
                stacked = stacked if self._stack_ok else single
            out[active] = stacked
        else:
            out[active] = self._single(w, runner, batch, start, active, variants, reference, kind, acc, ctx)
        if self._fp is None:
            return out[:K]
        res = torch.zeros(K, dtype=acc, device=ctx.device)
        res[measured] = out[measured] - out[K]
        return res

    def _single(self, w, runner, batch, start, active, variants, reference, kind, acc, ctx, module=None):
        """One suffix pass per option, the layer's weight overwritten (and restored); with
        ``module``, its input activations are quantized as each option says."""
        saved = w.detach().clone()
        vals = []
        try:
            for k in active:
                with torch.no_grad():
                    w.copy_(variants.pop(k) if isinstance(variants, _Variants) else variants[k])
                if module is not None:
                    with activation_quantized(module, ctx.options[k]):
                        out = runner.run(batch, start)[0]
                else:
                    out = runner.run(batch, start)[0]
                ctx.count("suffix_passes")
                vals.append(_distance(out, reference, self.metric, kind, acc))
        finally:
            with torch.no_grad():
                w.copy_(saved)
        return torch.stack(vals)

    def _stacked(self, module, layer, runner, batch, start, active, variants, stack, reference, kind, acc, ctx):
        """Options in groups of ``stack`` per suffix pass, stacked along the batch axis."""
        vals = []
        for g in range(0, len(active), stack):
            group = active[g : g + stack]
            n = len(group)
            with stacked_weights(module, layer.kind, [variants[k] for k in group]):
                out = runner.run(runner.repeated_batch(batch, n), start, repeat=n)[0]
            ctx.count("suffix_passes")
            vals.extend(_distance(o, reference, self.metric, kind, acc) for o in out.chunk(n))
        return torch.stack(vals)


_DEFAULT_CACHE_MB = {False: 1024.0, True: 8192.0}  # by "on a GPU"
_DEFAULT_VARIANT_MB = {False: 512.0, True: 4096.0}  # by "on a GPU"


class VariantCache:
    """Quantized weights kept across calibration batches while they fit in ``limit_mb``; the rest
    are made again when asked for (``made`` / ``reused`` count both)."""

    def __init__(self, limit_mb: float):
        self.limit = float(limit_mb) * 2**20
        self.store: dict = {}
        self.bytes = self.peak = 0
        self.made = self.reused = 0

    def get(self, key, make):
        if key in self.store:
            self.reused += 1
            return self.store[key]
        value = make()
        self.made += 1
        size = value.numel() * value.element_size()
        if self.bytes + size <= self.limit:
            self.store[key] = value
            self.bytes += size
            self.peak = max(self.peak, self.bytes)
        return value


class _Variants(dict):
    """Quantized weights made when asked for (and dropped by ``pop``): a stacked expert tensor's
    options are measured one at a time, so one quantized copy is alive at a time."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def __missing__(self, k):
        return self._make(k)

    def pop(self, k, *default):
        return super().pop(k) if k in self else self._make(k)


def _base_spec(base):
    """``base`` as given (``None``, an option name) or a plan's layer -> option-name mapping."""
    if base is None or isinstance(base, str):
        return base or None

    if isinstance(base, BitPlan):
        return {n: base.option_name(n) for n in base.layers}
    if isinstance(base, dict):
        return {str(k): str(v) for k, v in base.items()}
    raise MpsearchError(f"output-distance base must be an option name, a layer -> option mapping or a BitPlan, "
                        f"got {type(base).__name__}")


class _BasePoint:
    """The base's weights of the planned layers, swapped in and out of the model in place."""

    def __init__(self, model, ctx: Context, base):
        def parse(spec):
            try:
                return parse_option(spec)
            except ValueError as e:  # MpsearchError too: say that it is the base's option
                raise MpsearchError(f"output-distance base: {e}") from None

        if isinstance(base, str):
            opt = parse(base)  # every layer that may take it (a target's rules); the rest stay fp
            picks = {i: opt for i in range(len(ctx.layers))
                     if opt.name in {o.name for _, o in ctx.layer_options(i)}}
        else:
            names = [lay.name for lay in ctx.layers]
            unknown = sorted(set(base) - set(names))
            if unknown:
                raise MpsearchError(f"output-distance base names layer(s) the table does not plan: "
                                    f"{', '.join(unknown[:3])}; give an option for planned layers only")
            picks = {names.index(n): parse(v) for n, v in base.items()}
        acts = sorted({o.name for o in picks.values() if _quantizes_activations(o)})
        if acts:
            raise MpsearchError(f"output-distance base takes weight-only options; {', '.join(acts)} also "
                                f"quantize activations")
        self.weights, self.fp, self.based = {}, {}, {}
        for i, opt in picks.items():
            if opt.is_keep:
                continue
            lay = ctx.layers[i]
            w = weight_of(model, lay)
            self.weights[i] = w
            self.fp[i] = w.detach().clone()
            self.based[i] = quantize_weight(self.fp[i], opt, lay.kind, lay.name)
        ctx.extra_metadata["base"] = {"layers": len(self.based),
                                      "options": sorted({picks[i].name for i in self.based})}

    def apply(self):
        with torch.no_grad():
            for i, w in self.weights.items():
                w.copy_(self.based[i])

    def restore(self):
        with torch.no_grad():
            for i, w in self.weights.items():
                w.copy_(self.fp[i])


def _quantizes_activations(opt) -> bool:
    return getattr(opt, "act_bits", 16) < 16 and getattr(opt, "fmt", None) is not None
_STACKABLE = {"linear", "conv1d", "conv2d", "conv1d_hf", "embedding"}


def _warn_stack(name, stacked, single) -> bool:
    import warnings

    warnings.warn(
        f"output-distance: measuring the options of {name!r} stacked along the batch axis gave "
        f"{stacked.tolist()} instead of {single.tolist()} (the model mixes samples across the batch?); "
        f"measuring one option per pass", EstimatorWarning, stacklevel=4)
    return False


class stacked_weights:
    """Context manager: copy ``i`` of the layer's input (along the batch axis, in ``len(weights)``
    equal chunks) is multiplied by ``weights[i]``; the module's own weight is untouched."""

    def __init__(self, module, kind: str, weights):
        self.module, self.kind, self.weights = module, kind, list(weights)

    def _one(self, x, w):
        m = self.module
        if self.kind == "linear":
            return F.linear(x, w, m.bias)
        if self.kind in ("conv1d", "conv2d"):
            return m._conv_forward(x, w, m.bias)
        if self.kind == "embedding":
            return F.embedding(x, w, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
        size = x.size()[:-1] + (m.nf,)  # transformers' Conv1D: weight [in, out]
        return torch.addmm(m.bias, x.reshape(-1, x.size(-1)), w).view(size)

    def __enter__(self):
        n = len(self.weights)

        def forward(x, *args, **kwargs):
            return torch.cat([self._one(xc, w) for xc, w in zip(x.chunk(n), self.weights)])

        self._saved = self.module.__dict__.get("forward")  # an instance-level forward (hooks) stays
        self.module.forward = forward
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            self.module.forward = self._saved
        else:
            del self.module.forward
        return False


def _prepare(ref: torch.Tensor, metric: str, kind: str, acc) -> dict:
    """What the distance compares with, computed once per batch from the reference output."""
    metric = ("cosine" if kind == "embedding" else "kl") if metric == "auto" else metric
    b = ref.reshape(-1, ref.shape[-1]).to(acc)
    if metric == "cosine":
        return {"metric": metric, "ref": b}
    if metric == "mse":
        return {"metric": metric, "ref": b}
    if acc == torch.float64:
        return {"metric": metric, "ref": F.log_softmax(b, -1)}
    return {"metric": "kl-logits", "ref": b, "p": torch.softmax(b, -1)}


def _distance(out: torch.Tensor, reference: dict, metric: str, kind: str, acc) -> torch.Tensor:
    """The distance of one output to the prepared reference, as a 0-d tensor on the device
    (the same numbers as :func:`mpsearch.sensitivity.losses.distance`)."""
    a = out.reshape(-1, out.shape[-1]).to(acc)
    b = reference["ref"]
    if reference["metric"] == "cosine":
        return (1 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)).mean()
    if reference["metric"] == "mse":
        return (a - b).pow(2).mean()
    if reference["metric"] == "kl-logits":
        return kl_from_logits(b, a, reference["p"]).mean()
    return F.kl_div(F.log_softmax(a, -1), b, log_target=True, reduction="batchmean")


def _my_units(runner, ctx: Context, names, st, batches) -> torch.Tensor:
    """``[B, L, K]`` mask of the (batch, layer, option) measurements this rank computes (and has not
    yet). Ranks own whole (batch, layer) units, whose options run in shared stacked passes; a unit
    costs its options times one suffix run: the blocks after the nearest cached block before the
    layer, plus the rest of the model (counted as one block). Keep options cost nothing.
    """
    B, L, K = len(batches), len(ctx.layers), len(ctx.options)
    work = torch.tensor([not o.is_keep for o in ctx.options]).expand(B, L, K).clone()
    if getattr(ctx, "legal", None) is not None:  # a target's per-layer options
        work &= torch.as_tensor(np.asarray(ctx.legal, dtype=bool))[None]
    if ctx.shard.enabled:  # a unit is one (batch, layer): its options share stacked suffix passes
        runner.reference(move_batch(batches[0], ctx.device), names)  # the cache layout, for costs
        n = len(runner.blocks.names) if runner.blocks is not None else 0
        per_layer = []
        for lay in ctx.layers:
            start = runner.start_of(lay.name)
            j = max((k for k in runner.cached if k < start), default=-1) if runner.enabled else -1
            per_layer.append(n - j)
        cost = torch.tensor(per_layer, dtype=torch.float64)[None, :] * work.sum(-1)  # [B, L]
        owners = ctx.shard.broadcast(assign(cost.numpy(), ctx.shard.world))
        owners = torch.from_numpy(owners.copy()).reshape(B, L, 1)
        work &= owners == ctx.shard.rank
    return work & ~st["done"]


def _block_input(args, kwargs):
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("hidden_states", "x", "input"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return None


def block_change(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - cos(input, output), per token/sample row; Gram-matrix cosine when shapes differ."""
    x, y = x.detach().double(), y.detach().double()
    if x.shape == y.shape:
        a, b = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        return float((1 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)).mean())
    a, b = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    ga, gb = (a @ a.T).flatten(), (b @ b.T).flatten()
    return float(1 - F.cosine_similarity(ga, gb, dim=0, eps=1e-12))


class LIMEstimator(Estimator):
    """Layer-importance score (1 - cos between a block's input and output) x relative noise."""

    name = "lim"
    needs_data = True

    def __init__(self, *, options: str | list | tuple | None = None, seed: int = 0, device=None, cache_dir=None,
                 cache_every: float = 30.0):
        super().__init__(options=options, seed=seed, device=device)
        self.cache_dir = cache_dir
        self.cache_every = cache_every

    def _damage(self, model, ctx: Context) -> np.ndarray:
        names = [lay.name for lay in ctx.layers]
        blocks = find_blocks(model, names)
        if blocks is None:
            raise MpsearchError(
                "lim needs a model made of sequential blocks (an nn.Sequential, or a ModuleList such "
                "as encoder.layer, model.layers or transformer.h) holding the quantizable layers; "
                "none found: use output-distance instead"
            )
        n = len(blocks.modules)
        st = (ctx.checkpoint.load() if ctx.checkpoint else None) or {
            "batch": 0, "sums": torch.zeros(n, dtype=torch.float64), "weight": 0.0}
        for bi in progress_bar(range(st["batch"], len(ctx.batches)), enabled=ctx.progress, desc="lim"):
            scores = {}

            def hook(k):
                def fn(mod, args, kwargs, output):
                    x = _block_input(args, kwargs)
                    y = model_output_tensor(output) if not isinstance(output, torch.Tensor) else output
                    if x is not None and k not in scores:
                        scores[k] = block_change(x, y)
                return fn

            handles = [m.register_forward_hook(hook(k), with_kwargs=True) for k, m in enumerate(blocks.modules)]
            try:
                with torch.no_grad():
                    model_output_tensor(_run(model, move_batch(ctx.batches[bi], ctx.device)))
            finally:
                for h in handles:
                    h.remove()
            ctx.count("forward_passes")
            size = _size(ctx.batches[bi])
            for k, v in scores.items():
                st["sums"][k] += size * v
            st.update(batch=bi + 1, weight=st["weight"] + size)
            if ctx.checkpoint:
                ctx.checkpoint.save(st, force=True)
        lim = (st["sums"] / max(st["weight"], 1e-300)).clamp(min=0).numpy()
        ctx.extra_metadata["lim"] = {"block_list": blocks.name, "scores": dict(zip(blocks.names, lim.tolist()))}
        per_layer = np.array([lim[k] if (k := blocks.index_of(lay.name)) is not None else lim.max()
                              for lay in ctx.layers])
        return per_layer[:, None] * weight_errors(model, ctx, relative=True)


def _run(model, batch):
    return run_model(model, batch)
