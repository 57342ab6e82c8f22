"""Frontiers: the non-dominated plans of a table over a range of budgets.

:func:`compute_frontier` asks a solver for plans across budgets of one key (``avg_bits``,
``size_bits``, ``size_mb`` or any numeric column). Solvers that declare ``whole_frontier`` (``dp``:
every point in one pass; ``evolutionary``: one multi-objective run) give all their points at once;
the others are swept over ``points`` evenly spaced budgets between the smallest achievable use and
the use of the least-damage plan. Other constraints, bounds, pins and ties of ``budget`` hold at
every point (a ``single_resource`` solver is then swept instead).

A frontier keeps its points compactly: an integer choice matrix (point x item) and the column sums;
plans are built only when asked for. :meth:`Frontier.write` writes

- the CSV: at most ``max_points`` rows (default :data:`DEFAULT_MAX_POINTS`; the best point under
  each of that many evenly spaced budgets), one per point, sorted by size, with the predicted sums
  (``damage``, ``size_bits``, ``avg_bits``, other cost columns), ``damage_bound`` (a lower bound on
  the damage of any plan of that size, where the solver gives one), measured quality columns
  ``measured_<name>``, the ``budget`` that produced the point, its ``status``, ``index`` (its row in
  the ``.npz``) and ``plan``: the plan's file (relative to the CSV) when ``plans_dir`` is given,
  otherwise the plan's ``bits`` mapping as compact JSON;
- beside it, ``<name>.npz``: every point (``choices``, the sums, statuses, the items and option
  names), read back by :func:`read_points`.

Everything is written to temporary siblings first and moved into place last (the CSV last of all),
so a failure leaves no partial output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .budget import Budget
from .errors import BudgetError, MpsearchError
from .fileio import atomic_dir, atomic_files, atomic_write_text
from .pareto import best_under, column_sums, pareto_indices  # noqa: F401  (re-exported)
from .plan import BitPlan
from .problem import compile_problem, Problem
from .registry import get_solver
from .solvers.base import make_plan
from .table import CostTable

#: swept points when the solver has no one-pass frontier and ``points`` is not given
DEFAULT_POINTS = 20
#: rows written to a frontier CSV by default (every point goes to the .npz beside it)
DEFAULT_MAX_POINTS = 200


def non_dominated(frame, x: str = "size_bits", y: str = "damage"):
    """The rows of ``frame`` that no other row beats on both ``x`` and ``y`` (lower is better),
    sorted by ``x``; of equal points the first is kept."""
    for col in (x, y):
        if col not in frame:
            raise MpsearchError(f"non_dominated: the frame has no column {col!r}; columns: {list(frame.columns)}")
    return frame.iloc[pareto_indices(frame[x].to_numpy(), frame[y].to_numpy())]


class FrontierPoint:
    """One plan of a frontier: its predicted totals, the plan, and measured quality if validated.

    The plan may be given, or built on first access by ``factory()`` (a whole frontier can hold
    thousands of points; their plans are made only when asked for)."""

    def __init__(self, predicted: dict, plan: BitPlan | None = None, *, measured: dict | None = None,
                 budget: str = "", status: str = "", factory=None, bound: float | None = None):
        if plan is None and factory is None:
            raise MpsearchError("a FrontierPoint needs a plan or a factory that makes it")
        self.predicted = dict(predicted)
        self.measured = dict(measured or {})
        self.budget = budget
        self.status = status
        self.bound = bound
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
    budget's other constraints, bounds or pins leave no plan. ``choices`` (point x item option
    indices) and ``problem`` are there when the frontier came from :func:`compute_frontier`."""

    points: list[FrontierPoint]
    key: str = "size_bits"
    solver: str = ""
    status: str = "ok"
    message: str = ""
    stats: dict = field(default_factory=dict)
    choices: np.ndarray | None = None
    problem: Problem | None = None

    def __len__(self) -> int:
        return len(self.points)

    def add_measured(self, index: int, **values: float) -> None:
        """Record measured quality (``accuracy=0.91``, ``perplexity=21.3``) of point ``index``."""
        self.points[index].measured.update({k: float(v) for k, v in values.items()})

    def bits(self, index: int) -> dict[str, int]:
        """Point ``index``'s layer -> bit-width (from the choice matrix, without building its plan)."""
        p = self.points[index]
        if p._plan is not None or self.choices is None or self.problem is None:
            return p.plan.bits
        bits = self.problem.option_bits
        return {m: int(bits[k]) for it, k in zip(self.problem.items, self.choices[index].tolist()) for m in it}

    def thin(self, max_points: int) -> np.ndarray:
        """Indices of at most ``max_points`` points: the best under each of ``max_points`` evenly
        spaced sizes from the smallest to the largest point (all points when there are fewer)."""
        if len(self.points) <= max_points:
            return np.arange(len(self.points))
        size = np.array([p.predicted.get("size_bits", 0.0) for p in self.points])
        damage = np.array([p.predicted["damage"] for p in self.points])
        return best_under(size, damage, np.linspace(size.min(), size.max(), max_points))

    def to_frame(self, plan_refs: list[str] | None = None, rows=None):
        """One row per point (or per index of ``rows``): predicted sums, ``damage_bound``,
        ``measured_*`` columns, budget, status, index and ``plan``."""
        import pandas as pd

        rows = range(len(self.points)) if rows is None else rows
        out = []
        for j, i in enumerate(rows):
            p = self.points[i]
            row = {"point": j}
            row.update({k: v for k, v in p.predicted.items() if k != "params"})
            if p.bound is not None:
                row["damage_bound"] = p.bound
            row.update({f"measured_{k}": v for k, v in p.measured.items()})
            row["budget"] = p.budget
            row["status"] = p.status
            row["index"] = int(i)
            row["plan"] = plan_refs[j] if plan_refs else json.dumps(self.bits(i), separators=(",", ":"))
            out.append(row)
        cols = ["point", "damage", "size_bits", "avg_bits"]
        last = ["budget", "status", "index", "plan"]
        frame = pd.DataFrame(out)
        if frame.empty:
            return pd.DataFrame(columns=cols + last)
        first = [c for c in cols if c in frame]
        return frame[first + [c for c in frame if c not in first + last] + last]

    def write(self, path: str | os.PathLike, plans_dir: str | os.PathLike | None = None,
              max_points: int | None = DEFAULT_MAX_POINTS) -> Path:
        """Write the CSV (at most ``max_points`` rows; ``None``: all), every point into the
        ``.npz`` beside it, and one plan JSON per CSV row into ``plans_dir``; all or nothing."""
        if max_points is not None and (not isinstance(max_points, (int, np.integer)) or max_points < 1):
            raise MpsearchError(f"max_points must be a positive integer or None, got {max_points!r}")
        path = Path(path)

        if path.suffix.lower() == ".npz":
            raise MpsearchError(f"{str(path)!r}: a frontier CSV cannot be named .npz (every point goes to the .npz "
                                f"beside the CSV); give a .csv path such as {str(path.with_suffix('.csv'))!r}")
        rows = self.thin(max_points) if max_points else np.arange(len(self.points))
        npz = self.choices is not None and self.problem is not None
        with contextlib.ExitStack() as stack:  # on an error nothing below is put in place
            # the .npz and the CSV together, after the plans (the stack closes in reverse)
            files = stack.enter_context(atomic_files(*([npz_path(path)] if npz else []), path))
            refs = None
            if plans_dir is not None:
                plans_dir = Path(plans_dir)
                stage = stack.enter_context(atomic_dir(plans_dir))
                refs = []
                for j, i in enumerate(rows):
                    name = f"point_{j:04d}.json"
                    self.points[i].plan.save(stage / name)
                    refs.append(_relative(plans_dir / name, path))
            if npz:
                with open(files[0], "wb") as fh:
                    self._save_npz(fh)
            Path(files[-1]).write_text(self.to_frame(refs, rows).to_csv(index=False), encoding="utf-8")
        return path

    def _save_npz(self, target: Path) -> None:
        pts = self.points
        arrays = {f"sum_{k}": np.array([p.predicted.get(k, np.nan) for p in pts]) for k in pts[0].predicted} if pts else {}
        np.savez(
            target, choices=self.choices, **arrays,
            status=np.array([p.status for p in pts]), budget=np.array([p.budget for p in pts]),
            bound=np.array([np.nan if p.bound is None else p.bound for p in pts]),
            options=np.array(self.problem.option_names),
            items=np.array(json.dumps(self.problem.items)), key=np.array(self.key), solver=np.array(self.solver),
        )


def npz_path(path) -> Path:
    """The ``.npz`` of every point beside a frontier CSV (``f.csv`` -> ``f.npz``)."""
    return Path(path).with_suffix(".npz")


def read_points(path: str | os.PathLike):
    """Every point of a frontier from its ``.npz`` (or the CSV beside it): ``(frame, options)``
    where ``frame`` holds one row per point (sums, ``damage_bound``, status, budget) and
    ``options(i)`` gives point ``i``'s plan as ``{layer: option name}``.

    A file that is not a frontier ``.npz`` as :meth:`Frontier.write` writes it (not a zip of
    arrays, a missing or mis-shaped array, a choice outside the options) is refused in one
    :class:`~mpsearch.errors.MpsearchError` line naming what is wrong."""
    import pandas as pd

    path = npz_path(path)
    if not path.is_file():
        raise MpsearchError(f"{path}: no such frontier file; write one with 'mpsearch frontier'")
    data = _load_npz(path)

    def bad(what: str):
        return MpsearchError(f"{path}: not a frontier file written by mpsearch: {what}; write it again with "
                             f"'mpsearch frontier'")

    missing = [k for k in ("choices", "options", "items", "status", "budget", "bound") if k not in data]
    if missing:
        raise bad(f"it lacks the array(s) {', '.join(repr(k) for k in missing)}")
    choices, options = data["choices"], data["options"]
    if choices.ndim != 2 or choices.dtype.kind not in "iu":
        raise bad(f"'choices' must be a 2-D integer array (points x items), got {choices.dtype} of shape "
                  f"{list(choices.shape)}")
    if options.ndim != 1 or options.dtype.kind != "U" or not len(options):
        raise bad("'options' must be a non-empty 1-D array of option names")
    n = choices.shape[0]
    if choices.size and (choices.min() < 0 or choices.max() >= len(options)):
        raise bad(f"'choices' must index the {len(options)} options, got values from {choices.min()} to "
                  f"{choices.max()}")
    items = data["items"]
    try:
        items = json.loads(str(items)) if items.ndim == 0 and items.dtype.kind == "U" else None
    except (ValueError, RecursionError):
        items = None
    if (not isinstance(items, list) or len(items) != choices.shape[1]
            or not all(isinstance(it, list) and it and all(isinstance(m, str) for m in it) for it in items)):
        raise bad(f"'items' must be a JSON list of {choices.shape[1]} lists of layer names")
    columns = {}
    for key in sorted(data):
        if key == "bound" or key.startswith("sum_"):
            kinds, what = "fiu", "numbers"
        elif key in ("status", "budget"):
            kinds, what = "U", "text"
        else:
            continue
        arr = data[key]
        if arr.ndim != 1 or len(arr) != n or (n and arr.dtype.kind not in kinds):
            raise bad(f"{key!r} must hold {what}, one per point ({n}), got {arr.dtype} of shape {list(arr.shape)}")
        columns[key] = arr
    frame = pd.DataFrame({k[4:]: v for k, v in columns.items() if k.startswith("sum_")}, index=pd.RangeIndex(n))
    frame["damage_bound"], frame["status"], frame["budget"] = columns["bound"], columns["status"], columns["budget"]
    options = options.tolist()

    def plan_options(i: int) -> dict[str, str]:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n:
            raise MpsearchError(f"{path}: point {i!r} does not exist; the frontier has points 0 to {n - 1}")
        return {m: options[int(k)] for it, k in zip(items, choices[i]) for m in it}

    return frame, plan_options


def _load_npz(path: Path) -> dict:
    """The arrays of an ``.npz`` (no pickled objects), or a one-line MpsearchError."""
    try:
        with open(path, "rb") as fh:
            z = np.load(fh, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError(f"it holds one {type(z).__name__}, not a zip of arrays")
            with z:
                return {k: z[k] for k in z.files}
    except MemoryError:
        raise MpsearchError(f"{path}: the frontier file is too large to read") from None
    except Exception as exc:  # noqa: BLE001 - numpy and zipfile raise many kinds on a damaged file
        text = " ".join(str(exc).split())[:200]
        raise MpsearchError(f"{path}: cannot be read as a frontier file ({type(exc).__name__}: {text}); write it "
                            f"again with 'mpsearch frontier'") from None


def _relative(target: Path, csv: Path) -> str:
    try:
        return os.path.relpath(target, csv.parent.resolve() if csv.parent != Path("") else Path.cwd())
    except ValueError:  # another drive
        return str(target.resolve())


def compute_frontier(table: CostTable, solver="dp", points: int | None = None, key: str = "avg_bits",
                     budget: Budget | None = None) -> Frontier:
    """The frontier of ``table`` over budgets of ``key``, from ``solver`` (a name or a Solver).

    ``points``: for whole-frontier solvers, the best plan under each of ``points`` evenly spaced
    budgets (``None``: every point; ``dp`` proves each such point optimal); for the others, the
    number of budgets swept (default 20). ``budget``: other constraints, bounds, pins and ties that
    every point meets.
    """
    if isinstance(solver, str):
        solver = get_solver(solver)
    if points is not None and (not isinstance(points, (int, np.integer)) or points < 1):
        raise MpsearchError(f"points must be a positive integer, got {points!r}")
    budget = budget or Budget()
    if key in budget.constraints:
        raise BudgetError(f"the frontier sweeps {key}; drop it from the budget (the other constraints stay)")
    problem = compile_problem(table, budget.with_constraints(**{key: 1e300}))
    j = next(i for i, c in enumerate(problem.constraints) if c.key == key)
    con = problem.constraints[j]
    others = dataclasses.replace(problem, constraints=[c for i, c in enumerate(problem.constraints) if i != j])
    reason = others.infeasibility()
    if reason:
        return Frontier([], key, solver.name, "infeasible", reason)
    lo, hi = sweep_range(problem, con.column)
    one_pass = getattr(solver, "whole_frontier", False) and not (
        getattr(solver, "single_resource", False) and others.constraints)
    if one_pass:
        grid = np.linspace(lo, hi, points) if points is not None else None
        fr = solver.frontier(problem, con.column, budgets=grid)
        n = len(fr["cost"])
        results = (np.asarray(fr["choices"]), fr.get("status", np.full(n, "feasible")),
                   fr.get("bound", np.full(n, np.nan)))
        stats = dict(fr.get("stats", {}))
    else:
        results, stats = _sweep(problem, j, solver, budget, np.linspace(lo, hi, points or DEFAULT_POINTS)), {}
    if not len(results[0]):
        return Frontier([], key, solver.name, "infeasible", "the solver found no plan for any budget of the sweep")
    return _build(problem, con, key, solver, budget, results, stats=stats)


def sweep_range(problem: Problem, column: str) -> tuple[float, float]:
    """The smallest achievable sum of ``column`` and the sum of the least-damage plan (cheapest)."""
    w = problem.resources[column]
    lo = float(np.where(problem.allowed, w, np.inf).min(axis=1).sum())
    best = np.where(problem.damage <= problem.damage.min(axis=1, keepdims=True), w, np.inf)
    return lo, float(best.min(axis=1).sum())


def _sweep(problem: Problem, j: int, solver, budget: Budget, caps):
    """Solve once per cap of constraint ``j``: (choices, statuses, bounds) of the plans found."""
    con = problem.constraints[j]
    index = {name: k for k, name in enumerate(problem.option_names)}
    choices, statuses = [], []
    for v in caps:
        cons = list(problem.constraints)
        cons[j] = dataclasses.replace(con, cap=float(v))
        res = solver.solve_problem(dataclasses.replace(problem, constraints=cons),
                                   budget.with_constraints(**{con.key: con.to_user(v)}))
        if res.plan is not None:
            choices.append([index[res.plan.options[m[0]]["name"]] for m in problem.items])
            statuses.append(res.status)
    ch = np.array(choices, dtype=_choice_dtype(problem)).reshape(len(choices), problem.n_items)
    return ch, np.array(statuses), np.full(len(choices), np.nan)


def _choice_dtype(problem: Problem):
    return np.uint8 if problem.n_options < 256 else np.int32


def _build(problem, con, key, solver, budget, results, *, stats) -> Frontier:
    """The Frontier of the non-dominated rows of ``choices``, sorted by size (``results``: the swept
    ``(choices, statuses, bounds)``)."""
    choices, statuses, bounds = results
    choices = np.asarray(choices).astype(_choice_dtype(problem), copy=False)
    sums = column_sums({"damage": problem.damage, **problem.resources}, choices)
    keep = pareto_indices(sums[con.column], sums["damage"])
    if "size_bits" in sums:  # sorted by size (equal to the swept order unless another key is swept)
        keep = keep[np.lexsort((sums["damage"][keep], sums["size_bits"][keep]))]
    choices = choices[keep]
    if problem.total_params and "size_bits" in sums:
        sums["avg_bits"] = sums["size_bits"] / problem.total_params
    names = list(sums)
    rows = zip(*(sums[c][keep].tolist() for c in names))
    used = (sums[con.column][keep] / con.unit_scale).tolist()
    bounds = [None if b != b else b for b in np.asarray(bounds, dtype=float)[keep].tolist()]

    def factory(j, status, used):
        plan = make_plan(problem, choices[j].astype(int), solver=solver, budget=budget, status=status)
        plan.provenance["budget"]["constraints"][key] = used
        return plan

    pts = [FrontierPoint(dict(zip(names, row)), budget=f"{key}<={u:.6g}", status=st, bound=b,
                         factory=functools.partial(factory, j, st, u))
           for j, (row, u, st, b) in enumerate(zip(rows, used, np.asarray(statuses)[keep].tolist(), bounds))]
    return Frontier(pts, key, solver.name, stats=stats, choices=choices, problem=problem)
