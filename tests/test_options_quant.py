import pytest
import torch

import mpsearch
from mpsearch.errors import MpsearchError, QuantizationError
from mpsearch.options import KEEP, Option, parse_option, parse_options
from mpsearch.quant import max_levels_per_group, quantize_matrix, quantize_weight


@pytest.mark.parametrize("name", ["keep", "int1", "int4", "int4-g128", "int3-asym", "int2-g32-asym", "int8"])
def test_option_names_round_trip(name):
    opt = parse_option(name)
    assert opt.name == name
    assert Option.from_dict(opt.to_dict()) == opt


def test_bare_bits_and_keep_aliases():
    assert parse_option("4") == Option(4)
    assert parse_option(8) == Option(8)
    assert parse_option("16") is KEEP and parse_option("fp16") is KEEP


def test_storage_counts_scales_and_zero_points():
    # int4 g128 symmetric: 4 + 16/128 bits per weight
    assert Option(4, 128).size_bits(256, 1024) / (256 * 1024) == pytest.approx(4.125)
    # per channel: one fp16 scale per row
    assert Option(8).size_bits(10, 100) == 10 * 100 * 8 + 10 * 16
    # asymmetric adds a b-bit zero-point per group; a ragged last group still costs a scale
    assert Option(3, 64, symmetric=False).size_bits(2, 100) == 2 * 100 * 3 + 2 * 2 * (16 + 3)
    assert KEEP.size_bits(3, 7) == 3 * 7 * 16


@pytest.mark.parametrize(
    "spec, msg",
    [("int9", "bits must be 1-8"), ("int4-g0", "group_size must be a positive"),
     ("nf4", "unknown option 'nf4'"), ("", "unknown option")],
)
def test_bad_options(spec, msg):
    with pytest.raises(MpsearchError, match=msg):
        parse_option(spec)


def test_option_list_parsing():
    assert [o.name for o in parse_options("8,2,keep,4")] == ["int2", "int4", "int8", "keep"]
    with pytest.raises(MpsearchError, match="listed twice"):
        parse_options("4,int4")
    with pytest.raises(MpsearchError, match="empty"):
        parse_options(" , ")


def test_option_presets_expand_in_place():
    llm = ["int2-asym", "int3-asym", "int3-g64-asym", "int3-g32-asym", "int4-asym", "int4-g64-asym",
           "int4-g32-asym", "int5-asym", "int5-g64-asym", "int6-asym", "int8-asym"]
    assert [o.name for o in parse_options("llm")] == llm
    assert [o.name for o in parse_options("LLM,keep")] == llm + ["keep"]
    assert [o.name for o in parse_options("default")] == [
        "int2-asym", "int3-asym", "int4-asym", "int5-asym", "int6-asym", "int8-asym"]
    with pytest.raises(MpsearchError, match="listed twice"):
        parse_options("llm,int4-asym")
    from mpsearch.targets import get_target

    assert [o.name for o in get_target("mpsearch").parsed_options("llm,keep")] == llm + ["keep"]
    with pytest.raises(MpsearchError, match="target 'vllm' cannot execute option 'int2-asym'"):
        get_target("vllm").parsed_options("llm")


OPTIONS = [Option(b, g, s) for b in (1, 2, 3, 4, 8) for g in (None, 16) for s in (True, False)]


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.name)
def test_at_most_2b_levels_per_group(opt):
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    q = quantize_weight(w, opt)
    assert q.shape == w.shape and q.dtype == w.dtype
    assert max_levels_per_group(q, opt) <= 2**opt.bits
    # quantizing again changes nothing
    assert torch.allclose(quantize_weight(q, opt), q, atol=1e-6)


def test_error_shrinks_with_bits():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    errs = [float((quantize_weight(w, Option(b)) - w).pow(2).sum()) for b in (2, 3, 4, 6, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < errs[0] * 1e-3


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.name)
def test_zero_and_constant_rows(opt):
    w = torch.zeros(3, 20)
    w[1] = 0.37
    w[2] = -1.25
    q = quantize_weight(w, opt)
    assert torch.equal(q[0], torch.zeros(20))
    if opt.bits > 1 or opt.symmetric:
        assert torch.allclose(q[1:], w[1:], atol=1e-6)


def test_groups_are_independent():
    w = torch.ones(1, 32)
    w[0, 16:] = 1000.0  # a large second group must not crush the first
    q = quantize_weight(w, Option(2, 16))
    assert torch.allclose(q, w)
    q_pc = quantize_weight(w, Option(2))
    assert not torch.allclose(q_pc[0, :16], w[0, :16])


def test_conv_and_transposed_layouts():
    conv = torch.randn(8, 2, 3, 3)
    q = quantize_weight(conv, Option(3), "conv2d")
    assert q.shape == conv.shape
    # conv1d_hf stores [in, out]: its scales follow columns
    w = torch.randn(5, 4)
    w[:, 0] *= 100
    q_t = quantize_weight(w, Option(4), "conv1d_hf")
    assert torch.allclose(q_t, quantize_weight(w.t(), Option(4)).t())


def test_nan_and_inf_are_refused_naming_the_layer():
    w = torch.randn(4, 4)
    w[1, 2] = float("nan")
    with pytest.raises(QuantizationError, match="layer 'blocks.3.fc'.*1 NaN or Inf"):
        quantize_weight(w, Option(4), name="blocks.3.fc")
    w[1, 2] = float("inf")
    with pytest.raises(QuantizationError, match="NaN or Inf"):
        quantize_weight(w, Option(8))


# ------------------------------------------------------------------ exact answers, by hand
@pytest.mark.parametrize("option,row,want", [
    # int3: qmax 3, s = max|w| / 3 = 1: round to nearest, half to even (0.5 -> 0, 1.6 -> 2)
    ("int3", [3.0, -1.0, 0.5, 1.6], [3.0, -1.0, 0.0, 2.0]),
    # int2: qmax 1, s = 2: w/s = 1, -0.45, 0.55, -1
    ("int2", [2.0, -0.9, 1.1, -2.0], [2.0, 0.0, 2.0, -2.0]),
    # int1: +-mean|w| = +-2
    ("int1", [1.0, -3.0, 2.0, -2.0], [2.0, -2.0, 2.0, -2.0]),
    # int2-asym: 3 steps over [min(w,0), max(w,0)] = [-1, 2]: scale 1, zero-point 1
    ("int2-asym", [-1.0, 0.0, 2.0, 0.4], [-1.0, 0.0, 2.0, 0.0]),
    # all positive: the range starts at 0 (zero stays exact): scale 1, zero-point 0; 0.5 -> 0
    ("int2-asym", [1.0, 2.0, 3.0, 0.5], [1.0, 2.0, 3.0, 0.0]),
    # int2-g2: groups [4, 1] (s = 4) and [0.5, -0.25] (s = 0.5; -0.5 rounds to 0)
    ("int2-g2", [4.0, 1.0, 0.5, -0.25], [4.0, 0.0, 0.5, 0.0]),
    ("keep", [0.3, -0.7, 0.1, 0.9], [0.3, -0.7, 0.1, 0.9]),
])
def test_quantizer_levels_by_hand(option, row, want):
    w = torch.tensor([row, [0.0, 0.0, 0.0, 0.0]])
    q = quantize_matrix(w, parse_option(option))
    assert q[0].tolist() == pytest.approx(want, abs=1e-6)
    assert q[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_weight_error_estimator_by_hand():
    """damage = sum (Q(W) - W)^2; weighted: each column's squared error times E[x_j^2]."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, -1.0, 0.5, 1.6], [2.0, -0.9, 1.1, -2.0]]))
    table = mpsearch.get_estimator("weight-error", options="int3,int2,keep").estimate(model, None, progress=False)
    d = table.pivot("damage").loc["0"]
    # int3: row 0 errors (0, 0, 0.5, 0.4); row 1 (s = 2/3): Q = (2, -2/3, 4/3, -2)
    int3 = 0.25 + 0.16 + (0.9 - 2 / 3) ** 2 + (4 / 3 - 1.1) ** 2
    # int2: row 0 (s = 3): Q = (3, 0, 0, 3); row 1: Q = (2, 0, 2, -2)
    int2 = 1.0 + 0.25 + 1.4**2 + 0.9**2 + 0.9**2
    assert [d["int3"], d["int2"], d["keep"]] == pytest.approx([int3, int2, 0.0], rel=1e-5)
    x = torch.tensor([[1.0, 0.0, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0]])  # E[x^2] = (1, 0, 0, 2)
    weighted = mpsearch.get_estimator("weight-error", options="int3,int2", weighted=True).estimate(
        model, [x], progress=False).pivot("damage").loc["0"]
    assert weighted["int3"] == pytest.approx(0.16 * 2, rel=1e-5)  # only column 3 of row 0 errs there
    assert weighted["int2"] == pytest.approx(1.4**2 * 2, rel=1e-5)  # row 0, column 3; row 1 errs on 1, 2
