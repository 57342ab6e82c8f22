"""ILP: the one-hot multiple-choice formulation, solved by HiGHS or by CBC through PuLP.

Variables ``x[i, k]`` in {0, 1} for every allowed option k of item i (ties are items already; bounds
and pins are the allowed mask)::

    minimise    sum_ik  d[i, k] x[i, k]
    subject to  sum_k   x[i, k] = 1                 for every item i
                sum_ik  w_c[i, k] x[i, k] <= cap_c   for every constraint c (size, bops, latency...)

Backends: ``"highs"`` (PuLP's HiGHS interface when ``highspy`` is installed, otherwise the HiGHS
that ships inside scipy, through :func:`scipy.optimize.milp`) and ``"cbc"`` (PuLP's bundled CBC).
``"auto"`` picks HiGHS, which is installed wherever scipy is: on 1,000 layers x 8 options with three
constraints it proves optimality in about a second where CBC needs minutes (experiments/).

For numerics each item's damage is measured from its least-damage option and scaled so that the
largest is 1e6 (CBC prunes by an absolute cutoff increment), and each constraint row holds only the
use above the items' cheapest options, divided by the room left. Totals are recomputed from the
table. On a time limit the incumbent is returned with status ``time_limit`` and its gap to the best
bound (the backend's bound, or the LP relaxation's); with CBC the greedy plan is a warm start, so an
incumbent exists. The solve time includes building the model.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from ..errors import MpsearchError
from ..problem import Problem
from ..table import CostTable
from .base import Solution, Solver
from .greedy import greedy_choice

BACKENDS = ("auto", "highs", "cbc")
OBJ_SCALE = 1e6


def _pulp_available() -> list[str]:
    import pulp

    return pulp.listSolvers(onlyAvailable=True)


class ILPSolver(Solver):
    """Integer linear programming over the one-hot multiple-choice model.

    Parameters
    ----------
    backend:
        ``"auto"`` or ``"highs"``: HiGHS (through PuLP when ``highspy`` is installed, else scipy's
        bundled HiGHS); ``"cbc"``: PuLP's CBC.
    time_limit:
        Seconds for the backend (``None``: no limit). On expiry the incumbent is returned with
        status ``time_limit`` and its gap.
    gap_rel:
        Relative optimality gap at which the backend may stop; ``0`` proves optimality. A result
        stopped on a positive gap is reported ``feasible``.
    threads:
        Backend threads (``None``: the backend's default).
    warm_start:
        Start from the greedy plan (CBC only).
    msg:
        Show the backend's log.
    risk:
        Trade expected damage against its spread: minimise ``sum (damage + risk * damage_std)``
        (:func:`risk_adjusted`; needs a ``damage_std`` column). ``0``: expected damage only.
    """

    name = "ilp"
    exact = True

    def __init__(self, *, backend: str = "auto", time_limit: float | None = 60.0, gap_rel: float = 0.0,
                 threads: int | None = None, warm_start: bool = True, msg: bool = False, risk: float = 0.0):
        self.risk = risk
        self.backend = backend
        self.time_limit = time_limit
        self.gap_rel = gap_rel
        self.threads = threads
        self.warm_start = warm_start
        self.msg = msg

    def _check(self):
        if self.backend not in BACKENDS:
            raise MpsearchError(f"ilp: backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise MpsearchError(f"ilp: time_limit must be a positive number of seconds or None, got {self.time_limit!r}")
        if not 0 <= self.gap_rel < 1:
            raise MpsearchError(f"ilp: gap_rel must be in [0, 1), got {self.gap_rel!r}")

    def solve(self, table, budget=None):
        """As :meth:`Solver.solve`; with ``risk > 0`` on the risk-adjusted table, the plan's
        ``predicted`` holding the expected ``damage`` and the objective as ``risk_damage``."""
        if not self.risk:
            return super().solve(table, budget)
        res = super().solve(risk_adjusted(table, self.risk), budget)
        if res.plan is not None:
            mean = table.frame.set_index(["layer", "option"])["damage"]
            res.plan.predicted["risk_damage"] = res.plan.predicted["damage"]
            res.plan.predicted["damage"] = float(sum(mean[(n, res.plan.option_name(n))] for n in res.plan.bits))
        return res

    def solve_problem(self, problem: Problem, budget=None):
        if self.risk and problem.table_metadata.get("risk") != float(self.risk):
            raise MpsearchError(f"ilp risk={self.risk}: solve a table (solver.solve), or compile the problem from "
                                f"mpsearch.solvers.ilp.risk_adjusted(table, {self.risk})")
        return super().solve_problem(problem, budget)

    def _solve(self, problem: Problem) -> Solution:
        self._check()
        t0 = time.perf_counter()
        model = _Model(problem)
        backend = self.backend
        if backend == "auto":
            backend = "highs"
        if backend == "highs":
            if "HiGHS" in _pulp_available():
                choice, status, stats = self._pulp(model, problem, "highs")
            else:
                choice, status, stats = self._scipy(model)
        else:
            choice, status, stats = self._pulp(model, problem, "cbc")
        stats["time_s_backend"] = time.perf_counter() - t0
        if status == "infeasible":
            return Solution(None, "infeasible", "no plan meets all constraints together (proved by the ILP)", stats)
        if status == "time_limit":  # keep the better of the backend's incumbent and the greedy plan

            g = greedy_choice(problem)
            idx = np.arange(problem.n_items)
            if g is not None and problem.is_feasible(g) and (
                choice is None or not problem.is_feasible(choice)
                or problem.damage[idx, g].sum() < problem.damage[idx, choice].sum()
            ):
                choice = g
                stats["incumbent"] = "greedy"
        if choice is None or not problem.is_feasible(choice):
            return Solution(None, "infeasible",
                            f"the ILP backend found no plan within the time limit ({stats.get('backend_status')})", stats)
        if status == "optimal":
            return Solution(choice, "optimal" if self.gap_rel == 0 else "feasible", stats=stats)
        if status == "tolerance":  # HiGHS's optimum broke a cap within its feasibility tolerance
            damage = float(problem.damage[np.arange(problem.n_items), choice].sum())
            gap = max(damage - stats["lower_bound"], 0.0) / max(abs(damage), 1e-300)
            stats["gap"] = gap
            return Solution(choice, "feasible", f"the backend's optimum exceeded a cap within its tolerance; "
                                                f"re-solved with tightened caps (gap <= {gap:.2g})", stats)
        damage = float(problem.damage[np.arange(problem.n_items), choice].sum())
        bound = max(stats.get("lower_bound", -np.inf), lp_relaxation_bound(problem))
        gap = (damage - bound) / max(abs(damage), 1e-300)
        stats.update(lower_bound=bound, gap=gap)
        return Solution(choice, "time_limit", f"stopped at the time limit; gap to the best bound <= {gap:.3g}", stats)

    def _scipy(self, m: "_Model"):
        from scipy.optimize import Bounds, LinearConstraint, milp

        options = {"mip_rel_gap": self.gap_rel, "disp": self.msg}
        if self.time_limit is not None:
            options["time_limit"] = float(self.time_limit)
        b_ub = None if m.b_ub is None else m.b_ub.copy()
        stats = {"backend": "highs (scipy)", "build_s": m.build_s, "variables": len(m.c)}
        best, bound = None, None
        for attempt in range(4):
            cons = [LinearConstraint(m.a_eq, 1, 1)]
            if m.a_ub is not None:
                cons.append(LinearConstraint(m.a_ub, -np.inf, b_ub))
            with _quiet_stdout(not self.msg):  # scipy's HiGHS prints stray debug lines to stdout
                res = milp(m.c, constraints=cons, integrality=np.ones(len(m.c)), bounds=Bounds(0, 1), options=options)
            stats["backend_status"] = res.message
            if res.status == 2:
                break
            choice = m.decode(res.x) if res.x is not None else None
            if res.status != 0:  # time limit: the incumbent and the backend's bound
                if res.x is not None and getattr(res, "mip_dual_bound", None) is not None and bound is None:
                    stats["lower_bound"] = m.unscale(float(res.mip_dual_bound))
                return (best if best is not None else choice), "time_limit", stats
            if attempt == 0:
                bound = m.unscale(float(res.fun))
            if choice is not None and m.problem.is_feasible(choice):
                if attempt == 0:
                    return choice, "optimal", stats
                best = choice
                break
            # HiGHS accepts rows violated within its feasibility tolerance (~1e-7 of the scaled row);
            # tighten the violated rows by twice the violation and solve again
            viol = m.a_ub @ res.x - b_ub
            b_ub = b_ub - np.where(viol > 0, 2 * viol + 1e-12, 0.0)
            stats["tightened"] = attempt + 1
        if best is None and bound is not None:
            last = m.decode(res.x) if res.x is not None else None
            best = one_swap_repair(m.problem, last) if last is not None else None
        if best is None:
            return None, ("infeasible" if res.status == 2 and bound is None else "time_limit"), stats
        stats["lower_bound"] = bound
        return best, "tolerance", stats

    def _pulp(self, m: "_Model", problem: Problem, backend: str):
        import pulp

        t0 = time.perf_counter()
        prob = pulp.LpProblem("mpsearch", pulp.LpMinimize)
        if hasattr(prob, "add_variable"):  # PuLP >= 3.3 attaches variables to the model
            new_var = lambda name: prob.add_variable(name, 0, 1, cat=pulp.LpBinary)  # noqa: E731
        else:
            new_var = lambda name: pulp.LpVariable(name, cat=pulp.LpBinary)  # noqa: E731
        xs = [new_var(f"x_{i}_{k}") for i, k in zip(m.ii.tolist(), m.kk.tolist())]
        prob += pulp.LpAffineExpression(zip(xs, m.c.tolist()))
        starts = np.searchsorted(m.ii, np.arange(problem.n_items + 1))
        for i in range(problem.n_items):
            prob += pulp.LpAffineExpression((x, 1) for x in xs[starts[i]:starts[i + 1]]) == 1, f"one_{i}"
        for c in range(0 if m.a_ub is None else m.a_ub.shape[0]):
            row = m.a_ub[c]
            prob += pulp.LpAffineExpression((xs[j], float(row[j])) for j in np.flatnonzero(row)) <= float(m.b_ub[c]), f"cap_{c}"
        warm = False
        if self.warm_start and backend == "cbc":
            g = greedy_choice(problem)
            if g is not None and problem.is_feasible(g):
                warm = True
                for x, i, k in zip(xs, m.ii, m.kk):
                    x.setInitialValue(1 if g[i] == k else 0)
        kw = {"msg": self.msg, "timeLimit": self.time_limit, "gapRel": self.gap_rel, "threads": self.threads}
        if backend == "highs":
            solver = pulp.HiGHS(**kw)
        else:
            # CBC's preprocessing wrongly fixes variables on some small models (seen: a wrong
            # "optimal" on a 16-variable table); the ILPs here are easy enough without it
            with warnings.catch_warnings():  # PuLP 3.3 deprecates the bundled-CBC class name
                warnings.simplefilter("ignore", DeprecationWarning)
                solver = pulp.PULP_CBC_CMD(warmStart=warm, gapAbs=0, options=["preprocess off"], **kw)
        build_s = m.build_s + time.perf_counter() - t0
        t1 = time.perf_counter()
        prob.solve(solver)
        elapsed = time.perf_counter() - t1
        status = pulp.LpStatus[prob.status]
        stats = {"backend": f"{backend} (pulp)", "build_s": build_s, "variables": len(xs), "backend_status": status}
        if status == "Infeasible":
            return None, "infeasible", stats
        values = np.array([x.varValue if x.varValue is not None else 0.0 for x in xs])
        choice = m.decode(values)
        hit_limit = self.time_limit is not None and elapsed >= 0.98 * self.time_limit
        proved = status == "Optimal" and prob.sol_status == pulp.LpSolutionOptimal and not hit_limit
        return choice, "optimal" if proved else "time_limit", stats


class _Model:
    """The scaled arrays of the one-hot model, shared by the backends."""

    def __init__(self, problem: Problem):
        t0 = time.perf_counter()
        from scipy.sparse import coo_matrix

        allowed = problem.allowed
        self.problem = problem
        self.n_items = problem.n_items
        self.ii, self.kk = np.nonzero(allowed)
        n = len(self.ii)
        d = problem.damage
        self.dmin = np.where(allowed, d, np.inf).min(axis=1)
        rel = d[self.ii, self.kk] - self.dmin[self.ii]
        self.dscale = float(rel.max()) / OBJ_SCALE if n and rel.max() > 0 else 1.0
        self.c = rel / self.dscale
        self.a_eq = coo_matrix((np.ones(n), (self.ii, np.arange(n))), shape=(problem.n_items, n)).tocsr()
        rows, rhs = [], []
        self.integral = []
        for c, w in enumerate(problem.constraint_matrix()):
            use = w[self.ii, self.kk]
            base = np.where(allowed, w, np.inf).min(axis=1)
            extra = use - base[self.ii]
            room = problem.caps()[c] - base.sum()
            g = _common_divisor(extra)
            if g is not None and room >= 0:
                # integer rows: a plan over the cap is over by a whole unit, far beyond the
                # backend's feasibility tolerance, and a plan exactly at the cap stays feasible
                rows.append(np.round(extra / g))
                rhs.append(float(np.floor(room / g * (1 + 1e-12) + 1e-9)))
            else:
                scale = room if room > 0 else 1.0
                rows.append(extra / scale)
                rhs.append(room / scale)
            self.integral.append(g is not None)
        self.a_ub = np.array(rows) if rows else None
        self.b_ub = np.array(rhs) if rhs else None
        self.build_s = time.perf_counter() - t0

    def decode(self, x) -> np.ndarray | None:
        choice = np.full(self.n_items, -1)
        chosen = np.asarray(x) > 0.5
        choice[self.ii[chosen]] = self.kk[chosen]
        return None if (choice < 0).any() else choice

    def unscale(self, objective: float) -> float:
        return objective * self.dscale + float(self.dmin.sum())


def _common_divisor(values: np.ndarray) -> float | None:
    """The greatest common divisor of integer ``values`` (1 when all are 0), or ``None`` when some
    are not integers or the scaled values are too large for exact floating point."""
    r = np.round(values)
    if not np.all(np.abs(values - r) <= 1e-9 * np.maximum(1.0, np.abs(values))) or np.abs(r).max(initial=0) > 2**50:
        return None
    g = int(np.gcd.reduce(r.astype(np.int64))) if len(r) else 1
    return float(g or 1)


def one_swap_repair(problem: Problem, choice: np.ndarray) -> np.ndarray | None:
    """The feasible plan one option change away from ``choice`` that adds the least damage."""
    idx = np.arange(problem.n_items)
    cm = problem.constraint_matrix()
    over = cm[:, idx, choice].sum(axis=1)
    delta = cm - cm[:, idx, choice][:, :, None]  # [C, N, K]
    fits = np.all(over[:, None, None] + delta <= problem.caps()[:, None, None], axis=0) & problem.allowed
    added = np.where(fits, problem.damage - problem.damage[idx, choice][:, None], np.inf)
    if not np.isfinite(added).any():
        return None
    i, k = np.unravel_index(np.argmin(added), added.shape)
    fixed = choice.copy()
    fixed[i] = k
    return fixed if problem.is_feasible(fixed) else None


class _quiet_stdout:
    """Silence file descriptor 1 (C-level prints) while active."""

    def __init__(self, active: bool):
        self.active = active

    def __enter__(self):
        if self.active:
            import os
            import sys

            sys.stdout.flush()
            self.saved = os.dup(1)
            self.null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(self.null, 1)
        return self

    def __exit__(self, *exc):
        if self.active:
            import os

            os.dup2(self.saved, 1)
            os.close(self.saved)
            os.close(self.null)
        return False


def lp_relaxation_bound(problem: Problem) -> float:
    """Least damage of the LP relaxation (x in [0, 1]): a lower bound on every plan's damage."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    allowed = problem.allowed
    ii, kk = np.nonzero(allowed)
    n = len(ii)
    c = problem.damage[ii, kk]
    a_eq = coo_matrix((np.ones(n), (ii, np.arange(n))), shape=(problem.n_items, n))
    cm = problem.constraint_matrix()
    a_ub = np.stack([cm[j][ii, kk] for j in range(len(cm))]) if len(cm) else None
    res = linprog(c, A_ub=a_ub, b_ub=problem.caps() if len(cm) else None, A_eq=a_eq,
                  b_eq=np.ones(problem.n_items), bounds=(0, 1), method="highs")
    return float(res.fun) if res.status == 0 else float("-inf")


# ------------------------------------------------------------------ pairwise terms and risk
def solve_pairwise(problem: Problem, terms, *, time_limit: float | None = 60.0):
    """The one-hot ILP plus pairwise terms: minimise ``sum d[i, k] x[i, k] + sum_(i,j) M[k, l] y[i,k,j,l]``
    with ``y = x[i, k] * x[j, l]`` linearised exactly (``y <= x[i, k]``, ``y <= x[j, l]``,
    ``y >= x[i, k] + x[j, l] - 1``, ``0 <= y <= 1``), under the problem's constraints. ``terms``:
    ``[(i, j, M)]`` with ``M`` a ``[K, K]`` matrix (:func:`mpsearch.interaction.pair_terms`).
    Solved with scipy's HiGHS. Returns a :class:`~mpsearch.solvers.base.Solution`."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix, hstack

    reason = problem.infeasibility()
    if reason:
        return Solution(None, "infeasible", reason)
    m = _Model(problem)
    pos = {(int(i), int(k)): p for p, (i, k) in enumerate(zip(m.ii, m.kk))}
    ys, rows, cols, vals, lo, hi = [], [], [], [], [], []
    nx = len(m.c)
    for i, j, mat in terms:
        for (k, l_), v in np.ndenumerate(np.asarray(mat, dtype=float)):
            if v == 0 or (i, k) not in pos or (j, l_) not in pos:
                continue
            y = nx + len(ys)
            ys.append(v / m.dscale)
            a, b = pos[(i, k)], pos[(j, l_)]
            for coeffs, low, high in (({y: 1, a: -1}, -np.inf, 0), ({y: 1, b: -1}, -np.inf, 0),
                                      ({y: 1, a: -1, b: -1}, -1, np.inf)):
                r = len(lo)
                for col, cv in coeffs.items():
                    rows.append(r); cols.append(col); vals.append(cv)
                lo.append(low); hi.append(high)
    ny = len(ys)
    c = np.concatenate([m.c, np.array(ys)])
    cons = [LinearConstraint(hstack([m.a_eq, coo_matrix((problem.n_items, ny))]), 1, 1)]
    if m.a_ub is not None:
        cons.append(LinearConstraint(hstack([coo_matrix(m.a_ub), coo_matrix((m.a_ub.shape[0], ny))]), -np.inf, m.b_ub))
    if ny:
        cons.append(LinearConstraint(coo_matrix((vals, (rows, cols)), shape=(len(lo), nx + ny)), lo, hi))
    integrality = np.concatenate([np.ones(nx), np.zeros(ny)])
    options = {"time_limit": float(time_limit)} if time_limit else {}
    with _quiet_stdout(True):
        res = milp(c, constraints=cons, integrality=integrality, bounds=Bounds(0, 1), options=options)
    if res.x is None:
        return Solution(None, "infeasible", f"no plan meets all constraints together ({res.message})")
    choice = m.decode(res.x[:nx])
    if choice is None or not problem.is_feasible(choice):
        choice = one_swap_repair(problem, choice) if choice is not None else None
        if choice is None:
            return Solution(None, "infeasible", "the pairwise ILP's solution broke a cap beyond repair")
        return Solution(choice, "feasible", "repaired a cap broken within the backend's tolerance", {"pairs": len(terms)})
    return Solution(choice, "optimal" if res.status == 0 else "time_limit", stats={"pairs": len(terms), "products": ny})


def risk_adjusted(table, risk: float):
    """The table with ``damage + risk * damage_std`` as its damage (the linear risk-averse objective
    ``sum (damage + risk * std)``: a per-choice upper quantile, not ``sum damage + risk * sqrt(sum std^2)``,
    which is not linear). The original damage stays in ``damage_mean``; ``metadata["risk"]`` records ``risk``."""
    if not risk >= 0:
        raise MpsearchError(f"ilp: risk must be a number >= 0, got {risk!r}")
    f = table.to_frame()
    if "damage_std" not in f:
        raise MpsearchError("ilp risk>0 needs a 'damage_std' column in the table: use an estimator that "
                            "reports it (hessian, output-distance, fisher) or risk=0")
    f["damage_mean"] = f["damage"]
    f["damage"] = f["damage"] + float(risk) * f["damage_std"].fillna(0.0)
    return CostTable(f, {**table.metadata, "risk": float(risk)})
