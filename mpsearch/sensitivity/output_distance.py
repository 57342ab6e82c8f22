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
standard error of that mean across the batches (0 with one batch; :mod:`._od_stats`).
``stop_when_stable=X`` stops after the batch where the plans at the target sizes (``stable_sizes``)
agree on X of the weights across bootstrap resamples of the batches so far (:mod:`._od_stats`;
``stability`` in the metadata).

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

Memory: before the suffix passes one line says the work left and its estimated peak memory and time
(:mod:`mpsearch.sensitivity.workplan`; ``work_plan`` in the metadata); an estimate over the device's
free memory (or ``device_memory_mb``) is refused in one line. ``offload=True`` keeps the model's
decoder blocks in CPU memory and streams them to ``device`` for every forward pass, ``offload_window``
blocks at a time (:mod:`mpsearch.sensitivity.offload`); the table is the same, the bytes streamed are
in the cost (``offload_bytes``).

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

import contextlib
import sys
import time

import numpy as np
import torch

from ..apply import activation_quantized
from ..data import micro_batches, move_batch
from ..distributed import assign
from ..errors import MpsearchError
from ..layers import _batch_size, get_module
from ..metrics import kl_from_logits  # noqa: F401  (defined beside the metrics that use it)
from ..moe import EXPERT_KINDS
from ..quant import quantize_weight
from ..settings import Interval
from .base import check_choice, check_positive, Context, Estimator, EstimatorWarning, progress_bar, weight_of
from .blocks import find_blocks, PrefixRunner
from .losses import check_output, forward, METRICS, output_kind
from .offload import move_to, tensor_bytes
from .workplan import largest_activation
from ._od_stats import batch_statistics, Sizes, StableStop
from ._od_parts import (  # noqa: F401  (re-exported: response and the tests import them from here)
    _base_spec, _BasePoint, _BatchPass, _quantizes_activations, _Variants, _distance, _prepare, stacked_weights,
    VariantCache,
)
from .lim import block_change, LIMEstimator  # noqa: F401  (re-exported: lim's old home)


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
    _setting_notes = {**Estimator._setting_notes,
                      "offload": "stream the decoder blocks from CPU memory to device (CLI: --offload)",
                      "device_memory_mb": "None: the GPU's free memory (no check on the CPU); the estimate is "
                                          "refused up front when its estimated peak exceeds it",
                      "stop_when_stable": "None: every batch; X: stop once the plans at the target sizes agree "
                                          "on X of the weights across bootstrap resamples (_od_stats)",
                      "stable_sizes": "None: the sizes of the uniform plans between the cheapest and the dearest"}
    #: checked by get_estimator, before any model loads (mpsearch.settings)
    _parameter_constraints = {"stop_when_stable": [Interval(float, 0, 1, closed="right"), None],
                              "stable_from": [Interval(int, 2, None)], "stable_sizes": [Sizes(), None]}

    def __init__(self, *, options: str | list | tuple | None = None, seed: int = 0, device=None, metric: str = "auto",
                 output: str = "auto", prefix_cache: bool = True, max_cache_mb: float | None = None,
                 stack_options: int | None = None, micro_batch: int | None = None,
                 max_variant_mb: float | None = None, cache_dir=None, cache_every: float = 30.0, base=None,
                 offload: bool = False, offload_window: int = 2, device_memory_mb: float | None = None,
                 stop_when_stable: float | None = None, stable_from: int = 8,
                 stable_sizes: tuple[float, ...] | None = None):
        super().__init__(options=options, seed=seed, device=device)
        self.stop_when_stable = stop_when_stable
        self.stable_from = stable_from
        self.stable_sizes = stable_sizes
        self.base = _base_spec(base)
        self.offload = offload
        self.offload_window = offload_window
        self.device_memory_mb = device_memory_mb
        self._streamer = None  # run state with offload: the BlockStreamer
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
        check_positive("offload_window", self.offload_window, integer=True)
        if self.device_memory_mb is not None:
            check_positive("device_memory_mb", self.device_memory_mb)

    def estimate(self, model, data=None, **kwargs):
        """:meth:`Estimator.estimate`; with ``offload`` the decoder blocks stay where they are stored (the
        CPU) and stream to the compute device (``device``, default CUDA when available) one window at a
        time (:mod:`mpsearch.sensitivity.offload`), for every forward pass of the estimate."""
        if not self.offload:
            return super().estimate(model, data, **kwargs)
        self._check()
        from .offload import BlockStreamer

        compute, blocks, window = self._offload_layout(model)
        with BlockStreamer(model, blocks, compute, window=window) as streamer:
            self._streamer = streamer
            try:
                return super().estimate(model, data, **kwargs)
            finally:
                self._streamer = None

    def _offload_layout(self, model):
        """The compute device, the blocks to stream and the window, checked against the memory budget."""
        from .offload import module_bytes
        from .workplan import device_budget, size_text

        compute = torch.device(self.device) if self.device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        names = [n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]
        blocks = find_blocks(model, names)
        if blocks is None:
            raise MpsearchError("offload streams a model's decoder blocks (a ModuleList such as model.layers); "
                                "this model has none: run it without offload")
        sizes = [module_bytes(b) for b in blocks.modules]
        rest = module_bytes(model) - sum(sizes)
        budget = device_budget(compute, self.device_memory_mb)
        window = int(self.offload_window)
        if budget is not None:
            if rest + max(sizes) > budget:
                raise MpsearchError(
                    f"offload: {size_text(budget)} on {compute} cannot hold even one decoder block "
                    f"({size_text(max(sizes))}) beside the rest of the model ({size_text(rest)}: embeddings, "
                    f"head); give at least {(rest + max(sizes)) / 2**20:.1f} MB (device_memory_mb) and room for the activations, "
                    f"or a larger device")
            while window > 1 and rest + window * max(sizes) > budget:
                window -= 1
        return compute, blocks, window

    def _damage(self, model, ctx: Context) -> np.ndarray:
        self._check()
        names = [lay.name for lay in ctx.layers]
        limit = self.max_cache_mb
        if limit is None:
            limit = _DEFAULT_CACHE_MB[ctx.device.type == "cuda"]
        streamer = self._streamer
        runner = PrefixRunner(model, streamer.blocks if streamer else find_blocks(model, names), max_cache_mb=limit,
                              enabled=bool(self.prefix_cache), device=ctx.device, streamer=streamer)
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
        self._stop = stop = self._stop_rule(ctx)  # run state: the stopping rule, or None
        try:
            self._measure_batches(model, ctx, runner, names, batches, st, mine, based)
        finally:
            self._fp, self._stop = None, None
            ctx.cost.update(quantizations=self._variants.made, quantizations_reused=self._variants.reused,
                            variant_cache_mb=round(self._variants.peak / 2**20, 3))
            self._variants = None
            if based:
                based.restore()
        used = st.get("stopped", len(batches))
        if stop is not None:
            ctx.extra_metadata["stability"] = record = stop.record(used, batches)
            if ctx.progress:
                from tqdm.auto import tqdm

                tqdm.write(stop.line(record), file=sys.stderr)
        return self._finish(ctx, runner, batches[:used], st)

    def _stop_rule(self, ctx):
        """The stopping rule (:class:`~._od_stats.StableStop`) with ``stop_when_stable``, else ``None``."""
        if self.stop_when_stable is None:
            return None
        if ctx.shard.enabled:
            raise MpsearchError("stop_when_stable decides after each batch from all of its layers: run it in one "
                                "process, or give a fixed number of batches without it")
        from .base import build_table

        table = build_table(ctx.layers, ctx.options, np.zeros((len(ctx.layers), len(ctx.options))), legal=ctx.legal)
        return StableStop(table, [o.name for o in ctx.options], agreement=self.stop_when_stable,
                          min_batches=self.stable_from, sizes=self.stable_sizes, seed=self.seed)

    def _measure_batches(self, model, ctx, runner, names, batches, st, mine, based):
        B, L, K, stop = len(batches), len(ctx.layers), len(ctx.options), getattr(self, "_stop", None)
        acc = st["values"].dtype
        total = int(mine.sum()) + int(st["done"].sum())
        bar = progress_bar(None, enabled=ctx.progress, desc="output-distance", total=total)
        bar.update(int(st["done"].sum()))
        planned = None
        for bi in range(st["batch"], B if "stopped" not in st else 0):
            if not mine[bi].any():
                st.update(batch=bi + 1, layer=0)
                continue
            batch = move_batch(batches[bi], ctx.device)
            if based:  # the reference is the fp model's output; the cached prefix is the base's
                probe = {}
                with torch.no_grad():
                    based.restore()
                    ref, raw = forward(model, batch)
                    based.apply()
                    runner.reference(batch, names)
                ctx.count("forward_passes", 2)
            else:
                probe = {}
                with largest_activation(model, probe) if planned is None else contextlib.nullcontext():
                    ref, raw = runner.reference(batch, names)
                ctx.count("forward_passes")
            kind = output_kind(raw, self.output)
            reference = _prepare(ref, self.metric, kind, acc)
            bp = _BatchPass(runner, batch, ctx, reference, kind, acc)
            if planned is None:  # before the suffix passes: the work, its memory and time, in one line
                planned = self._plan(model, bp, batches, mine, ref, probe)
            for li in range(st["layer"], L):
                todo = [k for k in range(K) if mine[bi, li, k]]
                if todo:
                    st["values"][bi, li] += self.layer_distances(model, bp, ctx.layers[li], li, todo)
                    st["done"][bi, li, todo] = True
                    bar.update(len(todo))
                st["layer"] = li + 1
                if ctx.checkpoint:
                    ctx.checkpoint.save(st)
            st.update(batch=bi + 1, layer=0)
            if stop is not None and stop.after_batch(st["values"][: bi + 1].to("cpu", torch.float64),
                                                     [_size(b) for b in batches[: bi + 1]]):
                st["stopped"] = bi + 1
            if ctx.checkpoint:
                ctx.checkpoint.save(st, force=True)
            runner.release()
            if "stopped" in st:
                break
        bar.close()

    def _plan(self, model, bp: _BatchPass, batches, mine, ref, probe):
        """The :class:`~mpsearch.sensitivity.workplan.WorkPlan` of the remaining work (``bp``: the first
        batch's passes, ``ref`` its raw reference output, ``probe`` the largest activation seen), printed
        (with progress) and recorded; refused when its estimated peak exceeds the device's budget. With
        offload, the prefix cache moves to the CPU first and the window shrinks to one block first."""
        from ..data import batch_size
        from .offload import module_bytes
        from .workplan import WorkPlan, count_work, device_budget, memory_parts

        ctx, runner, reference, batch = bp.ctx, bp.runner, bp.target, bp.batch
        streamer = self._streamer
        K = len(ctx.options)
        stackable = [lay.kind in _STACKABLE and self._stack_ok for lay in ctx.layers]
        acts = [_quantizes_activations(o) for o in ctx.options]
        extra = 1 if self._fp is not None else 0
        work = count_work(runner, ctx, mine, batches, stack=self.stack_options, stackable=stackable, acts=acts,
                          extra=extra)
        widest = max(((mine[:, li].any(0).sum().item() + extra) for li in range(len(ctx.layers))), default=1)
        stack = int(min(widest, self.stack_options or widest)) or 1
        micro = max(batch_size(b) for b in batches)
        block_out = max((tensor_bytes(v) for v in runner.cached.values()), default=0)
        budget = device_budget(ctx.device, self.device_memory_mb)
        largest = probe.get("bytes", 0)

        def make():
            if streamer is not None:
                sizes = [streamer.block_bytes(k) for k in range(len(streamer.blocks.modules))]
                weights = module_bytes(model) - sum(sizes) + streamer.window * max(sizes)
            else:
                weights = module_bytes(model)
            on_device = runner.cache_device is None  # else kept apart, on the CPU
            cache = runner.cache_bytes if on_device else 0
            memory = memory_parts(weights=weights, cache=cache, out=ref, block_out=block_out, largest=largest,
                                  stack=stack, acc_bytes=torch.empty((), dtype=reference["ref"].dtype).element_size(),
                                  kl_logits=reference["metric"] == "kl-logits", micro=micro,
                                  ref_samples=batch_size(batch))
            if self._variants is not None and self._variants.limit > 0:  # quantized weights kept across batches
                memory["variants"] = int(min(self._variants.limit, variant_bytes))
            off = None
            if streamer is not None:
                off = {"window": streamer.window, "cache": "device" if on_device else "cpu"}
            return WorkPlan(device=str(ctx.device), layers=len(ctx.layers), options=K, batches=len(batches),
                            stack=stack, micro_batch=micro, memory=memory, budget=budget,
                            offload=off,
                            **work)

        variant_bytes = sum(weight_of(model, lay).numel() * weight_of(model, lay).element_size()
                            * int(mine[:, li].any(0).sum()) for li, lay in enumerate(ctx.layers)
                            if lay.kind not in EXPERT_KINDS)
        plan = make()
        if streamer is not None and not plan.fits() and self._variants is not None and self._variants.limit > 0:
            self._variants.limit = 0  # quantized again for every batch instead of kept on the device
            plan = make()
        if streamer is not None and not plan.fits() and runner.cached:  # the prefix cache to the CPU
            runner.cache_device = torch.device("cpu")
            runner.cached = {k: move_to(v, "cpu") for k, v in runner.cached.items()}
            plan = make()
        if streamer is not None and not plan.fits() and streamer.window > 1:
            streamer.set_window(1)
            plan = make()
        plan.refuse(offloaded=streamer is not None)
        plan.seconds = work["whole_passes"] * _timed_pass(model, runner.repeated_batch(batch, stack), ctx)
        ctx.extra_metadata["work_plan"] = plan.to_dict()
        if ctx.progress:
            from tqdm.auto import tqdm

            tqdm.write(plan.line(), file=sys.stderr)
        return plan

    def _finish(self, ctx, runner, batches, st):
        B = len(batches)
        # each unit is one rank's and exact zeros elsewhere: the sum over ranks is exact
        values = ctx.shard.sum(st["values"][:B].to("cpu", torch.float64))
        n_blocks = len(runner.blocks.names) if runner.blocks else 0
        ctx.cost.update(
            blocks=n_blocks, block_list=runner.blocks.name if runner.blocks else None,
            prefix_cache=runner.enabled, cached_blocks=runner.peak_blocks,
            cache_mb=round(runner.peak_bytes / 2**20, 6), block_evaluations=runner.block_runs,
            stacked_options=bool(self._stack_checked and self._stack_ok),
        )
        if self._streamer is not None:
            ctx.cost.update(self._streamer.report())
        mean, std = batch_statistics(values, [_size(b) for b in batches])
        ctx.extra_columns["damage_std"] = std.numpy()
        self.batch_damage_ = values.numpy()  # [B, L, K]: each batch's distances (experiments/calib_size.py)
        return mean.clamp(min=0).numpy()

    def layer_distances(self, model, bp: _BatchPass, layer, index: int | None = None,
                        options=None) -> torch.Tensor:
        """The unit of work: the output distance of the batch of ``bp`` with ``layer`` (number ``index``
        of ``bp.ctx.layers``) at each option it may take (those of ``options``, indices, when given): a
        ``[K]`` tensor on the device, 0 for ``keep`` and for options not measured, from the runner's
        cached prefix. Weight-only options share stacked passes; options that also quantize the
        layer's input activations take one pass each."""
        ctx, runner, acc = bp.ctx, bp.runner, bp.acc
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
        if self._streamer is not None:  # a stored weight: quantized on the compute device
            src = src.detach().to(ctx.device, non_blocking=True, copy=expert)  # experts: w is overwritten
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
            out[acts] = self._single(w, bp, start, acts, variants, module)
            active = [k for k in active if k not in acts]
        if self._fp is not None:  # the layer at full precision, the rest at the base
            variants[K] = src
            active.append(K)
        if not active:
            return out[:K]
        stack = len(active) if self.stack_options is None else int(self.stack_options)
        if stack > 1 and layer.kind in _STACKABLE and self._stack_ok:
            stacked = self._stacked(module, layer, bp, start, active, variants, stack)
            if not self._stack_checked:  # once: the stacked pass must equal separate passes
                self._stack_checked = True
                runs, passes = runner.block_runs, ctx.cost.get("suffix_passes", 0)
                single = self._single(w, bp, start, active, variants)
                # the check is counted apart from the work (which it repeats)
                ctx.count("check_passes", ctx.cost["suffix_passes"] - passes)
                ctx.count("check_block_evaluations", runner.block_runs - runs)
                ctx.cost["suffix_passes"], runner.block_runs = passes, runs
                close = torch.allclose(stacked, single, rtol=2e-2, atol=1e-3 * float(single.abs().max()))
                self._stack_ok = bool(close) or _warn_stack(layer.name, stacked, single)
                stacked = stacked if self._stack_ok else single
            out[active] = stacked
        else:
            out[active] = self._single(w, bp, start, active, variants)
        if self._fp is None:
            return out[:K]
        res = torch.zeros(K, dtype=acc, device=ctx.device)
        res[measured] = out[measured] - out[K]
        return res

    def _single(self, w, bp: _BatchPass, start, active, variants, module=None):
        """One suffix pass per option, the layer's weight overwritten (and restored); with
        ``module``, its input activations are quantized as each option says."""
        runner, batch, ctx = bp.runner, bp.batch, bp.ctx
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
                vals.append(_distance(out, bp.target, self.metric, bp.kind, bp.acc))
        finally:
            with torch.no_grad():
                w.copy_(saved)
        return torch.stack(vals)

    def _stacked(self, module, layer, bp: _BatchPass, start, active, variants, stack):
        """Options in groups of ``stack`` per suffix pass, stacked along the batch axis."""
        runner, batch = bp.runner, bp.batch
        vals = []
        for g in range(0, len(active), stack):
            group = active[g : g + stack]
            n = len(group)
            with stacked_weights(module, layer.kind, [variants[k] for k in group]):
                out = runner.run(runner.repeated_batch(batch, n), start, repeat=n)[0]
            bp.ctx.count("suffix_passes")
            vals.extend(_distance(o, bp.target, self.metric, bp.kind, bp.acc) for o in out.chunk(n))
        return torch.stack(vals)


_DEFAULT_CACHE_MB = {False: 1024.0, True: 8192.0}  # by "on a GPU"
_DEFAULT_VARIANT_MB = {False: 512.0, True: 4096.0}  # by "on a GPU"


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _timed_pass(model, batch, ctx) -> float:
    """Seconds of one whole forward pass of ``batch`` (the stacked batch, after the reference pass warmed
    up): the pace the work plan's time is estimated from."""
    _sync(ctx.device)
    t0 = time.perf_counter()
    forward(model, batch)
    _sync(ctx.device)
    ctx.count("probe_passes")
    return time.perf_counter() - t0


_STACKABLE = {"linear", "conv1d", "conv2d", "conv1d_hf", "embedding"}


def _warn_stack(name, stacked, single) -> bool:
    import warnings

    warnings.warn(
        f"output-distance: measuring the options of {name!r} stacked along the batch axis gave "
        f"{stacked.tolist()} instead of {single.tolist()} (the model mixes samples across the batch?); "
        f"measuring one option per pass", EstimatorWarning, stacklevel=4)
    return False


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
