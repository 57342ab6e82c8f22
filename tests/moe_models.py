"""Tiny random mixture-of-experts models of the families transformers builds, for the MoE tests.

Each is ``AutoModelForCausalLM.from_config`` of the family's own config, shrunk (2 layers, 4 experts,
top-2, hidden 64) with dimensions that are multiples of 32, so llama.cpp's 32-blocks and
compressed-tensors' groups of 32 fit every matrix; ``initializer_range=0.2`` gives outputs that
move visibly when a layer is quantized. Also usable as CLI model specs (``tests/moe_models.py:qwen3``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

#: family -> GGUF arch whose gguf-py tensor map names its tensors (convert_hf_to_gguf.py's)
GGUF_ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama", "olmoe": "olmoe",
             "gpt_oss": "gpt_oss", "llama4_text": "llama4", "glm4_moe": "glm4_moe", "deepseek_v3": "deepseek2",
             "deepseek_v2": "deepseek2"}
FAMILIES = tuple(GGUF_ARCH)
SMALL = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_experts=4, num_local_experts=4,
             n_routed_experts=4, num_experts_per_tok=2, head_dim=16, shared_expert_intermediate_size=64,
             kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
             first_k_dense_replace=0, n_group=1, topk_group=1, max_position_embeddings=64,
             initializer_range=0.2)


def tiny_moe(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A random ``family`` model (a transformers model type: ``qwen3_moe``, ``mixtral``...)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family)
    settings = {**SMALL, **({"head_dim": 8} if family.startswith("deepseek") else {}), **overrides}
    for k, v in settings.items():
        if hasattr(cfg, k):
            setattr(cfg, k, v)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(cfg).eval()


def tokens(n: int = 2, seq: int = 16, seed: int = 0, batches: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n, seq), generator=g) for _ in range(batches)]


# CLI specs
def qwen3():
    return tiny_moe("qwen3_moe")


def mixtral():
    return tiny_moe("mixtral")


def calib():
    return tokens(2, 16, batches=2)


def jetmoe():
    """JetMoe: its experts are a 3-D ``weight`` in ``JetMoeParallelExperts``, a container whose layout
    transformers does not declare (no ``@use_experts_implementation``): not understood."""
    return tiny_moe("jetmoe", kv_channels=16)


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class ListMoE(nn.Module):
    """The older layout: one ``nn.Linear`` per expert and projection (``experts.3.w1``)."""

    def __init__(self, hidden=64, inter=32, experts=4, top_k=2):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(ExpertMLP(hidden, inter) for _ in range(experts))
        self.top_k = top_k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        w, idx = torch.softmax(self.gate(flat), -1).topk(self.top_k, -1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(idx == e)
            if len(rows):
                out.index_add_(0, rows, expert(flat[rows]) * w[rows, slot, None])
        return out.reshape(x.shape)


class ListMoELM(nn.Module):
    """A causal-LM-shaped model of :class:`ListMoE` blocks (names as Mixtral's were before
    transformers 5: ``model.layers.N.block_sparse_moe.experts.E.w1``)."""

    def __init__(self, vocab=128, hidden=64, layers=2):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, hidden)
        self.model.layers = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.self_attn = nn.Module()
            block.self_attn.q_proj = nn.Linear(hidden, hidden, bias=False)
            block.block_sparse_moe = ListMoE(hidden)
            self.model.layers.append(block)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        h = self.model.embed_tokens(ids)
        for block in self.model.layers:
            h = h + block.self_attn.q_proj(h)
            h = h + block.block_sparse_moe(h)
        return self.lm_head(h)


def list_moe():
    torch.manual_seed(0)
    return ListMoELM().eval()
