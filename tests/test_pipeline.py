"""The measured frontier pipeline on small trained models, and the frontier CLI's model path."""

import importlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from mpsearch import zoo
from mpsearch.cli import main
from mpsearch.errors import MpsearchError
from mpsearch.metrics import Accuracy, FunctionMetric
from mpsearch.pipeline import ProxyWarning, measured_frontier, pareto, spread


@pytest.fixture(scope="module")
def digits():
    model = zoo.digits_mlp()
    return model, zoo.digits_batches("train"), zoo.digits_batches("test")


def test_pareto_and_spread_exact():
    pts = pd.DataFrame({"size_bits": [3, 1, 2, 2, 4], "damage": [1.0, 5.0, 2.0, 3.0, 1.0]})
    front = pareto(pts)
    assert front[["size_bits", "damage"]].values.tolist() == [[1, 5.0], [2, 2.0], [3, 1.0]]
    assert spread([0, 1, 2, 3, 4, 5, 6, 7, 8], 3) == [0, 4, 8]
    assert spread([0, 1, 2], 5) == [0, 1, 2] and spread([1, 2], 0) == []


def test_measured_frontier_on_digits(digits, tmp_path):
    model, calib, evals = digits
    run = measured_frontier(model, calib, Accuracy(evals), estimator="weight-error", solver="greedy",
                            options="2,3,4,8", validate=3, out=tmp_path, progress=False)
    f = run.frontier
    assert list(f["size_bits"]) == sorted(f["size_bits"])
    assert np.all(np.diff(f["damage"]) < 0)  # non-dominated: damage falls as size grows
    val = run.validated()
    assert len(val) >= 3
    # the measured size of the planned layers is exactly the predicted one
    assert np.allclose(val["measured_avg_bits"], val["avg_bits"])
    assert list(run.uniform["bits"]) == [2, 3, 4, 8]
    # uniform 8 bits keeps the accuracy of the fp32 model within one point
    assert abs(run.uniform.set_index("bits").loc[8, "measured_accuracy"] - run.baseline) <= 1.0
    # a plan is validated at the size of each inner uniform bit-width, and recommended there
    for opt in run.uniform["option"].iloc[1:-1]:
        assert (val["at_budget"].str.split(",").apply(lambda xs: opt in xs)).sum() == 1
    assert list(run.recommended["budget"]) == list(run.uniform["option"].iloc[1:-1])
    for name in ("table.csv", "frontier.csv", "uniform.csv", "summary.json", "frontier.png",
                 "plan_bits.png", "sensitivity.png"):
        assert (tmp_path / name).is_file(), name
    csv = pd.read_csv(tmp_path / "frontier.csv")
    assert all((tmp_path / p).is_file() for p in csv["plan"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["proxy"]["spearman"] == pytest.approx(run.proxy["spearman"])


def test_interrupted_run_resumes_from_caches(digits, tmp_path, monkeypatch):
    model, calib, evals = digits
    kw = dict(estimator="weight-error", solver="greedy", options="2,4,8", validate=2, out=tmp_path,
              progress=False, plots=False)
    first = measured_frontier(model, calib, Accuracy(evals), **kw)
    import mpsearch.sensitivity.weight_error as we

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(we.WeightErrorEstimator, "_damage", boom)
    measure_mod = importlib.import_module("mpsearch.measured.measure")  # (the package exports a function measure)
    monkeypatch.setattr(measure_mod, "validate_plan", boom)  # where the measurement calls it
    second = measured_frontier(model, calib, Accuracy(evals), **kw)  # table and measurements cached
    pd.testing.assert_frame_equal(first.frontier, second.frontier)
    pd.testing.assert_frame_equal(first.recommended, second.recommended)


def test_proxy_warning_when_ranking_is_poor(digits):
    model, calib, _ = digits
    w0 = [p.detach().clone() for p in model.parameters()]

    def drift(m):  # "quality" that grows with the weight change: ranks plans backwards
        return float(sum((p.detach() - q).abs().sum() for p, q in zip(m.parameters(), w0)))

    with pytest.warns(ProxyWarning, match="ranks the .* measured plans poorly"):
        run = measured_frontier(model, calib, FunctionMetric(drift), options="2,4,8", validate=3,
                                progress=False)
    assert run.proxy["poor"] and run.proxy["spearman"] < 0


def test_pipeline_bad_input(digits):
    model, calib, evals = digits
    with pytest.raises(MpsearchError, match="metric must be an mpsearch.metrics.Metric"):
        measured_frontier(model, calib, lambda m: 1.0)
    with pytest.raises(MpsearchError, match="validate must be an integer >= 0"):
        measured_frontier(model, calib, Accuracy(evals), validate=-1)
    with pytest.raises(MpsearchError, match="unknown solver 'gredy'"):
        measured_frontier(model, calib, Accuracy(evals), solver="gredy", progress=False)


def test_cli_frontier_model_path(tmp_path, capsys):
    rc = main(["frontier", "--model", "digits-mlp", "--solver", "greedy", "--bits", "2,4,8",
               "--validate", "2", "-o", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0 and "proxy check" in out and (tmp_path / "out" / "frontier.csv").is_file()


@pytest.mark.parametrize("spec,message", [
    ("/no/such/dir", "no such directory"),
    ("EMPTY", "has no config.json"),
    ("tests/core_models.py:tiny_cnn_input", "returned Tensor, not a torch.nn.Module"),
    ("torch.nn:ReLU", "has no quantizable layer"),
])
def test_cli_bad_model_specs_exit_2(spec, message, tmp_path, capsys):
    if spec == "EMPTY":
        spec = str(tmp_path)
    rc = main(["frontier", "--model", spec, "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1


def test_cli_empty_text_file_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    rc = main(["frontier", "--model", "minilm", "--data", str(empty), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "the text file is empty" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="session")
def fashion_cnn():
    if not zoo.fashion_mnist_available():
        pytest.skip("Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)")
    return zoo.fashion_mnist_cnn(progress=False)  # trained once, then loaded from the disk cache


def test_fashion_cnn_default_recipe_beats_uniform_at_3_bits(fashion_cnn):
    """The default recipe (output-distance + ilp, asymmetric per-channel options) against uniform
    int3-asym at the same size, measured on 2,000 test images: strictly closer to the fp32 model
    (KL 0.0220 vs 0.0247 here; 0.0238 vs 0.0247 on the 10,000 images of experiments/measured_loop.md,
    with the CNN this machine trains), recommended, and no less accurate beyond noise."""
    from mpsearch import apply_plan
    from mpsearch.metrics import KLDivergence
    from mpsearch.plan import BitPlan

    evals = zoo.fashion_batches("test", n=2000, batch_size=500)
    calib = zoo.fashion_batches("train", n=256, batch_size=128)
    run = measured_frontier(fashion_cnn, calib, KLDivergence(evals), estimator="output-distance", solver="ilp",
                            options="int2-asym,int3-asym,int4-asym,int8-asym", validate=0, progress=False)
    u = run.uniform.set_index("option")
    val = run.validated()
    hit = val[val["at_budget"].str.split(",").apply(lambda xs: "int3-asym" in xs)]
    assert len(hit) == 1 and hit["measured_avg_bits"].iloc[0] <= u.loc["int3-asym", "avg_bits"] + 1e-9
    plan = run.plans[int(hit["point"].iloc[0])]
    assert len({plan.option_name(lay) for lay in plan.layers}) > 1  # really mixed, not the uniform plan
    assert hit["measured_kl"].iloc[0] < u.loc["int3-asym", "measured_kl"]
    rec = run.recommended.set_index("budget").loc["int3-asym"]
    assert rec["status"] == "mixed" and rec["plan"] == f"point-{int(hit['point'].iloc[0])}"
    acc = Accuracy(evals)
    uniform = apply_plan(fashion_cnn, BitPlan.uniform(plan.layers, "int3-asym"))
    assert acc(apply_plan(fashion_cnn, plan)) >= acc(uniform) - 0.5  # 0.5 points: noise of 2,000 images


# ------------------------------------------------------------------ measured guarantees (issue 14)
def test_recommended_plan_never_worse_than_uniform(digits):
    """At the size of every inner uniform option the recommended plan measured at most the uniform
    plan's loss (here KL to the fp32 model, a loss every plan can be compared on)."""
    from mpsearch.metrics import KLDivergence

    model, calib, evals = digits
    run = measured_frontier(model, calib, KLDivergence(evals), estimator="weight-error", solver="ilp",
                            options="2,3,4,8", validate=2, points=6, progress=False)
    u = run.uniform.set_index("option")
    rec = run.recommended.set_index("budget")
    assert set(rec.index) == {"int3", "int4"}
    for opt, r in rec.iterrows():
        assert r["measured_loss"] <= u.loc[opt, "measured_loss"] + 1e-12
        assert r["size_bits"] <= u.loc[opt, "size_bits"] + 1e-9
    # each measured point carries the uniform comparison
    val = run.validated()
    assert val["beats_uniform"].notna().all() and val["uniform_at_size"].ne("").any()


def test_a_plan_solved_at_a_uniform_size_is_compared_with_that_uniform_plan():
    """SmolLM2-shaped numbers (frontier.csv of experiments/measured_loop.md): the ILP's plan at
    int4-asym's size comes out a few bits smaller (4.030402 vs 4.030439 bits/weight), and was compared
    with the next smaller uniform plan (int3-g32-asym, KL 1.655) instead of int4-asym (1.072),
    overstating its win; the same at int3-asym's size. recommended.csv was right all along."""
    from mpsearch.measured import compare_with_uniform

    params = 134_515_008  # SmolLM2-135M's planned weights
    uni = pd.DataFrame({"option": ["int2-asym", "int3-asym", "int3-g32-asym", "int4-asym"],
                        "size_bits": [a * params for a in (2.030439, 3.030439, 3.530439, 4.030439)],
                        "measured_loss": [6.2, 3.1, 1.655, 1.072]})
    mixed = pd.DataFrame({"measured_size_bits": [4.030402 * params, 3.030401 * params, 2.5 * params],
                          "measured_loss": [0.9, 1.9, 4.0]})
    out = compare_with_uniform(mixed, uni)
    assert out["uniform_at_size"].tolist() == ["int4-asym", "int3-asym", "int2-asym"]
    assert out["uniform_loss"].tolist() == [1.072, 3.1, 6.2]
    assert out["beats_uniform"].tolist() == [True, True, True]
    # a uniform plan clearly larger (0.5% here) is not "of equal size"
    far = compare_with_uniform(pd.DataFrame({"measured_size_bits": [4.01 * params], "measured_loss": [1.5]}), uni)
    assert far["uniform_at_size"].tolist() == ["int3-g32-asym"] and far["beats_uniform"].tolist() == [True]


def mixing_penalty(model):
    """Quality that punishes mixed precision: minus the spread (over layers) of log2 of the number of
    distinct values in the first weight row. Uniform plans score about 0, mixed ones lower."""
    counts = [torch.unique(m.weight[0]).numel() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return -float(np.std(np.log2(counts)))


def test_uniform_better_status_when_mixed_plans_lose(digits, tmp_path):
    model, calib, _ = digits
    with pytest.warns(UserWarning, match="measured worse .* than uniform int"):
        run = measured_frontier(model, calib, FunctionMetric(mixing_penalty), estimator="weight-error",
                                solver="ilp", options="2,4,8", validate=0, points=4, budgets=(5.0,),
                                match_uniform=False, out=tmp_path, plots=False, progress=False)
    rec = run.recommended.set_index("budget").loc["avg_bits=5"]
    u = run.uniform.set_index("option")
    best_uniform = u.loc[u["avg_bits"] <= 5, "measured_loss"].idxmin()  # int2 or int4, whichever measured better
    assert rec["status"] == "uniform_better" and rec["plan"] == f"uniform-{best_uniform}"
    assert rec["measured_loss"] == u.loc[best_uniform, "measured_loss"] < rec["best_mixed_loss"]
    assert len(set(run.plan_of(rec["plan"]).bits.values())) == 1
    mixed = run.frontier[run.frontier["at_budget"] == "avg_bits=5"].iloc[0]
    assert mixed["beats_uniform"] == False and mixed["uniform_at_size"] == best_uniform  # noqa: E712
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["recommended"][0]["status"] == "uniform_better" and summary["uniform_check"]["loses"] >= 1
    csv = pd.read_csv(tmp_path / "frontier.csv")
    assert {"beats_uniform", "uniform_at_size", "vs_uniform_line"} <= set(csv.columns)


def test_refinement_never_worse_and_within_its_measurement_budget(digits, tmp_path):
    from mpsearch.metrics import KLDivergence

    model, calib, evals = digits
    kw = dict(estimator="weight-error", solver="ilp", options="2,3,4,8", validate=0, points=4, progress=False,
              plots=False)
    base = measured_frontier(model, calib, KLDivergence(evals), **kw)
    for method in ("calibrate", "local", "both"):
        run = measured_frontier(model, calib, KLDivergence(evals), refine=2, refine_method=method, refine_evals=5,
                                refine_params={"swaps": 2}, **kw)
        assert run.refinement["evals"].sum() <= 5 and len(run.refined) <= 5
        b, r = base.recommended.set_index("budget"), run.recommended.set_index("budget")
        assert (r["measured_loss"] <= b["measured_loss"] + 1e-12).all()
        assert (run.refinement["gain"] >= 0).all()


def test_cli_frontier_model_honours_every_flag(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["frontier", "--model", "digits-mlp", "--solver", "ilp", "--bits", "2,4,8", "--validate", "2",
               "--points", "5", "--key", "avg_bits", "--budget", "avg_bits=5", "--pin", "4=8",
               "--min-bits", "2", "--max-bits", "8", "--estimator", "weight-error",
               "--estimator-param", "weighted=True", "--refine", "1", "--refine-method", "local",
               "--refine-evals", "2", "--plans-dir", str(tmp_path / "plans"), "--plot", str(tmp_path / "f.png"),
               "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "recommended" in text and "proxy check" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["points"] == 5 and summary["settings"]["budget"]["pins"] == {"4": "8"}
    table = pd.read_csv(out / "table.csv", comment="#", dtype={"layer": str})
    assert (tmp_path / "f.png").is_file() and len(list((tmp_path / "plans").glob("*.json"))) >= 2
    from mpsearch.plan import BitPlan

    assert "4" in set(table["layer"])
    for f in (tmp_path / "plans").glob("*.json"):
        assert BitPlan.load(f).bits["4"] == 8  # the pin holds at every point, refined ones too
    rec = pd.read_csv(out / "recommended.csv")
    assert "avg_bits=5" in set(rec["budget"]) and (rec["avg_bits"] <= 5 + 1e-9).all()
    from mpsearch.table import CostTable

    assert CostTable.read(out / "table.csv").metadata["params"]["weighted"] is True  # --estimator-param


def test_cli_frontier_model_infeasible_budget_exit_3(tmp_path, capsys):
    rc = main(["frontier", "--model", "digits-mlp", "--solver", "ilp", "--bits", "2,4,8", "--estimator",
               "weight-error", "--budget", "avg_bits=1", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 3 and "smallest achievable" in err


def test_failure_while_writing_leaves_no_partial_outputs(digits, tmp_path, monkeypatch):
    model, calib, evals = digits

    def boom(run, ax=None):
        raise RuntimeError("plot failed")

    monkeypatch.setattr("mpsearch.plotting.plot_measured_frontier", boom)
    with pytest.raises(RuntimeError, match="plot failed"):
        measured_frontier(model, calib, Accuracy(evals), estimator="weight-error", solver="greedy", options="2,4,8",
                          validate=2, points=4, out=tmp_path, progress=False)
    for name in ("plans", "frontier.csv", "summary.json", "recommended.csv"):
        assert not (tmp_path / name).exists(), name


def test_measurement_cache_is_keyed_by_the_evaluation_data(digits, tmp_path):
    """A second run on other evaluation data must measure again, not read the first run's numbers."""
    from mpsearch.metrics import KLDivergence

    model, calib, evals = digits
    kw = dict(estimator="weight-error", solver="greedy", options="2,4,8", validate=1, points=3, out=tmp_path,
              plots=False, progress=False)
    a = measured_frontier(model, calib, KLDivergence(evals), **kw)
    b = measured_frontier(model, calib, KLDivergence(calib), **kw)  # other data, same out folder
    ua, ub = a.uniform.set_index("option"), b.uniform.set_index("option")
    assert ua.loc["int2", "measured_kl"] != ub.loc["int2", "measured_kl"]
    assert ub.loc["int2", "measured_kl"] == pytest.approx(
        measured_frontier(model, calib, KLDivergence(calib), **{**kw, "out": None}).uniform
        .set_index("option").loc["int2", "measured_kl"])


def test_evolve_refinement_searches_the_calibration_data_and_measures_only_its_result(digits, tmp_path):
    """refine_method="evolve": its children are measured on the calibration data (the metric's
    on_data), the evaluation metric measures only the searched result, the recommendation stays
    never worse than uniform, the logs say which data each row is on, and the model comes back."""
    from mpsearch.metrics import KLDivergence

    model, calib, evals = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    counts = {"eval": 0, "search": 0}

    class Counted(KLDivergence):
        def __init__(self, batches, role="eval"):
            super().__init__(batches)
            self.role = role

        def on_data(self, data):
            return Counted(data, "search")

        def _measure(self, net):
            counts[self.role] += 1
            assert self.batches[0][0] is (evals if self.role == "eval" else calib)[0][0]
            return super()._measure(net)

    OPTS = "2,3,4,5,6,8"
    run = measured_frontier(model, calib, Counted(evals), estimator="output-distance", solver="ilp",
                            options=OPTS, validate=0, points=3, refine=6, refine_method="evolve",
                            refine_targets=["int4"], refine_params={"offspring": 4}, out=tmp_path, progress=False)
    assert run.refinement["data"].tolist().count("evaluation") == 1
    search_rows = run.refinement[run.refinement["data"] == "search"]
    final = run.refinement[run.refinement["data"] == "evaluation"].iloc[0]
    # the search metric's baseline, the start, the children; the evaluation measures the result once
    assert counts["search"] == 1 + final["evals"] - len(run.refined) == 2 + int(search_rows["evals"].sum())
    evaluated, counts["eval"] = counts["eval"], 0
    measured_frontier(model, calib, Counted(evals), estimator="output-distance", solver="ilp", options=OPTS,
                      validate=0, points=3, progress=False)
    assert evaluated == counts["eval"] + len(run.refined) and len(run.refined) == 1  # + the result, once
    assert (search_rows["loss_after"].diff().dropna() <= 0).all()
    rec = run.recommended.set_index("budget").loc["int4"]
    assert rec["measured_loss"] <= run.uniform.set_index("option").loc["int4", "measured_loss"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert (tmp_path / "refinement.csv").is_file()
    assert pd.read_csv(tmp_path / "refined.csv")["method"].tolist() == ["evolve"]
    # the search's checkpoint stays in the folder: more generations later continue it
    assert (tmp_path / "evolve" / "evolve-int4.json").is_file()
    counts["search"] = 0
    more = measured_frontier(model, calib, Counted(evals), estimator="output-distance", solver="ilp",
                             options=OPTS, validate=0, points=3, refine=9, refine_method="evolve",
                             refine_targets=["int4"], refine_params={"offspring": 4}, out=tmp_path, progress=False)
    rows = more.refinement[more.refinement["data"] == "search"].reset_index(drop=True)
    assert rows.iloc[: len(search_rows)][["round", "loss_after"]].equals(
        search_rows.reset_index(drop=True)[["round", "loss_after"]])  # the first run's generations, kept
    # measured now: the search metric's baseline and the generations after the first run's only
    assert counts["search"] == 1 + int(rows["evals"].sum()) - int(search_rows["evals"].sum())
    with pytest.raises(MpsearchError, match="refine_metric is what refine_method='evolve' measures with"):
        measured_frontier(model, calib, Counted(evals), refine=1, refine_method="local",
                          refine_metric=Counted(calib), progress=False)
    with pytest.raises(MpsearchError, match="refine_targets: no target budget named 'int5'"):
        measured_frontier(model, calib, Counted(evals), estimator="output-distance", options="2,3,4,8",
                          validate=0, points=3, refine=1, refine_method="evolve", refine_targets="int5",
                          progress=False)


def test_evolve_on_a_callable_metric_warns_that_it_selects_on_the_evaluation(digits):
    model, calib, evals = digits
    acc = Accuracy(evals)
    metric = FunctionMetric(lambda m: acc(m), name="acc")
    with pytest.warns(ProxyWarning, match="cannot be measured on the calibration data"):
        run = measured_frontier(model, calib, metric, estimator="output-distance", options="2,4,8", validate=0,
                                points=3, refine=2, refine_method="evolve", refine_params={"offspring": 2},
                                progress=False)
    assert (run.refinement["data"] == "evaluation").sum() == len(run.recommended) == 1
