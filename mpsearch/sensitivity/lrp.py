"""``lrp``: layer-wise relevance propagation sensitivity, as in LRP-QViT.

Relevance is propagated from the output by gradient x input with each module's backward rewritten so
that ``R = a * dR/da`` holds at every activation ``a`` and the rules below apply (forward values are
unchanged: each rule is ``g(x) + (y - g(x)).detach()``):

=========================  ===============================================================================
module                     rule
=========================  ===============================================================================
Linear, Conv1d/2d, Conv1D  LRP-epsilon: ``R_in = x * W^T (R_out / (z + eps*sign(z)))``; biases absorb
                           their share
ReLU, GELU, SiLU, Tanh...  identity: relevance passes through unchanged (``R_in = R_out``)
LayerNorm, RMSNorm         LN-rule (Ali et al. 2022): the normalising scale is held constant, relevance
                           flows through the centring only
attention softmax          ``attention="attnlrp"`` (default): AttnLRP's softmax rule
                           ``R_in = x * (R_out - s * sum R_out)`` (= gradient x input);
                           ``"ah"``: AH-rule, attention weights held constant, relevance flows through
                           the values only (query/key layers then get no relevance). A softmax over
                           3+-dimensional input is taken as attention.
anything else              gradient x input (bilinear products such as Q K^T and A V pass full relevance
                           to both operands, where AttnLRP would halve it)
=========================  ===============================================================================

The output relevance is the labelled class's logit (``relevance="label"``, needs labels), the top logit
(``"top"``), or for an encoder the embedding itself (``"embedding"``: R = e * e); ``"auto"`` picks
label, top or embedding. A layer's contribution score is its share of the total absolute relevance
arriving at the outputs of all quantized layers (before its own epsilon rule passes it down), summed over the calibration samples, and
damage(l, b) = score_l x ||Q_b(W_l) - W_l||^2 / ||W_l||^2.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import model_output_tensor, move_batch, split_batch
from ..errors import MpsearchError
from ..layers import _kind
from ..moe import EXPERT_KINDS
from ..settings import Choices, Interval
from .base import Context, Estimator, only_weights_require_grad, progress_bar, weight_errors, weight_of
from .losses import OUTPUTS, output_kind

_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Softplus,
                nn.Mish, nn.Hardswish, nn.Hardtanh, nn.ReLU6, nn.PReLU, nn.CELU, nn.SELU)


def _keep_value(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A tensor with ``y``'s value and ``g``'s gradient."""
    return g + (y - g).detach()


def epsilon_rule(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale the gradient at a layer's output by z / (z + eps*sign(z)) (LRP-epsilon)."""
    stab = z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
    return _keep_value(z * (z / stab).detach(), z)


def identity_rule(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    safe = torch.where(x.abs() > 1e-12, x, torch.ones_like(x))
    ratio = torch.where(x.abs() > 1e-12, y / safe, torch.zeros_like(x))
    return _keep_value(x * ratio.detach(), y)


def norm_rule(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w = getattr(module, "weight", None)
    w = 1.0 if w is None else w.detach()
    if isinstance(module, nn.LayerNorm):
        dims = tuple(range(-len(module.normalized_shape), 0))
        centred = x - x.mean(dims, keepdim=True)
        std = torch.sqrt(x.var(dims, keepdim=True, unbiased=False) + module.eps)
        return _keep_value(centred * (w / std).detach(), y)
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", 1e-6))
    rms = torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)
    return _keep_value(x * (w / rms).detach(), y)


@contextlib.contextmanager
def _attention_rule(rule: str):
    """Under the AH-rule, hold attention softmax outputs (3+-D input) constant."""
    if rule != "ah":
        yield
        return
    originals = (torch.softmax, F.softmax, torch.Tensor.softmax)

    def wrap(fn):
        def softmax(input, *args, **kwargs):
            out = fn(input, *args, **kwargs)
            return out.detach() if input.dim() >= 3 else out
        return softmax

    torch.softmax, F.softmax, torch.Tensor.softmax = (wrap(f) for f in originals)
    try:
        yield
    finally:
        torch.softmax, F.softmax, torch.Tensor.softmax = originals


def relevance_scores(model, batch, layer_names, *, eps: float, relevance: str, output: str,
                     attention: str = "attnlrp") -> np.ndarray:
    """Sum of |relevance| at each named layer's output for one batch."""
    index = {name: i for i, name in enumerate(layer_names)}
    recorded: list[tuple[int, torch.Tensor]] = []
    handles = []

    def layer_hook(i):
        def hook(mod, args, out):
            new = epsilon_rule(out, eps)
            recorded.append((i, new))
            return new
        return hook

    for name, mod in model.named_modules():
        if name in index:
            handles.append(mod.register_forward_hook(layer_hook(index[name])))
        elif _kind(mod) is not None:
            handles.append(mod.register_forward_hook(lambda m, a, o: epsilon_rule(o, eps)))
        elif isinstance(mod, _ACTIVATIONS) or type(mod).__name__.endswith("Activation"):
            handles.append(mod.register_forward_hook(
                lambda m, a, o: identity_rule(a[0], o) if a and isinstance(a[0], torch.Tensor)
                and a[0].shape == o.shape else o))
        elif isinstance(mod, nn.LayerNorm) or "RMSNorm" in type(mod).__name__:
            handles.append(mod.register_forward_hook(lambda m, a, o: norm_rule(m, a[0], o)))
    try:
        with _attention_rule(attention):
            args, kwargs, labels = split_batch(batch)
            raw = model(*args, **kwargs)
        out = model_output_tensor(raw)
        kind = output_kind(raw, output)
        mode = relevance
        if mode == "auto":
            mode = "embedding" if kind == "embedding" else ("label" if labels is not None else "top")
        if mode == "embedding":
            seed = out.detach()
        else:
            if mode == "label" and labels is None:
                raise MpsearchError("lrp relevance='label' needs batches with labels; use relevance='top'")
            cls = out.argmax(-1) if mode == "top" else labels.long().reshape(out.shape[:-1])
            seed = F.one_hot(cls, out.shape[-1]).to(out.dtype)
        tensors = [t for _, t in recorded]
        grads = torch.autograd.grad(out, tensors, grad_outputs=seed, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    scores = np.zeros(len(layer_names))
    for (i, t), g in zip(recorded, grads):
        if g is not None:
            scores[i] += float((t.detach() * g).abs().sum())
    return scores


class LRPEstimator(Estimator):
    """LRP-epsilon contribution scores (share of total relevance) x relative quantization noise."""

    name = "lrp"
    needs_data = True
    #: checked by get_estimator, before any model loads (mpsearch.settings)
    _parameter_constraints = {"eps": [Interval(float, 0, None)], "output": [Choices(*OUTPUTS)],
                              "relevance": [Choices("auto", "label", "top", "embedding")],
                              "attention": [Choices("attnlrp", "ah")]}

    def __init__(self, *, options: str | list | tuple | None = None, seed: int = 0, device=None, eps: float = 1e-2,
                 relevance: str = "auto", output: str = "auto", attention: str = "attnlrp",
                 cache_dir=None, cache_every: float = 30.0):
        super().__init__(options=options, seed=seed, device=device)
        self.eps = eps
        self.relevance = relevance
        self.output = output
        self.attention = attention
        self.cache_dir = cache_dir
        self.cache_every = cache_every

    def _damage(self, model, ctx: Context) -> np.ndarray:
        experts = [lay.name for lay in ctx.layers if lay.kind in EXPERT_KINDS]
        if experts:
            raise MpsearchError(
                f"lrp: {experts[0]!r} is a stacked expert tensor, applied inside its experts module's forward "
                f"with no module output of its own for relevance to arrive at; use output-distance, fisher "
                f"or hessian on mixture-of-experts models (or --exclude the experts)")
        names = [lay.name for lay in ctx.layers]
        weights = [weight_of(model, lay) for lay in ctx.layers]
        st = (ctx.checkpoint.load() if ctx.checkpoint else None) or {
            "batch": 0, "scores": torch.zeros(len(names), dtype=torch.float64)}
        with only_weights_require_grad(model, weights):
            for bi in progress_bar(range(st["batch"], len(ctx.batches)), enabled=ctx.progress, desc="lrp"):
                s = relevance_scores(model, move_batch(ctx.batches[bi], ctx.device), names, eps=self.eps,
                                     relevance=self.relevance, output=self.output, attention=self.attention)
                ctx.count("forward_passes")
                ctx.count("backward_passes")
                st["scores"] += torch.from_numpy(s)
                st["batch"] = bi + 1
                if ctx.checkpoint:
                    ctx.checkpoint.save(st, force=True)
        scores = st["scores"].numpy()
        share = scores / scores.sum() if scores.sum() > 0 else np.full(len(names), 1.0 / len(names))
        ctx.extra_metadata["lrp"] = {"share": dict(zip(names, share.tolist()))}
        return share[:, None] * weight_errors(model, ctx, relative=True)
