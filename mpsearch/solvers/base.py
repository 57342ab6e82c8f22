"""The solver interface: CostTable + Budget -> SolveResult(BitPlan).

A solver implements one method, :meth:`Solver._solve`, on a compiled :class:`~mpsearch.problem.Problem`
(dense arrays; ties merged into items, bounds and pins as a mask) and returns the chosen option index
per item. The base class checks the inputs, reports infeasible budgets as a status naming the
smallest achievable value, times the work, and builds the plan with its predicted totals and
provenance. Constructors only store settings (scikit-learn style), so ``get_params()`` can be written
into the plan's provenance.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import numpy as np

from .. import __version__
from ..budget import Budget
from ..errors import MpsearchError
from ..options import parse_option
from ..plan import BitPlan
from ..problem import compile_problem, Problem
from ..table import CostTable

STATUSES = ("optimal", "feasible", "infeasible", "time_limit")


@dataclass
class SolveResult:
    """What a solver returns: a plan (``None`` when infeasible) and how it went."""

    plan: BitPlan | None
    status: str
    message: str = ""
    stats: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.plan is not None and self.status in ("optimal", "feasible", "time_limit")

    def __repr__(self) -> str:
        dmg = self.plan.predicted.get("damage") if self.plan else None
        return f"SolveResult(status={self.status!r}, damage={dmg}, message={self.message!r})"


@dataclass
class Solution:
    """What :meth:`Solver._solve` returns."""

    choice: np.ndarray | None
    status: str = "feasible"
    message: str = ""
    stats: dict = field(default_factory=dict)


class Solver:
    """Base class. Subclasses set ``name`` and their abilities and implement :meth:`_solve`."""

    name = "base"
    #: a result with status ``optimal`` is proved optimal (the conformance suite compares the
    #: solver with the exhaustive oracle); a result it cannot prove has another status
    exact = False
    #: the solver takes one budget constraint only (several raise an error naming the alternatives)
    single_resource = False
    #: ``frontier(problem, column, budgets=None)`` gives many non-dominated points in one run
    whole_frontier = False

    def get_params(self) -> dict:
        sig = inspect.signature(type(self).__init__)
        return {p: getattr(self, p) for p in sig.parameters if p != "self" and hasattr(self, p)}

    def solve(self, table: CostTable, budget: Budget | None = None) -> SolveResult:
        if not isinstance(table, CostTable):
            raise MpsearchError(
                f"solve() takes a CostTable, got {type(table).__name__}; build one with "
                f"CostTable(frame) or CostTable.read(path)"
            )
        budget = budget or Budget()
        problem = compile_problem(table, budget)
        return self.solve_problem(problem, budget)

    def solve_problem(self, problem: Problem, budget: Budget | None = None) -> SolveResult:
        budget = budget or Budget()
        t0 = time.perf_counter()
        reason = problem.infeasibility()
        if reason:
            return SolveResult(None, "infeasible", reason, {"time_s": time.perf_counter() - t0})
        sol = self._solve(problem)
        elapsed = time.perf_counter() - t0
        stats = {"time_s": elapsed, **sol.stats}
        if sol.choice is None:
            msg = sol.message or (
                "no plan meets all constraints together (each can be met on its own)"
            )
            return SolveResult(None, "infeasible", msg, stats)
        choice = np.asarray(sol.choice, dtype=int)
        if not problem.is_feasible(choice):
            raise AssertionError(f"solver {self.name} returned a plan that breaks the budget")
        plan = make_plan(problem, choice, solver=self, budget=budget, status=sol.status)
        return SolveResult(plan, sol.status, sol.message, stats)

    def _solve(self, problem: Problem) -> Solution:  # pragma: no cover - interface
        raise NotImplementedError


def make_plan(problem: Problem, choice, *, solver=None, budget: Budget | None = None, status="") -> BitPlan:
    """Turn a choice vector into a BitPlan with predicted totals and provenance."""
    names = problem.decode(choice)
    bits_by_option = dict(zip(problem.option_names, problem.option_bits.tolist()))

    described: dict[str, dict | None] = {}  # one description per option name, copied per layer
    for opt in set(names.values()):
        try:
            described[opt] = {**parse_option(opt).to_dict(), "name": opt}
        except ValueError:  # a bare bit-width no option stores (a solver-only table): the plan gives bits only
            described[opt] = None
    options = {layer: dict(described[opt]) for layer, opt in names.items() if described[opt] is not None}
    predicted = problem.totals(choice)
    provenance = {
        "mpsearch": __version__,
        "solver": getattr(solver, "name", str(solver)),
        "solver_params": solver.get_params() if hasattr(solver, "get_params") else {},
        "status": status,
        "budget": (budget or Budget()).to_dict(),
        "table": {k: problem.table_metadata.get(k) for k in ("estimator", "model", "data", "fingerprint", "target", "quantizer", "rounding", "imatrix", "coverage")
                  if k in problem.table_metadata},
    }
    if problem.file:  # a budget in the user's words: how the consumer must write the file it counted
        provenance["file"] = {k: problem.file[k] for k in ("consumer", "base", "command") if k in problem.file}
    return BitPlan(
        bits={layer: bits_by_option[o] for layer, o in names.items()},
        options=options,
        predicted=predicted,
        provenance=provenance,
    )
