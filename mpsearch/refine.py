"""Closed-loop refinement: measured plans recalibrate the table, or steer a measured local search.

The cost table is a hypothesis (an additive per-layer model of the loss); measured quality is the
verdict. Two methods act on what was measured, each within a stated number of measured plans:

- :func:`calibrate` (``method="calibrate"``): the additive model ``loss(plan) ~= sum_g a_g t_g(plan)``
  with ``t_g`` the predicted damage of the layers of group ``g`` (a layer type such as
  ``self_attn.q_proj``, or each layer) under the plan. The multipliers ``a_g >= 0`` are fitted by
  non-negative least squares (:func:`scipy.optimize.nnls`) to the measured losses of every plan
  measured so far (uniform ones included); the table's damage is rescaled by them and the budget
  solved again. HIGGS's linearity theorem (Malinovskii et al., arXiv 2411.17525) is why a linear
  model of per-layer errors predicts the loss of a whole plan. A small ridge toward the single
  best-fitting scalar (``ridge``) keeps under-determined groups at a sensible scale.
- :func:`local_search` (``method="local"``): from the best measured plan that fits, measure the
  ``swaps`` most promising equal-size moves (one item up an option, another down, or one item up
  when there is room; ranked by their predicted damage change) and keep the best one if it
  measured better. ExLlamaV3's optimizer does this with measured KL differences. It never returns
  a plan worse than its start.

:func:`refine` runs ``rounds`` rounds of one method, or of both (``"both"``: a calibration step and
then local moves each round), over every target budget, and logs the measured gain per round and
the evaluations spent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .budget import Budget
from .errors import MpsearchError
from .plan import BitPlan
from .problem import Problem, compile_problem
from .table import CostTable

METHODS = ("calibrate", "local", "both")


def layer_type(name: str) -> str:
    """The layer's type: its name with the block indices dropped (``model.layers.3.mlp.up_proj`` ->
    ``model.layers.*.mlp.up_proj``)."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


def _group_of(table: CostTable, groups) -> dict[str, str]:
    if groups == "type":
        return {n: layer_type(n) for n in table.layers}
    if groups == "layer":
        return {n: n for n in table.layers}
    if groups == "one":
        return {n: "all" for n in table.layers}
    if callable(groups):
        return {n: str(groups(n)) for n in table.layers}
    raise MpsearchError(f"calibration groups must be 'type', 'layer', 'one' or a callable, got {groups!r}")


def plan_features(table: CostTable, plans, group_of: dict[str, str]) -> tuple[np.ndarray, list[str]]:
    """``[n_plans, n_groups]``: each group's predicted damage summed over its layers under each plan."""
    names = list(dict.fromkeys(group_of[n] for n in table.layers))
    gi = {g: j for j, g in enumerate(names)}
    dmg = table.frame.set_index(["layer", "option"])["damage"]
    x = np.zeros((len(plans), len(names)))
    for r, plan in enumerate(plans):
        for layer in table.layers:
            x[r, gi[group_of[layer]]] += float(dmg[(layer, plan.option_name(layer))])
    return x, names


@dataclass
class Calibration:
    """Fitted multipliers, group by group, and the fit's residual."""

    multipliers: dict[str, float]
    group_of: dict[str, str]
    residual: float
    plans: int

    def apply(self, table: CostTable) -> CostTable:
        """The table with each layer's damage (and ``damage_std``) scaled by its group's multiplier."""
        f = table.to_frame()
        scale = f["layer"].map(lambda n: self.multipliers[self.group_of[n]]).to_numpy(dtype=float)
        for col in [c for c in f.columns if c.startswith("damage")]:
            f[col] = f[col].to_numpy(dtype=float) * scale
        meta = dict(table.metadata)
        meta["calibration"] = {"multipliers": self.multipliers, "plans": self.plans, "residual": self.residual}
        return CostTable(f, meta)


def calibrate(table: CostTable, plans, losses, *, groups="type", ridge: float = 1e-3) -> Calibration:
    """Fit per-group damage multipliers ``a_g >= 0`` so that ``sum_g a_g t_g(plan)`` matches the
    measured ``losses`` of ``plans`` (non-negative least squares; ``ridge`` pulls each multiplier
    toward the single best scalar, relative to the data's scale; ``ridge=0``: plain NNLS)."""
    from scipy.optimize import nnls

    plans, y = list(plans), np.asarray(losses, dtype=float)
    if len(plans) != len(y) or not len(plans):
        raise MpsearchError(f"calibrate needs one measured loss per plan, got {len(plans)} plans and {len(y)} losses")
    if not np.all(np.isfinite(y)):
        raise MpsearchError("calibrate: the measured losses must be finite numbers")
    if ridge < 0:
        raise MpsearchError(f"calibrate: ridge must be >= 0, got {ridge}")
    group_of = _group_of(table, groups)
    x, names = plan_features(table, plans, group_of)
    tot = x.sum(axis=1)
    scalar = float(max(tot @ y, 0.0) / (tot @ tot)) if tot @ tot > 0 else 1.0
    a, rhs = x, y
    if ridge > 0:
        lam = np.sqrt(ridge * float((x ** 2).sum()) / len(names))
        a = np.vstack([x, lam * np.eye(len(names))])
        rhs = np.concatenate([y, lam * scalar * np.ones(len(names))])
    alpha, _ = nnls(a, rhs, maxiter=50 * max(len(names), 10))
    resid = float(np.linalg.norm(x @ alpha - y))
    return Calibration({g: float(v) for g, v in zip(names, alpha)}, group_of, resid, len(plans))


# ---------------------------------------------------------------------------------- local search
def _ranked_options(problem: Problem, size: np.ndarray) -> list[np.ndarray]:
    """Per item, its allowed options sorted by size (then damage)."""
    out = []
    for i in range(problem.n_items):
        ks = np.flatnonzero(problem.allowed[i])
        out.append(ks[np.lexsort((problem.damage[i, ks], size[i, ks]))])
    return out


def candidate_moves(problem: Problem, choice, column: str = "size_bits", cap: float | None = None,
                    limit: int = 4, exclude=()) -> list[tuple[float, np.ndarray]]:
    """The ``limit`` most promising moves from ``choice`` that keep ``column``'s sum within ``cap``
    (default: the current sum) and every other constraint: one item one option up with another one
    down, or one item up where there is room. Ranked by predicted damage change (ties: the order of
    the items); ``exclude``: choices not to propose. Returns ``[(predicted change, new choice)]``."""
    choice = np.asarray(choice, dtype=int)
    size = problem.resources[column]
    idx = np.arange(problem.n_items)
    used = float(size[idx, choice].sum())
    cap = used if cap is None else float(cap)
    ranked = _ranked_options(problem, size)
    pos = [int(np.flatnonzero(r == c)[0]) for r, c in zip(ranked, choice)]
    ups = [(i, ranked[i][pos[i] + 1]) for i in idx if pos[i] + 1 < len(ranked[i])]
    downs = [(j, ranked[j][pos[j] - 1]) for j in idx if pos[j] > 0]
    d0 = problem.damage[idx, choice]
    cands = []
    tol = 1e-9 * max(abs(cap), 1.0)
    for i, ki in ups:
        du, su = problem.damage[i, ki] - d0[i], size[i, ki] - size[i, choice[i]]
        if used + su <= cap + tol:
            cands.append((du, ((i, ki),)))
        for j, kj in downs:
            if j == i:
                continue
            ds = size[j, kj] - size[j, choice[j]]
            if used + su + ds <= cap + tol:
                cands.append((du + problem.damage[j, kj] - d0[j], ((i, ki), (j, kj))))
    cands.sort(key=lambda c: c[0])
    seen = {tuple(np.asarray(e, dtype=int)) for e in exclude}
    out = []
    for delta, moves in cands:
        new = choice.copy()
        for i, k in moves:
            new[i] = k
        key = tuple(new)
        if key in seen or not problem.is_feasible(new):
            continue
        seen.add(key)
        out.append((float(delta), new))
        if len(out) >= limit:
            break
    return out


def local_search(problem: Problem, start, start_loss: float, measure, *, rounds: int = 1, swaps: int = 4,
                 max_evals: int | None = None, column: str = "size_bits", cap: float | None = None,
                 tried: list | None = None):
    """Measured local search from ``start`` (a choice vector whose measured loss is ``start_loss``).

    ``measure(choice) -> loss`` measures a plan. Each round measures up to ``swaps`` candidate moves
    (:func:`candidate_moves`) and moves to the best if it measured lower. Returns
    ``(choice, loss, log)``; the loss is never above ``start_loss``. ``tried``: choices not to
    propose again (extended with the ones measured here).
    """
    cur, cur_loss = np.asarray(start, dtype=int).copy(), float(start_loss)
    tried = tried if tried is not None else []
    tried.append(cur.copy())
    log, evals = [], 0
    for r in range(rounds):
        room = swaps if max_evals is None else min(swaps, max_evals - evals)
        if room <= 0:
            break
        moves = candidate_moves(problem, cur, column, cap, limit=room, exclude=tried)
        if not moves:
            break
        best, best_loss = None, cur_loss
        for _delta, new in moves:
            tried.append(new)
            loss = float(measure(new))
            evals += 1
            if loss < best_loss:
                best, best_loss = new, loss
        gain = cur_loss - best_loss
        if best is not None:
            cur, cur_loss = best, best_loss
        log.append({"round": r + 1, "evals": len(moves), "loss": cur_loss, "gain": gain})
    return cur, cur_loss, log


# --------------------------------------------------------------------------------------- refine
@dataclass
class Refinement:
    """What :func:`refine` returns: the best measured plan per target and the per-round log."""

    best: dict = field(default_factory=dict)  # target label -> (plan, loss, source)
    log: list = field(default_factory=list)
    evals: int = 0
    calibration: Calibration | None = None


def _choice_of(problem: Problem, plan: BitPlan) -> np.ndarray:
    names = problem.option_names
    return np.array([names.index(plan.option_name(m[0])) for m in problem.items])


def refine(table: CostTable, solver, targets: dict, history: list, measure, *, rounds: int = 1,
           method: str = "calibrate", max_evals: int | None = None, swaps: int = 4, groups="type",
           ridge: float = 1e-3, base_budget: Budget | None = None, key: str = "avg_bits") -> Refinement:
    """Measure -> recalibrate -> re-solve for ``rounds`` rounds over every target budget.

    ``targets``: label -> budget value of ``key`` (e.g. ``{"int4-asym": 4.03}``). ``history``: the
    ``(plan, loss)`` pairs measured so far (uniform plans included); it grows as plans are measured.
    ``measure(plan) -> loss`` applies and measures a plan (lower is better). ``max_evals``: the most
    plans measured in all (``None``: no limit beyond ``rounds``).
    """
    if method not in METHODS:
        raise MpsearchError(f"refine method must be one of {', '.join(METHODS)}, got {method!r}")
    if int(rounds) != rounds or rounds < 0:
        raise MpsearchError(f"refine rounds must be an integer >= 0, got {rounds!r}")
    if max_evals is not None and (int(max_evals) != max_evals or max_evals < 0):
        raise MpsearchError(f"refine_evals must be an integer >= 0, got {max_evals!r}")
    base = base_budget or Budget()
    known = {plan_key(p): float(loss) for p, loss in history}
    out = Refinement()
    budgets = {t: base.with_constraints(**{key: v}) for t, v in targets.items()}
    problems = {t: compile_problem(table, b) for t, b in budgets.items()}
    tried = {t: [] for t in targets}

    def fits(plan, t):
        return problems[t].is_feasible(_choice_of(problems[t], plan))

    def best_fitting(t):
        ok = [(loss, p) for p, loss in history if fits(p, t)]
        return min(ok, key=lambda e: e[0]) if ok else (np.inf, None)

    def run_measure(plan):
        k = plan_key(plan)
        if k not in known:
            known[k] = float(measure(plan))
            history.append((plan, known[k]))
            out.evals += 1
        return known[k]

    def left():
        return None if max_evals is None else max_evals - out.evals

    for r in range(1, int(rounds) + 1):
        for t in targets:
            if left() is not None and left() <= 0:
                break
            before, start = best_fitting(t)
            spent0 = out.evals
            if method in ("calibrate", "both"):
                cal = calibrate(table, [p for p, _ in history], [loss for _, loss in history],
                                groups=groups, ridge=ridge)
                out.calibration = cal
                res = solver.solve(cal.apply(table), budgets[t])
                if res.plan is not None:
                    plan = _restamp(res.plan, table, problems[t])
                    run_measure(plan)
            if method in ("local", "both") and (left() is None or left() > 0):
                _, start = best_fitting(t)
                if start is not None:
                    prob = problems[t]
                    cal_prob = prob if out.calibration is None else compile_problem(out.calibration.apply(table), budgets[t])
                    lossf = lambda c: run_measure(_plan_from_choice(prob, c))  # noqa: E731
                    local_search(cal_prob, _choice_of(prob, start), known[plan_key(start)], lossf, rounds=1,
                                 swaps=swaps, max_evals=left(), tried=tried[t])
            after, best = best_fitting(t)
            out.log.append({"round": r, "budget": t, "method": method, "evals": out.evals - spent0,
                            "evals_total": out.evals, "loss_before": before, "loss_after": after,
                            "gain": (before - after) if np.isfinite(before) else np.nan})
            out.best[t] = (best, after)
    for t in targets:
        if t not in out.best:
            loss, p = best_fitting(t)
            out.best[t] = (p, loss)
    return out


def plan_key(plan: BitPlan) -> str:
    """A short hash of the plan's layer -> option mapping (plans with the same key are the same)."""
    import hashlib
    import json

    doc = {n: plan.option_name(n) for n in sorted(plan.bits)}
    return hashlib.sha1(json.dumps(doc).encode()).hexdigest()[:16]


def _plan_from_choice(problem: Problem, choice) -> BitPlan:
    from .solvers.base import make_plan

    return make_plan(problem, choice, solver="refine-local", status="measured")


def _restamp(plan: BitPlan, table: CostTable, problem: Problem) -> BitPlan:
    """A plan solved on a calibrated table, with its predicted totals recomputed on ``table``."""
    choice = _choice_of(problem, plan)
    plan.predicted = problem.totals(choice)
    plan.provenance["refine"] = "calibrate"
    return plan
