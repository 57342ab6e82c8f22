"""Step 2 of the measured path: the predicted frontier, the uniform plans (and a consumer's own
recipes) as baselines, and the target budgets solved exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..budget import Budget
from ..filemodels import file_budget_targets
from ..frontier import compute_frontier, non_dominated
from ..layers import discover_layers
from ..plan import BitPlan
from ..problem import compile_problem
from ..recipe import DEFAULT_POINTS
from ..refine import plan_key
from ..sensitivity.base import progress_bar
from ..solvers.ilp import risk_adjusted
from ..table import CostTable
from ..targets import recipe_plans
from .result import InfeasibleBudget


def pareto(points: pd.DataFrame, x="size_bits", y="damage") -> pd.DataFrame:
    """The non-dominated rows (smaller ``x`` and smaller ``y`` are better), sorted by ``x``."""
    return non_dominated(points, x, y).reset_index(drop=True)


def spread(values, k: int) -> list[int]:
    """Indices of ``k`` entries of sorted ``values`` spread evenly over their range."""
    values = np.asarray(values, dtype=float)
    if k <= 0 or len(values) == 0:
        return []
    if k >= len(values):
        return list(range(len(values)))
    targets = np.linspace(values.min(), values.max(), k)
    chosen = []
    for t in targets:
        order = np.argsort(np.abs(values - t))
        chosen.append(next((int(i) for i in order if int(i) not in chosen), int(order[0])))
    return sorted(set(chosen))


def without(budget: Budget, key: str) -> Budget:
    """``budget`` without its constraint on ``key`` (bounds, pins and ties kept)."""
    return Budget.from_dict({**budget.to_dict(), "constraints": {k: v for k, v in budget.constraints.items()
                                                                 if k != key}})


def other_constraints(budget: Budget, key: str) -> Budget:
    """A budget of ``budget``'s constraints other than ``key`` only (no bounds, pins or ties): what
    the uniform plans and recipes are sized against."""
    return Budget(constraints={k: v for k, v in budget.constraints.items() if k != key})


def key_constraint(table: CostTable, key: str, budget: Budget):
    """The compiled problem with ``key`` unconstrained, and the constraint that measures ``key``."""
    problem = compile_problem(table, budget.with_constraints(**{key: 1e300}))
    con = next(c for c in problem.constraints if c.key == key)
    return problem, con


_key_of = key_constraint  # the older private name


def uniform_plans(table: CostTable, key: str = "avg_bits", budget: Budget | None = None) -> dict:
    """option -> (uniform plan, its use of ``key`` in the user's units), for every option that
    every layer offers (a ragged table's per-layer options have no uniform plan)."""
    problem, con = key_constraint(table, key, budget or Budget())
    offered = table.frame.groupby("option")["layer"].nunique()
    out = {}
    for k, opt in enumerate(problem.option_names):
        if offered.get(opt, 0) < len(table.layers):
            continue
        use = sum(float(problem.resources[con.column][i, k]) for i in range(problem.n_items))
        out[opt] = (BitPlan.uniform(table.layers, opt), con.to_user(use))
    return out


def recipe_baselines(table: CostTable, target, model, key: str, budget: Budget) -> dict:
    """recipe name -> (plan, its use of ``key``) for the target's own recipes that are not uniform
    plans already (llama.cpp: pure types with fallbacks, built-in mixes); ``{}`` without a target."""
    if target is None:
        return {}

    wanted = set(table.layers)
    layers = [lay for lay in discover_layers(model, include_embedding=True) if lay.name in wanted]
    problem, con = key_constraint(table, key, other_constraints(budget, key))
    index = {o: k for k, o in enumerate(problem.option_names)}
    item_of = {n: i for i, members in enumerate(problem.items) for n in members}
    out = {}
    for name, plan in recipe_plans(table, target, layers).items():
        if name.startswith("pure-") and name[5:] in table.options and all(
                plan.option(n).name == name[5:] for n in table.layers):
            continue  # the uniform plan of that option, already a baseline
        choice = {}
        for n in table.layers:
            choice.setdefault(item_of[n], set()).add(plan.option(n).name)
        if any(len(v) > 1 for v in choice.values()):
            continue  # the recipe breaks a tie the solver must keep: not comparable
        use = sum(float(problem.resources[con.column][i, index[next(iter(v))]]) for i, v in choice.items())
        out[name] = (plan, con.to_user(use))
    return out


def baseline_kind(table: CostTable, name: str) -> str:
    """``uniform`` for a uniform option of the table or a consumer's one-type recipe (llama.cpp's
    ``pure-<type>``, ``uniform-<format>``), ``recipe`` for a mix (llama.cpp's Q4_K_M...)."""
    return "uniform" if name in table.options or name.startswith(("pure-", "uniform-")) else "recipe"


def merge_equal(uniform: dict) -> tuple[dict, dict]:
    """One entry per distinct plan of ``uniform`` (name -> (plan, use)): a consumer recipe that is
    the same plan as a uniform option (vLLM's ``uniform-w4a16-g32`` and ``w4a16-g32``) or as an
    earlier recipe is measured, listed and recommended once, under the first name. Returns the
    entries kept and ``{kept name: [the other names of its plan]}``."""
    kept, aliases, first = {}, {}, {}
    for name, entry in uniform.items():
        key = plan_key(entry[0])
        if key in first:
            aliases.setdefault(first[key], []).append(name)
            continue
        first[key] = name
        kept[name] = entry
    return kept, aliases


def target_budgets(table, key, budget, uniform, budgets, match_uniform) -> tuple[dict, Budget]:
    """Target budgets (label -> value of ``key``: each of ``budgets``, the budget's own ``key``
    constraint, and with ``match_uniform`` the size of each uniform plan strictly inside the table's
    range) and the budget without ``key``."""
    values = [float(b) for b in budgets]
    if key in budget.constraints:  # --budget avg_bits=4 on the model path: a target, not a sweep cap
        values.append(budget.constraints[key])
        budget = without(budget, key)
    targets = {f"{key}={v:g}": v for v in values}
    if budget.file:  # --budget size=Q4_K_M, file=, bpw= on the model path: targets in the swept key's units

        targets.update(file_budget_targets(table, key, budget))
        budget = Budget.from_dict({**budget.to_dict(), "file": {}})
    if match_uniform:
        problem, con = key_constraint(table, key, budget)
        w = np.where(problem.allowed, problem.resources[con.column], np.nan)
        lo, hi = con.to_user(np.nanmin(w, axis=1).sum()), con.to_user(np.nanmax(w, axis=1).sum())
        for opt, (_plan, use) in uniform.items():
            if lo * (1 + 1e-9) < use < hi * (1 - 1e-9):
                targets[opt] = use
    return targets, budget


def _row(predicted: dict, **extra) -> dict:
    row = {"damage": predicted.get("damage"), "size_bits": predicted.get("size_bits"),
           "avg_bits": predicted.get("avg_bits")}
    row.update({k: v for k, v in predicted.items() if k not in row and k != "params"})
    row.update(extra)
    return row


def predicted_frontier(table: CostTable, solver, *, key: str = "avg_bits", points: int | None = DEFAULT_POINTS,
                       budget: Budget | None = None, targets: dict | None = None, progress: bool = False):
    """The predicted frontier (:func:`~mpsearch.frontier.compute_frontier`) plus one solve at each
    target budget (label -> value of ``key``), kept even when another point dominates it.

    Returns ``(frame, plans, results)``: one row per point sorted by size (``at_budget`` names the
    target budgets a row was solved for, empty otherwise), the plans in row order, and the
    :class:`~mpsearch.SolveResult` of each target. An infeasible target raises
    :class:`InfeasibleBudget` naming the smallest achievable value.
    """
    budget = budget or Budget()
    if getattr(solver, "risk", 0):  # ilp risk=λ: the frontier of damage + λ·damage_std

        table = risk_adjusted(table, solver.risk)
    fr = compute_frontier(table, solver, points=points, key=key, budget=budget)
    if fr.status == "infeasible":
        raise InfeasibleBudget(f"no plan meets the budget: {fr.message}")
    rows = [_row(p.predicted, budget=p.budget, status=p.status, at_budget="") for p in fr.points]
    plans = [p.plan for p in fr.points]
    results = {}
    for label, value in progress_bar(list((targets or {}).items()), enabled=progress, desc="solve targets"):
        b = budget.with_constraints(**{key: float(value)})
        res = solver.solve_problem(compile_problem(table, b), b)
        if res.plan is None:
            raise InfeasibleBudget(f"budget {key}={value:g} ({label}): {res.message}")
        results[label] = res
        rows.append(_row(res.plan.predicted, budget=f"{key}<={value:.6g}", status=res.status, at_budget=label))
        plans.append(res.plan)
    return _merge_points(rows, plans) + (results,)


def _merge_points(rows, plans) -> tuple[pd.DataFrame, list]:
    """The non-dominated rows plus every target's row; a plan solved for several targets (or also a
    frontier point) keeps one row naming them all; sorted by size."""
    allpts = pd.DataFrame(rows).assign(_i=range(len(rows)))
    front = pareto(allpts)
    extra = allpts[(allpts["at_budget"] != "") & ~allpts["_i"].isin(front["_i"])]
    front = pd.concat([front, extra])
    front["_key"] = [plan_key(plans[i]) for i in front["_i"]]
    names = front.groupby("_key")["at_budget"].agg(lambda s: ",".join(t for t in dict.fromkeys(s) if t))
    front = front.drop_duplicates("_key").copy()
    front["at_budget"] = front["_key"].map(names)
    front = front.sort_values(["size_bits", "damage"], kind="stable").reset_index(drop=True)
    ordered = [plans[i] for i in front["_i"]]
    return front.drop(columns=["_i", "_key"]), ordered
