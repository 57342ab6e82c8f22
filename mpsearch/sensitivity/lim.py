"""``lim``: the layer-importance score (see :mod:`.output_distance`'s module doc)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data import model_output_tensor, move_batch, run_model
from ..errors import MpsearchError
from ..layers import _batch_size
from .base import Context, Estimator, progress_bar, weight_errors
from .blocks import find_blocks


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
            size = _batch_size(ctx.batches[bi])
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
