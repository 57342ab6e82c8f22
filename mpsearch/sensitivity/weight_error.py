"""``weight-error``: the data-free baseline, damage = ||Q_b(W) - W||^2 per layer and option.

With ``weighted=True`` (needs data) each input feature's error is weighted by the mean square of that
input over the calibration batches, E[x_j^2] * sum_i dW_ij^2: the expected squared output error of a
linear layer when inputs are uncorrelated.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import move_batch, run_model
from ..layers import get_module
from ..quant import weight_matrix
from .base import Context, Estimator, rounding_damage, weight_errors


class WeightErrorEstimator(Estimator):
    """Squared weight rounding error, optionally weighted by input second moments."""

    name = "weight-error"

    def __init__(self, *, options: str | list | tuple | None = None, weighted: bool = False, seed: int = 0, device=None):
        super().__init__(options=options, seed=seed, device=device)
        self.weighted = weighted

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        return self.weighted

    def _damage(self, model, ctx: Context) -> np.ndarray:
        if not self.weighted:
            return weight_errors(model, ctx)
        moments = _input_moments(model, ctx)
        return rounding_damage(
            model, ctx, lambda i, dw: (weight_matrix(dw, ctx.layers[i].kind).pow(2)
                                       * moments[ctx.layers[i].name][None, :]).sum(),
            desc="weight-error")


def _input_moments(model, ctx: Context) -> dict[str, torch.Tensor]:
    """Mean square of each input column of every layer's weight matrix."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for lay in ctx.layers:
        module = get_module(model, lay.name)

        def hook(mod, args, _out, lay=lay, mod_ref=module):
            x = args[0].detach().float()
            if lay.kind in ("conv1d", "conv2d"):
                # mean square per input channel, repeated over the kernel elements; for grouped
                # convolutions the groups' channels are averaged (an approximation)
                c_in = x.shape[1]
                ms = x.transpose(0, 1).reshape(c_in, -1).pow(2).mean(1)
                ms = ms.reshape(mod_ref.groups, -1).mean(0)
                val, n = ms.repeat_interleave(int(np.prod(mod_ref.kernel_size))), 1
                val = val * n
            else:
                flat = x.reshape(-1, x.shape[-1])
                val, n = flat.pow(2).sum(0), flat.shape[0]
            sums[lay.name] = sums.get(lay.name, 0) + val
            counts[lay.name] = counts.get(lay.name, 0) + n

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in ctx.batches:
                run_model(model, move_batch(batch, ctx.device))
                ctx.count("forward_passes")
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / counts[name] for name in sums}
