"""``output-distance`` (measured) and ``lim`` (layer-importance score).

``output-distance``: for every layer x option, quantize only that layer and measure how far the
model's output moves from full precision, averaged over the calibration batches (weighted by batch
size): ``metric="cosine"`` (1 - cos of output rows, for embeddings), ``"mse"``, ``"kl"``
(KL(p_fp || p_q) of logits), or ``"auto"`` (cosine for embeddings, KL for logits). For models made of
sequential blocks only the suffix after the changed block runs, from cached block outputs
(:mod:`mpsearch.sensitivity.blocks`); ``prefix_cache=False`` runs whole forwards instead, and
``max_cache_mb`` bounds the cache. ``damage_std`` is the standard error of that mean across the
batches (0 with one batch).

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
from ..data import model_output_tensor, move_batch
from ..distributed import assign
from ..errors import MpsearchError
from ..quant import quantize_weight
from .base import (
    DEFAULT_OPTIONS, Context, Estimator, check_choice, check_positive, progress_bar, weight_errors,
    weight_of,
)
from .blocks import PrefixRunner, find_blocks
from .losses import METRICS, check_output, distance, output_kind


def _size(batch) -> int:
    from ..layers import _batch_size

    return _batch_size(batch)


class OutputDistanceEstimator(Estimator):
    """Measured output distance of the model with one layer quantized, per layer x option."""

    name = "output-distance"
    needs_data = True

    def __init__(self, *, options=DEFAULT_OPTIONS, seed: int = 0, device=None, metric: str = "auto",
                 output: str = "auto", prefix_cache: bool = True, max_cache_mb: float = 1024.0,
                 cache_dir=None, cache_every: float = 30.0):
        super().__init__(options=options, seed=seed, device=device)
        self.metric = metric
        self.output = output
        self.prefix_cache = prefix_cache
        self.max_cache_mb = max_cache_mb
        self.cache_dir = cache_dir
        self.cache_every = cache_every

    def _damage(self, model, ctx: Context) -> np.ndarray:
        check_choice("metric", self.metric, METRICS)
        check_output(self.output)
        check_positive("max_cache_mb", self.max_cache_mb, allow_zero=True)
        names = [lay.name for lay in ctx.layers]
        runner = PrefixRunner(model, find_blocks(model, names), max_cache_mb=self.max_cache_mb,
                              enabled=bool(self.prefix_cache))
        L, K, B = len(ctx.layers), len(ctx.options), len(ctx.batches)
        st = ctx.checkpoint.load() if ctx.checkpoint else None
        if not st or "values" not in st:  # none, or from an older layout: start over
            st = {"batch": 0, "layer": 0, "values": torch.zeros(B, L, K, dtype=torch.float64),
                  "done": torch.zeros(B, L, K, dtype=torch.bool)}
        mine = _my_units(runner, ctx, names, st)
        total = int(mine.sum()) + int(st["done"].sum())
        bar = progress_bar(None, enabled=ctx.progress, desc="output-distance", total=total)
        bar.update(int(st["done"].sum()))
        for bi in range(st["batch"], B):
            if not mine[bi].any():
                st.update(batch=bi + 1, layer=0)
                continue
            batch = move_batch(ctx.batches[bi], ctx.device)
            ref, raw = runner.reference(batch, names)
            ctx.count("forward_passes")
            kind = output_kind(raw, self.output)
            for li in range(st["layer"], L):
                if not mine[bi, li].any():
                    continue
                lay = ctx.layers[li]
                w = weight_of(model, lay)
                saved = w.detach().clone()
                start = runner.start_of(lay.name)
                try:
                    for k, opt in ctx.layer_options(li):
                        if opt.is_keep or not mine[bi, li, k]:
                            continue
                        with torch.no_grad():
                            w.copy_(quantize_weight(saved, opt, lay.kind, lay.name))
                        with activation_quantized(model.get_submodule(lay.name), opt):
                            out = runner.run(batch, start)[0]
                        ctx.count("suffix_passes")
                        st["values"][bi, li, k] = distance(out, ref, self.metric, kind)
                        st["done"][bi, li, k] = True
                        bar.update(1)
                finally:
                    with torch.no_grad():
                        w.copy_(saved)
                st["layer"] = li + 1
                if ctx.checkpoint:
                    ctx.checkpoint.save(st)
            st.update(batch=bi + 1, layer=0)
            if ctx.checkpoint:
                ctx.checkpoint.save(st, force=True)
        bar.close()
        # each unit is one rank's and exact zeros elsewhere: the sum over ranks is exact
        values = ctx.shard.sum(st["values"])
        sums = torch.zeros(L, K, dtype=torch.float64)
        for bi in range(B):  # batches in order, as one process adds them
            sums += _size(ctx.batches[bi]) * values[bi]
        n_blocks = len(runner.blocks.names) if runner.blocks else 0
        ctx.cost.update(
            blocks=n_blocks, block_list=runner.blocks.name if runner.blocks else None,
            prefix_cache=runner.enabled, cached_blocks=runner.peak_blocks,
            cache_mb=round(runner.peak_bytes / 2**20, 6), block_evaluations=runner.block_runs,
        )
        weight = float(sum(_size(b) for b in ctx.batches))
        mean = sums / max(weight, 1e-300)
        wb = torch.tensor([float(_size(b)) for b in ctx.batches], dtype=torch.float64)[:, None, None]
        var = (wb * (values - mean) ** 2).sum(0) / max(weight, 1e-300)  # across batches
        ctx.extra_columns["damage_std"] = (var / (B - 1)).sqrt().numpy() if B > 1 else np.zeros((L, K))
        return mean.clamp(min=0).numpy()


def _my_units(runner, ctx: Context, names, st) -> torch.Tensor:
    """``[B, L, K]`` mask of the (batch, layer, option) units this rank computes (and has not yet).

    A unit costs one suffix run: the blocks after the nearest cached block before the layer, plus the
    rest of the model (counted as one block). Keep options cost nothing.
    """
    B, L, K = len(ctx.batches), len(ctx.layers), len(ctx.options)
    work = torch.tensor([not o.is_keep for o in ctx.options]).expand(B, L, K).clone()
    if getattr(ctx, "legal", None) is not None:  # a target's per-layer options
        work &= torch.as_tensor(np.asarray(ctx.legal, dtype=bool))[None]
    if ctx.shard.enabled:
        runner.reference(move_batch(ctx.batches[0], ctx.device), names)  # the cache layout, for costs
        n = len(runner.blocks.names) if runner.blocks is not None else 0
        per_layer = []
        for lay in ctx.layers:
            start = runner.start_of(lay.name)
            j = max((k for k in runner.cached if k < start), default=-1) if runner.enabled else -1
            per_layer.append(n - j)
        cost = torch.tensor(per_layer, dtype=torch.float64)[None, :, None].expand(B, L, K)
        owners = ctx.shard.broadcast(assign(torch.where(work, cost, 0.0).numpy(), ctx.shard.world))
        owners = torch.from_numpy(owners.copy()).reshape(B, L, K)
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

    def __init__(self, *, options=DEFAULT_OPTIONS, seed: int = 0, device=None, cache_dir=None,
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
    from ..data import run_model

    return run_model(model, batch)
