"""Exporters tested against the consumers' own code where it installs on a CPU machine.

torchao: ``quantize_`` with the exported FqnToConfig on a small Llama-shaped model, then every
layer's weight is checked for its bits, group size and symmetry; compressed-tensors: the recipe's
``config_groups`` parsed into a ``QuantizationConfig`` and applied with ``apply_quantization_config``;
gguf-py: the built-in Hugging Face -> GGUF name map against ``gguf.get_tensor_name_map`` and the
GGML type names against ``GGMLQuantizationType``. Each test skips, saying why, when its package is
missing (``pip install -e ".[test]"`` installs them).
"""

from __future__ import annotations

import json
import random

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
    back = import_plan(config, "torchao")
    assert {n: back.option(n).name for n in back.layers} == {n: plan.option(n).name for n in plan.layers}
    assert config_to_dict(config)["_data"]["fqn_to_config"].keys() == set(plan.layers)


# ----------------------------------------------------------------- compressed-tensors
def test_compressed_tensors_parses_and_applies_the_recipe():
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (pip install compressed-tensors)")
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    model = TinyLlama()
    plan = random_plan(model, ["int4-g32", "int8", "int3-g64-asym", "int2", "keep"], seed=3)
    doc = yaml.safe_load(export_text(plan, "llm-compressor"))
    body = doc["quant_stage"]["quant_modifiers"]["GPTQModifier"]
    config = QuantizationConfig(config_groups=body["config_groups"], ignore=body["ignore"])
    apply_quantization_config(model, config)
    for name in plan.layers:
        opt = plan.option(name)
        scheme = getattr(model.get_submodule(name), "quantization_scheme", None)
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
