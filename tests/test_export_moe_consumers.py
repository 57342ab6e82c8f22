"""Mixture-of-experts plans through AutoRound, ModelOpt and GPTQModel, checked with their own code.

On transformers' fused Qwen3-MoE experts (``mlp.experts.gate_up_proj`` / ``down_proj``, 3-D):
AutoRound unfuses them into one Linear per expert and projection before it resolves
``layer_config`` (``AutoRound(...).post_init()``), then quantizes them (``quantize()``, round to
nearest); ModelOpt quantizes them in place and writes one ``quantized_layers`` entry per experts
module (``get_quant_config``); GPTQModel quantizes ``mlp.experts.<e>.gate_proj/up_proj/down_proj``
(its ``Qwen3MoeQModel.module_tree``), resolved here with its documented ``dynamic`` rules and, where
it installs (not on this CPU machine: it needs torch>=2.14.1 and compiles PyPcre), with its own
``clone_gptq_config_for_module``. Each test checks that every expert of a layer gets the layer's
option, that exactly the planned modules are quantized, and that routers are left alone.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import random
import warnings

import pytest
import torch

from mpsearch.errors import MpsearchError
from mpsearch.export import export_plan, export_text, import_plan
from mpsearch.export._base import int_settings
from mpsearch.layers import discover_layers
from mpsearch.options import parse_option
from mpsearch.plan import BitPlan
from mpsearch.quant import quantize_weight

from moe_models import tiny_moe
from test_export_consumers import GPTQMODEL_SCRIPT, run_consumer

PROJS = {"gate_up_proj": (("gate_proj", 0), ("up_proj", 1)), "down_proj": (("down_proj", None),)}


def moe_plan(model, specs, seed=0, split_experts=False) -> BitPlan:
    """A random plan over the layers the consumer targets plan (routers, embeddings and lm_head
    left out): q/k/v and gate/up share an option, and a layer's experts one unless ``split_experts``."""
    rng = random.Random(seed)
    choice = {}
    for lay in discover_layers(model):
        n = lay.name
        if lay.role == "router" or n.endswith("lm_head"):
            continue
        if n.endswith(("k_proj", "v_proj")):
            choice[n] = choice[n[:-6] + "q_proj"]
        elif n.endswith(".up_proj") and n[:-7] + "gate_proj" in choice:  # a shared expert's gate/up
            choice[n] = choice[n[:-7] + "gate_proj"]
        elif n.endswith("experts.down_proj") and not split_experts:
            choice[n] = choice[n[: -len("down_proj")] + "gate_up_proj"]
        else:
            choice[n] = rng.choice(specs)
    opts = {n: parse_option(s) for n, s in choice.items()}
    return BitPlan(bits={n: o.bits for n, o in opts.items()}, options={n: o.to_dict() for n, o in opts.items()})


def expert_modules(model, name):
    """``[(module name, expert, half)]``: the per-expert Linears a stacked tensor is unfused into
    (``half`` 0/1: the gate/up rows of ``gate_up_proj``; None: the whole matrix)."""
    container, proj = name.rsplit(".", 1)
    experts = model.get_parameter(name).shape[0]
    return [(f"{container}.{e}.{p}", e, half) for e in range(experts) for p, half in PROJS[proj]]


def planned_modules(model, plan):
    """Every module the plan decides, as the unfusing consumers name them -> the plan's option."""
    out = {}
    for name in plan.layers:
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out.update({m: plan.option(name) for m, _, _ in expert_modules(model, name)})
        else:
            out[name] = plan.option(name)
    return out


def routers(model):
    return [lay.name for lay in discover_layers(model) if lay.role == "router"]


def varied(plan):
    """The plan gives the experts of different layers different options (else the test proves little)."""
    opts = {plan.option_name(n) for n in plan.layers if ".experts." in n}
    assert len(opts) > 1, opts


# ----------------------------------------------------------------- AutoRound
def autoround(model, layer_config, monkeypatch, tmp_path):
    pytest.importorskip("auto_round", reason="auto-round is not installed (pip install auto-round)")
    from auto_round import AutoRound

    monkeypatch.chdir(tmp_path)  # AutoRound's work space (offload files) goes under the cwd
    monkeypatch.setenv("AR_WORK_SPACE", str(tmp_path / "ar"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ar = AutoRound(model, tokenizer=object(), scheme="W4A16", layer_config=layer_config, iters=0,
                       disable_opt_rtn=True)
        ar.post_init()  # unfuses the experts (prepare_model_for_moe_quantization), resolves layer_config
    return ar


@pytest.mark.parametrize("family,seed,split", [("qwen3_moe", 0, False), ("qwen3_moe", 1, False),
                                               ("qwen3_moe", 2, True), ("qwen2_moe", 3, False), ("mixtral", 2, False)])
def test_autoround_gives_every_expert_its_layers_option(family, seed, split, monkeypatch, tmp_path):
    model = tiny_moe(family)
    original, kept = copy.deepcopy(model), routers(model)
    specs = ["autoround-int2-g32", "autoround-int3-g32-asym", "autoround-int4-g32", "autoround-int5-g32-asym",
             "autoround-int8-g32", "keep"]
    plan = moe_plan(model, specs, seed, split)
    varied(plan)
    doc = json.loads(export_text(plan, "autoround", force=split))
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in doc)  # stacked names are not modules
    want = planned_modules(model, plan)
    ar = autoround(model, doc, monkeypatch, tmp_path)
    resolved = ar.layer_config
    linear_routers = {r for r in kept if type(original.get_submodule(r)) is torch.nn.Linear}
    assert (family == "qwen2_moe") == bool(linear_routers)  # its shared_expert_gate
    quantized_names = {n for n, c in resolved.items() if c["bits"] < 16}
    assert quantized_names == {n for n, o in want.items() if not o.is_keep}  # exactly the planned modules
    assert set(resolved) == set(want) | linear_routers  # every expert there; no lm_head
    for name, o in want.items():
        c, o = resolved[name], int_settings(o)
        if o.is_keep:
            assert (c["bits"], c["data_type"]) == (16, "float"), name
        else:
            assert (c["bits"], c["group_size"], c["sym"], c["data_type"]) == (
                o.bits, o.group_size or -1, o.symmetric, "int"), name
    for r in linear_routers:  # Qwen2-MoE's one-row shared_expert_gate: AutoRound keeps it (shape rule)
        assert resolved[r]["bits"] == 16, r
    # AutoRound's round-to-nearest quantization of each expert has the planned levels per group and,
    # symmetric, is mpsearch's of that expert's matrix bit for bit (AutoRound works in bfloat16 here,
    # its amp dtype on this CPU: mpsearch rounds the same bf16 matrix). Its asymmetric path in
    # quantize() rounds some values one step away from the int_asym function the formats are proven
    # equal to (tests/test_formats_consumers.py), dense layers too, so those are checked by levels.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized, _ = ar.quantize()
    for name in plan.layers:
        if ".experts." not in name:
            continue
        o = plan.option(name)
        stacked = original.get_parameter(name).detach().to(torch.bfloat16)
        ours = stacked if o.is_keep else quantize_weight(stacked, o, "expert")
        rows = stacked.shape[1] // 2
        for module, e, half in expert_modules(original, name):
            part = slice(None) if half is None else slice(half * rows, (half + 1) * rows)
            theirs, mine = quantized.get_submodule(module).weight.detach(), ours[e, part]
            assert theirs.dtype == torch.bfloat16, module
            if o.is_keep or int_settings(o).symmetric:
                assert torch.equal(theirs, mine), module
            else:
                groups = theirs.float().reshape(-1, int_settings(o).group_size)
                assert max(len(g.unique()) for g in groups) <= 2 ** o.bits, module
                assert not torch.equal(theirs, stacked[e, part]), module
    assert kept
    for r in kept:
        assert torch.equal(quantized.get_submodule(r).weight, original.get_submodule(r).weight.to(torch.bfloat16)), r


# ----------------------------------------------------------------- ModelOpt
MODELOPT_MOE_SCRIPT = """
import warnings
import modelopt.torch.quantization as mtq
from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format
from modelopt.torch.export.quant_utils import get_quant_config
from moe_models import tiny_moe
out = []
for case in json.load(open(PAYLOAD)):
    model = tiny_moe("qwen3_moe")
    quant_cfg = {"default": {"enable": False}}
    for quantizer, (bits, group) in case["weights"].items():  # ModelOpt's own weight quantizer settings
        quant_cfg[quantizer] = {"num_bits": bits, "enable": True,
                                **({"block_sizes": {-1: group}} if group else {"axis": 0})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, {"quant_cfg": quant_cfg, "algorithm": "max"}, forward_loop=None)
        converted = convert_hf_quant_config_format(case["doc"])
    enabled = [n for n, m in model.named_modules()
               if "weight_quantizer" in n and getattr(m, "is_enabled", False)]
    got = {"theirs": get_quant_config(model), "converted": converted, "enabled": enabled}
    if case["export"]:  # ModelOpt's own checkpoint export: its hf_quant_config.json and tensor names
        import os
        from modelopt.torch.export import export_hf_checkpoint
        from safetensors import safe_open
        model.config.architectures = ["Qwen3MoeForCausalLM"]
        export_hf_checkpoint(model, export_dir=case["export"])
        got["file"] = json.load(open(os.path.join(case["export"], "hf_quant_config.json")))
        with safe_open(os.path.join(case["export"], "model.safetensors"), "pt") as f:
            got["tensors"] = sorted(f.keys())
    out.append(got)
json.dump(out, open(RESULT, "w"))
"""


def test_modelopt_writes_one_entry_per_experts_module_as_we_do(tmp_path):
    model = tiny_moe("qwen3_moe")
    # the third is exported by ModelOpt itself too (its export_hf_checkpoint of this fused-experts
    # model fails when any layer is int4_awq: ModelOpt 0.47, CPU)
    plans = [moe_plan(model, specs, seed) for specs, seed in ((["int4-g32", "int8", "keep"], 0),
                                                              (["int4-g32", "int8", "keep"], 2), (["int8", "keep"], 3))]
    payload = []
    for i, plan in enumerate(plans):
        varied(plan)
        weights = {}
        for n in plan.layers:
            o = plan.option(n)
            if not o.is_keep:  # a stacked tensor has one weight quantizer per expert (_QuantFusedExperts)
                key = n + "_weight_quantizers.*" if ".experts." in n else n + ".weight_quantizer"
                weights[key] = [o.bits, o.group_size]
        payload.append({"weights": weights, "doc": json.loads(export_text(plan, "modelopt")),
                        "export": str(tmp_path / "ckpt") if i == 2 else None})
    result = run_consumer("modelopt", "pip install nvidia-modelopt", MODELOPT_MOE_SCRIPT, payload, tmp_path)
    for plan, case, got in zip(plans, payload, result):
        ours, theirs = case["doc"]["quantization"], got["theirs"]["quantization"]
        assert ours["quant_algo"] == "MIXED_PRECISION"  # always, for a plan with experts (see below)
        if theirs["quant_algo"] == "MIXED_PRECISION":
            assert theirs["quantized_layers"] == ours["quantized_layers"]
        else:  # one format: ModelOpt lists what it leaves out, routers included, with wildcards
            assert {json.dumps(e) for e in ours["quantized_layers"].values()} == {json.dumps(
                {k: v for k, v in theirs.items() if k not in ("kv_cache_quant_algo", "exclude_modules")})}
            names = set(ours["quantized_layers"]) | set(ours["exclude_modules"]) | set(routers(model))
            left = {n for n in names if any(fnmatch.fnmatch(n, p) for p in theirs["exclude_modules"])}
            assert left == names - set(ours["quantized_layers"]) and set(routers(model)) <= left
        experts = [f"model.layers.{i}.mlp.experts" for i in range(2)]
        for container in experts:
            o = plan.option(container + ".gate_up_proj")
            assert (container in ours["quantized_layers"]) == (not o.is_keep)
            assert (container in ours["exclude_modules"]) == o.is_keep
        # every expert's weight quantizers are on exactly where planned; routers have none
        on = set(got["enabled"])
        for container in experts:
            for proj in ("gate_up_proj", "down_proj"):
                names = {f"{container}.{proj}_weight_quantizers.{e}" for e in range(4)}
                assert (names <= on) == (not plan.option(f"{container}.{proj}").is_keep)
        assert routers(model) and not [n for n in on if any(n.startswith(r + ".") for r in routers(model))]
        conv = got["converted"]
        seen = {t: (g["weights"]["num_bits"], g["weights"].get("group_size"))
                for g in conv["config_groups"].values() for t in g["targets"]}
        want = {}
        for n in plan.layers:
            o = plan.option(n)
            if not o.is_keep:
                want[n.rsplit(".", 1)[0] if ".experts." in n else n] = (o.bits, o.group_size)
        assert seen == want
        assert set(conv["ignore"]) == set(ours["exclude_modules"])
        if "file" in got:  # the file ModelOpt writes beside its checkpoint is what get_quant_config gave
            assert got["file"]["quantization"] == theirs
            for container in experts:  # stored as per-expert Linears, quantized ones with their scales
                scaled = f"{container}.3.down_proj.weight_scale" in got["tensors"]
                assert f"{container}.3.gate_proj.weight" in got["tensors"]
                assert scaled == (container in ours["quantized_layers"]), container


def test_modelopt_refuses_experts_it_cannot_write_as_one_entry():
    model = tiny_moe("qwen3_moe")
    plan = moe_plan(model, ["int4-g32", "int8"], 0, split_experts=True)
    split = [c for c in ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts")
             if plan.option_name(c + ".gate_up_proj") != plan.option_name(c + ".down_proj")]
    assert split
    with pytest.raises(MpsearchError, match="one fused MoE layer"):
        export_plan(plan, "modelopt")
    with pytest.raises(MpsearchError, match="one quantized_layers entry, but the plan gives them different options"):
        export_plan(plan, "modelopt", force=True)
    part = BitPlan(bits={n: b for n, b in plan.bits.items() if not n.endswith("experts.down_proj")},
                   options={n: o for n, o in plan.options.items() if not n.endswith("experts.down_proj")})
    with pytest.raises(MpsearchError, match="plan has only .*gate_up_proj of 'model.layers.0.mlp.experts'"):
        export_plan(part, "modelopt")


# ----------------------------------------------------------------- GPTQModel
def gptq_model():
    return tiny_moe("qwen3_moe")


def gptq_plans(model):
    specs = ["int2", "int3-g32", "int4-g32-asym", "int4", "int8", "int8-g64", "keep"]
    return [moe_plan(model, specs, seed, split) for seed, split in ((0, False), (1, False), (4, True))]


def test_gptqmodel_dynamic_gives_every_expert_module_its_layers_option():
    """Resolved with GPTQModel's documented ``dynamic`` rules (``dynamic_get``: ``-:`` skips the
    module, the first matching ``+:`` key's fields override the defaults) on the module names its
    ``Qwen3MoeQModel`` quantizes, ``model.layers.N.mlp.experts.<e>.gate_proj/up_proj/down_proj``."""
    from mpsearch.export.gptqmodel_dynamic import resolve

    model = gptq_model()
    for plan in gptq_plans(model):
        varied(plan)
        doc = export_plan(plan, "gptqmodel", force=True)
        for module, o in planned_modules(model, plan).items():
            got = resolve(doc, module)
            assert (got.is_keep, got.bits, got.group_size, got.symmetric) == (
                o.is_keep, o.bits, o.group_size, o.symmetric) or (got.is_keep and o.is_keep), module
        # no key speaks of the routers, which GPTQModel never quantizes (``gate:!`` in its module tree)
        import re

        for r in routers(model):
            assert not [k for k in doc["dynamic"] if re.match(k.split(":", 1)[1], r)], r
        # and the file reads back to the plan, through the model's own (stacked) names; given the
        # model, the routers and the embedding (never quantized by GPTQModel) are left out
        whole = import_plan(doc, "gptqmodel", layers=model)
        assert set(whole.layers) == set(plan.layers) | {"lm_head"} and whole.option("lm_head").is_keep
        back = import_plan(doc, "gptqmodel", layers=plan.layers)
        for n in plan.layers:
            b, o = back.option(n), plan.option(n)
            assert b.is_keep == o.is_keep and (o.is_keep or (b.bits, b.group_size, b.symmetric) == (
                o.bits, o.group_size, o.symmetric)), n


def test_gptqmodel_import_refuses_experts_of_one_tensor_with_different_settings():
    model = gptq_model()
    plan = gptq_plans(model)[0]
    doc = export_plan(plan, "gptqmodel")
    doc["dynamic"] = {r"+:^model\.layers\.1\.mlp\.experts\.2\.down_proj$": {"bits": 2}, **doc["dynamic"]}
    with pytest.raises(MpsearchError, match=r"experts of .model.layers.1.mlp.experts.down_proj. different settings"):
        import_plan(doc, "gptqmodel", layers=plan.layers)


def test_gptqmodel_clone_config_gives_every_expert_module_its_layers_option(tmp_path):
    model = gptq_model()
    plans = gptq_plans(model)
    wants = [planned_modules(model, p) for p in plans]
    payload = [{"doc": export_plan(p, "gptqmodel", force=True), "layers": list(w)} for p, w in zip(plans, wants)]
    result = run_consumer("gptqmodel", "pip install gptqmodel; it needs torch>=2.14.1", GPTQMODEL_SCRIPT, payload,
                          tmp_path)
    for want, got in zip(wants, result):
        for module, o in want.items():
            assert got["layers"][module] == (None if o.is_keep else [o.bits, o.group_size or -1, o.symmetric]), module


# ----------------------------------------------------------------- estimate -> solve -> export
@pytest.mark.parametrize("target,options", [("autoround", "autoround-int2-g32,autoround-int4-g32,autoround-int8-g32"),
                                            ("gptqmodel", "gptq-int2-g128,gptq-int4-g128,gptq-int8-g128"),
                                            ("modelopt", "int4_awq,int8_wo")])
def test_each_target_solves_and_exports_a_layers_experts_as_one(target, options):
    import mpsearch
    from mpsearch.export.gptqmodel_dynamic import resolve

    model = tiny_moe("qwen3_moe", hidden_size=128, moe_intermediate_size=128, head_dim=32)  # groups of 128 fit
    table = mpsearch.get_estimator("weight-error", options=options).estimate(model, None, progress=False,
                                                                             target=target)
    plan = mpsearch.get_solver("ilp").solve(table, mpsearch.Budget.parse(["avg_bits=5"])).plan
    experts = [n for n in plan.layers if ".experts." in n]
    assert len(experts) == 4 and not [n for n in plan.layers if n in routers(model)]
    for i in range(2):  # the target ties a layer's experts
        assert plan.option_name(f"model.layers.{i}.mlp.experts.gate_up_proj") == plan.option_name(
            f"model.layers.{i}.mlp.experts.down_proj")
    doc = export_plan(plan, target)
    for name in experts:
        o = int_settings(plan.option(name))
        container = name.rsplit(".", 1)[0]
        if target == "modelopt":
            entry = doc["quantization"]["quantized_layers"][container]
            assert entry["quant_algo"] == ("W8A16" if o.bits == 8 else "W4A16_AWQ")
        for module, _, _ in expert_modules(model, name):
            if target == "gptqmodel":
                got = resolve(doc, module)
                assert (got.bits, got.group_size, got.symmetric) == (o.bits, o.group_size, o.symmetric), module
            elif target == "autoround":
                import re

                keys = [k for k in doc if k.startswith("^") and re.fullmatch(k.replace(".", r"\."), module)]
                assert len(keys) == 1 and doc[keys[0]]["bits"] == o.bits, module
