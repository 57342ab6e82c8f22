"""Greedy: take the upgrades that save the most damage per unit of budget first.

Every item starts at its cheapest allowed option. Each item's upgrades along the lower convex hull of
its (cost, damage) points are merged across items and taken in order of damage saved per unit of
cost while they fit; a last pass spends what is left on the single change that saves the most
damage, until none fits. With several constraints the cost is their sum, each divided by its cap.
Runs in O(NK log NK); optimal when the budget falls on a hull vertex (the classic LP-relaxation
argument), otherwise close to it.
"""

from __future__ import annotations

import numpy as np

from ..problem import Problem
from .base import Solution, Solver


def hull_segments(cost: np.ndarray, damage: np.ndarray, start: np.ndarray):
    """Lower-convex-hull upgrades of every item from option ``start`` (vectorised over items).

    Gift wrapping: from the current vertex, the next one is the option with the largest damage saved
    per unit of cost (ties: the cheaper one). Returns arrays ``(item, from, to, ratio)``.
    """
    N, K = cost.shape
    idx = np.arange(N)
    cur = start.copy()
    items, frm, to, ratio = [], [], [], []
    active = np.ones(N, dtype=bool)
    for _ in range(K):
        dc = cost - cost[idx, cur][:, None]
        dd = damage[idx, cur][:, None] - damage
        ok = (dc > 0) & (dd > 0) & np.isfinite(damage) & active[:, None]
        r = np.where(ok, dd / np.where(ok, dc, 1.0), -np.inf)
        best = r.max(axis=1)
        has = np.isfinite(best)
        if not has.any():
            break
        # among options of the best ratio, the cheapest
        nxt = np.argmin(np.where(r >= best[:, None] * (1 - 1e-12), cost, np.inf), axis=1)
        items.append(idx[has])
        frm.append(cur[has])
        to.append(nxt[has])
        ratio.append(best[has])
        cur = np.where(has, nxt, cur)
        active &= has
    if not items:
        e = np.zeros(0, dtype=int)
        return e, e, e, np.zeros(0)
    return tuple(np.concatenate(a) for a in (items, frm, to, ratio))


class GreedySolver(Solver):
    """Greedy by damage saved per unit of budget.

    Parameters
    ----------
    fill:
        After the hull pass, spend the leftover budget on single best changes.
    """

    name = "greedy"

    def __init__(self, *, fill: bool = True):
        self.fill = fill

    def _solve(self, problem: Problem) -> Solution:
        if not problem.constraints:
            return Solution(np.argmin(problem.damage, axis=1), "optimal", "no constraint: least damage everywhere")
        choice = greedy_choice(problem, fill=self.fill)
        if choice is None:
            return Solution(None, "infeasible", "the cheapest plan already breaks a constraint")
        return Solution(choice, "feasible")


def greedy_choice(problem: Problem, fill: bool = True) -> np.ndarray | None:
    """The greedy plan of ``problem`` (option index per item), or ``None`` when even the cheapest
    plan breaks a constraint. The start other solvers warm-start from (ilp, evolutionary, optuna).
    """
    damage = problem.damage
    N, K = damage.shape
    idx = np.arange(N)
    if not problem.constraints:
        return np.argmin(damage, axis=1)
    cm = problem.constraint_matrix()  # [C, N, K]
    caps = problem.caps()
    weights = 1.0 / np.maximum(np.abs(caps), 1e-300)
    cost = np.tensordot(weights, np.where(np.isfinite(cm), cm, 0.0), axes=1)
    cost = np.where(problem.allowed, cost, np.inf)
    start = argmin_lex(cost, damage)
    choice = start.copy()
    used = cm[:, idx, choice].sum(axis=1)
    if np.any(used > caps * (1 + 1e-12) + 1e-12):
        return None
    seg_i, seg_a, seg_b, seg_r = hull_segments(cost, damage, start)
    order = np.lexsort((seg_i, -seg_r))
    deltas = (cm[:, seg_i, seg_b] - cm[:, seg_i, seg_a]).T[order].tolist()
    tol = caps * 1e-12 + 1e-12
    room = (caps + tol - used).tolist()
    C = len(room)
    pick = choice.tolist()
    for i, a, b, delta in zip(seg_i[order].tolist(), seg_a[order].tolist(), seg_b[order].tolist(), deltas):
        if pick[i] == a and all(delta[c] <= room[c] for c in range(C)):
            for c in range(C):
                room[c] -= delta[c]
            pick[i] = b
    choice = np.array(pick)
    used = cm[:, idx, choice].sum(axis=1)
    if fill:
        finite = np.where(np.isfinite(damage), np.abs(damage), 0.0)
        thr = 1e-12 * float(finite.max())
        for _ in range(N * K):
            gain = damage[idx, choice][:, None] - damage  # [N, K]
            delta = cm - cm[:, idx, choice][:, :, None]  # [C, N, K]
            fits = np.all(used[:, None, None] + delta <= (caps + tol)[:, None, None], axis=0)
            gain = np.where(fits & problem.allowed & (gain > thr), gain, -np.inf)
            flat = int(np.argmax(gain))
            if not np.isfinite(gain.flat[flat]):
                break
            i, k = divmod(flat, K)
            used += delta[:, i, k]
            choice[i] = k
    return choice


def argmin_lex(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Per row, the index of the smallest ``primary``, ties broken by the smallest ``secondary``."""
    best = primary.min(axis=1, keepdims=True)
    sec = np.where(primary <= best, secondary, np.inf)
    return np.argmin(sec, axis=1)
