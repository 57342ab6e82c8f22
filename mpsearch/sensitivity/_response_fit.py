"""The response estimator's arithmetic (:mod:`mpsearch.sensitivity.response`): which probe sizes,
the shaped noise, and the fit of damage against relative output error.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..quant import from_weight_matrix, weight_matrix

_GAMMA = (0.5, 2.0)


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
