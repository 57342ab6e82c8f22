"""``weight-error``: the data-free baseline, damage = ||Q_b(W) - W||^2 per layer and option.

With ``weighted=True`` (needs data) each input feature's error is weighted by the mean square of that
input over the calibration batches, E[x_j^2] * sum_i dW_ij^2: the expected squared output error of a
linear layer when inputs are uncorrelated. For a stacked expert tensor each expert's matrix is
weighted by the inputs routed to it (the hidden states of its tokens for ``gate_up_proj``, its own
intermediate activations for ``down_proj``), summed over its tokens and divided by all the tokens
the block saw: sum_e sum_j E[x_ej^2 1(routed to e)] * sum_i dW_eij^2, so an expert's weight in the
damage is its share of the tokens (experts with few get the fallback of :mod:`mpsearch.moe`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import move_batch, run_model
from ..errors import MpsearchError
from ..layers import get_module
from ..moe import _index_tensor, EXPERT_KINDS, split_name
from ..quant import expert_matrices, weight_matrix
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

    @property
    def routed_damage(self) -> bool:  # type: ignore[override]
        return self.weighted

    def _damage(self, model, ctx: Context) -> np.ndarray:
        if not self.weighted:
            return weight_errors(model, ctx)
        dense, dense_result = _input_moments(model, [lay for lay in ctx.layers if lay.kind not in EXPERT_KINDS])
        experts, expert_result = _expert_moments(model, [lay for lay in ctx.layers if lay.kind in EXPERT_KINDS])
        _run_hooked(model, ctx, dense + experts)  # one pass over the calibration batches feeds both
        moments = {**dense_result(), **expert_result()}

        def reduce(i, dw):
            lay = ctx.layers[i]
            if lay.kind in EXPERT_KINDS:  # [experts, out, in] x per-expert input moments [experts, in]
                return (expert_matrices(dw, lay.kind).pow(2) * moments[lay.name][:, None, :]).sum()
            return (weight_matrix(dw, lay.kind).pow(2) * moments[lay.name][None, :]).sum()

        return rounding_damage(model, ctx, reduce, desc="weight-error")


def _run_hooked(model, ctx: Context, handles) -> None:
    """Run the calibration batches once through ``model`` (forward hooks collecting), then remove
    the hooks."""
    try:
        with torch.no_grad():
            for batch in ctx.batches:
                run_model(model, move_batch(batch, ctx.device))
                ctx.count("forward_passes")
    finally:
        for h in handles:
            h.remove()


def _expert_moments(model, layers):
    """Hooks, and the result after a pass: per stacked expert layer ``[experts, in]``, each expert's
    sum of squared inputs over the tokens routed to it, divided by the tokens its block saw (a
    per-expert layer: its row)."""
    if not layers:
        return [], dict
    modules = dict(model.named_modules())
    containers = {lay.extra["container"] for lay in layers}
    sums: dict[str, dict[str, torch.Tensor]] = {c: {} for c in containers}
    tokens = dict.fromkeys(containers, 0)
    handles = []

    def hook_for(c):
        mod = modules[c]
        gated = bool(getattr(mod, "has_gate", False))
        first = "gate_up_proj" if gated else "up_proj"

        def hook(m, args, kwargs):
            x = next((a for a in list(args) + list(kwargs.values())
                      if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
            idx = _index_tensor(args, kwargs, getattr(m, "num_experts", None) or 1 << 30)
            if x is None or idx is None or not hasattr(m, "has_gate"):
                raise MpsearchError(
                    f"weight-error (weighted): the experts module {c!r} ({type(m).__name__}) is not given "
                    f"its routing indices, so the inputs of each expert are unknown; use weighted=False "
                    f"or another estimator (output-distance, fisher, hessian)")
            x = x.detach().reshape(-1, x.shape[-1]).float()
            tokens[c] += x.shape[0]
            w1 = getattr(m, first).detach().float()
            for e in torch.unique(idx[idx < w1.shape[0]]).tolist():
                xe = x[(idx == e).any(-1)]
                h = xe @ w1[e] if m.is_transposed else xe @ w1[e].t()
                if getattr(m, "has_bias", False):
                    h = h + getattr(m, f"{first}_bias")[e].float()
                h = m._apply_gate(h) if gated else m.act_fn(h)
                for pname, inp in ((first, xe), ("down_proj", h)):
                    acc = sums[c].setdefault(pname, torch.zeros(w1.shape[0], inp.shape[-1], dtype=torch.float64,
                                                                 device=inp.device))
                    acc[e] += inp.pow(2).sum(0).double()
        return hook

    for c in containers:
        handles.append(modules[c].register_forward_pre_hook(hook_for(c), with_kwargs=True))

    def result():
        out = {}
        for lay in layers:
            base, e = split_name(lay.name)
            c, pname = lay.extra["container"], base.rpartition(".")[2]
            m = (sums[c][pname] / max(tokens[c], 1)).float()
            out[lay.name] = m if e is None else m[e: e + 1]
        return out

    return handles, result


def _input_moments(model, layers):
    """Hooks, and the result after a pass: the mean square of each input column of every layer's
    weight matrix."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for lay in layers:
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
    return handles, lambda: {name: sums[name] / counts[name] for name in sums}
