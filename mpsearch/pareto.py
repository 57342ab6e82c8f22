"""Pareto arithmetic on plain arrays: the one non-dominated filter, the best point under each
budget, and per-plan sums of [item, option] matrices. NumPy only; shared by the solvers (dp,
evolutionary), :mod:`mpsearch.frontier` (which sweeps them) and :mod:`mpsearch.synthetic`, below all
of them in the layer contract (tests/test_seams.py)."""

from __future__ import annotations

import numpy as np


def pareto_indices(cost, damage) -> np.ndarray:
    """Indices of the non-dominated points (lower ``cost`` and lower ``damage`` are better), sorted
    by cost; of equal points the first is kept. The one Pareto filter of the package."""
    cost, damage = np.asarray(cost, dtype=float), np.asarray(damage, dtype=float)
    order = np.lexsort((damage, cost))
    d = damage[order]
    prev = np.r_[np.inf, np.minimum.accumulate(d)[:-1]]
    return order[d < prev]


def best_under(cost, damage, budgets) -> np.ndarray:
    """For each budget, the index of the least-damage point whose cost fits it (budgets no point
    fits are skipped); unique indices, sorted."""
    cost, damage = np.asarray(cost, dtype=float), np.asarray(damage, dtype=float)
    picks = []
    for v in np.asarray(budgets, dtype=float):
        ok = np.flatnonzero(cost <= v * (1 + 1e-12) + 1e-9)
        if len(ok):
            picks.append(ok[np.argmin(damage[ok])])
    return np.unique(np.asarray(picks, dtype=np.int64))


def column_sums(mats: dict[str, np.ndarray], choices: np.ndarray) -> dict[str, np.ndarray]:
    """Each [item, option] matrix of ``mats`` summed over items, per row of ``choices`` [P, N]
    (item by item, so memory stays proportional to the number of points)."""
    cols = np.ascontiguousarray(np.asarray(choices).T)  # one contiguous row per item
    sums = {k: np.zeros(cols.shape[1]) for k in mats}
    for i, col in enumerate(cols):
        for k, m in mats.items():
            sums[k] += m[i].take(col)
    return sums
