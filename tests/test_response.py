"""The ``response`` estimator: its measured probes are output-distance's numbers, its fit is exact
where the damage is exactly linear in the layer's output error, and its settings are checked."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mpsearch
from mpsearch.options import parse_option
from mpsearch.quant import quantize_weight
from mpsearch.sensitivity.base import EstimatorWarning
from mpsearch.sensitivity.response import auto_probes, fit_response, fit_table, loo_errors, shaped_noise

from sensitivity_models import cnn_batches, lm_batches

OPTS = "int2,int3,int4,int5,int6,int8"


def _table(name, model, batches, target=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EstimatorWarning)
        return mpsearch.get_estimator(name, **kw).estimate(model, batches, progress=False, target=target)


def _damage(table):
    return table.pivot("damage").to_numpy()


@pytest.mark.parametrize("case, metric", [(cnn_batches, "kl"), (lm_batches, "mse"), (lm_batches, "kl")])
def test_probing_every_option_is_output_distance(case, metric):
    model, batches = case()
    od = _table("output-distance", model, batches, options=OPTS, metric=metric)
    r = _table("response", model, batches, options=OPTS, metric=metric, probes="all")
    np.testing.assert_allclose(_damage(r), _damage(od), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(r.pivot("damage_std").to_numpy(), od.pivot("damage_std").to_numpy(), rtol=1e-6,
                               atol=1e-15)


def test_probed_options_are_measured_and_the_rest_cost_fewer_passes():
    model, batches = lm_batches()
    od = _table("output-distance", model, batches, options=OPTS, metric="kl")
    r = _table("response", model, batches, options=OPTS, metric="kl", probes="int3,int6")
    for layer, info in r.metadata["response"]["layers"].items():
        assert info["probes"] == ["int3", "int6"]
    a, b = r.frame.set_index(["layer", "option"])["damage"], od.frame.set_index(["layer", "option"])["damage"]
    probed = [(lay, o) for lay in r.layers for o in ("int3", "int6")]
    np.testing.assert_allclose(a[probed], b[probed], rtol=1e-9)
    others = [(lay, o) for lay in r.layers for o in ("int2", "int4", "int5", "int8")]
    assert not np.allclose(a[others], b[others], rtol=1e-3)  # predicted, not measured
    # each suffix pass carries 2 copies of the batch instead of 6
    assert r.metadata["cost"]["block_evaluations"] * 2 < od.metadata["cost"]["block_evaluations"]


class OneLinear(nn.Module):
    """A single linear layer (with a bias): its MSE output distance is exactly ||dW X^T||^2 / (N out)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(12, 7).double()  # float64: no float32 rounding in the outputs' differences

    def forward(self, x):
        return self.fc(x)


def _correlated_inputs():
    g = torch.Generator().manual_seed(4)
    mix = torch.randn(12, 12, generator=g)
    return [(torch.randn(9, 12, generator=g) @ mix).double(), (torch.randn(5, 12, generator=g) @ mix).double()]


def test_the_fit_is_exact_where_damage_is_linear_in_the_output_error():
    model, batches = OneLinear().eval(), _correlated_inputs()
    od = _table("output-distance", model, batches, options=OPTS, metric="mse")
    r = _table("response", model, batches, options=OPTS, metric="mse", probes="int3", error="gram")
    np.testing.assert_allclose(_damage(r), _damage(od), rtol=1e-9)
    two = _table("response", model, batches, options=OPTS, metric="mse", probes="int3,int6", error="gram")
    assert two.metadata["response"]["fit_error_median"] < 1e-6
    assert two.metadata["response"]["error"]["layers"] == {"gram": 1}
    # the diagonal of E[x x^T] alone is not exact when the inputs are correlated
    diag = _table("response", model, batches, options=OPTS, metric="mse", probes="int3", error="diagonal")
    assert np.abs(_damage(diag) / _damage(od) - 1).max() > 1e-2
    assert diag.metadata["response"]["fit_error_median"] is None  # one probe: nothing held out


def test_relative_error_of_an_embedding_weights_rows_by_token_counts():
    model = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 3)).eval()
    torch.manual_seed(1)
    ids = [torch.tensor([[0, 0, 0, 1, 5]]), torch.tensor([[0, 2]])]
    r = mpsearch.get_estimator("response", options="int2,int4", metric="mse", probes="int2")
    r.estimate(model, ids, include_embedding=True, progress=False)
    t = r.measurements_["t"]
    w = model[0].weight.detach().double()
    dw = quantize_weight(model[0].weight, parse_option("int4")).double() - w
    counts = torch.tensor([4.0, 1, 1, 0, 0, 1], dtype=torch.float64)
    want = float((dw.pow(2).sum(1) * counts).sum() / (w.pow(2).sum(1) * counts).sum())
    assert r.measurements_["layers"][0] == "0"
    np.testing.assert_allclose(t[0, 1], want, rtol=1e-9)


def test_fit_and_held_out_error():
    t = np.array([1e-2, 1e-3, 1e-4])
    np.testing.assert_allclose(fit_response(t, 3 * t), (3.0, 1.0, 0.0))
    np.testing.assert_allclose(fit_response(t, 2 * t**1.5, "power"), (2.0, 1.5, 0.0), rtol=1e-9)
    assert max(abs(e) for e in loo_errors(t, 2 * t**1.5, "power")) < 1e-9
    errs = loo_errors(t[:2], np.array([1e-2, 2e-3]))  # d/t = 1 and 2: each predicts the other 2x off
    np.testing.assert_allclose(np.abs(errs), np.log(2), rtol=1e-9)
    assert fit_response([0.0, 1e-3], [0.0, 0.0]) == (0.0, 1.0, 0.0)  # nothing to fit on: no damage


def test_a_floor_under_every_distance_is_fitted_and_left_out():
    """16-bit arithmetic adds about the same distance to any perturbation: d = alpha t + f."""
    t = np.array([1e-2, 3e-3, 1e-3])
    d = 0.5 * t + 2e-3
    np.testing.assert_allclose(fit_response(t, d, floor=True), (0.5, 1.0, 2e-3), rtol=1e-9)
    assert max(abs(e) for e in loo_errors(t, d, floor=True)) < 1e-9
    assert fit_response(t, d)[0] > 0.6  # without the floor alpha absorbs it
    assert loo_errors(t[:2], d[:2], floor=True) == []  # two probes: nothing left to check the fit on
    np.testing.assert_allclose(fit_response(t, 0.5 * t, floor=True), (0.5, 1.0, 0.0), rtol=1e-9, atol=1e-15)  # none
    tab, coefs, err = fit_table(d[None], np.array([[2e-2, 1e-2, 3e-3, 1e-3, 0.0]]), t[None], [[1, 2, 3]], [[]],
                                floor=True)
    np.testing.assert_allclose(tab[0], [1e-2, 5e-3, 1.5e-3, 5e-4, 0.0], rtol=1e-9)  # measured less the floor


def test_auto_probes_bracket_the_middle_options():
    opts = [(k, parse_option(o)) for k, o in enumerate(mpsearch.options.LLM_SEARCH_OPTIONS.split(","))]
    names = [opts[k][1].name for k in auto_probes(opts, 2)]
    assert names == ["int3-asym", "int6-asym"]
    assert [opts[k][1].name for k in auto_probes(opts, 3, low=True)] == ["int3-asym", "int4-asym", "int5-asym"]
    few = [(0, parse_option("int4")), (1, parse_option("int8"))]
    assert auto_probes(few, 2) == [0, 1]
    ggml = [(k, parse_option(o)) for k, o in enumerate(["q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_0"])]
    assert [ggml[k][1].name for k in auto_probes(ggml, 2)] == ["q3_K", "q6_K"]


def test_shaped_noise_has_the_rounding_error_rms_in_each_group():
    torch.manual_seed(0)
    w = torch.randn(5, 40)
    opt = parse_option("int3-g16-asym")
    q = quantize_weight(w, opt)
    n = shaped_noise(w, q, opt, "linear", seed=7)
    err, noise = (q - w), (n - w)
    for lo, hi in ((0, 16), (16, 32), (32, 40)):  # the last group is 8 wide
        np.testing.assert_allclose(noise[:, lo:hi].pow(2).mean(1) / err[:, lo:hi].pow(2).mean(1), 1.0, atol=0.6)
    assert torch.equal(n, shaped_noise(w, q, opt, "linear", seed=7))
    assert not torch.equal(n, shaped_noise(w, q, opt, "linear", seed=8))
    assert not torch.allclose(n, q)


def test_noise_probes_are_seeded():
    model, batches = lm_batches()
    a = _table("response", model, batches, options=OPTS, probe_kind="noise", seed=0)
    b = _table("response", model, batches, options=OPTS, probe_kind="noise", seed=0)
    c = _table("response", model, batches, options=OPTS, probe_kind="noise", seed=1)
    np.testing.assert_array_equal(_damage(a), _damage(b))
    assert not np.array_equal(_damage(a), _damage(c))


def test_activation_options_are_measured_directly():
    model, batches = lm_batches()
    opts = "w8a8-int8,w4a16-g32,w8a16"  # a consumer's formats: its target takes them
    od = _table("output-distance", model, batches, options=opts, metric="kl", target="vllm")
    r = _table("response", model, batches, options=opts, metric="kl", target="vllm")
    a, b = r.frame.set_index(["layer", "option"])["damage"], od.frame.set_index(["layer", "option"])["damage"]
    rows = [(lay, "w8a8-int8") for lay in r.layers]
    np.testing.assert_allclose(a[rows], b[rows], rtol=1e-9)


def test_table_columns_and_metadata():
    model, batches = lm_batches()
    r = _table("response", model, batches, options=OPTS + ",keep")
    f = r.frame
    assert {"damage_std", "fit_error"} <= set(f.columns)
    assert (f.loc[f["option"] == "keep", ["damage", "damage_std", "fit_error"]] == 0).all().all()
    assert (f["damage_std"] >= 0).all() and (f.loc[f["option"] != "keep", "fit_error"] >= 0).all()
    md = r.metadata["response"]
    assert md["fit"] == "linear" and md["probe_kind"] == "rounding"
    assert set(md["layers"]) == set(r.layers) and md["fit_error_p90"] >= md["fit_error_median"] >= 0


@pytest.mark.parametrize("kw, message", [
    ({"probes": "int9"}, "probes: option bits must be 1-8"),
    ({"probes": "int7"}, "probes: 'int7' is not one of the options being estimated"),
    ({"probes": 0}, "probes must be an integer > 0"),
    ({"probes": [1]}, "setting 'probes' must be int or str"),
    ({"fit": "cubic"}, "fit must be one of 'linear', 'power', got 'cubic'"),
    ({"probe_kind": "gauss"}, "probe_kind must be one of 'rounding', 'noise'"),
    ({"error": "full"}, "error must be one of 'auto', 'gram', 'diagonal'"),
])
def test_bad_settings(kw, message):
    model, batches = lm_batches()
    with pytest.raises(mpsearch.MpsearchError, match=message):
        _table("response", model, batches, options=OPTS, **kw)


def test_bf16_model_fits_the_floor_and_agrees_with_float32():
    """In bf16 every perturbation's distance carries a floor of rounding (here about the size of the
    int6 damage); the fit removes it, so the bf16 table agrees with the float32 one where the damage
    stands above the floor; without the floor the int2 predictions come out two or more times too large."""
    model, batches = lm_batches()
    f32 = _table("response", model, batches, options=OPTS)
    assert f32.metadata["response"]["floor"] is False
    model = model.to(torch.bfloat16)
    half = _table("response", model, batches, options=OPTS)
    md = half.metadata["response"]
    assert md["floor"] is True and md["error"]["layers"] == {"gram": len(half.layers)}
    assert all(v["probes"] == ["int3", "int4", "int5"] for v in md["layers"].values())
    d32, d16 = _damage(f32), _damage(half)
    assert np.isfinite(d16).all()
    int3, int2 = d32[:, 1] > 1e-5, d32[:, 0] > 1e-5
    np.testing.assert_allclose(d16[int3, 1], d32[int3, 1], rtol=0.6)
    assert np.abs(np.log(d16[int2, 0] / d32[int2, 0])).max() < np.log(3)
    bare = _damage(_table("response", model, batches, options=OPTS, floor=False, probes="int3,int6"))
    assert np.median(bare[int2, 0] / d32[int2, 0]) > 2
    od = _table("output-distance", model, batches, options=OPTS)
    every = _table("response", model, batches, options=OPTS, probes="all", floor=False)
    np.testing.assert_allclose(_damage(every), _damage(od), rtol=5e-2, atol=1e-3 * _damage(od).max())


def test_gram_matrices_fall_back_to_diagonals_over_the_memory_limit():
    model, batches = lm_batches()
    r = _table("response", model, batches, options=OPTS, max_gram_mb=1e-4)
    assert r.metadata["response"]["error"]["layers"] == {"diagonal": len(r.layers)}
    g = _table("response", model, batches, options=OPTS)
    assert g.metadata["response"]["error"]["layers"] == {"gram": len(g.layers)}
    # q/k/v share their input: per block 3 Gram matrices of 8 x 8 (q/k/v, o, up) and one of 16 x 16 (down),
    # and the head's (float64 on a CPU); 1,792 elements if every layer kept its own
    assert g.metadata["response"]["error"]["gram_mb"] == round((3 * (3 * 64 + 256) + 64) * 8 / 2**20, 3)
