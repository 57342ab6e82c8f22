"""ilp and dp against the exhaustive oracle on many random small tables; dp's discretisation bound;
ILP time limits and bounds; BAQ's model; bad settings of every new solver."""

import itertools

import numpy as np
import pytest

from mpsearch.budget import Budget
from mpsearch.errors import MpsearchError
from mpsearch.problem import compile_problem
from mpsearch.registry import get_solver
from mpsearch.solvers.baq import allocate, fit_model
from mpsearch.solvers.ilp import lp_relaxation_bound
from mpsearch.synthetic import random_table


def case(seed):
    """A random small table (4-6 layers, 3-5 options, sometimes a group) and a budget for it."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 7))
    bits = sorted(rng.choice([1, 2, 3, 4, 5, 6, 8], size=int(rng.integers(3, 6)), replace=False).tolist())
    table = random_table(n, bits=bits, seed=seed, groups=int(rng.integers(0, 2)), min_params=16, max_params=300)
    params = sum(table.layer_params().values())
    f = table.frame.groupby("layer")
    lo, hi = f.size_bits.min().sum(), f.size_bits.max().sum()
    size = lo + rng.uniform(0.05, 0.95) * (hi - lo)
    return table, params, float(size), f, rng


def objective_of(res):
    return None if res.plan is None else res.plan.predicted["damage"]


def same(a, b):
    assert (a is None) == (b is None)
    if a is not None:
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(60))
def test_dp_equals_exhaustive(seed):
    table, params, size, _, rng = case(seed)
    for items in (["size_bits=%r" % size], ["avg_bits=%r" % (size / params)]):
        budget = Budget.parse(items)
        if rng.random() < 0.3:
            budget.pins[table.layers[-1]] = table.options[-1]
        ex = get_solver("exhaustive").solve(table, budget)
        dp = get_solver("dp").solve(table, budget)
        same(objective_of(dp), objective_of(ex))
        assert dp.status == ex.status and dp.stats.get("mode", "exact") == "exact"


@pytest.mark.parametrize("seed", range(60))
def test_ilp_equals_exhaustive_with_several_constraints(seed):
    table, params, size, f, rng = case(1000 + seed)
    bops = float(f.bops.min().sum() + rng.uniform(0.2, 0.9) * (f.bops.max().sum() - f.bops.min().sum()))
    lat = float(f.latency.min().sum() + rng.uniform(0.2, 0.9) * (f.latency.max().sum() - f.latency.min().sum()))
    for items in (["avg_bits=%r" % (size / params)], ["size_bits=%r" % size, "bops=%r" % bops, "latency=%r" % lat]):
        budget = Budget.parse(items)
        ex = get_solver("exhaustive").solve(table, budget)
        ilp = get_solver("ilp").solve(table, budget)
        same(objective_of(ilp), objective_of(ex))
        assert ilp.status == ex.status


@pytest.mark.parametrize("seed", range(12))
def test_ilp_cbc_backend_equals_exhaustive(seed):
    table, params, size, f, _ = case(2000 + seed)
    budget = Budget.parse(["size_bits=%r" % size, "bops=%r" % float(f.bops.max().sum())])
    same(objective_of(get_solver("ilp", backend="cbc").solve(table, budget)),
         objective_of(get_solver("exhaustive").solve(table, budget)))


@pytest.mark.parametrize("seed", range(10))
def test_dp_on_a_coarse_grid_is_still_proved_optimal(seed):
    """Sizes share no divisor that fits 40 units: the incumbent of the discretised DP, reduced-cost
    fixing and the exact DP on the core still give the exhaustive optimum, status optimal."""
    table, params, size, _, _ = case(3000 + seed)
    budget = Budget.parse(["size_bits=%r" % size])
    res = get_solver("dp", max_units=40).solve(table, budget)
    assert res.stats["mode"] == "discretised" and res.status == "optimal"
    same(objective_of(res), objective_of(get_solver("exhaustive").solve(table, budget)))


@pytest.mark.parametrize("seed", range(10))
def test_dp_without_room_for_the_core_states_a_true_bound(seed):
    table, params, size, _, _ = case(3100 + seed)
    budget = Budget.parse(["size_bits=%r" % size])
    res = get_solver("dp", max_units=40, max_states=1).solve(table, budget)
    best = objective_of(get_solver("exhaustive").solve(table, budget))
    if res.status == "optimal":  # the core's partial plans never outgrew one
        same(objective_of(res), best)
        return
    assert res.status == "feasible" and "at most" in res.message and res.plan.predicted["size_bits"] <= size
    assert res.stats["lower_bound"] <= best * (1 + 1e-12)
    assert res.plan.predicted["damage"] - res.stats["gap"] <= best * (1 + 1e-12)


def brute_force(table, cap):
    """Least damage (and its size) over every plan with size_bits <= cap, by plain enumeration."""
    dmg = table.pivot("damage").to_numpy()
    size = table.pivot("size_bits").to_numpy()
    best = None
    for combo in itertools.product(range(dmg.shape[1]), repeat=dmg.shape[0]):
        rows = np.arange(dmg.shape[0])
        s, d = size[rows, combo].sum(), dmg[rows, combo].sum()
        if s <= cap and (best is None or d < best):
            best = d
    return best


def boundary_budgets(table, seed):
    """Budgets exactly at a random plan's size, at the maximum, at the minimum, and at the size of
    each uniform plan (int8 included)."""
    size = table.pivot("size_bits").to_numpy()
    rng = np.random.default_rng(seed)
    plan = rng.integers(0, size.shape[1], size.shape[0])
    caps = [size[np.arange(size.shape[0]), plan].sum(), size.max(axis=1).sum(), size.min(axis=1).sum()]
    return [float(c) for c in caps + list(size.sum(axis=0))]


@pytest.mark.parametrize("name,kw", [("exhaustive", {}), ("dp", {}), ("dp", {"max_units": 30}), ("ilp", {}),
                                     ("ilp", {"backend": "cbc"})])
@pytest.mark.parametrize("seed", range(6))
def test_exact_solvers_at_the_boundaries(name, kw, seed):
    table = random_table(4, bits=(2, 4, 6, 8), seed=5000 + seed, min_params=16, max_params=300)
    for cap in boundary_budgets(table, seed):
        res = get_solver(name, **kw).solve(table, Budget.parse(["size_bits=%r" % cap]))
        assert res.status == "optimal", (cap, res)
        assert res.plan.predicted["size_bits"] <= cap
        same(res.plan.predicted["damage"], brute_force(table, cap))


def test_ilp_at_exactly_the_uniform_int8_size_returns_uniform_int8():
    """The all-int8 plan fits a budget of exactly its own size and has the least damage."""
    table = random_table(50, bits=(2, 3, 4, 5, 6, 8), seed=11, min_params=1000, max_params=200_000)
    cap = float(table.frame[table.frame.option == "int8"].size_bits.sum())
    for backend in ("highs", "cbc"):
        res = get_solver("ilp", backend=backend).solve(table, Budget.parse(["size_bits=%r" % cap]))
        assert res.status == "optimal" and set(res.plan.bits.values()) == {8}, backend


def test_lp_bound_is_below_the_optimum():
    for seed in range(10):
        table, params, size, f, _ = case(4000 + seed)
        budget = Budget.parse(["size_bits=%r" % size, "bops=%r" % float(f.bops.max().sum())])
        best = get_solver("exhaustive").solve(table, budget).plan.predicted["damage"]
        assert lp_relaxation_bound(compile_problem(table, budget)) <= best * (1 + 1e-9)


def test_ilp_time_limit_returns_incumbent_with_gap(monkeypatch):
    """The backend is made to stop at its time limit with a poor incumbent (every layer at its
    cheapest option) and a bound below the optimum: the solver keeps the better greedy plan, reports
    status time_limit and its true gap to the best bound. No dependence on the machine's speed."""
    import scipy.optimize

    from mpsearch.solvers import ilp

    table = random_table(30, bits=range(1, 9), seed=3)
    f = table.frame.groupby("layer")
    budget = Budget.parse(["avg_bits=4", "bops=%r" % float(f.bops.max().sum() * 0.5)])
    optimum = get_solver("ilp").solve(table, budget).plan.predicted["damage"]
    real_milp = scipy.optimize.milp

    def stopped_early(c, **kw):
        res = real_milp(c, **kw)
        cheapest = np.zeros_like(res.x)
        cheapest[kw["constraints"][0].A.toarray().argmax(axis=1)] = 1.0  # the first variable of each item
        return scipy.optimize.OptimizeResult(status=1, message="Time limit reached", x=cheapest, fun=float(c @ cheapest),
                                             mip_dual_bound=float(res.fun) - 1.0, success=False)

    monkeypatch.setattr(ilp, "_pulp_available", lambda: [])  # the scipy backend
    monkeypatch.setattr(scipy.optimize, "milp", stopped_early)
    res = get_solver("ilp").solve(table, budget)
    greedy = get_solver("greedy").solve(table, budget).plan.predicted["damage"]
    assert res.status == "time_limit" and res.ok and res.stats["incumbent"] == "greedy"
    assert res.plan.predicted["damage"] == pytest.approx(greedy, rel=1e-12)
    assert res.stats["lower_bound"] <= optimum <= res.plan.predicted["damage"]
    gap = (res.plan.predicted["damage"] - res.stats["lower_bound"]) / res.plan.predicted["damage"]
    assert res.stats["gap"] == pytest.approx(gap, rel=1e-9) and "gap to the best bound" in res.message


def test_baq_model_recovers_exact_power_law_and_closed_form():
    """On damage exactly s * 2^(-2b), the fit returns s, and unclipped bits follow b̄ + ½log2(s/gm)."""
    s_true = np.array([1.0, 4.0, 16.0, 64.0])
    bits = np.arange(1, 9, dtype=float)
    damage = s_true[:, None] * 2.0 ** (-2 * bits[None, :])
    w = 100.0 * bits[None, :].repeat(4, axis=0)
    allowed = np.ones_like(damage, dtype=bool)
    s, a, p, r2 = fit_model(damage, w, bits, allowed)
    assert np.allclose(s, s_true) and np.allclose(p, 100) and np.allclose(a, 0) and r2 == pytest.approx(1)
    b = allocate(s, p, np.ones(4), np.full(4, 8.0), room=100 * 4 * 4.5)
    gm = np.exp(np.log(s_true).mean())
    assert np.allclose(b, 4.5 + 0.5 * np.log2(s_true / gm), atol=1e-9)


def test_baq_reports_bound_and_gap():
    table = random_table(40, seed=2)
    res = get_solver("baq").solve(table, Budget.parse(["avg_bits=4"]))
    assert res.ok and res.stats["bound"] <= res.stats["model_damage"]
    assert 0 <= res.stats["gap"] < 1 and "continuous BAQ optimum" in res.message
    assert res.plan.predicted["avg_bits"] <= 4 + 1e-9
    # the repair spends the budget: no single upgrade still fits
    assert res.plan.predicted["avg_bits"] > 3.5


@pytest.mark.parametrize("name, kw, match", [
    ("ilp", {"backend": "gurobi"}, "backend must be one of auto, highs, cbc"),
    ("ilp", {"time_limit": -1}, "time_limit must be a positive number"),
    ("ilp", {"gap_rel": 2}, r"gap_rel must be in \[0, 1\)"),
    ("dp", {"max_units": 0}, "max_units must be a positive integer"),
    ("evolutionary", {"population": 2}, "population must be an integer >= 4"),
    ("evolutionary", {"generations": 0}, "generations must be a positive integer"),
    ("evolutionary", {"mutation": 1.5}, r"mutation must be in \(0, 1\]"),
    ("evolutionary", {"objective": 3}, "objective must be a callable"),
    ("optuna", {"sampler": "cmaes"}, "sampler must be one of tpe, nsga2"),
    ("optuna", {"n_trials": 0}, "n_trials must be a positive integer"),
    ("optuna", {"objective": "x"}, "objective must be a callable"),
    ("optuna", {"storage": "nosuchdb://x"}, "optuna: cannot open storage"),
])
def test_bad_settings_are_refused(name, kw, match):
    with pytest.raises(MpsearchError, match=match):
        get_solver(name, **kw).solve(random_table(4, seed=0), Budget.parse(["avg_bits=4"]))


@pytest.mark.parametrize("name", ["dp", "baq"])
def test_single_resource_solvers_refuse_several_constraints(name):
    with pytest.raises(MpsearchError, match="one resource.*use 'ilp'|one resource.*'ilp'"):
        get_solver(name).solve(random_table(4, seed=0), Budget.parse(["avg_bits=4", "bops=1e12"]))


def test_unconstrained_budget_gives_least_damage_everywhere():
    table = random_table(5, seed=1, keep=True)
    for name in ("dp", "baq", "ilp"):
        res = get_solver(name).solve(table, Budget())
        assert set(res.plan.bits.values()) == {16}


@pytest.mark.slow
def test_ilp_stays_exact_where_the_backend_tolerance_admits_a_plan_over_the_cap():
    """On 1,000 layers with arbitrary integer sizes, HiGHS's feasibility tolerance (about 1e-7 of a
    row scaled to the room left) admitted a plan a few bits over the cap; the re-solve with tightened
    caps then lost the optimum (status feasible). Integer rows keep it exact: equal to the proved dp."""
    table = random_table(1000, seed=1000)
    f = table.frame.groupby("layer")
    lo, hi = f.size_bits.min().sum(), f.size_bits.max().sum()
    budget = Budget.parse(["size_bits=%r" % float(np.linspace(lo, hi, 12)[7])])
    ilp, dp = get_solver("ilp").solve(table, budget), get_solver("dp").solve(table, budget)
    assert ilp.status == dp.status == "optimal"
    same(ilp.plan.predicted["damage"], dp.plan.predicted["damage"])
