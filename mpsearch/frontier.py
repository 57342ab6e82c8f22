"""Frontiers: the non-dominated plans of a table over a range of budgets.

:func:`compute_frontier` asks a solver for plans across budgets of one key (``avg_bits``,
``size_bits``, ``size_mb`` or any numeric column). Solvers with a ``frontier(problem, column)``
method (``dp``: the exact frontier in one pass; ``evolutionary``: one multi-objective run) give all
their points at once; the others are swept over ``points`` evenly spaced budgets between the
smallest achievable use and the use of the least-damage plan. Other constraints, bounds, pins and
ties of ``budget`` hold at every point.

The CSV contract (:meth:`Frontier.write`): one row per non-dominated point, sorted by size, with the
predicted sums (``damage``, ``size_bits``, ``avg_bits``, other cost columns), measured quality columns
``measured_<name>`` where points were validated, the ``budget`` that produced the point, and
``plan``: the plan's file (relative to the CSV) when ``plans_dir`` is given, otherwise the plan's
``bits`` mapping as compact JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .budget import Budget
from .errors import BudgetError, MpsearchError
from .fileio import atomic_write_text
from .plan import BitPlan
from .problem import compile_problem
from .table import CostTable

#: swept points when the solver has no one-pass frontier and ``points`` is not given
DEFAULT_POINTS = 20


class FrontierPoint:
    """One plan of a frontier: its predicted totals, the plan, and measured quality if validated.

    The plan may be given, or built on first access by ``factory()`` (a whole frontier can hold
    thousands of points; their plans are made only when asked for)."""

    def __init__(self, predicted: dict, plan: BitPlan | None = None, *, measured: dict | None = None,
                 budget: str = "", status: str = "", factory=None):
        if plan is None and factory is None:
            raise MpsearchError("a FrontierPoint needs a plan or a factory that makes it")
        self.predicted = dict(predicted)
        self.measured = dict(measured or {})
        self.budget = budget
        self.status = status
        self._plan = plan
        self._factory = factory

    @property
    def plan(self) -> BitPlan:
        if self._plan is None:
            self._plan = self._factory()
        return self._plan

    def __repr__(self) -> str:
        return f"FrontierPoint(predicted={self.predicted}, budget={self.budget!r}, measured={self.measured})"


@dataclass
class Frontier:
    """Non-dominated plans sorted by size. ``status`` is ``infeasible`` (with ``message``) when the
    budget's other constraints, bounds or pins leave no plan."""

    points: list[FrontierPoint]
    key: str = "size_bits"
    solver: str = ""
    status: str = "ok"
    message: str = ""
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.points)

    def add_measured(self, index: int, **values: float) -> None:
        """Record measured quality (``accuracy=0.91``, ``perplexity=21.3``) of point ``index``."""
        self.points[index].measured.update({k: float(v) for k, v in values.items()})

    def to_frame(self, plan_refs: list[str] | None = None):
        """One row per point: predicted sums, ``measured_*`` columns, budget, status and ``plan``."""
        import pandas as pd

        rows = []
        for i, p in enumerate(self.points):
            row = {"point": i}
            row.update({k: v for k, v in p.predicted.items() if k != "params"})
            row.update({f"measured_{k}": v for k, v in p.measured.items()})
            row["budget"] = p.budget
            row["status"] = p.status
            row["plan"] = plan_refs[i] if plan_refs else json.dumps(p.plan.bits, separators=(",", ":"))
            rows.append(row)
        cols = ["point", "damage", "size_bits", "avg_bits"]
        frame = pd.DataFrame(rows)
        if frame.empty:
            return pd.DataFrame(columns=cols + ["budget", "status", "plan"])
        first = [c for c in cols if c in frame]
        last = ["budget", "status", "plan"]
        return frame[first + [c for c in frame if c not in first + last] + last]

    def write(self, path: str | os.PathLike, plans_dir: str | os.PathLike | None = None) -> Path:
        """Write the CSV (and one plan JSON per point into ``plans_dir``), atomically."""
        path = Path(path)
        refs = None
        if plans_dir is not None:
            from .fileio import atomic_dir

            plans_dir = Path(plans_dir)
            refs = []
            with atomic_dir(plans_dir) as stage:  # the folder appears whole, then the CSV
                for i, p in enumerate(self.points):
                    p.plan.save(stage / f"point_{i:04d}.json")
            for i, _p in enumerate(self.points):
                f = plans_dir / f"point_{i:04d}.json"
                try:
                    refs.append(os.path.relpath(f, path.parent.resolve() if path.parent != Path("") else Path.cwd()))
                except ValueError:  # another drive
                    refs.append(str(f.resolve()))
        atomic_write_text(path, self.to_frame(refs).to_csv(index=False))
        return path


def non_dominated(frame, x: str = "size_bits", y: str = "damage"):
    """The rows of ``frame`` that no other row beats on both ``x`` and ``y`` (lower is better),
    sorted by ``x``; of equal points the first is kept."""
    for col in (x, y):
        if col not in frame:
            raise MpsearchError(f"non_dominated: the frame has no column {col!r}; columns: {list(frame.columns)}")
    return frame.iloc[_pareto_indices(frame[x].to_numpy(), frame[y].to_numpy())]


def _pareto_indices(cost: np.ndarray, damage: np.ndarray) -> np.ndarray:
    order = np.lexsort((damage, cost))
    d = damage[order]
    prev = np.r_[np.inf, np.minimum.accumulate(d)[:-1]]
    return order[d < prev]


def compute_frontier(table: CostTable, solver="dp", points: int | None = None, key: str = "avg_bits",
                     budget: Budget | None = None) -> Frontier:
    """The frontier of ``table`` over budgets of ``key``, from ``solver`` (a name or a Solver).

    ``points``: for one-pass solvers, thin the whole frontier to the best plan under each of
    ``points`` evenly spaced budgets (``None``: every point); for the others, the number of budgets
    swept (default 20). ``budget``: other constraints, bounds, pins and ties that every point meets.
    """
    from .registry import get_solver
    from .solvers.base import make_plan

    if isinstance(solver, str):
        solver = get_solver(solver)
    if points is not None and (not isinstance(points, (int, np.integer)) or points < 1):
        raise MpsearchError(f"points must be a positive integer, got {points!r}")
    budget = budget or Budget()
    if key in budget.constraints:
        raise BudgetError(
            f"the frontier sweeps {key}; drop it from the budget (the other constraints stay)"
        )
    loose = budget.with_constraints(**{key: 1e300})
    problem = compile_problem(table, loose)
    j = next(i for i, c in enumerate(problem.constraints) if c.key == key)
    con = problem.constraints[j]
    others = dataclasses.replace(problem, constraints=[c for i, c in enumerate(problem.constraints) if i != j])
    reason = others.infeasibility()
    if reason:
        return Frontier([], key, solver.name, "infeasible", reason)
    w = problem.resources[con.column]
    lo = float(np.where(problem.allowed, w, np.inf).min(axis=1).sum())
    idx = np.arange(problem.n_items)
    best = np.where(problem.damage <= problem.damage.min(axis=1, keepdims=True), w, np.inf)
    hi = float(best.min(axis=1).sum())
    results = []  # (choice, budget label, status)
    one_pass = hasattr(solver, "frontier") and not (solver.name == "dp" and others.constraints)
    stats = {}
    if one_pass:
        fr = solver.frontier(problem, con.column)
        stats = dict(fr.get("stats", {}))
        choices, cost = fr["choices"], fr["cost"]
        if points is not None:
            picks = []
            for v in np.linspace(lo, hi, points):
                ok = np.flatnonzero(cost <= v * (1 + 1e-12) + 1e-9)
                if len(ok):
                    picks.append(ok[np.argmin(fr["damage"][ok])])
            sel = sorted(set(picks))
        else:
            sel = range(len(cost))
        for s in sel:
            results.append((np.asarray(choices[s], dtype=int), f"{key}<={con.to_user(cost[s]):.6g}", "optimal" if stats.get("mode") == "exact" else "feasible"))
    else:
        for v in np.linspace(lo, hi, points or DEFAULT_POINTS):
            caps = list(problem.constraints)
            caps[j] = dataclasses.replace(con, cap=float(v))
            sub = dataclasses.replace(problem, constraints=caps)
            res = solver.solve_problem(sub, budget.with_constraints(**{key: con.to_user(v)}))
            if res.plan is not None:
                choice = np.array([problem.option_names.index(res.plan.options[m[0]]["name"]) for m in problem.items])
                results.append((choice, f"{key}<={con.to_user(v):.6g}", res.status))
    if not results:
        return Frontier([], key, solver.name, "infeasible", "the solver found no plan for any budget of the sweep")
    all_choices = np.array([c for c, _, _ in results])
    sums = {"damage": problem.damage[idx, all_choices].sum(axis=1)}
    for col, mat in problem.resources.items():
        sums[col] = mat[idx, all_choices].sum(axis=1)
    cost, damage = sums[con.column], sums["damage"]
    pts = []
    for i in _pareto_indices(cost, damage):
        choice, label, status = results[i]
        used = con.to_user(cost[i])

        def factory(choice=choice, status=status, used=used):
            plan = make_plan(problem, choice, solver=solver, budget=budget, status=status)
            plan.provenance["budget"]["constraints"][key] = used
            return plan

        predicted = {col: float(v[i]) for col, v in sums.items()}
        if problem.total_params and "size_bits" in predicted:
            predicted["avg_bits"] = predicted["size_bits"] / problem.total_params
        pts.append(FrontierPoint(predicted, budget=label, status=status, factory=factory))
    size = np.array([p.predicted.get("size_bits", 0.0) for p in pts])
    order = np.lexsort((np.array([p.predicted["damage"] for p in pts]), size))
    return Frontier([pts[i] for i in order], key, solver.name, stats=stats)
