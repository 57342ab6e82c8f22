"""Messages that must be true (issue 28): what Ctrl-C kept, the budgets named with their real sizes,
an option that costs nothing on every layer, damage that grows with the bits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mpsearch.cli import main
from mpsearch.sensitivity import cache as cache_mod
from mpsearch.table import CostTable

HERE = Path(__file__).parent
M = str(HERE / "bad_models.py")


def _estimate(tmp_path, *extra, estimator="fisher"):
    return main(["estimate", "--model", f"{M}:mlp", "--data", f"{M}:data", "--estimator", estimator,
                 "--param", "chunk_size=1", "--no-progress", *extra, "-o", str(tmp_path / "t.csv")]
                if estimator == "fisher" else
                ["estimate", "--model", f"{M}:mlp", "--estimator", estimator, "--no-progress", *extra,
                 "-o", str(tmp_path / "t.csv")])


def _interrupt_after_first_save(monkeypatch):
    real = cache_mod.Checkpoint.save

    def save_then_stop(self, state, *, force=False):
        real(self, state, force=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod.Checkpoint, "save", save_then_stop)
    return real


def test_ctrl_c_says_where_the_default_cache_kept_the_work_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    cache = Path(os.environ["MPSEARCH_ESTIMATOR_CACHE"])
    real = _interrupt_after_first_save(monkeypatch)
    assert _estimate(tmp_path) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mpsearch estimate: interrupted; the estimator's work so far is kept in {cache} (saved every "
                   f"30 s): run the same command again to resume"]
    assert [p.name.startswith("fisher-") for p in cache.iterdir()] == [True]  # it is really there
    assert not (tmp_path / "t.csv").exists()
    monkeypatch.setattr(cache_mod.Checkpoint, "save", real)
    assert _estimate(tmp_path) == 0
    cost = CostTable.read(tmp_path / "t.csv").metadata["cost"]
    assert cost["resumed_after_seconds"] > 0 and cost["backward_passes"] == 7  # 8 samples, one done before
    assert _estimate(tmp_path) == 0
    assert any("read from the estimator cache in" in line for line in capsys.readouterr().out.strip().splitlines())


def test_ctrl_c_without_a_cache_says_nothing_was_kept_and_how_to_keep_it(tmp_path, monkeypatch, capsys):
    from mpsearch.sensitivity.fisher import FisherEstimator

    def stop(self, model, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(FisherEstimator, "_damage", stop)
    assert _estimate(tmp_path, "--param", "cache_dir=None") == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "mpsearch estimate: interrupted; nothing was kept: the estimator cache is off (--param cache_dir=None); "
        "leave cache_dir unset (or give --param cache_dir=DIR) so an interrupted run keeps its work"]
    assert not Path(os.environ["MPSEARCH_ESTIMATOR_CACHE"]).exists()


def test_ctrl_c_of_an_estimator_without_a_cache_says_so(tmp_path, monkeypatch, capsys):
    from mpsearch.sensitivity.weight_error import WeightErrorEstimator

    def stop(self, model, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(WeightErrorEstimator, "_damage", stop)
    assert _estimate(tmp_path, estimator="weight-error") == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "mpsearch estimate: interrupted; nothing was kept (estimator 'weight-error' keeps no cache: it starts over, "
        "and it is quick)"]


def test_ctrl_c_before_the_estimator_starts_says_nothing_was_kept(tmp_path, monkeypatch, capsys):
    import mpsearch.specs

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mpsearch.specs, "load_model", stop)
    assert _estimate(tmp_path) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["mpsearch estimate: interrupted; nothing was kept"]


# ----------------------------------------------------------------- the table's own checks
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mpsearch.diagnose import (DamageWarning, monotone_fit, non_monotone, non_monotone_line,  # noqa: E402
                               zero_damage_options)


def _table(rows, **meta):
    frame = pd.DataFrame(rows, columns=["layer", "option", "bits", "damage", "size_bits", "params"])
    return CostTable(frame, meta)


def _minilm_like():
    """The issue's MiniLM layer (int4 0.0201 > int3 0.0140, int6 0.0189 > int5 0.0019) and a sound one."""
    rows = []
    for layer, dmg in (("enc.0.out", {2: 0.5, 3: 0.0140, 4: 0.0201, 5: 0.0019, 6: 0.0189, 8: 0.0001}),
                       ("enc.1.out", {2: 0.4, 3: 0.1, 4: 0.03, 5: 0.01, 6: 0.003, 8: 0.0002})):
        for b, d in dmg.items():
            rows.append((layer, f"int{b}-asym", b, d, 64 * b + 32, 64))
        rows.append((layer, "keep", 16, 0.0, 64 * 16, 64))
    return _table(rows)


def test_non_monotone_damage_is_listed_per_layer_with_the_smaller_option_it_exceeds():
    bad = non_monotone(_minilm_like())
    assert bad == {"enc.0.out": [
        {"option": "int4-asym", "damage": 0.0201, "smaller": "int3-asym", "smaller_damage": 0.0140},
        {"option": "int6-asym", "damage": 0.0189, "smaller": "int5-asym", "smaller_damage": 0.0019}]}
    line = non_monotone_line(_minilm_like())
    assert line.startswith("non-monotone damage: 1 of 2 layers have more damage at a larger option (worst: "
                           "enc.0.out int6-asym 0.0189 > int5-asym 0.0019)")


def test_equal_sizes_are_not_ordered_and_keep_is_left_out():
    rows = [("a", "q4_0", 4, 0.2, 4.5, 1), ("a", "iq4_nl", 4, 0.1, 4.5, 1), ("a", "q8_0", 8, 0.01, 8.5, 1),
            ("a", "keep", 16, 0.0, 16, 1)]
    assert non_monotone(_table(rows)) == {}


def test_monotone_fit_equals_isotonic_regression_and_leaves_sound_layers_alone():
    from sklearn.isotonic import IsotonicRegression

    table = _minilm_like()
    fit = monotone_fit(table)
    for layer in table.layers:
        raw = table.frame[(table.frame["layer"] == layer) & (table.frame["bits"] < 16)].sort_values("size_bits")
        want = IsotonicRegression(increasing=False).fit_transform(raw["size_bits"], raw["damage"])
        got = fit.frame.set_index(["layer", "option"]).loc[[(layer, o) for o in raw["option"]], "damage"]
        np.testing.assert_allclose(got.to_numpy(), want, rtol=1e-12)
    assert non_monotone(fit) == {} and fit.metadata["monotone_fit"] == {"rows_changed": 4}
    sound = fit.frame[fit.frame["layer"] == "enc.1.out"]
    assert sound["damage"].tolist() == table.frame[table.frame["layer"] == "enc.1.out"]["damage"].tolist()


def test_an_option_with_zero_damage_on_every_layer_is_found():
    rows = []
    for layer in ("a", "b"):
        rows += [(layer, "q4_0", 4, 0.3, 4.5, 32), (layer, "q4_1", 4, 0.0, 5.0, 32),
                 (layer, "q8_0", 8, 0.001, 8.5, 32), (layer, "keep", 16, 0.0, 16, 32)]
    rows[4] = ("b", "q4_0", 4, 0.0, 4.5, 32)  # zero on one layer only: not flagged
    assert zero_damage_options(_table(rows)) == {"q4_1": 2}


def test_estimating_a_source_grid_model_warns_that_its_format_looks_free(tmp_path, capsys):
    """A tiny Llama written as a Q4_1 GGUF: llama.cpp's q4_1 re-quantizes its weights at no loss."""
    from model_files import tiny_llama_dir, write_gguf

    pytest.importorskip("gguf")
    gguf_path = write_gguf(tiny_llama_dir(tmp_path / "tiny"), tmp_path / "tiny-q4_1.gguf", "Q4_1")
    out = tmp_path / "t.csv"
    from mpsearch.sources import SourceGridWarning

    with pytest.warns(SourceGridWarning), pytest.warns(DamageWarning, match=r"option\(s\) 'q4_1' \(15 layers\) cost zero damage on every layer: the "
                                           r"model's weights already lie on a grid: tiny-q4_1.gguf stores 15 of its "
                                           r"16 weight matrices as Q4_1"):
        assert main(["estimate", "--model", str(gguf_path), "--target", "llama.cpp", "--bits", "q4_0,q4_1,q8_0",
                     "--estimator", "weight-error", "--no-progress", "-o", str(out)]) == 0
    table = CostTable.read(out)
    assert table.metadata["zero_damage_options"] == {"q4_1": 15}
    assert table.pivot().loc[:, "q4_1"].max() == 0.0 and table.pivot().loc[:, "q4_0"].min() > 0


# ------------------------------------------------------------------- the recipe for the device
def test_a_causal_lm_on_the_cpu_gets_fisher_and_is_told_so_before_the_work(tmp_path, capsys):
    from model_files import tiny_llama_dir

    folder = tiny_llama_dir(tmp_path / "tiny")
    text = tmp_path / "calib.txt"
    text.write_text("the king and the queen of the night. " * 200)
    common = ["estimate", "--model", str(folder), "--data", str(text), "--seq-len", "16", "--calib-samples", "4",
              "--bits", "4,8", "--no-progress"]
    assert main([*common, "-o", str(tmp_path / "a.csv")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("recipe: the fisher estimator, chosen for a causal LM on the CPU (output-distance")
    assert CostTable.read(tmp_path / "a.csv").metadata["estimator"] == "fisher"
    assert main([*common, "--estimator", "output-distance", "-o", str(tmp_path / "b.csv")]) == 0
    assert not capsys.readouterr().out.startswith("recipe:")  # asked for: nothing to say
    assert CostTable.read(tmp_path / "b.csv").metadata["estimator"] == "output-distance"
    assert main(["estimate", "--model", f"{M}:mlp", "--data", f"{M}:data", "--bits", "4,8", "--no-progress",
                 "-o", str(tmp_path / "c.csv")]) == 0  # not a causal LM: the recipe's output-distance
    assert CostTable.read(tmp_path / "c.csv").metadata["estimator"] == "output-distance"


def test_a_busy_cpu_is_named_before_the_work_with_what_runs_faster(tmp_path, capsys, monkeypatch):
    """On a CPU busier than its cores torch's threads wait for each other's turn (fisher on SmolLM2:
    several times slower on 2 threads than on 1, experiments/fisher_cpu_busy.md): said before the work."""
    import torch
    from torch import nn

    import mpsearch.recipe as recipe_mod
    from mpsearch.recipe import busy_cpu_note

    big, small = nn.Linear(4000, 2500), nn.Linear(4, 4)  # 10,002,500 and 20 parameters
    line = busy_cpu_note(big, load=9.1, cores=2, threads=2)
    assert line.startswith("note: the CPU is busy (1-minute load average 9.1 on 2 cores): torch's 2 threads wait")
    assert line.endswith("while the machine stays busy, OMP_NUM_THREADS=1 mpsearch ... runs faster")
    assert busy_cpu_note(big, load=1.9, cores=2, threads=2) is None  # not busier than its cores
    assert busy_cpu_note(big, load=9.1, cores=2, threads=1) is None  # one thread: no one to wait for
    assert busy_cpu_note(small, load=9.1, cores=2, threads=2) is None  # seconds anyway
    with monkeypatch.context() as m:  # a platform without a load average (Windows): nothing to say
        m.delattr(os, "getloadavg")
        assert busy_cpu_note(big, cores=2, threads=2) is None

    monkeypatch.setattr(recipe_mod, "BUSY_NOTE_MIN_PARAMS", 0)
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        common = ["estimate", "--model", f"{M}:mlp", "--estimator", "weight-error", "--bits", "4,8", "--no-progress"]
        assert main([*common, "-o", str(tmp_path / "a.csv")]) == 0
        assert capsys.readouterr().out.splitlines()[0].startswith("note: the CPU is busy (1-minute load average 99.0")
        assert main([*common, "--json", "-o", str(tmp_path / "b.csv")]) == 0
        assert capsys.readouterr().out.startswith("{")  # --json: one object, nothing before it
        torch.set_num_threads(1)
        assert main([*common, "-o", str(tmp_path / "c.csv")]) == 0
        assert "CPU is busy" not in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)


def test_mpsearch_list_says_the_defaults_the_cli_uses(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "estimators: (--estimator; default: output-distance with --data, fisher for a causal LM on the CPU" in out
    assert "cache_dir: any = None  (None: no cache in Python; 'mpsearch estimate' keeps one in" in out
    assert "int8-asym (the preset llm for a causal LM); export: -" in out
    assert "frontier --model: --estimator-param KEY=VALUE" in out


# ------------------------------------------------------------------------------- --json
def test_json_summaries_are_one_object_with_what_the_text_says(tmp_path, capsys):
    import json

    t, p = tmp_path / "t.csv", tmp_path / "p.json"
    assert main(["estimate", "--model", f"{M}:mlp", "--estimator", "weight-error", "--bits", "2,4,8",
                 "--no-progress", "--json", "-o", str(t)]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["command"] == "estimate" and est["layers"] == 2 and est["options"] == ["int2", "int4", "int8"]
    assert est["output"] == str(t) and est["estimator"] == "weight-error" and est["non_monotone_layers"] == []
    assert main(["solve", "--table", str(t), "--budget", "avg_bits=5", "--json", "-o", str(p)]) == 0
    sol = json.loads(capsys.readouterr().out)
    plan = json.loads(p.read_text())
    assert sol["status"] == "optimal" or sol["status"] == "feasible"
    assert sol["predicted"] == plan["predicted"] and sol["output"] == str(p)
    assert main(["frontier", "--table", str(t), "--json", "-o", str(tmp_path / "f.csv")]) == 0
    fr = json.loads(capsys.readouterr().out)
    assert fr["points"] == len(pd.read_csv(tmp_path / "f.csv")) and fr["solver"] == "dp"
    assert main(["export", "--plan", str(p), "--to", "torchao", "--json", "-o", str(tmp_path / "x.json")]) == 0
    exp = json.loads(capsys.readouterr().out)
    assert exp == {"command": "export", "output": str(tmp_path / "x.json"), "format": "torchao", "layers": 2,
                   "coverage": plan["provenance"]["table"]["coverage"]}
    assert exp["coverage"]["planned"] == exp["coverage"]["matrix_weights"] == 192
    assert main(["list", "targets", "--json"]) == 0
    assert "llama.cpp" in json.loads(capsys.readouterr().out)["targets"]
