import numpy as np
import pytest
import torch
from torch import nn

from core_models import tiny_cnn, tiny_cnn_input, tiny_lm, tiny_lm_input
from mpsearch.apply import apply_plan
from mpsearch.errors import MpsearchError, PlanError
from mpsearch.layers import discover_layers, tie_groups
from mpsearch.options import Option
from mpsearch.plan import BitPlan
from mpsearch.quant import max_levels_per_group
from mpsearch.validate import validate_plan


def test_discovers_conv_grouped_depthwise_and_linear_with_macs():
    layers = discover_layers(tiny_cnn(), tiny_cnn_input())
    by = {lay.name: lay for lay in layers}
    assert list(by) == ["0", "2", "4", "6"]
    assert by["0"].kind == "conv2d" and by["0"].in_features == 9 and by["0"].params == 36
    assert by["2"].in_features == 9 and by["2"].out_channels == 4  # depthwise: 1 channel x 3x3
    assert by["4"].in_features == 2 * 9  # groups=2: 2 input channels per group
    # MACs per sample: outputs x fan-in
    assert by["0"].macs == 4 * 8 * 8 * 9
    assert by["4"].macs == 8 * 6 * 6 * 18
    assert by["6"].macs == 288 * 10


def test_embedding_on_request_and_transformers_conv1d():
    from transformers.pytorch_utils import Conv1D

    m = nn.Sequential(nn.Embedding(10, 4), Conv1D(6, 4))
    ids = torch.tensor([[1, 2, 3]])
    layers = discover_layers(m, ids, include_embedding=True)
    assert [(l.name, l.kind) for l in layers] == [("0", "embedding"), ("1", "conv1d_hf")]
    assert layers[1].out_channels == 6 and layers[1].in_features == 4
    assert layers[1].macs == 3 * 6 * 4 and layers[0].macs == 0
    assert [l.name for l in discover_layers(m, ids)] == ["1"]


def test_no_quantizable_layer_is_an_error():
    with pytest.raises(MpsearchError, match="no quantizable layer"):
        discover_layers(nn.Sequential(nn.ReLU()))


def test_fused_projection_and_regex_ties():
    layers = discover_layers(tiny_lm(), tiny_lm_input(), fuse_projections=True)
    groups = {}
    for l in layers:
        groups.setdefault(l.group, []).append(l.name)
    assert groups["layers.0.q_proj+2"] == ["layers.0.q_proj", "layers.0.k_proj", "layers.0.v_proj"]
    assert groups["layers.1.gate_proj+1"] == ["layers.1.gate_proj", "layers.1.up_proj"]
    assert groups[None] == ["layers.0.down_proj", "layers.1.down_proj", "head"]
    # a regex ties per equal capture; one without captures ties everything it matches
    names = [l.name for l in layers]
    g = tie_groups(names, ties=[r"layers\.(\d+)\.down_proj"])
    assert g == {}  # one layer per capture value: no group of two
    g = tie_groups(names, ties=[r"down_proj"])
    assert g["layers.0.down_proj"] == g["layers.1.down_proj"]
    with pytest.raises(MpsearchError, match="does not compile"):
        tie_groups(names, ties=["("])


def test_apply_returns_new_model_and_touches_only_planned_layers():
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = BitPlan(bits={"0": 2, "6": 3}, options={"6": Option(3, 16).to_dict()})
    q = apply_plan(model, plan)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # original untouched
    sd = q.state_dict()
    assert not torch.equal(sd["0.weight"], before["0.weight"])
    assert torch.equal(sd["2.weight"], before["2.weight"])  # not in the plan
    assert torch.equal(sd["0.bias"], before["0.bias"])  # biases untouched
    assert max_levels_per_group(sd["6.weight"], Option(3, 16)) <= 8
    q2 = apply_plan(model, plan, inplace=True)
    assert q2 is model and torch.equal(model.state_dict()["0.weight"], sd["0.weight"])


def test_apply_unknown_layer_names_close_matches():
    plan = BitPlan(bits={"layers.0.q_prj": 4})
    with pytest.raises(PlanError, match="does not have: 'layers.0.q_prj'.*did you mean 'layers.0.q_proj'"):
        apply_plan(tiny_lm(), plan)
    with pytest.raises(PlanError, match="not quantizable layers: 'layers.0'"):
        apply_plan(tiny_lm(), BitPlan(bits={"layers.0": 4}))


def test_apply_nan_weight_names_the_layer():
    model = tiny_cnn()
    with torch.no_grad():
        model[6].weight[0, 0] = float("nan")
    with pytest.raises(MpsearchError, match="layer '6' holds 1 NaN"):
        apply_plan(model, BitPlan(bits={"6": 4}))


def test_validate_reports_levels_size_and_quality():
    model, x = tiny_lm(), tiny_lm_input()
    plan = BitPlan(bits={"layers.0.q_proj": 2, "head": 4}, options={"head": Option(4, 4, False).to_dict()})
    metric = lambda m: float((m(x) - model(x)).pow(2).mean())  # noqa: E731
    rep = validate_plan(model, plan, metric=metric)
    assert rep.ok and rep.baseline_quality == 0.0 and rep.quality > 0
    assert "layers.1.down_proj" in rep.unplanned
    head = next(r for r in rep.layers if r["layer"] == "head")
    assert head["max_levels"] <= 16
    assert head["size_bits"] == 20 * 8 * 4 + 20 * 2 * (16 + 4)
    unplanned = sum(model.get_submodule(n).weight.numel() for n in rep.unplanned)
    assert rep.size_bits == pytest.approx(8 * 8 * 2 + 8 * 16 + head["size_bits"] + unplanned * 16)


def test_validate_catches_a_model_that_was_not_quantized():
    model = tiny_cnn()
    with pytest.raises(PlanError, match="distinct values in one scale group"):
        validate_plan(model, BitPlan(bits={"6": 2}), quantized=model)


def _mixed_plan(names, opts):
    from mpsearch.options import parse_option

    parsed = {n: parse_option(o) for n, o in zip(names, opts)}
    return BitPlan(bits={n: p.bits for n, p in parsed.items()},
                   options={n: {**p.to_dict(), "name": o} for (n, p), o in zip(parsed.items(), opts)})


def test_plan_switch_equals_apply_plan_at_every_step_and_restores_the_model():
    """PlanSwitch re-quantizes only the layers whose option changed, from the fp copy: each state
    must be bit-identical to apply_plan of that plan (hooks of activation formats included), and
    restore must give back the original weights and no hook."""
    from mpsearch.apply import PlanSwitch, activation_hooks

    torch.manual_seed(0)
    model = tiny_lm()
    names = [lay.name for lay in discover_layers(model)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = tiny_lm_input()
    rng = np.random.default_rng(0)
    choices = ["int2-asym", "int4", "int4-g4-asym", "w8a8-int8", "keep"]
    plans = [_mixed_plan(names, rng.choice(choices, len(names))) for _ in range(6)]
    plans.insert(3, _mixed_plan(names[:2], ["int3", "w8a8-int8"]))  # a plan naming fewer layers
    switch = PlanSwitch(model, names)
    changed = []
    for plan in plans:
        changed.append(switch.apply(plan))
        ref = apply_plan(tiny_lm_from(before), plan)
        for k, v in ref.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
        assert sorted(activation_hooks(model)) == sorted(activation_hooks(ref))
        with torch.no_grad():
            assert torch.equal(model(x), ref(x))
    assert switch.apply(plans[-1]) == 0  # the same plan again: nothing re-quantized
    assert 0 < min(changed[1:]) and max(changed) <= len(names)
    switch.restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert activation_hooks(model) == {}
    with pytest.raises(PlanError, match="not made for"):
        PlanSwitch(model, names[:1]).apply(_mixed_plan(names[1:2], ["int4"]))


def tiny_lm_from(state):
    model = tiny_lm()
    model.load_state_dict(state)
    return model
