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

# the greedy plan itself lives beside the problem (sensitivity's stopping rule solves with it too)
from ..problem import argmin_lex, greedy_choice, hull_segments, Problem  # noqa: F401
from .base import Solution, Solver


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
