"""Exporters tested against the consumers' own code where it installs on a CPU machine.

torchao: ``quantize_`` with the exported FqnToConfig on a small Llama-shaped model, then every
layer's weight is checked for its bits, group size and symmetry; compressed-tensors: the recipe's
``config_groups`` parsed into a ``QuantizationConfig`` and applied with ``apply_quantization_config``;
gguf-py: the built-in Hugging Face -> GGUF name map against ``gguf.get_tensor_name_map`` and the
GGML type names against ``GGMLQuantizationType``; AutoRound: the ``layer_config`` resolved by
``AutoRound(...).configure_layer_config()`` on a tiny ``LlamaForCausalLM`` (no calibration);
GPTQModel: ``QuantizeConfig(**file)`` and the per-module config its GPTQ loop uses
(``clone_gptq_config_for_module``); ModelOpt: the ``hf_quant_config`` ModelOpt itself writes
(``get_quant_config``) after ``mtq.quantize`` with the plan's weight quantizers, and its
``convert_hf_quant_config_format`` reading our file. Each test skips, saying why, when its package
is missing (``pip install -e ".[test]"`` installs all but GPTQModel, which needs torch>=2.14.1 and
compiles PyPcre: ``pip install --no-deps gptqmodel pypcre logbar tokenicer device-smi defuser
accelerate`` in an environment where that is acceptable). GPTQModel and ModelOpt patch other
libraries when imported (``safetensors`` saving, ``transformers``' ``from_pretrained``, CUDA
environment variables), so they run in a child process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from mpsearch.export import export_plan, export_text, import_plan
from mpsearch.export.llamacpp_types import KEEP_TYPES, TYPES, llama_gguf_name
from mpsearch.options import parse_option
from mpsearch.plan import BitPlan

D, H = 64, 128


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D, bias=False) for _ in range(4))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, H, bias=False), nn.Linear(D, H, bias=False)
        self.down_proj = nn.Linear(H, D, bias=False)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.mlp = Attn(), MLP()


class Inner(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(n))


class TinyLlama(nn.Module):
    """Module names of a Hugging Face LlamaForCausalLM, without the forward."""

    def __init__(self, n=3):
        super().__init__()
        torch.manual_seed(0)
        self.model, self.lm_head = Inner(n), nn.Linear(D, 100, bias=False)


def random_plan(model, specs, seed=0) -> BitPlan:
    rng = random.Random(seed)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    choice = {}
    for n in names:  # fused siblings share one option
        if n.endswith(("k_proj", "v_proj")):
            choice[n] = choice[n[:-6] + "q_proj"]
        elif n.endswith("up_proj"):
            choice[n] = choice[n[:-7] + "gate_proj"]
        else:
            choice[n] = rng.choice(specs)
    opts = {n: parse_option(s) for n, s in choice.items()}
    return BitPlan(bits={n: o.bits for n, o in opts.items()}, options={n: o.to_dict() for n, o in opts.items()})


# ----------------------------------------------------------------- torchao
@pytest.mark.parametrize("seed", range(2))
def test_torchao_quantize_gives_every_layer_its_bits(seed):
    pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao)")
    from torchao.core.config import config_from_dict, config_to_dict
    from torchao.quantization import quantize_

    from mpsearch.export.torchao_config import to_torchao_config

    model = TinyLlama()
    plan = random_plan(model, ["int2", "int3-g32", "int4-g32-asym", "int5", "int8", "keep", "int1"], seed)
    config = to_torchao_config(plan)
    # the JSON form is torchao's own serialization of that object
    assert config_from_dict(export_plan(plan, "torchao")) == config
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantize_(model, config, filter_fn=None)
    for name in plan.layers:
        opt, weight = plan.option(name), model.get_submodule(name).weight
        if opt.is_keep:
            assert torch.equal(weight, originals[name]), name
            continue
        assert weight.target_dtype == getattr(torch, f"int{opt.bits}"), name
        assert tuple(weight.block_size) == (1, opt.group_size or weight.shape[1]), name
        lo, hi = -(2 ** (opt.bits - 1)), 2 ** (opt.bits - 1) - 1
        assert lo <= int(weight.qdata.min()) and int(weight.qdata.max()) <= hi, name
        assert bool((weight.zero_point != 0).any()) == (not opt.symmetric), name
    # and the object reads back to the same plan
    back = import_plan(config, "torchao")  # int3-g32 reads back as torchao's intx-3-g32: the same settings
    from mpsearch.export._base import int_settings

    assert {n: int_settings(back.option(n)).name for n in back.layers} == {n: plan.option(n).name for n in plan.layers}
    assert config_to_dict(config)["_data"]["fqn_to_config"].keys() == set(plan.layers)


def applied_llmcompressor_schemes(model, plan, **export_kwargs):
    """Apply ``plan``'s llm-compressor export to ``model`` with compressed-tensors' own
    ``apply_quantization_config``; return ``[(layer, option, quantization_scheme or None)]``."""
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    body = yaml.safe_load(export_text(plan, "llm-compressor", **export_kwargs))["quant_stage"]["quant_modifiers"]["GPTQModifier"]
    apply_quantization_config(model, QuantizationConfig(config_groups=body["config_groups"], ignore=body["ignore"]))
    return [(name, plan.option(name), getattr(model.get_submodule(name), "quantization_scheme", None))
            for name in plan.layers]


# ----------------------------------------------------------------- compressed-tensors
def test_compressed_tensors_parses_and_applies_the_recipe():
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (pip install compressed-tensors)")

    model = TinyLlama()
    plan = random_plan(model, ["int4-g32", "int8", "int3-g64-asym", "int2", "keep"], seed=3)
    for name, opt, scheme in applied_llmcompressor_schemes(model, plan):
        if opt.is_keep:
            assert scheme is None, name
            continue
        w = scheme.weights
        assert (w.num_bits, w.group_size, w.symmetric, w.type) == (opt.bits, opt.group_size, opt.symmetric, "int")
        assert w.strategy == ("channel" if opt.group_size is None else "group")


# ----------------------------------------------------------------- gguf-py
def test_gguf_tensor_names_and_types():
    gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install gguf)")
    model = TinyLlama(n=5)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] + ["model.embed_tokens"]
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 5)
    for name in names:
        assert llama_gguf_name(name) == table.get_name(name), name
    members = {t.name for t in gguf.GGMLQuantizationType}
    for qtype in list(TYPES.values()) + list(KEEP_TYPES):
        assert qtype.upper() in members, qtype


def test_gguf_arch_map_for_another_family(tmp_path):
    pytest.importorskip("gguf", reason="gguf is not installed (pip install gguf)")
    model = TinyLlama(n=2)
    plan = random_plan(model, ["int4", "int6", "keep"], seed=1)
    doc = export_plan(plan, "llama.cpp", arch="qwen2")
    assert "^blk\\.1\\.ffn_down\\.weight$" in doc
    path = tmp_path / "t.txt"
    path.write_text(export_text(plan, "llama.cpp", arch="qwen2"))
    back = import_plan(path, "llama.cpp", arch="qwen2", layers=model)
    assert back.bits == plan.bits
    from mpsearch.export import ExportError

    with pytest.raises(ExportError, match="unknown GGUF arch 'qwen9'"):
        export_plan(plan, "llama.cpp", arch="qwen9")
    with pytest.raises(ExportError, match="importing arch 'qwen2' needs the layer names"):
        import_plan(path, "llama.cpp", arch="qwen2")


def test_torchao_json_file_loads_with_config_from_dict(tmp_path):
    pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao)")
    from torchao.core.config import config_from_dict
    from torchao.quantization import FqnToConfig

    from mpsearch.export import save_export

    plan = random_plan(TinyLlama(n=1), ["int4-g32", "keep"], seed=2)
    path = save_export(plan, "torchao", tmp_path / "ao.json")
    config = config_from_dict(json.loads(path.read_text()))
    assert isinstance(config, FqnToConfig) and list(config.fqn_to_config) == plan.layers


# ----------------------------------------------------------------- consumers in a child process
def run_consumer(module: str, install: str, script: str, payload: dict, tmp_path) -> dict:
    """Run ``script`` in a fresh interpreter (``PAYLOAD`` and ``RESULT`` are file paths), return RESULT."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed ({install})")
    src, dst = tmp_path / "payload.json", tmp_path / "result.json"
    src.write_text(json.dumps(payload))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]))
    head = f"import json\nPAYLOAD, RESULT = {str(src)!r}, {str(dst)!r}\n"
    proc = subprocess.run([sys.executable, "-c", head + script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(dst.read_text())


# ----------------------------------------------------------------- GPTQModel
GPTQMODEL_SCRIPT = """
from gptqmodel import QuantizeConfig
from gptqmodel.looper.gptq_processor import clone_gptq_config_for_module
out = []
for case in json.load(open(PAYLOAD)):
    cfg = QuantizeConfig(**case["doc"])
    layers = {}
    for name in case["layers"]:
        c = clone_gptq_config_for_module(cfg, name)  # None: the module is skipped (kept)
        layers[name] = None if c is None else [int(c.bits), int(c.group_size), bool(c.sym)]
    out.append({"lm_head": bool(cfg.lm_head), "layers": layers})
json.dump(out, open(RESULT, "w"))
"""


def test_gptqmodel_quantize_config_gives_every_module_its_bits(tmp_path):
    plans = [random_plan(TinyLlama(), ["int2", "int3-g32", "int4-g32-asym", "int4", "int8", "int8-g64", "keep"], seed)
             for seed in range(4)]
    payload = [{"doc": json.loads(export_text(p, "gptqmodel")), "layers": p.layers} for p in plans]
    result = run_consumer("gptqmodel", "pip install gptqmodel; it needs torch>=2.14.1", GPTQMODEL_SCRIPT, payload,
                          tmp_path)
    assert any(p.option("lm_head").is_keep for p in plans) and not all(p.option("lm_head").is_keep for p in plans)
    for plan, got in zip(plans, result):
        for name in plan.layers:
            o = plan.option(name)
            if name == "lm_head":  # GPTQModel quantizes lm_head only with lm_head=True
                assert got["lm_head"] == (not o.is_keep)
                if o.is_keep:
                    continue
            want = None if o.is_keep else [o.bits, o.group_size or -1, o.symmetric]
            assert got["layers"][name] == want, name


# ----------------------------------------------------------------- AutoRound
def tiny_hf_llama(vocab=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=D, intermediate_size=H, num_hidden_layers=3, num_attention_heads=4,
                                        num_key_value_heads=4, vocab_size=vocab, tie_word_embeddings=False))


def autoround_layer_config(model, layer_config):
    """AutoRound's resolved per-layer config, without calibration (the tokenizer is never used)."""
    from auto_round import AutoRound

    ar = AutoRound(model, tokenizer=object(), scheme="W4A16", layer_config=layer_config, iters=0)
    ar.configure_layer_config()
    return ar.layer_config


@pytest.mark.parametrize("seed", range(2))
def test_autoround_resolves_every_layer_as_exported(seed):
    pytest.importorskip("auto_round", reason="auto-round is not installed (pip install auto-round)")
    pytest.importorskip("transformers", reason="transformers is not installed")
    model = tiny_hf_llama()  # every weight dimension divisible by 32, lm_head not tied (else AutoRound keeps it)
    plan = random_plan(model, ["int2", "int3-g32", "int4-g32-asym", "int5-g64", "int7-asym", "int8", "int8-g64", "keep"],
                       seed)
    resolved = autoround_layer_config(model, json.loads(export_text(plan, "autoround")))
    for name in plan.layers:
        o, c = plan.option(name), resolved[name]
        if o.is_keep:
            assert c["bits"] == 16 and c["data_type"] == "float", name
        else:
            assert (c["bits"], c["group_size"], c["sym"], c["data_type"]) == (
                o.bits, o.group_size or -1, o.symmetric, "int"), name


def test_autoround_refuses_8bit_asymmetric_as_the_exporter_says(monkeypatch):
    pytest.importorskip("auto_round", reason="auto-round is not installed (pip install auto-round)")
    pytest.importorskip("transformers", reason="transformers is not installed")
    model = tiny_hf_llama()
    plan = random_plan(model, ["int8-g32-asym", "int4-g32"], seed=0)
    doc = json.loads(export_text(plan, "autoround", w8_asym=True))  # refused without w8_asym=True
    monkeypatch.delenv("AR_ALLOW_W8_ASYM", raising=False)
    with pytest.raises(ValueError, match="8-bit asymmetric"):
        autoround_layer_config(model, doc)
    monkeypatch.setenv("AR_ALLOW_W8_ASYM", "1")
    resolved = autoround_layer_config(tiny_hf_llama(), doc)
    for name in plan.layers:
        o = plan.option(name)
        assert (resolved[name]["bits"], resolved[name]["group_size"], resolved[name]["sym"]) == (
            o.bits, o.group_size, o.symmetric), name


# ----------------------------------------------------------------- ModelOpt
MODELOPT_SCRIPT = """
import warnings
import modelopt.torch.quantization as mtq
from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format
from modelopt.torch.export.quant_utils import get_quant_config
from test_export_consumers import TinyLlama
out = []
for case in json.load(open(PAYLOAD)):
    model = TinyLlama(case["blocks"])
    quant_cfg = {"default": {"enable": False}}
    for name, (bits, group) in case["weights"].items():  # ModelOpt's own weight quantizer settings
        quant_cfg[name + ".weight_quantizer"] = {"num_bits": bits, "enable": True,
                                                 **({"block_sizes": {-1: group}} if group else {"axis": 0})}
    mtq.quantize(model, {"quant_cfg": quant_cfg, "algorithm": "max"}, forward_loop=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = convert_hf_quant_config_format(case["doc"])
    out.append({"theirs": get_quant_config(model), "converted": converted,
                "warnings": [str(w.message) for w in caught]})
json.dump(out, open(RESULT, "w"))
"""


def test_modelopt_writes_our_quantized_layers_and_reads_our_file(tmp_path):
    plans = [random_plan(TinyLlama(), ["int4-g32", "int4-g64", "int8", "keep"], seed) for seed in range(2)]
    payload = []
    for plan in plans:
        weights = {n: [plan.option(n).bits, plan.option(n).group_size] for n in plan.layers if not plan.option(n).is_keep}
        assert len({tuple(w) for w in weights.values()}) > 1  # mixed precision, as in our file
        payload.append({"blocks": 3, "weights": weights, "doc": json.loads(export_text(plan, "modelopt"))})
    result = run_consumer("modelopt", "pip install nvidia-modelopt", MODELOPT_SCRIPT, payload, tmp_path)
    for plan, case, got in zip(plans, payload, result):
        # ModelOpt, quantizing with the plan's options, writes the same per-layer entries as our file
        theirs, ours = got["theirs"]["quantization"], case["doc"]["quantization"]
        assert theirs["quant_algo"] == ours["quant_algo"] == "MIXED_PRECISION"
        assert theirs["quantized_layers"] == ours["quantized_layers"]
        # and its converter (hf_quant_config.json -> config.json) reads every layer's bits and group size
        assert not [w for w in got["warnings"] if "Unsupported quantization algorithm" in w], got["warnings"]
        conv, seen = got["converted"], {}
        for group in conv["config_groups"].values():
            for target in group["targets"]:
                w = group["weights"]
                seen[target] = (w["num_bits"], w.get("group_size"), w["type"])
        assert seen == {n: (b, g, "int") for n, (b, g) in case["weights"].items()}
        assert conv["ignore"] == [n for n in plan.layers if plan.option(n).is_keep]
        assert conv["quant_method"] == "modelopt"
