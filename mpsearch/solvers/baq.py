"""BAQ: the convex closed-form bit allocation, rounded to allowed options and repaired to the budget.

Model (fitted per item from the table, over its allowed options):

- damage   d_i(b) ≈ s_i · 2^(−2b)     (least squares of log2 d + 2b; options with zero damage are
  left out of the fit, an item with no positive damage gets s_i = 0);
- resource w_i(b) ≈ a_i + p_i · b      (least squares over the options; p_i ~ the item's weights).

Minimising Σ s_i 2^(−2 b_i) subject to Σ p_i b_i ≤ B − Σ a_i over real b_i gives the equal-loss
condition 2 ln2 · s_i 2^(−2 b_i) / p_i = λ for every unclipped item, that is

    b_i = b̄ + ½ · log2( (s_i / p_i) / geomean_p(s / p) )

(with equal p_i: b_i = b̄ + ½ log2(s_i / geomean(s)), the BAQ allocation), clipped to the item's
allowed bit range and with λ found by bisection so the budget is met. Its model damage is the
continuous optimum, reported as ``bound``: a lower bound on the model damage of every plan (it is a
bound on the table's damage only as far as the model fits the table, which ``fit_r2`` reports).

Rounding: each item takes the allowed option with the most bits not above b_i. Repair, on the true
table column: while over the cap, downgrade the items that lose least damage per unit saved; then
upgrade, while anything fits, the items that save most damage per unit spent. The cheapest plan is
reached if needed, so a plan is returned whenever one exists. ``gap`` is the rounded plan's model
damage relative to the bound.
"""

from __future__ import annotations

import numpy as np

from ..errors import MpsearchError
from ..problem import Problem
from .base import Solution, Solver

LN2 = np.log(2.0)


class BAQSolver(Solver):
    """Closed-form BAQ allocation with integer rounding and budget repair (one constraint).

    Parameters
    ----------
    repair_passes:
        Upper bound on the downgrade/upgrade passes of the repair (each pass is vectorised).
    """

    name = "baq"
    single_resource = True

    def __init__(self, *, repair_passes: int = 1000):
        self.repair_passes = repair_passes

    def _solve(self, problem: Problem) -> Solution:
        if not problem.constraints:
            return Solution(np.argmin(problem.damage, axis=1), "optimal", "no constraint: least damage everywhere")
        if len({c.column for c in problem.constraints}) != 1:
            keys = ", ".join(c.key for c in problem.constraints)
            raise MpsearchError(
                f"baq allocates one resource, got constraints on {keys}; use 'ilp' (several "
                f"constraints exactly) or 'greedy'"
            )
        column = problem.constraints[0].column
        cap = float(problem.caps().min())
        w = problem.resources[column]
        allowed = problem.allowed
        bits = problem.option_bits.astype(float)
        s, a, p, r2 = fit_model(problem.damage, w, bits, allowed)
        lo = np.where(allowed, bits, np.inf).min(axis=1)
        hi = np.where(allowed, bits, -np.inf).max(axis=1)
        b_cont = allocate(s, p, lo, hi, cap - a.sum())
        bound = float(np.sum(s * 2.0 ** (-2 * b_cont)))
        choice = round_down(b_cont, bits, allowed, problem.damage)
        choice = repair(choice, problem.damage, w, allowed, cap, self.repair_passes)
        model = float(np.sum(s * 2.0 ** (-2 * bits[choice])))
        stats = {
            "bound": bound,
            "gap": (model - bound) / max(abs(model), 1e-300),
            "model_damage": model,
            "fit_r2": r2,
            "continuous_bits": b_cont.tolist() if len(b_cont) <= 64 else None,
        }
        msg = f"continuous BAQ optimum (model) {bound:.6g}; rounded plan {model:.6g} (gap {stats['gap']:.3g})"
        return Solution(choice, "feasible", msg, stats)


def fit_model(damage, w, bits, allowed):
    """Per item: s (damage scale), a and p (resource intercept and slope), and the fit's R² in log space."""
    N = damage.shape[0]
    pos = allowed & np.isfinite(damage) & (damage > 0) & (bits[None, :] < 16)
    y = np.where(pos, np.log2(np.where(pos, damage, 1.0)) + 2 * bits[None, :], 0.0)
    n = pos.sum(axis=1)
    logs = np.where(n > 0, y.sum(axis=1) / np.maximum(n, 1), -np.inf)
    s = np.where(n > 0, 2.0 ** logs, 0.0)
    resid = np.where(pos, np.log2(np.where(pos, damage, 1.0)) - (logs[:, None] - 2 * bits[None, :]), 0.0)
    tot = np.where(pos, np.log2(np.where(pos, damage, 1.0)), 0.0)
    tot = np.where(pos, tot - tot.sum(axis=1, keepdims=True) / np.maximum(n, 1)[:, None], 0.0)
    r2 = 1.0 - float((resid ** 2).sum()) / max(float((tot ** 2).sum()), 1e-300)
    m = allowed.sum(axis=1)
    bx = np.where(allowed, bits[None, :], 0.0)
    wx = np.where(allowed, w, 0.0)
    bm = bx.sum(axis=1) / m
    wm = wx.sum(axis=1) / m
    cov = np.where(allowed, (bx - bm[:, None]) * (wx - wm[:, None]), 0.0).sum(axis=1)
    var = np.where(allowed, (bx - bm[:, None]) ** 2, 0.0).sum(axis=1)
    p = np.where(var > 0, cov / np.where(var > 0, var, 1.0), 0.0)
    p = np.maximum(p, 1e-12 * np.maximum(np.abs(wm), 1.0))
    a = wm - p * bm
    return s, a, p, r2


def allocate(s, p, lo, hi, room, iters: int = 200) -> np.ndarray:
    """The continuous optimum b_i(λ) = clip(½ log2(2 ln2 s_i / (λ p_i)), lo_i, hi_i) meeting Σ p b ≤ room."""
    def bits_at(log_lam):
        with np.errstate(divide="ignore"):
            b = 0.5 * (np.log2(2 * LN2 * s / p) - log_lam)
        return np.clip(np.where(s > 0, b, -np.inf), lo, hi)

    if np.sum(p * hi) <= room:
        return hi.copy()
    if np.sum(p * lo) >= room:
        return lo.copy()
    ratio = np.log2(2 * LN2 * s[s > 0] / p[s > 0])
    left, right = ratio.min() - 2 * hi.max() - 2, ratio.max() - 2 * lo.min() + 2  # use(left) > room > use(right)
    for _ in range(iters):
        mid = 0.5 * (left + right)
        if np.sum(p * bits_at(mid)) > room:
            left = mid
        else:
            right = mid
    return bits_at(right)


def round_down(b_cont, bits, allowed, damage) -> np.ndarray:
    """Per item, the allowed option with the most bits <= b_i (least damage among equal bits)."""
    ok = allowed & (bits[None, :] <= b_cont[:, None] + 1e-9)
    none = ~ok.any(axis=1)
    ok[none] = allowed[none] & (bits[None, :] == np.where(allowed[none], bits, np.inf).min(axis=1, keepdims=True))
    score = np.where(ok, bits[None, :] * 1e6 - np.argsort(np.argsort(damage, axis=1), axis=1), -np.inf)
    return np.argmax(score, axis=1)


def repair(choice, damage, w, allowed, cap, passes) -> np.ndarray:
    """Downgrade until the plan fits, then upgrade while anything fits (true table costs)."""
    with np.errstate(invalid="ignore"):
        return _repair(choice.copy(), damage, w, allowed, cap, passes)


def _repair(choice, damage, w, allowed, cap, passes):
    idx = np.arange(len(choice))
    tol = 1e-12 * max(abs(cap), 1.0)
    wa = np.where(allowed, w, np.inf)
    damage = np.where(allowed, damage, np.inf)
    for _ in range(passes):  # downgrade: least damage added per unit saved
        used = w[idx, choice].sum()
        if used <= cap + tol:
            break
        saved = w[idx, choice][:, None] - wa
        added = damage - damage[idx, choice][:, None]
        ratio = np.where(saved > 0, np.maximum(added, 0) / np.where(saved > 0, saved, 1), np.inf)
        k = np.argmin(ratio, axis=1)
        r = ratio[idx, k]
        order = np.argsort(r, kind="stable")
        for i in order[np.isfinite(r[order])]:
            if used <= cap + tol:
                break
            used -= saved[i, k[i]]
            choice[i] = k[i]
    for _ in range(passes):  # upgrade: most damage saved per unit spent, while it fits
        used = w[idx, choice].sum()
        extra = wa - w[idx, choice][:, None]
        gain = damage[idx, choice][:, None] - damage
        ok = allowed & (gain > 0) & (extra <= cap - used + tol)
        with np.errstate(over="ignore"):  # a gain at (almost) no extra cost is infinitely good
            ratio = np.where(ok, gain / np.maximum(extra, 1e-300), -np.inf)
        k = np.argmax(ratio, axis=1)
        r = ratio[idx, k]
        order = np.argsort(-r, kind="stable")
        changed = False
        for i in order[np.isfinite(r[order])]:
            if extra[i, k[i]] <= cap - used + tol:
                used += extra[i, k[i]]
                choice[i] = k[i]
                changed = True
        if not changed:
            break
    return choice
