"""output-distance's per-batch statistics (damage_std) and its stopping rule (stop_when_stable)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpsearch import get_estimator, zoo
from mpsearch.errors import MpsearchError, SettingsError
from mpsearch.layers import Layer
from mpsearch.options import parse_options
from mpsearch.sensitivity._od_stats import RESAMPLES, StableStop
from mpsearch.sensitivity.base import build_table, Context


def _llama_batches(sizes, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (n, seq), generator=g)} for n in sizes]


def test_damage_std_is_the_standard_error_of_the_per_batch_distances_of_a_tiny_llm():
    """Brute force: each batch alone gives its own distances (a one-batch table); the table of all
    three batches (sizes 2, 3, 5) has their size-weighted mean as damage and, as damage_std, the
    standard error sqrt(sum w (d - mean)^2 / W / (B - 1)), bit for bit in the mean."""
    model = zoo.random_llama("tiny")
    batches = _llama_batches([2, 3, 5])
    est = get_estimator("output-distance", options="int2,int4,int8")
    alone = np.stack([est.estimate(model, [b], progress=False).pivot().to_numpy() for b in batches])
    table = est.estimate(model, batches, progress=False)
    w = np.array([2.0, 3.0, 5.0])[:, None, None]
    mean = (w * alone).sum(0) / w.sum()
    se = np.sqrt((w * (alone - mean) ** 2).sum(0) / w.sum() / (3 - 1))
    np.testing.assert_allclose(table.pivot().to_numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(table.pivot("damage_std").to_numpy(), se, rtol=1e-9)
    assert (se > 0).all()
    np.testing.assert_allclose(est.batch_damage_, alone, rtol=1e-12)  # the per-batch values kept


def _ctx(n_layers=4):
    layers = [Layer(f"l{i}", "linear", (64, 64), 64 * 64, 64, 64) for i in range(n_layers)]
    return Context(layers=layers, options=parse_options("int2,int4,int8"), batches=[], device=torch.device("cpu"))


def _rule(ctx, **kw):
    table = build_table(ctx.layers, ctx.options, np.zeros((len(ctx.layers), len(ctx.options))))
    return StableStop(table, [o.name for o in ctx.options], **kw)


def _values(means, noise, batches, seed=0):
    """``[B, L, 3]`` per-batch damages: layer l at (int2, int4, int8) = means[l] * (1, 0.8, 0)
    (int4 above the chord: the plan at int4's size is 8 bits for the most sensitive layer(s), 2 for
    the rest) plus relative noise."""
    rng = np.random.default_rng(seed)
    base = np.asarray(means, float)[:, None] * np.array([1.0, 0.8, 0.0])
    v = base[None] * (1 + noise * rng.standard_normal((batches,) + base.shape))
    return torch.from_numpy(np.clip(v, 0, None))


def test_the_stopping_rule_stops_when_the_ranking_is_clear_and_not_within_noise():
    ctx = _ctx()
    clear = _rule(ctx, agreement=0.95, min_batches=3, seed=0)
    v = _values([100.0, 10.0, 1.0, 0.1], 0.05, 40)
    stops = [b for b in range(1, 41) if clear.after_batch(v[:b], [4] * b)]
    assert stops and stops[0] == 3  # the first batch the rule may stop at
    # at int4's size the most sensitive layer takes 8 bits, the next 4 (what is left), in every resample
    assert [p.tolist() for p in clear.plans(v.mean(0).numpy())] == [[2, 1, 0, 0]]
    assert clear.curve[-1]["agreement"] == 1.0 and clear.curve[0]["batches"] == 2

    # two layers equally sensitive, within noise: their per-batch damages swing in opposite directions,
    # so their running means are equal after every even batch and never a standard error apart
    u = torch.from_numpy(np.random.default_rng(1).uniform(0.5, 1.5, 40)) * 0.3 * (-1.0) ** torch.arange(40)
    v = _values([10.0, 10.0, 1.0, 0.1], 0.0, 40)
    v[:, 0] *= (1 + u)[:, None]
    v[:, 1] *= (1 - u)[:, None]
    tied = _rule(ctx, agreement=0.95, min_batches=3, seed=0)
    assert not any(tied.after_batch(v[:b], [4] * b) for b in range(1, 41))
    # a resample gives 8 bits to either of the two (4 to the other): they disagree in about half of them
    assert 0.6 < tied.curve[-1]["agreement"] < 0.95
    rec = tied.record(40, [torch.zeros(4, 1)] * 40)
    assert not rec["stopped"] and "not yet stable" in rec["reason"] and rec["batches_used"] == 40
    assert rec["resamples"] == RESAMPLES and rec["sizes_avg_bits"] == [pytest.approx(ctx.options[1].size_bits(64, 64) / 4096)]


def test_the_rule_rarely_stops_on_two_layers_tied_under_random_noise():
    """Random noise: the running means of two equally sensitive layers drift apart by chance and
    one check alone is fooled in about half of the 40-batch runs (experiments/calib_size.md); with
    two checks in a row at 0.99, at most 1 of 10 runs stops early (none measured)."""
    ctx = _ctx()
    early = 0
    for seed in range(10):
        rule = _rule(ctx, agreement=0.99, min_batches=4, seed=0)
        v = _values([10.0, 10.0, 1.0, 0.1], 0.3, 40, seed=seed)
        early += any(rule.after_batch(v[:b], [4] * b) for b in range(1, 41))
    assert early <= 1


def test_the_rule_reads_damage_columns_in_the_estimators_option_order():
    """The table sorts its options (int2, int4, int8); damage arrays come in the estimator's order."""
    ctx = _ctx()
    v = _values([100.0, 10.0, 1.0, 0.1], 0.0, 1)[0].numpy()
    order = [2, 0, 1]  # int8, int2, int4
    table = build_table(ctx.layers, ctx.options, np.zeros((4, 3)))
    mixed = StableStop(table, [ctx.options[k].name for k in order], agreement=0.9, min_batches=2)
    plain = StableStop(table, [o.name for o in ctx.options], agreement=0.9, min_batches=2)
    assert [p.tolist() for p in mixed.plans(v[:, order])] == [p.tolist() for p in plain.plans(v)] == [[2, 1, 0, 0]]


def test_stable_sizes_are_the_given_sizes_and_too_small_ones_are_refused():
    ctx = _ctx()
    rule = _rule(ctx, agreement=0.9, min_batches=2, sizes=(3.0, 5.5))
    assert [c / rule.total for c in rule.caps] == pytest.approx([3.0, 5.5])
    with pytest.raises(MpsearchError, match=r"stable_sizes: 1 bits per weight is below the smallest plan"):
        _rule(ctx, agreement=0.9, min_batches=2, sizes=(1.0,))


def test_estimate_stops_on_identical_batches_and_records_it(capsys):
    """Identical batches: every resample is the same plan, so the rule stops at stable_from;
    the table is the plain table of the batches used, and the metadata and one line say so."""
    model = zoo.random_llama("tiny")
    batches = _llama_batches([3]) * 8
    est = get_estimator("output-distance", options="int2,int4,int8", stop_when_stable=0.99,
                        stable_from=3)
    table = est.estimate(model, batches, progress=True)
    st = table.metadata["stability"]
    assert st["stopped"] and st["batches_used"] == 3 and st["batches_given"] == 8
    assert st["samples_used"] == 9 and st["samples_given"] == 24 and st["agreement"] == 1.0
    assert [c["batches"] for c in st["curve"]] == [2, 3]
    assert "were stable after 3 of 8 batches" in capsys.readouterr().err
    plain = get_estimator("output-distance", options="int2,int4,int8").estimate(model, batches[:3], progress=False)
    np.testing.assert_array_equal(table.pivot().to_numpy(), plain.pivot().to_numpy())
    assert table.metadata["params"]["stop_when_stable"] == 0.99


def test_estimate_without_the_rule_is_unchanged_and_a_stopped_run_is_served_from_its_cache(tmp_path):
    model = zoo.random_llama("tiny")
    batches = _llama_batches([3]) * 5
    est = get_estimator("output-distance", options="int2,int8", stop_when_stable=0.5, stable_from=2,
                        cache_dir=tmp_path)
    first = est.estimate(model, batches, progress=False)
    again = est.estimate(model, batches, progress=False)
    # the first check is after 2 batches, and two in a row must agree: 3 batches at the least
    assert again.metadata["cost"].get("from_cache") and again.metadata["stability"]["batches_used"] == 3
    np.testing.assert_array_equal(first.pivot().to_numpy(), again.pivot().to_numpy())
    # two options: the size half-way between their uniform plans
    f = first.frame
    uniform = f.groupby("option")["size_bits"].sum() / f.groupby("layer")["params"].first().sum()
    assert first.metadata["stability"]["sizes_avg_bits"] == [pytest.approx(uniform.mean(), rel=1e-6)]
    assert "stability" not in get_estimator("output-distance", options="int2,int8").estimate(
        model, batches, progress=False).metadata


@pytest.mark.parametrize("params, msg", [
    ({"stop_when_stable": 1.5}, r"'stop_when_stable' must be a number > 0 and <= 1 or None, got 1.5"),
    ({"stop_when_stable": 0}, r"'stop_when_stable' must be a number > 0 and <= 1 or None"),
    ({"stable_from": 1}, r"'stable_from' must be an integer >= 2, got 1"),
    ({"stable_sizes": (4.0, -1.0)}, r"'stable_sizes' must be a non-empty tuple of average bit widths > 0"),
    ({"stable_sizes": "four"}, r"'stable_sizes' must be"),
])
def test_bad_stopping_settings_are_refused_when_the_estimator_is_made(params, msg):
    with pytest.raises(SettingsError, match=msg):
        get_estimator("output-distance", **params)


def test_bad_stopping_setting_is_refused_before_the_model_loads(tmp_path, capsys):
    from mpsearch.cli import main

    code = main(["estimate", "--model", f"{tmp_path}/nope.py:build", "--estimator", "output-distance",
                 "--param", "stop_when_stable=2", "-o", str(tmp_path / "t.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "'stop_when_stable' must be a number > 0 and <= 1" in err and "does not exist" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "t.csv").exists()


def test_the_rule_is_refused_across_processes():
    from mpsearch.distributed import Shard

    est = get_estimator("output-distance", options="int2,int8", stop_when_stable=0.9)
    ctx = _ctx()
    ctx.shard = Shard(rank=0, world=2)
    with pytest.raises(MpsearchError, match="stop_when_stable decides after each batch"):
        est._stop_rule(ctx)
