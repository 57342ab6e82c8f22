"""A consumer format is declared once (issue 25): a plugin registers one format, naming the targets that
offer it (mpsearch.formats.Offer), and the format joins those targets' options, is planned by a solver,
is written by the consumer's exporter (which the consumer's own code reads) and passes the consumer
conformance suite, with no other file touched; a target whose option list names a format that does not
declare it is caught."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpsearch.budget import Budget
from mpsearch.export import export_plan, import_plan
from mpsearch.formats import Format, format_names, get_format, Offer, offered_by, register, unregister
from mpsearch.registry import get_estimator, get_solver
from mpsearch.targets import get_target, target_names
from mpsearch.targets.consumers import ConsumerTarget
from mpsearch.testing.consumers import check_format, check_target, check_target_options

VLLM_OPTIONS = ("w4a16-g128", "w4a16-g32", "w4a16-asym", "w8a16", "w8a8-int8", "w8a8-fp8", "nvfp4", "mxfp4",
                "mxfp4-w4a4", "keep")


# ------------------------------------------------------------------------------------------------
# the plugin: one declaration plus its fake quantizer
# ------------------------------------------------------------------------------------------------
class W3A16G64(Format):
    """int3 symmetric weights in groups of 64 for vLLM, as compressed-tensors rounds them: scale =
    max(|min(w, 0)|, max(w, 0)) / 3.5 (machine epsilon where 0), codes -4..3; stored pack-quantized
    (int32-packed codes, a 16-bit scale per group, the int64 weight_shape)."""

    name = "w3a16-g64"
    bits = 3
    consumer = "compressed-tensors"
    level_group = 64
    group, symmetric = 64, True  # the integer settings the llm-compressor exporter writes
    description = "compressed-tensors int3 symmetric, one scale per 64 inputs"
    offers = (Offer("vllm", default=True),)

    def size_bits(self, out_channels, in_features):
        groups = -(-in_features // 64)
        return 32 * out_channels * -(-in_features * 3 // 32) + 16 * out_channels * groups + 128

    def checkpoint_tensors(self, out_channels, in_features, dtype="BF16"):  # for --target vllm's file model
        return [("weight_packed", "I32", (out_channels, -(-in_features * 3 // 32))),
                ("weight_scale", dtype, (out_channels, -(-in_features // 64))), ("weight_shape", "I64", (2,))]

    def bits_per_weight(self, in_features=None):
        n = in_features or 4096
        return self.size_bits(4096, n) / (4096 * n)

    def check_shape(self, out_channels, in_features):
        return None if in_features % 64 == 0 else f"needs in_features divisible by 64 (got {in_features})"

    def quantize(self, matrix):
        out, cols = matrix.shape
        x = matrix.reshape(out, cols // 64, 64)
        lo = torch.clamp(x.amin(-1, keepdim=True), max=0)
        hi = torch.clamp(x.amax(-1, keepdim=True), min=0)
        scale = torch.max(lo.abs(), hi) / (torch.tensor(7.0) / 2)
        scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps), scale)
        q = torch.round(torch.clamp(x / scale, -4.0, 3.0))
        return (q * scale).reshape(out, cols)


@pytest.fixture
def plugin():
    fmt = register(W3A16G64())
    yield fmt
    unregister(fmt.name)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))


# ------------------------------------------------------------------------------------------------
def test_a_registered_format_joins_its_targets_options_and_leaves_with_it(plugin):
    vllm = get_target("vllm")
    assert vllm.options == VLLM_OPTIONS[:5] + ("w3a16-g64",) + VLLM_OPTIONS[5:]  # rank 0, after the built-ins
    assert vllm.default_options == ("w4a16-g128", "w4a16-g32", "w8a16", "w3a16-g64")
    assert "w3a16-g64" in [r["option"] for r in vllm.describe()]
    assert all("w3a16-g64" not in get_target(t).options for t in target_names() if t != "vllm")
    unregister("w3a16-g64")
    assert vllm.options == VLLM_OPTIONS and get_format("w3a16-g64") is None
    assert "w3a16-g64" not in format_names()


def test_the_plugin_format_is_planned_applied_and_exported(plugin):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from mpsearch.apply import apply_plan
    from mpsearch.validate import validate_plan

    model, x = mlp(), torch.randn(64, 128)
    table = get_estimator("weight-error").estimate(model, x, progress=False, target="vllm")
    assert set(table.options) == {"w4a16-g128", "w4a16-g32", "w8a16", "w3a16-g64"}  # the default set
    assert "uniform-w3a16-g64" in table.metadata["file"]["recipes"]  # the checkpoint's size, from its tensors
    res = get_solver("ilp").solve(table, Budget.parse(["avg_bits=3.6"]))  # below every other option
    chosen = {n: res.plan.option(n).name for n in res.plan.layers}
    assert "w3a16-g64" in chosen.values(), chosen
    q = apply_plan(model, res.plan)
    three = next(n for n, o in chosen.items() if o == "w3a16-g64")
    w = dict(q.named_modules())[three].weight.detach().reshape(-1, 64)
    assert max(len(torch.unique(g)) for g in w) <= 8
    assert validate_plan(model, res.plan, target="vllm").ok
    modifiers = export_plan(res.plan, "llm-compressor")["quant_stage"]["quant_modifiers"]
    groups = modifiers["QuantizationModifier"]["config_groups"]  # round to nearest, as the table measured
    (group,) = [g for g in groups.values() if three in g["targets"]]
    assert group["weights"] == {"num_bits": 3, "type": "int", "symmetric": True, "strategy": "group",
                                "group_size": 64, "dynamic": False}
    QuantizationScheme.model_validate(group)  # compressed-tensors reads the scheme
    args = QuantizationArgs(**group["weights"])
    check_format(plugin, reference=lambda w: _compressed_tensors_rounding(w, args))


def _compressed_tensors_rounding(w, args):
    """compressed-tensors' own fake quantization of ``w`` under the exported weight args."""
    from consumer_oracles import ct_qparams
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    scale, zp, gs = ct_qparams(w, args)
    return fake_quantize(w, scale, zp, args, global_scale=gs)


def test_the_plugin_format_passes_the_consumer_suite_with_its_target(plugin):
    from mpsearch.filesize_ct import _nbytes, option_tensors

    check_format(plugin)
    check_target("vllm")  # its options (the plugin's included), rules, recipes, exporter
    for out, inp in ((64, 128), (576, 1536), (96, 320)):
        assert 8 * sum(_nbytes(d, s) for _, d, s in option_tensors("w3a16-g64", out, inp)) == plugin.size_bits(out, inp)


def test_a_vllm_format_without_a_checkpoint_layout_is_told_not_left_out():
    class NoLayout(W3A16G64):
        checkpoint_tensors = None

    register(NoLayout())
    try:
        table = get_estimator("weight-error").estimate(mlp(), torch.randn(8, 128), progress=False, target="vllm")
        assert "file" not in table.metadata
        assert "no compressed-tensors layout known for option 'w3a16-g64'" in table.metadata["file_note"]
    finally:
        unregister("w3a16-g64")


def test_an_importer_gives_a_declared_format_back():
    from mpsearch.formats.intq import TorchaoInt

    fmt = register(TorchaoInt("intx-3-g16", 3, 16, True, "torchao IntxWeightOnlyConfig(int3, PerGroup(16))",
                              offers=(Offer("torchao"),)))
    try:
        assert get_target("torchao").options[-3:] == ("intx-3-g16", "int8wo", "keep")  # int8wo is ranked last
        check_format(fmt)
        check_target("torchao")  # the exporter round trip reads intx-3-g16 back (torchao has an importer)
        plan = import_plan({"_type": "FqnToConfig", "_version": 1, "_data": {"fqn_to_config": {
            "a": export_plan(_plan("intx-3-g16"), "torchao")["_data"]["fqn_to_config"]["a"]}}}, "torchao")
        assert plan.option("a").name == "intx-3-g16"
    finally:
        unregister("intx-3-g16")


def _plan(option):
    from mpsearch.options import parse_option
    from mpsearch.plan import BitPlan

    opt = parse_option(option)
    return BitPlan(bits={"a": opt.bits}, options={"a": opt.to_dict()})


# ------------------------------------------------------------------------------------------------
# a target's options are exactly the formats that declare it
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [t for t in target_names() if t != "mpsearch"])
def test_every_consumer_targets_options_are_the_formats_that_declare_it(name):
    t = get_target(name)
    declared = [n for n, _ in offered_by(name)]
    assert declared and list(t.options) == declared + ["keep"]
    for option in declared:
        assert any(o.target == name for o in get_format(option).offers)


class ListsAnUndeclaredFormat(ConsumerTarget):
    """Broken: vLLM's declared formats plus one it spells out itself (a torchao format)."""

    @property
    def options(self):
        return super().options[:-1] + ("intx-4-g32", "keep")


def test_an_option_list_naming_an_undeclared_format_is_caught():
    t = ListsAnUndeclaredFormat("vllm", "vLLM", "", "llm-compressor")
    with pytest.raises(AssertionError, match=r"^vllm: options \['intx-4-g32'\] are not formats that declare "
                                             r"Offer\('vllm'\)"):
        check_target_options(t)
    check_target_options(get_target("vllm"))
