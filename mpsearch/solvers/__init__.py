"""Solvers: CostTable + Budget -> SolveResult(BitPlan). See :mod:`mpsearch.solvers.base`."""

from ..registry import get_solver, solver_names
from .base import SolveResult, Solution, Solver, make_plan

__all__ = ["SolveResult", "Solution", "Solver", "get_solver", "make_plan", "solver_names"]
