"""``response``: the output distance of every option, fitted from a few measured perturbations per layer.

``output-distance`` measures every layer x option x batch with a suffix pass. This estimator measures,
per layer, only a few *probes* (the layer's real rounding at two or three of its options, stacked along
the batch in one suffix pass, or noise shaped like that rounding's error) with the same distance
(``metric``: KL of logits, cosine or MSE of embeddings), and predicts every other option from the
layer's output error under its calibration inputs, which needs no forward pass (the linearity of
HIGGS, arXiv 2411.17525: damage ~ alpha_l * t_l(option)):

    t_l(o) = tr(dW_o H dW_o^T) / tr(W H W^T)          dW_o = Q_o(W) - W,  H = E[x x^T] (the layer's input)

``error="gram"`` uses the whole second-moment matrix H (deduplicated across layers that share their
input, such as q/k/v), ``"diagonal"`` only its diagonal E[x_j^2] (the ``weight-error --param
weighted=True`` weighting); ``"auto"`` takes the Gram matrices while all of them fit in ``max_gram_mb``
(default 1024 MB on a CPU, 4096 MB on a GPU) and the diagonal otherwise (recorded in the metadata as
``response.error``). Convolutions and embeddings always take the diagonal (per input channel) and the
token counts, respectively. Within one layer every option's t uses the same H, which is what the fit
needs.

Fit (``fit``): ``"linear"``: log alpha_l = mean over the probes of log(d_p / t_p) (damage proportional to
t, as a second-order expansion of the KL around full precision says); ``"power"``: d = alpha * t^gamma
by least squares in log-log over the probes (gamma clipped to [0.5, 2]). The probes' own damage is the
measured value, every other option's the fitted prediction (``measured_probes=False``: the fit
everywhere). Options that quantize activations are measured directly (the weight error says nothing
of them).

Probes (``probes``): ``"auto"`` picks, per layer, the option with the largest error among the
per-channel options of at most 3 bits... (see :func:`auto_probes`); an integer n picks n options spread
evenly in log error; option names pick those (every layer that may take them); ``"all"`` measures every
option (the table is then output-distance's). ``probe_kind="noise"``: instead of the rounding itself,
uniform noise with the rounding error's root mean square in each scale group (ExLlamaV3's shaped noise;
seeded per layer and probe).

Per layer the table reports how well the fit predicts a probe it was not fitted on: ``fit_error`` is the
root mean square, over the probes left out one at a time, of the log ratio of predicted to measured
damage, given as a relative error ``exp(rms) - 1`` (the same value in every row of the layer; 0 for keep
and for layers with fewer than two usable probes). ``damage_std`` is the standard error across the
calibration batches (of the measured value, and of the prediction refitted batch by batch). The
metadata's ``response`` holds the summary (median and 90th percentile of ``fit_error``), the probes,
the error mode and each layer's alpha (and gamma).

Cost: one forward pass per batch for the input statistics, then one suffix pass per layer x batch whose
batch is repeated only once per probe (output-distance repeats it once per option), then one
quantization of every option per layer (no forward pass).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..apply import activation_quantized
from ..data import micro_batches, move_batch, run_model
from ..errors import MpsearchError
from ..layers import get_module
from ..options import parse_option
from ..quant import from_weight_matrix, quantize_weight, weight_matrix
from .base import check_choice, check_positive, Context, Estimator, probe_seed, progress_bar
from .blocks import find_blocks, PrefixRunner
from .losses import output_kind
from .output_distance import (
    _DEFAULT_CACHE_MB, _STACKABLE, VariantCache, _distance, _prepare, _quantizes_activations, _size,
    _warn_stack, check_suffix_settings, stacked_weights,
)

PROBE_KINDS = ("rounding", "noise")
FITS = ("linear", "power")
ERRORS = ("auto", "gram", "diagonal")
_DEFAULT_GRAM_MB = {False: 1024.0, True: 4096.0}  # by "on a GPU"
_GAMMA = (0.5, 2.0)


class ResponseEstimator(Estimator):
    """Per layer, a few measured perturbations fit alpha_l; every option's damage = alpha_l * t_l(option)."""

    name = "response"
    needs_data = True

    def __init__(self, *, options: str | list | tuple | None = None, seed: int = 0, device=None, metric: str = "auto",
                 output: str = "auto", probes: int | str = "auto", probe_kind: str = "rounding",
                 fit: str = "linear", floor: bool | str = "auto", error: str = "auto", measured_probes: bool = True,
                 max_gram_mb: float | None = None,
                 prefix_cache: bool = True, max_cache_mb: float | None = None, micro_batch: int | None = None,
                 cache_dir=None, cache_every: float = 30.0):
        super().__init__(options=options, seed=seed, device=device)
        self.metric = metric
        self.output = output
        self.probes = probes
        self.probe_kind = probe_kind
        self.fit = fit
        self.floor = floor
        self.error = error
        self.measured_probes = measured_probes
        self.max_gram_mb = max_gram_mb
        self.prefix_cache = prefix_cache
        self.max_cache_mb = max_cache_mb
        self.micro_batch = micro_batch
        self.cache_dir = cache_dir
        self.cache_every = cache_every

    # ------------------------------------------------------------------ settings
    def _check(self):
        check_suffix_settings(self)
        check_choice("probe_kind", self.probe_kind, PROBE_KINDS)
        check_choice("fit", self.fit, FITS)
        check_choice("error", self.error, ERRORS)
        check_choice("floor", self.floor, ("auto", True, False))
        if self.max_gram_mb is not None:
            check_positive("max_gram_mb", self.max_gram_mb, allow_zero=True)
        p = self.probes
        if isinstance(p, bool) or not isinstance(p, (int, str)):
            raise MpsearchError(f"probes must be 'auto', 'all', a number of probes or option names, got {p!r}")
        if isinstance(p, int):
            check_positive("probes", p, integer=True)
        elif p not in ("auto", "all"):
            for spec in p.split(","):
                try:
                    parse_option(spec)
                except MpsearchError as e:
                    raise MpsearchError(f"probes: {e}") from None

    def _check_probes(self, ctx: Context):
        """Probes named as options must be among the options estimated."""
        if isinstance(self.probes, str) and self.probes not in ("auto", "all"):
            names = {o.name for o in ctx.options}
            for spec in self.probes.split(","):
                name = parse_option(spec).name
                if name not in names:
                    raise MpsearchError(f"probes: {name!r} is not one of the options being estimated "
                                        f"({', '.join(sorted(names))})")

    # ------------------------------------------------------------------ work
    def _damage(self, model, ctx: Context) -> np.ndarray:
        self._check()
        self._check_probes(ctx)
        L = len(ctx.layers)
        self._floor = self._uses_floor(model, ctx)  # run state
        probes, direct = self._choose_probes(model, ctx)
        names = [lay.name for lay in ctx.layers]
        limit = self.max_cache_mb if self.max_cache_mb is not None else _DEFAULT_CACHE_MB[ctx.device.type == "cuda"]
        runner = PrefixRunner(model, find_blocks(model, names), max_cache_mb=limit, enabled=bool(self.prefix_cache))
        batches = [part for b in ctx.batches for part in micro_batches(b, self.micro_batch)]
        B = len(batches)
        measured = [probes[i] + direct[i] for i in range(L)]  # option indices measured per layer
        P = max((len(m) for m in measured), default=0)
        acc = torch.float64 if ctx.device.type == "cpu" else torch.float32
        st = ctx.checkpoint.load() if ctx.checkpoint else None
        if not st or "d" not in st or tuple(st["d"].shape) != (B, L, P):
            st = {"batch": 0, "layer": 0, "d": torch.zeros(B, L, P, dtype=torch.float64),
                  "done": torch.zeros(B, L, dtype=torch.bool)}
        st["d"] = st["d"].to(ctx.device, acc)
        self._stack_checked, self._stack_ok = False, True
        self._variants = VariantCache(limit / 4)  # run state
        stats = _InputStats(model, ctx, self.error, self._gram_limit(ctx))
        stats.collect(batches)
        ctx.count("forward_passes", B)
        self._measure(model, ctx, runner, names, batches, st, probes, direct)
        d = st["d"].to("cpu", torch.float64)  # [B, L, P]
        wb = torch.tensor([float(_size(b)) for b in batches], dtype=torch.float64)
        try:
            return self._fit_all(model, ctx, stats, probes, direct, d, wb, runner)
        finally:
            self._variants = VariantCache(0)

    def _uses_floor(self, model, ctx) -> bool:
        """``floor="auto"``: fit a floor when the planned layers compute in 16 bits (bf16, fp16)."""
        if self.floor != "auto":
            return bool(self.floor)
        dtypes = {get_module(model, lay.name).weight.dtype for lay in ctx.layers}
        return bool(dtypes & {torch.bfloat16, torch.float16})

    def _gram_limit(self, ctx) -> float:
        mb = self.max_gram_mb if self.max_gram_mb is not None else _DEFAULT_GRAM_MB[ctx.device.type == "cuda"]
        return float(mb) * 2**20

    def _choose_probes(self, model, ctx: Context):
        """Per layer: the option indices measured as probes (weight-only), and those measured directly
        (options that quantize activations)."""
        probes, direct = [], []
        wanted = None
        if isinstance(self.probes, str) and self.probes not in ("auto", "all"):
            wanted = [parse_option(s).name for s in self.probes.split(",")]
        for i, lay in enumerate(ctx.layers):
            opts = [(k, o) for k, o in ctx.layer_options(i) if not o.is_keep]
            direct.append([k for k, o in opts if _quantizes_activations(o)])
            weight_only = [(k, o) for k, o in opts if not _quantizes_activations(o)]
            if self.probes == "all":
                probes.append([k for k, _ in weight_only])
            elif wanted is not None:
                chosen = [k for k, o in weight_only if o.name in wanted]
                probes.append(chosen if chosen else auto_probes(weight_only, 2))
            else:
                n = (3 if self._floor else 2) if self.probes == "auto" else int(self.probes)
                probes.append(auto_probes(weight_only, n, low=self._floor))
        return probes, direct

    def _variant(self, w, layer, index, k, ctx):
        """Probe ``k`` of layer ``index``: its rounding, or noise shaped like it (kept for the next
        batches while the kept variants fit in ``max_cache_mb`` / 4)."""
        return self._variants.get((index, k), lambda: self._make_variant(w, layer, index, k, ctx))

    def _make_variant(self, w, layer, index, k, ctx):
        q = quantize_weight(w, ctx.options[k], layer.kind, layer.name)
        if self.probe_kind == "rounding" or _quantizes_activations(ctx.options[k]):
            return q
        return shaped_noise(w, q, ctx.options[k], layer.kind, probe_seed(self.seed, index, k))

    def _measure(self, model, ctx, runner, names, batches, st, probes, direct):
        B, L = len(batches), len(ctx.layers)
        acc = st["d"].dtype
        todo = [i for i in range(L) if probes[i] or direct[i]]
        total = B * len(todo)
        bar = progress_bar(None, enabled=ctx.progress, desc="response", total=total)
        bar.update(int(st["done"][:, todo].sum()) if todo else 0)
        for bi in range(st["batch"], B):
            batch = move_batch(batches[bi], ctx.device)
            ref, raw = runner.reference(batch, names)
            ctx.count("forward_passes")
            kind = output_kind(raw, self.output)
            target = _prepare(ref, self.metric, kind, acc)
            for li in range(st["layer"], L):
                if li in todo and not st["done"][bi, li]:
                    vals = self._layer(model, runner, batch, li, ctx, target, kind, acc, probes[li], direct[li])
                    st["d"][bi, li, : len(vals)] = vals
                    st["done"][bi, li] = True
                    bar.update(1)
                st["layer"] = li + 1
                if ctx.checkpoint:
                    ctx.checkpoint.save(st)
            st.update(batch=bi + 1, layer=0)
            if ctx.checkpoint:
                ctx.checkpoint.save(st, force=True)
            runner.release()
        bar.close()
        ctx.cost.update(blocks=len(runner.blocks.names) if runner.blocks else 0,
                        prefix_cache=runner.enabled, block_evaluations=runner.block_runs,
                        stacked_probes=bool(self._stack_checked and self._stack_ok))

    def _layer(self, model, runner, batch, li, ctx, target, kind, acc, probes, direct):
        """The distances of layer ``li``'s probes then its directly measured options, for one batch."""
        layer = ctx.layers[li]
        module = get_module(model, layer.name)
        w = module.weight
        start = runner.start_of(layer.name)
        out = []
        if probes:
            variants = [self._variant(w, layer, li, k, ctx) for k in probes]
            out.extend(self._probe_pass(module, layer, w, runner, batch, start, variants, target, kind, acc, ctx))
        for k in direct:  # options that quantize activations: one pass each
            saved = w.detach().clone()
            try:
                with torch.no_grad():
                    w.copy_(quantize_weight(saved, ctx.options[k], layer.kind, layer.name))
                with activation_quantized(module, ctx.options[k]):
                    o = runner.run(batch, start)[0]
            finally:
                with torch.no_grad():
                    w.copy_(saved)
            ctx.count("suffix_passes")
            out.append(_distance(o, target, self.metric, kind, acc))
        return torch.stack(out)

    def _probe_pass(self, module, layer, w, runner, batch, start, variants, target, kind, acc, ctx):
        n = len(variants)
        if n > 1 and layer.kind in _STACKABLE and self._stack_ok:
            with stacked_weights(module, layer.kind, variants):
                out = runner.run(runner.repeated_batch(batch, n), start, repeat=n)[0]
            ctx.count("suffix_passes")
            stacked = torch.stack([_distance(o, target, self.metric, kind, acc) for o in out.chunk(n)])
            if not self._stack_checked:  # once: the stacked pass must equal separate passes
                self._stack_checked = True
                runs, passes = runner.block_runs, ctx.cost.get("suffix_passes", 0)
                single = self._single(w, runner, batch, start, variants, target, kind, acc, ctx)
                ctx.count("check_passes", ctx.cost["suffix_passes"] - passes)
                ctx.cost["suffix_passes"], runner.block_runs = passes, runs
                close = torch.allclose(stacked, single, rtol=2e-2, atol=1e-3 * float(single.abs().max()))
                self._stack_ok = bool(close) or _warn_stack(layer.name, stacked, single)
                stacked = stacked if self._stack_ok else single
            return list(stacked)
        return list(self._single(w, runner, batch, start, variants, target, kind, acc, ctx))

    def _single(self, w, runner, batch, start, variants, target, kind, acc, ctx):
        saved = w.detach().clone()
        vals = []
        try:
            for v in variants:
                with torch.no_grad():
                    w.copy_(v)
                o = runner.run(batch, start)[0]
                ctx.count("suffix_passes")
                vals.append(_distance(o, target, self.metric, kind, acc))
        finally:
            with torch.no_grad():
                w.copy_(saved)
        return torch.stack(vals)

    # ------------------------------------------------------------------ fit
    def _fit_all(self, model, ctx, stats, probes, direct, d, wb, runner) -> np.ndarray:
        """Every option's relative error t (one quantization per layer x option, no forward pass),
        the fit per layer, its held-out error, and the standard error across batches."""
        L, K = len(ctx.layers), len(ctx.options)
        P = d.shape[2]
        t = np.zeros((L, K))
        t_probe = np.zeros((L, P))
        for i in progress_bar(range(L), enabled=ctx.progress, desc="response fit"):
            layer = ctx.layers[i]
            w = get_module(model, layer.name).weight
            for k, o in ctx.layer_options(i):
                if not o.is_keep and k not in direct[i]:
                    t[i, k] = stats.relative_error(layer, w, quantize_weight(w, o, layer.kind, layer.name))
            for j, k in enumerate(probes[i]):
                t_probe[i, j] = (t[i, k] if self.probe_kind == "rounding"
                                 else stats.relative_error(layer, w, self._variant(w, layer, i, k, ctx)))
        wb = wb.numpy()
        d = d.numpy()
        mean = (wb[:, None, None] * d).sum(0) / max(float(wb.sum()), 1e-300)  # [L, P]
        measured = self.measured_probes and self.probe_kind == "rounding"
        damage, coefs, fit_err = fit_table(mean, t, t_probe, probes, direct, self.fit, measured, self._floor)
        per_batch = np.stack([fit_table(d[b], t, t_probe, probes, direct, self.fit, measured, self._floor)[0]
                              for b in range(d.shape[0])])
        std = _stderr(per_batch, wb)
        rows = np.zeros((L, K), dtype=bool)
        for i in range(L):
            rows[i, [k for k, o in ctx.layer_options(i) if not o.is_keep]] = True
        ctx.extra_columns["damage_std"] = np.where(rows, std, 0.0)
        ctx.extra_columns["fit_error"] = np.where(rows, fit_err[:, None], 0.0)
        per_layer = {lay.name: {"alpha": coefs[i][0], "gamma": coefs[i][1], "floor": coefs[i][2],
                                "fit_error": float(fit_err[i]),
                                "probes": [ctx.options[k].name for k in probes[i]]}
                     for i, lay in enumerate(ctx.layers)}
        errs = np.array([fit_err[i] for i in range(L) if len(probes[i]) >= 2])
        ctx.extra_metadata["response"] = {
            "error": stats.mode_summary(), "probe_kind": self.probe_kind, "fit": self.fit, "floor": self._floor,
            "fit_error_median": float(np.median(errs)) if len(errs) else None,
            "fit_error_p90": float(np.quantile(errs, 0.9)) if len(errs) else None,
            "layers": per_layer,
        }
        self.measurements_ = {"d": d, "weights": wb, "t": t, "t_probe": t_probe, "probes": probes, "direct": direct,
                              "options": [o.name for o in ctx.options], "layers": [lay.name for lay in ctx.layers],
                              "floor": self._floor}
        return np.clip(damage, 0, None)


def fit_table(d, t, t_probe, probes, direct, fit: str = "linear", measured: bool = True, floor: bool = False):
    """The damage table from measured probe distances.

    ``d``: ``[L, P]`` distances (probes of layer i first, then its ``direct`` options); ``t``: ``[L, K]``
    relative errors of every option; ``t_probe``: ``[L, P]`` those of the probes; ``probes[i]`` /
    ``direct[i]``: option indices. Returns ``(damage [L, K], [(alpha, gamma, floor)] per layer,
    fit_error [L])``: each option's fitted alpha * t^gamma, or with ``measured`` its measured distance
    (less the fitted floor) where it was probed; ``direct`` options take their measured distance.
    """
    L, K = t.shape
    damage = np.zeros((L, K))
    coefs, fit_err = [], np.zeros(L)
    for i in range(L):
        pk = list(probes[i])
        n = len(pk)
        dm, tp = np.asarray(d[i, :n], dtype=float), np.asarray(t_probe[i, :n], dtype=float)
        coef = fit_response(tp, dm, fit, floor)
        coefs.append(coef)
        errs = loo_errors(tp, dm, fit, floor)
        fit_err[i] = math.expm1(math.sqrt(np.mean(np.square(errs)))) if errs else 0.0
        for k in np.flatnonzero(t[i] > 0):
            damage[i, k] = max(dm[pk.index(k)] - coef[2], 0.0) if measured and k in pk else predict(coef, t[i, k])
        for j, k in enumerate(direct[i]):
            damage[i, k] = d[i, n + j]
    return damage, coefs, fit_err


# ---------------------------------------------------------------------- probes, noise, fit
def auto_probes(options, n: int, low: bool = False) -> list[int]:
    """``n`` option indices of ``options`` (``[(index, Option)]``, weight-only) spread evenly in bits:
    the per-channel options when there are enough of them (they bracket the group-wise ones), the
    lowest and highest excluded when more than ``n`` remain (their damage is extreme and seldom
    chosen); with ``low``, the ``n`` lowest of those (16-bit arithmetic adds a floor to every distance,
    and the probes must stand above it)."""
    if len(options) <= n:
        return [k for k, _ in options]
    pool = [(k, o) for k, o in options if o.group_size is None and o.fmt is None] or list(options)
    if len(pool) < n:
        pool = list(options)
    pool = sorted(pool, key=lambda ko: (ko[1].bits, -(ko[1].group_size or 1 << 30)))
    if len(pool) > n + 1:
        pool = pool[1:-1] if len(pool) > n + 2 else pool[:-1]
    if len(pool) <= n:
        return [k for k, _ in pool]
    if low:
        return [k for k, _ in pool[:n]]
    picks = sorted({round(j * (len(pool) - 1) / (n - 1)) for j in range(n)}) if n > 1 else [len(pool) // 2]
    return [pool[j][0] for j in picks]


def shaped_noise(w: torch.Tensor, q: torch.Tensor, option, kind: str, seed: int) -> torch.Tensor:
    """``w`` plus uniform noise whose root mean square equals that of the rounding error ``q - w`` in
    each scale group of ``option`` (the whole row for per-channel options), seeded."""
    m = weight_matrix(w.detach(), kind).float()
    err = weight_matrix(q.detach(), kind).float() - m
    rows, cols = m.shape
    g = min(option.group_size or cols, cols)
    n = -(-cols // g)
    pad = n * g - cols
    e = torch.nn.functional.pad(err, (0, pad)).reshape(rows, n, g)
    count = torch.full((n,), float(g), device=m.device)
    count[-1] = g - pad
    rms = (e.pow(2).sum(-1, keepdim=True) / count[None, :, None]).sqrt()
    gen = torch.Generator(device=m.device).manual_seed(int(seed) % (2**63))
    z = (torch.rand(rows, n, g, generator=gen, device=m.device) * 2 - 1) * math.sqrt(3.0)
    noise = (z * rms).reshape(rows, -1)[:, :cols]
    return from_weight_matrix((m + noise).to(w.dtype), w, kind)


def fit_response(t, d, fit: str = "linear", floor: bool = False) -> tuple[float, float, float]:
    """``(alpha, gamma, floor)`` of d = alpha * t^gamma (+ floor) over the probes with t > 0 and d > 0.

    ``linear``: gamma 1, alpha the geometric mean of d / t; ``power``: least squares in log-log, gamma
    clipped to [0.5, 2]. With ``floor`` (and at least two probes): d = alpha * t + floor, alpha and
    floor >= 0, by least squares of the relative residuals (the floor is the distance that 16-bit
    arithmetic adds to any perturbation; it is not the layer's, so predictions leave it out)."""
    t, d = np.asarray(t, dtype=float), np.asarray(d, dtype=float)
    ok = (t > 0) & (d > 0)
    if not ok.any():
        return 0.0, 1.0, 0.0
    if floor and ok.sum() >= 2 and np.ptp(t[ok]) > 0:
        a = np.stack([t[ok] / d[ok], 1 / d[ok]], 1)  # rows: (alpha * t + f) / d = 1
        (alpha, f), *_ = np.linalg.lstsq(a, np.ones(int(ok.sum())), rcond=None)
        if alpha > 0 and f > 0:
            return float(alpha), 1.0, float(f)
    lt, ld = np.log(t[ok]), np.log(d[ok])
    if fit == "power" and ok.sum() >= 2 and np.ptp(lt) > 1e-9:
        gamma = float(np.clip(np.polyfit(lt, ld, 1)[0], *_GAMMA))
    else:
        gamma = 1.0
    return float(np.exp(np.mean(ld - gamma * lt))), gamma, 0.0


def predict(coef, t: float) -> float:
    """A layer's damage at relative error ``t`` (without the floor)."""
    alpha, gamma = coef[0], coef[1]
    return float(alpha * t**gamma) if t > 0 else 0.0


def loo_errors(t, d, fit: str = "linear", floor: bool = False) -> list[float]:
    """log(predicted / measured) of each probe predicted from the others (probes with d, t > 0; with
    ``floor`` the prediction includes the fitted floor, and at least three probes are needed)."""
    t, d = np.asarray(t, dtype=float), np.asarray(d, dtype=float)
    ok = np.flatnonzero((t > 0) & (d > 0))
    out = []
    if len(ok) < (3 if floor else 2):
        return out
    for j in ok:
        rest = [i for i in ok if i != j]
        coef = fit_response(t[rest], d[rest], fit if len(rest) >= 2 else "linear", floor)
        out.append(math.log((predict(coef, t[j]) + coef[2]) / d[j]))
    return out


def _stderr(values, weights) -> np.ndarray:
    """Standard error of the weighted mean of per-batch values (axis 0; 0 with one batch)."""
    values, weights = np.asarray(values, dtype=float), np.asarray(weights, dtype=float)
    if len(values) < 2:
        return np.zeros(values.shape[1:])
    w = weights.reshape((-1,) + (1,) * (values.ndim - 1))
    mean = (w * values).sum(0) / weights.sum()
    var = (w * (values - mean) ** 2).sum(0) / weights.sum()
    return np.sqrt(var / (len(values) - 1))


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
