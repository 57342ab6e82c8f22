"""The pictures' data (issue 28): uniform plans as one line sorted by size, a consumer's recipes as
labelled markers whose labels never overprint, the plan picture titled with its plan and a colour
bar, a right axis with ticks, and files drawn without touching pyplot (a notebook's backend and
figures stay as they were)."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from mpsearch import plotting
from mpsearch.measured.result import FrontierRun
from mpsearch.plan import BitPlan
from mpsearch.table import CostTable

pytest.importorskip("matplotlib")

LAYERS = ["l0", "l1", "l2"]


def _run():
    rows = [(lay, opt, b, d * (i + 1), (b + 0.5) * 64, 64) for i, lay in enumerate(LAYERS)
            for opt, b, d in (("q4_0", 4, 0.3), ("q4_1", 4, 0.2), ("q5_0", 5, 0.1), ("q8_0", 8, 0.01))]
    table = CostTable(pd.DataFrame(rows, columns=["layer", "option", "bits", "damage", "size_bits", "params"]),
                      {"estimator": "fisher"})
    # uniform options listed out of size order, a mix, and a recipe merged with a uniform plan
    uniform = pd.DataFrame([
        {"option": "q8_0", "kind": "uniform", "same_as": "Q8_0", "avg_bits": 8.5, "measured_kld": 0.001},
        {"option": "q4_0", "kind": "uniform", "same_as": "", "avg_bits": 4.5, "measured_kld": 0.2},
        {"option": "q5_0", "kind": "uniform", "same_as": "", "avg_bits": 5.5, "measured_kld": 0.05},
        {"option": "q4_1", "kind": "uniform", "same_as": "", "avg_bits": 5.0, "measured_kld": 0.12},
        {"option": "Q4_K_M", "kind": "recipe", "same_as": "", "avg_bits": 5.1, "measured_kld": 0.08},
        {"option": "Q4_K_S", "kind": "recipe", "same_as": "", "avg_bits": 5.0, "measured_kld": 0.11},
    ])
    uniform["measured_loss"] = uniform["measured_kld"]
    front = pd.DataFrame({"point": range(4), "avg_bits": [4.6, 5.0, 5.5, 7.0], "damage": [0.5, 0.3, 0.1, 0.02],
                          "size_bits": [100, 110, 120, 150], "validated": [True, True, False, True],
                          "measured_kld": [0.15, 0.07, np.nan, 0.004]})
    plans = {i: BitPlan.uniform(LAYERS, "q5_0") for i in range(4)}
    plans[1] = BitPlan(bits={"l0": 4, "l1": 5, "l2": 8},
                       options={"l0": {"name": "q4_1", "bits": 4}, "l1": {"name": "q5_0", "bits": 5},
                                "l2": {"name": "q8_0", "bits": 8}}, predicted={"avg_bits": 5.0})
    rec = pd.DataFrame([{"budget": "q4_1", "budget_avg_bits": 5.0, "plan": "point-1", "status": "mixed",
                         "avg_bits": 5.0, "quality": 0.07}])
    return FrontierRun(table=table, frontier=front, uniform=uniform, baseline=0.0, metric="kld",
                       metric_label="kld", higher_is_better=False, proxy={"spearman": 0.9}, plans=plans,
                       recommended=rec, baselines={"Q4_K_M": BitPlan.uniform(LAYERS, "q4_1")})


def test_uniform_plans_are_one_line_sorted_by_size_and_recipes_are_markers():
    d = plotting.measured_frontier_data(_run())
    xs, ys = d["uniform"]
    assert list(xs) == [4.5, 5.0, 5.5, 8.5] and list(ys) == [0.2, 0.12, 0.05, 0.001]
    assert d["uniform_labels"] == ["q4_0", "q4_1", "q5_0", "q8_0 = Q8_0"]
    assert list(d["recipes"][0]) == [5.0, 5.1] and d["recipe_labels"] == ["Q4_K_S", "Q4_K_M"]
    assert list(d["measured"][0]) == [4.6, 5.0, 7.0]  # validated points only
    assert d["log_y"]  # a KL that spans 200x: a log scale


def test_labels_never_overprint_each_other_markers_or_lines():
    d = plotting.measured_frontier_data(_run())
    shown = [lab for lab in d["labels"] if lab["shown"]]
    assert sorted(lab["text"] for lab in d["labels"]) == sorted(d["uniform_labels"] + d["recipe_labels"])
    assert len(shown) == len(d["labels"])  # room for all of them here
    for a, b in itertools.combinations(shown, 2):
        assert not plotting._overlap(a["box"], b["box"]), (a["text"], b["text"])
    to_pt = [plotting._to_points(x, y, d["limits"], d["log_y"]) for x, y in d["points"]]
    for lab in shown:
        for px, py in to_pt:
            assert not plotting._overlap(lab["box"], (px - 4.5, py - 4.5, px + 4.5, py + 4.5)), lab["text"]


def test_a_crowded_label_is_left_out_rather_than_overprinted():
    named = [(5.0, 0.1, f"recipe-{i}") for i in range(40)]  # forty labels at one point
    placed = plotting.place_labels(named, [(5.0, 0.1)], (4, 6, 0.01, 1), True)
    shown = [lab for lab in placed if lab["shown"]]
    assert 0 < len(shown) < 40 and len(placed) == 40
    for a, b in itertools.combinations(shown, 2):
        assert not plotting._overlap(a["box"], b["box"])


def test_the_plots_are_drawn_without_pyplot_and_say_what_they_show(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    from mpsearch.measured.outputs import _plots, plan_to_show

    backend, before = matplotlib.get_backend(), plt.get_fignums()
    run = _run()
    files = _plots(run, tmp_path)
    assert all((tmp_path / f).stat().st_size > 1000 for f in files.values())
    assert matplotlib.get_backend() == backend and plt.get_fignums() == before
    assert plan_to_show(run) == "point-1"
    assert plotting.plan_title(run, "point-1") == "plan point-1, recommended at q4_1: 5.000 bits/weight, kld 0.07"
    with plotting.headless():
        fig = plotting.plot_plan_bits(run.plan_of("point-1"), run.table, title="t")
        assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "parameters in the layer"  # the colour bar
        assert [t.get_text() for t in fig.axes[0].texts] == ["q4_1", "q5_0", "q8_0"]  # the formats, named
        front = plotting.plot_measured_frontier(run)
        right = front.axes[1]
        assert right.get_yscale() == "log" and len(right.get_yticks()) > 0
    assert run.plan_of("Q4_K_M").option_name("l0") == "q4_1"  # a recipe by its own name
