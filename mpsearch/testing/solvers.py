"""The solver conformance suite: every check takes a registered solver name and its settings.

- every layer gets an option the table offers, the budget is respected (one constraint, two
  forms; several constraints unless the solver declares ``single_resource``, which must then
  refuse them), the plan's predicted sums are the table's;
- table groups, tie regexes, per-layer bounds and pins are honoured;
- a budget below the smallest achievable value is status ``infeasible`` naming that value, and two
  constraints that can each be met but not together are ``infeasible`` too (with a message);
- the same settings give the same plan, and for solvers with a ``seed`` setting another seed
  changes the plan somewhere (a seed that does nothing is a bug);
- ``exact`` solvers equal the exhaustive oracle (an independent enumeration) on small random tables,
  at budgets exactly at a plan's size, at the largest and at the smallest size;
- ``whole_frontier`` solvers return real, non-dominated plans whose sums are the table's.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from ..budget import Budget
from ..errors import MpsearchError
from ..problem import compile_problem
from ..registry import get_solver, load_class
from ..synthetic import random_table
from ..table import CostTable


def _small(seed, **kw):
    return random_table(5, bits=(2, 3, 4, 8), seed=seed, min_params=16, max_params=256, **kw)


def _usage(table, plan, column):
    f = table.frame.set_index(["layer", "option"])
    return float(sum(f.loc[(layer, plan.option_name(layer)), column] for layer in plan.bits))


def _close(a, b, rel=1e-9):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def check_budget_respected_and_every_layer_assigned(name, **settings):
    cls = load_class("solver", name)
    for seed in range(3):
        table = _small(seed)
        params = sum(table.layer_params().values())
        bops = table.frame.groupby("layer").bops.max().sum() * 0.4
        budgets = [["avg_bits=3.2"], ["size_bits=%d" % (params * 4)]]
        if not cls.single_resource:
            budgets.append(["avg_bits=4", "bops=%r" % float(bops)])
        for items in budgets:
            res = get_solver(name, **settings).solve(table, Budget.parse(items))
            assert res.ok, f"{name}: no plan for the feasible budget {items}: {res}"
            plan = res.plan
            assert set(plan.bits) == set(table.layers), f"{name}: not every layer assigned under {items}"
            assert all(plan.option_name(n) in table.options for n in plan.bits), f"{name}: unknown option"
            for key, cap in Budget.parse(items).constraints.items():
                used = _usage(table, plan, "size_bits") / params if key == "avg_bits" else _usage(table, plan, key)
                assert used <= cap * (1 + 1e-9) + 1e-12, f"{name}: {key}={used} breaks the budget {key}<={cap}"
            assert _close(plan.predicted["damage"], _usage(table, plan, "damage")), f"{name}: predicted damage"
            assert plan.provenance["solver"] == name
        if cls.single_resource:
            try:
                get_solver(name, **settings).solve(table, Budget.parse(["avg_bits=4", "bops=%r" % float(bops)]))
            except MpsearchError:
                pass
            else:
                raise AssertionError(f"{name} declares single_resource but accepted two constraints")


def check_ties_bounds_and_pins(name, **settings):
    table = random_table(6, bits=(2, 3, 4, 8), seed=3, groups=1, min_params=16, max_params=256)
    budget = Budget.parse(["avg_bits=3.5"], ties=[r"layer000[45]"], min_bits=["layer0002=3"],
                          pins=["layer0003=int8"])
    plan = get_solver(name, **settings).solve(table, budget).plan
    assert plan is not None, f"{name}: no plan under a feasible budget with ties, bounds and pins"
    assert plan.bits["layer0000"] == plan.bits["layer0001"], f"{name}: table group broken"
    assert plan.bits["layer0004"] == plan.bits["layer0005"], f"{name}: tie regex broken"
    assert plan.bits["layer0002"] >= 3, f"{name}: --min-bits broken"
    assert plan.bits["layer0003"] == 8, f"{name}: pin broken"


def check_infeasible_budgets_are_a_status(name, **settings):
    res = get_solver(name, **settings).solve(_small(1), Budget.parse(["avg_bits=1.5"]))
    assert res.status == "infeasible" and res.plan is None and not res.ok, f"{name}: {res}"
    assert "smallest achievable avg_bits is 2." in res.message, f"{name}: message {res.message!r}"
    if load_class("solver", name).single_resource:
        return
    table = conflicting_table()
    f = table.frame.groupby("layer")
    size, bops = float(f.size_bits.min().sum()), float(f.bops.min().sum())
    for one in (["size_bits=%r" % size], ["bops=%r" % bops]):  # each constraint alone can be met
        assert get_solver("exhaustive").solve(table, Budget.parse(one)).ok
    res = get_solver(name, **settings).solve(table, Budget.parse(["size_bits=%r" % size, "bops=%r" % bops]))
    assert res.status == "infeasible" and res.plan is None, f"{name}: two conflicting constraints gave {res}"
    assert res.message, f"{name}: an infeasible result without a message"


def conflicting_table() -> CostTable:
    """Three layers whose smallest option has the largest bops: the least size and the least bops
    cannot be had together."""
    rows = []
    for i, params in enumerate((40, 64, 100)):
        for bits in (2, 4, 8):
            rows.append({"layer": f"l{i}", "bits": bits, "params": params, "damage": params * 2.0 ** (-2 * bits),
                         "size_bits": params * bits, "bops": params * (10 - bits)})
    return CostTable(pd.DataFrame(rows))


def check_seeded_determinism(name, **settings):
    table = random_table(8, bits=(2, 3, 4, 6, 8), seed=5, min_params=16, max_params=256)
    budget = Budget.parse(["avg_bits=3.7"])
    first = get_solver(name, **settings).solve(table, budget).plan
    second = get_solver(name, **settings).solve(table, budget).plan
    assert first.bits == second.bits and first.predicted == second.predicted, f"{name}: not deterministic"
    solver = get_solver(name, **settings)
    if "seed" not in solver.get_params():
        return
    # a seed must matter: from a cold start on a 40-layer table, some other seed gives another plan
    big = random_table(40, bits=(2, 3, 4, 5, 6, 8), seed=6, min_params=16, max_params=256)
    cold = {"warm_start": False} if "warm_start" in solver.get_params() else {}
    budget = Budget.parse(["avg_bits=6.5"])  # loose: most random plans fit
    plans = [get_solver(name, **{**settings, **cold, "seed": s}).solve(big, budget).plan for s in range(4)]
    outcomes = {None if p is None else tuple(sorted(p.bits.items())) for p in plans}
    assert len(outcomes) > 1, f"{name}: four seeds gave one result"


def _brute_force(table, budget):
    """The least damage of any plan meeting ``budget`` (one size_bits cap), by plain enumeration
    over each layer's offered options (ties and groups ignored: the tables here have none)."""
    cap = budget.constraints["size_bits"]
    frame = table.frame
    per_layer = [frame[frame.layer == n][["damage", "size_bits"]].to_numpy() for n in table.layers]
    best = None
    for combo in itertools.product(*per_layer):
        arr = np.array(combo)
        if arr[:, 1].sum() <= cap and (best is None or arr[:, 0].sum() < best):
            best = float(arr[:, 0].sum())
    return best


def check_exact_equals_the_oracle(name, **settings):
    if not load_class("solver", name).exact:
        return
    for seed in range(8):
        rng = np.random.default_rng(seed)
        bits = sorted(rng.choice([1, 2, 3, 4, 5, 6, 8], size=int(rng.integers(3, 5)), replace=False).tolist())
        table = random_table(int(rng.integers(3, 5)), bits=bits, seed=7000 + seed, min_params=16, max_params=300)
        size = table.pivot("size_bits").to_numpy()
        plan = rng.integers(0, size.shape[1], size.shape[0])
        caps = [size[np.arange(len(size)), plan].sum(), size.max(axis=1).sum(), size.min(axis=1).sum(),
                size.min(axis=1).sum() + rng.uniform(0.1, 0.9) * (size.max(axis=1).sum() - size.min(axis=1).sum())]
        for cap in caps:
            budget = Budget.parse(["size_bits=%r" % float(cap)])
            res = get_solver(name, **settings).solve(table, budget)
            best = _brute_force(table, budget)
            assert res.status == "optimal", f"{name} (exact): status {res.status} at size_bits<={cap}"
            assert _close(res.plan.predicted["damage"], best), \
                f"{name} (exact): damage {res.plan.predicted['damage']} != optimum {best} at size_bits<={cap}"


def check_whole_frontier(name, **settings):
    solver = get_solver(name, **settings)
    if not getattr(solver, "whole_frontier", False):
        return
    table = random_table(6, bits=(2, 4, 8), seed=9, min_params=16, max_params=300)
    problem = compile_problem(table, Budget.parse(["size_bits=1e300"]))
    fr = solver.frontier(problem, "size_bits")
    choices, cost, damage = np.asarray(fr["choices"]), np.asarray(fr["cost"]), np.asarray(fr["damage"])
    assert len(cost) >= 2, f"{name}: a frontier of {len(cost)} point(s)"
    assert np.all(np.diff(cost) > 0) and np.all(np.diff(damage) < 0), f"{name}: frontier not non-dominated"
    idx = np.arange(problem.n_items)
    for c, s, d in zip(choices, cost, damage):
        assert problem.allowed[idx, c].all(), f"{name}: a frontier plan uses an option not offered"
        assert _close(problem.resources["size_bits"][idx, c].sum(), s) and _close(problem.damage[idx, c].sum(), d)


_CHECKS = [check_budget_respected_and_every_layer_assigned, check_ties_bounds_and_pins,
           check_infeasible_budgets_are_a_status, check_seeded_determinism, check_exact_equals_the_oracle,
           check_whole_frontier]


def solver_checks() -> list:
    """The checks, each ``check(name, **settings)``."""
    return list(_CHECKS)


def check_solver(name: str, **settings) -> None:
    """Run every check on the registered solver ``name`` with ``settings``."""
    for check in _CHECKS:
        check(name, **settings)
