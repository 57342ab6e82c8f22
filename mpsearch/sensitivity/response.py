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

import numpy as np
import torch

from ..apply import activation_quantized
from ..data import micro_batches, move_batch
from ..errors import MpsearchError
from ..layers import get_module
from ..options import parse_option
from ..quant import quantize_weight
from .base import check_choice, check_positive, Context, Estimator, probe_seed, progress_bar
from .blocks import find_blocks, PrefixRunner
from .losses import output_kind
from .output_distance import (
    _BatchPass, _DEFAULT_CACHE_MB, _STACKABLE, VariantCache, _distance, _prepare, _quantizes_activations, _size,
    _warn_stack, check_suffix_settings, stacked_weights,
)
from ._response_fit import _stderr, auto_probes, fit_table, shaped_noise
from ._response_fit import _GAMMA, fit_response, loo_errors, predict  # noqa: F401  (re-exported)
from ._response_inputs import _InputStats
from ._response_inputs import _column_moments, _rows  # noqa: F401  (re-exported)

PROBE_KINDS = ("rounding", "noise")
FITS = ("linear", "power")
ERRORS = ("auto", "gram", "diagonal")
_DEFAULT_GRAM_MB = {False: 1024.0, True: 4096.0}  # by "on a GPU"




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
            bp = _BatchPass(runner, batch, ctx, _prepare(ref, self.metric, kind, acc), kind, acc)
            for li in range(st["layer"], L):
                if li in todo and not st["done"][bi, li]:
                    vals = self._layer(model, bp, li, probes[li], direct[li])
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

    def _layer(self, model, bp: _BatchPass, li, probes, direct):
        """The distances of layer ``li``'s probes then its directly measured options, for one batch."""
        runner, batch, ctx = bp.runner, bp.batch, bp.ctx
        layer = ctx.layers[li]
        module = get_module(model, layer.name)
        w = module.weight
        start = runner.start_of(layer.name)
        out = []
        if probes:
            variants = [self._variant(w, layer, li, k, ctx) for k in probes]
            out.extend(self._probe_pass(module, layer, w, start, variants, bp))
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
            out.append(_distance(o, bp.target, self.metric, bp.kind, bp.acc))
        return torch.stack(out)

    def _probe_pass(self, module, layer, w, start, variants, bp: _BatchPass):
        runner, batch, ctx = bp.runner, bp.batch, bp.ctx
        n = len(variants)
        if n > 1 and layer.kind in _STACKABLE and self._stack_ok:
            with stacked_weights(module, layer.kind, variants):
                out = runner.run(runner.repeated_batch(batch, n), start, repeat=n)[0]
            ctx.count("suffix_passes")
            stacked = torch.stack([_distance(o, bp.target, self.metric, bp.kind, bp.acc) for o in out.chunk(n)])
            if not self._stack_checked:  # once: the stacked pass must equal separate passes
                self._stack_checked = True
                runs, passes = runner.block_runs, ctx.cost.get("suffix_passes", 0)
                single = self._single(w, start, variants, bp)
                ctx.count("check_passes", ctx.cost["suffix_passes"] - passes)
                ctx.cost["suffix_passes"], runner.block_runs = passes, runs
                close = torch.allclose(stacked, single, rtol=2e-2, atol=1e-3 * float(single.abs().max()))
                self._stack_ok = bool(close) or _warn_stack(layer.name, stacked, single)
                stacked = stacked if self._stack_ok else single
            return list(stacked)
        return list(self._single(w, start, variants, bp))

    def _single(self, w, start, variants, bp: _BatchPass):
        runner, batch, ctx = bp.runner, bp.batch, bp.ctx
        saved = w.detach().clone()
        vals = []
        try:
            for v in variants:
                with torch.no_grad():
                    w.copy_(v)
                o = runner.run(batch, start)[0]
                ctx.count("suffix_passes")
                vals.append(_distance(o, bp.target, self.metric, bp.kind, bp.acc))
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
