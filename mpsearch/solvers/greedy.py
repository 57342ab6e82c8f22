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


def hull_segments(cost: np.ndarray, damage: np.ndarray, start: int) -> list[tuple[int, int, float]]:
    """Lower-convex-hull upgrades of one item from option ``start``: ``(from, to, ratio)``."""
    order = [k for k in np.lexsort((damage, cost)) if np.isfinite(damage[k])]
    # Pareto points beyond the start: increasing cost, strictly decreasing damage
    pts = [start]
    for k in order:
        if cost[k] >= cost[start] and damage[k] < damage[pts[-1]] and k != start:
            if cost[k] == cost[pts[-1]]:
                pts[-1] = k
            else:
                pts.append(k)
    hull = [pts[0]]
    for k in pts[1:]:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            r_ab = (damage[a] - damage[b]) / (cost[b] - cost[a])
            r_bk = (damage[b] - damage[k]) / (cost[k] - cost[b])
            if r_bk >= r_ab:
                hull.pop()
            else:
                break
        hull.append(k)
    return [
        (a, b, (damage[a] - damage[b]) / (cost[b] - cost[a])) for a, b in zip(hull, hull[1:])
    ]


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
        damage = problem.damage
        N, K = damage.shape
        idx = np.arange(N)
        if not problem.constraints:
            return Solution(np.argmin(damage, axis=1), "optimal", "no constraint: least damage everywhere")
        cm = problem.constraint_matrix()  # [C, N, K]
        caps = problem.caps()
        weights = 1.0 / np.maximum(np.abs(caps), 1e-300)
        cost = np.tensordot(weights, np.where(np.isfinite(cm), cm, 0.0), axes=1)
        cost = np.where(problem.allowed, cost, np.inf)
        start = _argmin_lex(cost, damage)
        choice = start.copy()
        used = cm[:, idx, choice].sum(axis=1)
        if np.any(used > caps * (1 + 1e-12) + 1e-12):
            return Solution(None, "infeasible", "the cheapest plan already breaks a constraint")
        segs = []
        for i in range(N):
            for a, b, r in hull_segments(cost[i], damage[i], int(start[i])):
                segs.append((r, i, a, b))
        segs.sort(key=lambda s: (-s[0], s[1]))
        tol = caps * 1e-12 + 1e-12
        for _, i, a, b in segs:
            if choice[i] != a:
                continue
            delta = cm[:, i, b] - cm[:, i, a]
            if np.all(used + delta <= caps + tol):
                used += delta
                choice[i] = b
        if self.fill:
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
        return Solution(choice, "feasible")


def _argmin_lex(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Per row, the index of the smallest ``primary``, ties broken by the smallest ``secondary``."""
    best = primary.min(axis=1, keepdims=True)
    sec = np.where(primary <= best, secondary, np.inf)
    return np.argmin(sec, axis=1)
