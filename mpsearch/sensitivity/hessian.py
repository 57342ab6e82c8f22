"""``hessian``: HAWQ-V2/V3 Hessian-trace sensitivity with Hutchinson's estimator.

For each calibration batch the loss graph is built once with ``create_graph=True``; each Rademacher
probe ``v`` (over all quantized weights at once) then costs one Hessian-vector product of the whole
model, and every layer's trace estimate comes from the same probe: ``v_l^T (Hv)_l``. Probes stop when
every layer's standard error is within ``tol`` of its trace (relative; layers whose trace is below
1e-3 of the largest one are held to 1e-3 of the largest), or at ``probes``. Batches are averaged,
weighted by their size.

``micro_batch=k`` holds one gradient graph of at most ``k`` samples at a time (the double-backward
graph is several times the memory of a training step): each round of probes runs through every
micro-batch in turn and sums their size-weighted ``v^T H v``, which equals the whole batch's for a
mean loss, so the result is the same up to float rounding at about 1/(batch/k) of the memory.

``probe_batch=p`` evaluates ``p`` probes in one batched Hessian-vector product (``torch.autograd.grad``
with ``is_grads_batched``, i.e. vmap over the double backward) where the model's operations allow it:
the same probes (each drawn from its own seed) and the same traces up to float rounding, in fewer,
larger kernels, at up to ``p`` times the HVP memory. When batching fails (an operation without a
batching rule) it warns and goes on one probe at a time.

- ``mode="trace"``: damage(l, b) = Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2 (HAWQ-V2/V3). A stacked
  expert tensor is traced by expert slices: damage = sum_e Tr(H_e) / n_e * ||Q_b(W_e) - W_e||^2, so
  each expert's curvature (zero for an expert no calibration token reaches, which then gets the
  fallback of :mod:`mpsearch.moe`) weighs its own error; a per-expert layer is one such slice.
- ``mode="diagonal"``: damage(l, b) = sum_j diag(H)_j * dW_j^2 with diag(H) ~ E[v * Hv].

Each trace's standard error is in the metadata (``uncertainty``) and as a ``damage_std`` column.
Negative traces (or diagonal entries) happen where the loss is not locally convex (a model away from
a minimum, too few probes). ``negative="clamp"`` (default) sets them to 0 with a warning naming the
layers: second-order terms then predict no damage, and the quantization noise itself is not signed;
``"abs"`` takes the magnitude; ``"error"`` refuses.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch

from ..data import batch_size, micro_batches, move_batch, split_batch
from ..distributed import follow
from ..errors import MpsearchError
from ..moe import EXPERT_KINDS
from .base import (check_choice, check_positive, Context, Estimator, EstimatorWarning, expert_errors,
                   leaf_weights, math_attention, only_weights_require_grad, probe_seed, progress_bar,
                   rounding_damage, weight_errors)
from .losses import check_loss, check_output, forward, loss_value, output_kind, resolve_loss


class _ProbeRun(NamedTuple):
    """What every batch's probes share: the model, its loss, the weights probed, the run's context,
    the resumable state ``st`` (updated in place), the most probes per batch, the progress bar."""

    model: object
    loss: object
    weights: list
    ctx: Context
    st: dict
    n_max: int
    bar: object


class HessianEstimator(Estimator):
    """Per-layer Hessian traces (or diagonals) by Hutchinson probes sharing one HVP per probe."""

    name = "hessian"
    needs_data = True
    routed_damage = True

    def __init__(self, *, options: str | list | tuple | None = None, seed: int = 0, device=None, probes: int = 64,
                 min_probes: int = 8, tol: float = 0.05, mode: str = "trace", loss="auto",
                 output: str = "auto", negative: str = "clamp", micro_batch: int | None = None,
                 probe_batch: int = 1,
                 cache_dir=None, cache_every: float = 30.0):
        super().__init__(options=options, seed=seed, device=device)
        self.probes = probes
        self.min_probes = min_probes
        self.tol = tol
        self.mode = mode
        self.loss = loss
        self.output = output
        self.negative = negative
        self.micro_batch = micro_batch
        self.probe_batch = probe_batch
        self.cache_dir = cache_dir
        self.cache_every = cache_every

    def _check(self):
        check_positive("probes", self.probes, integer=True)
        check_positive("min_probes", self.min_probes, integer=True)
        if self.min_probes < 2:
            raise MpsearchError(f"min_probes must be at least 2 (a standard error needs two), got {self.min_probes}")
        check_positive("tol", self.tol, allow_zero=True)
        check_choice("mode", self.mode, ("trace", "diagonal"))
        check_choice("negative", self.negative, ("clamp", "abs", "error"))
        if self.micro_batch is not None:
            check_positive("micro_batch", self.micro_batch, integer=True)
        check_positive("probe_batch", self.probe_batch, integer=True)
        check_loss(self.loss)
        check_output(self.output)

    def _damage(self, model, ctx: Context) -> np.ndarray:
        self._check()
        self._batched = int(self.probe_batch) > 1  # run state: off after a failed batched HVP
        loss = resolve_loss(self.loss, ctx.batches)
        weights, _names, where = leaf_weights(model, ctx.layers)  # per-expert layers: their stacked tensor
        self._segments, layer_of = _segments(ctx.layers, weights, where)  # run state: traces per expert slice
        self._layer_of = layer_of
        diagonal = self.mode == "diagonal"
        n_max = max(int(self.probes), int(self.min_probes))
        st = (ctx.checkpoint.load() if ctx.checkpoint else None) or _fresh()
        if ctx.shard.enabled:
            st = _agree(st, ctx.shard, n_max, diagonal)
        bar = progress_bar(None, enabled=ctx.progress, desc="hessian probes",
                           total=n_max * len(ctx.batches))
        run = _ProbeRun(model, loss, weights, ctx, st, n_max, bar)
        with only_weights_require_grad(model, weights), math_attention():
            for bi in range(st["batch"], len(ctx.batches)):
                batch = move_batch(ctx.batches[bi], ctx.device)
                if diagonal and st["diag_batch"] is None:
                    st["diag_batch"] = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
                parts = micro_batches(batch, self.micro_batch)
                if len(parts) == 1:
                    self._probe_batch(run, batch, bi)
                else:
                    self._probe_micro_batches(run, parts, bi)
                size = batch_size(ctx.batches[bi])
                if diagonal:
                    if ctx.shard.enabled:  # every rank's probes of this batch
                        st["diag_batch"] = [ctx.shard.sum(acc) for acc in st["diag_batch"]]
                    p = len(st["current"])
                    part = [acc / p * size for acc in st["diag_batch"]]
                    st["diag_total"] = part if st["diag_total"] is None else [
                        a + b for a, b in zip(st["diag_total"], part)]
                st["done"].append((size, torch.stack(st["current"])))
                st.update(batch=bi + 1, current=[], diag_batch=None)
                if ctx.checkpoint:
                    ctx.checkpoint.save(st, force=True)
        bar.close()
        seg_trace, _seg_stderr = _combine(st["done"])
        trace, stderr = _combine([(size, t @ layer_of) for size, t in st["done"]])
        n = np.array([lay.params for lay in ctx.layers], dtype=float)
        trace = self._handle_negative(trace, [lay.name for lay in ctx.layers], "trace")
        err2 = weight_errors(model, ctx)
        probes_used = [int(t.shape[0]) for _, t in st["done"]]
        ctx.cost["probes"] = sum(probes_used)
        ctx.extra_metadata["uncertainty"] = {
            "trace": {lay.name: float(t) for lay, t in zip(ctx.layers, trace)},
            "trace_stderr": {lay.name: float(s) for lay, s in zip(ctx.layers, stderr)},
            "probes_per_batch": probes_used,
        }
        ctx.extra_columns["damage_std"] = (stderr / n)[:, None] * err2
        if not diagonal:
            out = (trace / n)[:, None] * err2
            for i, lay in enumerate(ctx.layers):  # stacked experts: each expert's trace weighs its own error
                if lay.kind in EXPERT_KINDS and where[i][1] is None:
                    segs = np.flatnonzero(layer_of[:, i].numpy())
                    per = self._handle_negative(seg_trace[segs], [f"{lay.name}[{e}]" for e in range(len(segs))],
                                                "trace")
                    out[i] = ((per / (lay.params / len(segs)))[:, None] * expert_errors(model, ctx, i)).sum(0)
            return out
        weight_sum = sum(size for size, _ in st["done"])
        diags = [(d / weight_sum).float().cpu() for d in st["diag_total"]]
        diags = [diags[pi] if e is None else diags[pi][e] for pi, e in where]  # per layer
        neg = [lay.name for lay, d in zip(ctx.layers, diags) if bool((d < 0).any())]
        if neg:
            count = sum(int((d < 0).sum()) for d in diags)
            self._negative_found(f"Hessian-diagonal entries ({count}, in {len(neg)} layer(s) from {neg[0]!r})")
        diags = [d.clamp(min=0) if self.negative == "clamp" else d.abs() for d in diags]
        return rounding_damage(model, ctx, lambda i, dw: (diags[i] * dw.cpu().pow(2)).sum(),
                               desc="hessian: rounding errors")

    def _probe(self, grads, weights, ctx, bi, j, scale, diag=None):
        """One Hutchinson probe through one gradient graph: per-layer v^T H v (times ``scale``).

        With ``diag`` (a list of float64 tensors), ``v * Hv * scale`` is added into it; with
        ``diag=[]``, the products ``v * Hv`` are appended to it instead (kept for later).
        """
        gen = torch.Generator(device=ctx.device).manual_seed(probe_seed(ctx.seed, bi, j))
        vs = _rademacher(weights, gen, ctx.device)
        hv = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=True)
        ctx.count("hvps")
        if diag is not None and not diag:
            diag.extend(v * h for v, h in zip(vs, hv))
        elif diag is not None:
            for acc, v, h in zip(diag, vs, hv):
                acc += (v * h).double() * scale
        return _seg_sums(vs, hv, self._segments).cpu() * scale

    def _probes(self, grads, weights, ctx, bi, js, scale, diag=None):
        """Probes ``js`` through one gradient graph, in one batched HVP (``is_grads_batched``) where
        possible: ``(rows, prods)``, one ``v^T H v`` row per probe and, with ``diag=[]``, each probe's
        ``v * Hv`` products (``diag`` as in :meth:`_probe` otherwise)."""
        collect = diag is not None and not diag
        if len(js) > 1 and self._batched:
            try:
                return self._probes_batched(grads, weights, ctx, bi, js, scale, diag, collect)
            except RuntimeError as exc:
                self._batched = False
                warnings.warn(f"hessian: batched Hessian-vector products failed ({str(exc)[:120]}); "
                              f"one probe at a time", EstimatorWarning, stacklevel=4)
        rows, prods = [], []
        for j in js:
            pr = [] if collect else diag
            rows.append(self._probe(grads, weights, ctx, bi, j, scale, pr))
            prods.append(pr if collect else None)
        return rows, prods

    def _probes_batched(self, grads, weights, ctx, bi, js, scale, diag, collect):
        probes = []
        for j in js:
            gen = torch.Generator(device=ctx.device).manual_seed(probe_seed(ctx.seed, bi, j))
            probes.append(_rademacher(weights, gen, ctx.device))
        vs = [torch.stack([p[i] for p in probes]) for i in range(len(weights))]
        hv = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=True, is_grads_batched=True)
        ctx.count("hvps", len(js))
        ctx.count("batched_hvp_calls")
        prods = [None] * len(js)
        if collect:
            prods = [[v[i] * h[i] for v, h in zip(vs, hv)] for i in range(len(js))]
        elif diag is not None:
            for acc, v, h in zip(diag, vs, hv):
                acc += (v * h).double().sum(0) * scale
        per = torch.cat([(v * h).reshape(len(js), s, -1).sum(-1).double() for v, h, s in zip(vs, hv, self._segments)],
                        1).cpu()
        return [row * scale for row in per], prods

    def _probe_batch(self, run: _ProbeRun, batch, bi: int):
        """Probes through one gradient graph of the whole batch until converged or ``n_max``.

        Probes run in rounds of one per rank (probe ``j`` on rank ``j % world``); the gathered round
        is read in order and the stopping rule applied after each probe, as with one process.
        """
        model, loss, weights, ctx, st, n_max, bar = run
        shard = ctx.shard
        grads = self._gradient_graph(model, batch, loss, weights, ctx)
        p = max(int(self.probe_batch), 1)
        while len(st["current"]) < n_max:
            lo = len(st["current"])
            hi = min(n_max, lo + shard.world * p)  # p probes per rank, in one batched HVP
            rows = torch.zeros(hi - lo, sum(self._segments), dtype=torch.float64)
            js = [j for j in range(lo, hi) if j % shard.world == shard.rank]
            got, prods = self._probes(grads, weights, ctx, bi, js, 1.0,
                                      [] if st["diag_batch"] is not None else None) if js else ([], [])
            for j, row in zip(js, got):
                rows[j - lo] = row
            rows = shard.sum(rows)  # each row is one rank's, zeros elsewhere: exact
            stop = False
            for j in range(lo, hi):
                st["current"].append(rows[j - lo])
                bar.update(1)
                if j + 1 >= self.min_probes and self._converged(torch.stack(st["current"]) @ self._layer_of):
                    stop = True
                    break
            for j, pr in zip(js, prods):  # a probe past the stopping point is dropped
                if pr and j < len(st["current"]):
                    for acc, x in zip(st["diag_batch"], pr):
                        acc += x.double()
            if ctx.checkpoint:
                ctx.checkpoint.save(st)
            if stop:
                break

    def _probe_micro_batches(self, run: _ProbeRun, parts, bi: int):
        """The same probes, with one micro-batch's gradient graph held at a time.

        ``v^T H v`` of the batch (mean loss) is the size-weighted sum over its micro-batches, so each
        round of probes runs through every micro-batch's graph in turn; rounds double (``min_probes``,
        then twice the probes so far) until the traces converge or ``probes`` is reached. Memory is that
        of one micro-batch; the HVP work is the same as for the whole batch. A round's probes are
        shared between ranks (probe ``j`` on rank ``j % world``).
        """
        model, loss, weights, ctx, st, n_max, bar = run
        shard = ctx.shard
        sizes = [batch_size(part) for part in parts]
        total = float(sum(sizes))
        p = max(int(self.probe_batch), 1)
        while len(st["current"]) < n_max:
            lo = len(st["current"])
            hi = min(n_max, max(int(self.min_probes), 2 * lo))
            vals = torch.zeros(hi - lo, sum(self._segments), dtype=torch.float64)
            mine = [j for j in range(lo, hi) if j % shard.world == shard.rank]
            for part, size in zip(parts, sizes) if mine else ():
                grads = self._gradient_graph(model, part, loss, weights, ctx)
                for g in range(0, len(mine), p):  # p probes per batched HVP
                    js = mine[g : g + p]
                    for j, row in zip(js, self._probes(grads, weights, ctx, bi, js, size / total,
                                                       st["diag_batch"])[0]):
                        vals[j - lo] = vals[j - lo] + row
                del grads
            vals = shard.sum(vals)
            st["current"].extend(list(vals))
            bar.update(hi - lo)
            if ctx.checkpoint:  # a round is the unit of work kept across an interruption
                ctx.checkpoint.save(st)
            if hi >= self.min_probes and self._converged(torch.stack(st["current"]) @ self._layer_of):
                break

    def _gradient_graph(self, model, batch, loss, weights, ctx):
        ref = None
        if loss == "distill":
            with torch.no_grad():
                ref = forward(model, batch)[0]
            ctx.count("forward_passes")

        out, raw = forward(model, batch)
        value = loss_value(loss, out, split_batch(batch)[2], ref, output_kind(raw, self.output))
        ctx.count("forward_passes")
        ctx.count("backward_passes")
        return torch.autograd.grad(value, weights, create_graph=True)

    def _converged(self, traces: torch.Tensor) -> bool:
        mean = traces.mean(0).abs()
        se = traces.std(0) / traces.shape[0] ** 0.5
        floor = 1e-3 * float(mean.max()) if mean.numel() else 0.0
        return bool((se <= self.tol * torch.clamp(mean, min=floor)).all())

    def _handle_negative(self, values: np.ndarray, names, what: str) -> np.ndarray:
        """Apply the ``negative`` policy to ``values`` (one per name in ``names``)."""
        values = np.asarray(values, dtype=float)
        neg = np.flatnonzero(values < 0)
        if len(neg):
            self._negative_found(f"{what} in layer(s) " + ", ".join(repr(names[i]) for i in neg[:5])
                                 + (" ..." if len(neg) > 5 else ""))
        return np.maximum(values, 0.0) if self.negative == "clamp" else np.abs(values)

    def _negative_found(self, where: str) -> None:
        if self.negative == "error":
            raise MpsearchError(
                f"hessian: negative {where}: the loss is not locally convex there; use more probes, "
                f"a trained model, loss='distill', or negative='clamp'"
            )
        warnings.warn(
            f"hessian: negative {where}; "
            + ("set to 0 (negative='clamp')" if self.negative == "clamp" else "using |value| (negative='abs')"),
            EstimatorWarning, stacklevel=4,
        )


def _segments(layers, weights, where):
    """Per parameter, how many trace slices its probes are summed into (one per expert of a stacked
    expert tensor, else one), and the ``[slices, layers]`` 0/1 matrix adding slices into layer traces."""
    segs = [1] * len(weights)
    for lay, (pi, _e) in zip(layers, where):
        if lay.kind in EXPERT_KINDS and weights[pi].dim() == 3:
            segs[pi] = int(weights[pi].shape[0])
    offset = np.concatenate([[0], np.cumsum(segs)])
    layer_of = torch.zeros(int(offset[-1]), len(layers), dtype=torch.float64)
    for i, (pi, e) in enumerate(where):
        if e is not None:
            layer_of[offset[pi] + e, i] = 1.0
        else:
            layer_of[offset[pi]: offset[pi + 1], i] = 1.0
    return segs, layer_of


def _seg_sums(vs, hv, segs) -> torch.Tensor:
    """``v^T H v`` of each trace slice (:func:`_segments`) of one probe."""
    return torch.cat([(v * h).reshape(s, -1).sum(-1).double() for v, h, s in zip(vs, hv, segs)])


def _fresh() -> dict:
    return {"batch": 0, "done": [], "current": [], "diag_total": None, "diag_batch": None}


def _agree(st: dict, shard, n_max: int, diagonal: bool) -> dict:
    """Bring every rank's resumed state to the least advanced rank's (probes are the same everywhere).

    Progress is (batch, probes of the current batch); a rank ahead drops what the others lack. In
    diagonal mode each rank's partial diagonal sums cannot be cut back, so unequal states start over.
    """
    mine = st["batch"] * (n_max + 1) + len(st["current"])
    low, neg_high = shard.min_int([mine, -mine])
    if low == -neg_high:
        return st
    if diagonal:
        warnings.warn("hessian: the ranks' caches were saved at different points; diagonal mode starts "
                      "over", EstimatorWarning, stacklevel=4)
        return _fresh()
    b, c = divmod(low, n_max + 1)
    current = list(st["current"]) if st["batch"] == b else list(st["done"][b][1])
    return {**_fresh(), "batch": b, "done": list(st["done"][:b]), "current": current[:c]}


def _rademacher(weights, gen, device) -> list[torch.Tensor]:
    """One Rademacher probe (+-1) per weight, drawn as one flat vector on ``device`` and split into
    views; each view follows its weight's device and dtype (a model spread over devices)."""
    flat = torch.randint(0, 2, (sum(w.numel() for w in weights),), generator=gen, device=device,
                         dtype=weights[0].dtype).mul_(2).sub_(1)
    views = [v.view_as(w) for v, w in zip(flat.split([w.numel() for w in weights]), weights)]
    return [follow(v, w) for v, w in zip(views, weights)]


def _combine(done) -> tuple[np.ndarray, np.ndarray]:
    """Size-weighted mean of the per-batch traces and its standard error."""
    sizes = np.array([s for s, _ in done], dtype=float)
    means = np.stack([t.mean(0).numpy() for _, t in done])
    ses = np.stack([(t.std(0) / t.shape[0] ** 0.5).numpy() if t.shape[0] > 1
                    else np.full(t.shape[1], np.inf) for _, t in done])
    w = sizes / sizes.sum()
    return (w[:, None] * means).sum(0), np.sqrt((w[:, None] ** 2 * ses**2).sum(0))
