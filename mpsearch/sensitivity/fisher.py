"""``fisher``: FIT-style empirical Fisher sensitivity from per-sample gradients.

F_jj = E_n[(d loss_n / d W_j)^2] over the calibration samples (the mean of squared per-sample
gradients, not the square of the batch-mean gradient), and damage(l, b) = sum_j F_jj * dW_j^2 with
the real rounding error dW at b bits.

Per-sample gradients come from ``torch.func`` (``functional_call`` + ``vmap(grad)``) over chunks of
``chunk_size`` samples, so memory is bounded by the chunk, not by the number of samples.
``per_sample="loop"`` uses one backward per sample instead, squaring each gradient into the sums as it
comes (the memory of one gradient); ``"auto"`` takes ``vmap`` where a chunk's per-sample gradients
fit in ``VMAP_MAX_MB`` (an LLM's do not: SmolLM2's are 0.4 GB per sample) and the loop otherwise,
and falls back to the loop (with a warning) where a model does not run under ``vmap``.

Without labels (``loss="distill"``) the gradient of a distillation loss is zero at the
full-precision weights, so labels are *sampled* from the model's own output instead: a class drawn
from softmax(logits), or the embedding plus unit Gaussian noise with a squared-error loss. Their
Fisher is the true Fisher (the Gauss-Newton matrix of the output) in expectation. The loop samples
each sample's labels from its own forward pass, with the random draws of its chunk made once
(:class:`_Draws`), so the labels cost no pass of their own (on SmolLM2 on a CPU a sample takes 0.87x
the time of a labelling pass over each chunk and then the loop: experiments/fisher_cpu.md); vmap takes them from one
forward pass over the chunk. Both give the same labels, up to float rounding of the logits.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..data import model_output_tensor, move_batch, slice_batch, split_batch
from ..layers import _batch_size
from ..settings import Choices, Interval
from .base import (Context, Estimator, EstimatorWarning, leaf_weights, math_attention, probe_seed,
                   progress_bar, rounding_damage)
from .losses import cross_entropy, loss_value, LOSSES, output_kind, OUTPUTS, resolve_loss


#: ``per_sample="auto"`` runs vmap only when one chunk's per-sample gradients take at most this (MB)
VMAP_MAX_MB = 1024


class FisherEstimator(Estimator):
    """Diagonal empirical Fisher from per-sample gradients, weighted by the rounding error."""

    name = "fisher"
    needs_data = True
    #: checked by get_estimator, before any model loads (mpsearch.settings)
    _parameter_constraints = {"loss": [Choices(*LOSSES), callable], "output": [Choices(*OUTPUTS)],
                              "chunk_size": [Interval(int, 0, None, closed="right")],
                              "per_sample": [Choices("auto", "vmap", "loop")]}
    routed_damage = True

    def __init__(self, *, options: str | list | tuple | None = None, seed: int = 0, device=None, loss="auto",
                 output: str = "auto", chunk_size: int = 16, per_sample: str = "auto",
                 cache_dir=None, cache_every: float = 30.0):
        super().__init__(options=options, seed=seed, device=device)
        self.loss = loss
        self.output = output
        self.chunk_size = chunk_size
        self.per_sample = per_sample
        self.cache_dir = cache_dir
        self.cache_every = cache_every

    def _damage(self, model, ctx: Context) -> np.ndarray:
        loss = resolve_loss(self.loss, ctx.batches)
        weights, _names, where = leaf_weights(model, ctx.layers)  # per-expert layers: their stacked tensor
        st = (ctx.checkpoint.load() if ctx.checkpoint else None) or {
            "batch": 0, "chunk": 0, "samples": 0,
            "sums": [torch.zeros(w.shape, dtype=torch.float64) for w in weights]}
        method = self.per_sample
        if method == "auto":  # vmap holds a chunk's per-sample gradients at once: only where they are small
            per_sample_mb = sum(w.numel() * w.element_size() for w in weights) / 2**20
            method = "vmap" if per_sample_mb * int(self.chunk_size) <= VMAP_MAX_MB else "loop"
        chunks = [(bi, ci, min(int(self.chunk_size), n - ci * int(self.chunk_size)))
                  for bi, b in enumerate(ctx.batches) for n in [_n(*split_batch(b)[:2])]
                  for ci in range(-(-n // int(self.chunk_size)))]
        mine = ctx.shard.assign([size for _, _, size in chunks])  # every chunk when one process
        plan = [(bi, ci) for (bi, ci, _), m in zip(chunks, mine) if m]
        todo = [(bi, ci) for bi, ci in plan if (bi, ci) >= (st["batch"], st["chunk"])]
        sizes = {(bi, ci): size for bi, ci, size in chunks}
        # the bar counts samples: one backward pass each in the loop, whose chunk can take minutes on a CPU
        bar = progress_bar(None, enabled=ctx.progress, desc="fisher samples", total=sum(sizes[c] for c in todo))
        with math_attention(), bar:
            for bi, ci in todo:
                args, kwargs, labels = _chunk(move_batch(ctx.batches[bi], ctx.device), ci, int(self.chunk_size))
                n = _n(args, kwargs)
                grads = None
                if method == "vmap":
                    labels, lossfn = self._labels(model, args, kwargs, labels, loss, ctx, bi, ci)
                    try:
                        grads = _vmap_grads(model, weights, args, kwargs, labels, lossfn)
                    except Exception as exc:  # noqa: BLE001 - any vmap failure falls back
                        if self.per_sample == "vmap":
                            raise
                        warnings.warn(f"fisher: per-sample gradients by torch.func.vmap failed on this model "
                                      f"({type(exc).__name__}: {_gist(exc)}); using one backward pass per sample "
                                      f"(the same result, slower; --param per_sample=loop skips the attempt)",
                                      EstimatorWarning, stacklevel=3)
                        method = "loop"
                if grads is None:
                    _loop_squares(model, weights, args, kwargs, self._sample_loss(loss, labels, n, ctx, (bi, ci)),
                                  st["sums"], tick=bar.update)
                else:
                    for acc, g in zip(st["sums"], grads):
                        acc += g.double().pow(2).sum(0).cpu()
                    bar.update(n)
                ctx.count("forward_passes", n)
                ctx.count("backward_passes", n)
                st["samples"] += n
                nxt = plan.index((bi, ci)) + 1
                st["batch"], st["chunk"] = plan[nxt] if nxt < len(plan) else (len(ctx.batches), 0)
                if ctx.checkpoint:
                    ctx.checkpoint.save(st)
        if ctx.checkpoint and todo:  # the sums, before the long rounding phase: an interrupt there keeps them
            ctx.checkpoint.save(st, force=True)
        sums, samples = st["sums"], st["samples"]
        if ctx.shard.enabled:  # partial float64 sums of each rank's chunks
            sums = [ctx.shard.sum(acc) for acc in sums]
            samples = int(ctx.shard.sum(torch.tensor([samples], dtype=torch.int64))[0])
        ctx.cost["samples"] = samples
        ctx.cost["per_sample"] = method
        fisher = [(sums[pi] / max(samples, 1)).float() for pi, _ in where]
        fisher = [f if e is None else f[e] for f, (_, e) in zip(fisher, where)]  # a per-expert layer: its row
        return rounding_damage(model, ctx, lambda i, dw: (fisher[i] * dw.cpu().pow(2)).sum(),
                               desc="fisher: rounding errors")

    def _sample_loss(self, loss, labels, n, ctx, where):
        """``loss_of(raw, i)``: the loss of sample ``i`` of the chunk ``where`` from its raw output: with
        sampled labels, drawn from that output (no labelling pass, :class:`_Draws`)."""
        if loss == "distill":
            draw = _Draws(n, probe_seed(ctx.seed, *where), self.output)

            def loss_of(raw, i):
                t, lossfn = draw.labels(raw, slice(i, i + 1))
                return lossfn(model_output_tensor(raw), t)
            return loss_of
        lossfn = _given_loss(loss)
        return lambda raw, i: lossfn(model_output_tensor(raw), slice_batch(labels, i, i + 1, n))

    def _labels(self, model, args, kwargs, labels, loss, ctx, bi, ci):
        """The per-sample labels and loss: given ones, or sampled from the model for distill."""
        if loss != "distill":
            return labels, _given_loss(loss)
        with torch.no_grad():
            raw = model(*args, **kwargs)
        ctx.count("forward_passes")
        draw = _Draws(_n(args, kwargs), probe_seed(ctx.seed, bi, ci), self.output)
        return draw.labels(raw, slice(None))


def _given_loss(loss):
    return lambda out, t: loss_value(loss, out, t, None, "logits")


def _squared_error(out, target):
    return 0.5 * (out.float() - target).pow(2).sum()


class _Draws:
    """Labels sampled from the model's own output for the ``n`` samples of a chunk: a class drawn from
    softmax(logits) (as ``torch.multinomial(probs, 1)`` draws it: argmax(probs / q), q ~ Exp(1)), or
    the embedding plus unit Gaussian noise. The random draws are made once for the whole chunk from
    one generator seeded with ``seed``, so labels taken sample by sample from each sample's own
    forward pass (the loop) equal those of one forward pass over the chunk (vmap) up to float rounding
    of the logits."""

    def __init__(self, n: int, seed: int, output: str):
        self.n, self.seed, self.output = n, seed, output
        self.noise = None

    def labels(self, raw, rows: slice):
        """``(labels, loss)`` for the samples ``rows`` of the chunk, whose model output is ``raw``."""
        out = model_output_tensor(raw).detach().float()
        embedding = output_kind(raw, self.output) == "embedding"
        per_sample = tuple(out.shape[1:])
        if self.noise is None:  # the chunk's draws, in the order the chunk's one draw makes them
            gen = torch.Generator(device=out.device).manual_seed(self.seed)
            if embedding:
                self.noise = torch.randn((self.n, *per_sample), generator=gen, device=out.device)
            else:
                rows_per = int(np.prod(per_sample[:-1], dtype=np.int64))
                self.noise = torch.empty((self.n * rows_per, per_sample[-1]), device=out.device).exponential_(
                    1, generator=gen).view(self.n, *per_sample)
        if embedding:
            return out + self.noise[rows], _squared_error
        probs = F.softmax(out.reshape(-1, out.shape[-1]), -1)
        q = self.noise[rows].reshape(probs.shape)
        return (probs / q).argmax(-1).reshape(out.shape[:-1]), cross_entropy


def _gist(exc: BaseException, limit: int = 160) -> str:
    """An exception's message on one line, cut at a word boundary (never mid-word) past ``limit``."""
    text = " ".join(str(exc).split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " ..."


def _n(args, kwargs) -> int:
    """Samples in a batch's inputs."""
    return _batch_size(args) if args else _batch_size(kwargs)


def _chunk(batch, ci: int, size: int):
    """``(args, kwargs, labels)`` of chunk ``ci`` of a batch (tensors cut along the first axis)."""
    args, kwargs, labels = split_batch(batch)
    n = _n(args, kwargs)
    lo, hi = ci * size, min((ci + 1) * size, n)
    return slice_batch(args, lo, hi, n), slice_batch(kwargs, lo, hi, n), slice_batch(labels, lo, hi, n)


def _vmap_grads(model, weights, args, kwargs, labels, lossfn):
    from torch.func import functional_call, grad, vmap

    fixed = {k: v.detach() for k, v in model.named_parameters()}  # tied weights once, by their first name
    name_of = {id(v): k for k, v in model.named_parameters()}
    names = [name_of[id(w)] for w in weights]  # a planned tied weight (lm_head) under its first name
    fixed.update(dict(model.named_buffers()))

    def one(ws, a, kw, t):
        a = tuple(x.unsqueeze(0) if isinstance(x, torch.Tensor) else x for x in a)
        kw = {k: v.unsqueeze(0) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        out = functional_call(model, {**fixed, **dict(zip(names, ws))}, a, kw)
        return lossfn(model_output_tensor(out), None if t is None else t.unsqueeze(0))

    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and bool((mask == 1).all()):
        # no padding: the same attention without the mask, whose checks are data-dependent control
        # flow that vmap cannot trace (transformers' causal-mask shortcut)
        kwargs = {k: v for k, v in kwargs.items() if k != "attention_mask"}
    t_dim = None if labels is None else 0
    return vmap(grad(one), in_dims=(None, 0, 0, t_dim))(
        tuple(w.detach() for w in weights), args, kwargs, labels)


def _loop_squares(model, weights, args, kwargs, loss_of, sums, tick=None):
    """One backward pass per sample, each gradient squared into ``sums`` (float64) as it comes: the
    memory of one gradient, not of the chunk's. ``loss_of(raw output, i)``: sample ``i``'s loss.
    ``tick(1)`` after each sample (a progress bar)."""
    n = _n(args, kwargs)
    saved = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        for i in range(n):
            a, kw = (slice_batch(x, i, i + 1, n) for x in (args, kwargs))
            value = loss_of(model(*a, **kw), i)
            for acc, g in zip(sums, torch.autograd.grad(value, weights)):
                acc += g.double().pow(2).cpu()
            if tick is not None:
                tick(1)
    finally:
        for w, flag in zip(weights, saved):
            w.requires_grad_(flag)
