"""The shipped conformance suite (mpsearch.testing) over every registered solver and over a toy
plugin registered like a third party's; the CLI's exit 3; the heuristics within stated tolerances of
the exhaustive oracle."""

import numpy as np
import pytest

from mpsearch.budget import Budget
from mpsearch.cli import main
from mpsearch.registry import SOLVERS, get_solver, register, solver_names
from mpsearch.synthetic import random_table
from mpsearch.testing import check_solver, solver_checks

#: fast settings for the stochastic solvers
SETTINGS = {"evolutionary": {"generations": 60}, "optuna": {"n_trials": 25}}
ALL = solver_names()


def solver(name, **kw):
    return get_solver(name, **{**SETTINGS.get(name, {}), **kw})


def small(seed, **kw):
    return random_table(5, bits=(2, 3, 4, 8), seed=seed, min_params=16, max_params=256, **kw)


def test_every_solver_is_registered():
    assert {"greedy", "exhaustive", "ilp", "dp", "baq", "evolutionary", "optuna"} <= set(ALL)


@pytest.mark.parametrize("check", solver_checks(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", ALL)
def test_conformance(name, check):
    check(name, **SETTINGS.get(name, {}))


@pytest.fixture
def plugins():
    register("solver", "toy-greedy", "toy_plugins:ToyGreedy")
    register("solver", "toy-broken", "toy_plugins:IgnoresTheBudget")
    register("solver", "toy-false-exact", "toy_plugins:ClaimsExactness")
    register("solver", "toy-seedless", "toy_plugins:IgnoresItsSeed")
    yield
    for name in ("toy-greedy", "toy-broken", "toy-false-exact", "toy-seedless"):
        SOLVERS.pop(name, None)


def test_a_registered_plugin_runs_the_shipped_suite(plugins):
    check_solver("toy-greedy")  # a correct heuristic passes every check
    with pytest.raises(AssertionError, match="breaks the budget|toy-broken"):
        check_solver("toy-broken")
    with pytest.raises(AssertionError, match=r"toy-false-exact \(exact\)"):
        check_solver("toy-false-exact")
    with pytest.raises(AssertionError, match="toy-seedless: four seeds gave one result"):
        check_solver("toy-seedless")


@pytest.mark.parametrize("name", ["ilp", "dp", "baq", "evolutionary"])
def test_cli_solve_exits_3_on_infeasible_budget(name, tmp_path, capsys):
    path = small(2).write(tmp_path / "t.csv")
    rc = main(["solve", "--table", str(path), "--solver", name, "--budget", "avg_bits=1",
               "-o", str(tmp_path / "plan.json")])
    assert rc == 3
    assert "smallest achievable avg_bits" in capsys.readouterr().err
    assert not (tmp_path / "plan.json").exists()
    rc = main(["solve", "--table", str(path), "--solver", name, "--budget", "avg_bits=4",
               "-o", str(tmp_path / "plan.json")])
    assert rc == 0 and (tmp_path / "plan.json").exists()


def _gaps(name, n_tables=24, **kw):
    gaps = []
    for seed in range(n_tables):
        table = random_table(6, bits=(2, 3, 4, 5, 6, 8), seed=100 + seed, groups=seed % 2,
                             min_params=16, max_params=256)
        budget = Budget.parse([f"avg_bits={(3.1, 3.6, 4.5)[seed % 3]}"])
        best = get_solver("exhaustive").solve(table, budget).plan.predicted["damage"]
        got = solver(name, **kw).solve(table, budget).plan.predicted["damage"]
        gaps.append(got / best - 1)
    return np.array(gaps)


# Stated tolerances of the heuristics (relative damage gap to the exhaustive optimum over 24 random
# 6-layer x 6-option tables): greedy and baq, median <= 1% and 90th percentile <= 15%;
# evolutionary (warm or cold start), every table within 1%; optuna from a cold start (100 TPE
# trials over 46,656 plans) finds a feasible plan on every table, median gap <= 75% (measured 51%:
# on tables TPE learns little; its warm start is the greedy plan, see below).
@pytest.mark.parametrize("name", ["greedy", "baq"])
def test_convex_heuristics_within_tolerance(name):
    g = _gaps(name)
    assert g.min() >= -1e-9
    assert np.median(g) <= 0.01 and np.percentile(g, 90) <= 0.15, g


@pytest.mark.parametrize("warm", [True, False])
def test_evolutionary_within_tolerance(warm):
    g = _gaps("evolutionary", warm_start=warm, generations=100)
    assert g.min() >= -1e-9 and g.max() <= 0.01, g


@pytest.mark.slow
def test_optuna_cold_start_within_tolerance():
    g = _gaps("optuna", n_tables=9, n_trials=100, warm_start=False)
    assert np.isfinite(g).all() and g.min() >= -1e-9 and np.median(g) <= 0.75, g


def test_optuna_warm_start_enqueues_the_greedy_and_uniform_plans(tmp_path):
    import optuna

    table = random_table(6, bits=(2, 3, 4, 8), seed=11, min_params=16, max_params=256)
    budget = Budget.parse(["avg_bits=4.5"])
    storage = f"sqlite:///{tmp_path / 's.db'}"
    res = get_solver("optuna", n_trials=6, storage=storage, study_name="w").solve(table, budget)
    trials = optuna.load_study(study_name="w", storage=storage).trials
    greedy = get_solver("greedy").solve(table, budget).plan
    assert trials[0].params == {n: greedy.option_name(n) for n in table.layers}
    fitting = [o for o in table.options if table.frame[table.frame.option == o].size_bits.sum()
               <= 4.5 * sum(table.layer_params().values())]
    assert [set(t.params.values()) for t in trials[1:1 + len(fitting)]] == [{o} for o in fitting]
    assert res.plan.predicted["damage"] <= greedy.predicted["damage"]
