"""Exhaustive: enumerate every plan. The exact oracle for small tables (the tests' ground truth)."""

from __future__ import annotations

import numpy as np

from ..errors import MpsearchError
from ..problem import Problem
from .base import Solution, Solver


class ExhaustiveSolver(Solver):
    """Try every combination of allowed options; least damage wins.

    Ties in damage go to the plan with the smaller summed constraint use, then to the first in
    enumeration order, so the answer is deterministic.

    Parameters
    ----------
    max_combinations:
        Refuse tables with more combinations than this (the work grows as K^N).
    chunk:
        Combinations evaluated per numpy batch.
    """

    name = "exhaustive"
    exact = True

    def __init__(self, *, max_combinations: int = 5_000_000, chunk: int = 1 << 16):
        self.max_combinations = max_combinations
        self.chunk = chunk

    def _solve(self, problem: Problem) -> Solution:
        allowed = [np.flatnonzero(row) for row in problem.allowed]
        radix = np.array([len(a) for a in allowed], dtype=np.int64)
        total = int(np.prod(radix.astype(object)))
        if total > self.max_combinations:
            raise MpsearchError(
                f"exhaustive: the table has {total:.3g} combinations, more than max_combinations="
                f"{self.max_combinations}; use it on small tables only (or solver 'dp'/'ilp')"
            )
        N = problem.n_items
        damage = [problem.damage[i, allowed[i]] for i in range(N)]
        cm = problem.constraint_matrix()
        cons = [[cm[c, i, allowed[i]] for i in range(N)] for c in range(len(cm))]
        caps = problem.caps()
        tol = np.abs(caps) * 1e-9 + 1e-12
        best = (np.inf, np.inf, -1)
        strides = np.cumprod(np.concatenate([[1], radix[:-1]]))
        for lo in range(0, total, self.chunk):
            flat = np.arange(lo, min(total, lo + self.chunk), dtype=np.int64)
            digits = (flat[:, None] // strides[None, :]) % radix[None, :]  # [M, N]
            d = sum(damage[i][digits[:, i]] for i in range(N))
            feasible = np.ones(len(flat), dtype=bool)
            use_sum = np.zeros(len(flat))
            for c in range(len(cons)):
                u = sum(cons[c][i][digits[:, i]] for i in range(N))
                feasible &= u <= caps[c] + tol[c]
                use_sum += u / max(abs(caps[c]), 1e-300)
            if not feasible.any():
                continue
            d = np.where(feasible, d, np.inf)
            dmin = d.min()
            cand = np.flatnonzero(d <= dmin)
            j = cand[np.argmin(use_sum[cand])]
            key = (float(d[j]), float(use_sum[j]), int(flat[j]))
            if key[:2] < best[:2]:
                best = key
        if best[2] < 0:
            return Solution(None, "infeasible", "no combination meets all constraints together")
        digits = (best[2] // strides) % radix
        choice = np.array([allowed[i][digits[i]] for i in range(N)])
        return Solution(choice, "optimal", stats={"combinations": total})
