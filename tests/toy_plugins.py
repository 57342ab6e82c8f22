"""Toy third-party solvers, registered by the tests through mpsearch.registry.register, to show that
the shipped conformance suite runs on plugins and catches broken ones."""

import numpy as np

from mpsearch.solvers.base import Solution, Solver
from mpsearch.solvers.greedy import greedy_choice


class ToyGreedy(Solver):
    """A correct heuristic: the greedy plan."""

    name = "toy-greedy"

    def _solve(self, problem):
        choice = greedy_choice(problem)
        return Solution(None, "infeasible", "no plan") if choice is None else Solution(choice, "feasible")


class IgnoresTheBudget(Solver):
    """Broken: the least damage everywhere, whatever the budget."""

    name = "toy-broken"

    def _solve(self, problem):
        return Solution(np.argmin(problem.damage, axis=1), "feasible")


class ClaimsExactness(ToyGreedy):
    """Broken: declares itself exact but is the greedy heuristic."""

    name = "toy-false-exact"
    exact = True

    def _solve(self, problem):
        sol = super()._solve(problem)
        return Solution(sol.choice, "optimal" if sol.choice is not None else sol.status, sol.message)


class IgnoresItsSeed(ToyGreedy):
    """Broken: takes a seed and ignores it."""

    name = "toy-seedless"

    def __init__(self, *, seed: int = 0):
        self.seed = seed


class ToyWeightError(__import__("mpsearch.sensitivity.base", fromlist=["Estimator"]).Estimator):
    """A toy estimator: damage = sum of squared rounding errors (what weight-error computes)."""

    name = "toy-weight-error"

    def _damage(self, model, ctx):
        from mpsearch.sensitivity.base import weight_errors

        return weight_errors(model, ctx)


class ToyInverted(ToyWeightError):
    """Broken: damage inverted per layer (keep costs the most)."""

    name = "toy-inverted"

    def _damage(self, model, ctx):
        d = super()._damage(model, ctx)
        return d.max(axis=1, keepdims=True) - d
