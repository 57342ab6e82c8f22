"""GPTQ rounding: equals round-to-nearest when the inputs are uncorrelated, equals the textbook
column-by-column OBS recursion, lowers the layer's output error, and drives estimators/applier."""

import pytest
import torch
from torch import nn

from mpsearch.gptq import gptq_quantize_matrix, gptq_rounding, input_hessians
from mpsearch.options import parse_option
from mpsearch.quant import quantize_matrix, quantize_weight


def obs_reference(W, H, option, damp=0.01):
    """GPTQ as the OBS recursion of the paper, one column at a time with an explicit inverse
    (float64, no Cholesky, no blocks): after quantizing column i, the remaining columns move by
    -(w_i - q_i) / Hinv_ii * Hinv_i,: and row/column i leave the inverse."""
    W = W.double().clone()
    H = H.double().clone()
    H += damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    cols = W.shape[1]
    g = option.group_size
    scale = None
    from mpsearch.gptq import _qparams
    from mpsearch.quant import round_to_grid

    if g is None:
        scale = _qparams(W, option)
    for i in range(cols):
        if g is not None and i % g == 0:
            scale = _qparams(W[:, i:i + g], option)
        q = round_to_grid(W[:, i:i + 1], *scale)[:, 0]
        Q[:, i] = q
        d = Hinv[i, i]
        W[:, i + 1:] -= ((W[:, i] - q) / d).unsqueeze(1) * Hinv[i, i + 1:].unsqueeze(0)
        Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / d
    return Q


def correlated(n=256, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5
    X = torch.randn(n, cols, generator=g, dtype=torch.float64) @ (torch.eye(cols, dtype=torch.float64) + 2 * mix)
    W = torch.randn(16, cols, generator=g, dtype=torch.float64)
    return W, 2 * X.t() @ X / n, X


@pytest.mark.parametrize("name", ["int4", "int3-asym", "int4-g16", "int2-g32-asym"])
def test_uncorrelated_inputs_give_round_to_nearest(name):
    opt = parse_option(name)
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    H = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(2)) + 0.5)
    assert torch.equal(gptq_quantize_matrix(W, H, opt), quantize_matrix(W, opt))


@pytest.mark.parametrize("name,block", [("int4", 16), ("int3-asym", 64), ("int4-g16", 1), ("int2-g8-asym", 1), ("int4-g16", 16)])
def test_blocked_cholesky_gptq_equals_the_obs_recursion(name, block):
    opt = parse_option(name)
    W, H, _ = correlated()
    got = gptq_quantize_matrix(W, H, opt, block=block)
    want = obs_reference(W, H, opt)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_gptq_lowers_the_output_error_of_round_to_nearest(seed):
    W, H, X = correlated(seed=seed)
    for name in ("int3", "int4-g16-asym"):
        opt = parse_option(name)
        err = lambda Q: float(((X @ (W - Q).t()) ** 2).sum())  # noqa: E731
        assert err(gptq_quantize_matrix(W, H, opt)) < 0.9 * err(quantize_matrix(W, opt)), (seed, name)


def test_dead_inputs_are_zeroed_and_formats_refused():
    W, H, _ = correlated()
    H[:, 3] = 0
    H[3, :] = 0
    Q = gptq_quantize_matrix(W, H, parse_option("int4"))
    assert torch.all(Q[:, 3] == 0)
    from mpsearch.errors import MpsearchError

    import mpsearch.formats as formats
    import target_fixtures  # noqa: F401  (registers test_blk8)

    with pytest.raises(MpsearchError, match="quantizer 'gptq' supports mpsearch's integer options"):
        gptq_quantize_matrix(W, H, parse_option("test_blk8"))
    assert formats.get_format("test_blk8") is not None


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(64, 32) @ (torch.eye(32) + 0.5 * torch.randn(32, 32) / 32**0.5)
    return model, x


def test_input_hessians_are_two_over_n_xtx():
    model, x = model_and_data()
    from mpsearch.layers import discover_layers

    H = input_hessians(model, discover_layers(model), [x[:40], x[40:]])
    assert torch.allclose(H["0"], 2 * x.t() @ x / 64, atol=1e-5)
    h1 = torch.relu(model[0](x)).detach()
    assert torch.allclose(H["2"], 2 * h1.t() @ h1 / 64, atol=1e-5)


def test_estimator_and_applier_round_with_gptq():
    from mpsearch.apply import apply_plan
    from mpsearch.plan import BitPlan
    from mpsearch.registry import get_estimator

    model, x = model_and_data()
    est = get_estimator("weight-error", options="int3,int4")
    rtn = est.estimate(model, x, progress=False)
    gptq = est.estimate(model, x, progress=False, quantizer="gptq")
    assert gptq.metadata["quantizer"] == "gptq" and rtn.metadata["quantizer"] == "rtn"
    # unweighted weight error: GPTQ moves weights further from W than RTN (it trades weight error
    # for output error), so its damage is larger on every row
    assert (gptq.frame.damage.to_numpy() > rtn.frame.damage.to_numpy()).all()
    plan = BitPlan(bits={"0": 3, "2": 3})
    q = apply_plan(model, plan, quantizer="gptq", data=x)
    H = input_hessians(model, [l for l in __import__("mpsearch").discover_layers(model) if l.name == "0"], [x])["0"]
    assert torch.equal(q[0].weight, gptq_quantize_matrix(model[0].weight.detach(), H, parse_option("int3")))
    with gptq_rounding({}):  # no Hessian for a layer: round to nearest
        assert torch.equal(quantize_weight(model[0].weight, parse_option("int3"), name="0"),
                           quantize_matrix(model[0].weight.detach(), parse_option("int3")))
    out = lambda m: m(x).detach()  # noqa: E731
    assert float((out(q) - out(model)).pow(2).mean()) < float((out(apply_plan(model, plan)) - out(model)).pow(2).mean())
