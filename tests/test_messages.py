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
    assert "read from the estimator cache in" in capsys.readouterr().out.strip().splitlines()[-1]


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
