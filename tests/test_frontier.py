"""Frontiers against synthetic tables with known exact frontiers; the CSV contract, plans and plot;
the frontier command; measured-objective modes; optuna resume; light imports."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from mpsearch.budget import Budget
from mpsearch.cli import main
from mpsearch.errors import BudgetError, MpsearchError
from mpsearch.frontier import Frontier, FrontierPoint, compute_frontier, non_dominated, read_points
from mpsearch.plan import BitPlan
from mpsearch.plotting import frontier_plot_data, save_frontier_plot
from mpsearch.problem import compile_problem
from mpsearch.registry import get_solver
from mpsearch.solvers.dp import DPSolver
from mpsearch.synthetic import exact_frontier, random_table, tiny_table, transformer_table


def on_known(frame, known, column="size_bits"):
    """Every row of ``frame`` is a point of the exact frontier ``known``."""
    pts = set(zip(known[column].round(6), known["damage"].round(9)))
    return all((round(r[column], 6), round(r["damage"], 9)) in pts for _, r in frame.iterrows())


def test_tiny_table_ships_its_exact_frontier():
    """Against a plain enumeration of the 81 plans with a pairwise dominance test."""
    import itertools

    table, known = tiny_table()
    rows = table.frame.set_index(["layer", "option"])
    plans = []
    for combo in itertools.product(table.options, repeat=len(table.layers)):
        pick = dict(zip(table.layers, combo))
        plans.append((sum(rows.loc[k, "size_bits"] for k in pick.items()),
                      sum(rows.loc[k, "damage"] for k in pick.items()), pick))
    front = [p for p in plans
             if not any(q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1]) for q in plans)]
    front = sorted({(s, d): pick for s, d, pick in front}.items())  # equal points once
    assert len(table.layers) == 4 and len(known) == len(front) >= 10
    assert known["size_bits"].tolist() == [s for (s, _), _ in front]
    assert known["damage"].tolist() == pytest.approx([d for (_, d), _ in front], rel=1e-12)
    for plan, (_, pick) in zip(known["plan"], front):
        assert _independent_sums(table, plan) == _independent_sums(table, pick)


@pytest.mark.parametrize("seed", range(15))
def test_dp_frontier_is_the_exact_frontier(seed):
    table = random_table(5, bits=(2, 3, 4, 8), seed=seed, groups=seed % 2, min_params=16, max_params=300)
    known = exact_frontier(table, "size_bits")
    fr = DPSolver().frontier(compile_problem(table, Budget.parse(["size_bits=1e12"])))
    assert fr["stats"]["mode"] == "exact"
    assert np.array_equal(fr["cost"], known["size_bits"].to_numpy())
    assert np.allclose(fr["damage"], known["damage"], rtol=1e-12)


@pytest.mark.parametrize("solver", ["ilp", "exhaustive", "greedy", "baq", "evolutionary"])
def test_swept_and_evolutionary_points_lie_on_the_known_frontier(solver):
    table, known = tiny_table()
    frame = compute_frontier(table, solver, points=12, key="size_bits").to_frame()
    assert len(frame) >= 5 and on_known(frame, known)
    assert frame["size_bits"].is_monotonic_increasing and frame["damage"].is_monotonic_decreasing


def test_exact_sweep_finds_the_best_known_point_under_each_budget():
    table, known = tiny_table()
    frame = compute_frontier(table, "ilp", points=10, key="size_bits").to_frame()
    lo, hi = known["size_bits"].min(), known["size_bits"].max()
    for v in np.linspace(lo, hi, 10):
        best = known[known["size_bits"] <= v + 1e-9]["damage"].min()
        got = frame[frame["size_bits"] <= v + 1e-9]["damage"].min()
        assert got == pytest.approx(best, rel=1e-12)


def test_dp_points_thin_the_whole_frontier_like_a_sweep():
    table = transformer_table(30, seed=1)
    whole = compute_frontier(table, "dp", key="avg_bits")
    thin = compute_frontier(table, "dp", points=7, key="avg_bits")
    ilp = compute_frontier(table, "ilp", points=7, key="avg_bits")
    assert len(thin) <= 7 < len(whole)
    assert np.allclose(thin.to_frame()["damage"], ilp.to_frame()["damage"], rtol=1e-9)
    assert all(p.status == "optimal" for p in whole.points)


def test_frontier_honours_other_constraints_and_pins():
    table = random_table(8, seed=4, min_params=16, max_params=300)
    bops = float(table.frame.groupby("layer").bops.max().sum() * 0.6)
    budget = Budget.parse([f"bops={bops}"], pins=["layer0000=int8"])
    fr = compute_frontier(table, "ilp", points=6, budget=budget)
    assert len(fr) >= 2
    for p in fr.points:
        assert p.predicted["bops"] <= bops and p.plan.bits["layer0000"] == 8
    evo = compute_frontier(table, get_solver("evolutionary", generations=30), budget=budget)
    assert all(p.predicted["bops"] <= bops and p.plan.bits["layer0000"] == 8 for p in evo.points)


def test_infeasible_other_constraint_is_a_status():
    fr = compute_frontier(random_table(5, seed=0), "dp", budget=Budget.parse(["bops=1"]))
    assert fr.status == "infeasible" and not fr.points
    assert "smallest achievable bops is" in fr.message


def test_write_csv_contract_with_plan_files(tmp_path):
    table = random_table(6, seed=2, min_params=16, max_params=300)
    fr = compute_frontier(table, "dp", points=8)
    fr.add_measured(0, accuracy=0.5)
    path = fr.write(tmp_path / "out" / "frontier.csv", plans_dir=tmp_path / "out" / "plans")
    frame = pd.read_csv(path)
    assert list(frame.columns[:4]) == ["point", "damage", "size_bits", "avg_bits"]
    assert {"bops", "latency", "budget", "status", "plan", "measured_accuracy"} <= set(frame.columns)
    assert "params" not in frame.columns
    assert frame["size_bits"].is_monotonic_increasing
    assert frame.loc[0, "measured_accuracy"] == 0.5 and frame["measured_accuracy"].isna().sum() == len(frame) - 1
    rows = table.frame.set_index(["layer", "option"])
    for _, r in frame.iterrows():
        plan = BitPlan.load(path.parent / r["plan"])
        dmg = sum(rows.loc[(n, plan.option_name(n)), "damage"] for n in plan.bits)
        assert dmg == pytest.approx(r["damage"], rel=1e-9)
        assert plan.predicted["damage"] == pytest.approx(r["damage"], rel=1e-12)


def test_without_plans_dir_the_plan_column_holds_the_bits(tmp_path):
    fr = compute_frontier(tiny_table()[0], "dp", key="size_bits")
    frame = pd.read_csv(fr.write(tmp_path / "f.csv"))
    bits = json.loads(frame.loc[len(frame) - 1, "plan"])
    assert bits == fr.points[-1].plan.bits


def test_non_dominated_filter():
    frame = pd.DataFrame({"size_bits": [3, 1, 2, 2, 4], "damage": [1.0, 5.0, 2.0, 3.0, 1.0]})
    out = non_dominated(frame)
    assert out["size_bits"].tolist() == [1, 2, 3] and out["damage"].tolist() == [5.0, 2.0, 1.0]
    with pytest.raises(MpsearchError, match="non_dominated: the frame has no column 'bops'"):
        non_dominated(frame, x="bops")


def test_frontier_bad_inputs():
    table = random_table(4, seed=0)
    with pytest.raises(MpsearchError, match="points must be a positive integer"):
        compute_frontier(table, "dp", points=0)
    with pytest.raises(BudgetError, match="the frontier sweeps avg_bits; drop it from the budget"):
        compute_frontier(table, "dp", budget=Budget.parse(["avg_bits=4"]))
    with pytest.raises(MpsearchError, match="unknown solver 'dq'"):
        compute_frontier(table, "dq")
    with pytest.raises(MpsearchError, match="needs a plan or a factory"):
        FrontierPoint({"damage": 1.0})
    with pytest.raises(MpsearchError, match="random_table: n_layers must be >= 1"):
        random_table(0)
    with pytest.raises(MpsearchError, match="exact_frontier: .* is more than max_plans=10"):
        exact_frontier(table, max_plans=10)


def test_plot_data_and_file(tmp_path):
    fr = compute_frontier(tiny_table()[0], "dp", key="size_bits")
    d = frontier_plot_data(fr)
    assert d["x_label"] == "average bits per weight" and np.all(np.diff(d["x"]) > 0)
    d = frontier_plot_data(fr, x="size_bits")
    assert d["x"][0] == pytest.approx(fr.points[0].predicted["size_bits"] / 8e6)
    with pytest.raises(MpsearchError, match="frontier plot: no column 'measured_accuracy'"):
        frontier_plot_data(fr, y="measured_accuracy")
    save_frontier_plot({"dp": fr, "greedy": compute_frontier(tiny_table()[0], "greedy")}, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_frontier(tmp_path, capsys):
    table = random_table(12, seed=3, min_params=16, max_params=300).write(tmp_path / "t.csv")
    out = tmp_path / "f.csv"
    rc = main(["frontier", "--table", str(table), "--solver", "dp", "--points", "6", "-o", str(out),
               "--plans-dir", str(tmp_path / "plans"), "--plot", str(tmp_path / "f.png")])
    assert rc == 0 and "non-dominated points" in capsys.readouterr().out
    frame = pd.read_csv(out)
    assert 2 <= len(frame) <= 6 and (tmp_path / "f.png").exists()
    assert all((tmp_path / p).exists() for p in frame["plan"])
    rc = main(["frontier", "--table", str(table), "--solver", "greedy", "--budget", "bops=1", "-o", str(tmp_path / "g.csv")])
    assert rc == 3 and "smallest achievable bops" in capsys.readouterr().err
    assert not (tmp_path / "g.csv").exists()
    rc = main(["frontier", "--table", str(table), "--points", "0", "-o", str(tmp_path / "h.csv")])
    assert rc == 2 and "--points must be a positive integer" in capsys.readouterr().err
    rc = main(["frontier", "-o", str(tmp_path / "h.csv")])
    assert rc == 2 and "frontier needs --table" in capsys.readouterr().err


def _independent_sums(table, options: dict) -> tuple[float, float]:
    rows = table.frame.set_index(["layer", "option"])
    return (float(sum(rows.loc[(n, o), "size_bits"] for n, o in options.items())),
            float(sum(rows.loc[(n, o), "damage"] for n, o in options.items())))


def test_big_frontier_writes_a_bounded_csv_and_every_point_to_the_npz(tmp_path):
    table = random_table(40, seed=8, min_params=16, max_params=3000)
    fr = compute_frontier(table, "dp", key="size_bits")
    assert len(fr) > 50
    path = fr.write(tmp_path / "f.csv", max_points=12)
    frame = pd.read_csv(path)
    assert len(frame) <= 12 and frame["size_bits"].is_monotonic_increasing
    points, options = read_points(path)
    assert len(points) == len(fr) and (points["damage"].diff().dropna() < 0).all()
    for i in (0, len(points) // 2, len(points) - 1):  # the npz's plans have the sums it states
        size, dmg = _independent_sums(table, options(i))
        assert size == points.loc[i, "size_bits"] and dmg == pytest.approx(points.loc[i, "damage"], rel=1e-12)
    for _, r in frame.iterrows():  # each CSV row is the npz point it names
        assert points.loc[r["index"], "size_bits"] == r["size_bits"]
    with pytest.raises(MpsearchError, match="max_points must be a positive integer"):
        fr.write(tmp_path / "g.csv", max_points=0)


def test_discretised_dp_frontier_states_true_bounds_and_exact_points_per_budget():
    table = random_table(6, bits=(2, 3, 4, 8), seed=12, min_params=16, max_params=300)
    known = exact_frontier(table, "size_bits")
    solver = get_solver("dp", max_units=25)
    whole = compute_frontier(table, solver, key="size_bits")
    assert whole.stats["mode"] == "discretised"
    for p in whole.points:  # no plan of that size beats the stated bound
        best = known[known["size_bits"] <= p.predicted["size_bits"]]["damage"].min()
        assert p.bound <= best * (1 + 1e-12) and p.predicted["damage"] >= best * (1 - 1e-12)
        assert p.status == "optimal" or p.predicted["damage"] > p.bound
    lo, hi = known["size_bits"].min(), known["size_bits"].max()
    thin = compute_frontier(table, solver, points=9, key="size_bits")
    assert all(p.status == "optimal" for p in thin.points)
    frame = thin.to_frame()
    for v in np.linspace(lo, hi, 9):
        best = known[known["size_bits"] <= v + 1e-9]["damage"].min()
        assert frame[frame["size_bits"] <= v + 1e-9]["damage"].min() == pytest.approx(best, rel=1e-12)


def test_frontier_outputs_appear_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    table = random_table(12, seed=3, min_params=16, max_params=300).write(tmp_path / "t.csv")
    out = tmp_path / "out"
    args = ["frontier", "--table", str(table), "--solver", "dp", "--points", "6", "-o", str(out / "f.csv"),
            "--plans-dir", str(out / "plans")]
    real_save, calls = BitPlan.save, []

    def failing_save(self, path):
        calls.append(path)
        if len(calls) == 3:
            raise MpsearchError("disk full (simulated)")
        return real_save(self, path)

    monkeypatch.setattr(BitPlan, "save", failing_save)
    assert main(args) == 2 and "disk full" in capsys.readouterr().err
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []
    monkeypatch.setattr(BitPlan, "save", real_save)
    assert main(args) == 0
    first = sorted(p.name for p in (out / "plans").iterdir())
    assert sorted(p.name for p in out.iterdir()) == ["f.csv", "f.npz", "plans"] and len(first) >= 2
    # a second run puts its own plans in place: each CSV row names a plan with that row's sums
    assert main(args[:6] + ["2"] + args[7:]) == 0
    frame = pd.read_csv(out / "f.csv")
    assert len(frame) <= 2 and sorted(p.name for p in out.iterdir()) == ["f.csv", "f.npz", "plans"]
    for _, r in frame.iterrows():
        assert BitPlan.load(out / r["plan"]).predicted["damage"] == pytest.approx(r["damage"], rel=1e-12)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind


def _measured(plan):
    """A cheap stand-in for a measured loss: prefers 4 bits everywhere, and 8 bits on layer0001."""
    return sum((b - (8 if n == "layer0001" else 4)) ** 2 for n, b in plan.bits.items())


def _best_measured(table, budget):
    import itertools

    best = np.inf
    f = table.frame.set_index(["layer", "option"])
    params = sum(table.layer_params().values())
    for combo in itertools.product(table.options, repeat=len(table.layers)):
        pick = dict(zip(table.layers, combo))
        size = sum(f.loc[(n, o), "size_bits"] for n, o in pick.items())
        if size / params <= budget:
            best = min(best, _measured(BitPlan(bits={n: int(f.loc[(n, o), "bits"]) for n, o in pick.items()})))
    return best


def test_evolutionary_measured_objective_finds_the_optimum():
    table = random_table(5, bits=(2, 4, 8), seed=6, min_params=16, max_params=300)
    calls = []

    def objective(plan):
        calls.append(1)
        return _measured(plan)

    res = get_solver("evolutionary", objective=objective, generations=40, warm_start=False).solve(
        table, Budget.parse(["avg_bits=5"]))
    assert res.stats["objective"] == _best_measured(table, 5) == _measured(res.plan)
    assert 0 < len(calls) <= res.stats["evaluations"] and len(calls) <= 3 ** 5  # cached per genome


def test_optuna_measured_objective_and_nsga2():
    table = random_table(5, bits=(2, 4, 8), seed=6, min_params=16, max_params=300)
    budget = Budget.parse(["avg_bits=5"])
    for sampler in ("tpe", "nsga2"):
        res = get_solver("optuna", sampler=sampler, n_trials=40, objective=_measured).solve(table, budget)
        assert res.ok and res.stats["objective"] == _measured(res.plan)
        assert res.stats["objective"] <= _measured(get_solver("greedy").solve(table, budget).plan)
        assert res.plan.predicted["avg_bits"] <= 5


def test_optuna_study_resumes_from_storage(tmp_path):
    table = random_table(5, bits=(2, 4, 8), seed=1, min_params=16, max_params=300)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    budget = Budget.parse(["avg_bits=4"])
    first = get_solver("optuna", n_trials=3, storage=url, study_name="s").solve(table, budget)
    second = get_solver("optuna", n_trials=6, storage=url, study_name="s").solve(table, budget)
    assert first.stats["trials"] == 3 and second.stats["trials"] == 6 and second.stats["resumed_from"] == 3
    assert second.plan.predicted["damage"] <= first.plan.predicted["damage"]


def test_importing_solvers_frontier_and_plotting_stays_light():
    code = ("import sys, mpsearch.frontier, mpsearch.plotting, mpsearch.synthetic, mpsearch.solvers.ilp, "
            "mpsearch.solvers.optuna_solver, mpsearch.solvers.dp, mpsearch.solvers.baq, "
            "mpsearch.solvers.evolutionary, mpsearch.cli.frontier\n"
            "heavy = [m for m in ('optuna', 'pulp', 'matplotlib', 'torch') if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
