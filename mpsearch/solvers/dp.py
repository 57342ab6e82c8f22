"""DP: the exact multiple-choice knapsack over one resource, and the whole frontier in one pass.

Each item's resource use is measured from its cheapest allowed option ("extra" cost), so the grid
only spans what choices can change. The DP runs over integer *units* of that extra cost:
``best[c]`` is the least damage of a plan whose extra cost is exactly ``c`` units, updated item by
item with one vectorised shift-and-minimum per option (O(N·K·C), C the number of units). The
frontier is every grid cost where the running minimum of ``best`` drops; all its plans are
recovered together by a vectorised backtrack over a stored [N, C] argmin table.

Units:

- **exact**: when every extra cost is an integer multiple of their common divisor ``g`` and the sum
  of the items' largest extra costs is at most ``max_units`` units of ``g``, the DP is exact.
- **discretised** otherwise: the unit is ``u = range / max_units`` and each extra cost is rounded to
  the nearest unit (up, under one budget, so that every plan on the grid fits). Every returned
  point is a real plan with its true sums.

Under one budget the answer is exact on discretised tables too: the discretised DP (or the greedy
plan) gives an incumbent (damage ``UB``), the LP relaxation (the merged lower convex hulls of the
items, :func:`lp_curve`) gives the Lagrange multiplier ``λ`` of the budget
and the bound ``L(λ) = Σ_i min_k (d_ik + λ w_ik) − λ·B``; any plan that uses option k of item i
has damage at least ``L + r_ik`` (``r_ik`` the option's reduced cost), so every option with
``L + r_ik > UB`` is dropped (reduced-cost fixing). The few items left with several options (the
*core*) are solved exactly by a list of non-dominated partial plans (:func:`pareto_list_knapsack`,
exact on real costs too). Status ``optimal`` means proved. When that list outgrows ``max_states``
the incumbent is returned as ``feasible`` with its stated bound: its damage exceeds the optimum
by at most ``stats["gap"]`` (``stats["lower_bound"]`` is below the optimum).

Whole frontiers of discretised tables keep every DP point (real plans) with the LP bound at its
cost (``bound``); a point is ``optimal`` where it meets that bound, else ``feasible``. Pass
``budgets`` to get the proved optimum under each budget instead.
"""

from __future__ import annotations

import dataclasses
import math
from functools import reduce

import numpy as np

from ..errors import MpsearchError
from ..pareto import column_sums, pareto_indices
from ..problem import Problem
from .base import Solution, Solver
from .greedy import argmin_lex, greedy_choice, hull_segments


class DPSolver(Solver):
    """Exact multiple-choice knapsack by dynamic programming over one constraint.

    Parameters
    ----------
    max_units:
        Grid size: exact when the table's extra costs fit in this many integer units, otherwise the
        resolution of the discretised whole-frontier pass and of the incumbent under one budget
        (time and memory grow linearly: about 0.4 s and 33 MB for 1,000 items x 6 options).
    max_states:
        Most non-dominated partial plans the exact core search may hold under one budget; beyond
        it the result is ``feasible`` with a stated bound.
    """

    name = "dp"
    exact = True
    single_resource = True
    whole_frontier = True

    def __init__(self, *, max_units: int = 1 << 15, max_states: int = 2_000_000):
        self.max_units = max_units
        self.max_states = max_states

    # ----------------------------------------------------------------- public
    def frontier(self, problem: Problem, column: str | None = None, budgets=None) -> dict:
        """Non-dominated (cost, damage, choice) points over one resource.

        ``column`` defaults to the problem's single constraint column. Without ``budgets``: every
        point of one DP pass. With ``budgets`` (caps in ``column`` units): the proved optimum under
        each (see the module doc), non-dominated ones kept. Returns a dict with ``choices`` [P, N]
        (option index per item, a small integer dtype), ``cost`` and ``damage`` (true sums, sorted
        by cost, damage strictly decreasing), ``bound`` (a lower bound on the damage of any plan of
        at most that cost), ``status`` per point and ``stats``.
        """
        self._check()
        column = column or self._column(problem)
        t = self._run(problem, column)
        drops = _drops(t["best"])
        choices, cost, damage = self._backtrack(problem, column, t, drops)
        keep = pareto_indices(cost, damage)  # rounded units may reorder the true costs
        choices, cost, damage = choices[keep], cost[keep], damage[keep]
        curve = lp_curve(problem, column)
        stats = dict(t["stats"])
        if budgets is None:
            bound = np.minimum(np.interp(cost, curve[0], curve[1]), damage)
            proved = damage - bound <= 1e-9 * np.maximum(np.abs(damage), 1e-300)
            status = np.where(proved | (stats["mode"] == "exact"), "optimal", "feasible")
            if stats["mode"] == "exact":
                bound = damage.copy()
            return {"choices": choices, "cost": cost, "damage": damage, "bound": bound,
                    "status": status, "stats": stats}
        rows, statuses, bounds = [], [], []
        for cap in np.asarray(budgets, dtype=float):
            ok = np.flatnonzero(cost <= cap * (1 + 1e-12) + 1e-9)
            inc = choices[ok[np.argmin(damage[ok])]].astype(np.int64) if len(ok) else None
            if stats["mode"] == "exact":
                if inc is not None:
                    rows.append(inc), statuses.append("optimal"), bounds.append(np.nan)
                continue
            choice, st = self._core(problem, column, float(cap), inc, curve)
            if choice is None:
                continue
            rows.append(choice), statuses.append(st["status"]), bounds.append(st["lower_bound"])
        ch = np.array(rows, dtype=choices.dtype).reshape(len(rows), problem.n_items)
        sums = column_sums({"cost": problem.resources[column], "damage": problem.damage}, ch)
        cost, damage = sums["cost"], sums["damage"]
        keep = pareto_indices(cost, damage)
        bound = np.where(np.isnan(bounds), damage, bounds)[keep] if len(rows) else np.zeros(0)
        return {"choices": ch[keep], "cost": cost[keep], "damage": damage[keep], "bound": bound,
                "status": np.array(statuses)[keep] if len(rows) else np.zeros(0, dtype=str), "stats": stats}

    # ----------------------------------------------------------------- solver
    def _solve(self, problem: Problem) -> Solution:
        self._check()
        if not problem.constraints:
            return Solution(np.argmin(problem.damage, axis=1), "optimal", "no constraint: least damage everywhere")
        column = self._column(problem)
        cap = float(problem.caps()[0])
        # discretised units are rounded up, so every grid cost within the cap truly fits it
        t = self._run(problem, column, cap=cap, round_up=True)
        choices, cost, damage = self._backtrack(problem, column, t, [int(np.argmin(t["best"]))])
        if not cost[0] <= cap + 1e-9 * max(abs(cap), 1.0):  # pragma: no cover - infeasibility is checked before
            return Solution(None, "infeasible", "no plan fits the budget")
        stats = dict(t["stats"])
        if stats["mode"] == "exact":  # the cheapest of the least-damage plans
            return Solution(choices[0], "optimal", stats=stats)
        choice, st = self._core(problem, column, cap, choices[0].astype(np.int64), lp_curve(problem, column))
        stats.update(st)
        status = stats.pop("status")
        if status == "optimal":
            return Solution(choice, "optimal", stats=stats)
        msg = (f"not proved optimal ({stats['reason']}): damage exceeds the optimum by at most "
               f"{stats['gap']:.6g} ({stats['gap_rel']:.3g} relative); raise max_states or use solver 'ilp'")
        return Solution(choice, "feasible", msg, stats=stats)

    # ----------------------------------------------------------------- internals
    def _check(self):
        for name in ("max_units", "max_states"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise MpsearchError(f"dp: {name} must be a positive integer, got {v!r}")

    def _column(self, problem: Problem) -> str:
        cols = {c.column for c in problem.constraints}
        if len(cols) != 1:
            keys = ", ".join(c.key for c in problem.constraints) or "none"
            raise MpsearchError(
                f"dp optimises over exactly one resource, got constraints on {keys}; use solver "
                f"'ilp' for several constraints at once"
            )
        return cols.pop()

    def _units(self, problem: Problem, column: str, round_up: bool = False):
        """Integer extra-cost units per item and option, the unit size and the base cost
        (discretised units rounded to nearest, or up with ``round_up``)."""
        allowed = problem.allowed
        w = np.where(allowed, problem.resources[column], np.inf)
        base = w.min(axis=1)
        extra = np.where(allowed, w - base[:, None], 0.0)
        span = float(extra.max(axis=1).sum())
        g = _integer_unit(extra)
        if g is not None and span / g <= self.max_units:
            mode, unit = "exact", g
        else:
            mode, unit = "discretised", (span / self.max_units) or 1.0
        rnd = np.ceil if round_up and mode == "discretised" else np.round
        units = np.where(allowed, rnd(extra / unit).astype(np.int64), -1)
        stats = {"mode": mode, "unit": unit, "units": int(units.max(axis=1).sum())}
        return units, unit, float(base.sum()), stats

    def _run(self, problem: Problem, column: str, cap: float | None = None, round_up: bool = False) -> dict:
        """The DP table; with ``cap``, only grid costs up to the cap."""
        units, unit, base, stats = self._units(problem, column, round_up)
        C = int(units.max(axis=1).sum()) + 1
        if cap is not None:
            room = max(cap - base, 0.0)
            C = min(C, int(math.floor(room / unit * (1 + 1e-12) + 1e-9)) + 1)
        best, arg = knapsack(units, problem.damage, C)
        return {"best": best, "arg": arg, "units": units, "stats": stats}

    @staticmethod
    def _backtrack(problem: Problem, column: str, t: dict, positions: np.ndarray):
        """Plans ending at grid ``positions``, all at once, with their true cost and damage sums."""
        choices = backtrack(t["arg"], t["units"], positions)
        sums = column_sums({"cost": problem.resources[column], "damage": problem.damage}, choices)
        return choices, sums["cost"], sums["damage"]

    def _core(self, problem: Problem, column: str, cap: float, incumbent: np.ndarray, curve):
        """The proved optimum under ``cap`` by reduced-cost fixing + exact DP on the core (module
        doc), or the incumbent with its bound. Returns ``(choice, stats)``."""
        idx = np.arange(problem.n_items)
        w = problem.resources[column]
        d = problem.damage
        allowed = problem.allowed
        con = next(c for c in problem.constraints if c.column == column)
        g = greedy_choice(dataclasses.replace(problem, constraints=[dataclasses.replace(con, cap=cap)]))
        if g is not None and (incumbent is None or d[idx, g].sum() < d[idx, incumbent].sum()):
            incumbent = g  # the greedy plan is often closer to the optimum: a smaller core
        if incumbent is None:
            return None, {"status": "infeasible", "lower_bound": np.nan}
        ub = float(d[idx, incumbent].sum())
        lam = lp_multiplier(curve, cap)
        lag = np.where(allowed, d + lam * w, np.inf)
        m = lag.min(axis=1)
        lower = float(m.sum() - lam * cap)
        scale = float(np.abs(m).sum() + lam * abs(cap) + abs(ub))
        lower = min(lower, ub)
        keep = allowed & (lag - m[:, None] <= ub - lower + 1e-9 * scale)
        keep[idx, incumbent] = True
        core = np.flatnonzero(keep.sum(axis=1) > 1)
        stats = {"lower_bound": lower, "lambda": lam, "core_items": int(len(core))}

        def bounded(reason):
            gap = max(ub - lower, 0.0)
            return incumbent, {**stats, "status": "feasible", "reason": reason, "gap": gap,
                               "gap_rel": gap / max(abs(ub), 1e-300)}

        fixed = np.where(keep.sum(axis=1) == 1, np.argmax(keep, axis=1), incumbent)
        if not len(core):
            return incumbent, {**stats, "status": "optimal", "gap": 0.0, "gap_rel": 0.0}
        rest = np.setdiff1d(idx, core)
        room = cap - float(w[rest, fixed[rest]].sum())
        picked = pareto_list_knapsack(w[core], d[core], keep[core], room, self.max_states,
                                      tol=1e-9 * max(abs(cap), 1.0))
        if picked is None:
            return bounded(f"the core of {len(core)} items has more than max_states={self.max_states} "
                           f"non-dominated partial plans")
        choice = fixed.copy()
        choice[core] = picked
        if not float(d[idx, choice].sum()) < ub:
            choice = incumbent
        return choice, {**stats, "status": "optimal", "gap": 0.0, "gap_rel": 0.0}


def pareto_list_knapsack(w, d, allowed, room: float, max_states: int, tol: float = 0.0):
    """Exact multiple-choice knapsack by a list of non-dominated partial plans (Nemhauser-Ullmann):
    item by item, every (cost, damage) state is extended by each allowed option, states over
    ``room`` (+ ``tol``) are dropped and only the non-dominated ones kept. Works on real costs.
    Returns the least-damage choice vector, or ``None`` when a list outgrows ``max_states``."""
    cost, dmg = np.zeros(1), np.zeros(1)
    history = []
    for i in range(len(w)):
        opts = np.flatnonzero(allowed[i])
        cc = (cost[:, None] + w[i, opts][None, :]).ravel()
        dd = (dmg[:, None] + d[i, opts][None, :]).ravel()
        parent = np.repeat(np.arange(len(cost)), len(opts))
        option = np.tile(opts, len(cost))
        ok = np.flatnonzero(cc <= room + tol)
        keep = ok[pareto_indices(cc[ok], dd[ok])]
        if len(keep) > max_states:
            return None
        history.append((parent[keep], option[keep]))
        cost, dmg = cc[keep], dd[keep]
    j = int(np.argmin(dmg))
    choice = np.zeros(len(w), dtype=np.int64)
    for i in range(len(w) - 1, -1, -1):
        parent, option = history[i]
        choice[i] = option[j]
        j = parent[j]
    return choice


def _integer_unit(extra: np.ndarray) -> float | None:
    """The greatest common divisor of integer extra costs, or ``None`` when some are not integers."""
    if not np.all(np.abs(extra - np.round(extra)) <= 1e-9 * np.maximum(1.0, np.abs(extra))):
        return None
    vals = np.unique(np.round(extra).astype(np.int64))
    return float(reduce(math.gcd, vals.tolist(), 0) or 1)


def _drops(best: np.ndarray) -> np.ndarray:
    """Grid positions where the running minimum of ``best`` strictly drops."""
    runmin = np.minimum.accumulate(best)
    return np.flatnonzero(np.isfinite(best) & (best < np.r_[np.inf, runmin[:-1]]))


def knapsack(units: np.ndarray, damage: np.ndarray, C: int):
    """Multiple-choice knapsack over ``C`` integer cost cells.

    ``units[i, k]`` is option k's cost in cells (-1 where not allowed). Returns ``best`` (least
    damage at each exact cost cell reached) and the argmin table ``arg[i, c]``.
    """
    N, K = units.shape
    best = np.full(C, np.inf)
    best[0] = 0.0
    arg = np.zeros((N, C), dtype=np.uint8 if K < 256 else np.int32)
    hi = 1
    for i in range(N):
        new_hi = min(C, hi + int(units[i].max()))
        new = np.full(new_hi, np.inf)
        a = arg[i, :new_hi]
        for k in np.flatnonzero(units[i] >= 0):
            s = int(units[i, k])
            if s >= new_hi:
                continue
            n = min(hi, new_hi - s)
            cand = best[:n] + damage[i, k]
            tgt = new[s:s + n]
            better = cand < tgt
            np.copyto(tgt, cand, where=better)
            a[s:s + n][better] = k
        best[:new_hi] = new
        hi = new_hi
    return best[:hi], arg


def backtrack(arg: np.ndarray, units: np.ndarray, positions) -> np.ndarray:
    """Choice vectors [P, N] of the plans ending at grid ``positions``, all at once."""
    N = units.shape[0]
    pos = np.asarray(positions, dtype=np.int64).copy()
    choices = np.zeros((N, len(pos)), dtype=arg.dtype)  # item-major: contiguous row writes
    for i in range(N - 1, -1, -1):
        k = choices[i]
        np.take(arg[i], pos, out=k)
        pos -= units[i].take(k)
    if np.any(pos != 0):  # pragma: no cover - internal consistency
        raise AssertionError("dp backtrack did not return to the origin")
    return choices.T


def lp_curve(problem: Problem, column: str):
    """The LP relaxation's least damage as a function of the budget on ``column``.

    Returns ``(cost, damage, ratio)``: breakpoints of the piecewise-linear lower bound (the items'
    lower convex hulls merged by damage saved per unit of cost) and each segment's slope. No plan
    of cost at most ``c`` has damage below ``np.interp(c, cost, damage)``.
    """
    idx = np.arange(problem.n_items)
    w = np.where(problem.allowed, problem.resources[column], np.inf)
    d = problem.damage
    start = argmin_lex(w, d)
    seg_i, seg_a, seg_b, seg_r = hull_segments(w, d, start)
    order = np.argsort(-seg_r, kind="stable")
    dc = (w[seg_i, seg_b] - w[seg_i, seg_a])[order]
    dd = (d[seg_i, seg_a] - d[seg_i, seg_b])[order]
    cost = float(w[idx, start].sum()) + np.r_[0.0, np.cumsum(dc)]
    damage = float(d[idx, start].sum()) - np.r_[0.0, np.cumsum(dd)]
    return cost, damage, seg_r[order]


def lp_multiplier(curve, cap: float) -> float:
    """The LP dual price of the budget ``cap``: the slope of the hull segment that ``cap`` cuts."""
    cost, _, ratio = curve
    j = int(np.searchsorted(cost, cap, side="right")) - 1
    return float(ratio[j]) if 0 <= j < len(ratio) else 0.0
