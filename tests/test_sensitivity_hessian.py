"""hessian: Hutchinson traces against exact Hessians, the diagonal variant, stopping, negative traces."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mpsearch
from mpsearch.quant import quantization_error
from mpsearch.sensitivity.base import EstimatorWarning

from sensitivity_models import tiny_bert


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).eval()
    g = torch.Generator().manual_seed(0)
    return model, [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)),
                   (torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))]


def _exact_traces(model, batches, loss=nn.functional.cross_entropy):
    """Exact per-layer traces of the size-weighted mean loss, by torch.autograd.functional.hessian."""
    traces = {}
    total = sum(len(x) for x, _ in batches)
    for name in ("0", "2", "4"):
        w0 = model.get_submodule(name).weight.detach()

        def f(w, name=name):
            params = {**dict(model.named_parameters()), f"{name}.weight": w}
            return sum(len(x) / total * loss(torch.func.functional_call(model, params, (x,)), y)
                       for x, y in batches)

        h = torch.autograd.functional.hessian(f, w0).reshape(w0.numel(), w0.numel())
        traces[name] = float(h.trace())
    return traces


def _hutchinson(model, batches, probes, seed=0, **kw):
    est = mpsearch.get_estimator("hessian", probes=probes, min_probes=probes, tol=0.0, seed=seed,
                                 options="2,4", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EstimatorWarning)
        return est.estimate(model, batches, progress=False)


def test_traces_agree_with_exact_hessian_within_their_standard_error():
    model, batches = _mlp()
    exact = _exact_traces(model, batches)
    table = _hutchinson(model, batches, probes=200, negative="abs")
    unc = table.metadata["uncertainty"]
    for name, t in exact.items():
        se = unc["trace_stderr"][name]
        assert se > 0
        assert abs(abs(t) - unc["trace"][name]) <= 4 * se + 1e-9, (name, t, unc["trace"][name], se)
    assert unc["probes_per_batch"] == [200, 200]
    assert table.metadata["cost"]["hvps"] == 400 and table.metadata["cost"]["backward_passes"] == 2


def test_error_shrinks_as_probes_grow():
    model, batches = _mlp()
    exact = _exact_traces(model, batches)
    errors, stderrs = {}, {}
    for probes in (8, 128):
        errs, ses = [], []
        for seed in range(3):
            unc = _hutchinson(model, batches, probes, seed=seed, negative="abs").metadata["uncertainty"]
            errs += [abs(abs(exact[n]) - unc["trace"][n]) for n in exact]
            ses += [unc["trace_stderr"][n] for n in exact]
        errors[probes], stderrs[probes] = np.mean(errs), np.mean(ses)
    assert errors[128] < errors[8] / 2
    # the standard error falls like 1/sqrt(probes): 4x for 16x the probes (within 50%)
    assert 2 < stderrs[8] / stderrs[128] < 6


def test_damage_is_trace_per_weight_times_rounding_error():
    model, batches = _mlp()
    table = _hutchinson(model, batches, probes=10, negative="abs")
    trace = table.metadata["uncertainty"]["trace"]
    frame = table.frame.set_index(["layer", "option"])
    for name in trace:
        w = model.get_submodule(name).weight
        for opt in ("int2", "int4"):
            err = float(quantization_error(w, mpsearch.parse_option(opt)).pow(2).sum())
            assert frame.loc[(name, opt), "damage"] == pytest.approx(trace[name] / w.numel() * err, rel=1e-9)
            assert frame.loc[(name, opt), "damage_std"] == pytest.approx(
                table.metadata["uncertainty"]["trace_stderr"][name] / w.numel() * err, rel=1e-9)


@pytest.mark.parametrize("mode", ["trace", "diagonal"])
def test_micro_batches_give_the_whole_batch_result(mode):
    """Each probe's v^T H v summed over micro-batches (size-weighted) is the whole batch's: the same
    table to float rounding, with one micro-batch's graph held at a time (5 graphs for 16 + 8 samples)."""
    model, batches = _mlp()
    whole = _hutchinson(model, batches, probes=12, negative="abs", mode=mode)
    micro = _hutchinson(model, batches, probes=12, negative="abs", mode=mode, micro_batch=5)
    np.testing.assert_allclose(micro.frame["damage"], whole.frame["damage"], rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(micro.frame["damage_std"], whole.frame["damage_std"], rtol=1e-4, atol=1e-12)
    assert micro.metadata["uncertainty"]["probes_per_batch"] == [12, 12]
    assert micro.metadata["cost"]["backward_passes"] == 4 + 2  # ceil(16/5) + ceil(8/5) graphs, one round
    assert micro.metadata["cost"]["hvps"] == 12 * 6


def test_micro_batches_stop_in_doubling_rounds():
    model, batches = _mlp()
    table = mpsearch.get_estimator("hessian", probes=64, min_probes=4, tol=0.5, micro_batch=8, options="2,4",
                                   negative="abs").estimate(model, batches[:1], progress=False)
    used = table.metadata["uncertainty"]["probes_per_batch"][0]
    assert used in (4, 8, 16, 32, 64)  # rounds: min_probes, then twice the probes so far
    assert table.metadata["cost"]["hvps"] == used * 2


def test_diagonal_is_exact_when_the_hessian_is_diagonal():
    # y = W x with orthogonal inputs and a squared loss: H = 2/N * diag(x_j^2) per row, so every
    # probe gives v * Hv = diag(H) exactly, and the trace has zero variance.
    lin = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.9, -0.2, 0.4, 0.05], [0.3, 0.7, -0.6, 0.1], [-0.5, 0.2, 0.8, -0.3]]))
    x = torch.diag(torch.tensor([1.0, 2.0, 0.5, 3.0]))
    batches = [(x, torch.zeros(4, 3))]

    def mse(out, target):
        return (out - target).pow(2).sum(-1).mean()

    diag_h = (2 / 4 * torch.tensor([1.0, 4.0, 0.25, 9.0])).expand(3, 4)
    table = _hutchinson(nn.Sequential(lin), batches, probes=3, loss=mse, mode="diagonal")
    for opt in ("int2", "int4"):
        err = quantization_error(lin.weight, mpsearch.parse_option(opt))
        want = float((diag_h * err.pow(2)).sum())
        got = float(table.frame.set_index("option").loc[opt, "damage"])
        assert got == pytest.approx(want, rel=1e-6)
    unc = table.metadata["uncertainty"]
    assert unc["trace"]["0"] == pytest.approx(float(diag_h.sum()), rel=1e-6)
    assert unc["trace_stderr"]["0"] == pytest.approx(0.0, abs=1e-6)


def test_stops_on_relative_tolerance_before_the_probe_limit():
    model, batches = _mlp()
    table = mpsearch.get_estimator("hessian", probes=500, min_probes=4, tol=0.5, loss="distill").estimate(
        model, batches, progress=False)
    used = table.metadata["uncertainty"]["probes_per_batch"]
    assert all(4 <= p < 500 for p in used)
    unc = table.metadata["uncertainty"]
    # the stopping rule held: every layer's standard error within tol of its trace (per batch, so
    # the combined one too)
    for n, t in unc["trace"].items():
        assert unc["trace_stderr"][n] <= 0.5 * max(abs(t), 1e-3 * max(map(abs, unc["trace"].values())))


def test_negative_traces_clamp_with_a_warning_abs_or_refuse():
    model, batches = _mlp()

    def concave(out, target):  # negative definite in the last layer
        return -out.pow(2).sum(-1).mean()

    with pytest.warns(EstimatorWarning, match=r"negative trace in layer\(s\) .*'4'.*set to 0"):
        table = mpsearch.get_estimator("hessian", probes=4, min_probes=4, loss=concave).estimate(
            model, batches, progress=False)
    assert table.metadata["uncertainty"]["trace"]["4"] == 0.0
    assert (table.frame.query("layer == '4'")["damage"] == 0).all()
    with pytest.warns(EstimatorWarning, match=r"using \|value\|"):
        table = mpsearch.get_estimator("hessian", probes=4, min_probes=4, loss=concave,
                                       negative="abs").estimate(model, batches, progress=False)
    assert table.metadata["uncertainty"]["trace"]["4"] > 0
    with pytest.raises(mpsearch.MpsearchError, match="negative trace in layer.*not locally convex"):
        mpsearch.get_estimator("hessian", probes=4, min_probes=4, loss=concave, negative="error").estimate(
            model, batches, progress=False)


@pytest.mark.filterwarnings("ignore::mpsearch.sensitivity.base.EstimatorWarning")
def test_hf_bert_with_sdpa_attention_has_a_double_backward():
    model, batches = tiny_bert()
    table = mpsearch.get_estimator("hessian", probes=4, min_probes=4, output="embedding").estimate(
        model, batches, progress=False)
    traces = table.metadata["uncertainty"]["trace"]
    assert len(traces) == 12 and all(np.isfinite(list(traces.values())))
    assert table.frame["damage"].sum() > 0


@pytest.mark.parametrize("kw, msg", [
    ({"probes": 0}, "probes must be an integer > 0, got 0"),
    ({"min_probes": 1}, "min_probes must be at least 2"),
    ({"tol": -1}, "tol must be a number >= 0"),
    ({"mode": "full"}, "mode must be one of 'trace', 'diagonal', got 'full'"),
    ({"negative": "zero"}, "negative must be one of 'clamp', 'abs', 'error'"),
    ({"loss": "nll"}, "loss must be one of 'auto', 'ce', 'distill' or a callable"),
    ({"output": "probs"}, "output must be one of 'auto', 'logits', 'embedding'"),
    ({"micro_batch": 0}, "micro_batch must be an integer > 0, got 0"),
])
def test_bad_settings_are_refused(kw, msg):
    model, batches = _mlp()
    with pytest.raises(mpsearch.MpsearchError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        mpsearch.get_estimator("hessian", **kw).estimate(model, batches, progress=False)


def test_ce_without_targets_is_refused():
    model, batches = _mlp()
    with pytest.raises(mpsearch.MpsearchError, match="loss='ce' needs labels in every batch"):
        mpsearch.get_estimator("hessian", loss="ce").estimate(model, [x for x, _ in batches], progress=False)


def test_loss_callable_must_return_a_scalar():
    model, batches = _mlp()
    with pytest.raises(mpsearch.MpsearchError, match="must return a scalar tensor"):
        mpsearch.get_estimator("hessian", loss=lambda out, t: out).estimate(model, batches, progress=False)
