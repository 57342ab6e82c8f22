"""Closed-loop refinement, pairwise ILP terms and the risk option, against exact answers."""

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from mpsearch.budget import Budget
from mpsearch.errors import MpsearchError
from mpsearch.interaction import block_pairs, pair_terms, pairwise_damage
from mpsearch.plan import BitPlan
from mpsearch.problem import compile_problem
from mpsearch.refine import (calibrate, candidate_moves, evolve, layer_type, local_search, mutate, refine,
                             size_levels)
from mpsearch.registry import get_solver
from mpsearch.solvers.ilp import ILPSolver, risk_adjusted, solve_pairwise
from mpsearch.table import CostTable

OPTS = ["int2", "int4", "int8"]


def table_of(damage: np.ndarray, names=None, params=100, std=None) -> CostTable:
    """A table of len(damage) layers x 3 options (2, 4, 8 bits) of ``params`` weights each."""
    names = names or [f"blocks.{i // 2}.{'ab'[i % 2]}" for i in range(len(damage))]
    rows = []
    for i, n in enumerate(names):
        for k, (o, b) in enumerate(zip(OPTS, (2, 4, 8))):
            row = {"layer": n, "option": o, "bits": b, "damage": float(damage[i, k]), "size_bits": b * params,
                   "params": params}
            if std is not None:
                row["damage_std"] = float(std[i, k])
            rows.append(row)
    return CostTable(pd.DataFrame(rows))


def random_plans(table, n, seed):
    rng = np.random.default_rng(seed)
    return [_plan(table, rng.integers(0, 3, len(table.layers))) for _ in range(n)]


def _plan(table, ks):
    from mpsearch.options import parse_option

    opts = {n: parse_option(OPTS[k]).to_dict() for n, k in zip(table.layers, ks)}
    return BitPlan(bits={n: int(opts[n]["bits"]) for n in table.layers}, options=opts)


def test_layer_type_drops_block_indices():
    assert layer_type("model.layers.12.mlp.up_proj") == "model.layers.*.mlp.up_proj"
    assert layer_type("features.0") == "features.*" and layer_type("fc") == "fc"


def test_nnls_recovers_known_multipliers_exactly():
    """Synthetic additive model: loss = sum_g a_g * (table damage of the group's layers)."""
    rng = np.random.default_rng(0)
    damage = rng.uniform(0.1, 2.0, (6, 3)) * np.array([4.0, 1.0, 0.1])
    table = table_of(damage)  # types: blocks.*.a and blocks.*.b
    truth = {"blocks.*.a": 2.5, "blocks.*.b": 0.4}
    plans = random_plans(table, 8, seed=1)
    dmg = table.frame.set_index(["layer", "option"])["damage"]
    losses = [sum(truth[layer_type(n)] * dmg[(n, p.option_name(n))] for n in table.layers) for p in plans]
    cal = calibrate(table, plans, losses, groups="type", ridge=0)
    assert cal.multipliers == pytest.approx(truth, rel=1e-9)
    assert cal.residual == pytest.approx(0, abs=1e-9)
    # the calibrated table predicts every plan's loss exactly
    t2 = cal.apply(table).frame.set_index(["layer", "option"])["damage"]
    for p, y in zip(plans, losses):
        assert sum(t2[(n, p.option_name(n))] for n in table.layers) == pytest.approx(y, rel=1e-9)


def test_nnls_multipliers_stay_non_negative_and_ridge_pulls_to_one_scale():
    damage = np.ones((4, 3))
    table = table_of(damage)
    plans = random_plans(table, 3, seed=2)
    cal = calibrate(table, plans, [-1.0, -2.0, -0.5], ridge=0)  # losses below the reference: a = 0
    assert all(v == 0 for v in cal.multipliers.values())
    with pytest.raises(MpsearchError, match="one measured loss per plan"):
        calibrate(table, plans, [1.0])


def test_local_search_never_returns_worse_and_finds_the_measured_best_swap():
    # the table says layer 0 matters, the "measurement" says layer 3 does: local search must follow
    # the measurement, never accept a worse plan, and keep the size
    damage = np.array([[10.0, 1.0, 0.0]] * 4)
    table = table_of(damage, names=["l0", "l1", "l2", "l3"])
    problem = compile_problem(table, Budget(constraints={"avg_bits": 4.5}))
    weights = np.array([0.1, 1.0, 1.0, 5.0])

    def measured(choice):
        return float((weights * damage[np.arange(4), choice]).sum())

    start = np.array([0, 2, 1, 1])  # 2+8+4+4 bits: measured 1 + 0 + 1 + 5 = 7
    calls = []

    def measure(c):
        calls.append(c.copy())
        return measured(c)

    choice, loss, log = local_search(problem, start, measured(start), measure, rounds=3, swaps=20)
    assert loss <= measured(start) and loss == pytest.approx(measured(choice))
    assert problem.is_feasible(choice)
    # the swap l3 up / l1 down (predicted change 0, measured 7 -> 3) is found and kept
    assert loss <= 3.0 and choice[3] == 2
    assert all(e["gain"] >= 0 for e in log) and len(calls) == sum(e["evals"] for e in log)
    # a measure that always says "worse" leaves the start unchanged
    c2, l2, _ = local_search(problem, start, 0.0, lambda c: 1.0, rounds=2, swaps=5)
    assert list(c2) == list(start) and l2 == 0.0


def test_candidate_moves_keep_size_and_are_distinct():
    table = table_of(np.array([[3.0, 1.0, 0.0]] * 5))
    problem = compile_problem(table, Budget(constraints={"avg_bits": 4.4}))
    start = np.array([0, 2, 1, 1, 1])  # 22 bits of 22
    moves = candidate_moves(problem, start, limit=100)
    assert moves and all(problem.is_feasible(c) for _, c in moves)
    assert len({tuple(c) for _, c in moves}) == len(moves)
    sizes = [problem.totals(c)["size_bits"] for _, c in moves]
    assert max(sizes) <= problem.totals(start)["size_bits"]
    assert [d for d, _ in moves] == sorted(d for d, _ in moves)
    # every single up + single down within the size: l0 2->4 with one of l2..l4 4->2 (3) or with
    # l1 8->4 (1, smaller), l2..l4 4->8 with l1 8->4 (3)
    assert len(moves) == 7 and moves[0][0] == -1.0  # l0 up + l1 down: 3 - 1 + 1 - 0 = predicted -1


def test_refine_calibrate_reaches_the_measured_optimum_of_an_additive_truth():
    """True loss = 3 x the table's damage on type 'a', 0.2 x on type 'b': after calibration the
    re-solved plan is the exact optimum of the true loss (brute force over all plans)."""
    rng = np.random.default_rng(3)
    damage = rng.uniform(0.5, 1.5, (6, 3)) * np.array([5.0, 1.0, 0.05])
    table = table_of(damage)
    mult = np.array([3.0 if n.endswith(".a") else 0.2 for n in table.layers])

    def true_loss(plan):
        ks = [OPTS.index(plan.option_name(n)) for n in table.layers]
        return float((mult * damage[np.arange(6), ks]).sum())

    history = [(BitPlan.uniform(table.layers, o), None) for o in OPTS]
    history = [(p, true_loss(p)) for p, _ in history]
    solver = get_solver("ilp")
    res = refine(table, solver, {"t": 4.0}, history, true_loss, rounds=3, method="calibrate", ridge=0)
    best_plan, best_loss = res.best["t"]
    optimum = min(float((mult * damage[np.arange(6), ks]).sum())
                  for ks in itertools.product(range(3), repeat=6) if sum((2, 4, 8)[k] for k in ks) <= 24)
    assert best_loss == pytest.approx(optimum)
    assert res.evals <= 3 and res.log[-1]["loss_after"] <= res.log[0]["loss_before"]


def test_refine_respects_the_measurement_budget():
    table = table_of(np.random.default_rng(4).uniform(0.1, 1, (6, 3)))
    history = [(BitPlan.uniform(table.layers, o), float(10 - k)) for k, o in enumerate(OPTS)]
    calls = []
    res = refine(table, get_solver("greedy"), {"t": 4.0}, history, lambda p: calls.append(p) or 1.0,
                 rounds=5, method="local", swaps=3, max_evals=4)
    assert res.evals == len(calls) <= 4
    with pytest.raises(MpsearchError, match="refine method"):
        refine(table, get_solver("greedy"), {"t": 4.0}, history, lambda p: 1.0, method="nope")


def _interacting(n=6, seed=2):
    """A table whose additive damage misleads, and a true loss with pairwise interaction:
    loss = sum_i w_i d(i) + sum_{i<j} c_ij d(i) d(j) (d = the table's damage of the chosen option).
    With seed 2 at 4 bits/weight the table's optimum (uniform 4 bits) is 17% above the true one and
    the optimum of the additive part alone 67% above it."""
    rng = np.random.default_rng(seed)
    damage = rng.uniform(0.5, 1.5, (n, 3)) * np.array([4.0, 1.0, 0.05])
    w = np.exp(rng.uniform(-3, 2, n))
    c = np.triu(rng.uniform(0, 0.3, (n, n)), 1)
    table = table_of(damage, names=[f"l{i}" for i in range(n)])

    def true_loss(choice):
        d = damage[np.arange(n), np.asarray(choice)]
        return float(w @ d + d @ c @ d)

    return table, damage, true_loss


def test_mutation_keeps_every_constraint_and_changes_the_plan():
    table, _d, _l = _interacting(8)
    problem = compile_problem(table, Budget(constraints={"avg_bits": 4.5}))
    rng = np.random.default_rng(0)
    start = np.array([1] * 8)  # uniform 4 bits: 0.5 bits/weight of slack
    kids = [mutate(problem, start, rng, switches=s) for s in (1, 2, 3) for _ in range(200)]
    kids = [k for k in kids if k is not None]
    assert len(kids) > 500  # the slack and the 2/4/8 ladder always leave a move
    assert all(problem.is_feasible(k) and not np.array_equal(k, start) for k in kids)
    # one switch from uniform 4 bits with 400 bits of slack: one layer 4 -> 8 bits fits as it is and
    # leaves no room to fill, so the children are exactly the 8 single upgrades
    one = {tuple(mutate(problem, start, rng, switches=1)) for _ in range(200)}
    assert one == {tuple(1 + (np.arange(8) == i)) for i in range(8)}
    # the same seed, the same children
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    assert all(np.array_equal(mutate(problem, start, r1), mutate(problem, start, r2)) for _ in range(20))


def test_mutation_moves_between_formats_of_one_size():
    """Two formats of the same size (llama.cpp's q4_0 / iq4_nl / q4_K) share a size level: a
    mutation may switch between them (a lateral move) or go up a level, never "up" to a format of
    the same size. From uniform int4 at its exact size, one switch gives exactly the 3 lateral
    children and the 3 children with one layer at 8 bits and the two others at 2."""
    rows = [{"layer": f"l{i}", "option": o, "bits": b, "damage": d, "size_bits": b * 100, "params": 100}
            for i in range(3) for o, b, d in (("int2", 2, 3.0), ("int4", 4, 1.0), ("int4-g32", 4, 1.5),
                                              ("int8", 8, 0.1))]
    table = CostTable(pd.DataFrame(rows))
    problem = compile_problem(table, Budget(constraints={"avg_bits": 4.0}))
    names = problem.option_names
    levels = size_levels(problem)
    assert [[names[k] for k in lv] for lv in levels[0]] == [["int2"], ["int4", "int4-g32"], ["int8"]]
    start = np.array([names.index("int4")] * 3)
    rng = np.random.default_rng(0)
    kids = {tuple(names[k] for k in mutate(problem, start, rng, switches=1)) for _ in range(300)}
    lateral = {tuple("int4-g32" if j == i else "int4" for j in range(3)) for i in range(3)}
    up = {tuple("int8" if j == i else "int2" for j in range(3)) for i in range(3)}
    assert kids == lateral | up


def test_evolve_finds_the_brute_force_optimum_of_an_interacting_loss():
    """Where the additive table's optimum is not the true one, the measured search must reach the
    true optimum (brute force over the 3^6 plans that fit); never worse than its start on the way."""
    table, damage, true_loss = _interacting()
    problem = compile_problem(table, Budget(constraints={"avg_bits": 4.0}))
    feasible = [ks for ks in itertools.product(range(3), repeat=6) if problem.is_feasible(np.array(ks))]
    optimum = min(true_loss(ks) for ks in feasible)
    additive = min(feasible, key=lambda ks: damage[np.arange(6), ks].sum())
    assert true_loss(additive) > optimum * 1.15  # the table alone would miss it
    for seed in range(3):
        calls = []

        def measure(c, level):
            assert problem.is_feasible(c) and level == 0
            calls.append(tuple(c))
            return true_loss(c)

        start = np.array(additive)
        choice, loss, log = evolve(problem, start, measure, generations=60, offspring=8, seed=seed)
        assert loss == pytest.approx(optimum) and loss == pytest.approx(true_loss(choice))
        losses = [row["loss"] for row in log]
        assert losses[0] == pytest.approx(true_loss(start)) and losses == sorted(losses, reverse=True)
        assert log[-1]["evals"] == len(calls) and len(calls) == len(set(calls))  # no plan measured twice


def test_evolve_multi_step_selection_and_budget():
    """Level 0 is a noisy cheap measurement, level 1 the truth: the result's loss is its level-1
    loss, each generation measures `offspring` plans at level 0 and `survivors` at level 1, and a
    budget of measurements is never exceeded."""
    table, _d, true_loss = _interacting()
    problem = compile_problem(table, Budget(constraints={"avg_bits": 4.0}))
    noise = np.random.default_rng(1)
    levels = []

    def measure(c, level):
        levels.append(level)
        return true_loss(c) * (1 + (0.3 * noise.standard_normal() if level == 0 else 0))

    start = np.array([1] * 6)
    choice, loss, log = evolve(problem, start, measure, generations=10, offspring=6, survivors=(2,), seed=0,
                               max_evals=41)
    assert loss == pytest.approx(true_loss(choice)) and loss <= true_loss(start)
    assert len(levels) <= 41 and levels[0] == 1  # the start, measured at the top level
    gens = len(log) - 1
    assert levels.count(0) == 6 * gens and levels.count(1) == 1 + 2 * gens and gens == 5  # (41 - 1) // 8
    with pytest.raises(MpsearchError, match="survivors"):
        evolve(problem, start, measure, offspring=4, survivors=(8,))
    with pytest.raises(MpsearchError, match="does not fit"):
        evolve(problem, np.array([2] * 6), measure)


def test_evolve_resumes_from_its_checkpoint_exactly(tmp_path):
    """Stopped mid-generation (Ctrl-C in a measurement), then run again: it resumes from the last
    whole generation and ends where one uninterrupted run ends; more generations continue a
    finished search; another setting or context starts afresh."""
    table, _d, true_loss = _interacting(8, seed=4)
    problem = compile_problem(table, Budget(constraints={"avg_bits": 4.5}))
    start = np.array([1] * 8)
    calls = []

    def measure(c, level):
        calls.append(tuple(c))
        return true_loss(c) * (1.05 if level == 0 else 1.0)

    kw = dict(offspring=5, survivors=(2,), seed=3)
    ref_ckpt = tmp_path / "reference.json"
    ref_choice, ref_loss, ref_log = evolve(problem, start, measure, generations=12, checkpoint=ref_ckpt, **kw)
    n_ref = len(calls)
    ckpt = tmp_path / "evolve.json"

    def interrupted(c, level):
        if len(calls) == n_ref + 40:
            raise KeyboardInterrupt
        return measure(c, level)

    with pytest.raises(KeyboardInterrupt):
        evolve(problem, start, interrupted, generations=12, checkpoint=ckpt, **kw)
    done = json.loads(ckpt.read_text())["log"][-1]["generation"]
    assert 0 < done < 12
    before = len(calls)
    choice, loss, log = evolve(problem, start, measure, generations=12, checkpoint=ckpt, **kw)
    assert np.array_equal(choice, ref_choice) and loss == ref_loss and log == ref_log
    assert json.loads(ckpt.read_text()) == json.loads(ref_ckpt.read_text())  # random state and plans seen too
    assert len(calls) - before == ref_log[-1]["evals"] - ref_log[done]["evals"]  # only what was left
    longer = evolve(problem, start, measure, generations=20, **kw)
    cont = evolve(problem, start, measure, generations=20, checkpoint=ckpt, **kw)
    assert np.array_equal(cont[0], longer[0]) and cont[2] == longer[2]
    fresh = evolve(problem, start, measure, generations=3, checkpoint=ckpt, context="other data", **kw)
    assert len(fresh[2]) == 4 and json.loads(ckpt.read_text())["log"][-1]["generation"] == 3


def test_refine_evolve_measures_only_its_result_with_the_evaluation():
    table, _d, true_loss = _interacting()
    ks = {n: i for i, n in enumerate(table.layers)}

    def as_choice(plan):
        return [OPTS.index(plan.option_name(n)) for n in sorted(ks, key=ks.get)]

    history = [(BitPlan.uniform(table.layers, o), true_loss([k] * 6)) for k, o in enumerate(OPTS)]
    evaluated, searched, state = [], [], {"restored": 0, "dirty": False}

    class Search:  # a search that changes the model: it must be put back before the evaluation
        def __call__(self, p, level):
            searched.append(level)
            state["dirty"] = True
            return true_loss(as_choice(p)) * 1.1

        def restore(self):
            state["restored"] += 1
            state["dirty"] = False

    def evaluate(p):
        assert not state["dirty"]
        evaluated.append(p)
        return true_loss(as_choice(p))

    res = refine(table, get_solver("ilp"), {"t": 4.0, "u": 4.5}, history, evaluate, rounds=30, method="evolve",
                 search=Search(), offspring=6, seed=0)
    assert state["restored"] == 2 and not state["dirty"]  # once after each target's search
    evaluated.clear()
    searched.clear()
    res = refine(table, get_solver("ilp"), {"t": 4.0}, history[:3], evaluate, rounds=30, method="evolve",
                 search=Search(), offspring=6, seed=0)
    plan, loss = res.best["t"]
    assert len(evaluated) == 1 and loss == pytest.approx(true_loss(as_choice(plan)))
    assert loss < history[1][1]  # better than uniform 4 bits, its start
    assert res.evals == len(searched) + 1
    final = [r for r in res.log if r["data"] == "evaluation"]
    assert len(final) == 1 and final[0]["evals"] == res.evals
    assert final[0]["search_loss_after"] == pytest.approx(1.1 * loss)
    with pytest.raises(MpsearchError, match="one count per rung"):
        refine(table, get_solver("ilp"), {"t": 4.0}, history, lambda p: 1.0, method="evolve", rounds=1,
               search=lambda p, level: 1.0, levels=3, survivors=(2,))


def test_pairwise_ilp_equals_brute_force():
    rng = np.random.default_rng(5)
    damage = rng.uniform(0, 1, (5, 3)) * np.array([3.0, 1.0, 0.1])
    table = table_of(damage)
    budget = Budget(constraints={"avg_bits": 4.4})
    problem = compile_problem(table, budget)
    terms = [(0, 1, rng.normal(0, 1.0, (3, 3))), (2, 4, rng.normal(0, 1.0, (3, 3))),
             (1, 3, -np.abs(rng.normal(0, 0.5, (3, 3))))]
    sol = solve_pairwise(problem, terms)
    best = min((pairwise_damage(problem, terms, ks), ks) for ks in itertools.product(range(3), repeat=5)
               if problem.is_feasible(np.array(ks)))
    assert sol.status == "optimal"
    assert pairwise_damage(problem, terms, sol.choice) == pytest.approx(best[0], abs=1e-6)
    # without terms it is the plain ILP
    plain = solve_pairwise(problem, [])
    assert problem.totals(plain.choice)["damage"] == pytest.approx(
        ILPSolver().solve(table, budget).plan.predicted["damage"])


def test_block_pairs_and_pair_terms():
    names = ["m.layers.0.self_attn.q_proj", "m.layers.0.self_attn.k_proj", "m.layers.0.self_attn.v_proj",
             "m.layers.0.self_attn.o_proj", "m.layers.0.mlp.gate_proj", "m.layers.0.mlp.up_proj",
             "m.layers.1.self_attn.q_proj"]
    pairs = block_pairs(names)
    assert set(pairs) == {(names[0], names[1]), (names[0], names[2]), (names[1], names[2]), (names[4], names[5])}
    table = table_of(np.ones((7, 3)), names=names)
    problem = compile_problem(table, Budget(ties=[r"m\.layers\.0\.self_attn\.(?:q|k)_proj"]))
    terms = pair_terms(problem, [(names[0], names[1], "int2", "int4", 1.0), (names[0], names[2], "int2", "int8", 2.0)])
    assert len(terms) == 1  # q and k are one tied item: their pair is left out
    i, j, m = terms[0]
    assert m.sum() == 2.0


def test_risk_adjusted_ilp_prefers_the_certain_option():
    # layer 0: int4 expected 1.0 +- 0 vs layer 1: int4 expected 0.9 +- 1.0; one of them must go to 2 bits
    damage = np.array([[2.0, 1.0, 0.0], [2.0, 0.9, 0.0]])
    std = np.array([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    table = table_of(damage, names=["x", "y"], std=std)
    budget = Budget(constraints={"avg_bits": 6})  # one layer at 8 bits, the other at 4
    plain = ILPSolver().solve(table, budget).plan
    risky = ILPSolver(risk=1.0).solve(table, budget).plan
    assert plain.bits == {"x": 8, "y": 4}  # expected damage: y at 4 bits (0.9 < 1.0)
    assert risky.bits == {"x": 4, "y": 8}  # risk: 0.9 + 1.0 > 1.0 + 0
    assert risky.predicted["damage"] == pytest.approx(1.0) and risky.predicted["risk_damage"] == pytest.approx(1.0)
    assert ILPSolver(risk=0.05).solve(table, budget).plan.bits == plain.bits  # 0.9 + 0.05 < 1.0
    damage2 = damage
    with pytest.raises(MpsearchError, match="needs a 'damage_std' column"):
        risk_adjusted(table_of(damage2, names=["x", "y"]), 1.0)
    with pytest.raises(MpsearchError, match="risk=1.0: solve a table"):
        ILPSolver(risk=1.0).solve_problem(compile_problem(table, budget))


def test_frontier_csv_and_plot_carry_damage_std(tmp_path):
    """frontier --table on a table with damage_std: each point's damage_std is the quadrature sum of
    its layers' (hand-computed here), and the plot draws error bars from it."""
    from mpsearch.cli import main
    from mpsearch.plotting import frontier_plot_data

    damage = np.array([[4.0, 1.0, 0.0], [2.0, 0.5, 0.0]])
    std = np.array([[0.3, 0.4, 0.0], [1.2, 0.5, 0.0]])
    table = table_of(damage, names=["x", "y"], std=std)
    table.write(tmp_path / "t.csv")
    rc = main(["frontier", "--table", str(tmp_path / "t.csv"), "--solver", "exhaustive", "--points", "9",
               "-o", str(tmp_path / "f.csv"), "--plot", str(tmp_path / "f.png")])
    assert rc == 0 and (tmp_path / "f.png").is_file()
    f = pd.read_csv(tmp_path / "f.csv")
    import json

    for _, r in f.iterrows():
        bits = json.loads(r["plan"])
        ks = [{2: 0, 4: 1, 8: 2}[bits[n]] for n in ("x", "y")]
        assert r["damage_std"] == pytest.approx(np.hypot(std[0, ks[0]], std[1, ks[1]]))
    d = frontier_plot_data(f)
    assert d["yerr"] is not None and len(d["yerr"]) == len(d["y"])


def test_frontier_table_ilp_risk_sweeps_the_risk_adjusted_damage(tmp_path):
    from mpsearch.cli import main

    damage = np.array([[2.0, 1.0, 0.0], [2.0, 0.9, 0.0]])
    std = np.array([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    table_of(damage, names=["x", "y"], std=std).write(tmp_path / "t.csv")
    rc = main(["frontier", "--table", str(tmp_path / "t.csv"), "--solver", "ilp", "--param", "risk=1.0",
               "--points", "7", "-o", str(tmp_path / "f.csv")])
    assert rc == 0
    f = pd.read_csv(tmp_path / "f.csv")
    import json

    at6 = [json.loads(p) for p, a in zip(f["plan"], f["avg_bits"]) if abs(a - 6) < 1e-9]
    assert at6 == [{"x": 4, "y": 8}]  # the certain layer takes the 4 bits (risk 0: y would)
    rc = main(["frontier", "--table", str(tmp_path / "t.csv"), "--solver", "ilp", "--points", "7",
               "-o", str(tmp_path / "g.csv")])
    g = pd.read_csv(tmp_path / "g.csv")
    assert [json.loads(p) for p, a in zip(g["plan"], g["avg_bits"]) if abs(a - 6) < 1e-9] == [{"x": 8, "y": 4}]


def test_output_distance_damage_std_is_the_standard_error_across_batches():
    """Two batches of different sizes: each single-batch table gives that batch's distances; the
    two-batch table's damage is their size-weighted mean and damage_std its standard error."""
    from mpsearch import get_estimator, zoo

    model = zoo.digits_mlp()
    x, y = zoo.digits("train")
    b1, b2 = (x[:40], y[:40]), (x[40:100], y[40:100])
    est = get_estimator("output-distance", options="2,4,8")
    t1, t2 = (est.estimate(model, [b], progress=False).pivot() for b in (b1, b2))
    both = est.estimate(model, [b1, b2], progress=False)
    mean = (40 * t1 + 60 * t2) / 100
    var = (40 * (t1 - mean) ** 2 + 60 * (t2 - mean) ** 2) / 100
    np.testing.assert_allclose(both.pivot().to_numpy(), mean.to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(both.pivot("damage_std").to_numpy(), np.sqrt(var / (2 - 1)).to_numpy(), rtol=1e-9)
    assert (both.pivot("damage_std").to_numpy() > 0).all()
