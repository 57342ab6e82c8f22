"""The input statistics of the response estimator (:mod:`mpsearch.sensitivity.response`): per layer,
the Gram matrix or the diagonal of its inputs, and the relative output error a weight change makes.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import move_batch, run_model
from ..layers import get_module
from ..quant import weight_matrix
from .base import Context


# ---------------------------------------------------------------------- input statistics
class _InputStats:
    """Each layer's input second moments: the Gram matrix E[x x^T] (one for layers fed the same tensor,
    such as q/k/v) or its diagonal; token counts for embeddings. With ``mode="auto"`` the first batch
    gives Gram matrices to the layers in the order the forward reaches them while their total fits
    ``limit_bytes``, and diagonals to the rest."""

    def __init__(self, model, ctx: Context, mode: str, limit_bytes: float):
        self.model, self.ctx, self.mode, self.limit = model, ctx, mode, limit_bytes
        self.sums: dict[str, torch.Tensor] = {}  # key -> sum of x x^T, of x^2, or token counts
        self.counts: dict[str, float] = {}
        self.key_of: dict[str, str] = {}  # layer -> key of its statistic (its own name or its group's)
        self.kind_of: dict[str, str] = {}  # key -> "gram" | "diagonal" | "tokens"
        self.gram_bytes = 0
        self._den: dict[str, torch.Tensor] = {}  # layer -> tr(W H W^T) of its weight (the same for every option)

    @torch.no_grad()
    def collect(self, batches) -> None:
        for batch in batches:
            seen: list = []  # (tensor, key) of this forward: layers fed the same tensor share a Gram
            handles = [get_module(self.model, lay.name).register_forward_pre_hook(self._hook(lay, seen))
                       for lay in self.ctx.layers]
            try:
                run_model(self.model, move_batch(batch, self.ctx.device))
            finally:
                for h in handles:
                    h.remove()

    def _kind(self, lay, x) -> str:
        """The statistic a layer first seen gets."""
        if lay.kind == "embedding":
            return "tokens"
        if lay.kind not in ("linear", "conv1d_hf") or self.mode == "diagonal":
            return "diagonal"
        size = x.shape[-1] ** 2 * (8 if x.device.type == "cpu" else 4)
        if self.mode == "gram" or self.gram_bytes + size <= self.limit:
            self.gram_bytes += size
            return "gram"
        return "diagonal"

    def _hook(self, lay, seen):
        module = get_module(self.model, lay.name)

        def hook(mod, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            shared = next((k for t, k in seen if t is x), None)  # identity, not equality
            if lay.name not in self.key_of:  # first batch: this layer's statistic (its input's, if shared)
                usable = shared is not None and lay.kind in ("linear", "conv1d_hf") and self.kind_of[shared] != "tokens"
                key = shared if usable else lay.name
                self.key_of[lay.name] = key
                if key not in self.kind_of:
                    self.kind_of[key] = self._kind(lay, x)
            key = self.key_of[lay.name]
            if shared is None:
                seen.append((x, key))
            elif shared == key:
                return  # already added by the layer that owns this input
            x = x.detach()
            kind = self.kind_of[key]
            if kind == "tokens":
                value, count = torch.bincount(x.reshape(-1).long(), minlength=module.weight.shape[0]), 1.0
            elif kind == "gram":
                flat = x.reshape(-1, x.shape[-1])
                flat = flat.double() if flat.device.type == "cpu" else flat.float()
                value, count = flat.T @ flat, flat.shape[0]
            else:
                value, count = _column_moments(x, lay, module), _rows(x, lay)
            self._add(key, value, count)
        return hook

    def _add(self, key, value, count):
        value = value.double() if value.device.type == "cpu" else value.float()
        if key in self.sums:
            self.sums[key] += value
            self.counts[key] += count
        else:
            self.sums[key], self.counts[key] = value, float(count)

    def mode_summary(self) -> dict:
        kinds = {}
        for lay in self.ctx.layers:
            k = self.kind_of.get(self.key_of.get(lay.name), "none")
            kinds[k] = kinds.get(k, 0) + 1
        return {"requested": self.mode, "layers": kinds,
                "gram_mb": round(sum(v.numel() * v.element_size() for k, v in self.sums.items()
                                     if self.kind_of[k] == "gram") / 2**20, 3)}

    @torch.no_grad()
    def relative_error(self, layer, w, variant) -> float:
        """t = tr(dW H dW^T) / tr(W H W^T) of the layer (the layer's output error under its inputs,
        relative to its output), H the Gram matrix, its diagonal, or the token counts. The denominator is
        computed once per layer (``w`` is the layer's unchanged weight in every call)."""
        key = self.key_of.get(layer.name)
        if key not in self.sums:  # the layer never ran on the calibration data: its plain weight error
            m = weight_matrix(w.detach(), layer.kind).float()
            dm = weight_matrix(variant.detach(), layer.kind).float() - m
            return float(dm.pow(2).sum() / m.pow(2).sum().clamp(min=1e-300))
        kind, s = self.kind_of[key], self.sums[key]
        m = weight_matrix(w.detach(), layer.kind).to(s.dtype)
        dm = weight_matrix(variant.detach(), layer.kind).to(s.dtype) - m
        if kind == "tokens":  # embedding: row j is read once per occurrence of token j
            def quad(a):
                return (a.pow(2).sum(1) * s).sum()
        elif kind == "gram":
            def quad(a):
                return ((a @ s) * a).sum()
        else:
            def quad(a):
                return (a.pow(2) * s[None, :]).sum()
        if layer.name not in self._den:
            self._den[layer.name] = quad(m)
        num, den = quad(dm), self._den[layer.name]
        return float(num / den) if float(den) > 0 else 0.0


def _column_moments(x, lay, module) -> torch.Tensor:
    """Sum of squares of each column of the layer's weight matrix's input (conv: per input channel,
    repeated over the kernel elements; grouped convolutions: the groups' channels averaged)."""
    x = x.double() if x.device.type == "cpu" else x.float()
    if lay.kind in ("conv1d", "conv2d"):
        c_in = x.shape[1]
        ms = x.transpose(0, 1).reshape(c_in, -1).pow(2).sum(1)
        ms = ms.reshape(module.groups, -1).mean(0)
        return ms.repeat_interleave(int(np.prod(module.kernel_size)))
    return x.reshape(-1, x.shape[-1]).pow(2).sum(0)


def _rows(x, lay) -> float:
    if lay.kind in ("conv1d", "conv2d"):
        return float(x.numel() // x.shape[1])
    return float(x.numel() // x.shape[-1])
