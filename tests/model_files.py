"""Model files as users have them, made in the test from a tiny random Llama: a Hugging Face cache
entry (``models--owner--name/snapshots/<commit>/``), a GGUF written with the ``gguf`` package (the
tensor names and q/k row order of llama.cpp's converter, optionally quantized), sharded safetensors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from mpsearch import zoo

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_llama_dir(path) -> Path:
    return zoo.save_tiny_llama(Path(path))


def fake_hf_cache(cache, repo_id: str, model_dir) -> Path:
    """Put ``model_dir``'s files into ``cache`` as huggingface_hub lays out a downloaded snapshot."""
    owner, name = repo_id.split("/")
    root = Path(cache) / f"models--{owner}--{name}"
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    for f in Path(model_dir).iterdir():
        if f.is_file():
            shutil.copy(f, snap / f.name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snap


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders the rows of q and k (rotary halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir, path, qtype: str | None = None) -> Path:
    """The Llama of ``model_dir`` (and its character tokenizer) as a GGUF file; weight matrices in
    ``qtype`` (a GGML type name such as ``Q4_1``; None: F32), the token embedding in F32."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
    w.add_vocab_size(c.vocab_size)
    b2u = bytes_to_unicode()  # byte-level BPE spelling of each character token
    vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = [t if t.startswith("<") else "".join(b2u[b] for b in t.encode()) for t in vocab]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<") else 1 for t in tokens])
    w.add_token_merges([])  # none: every token is one character (an empty list is not written)
    w.add_token_scores([0.0] * len(tokens))  # what transformers derives the (no) merges from
    w.add_bos_token_id(tok.eos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.eos_token_id)
    qt = gguf.GGMLQuantizationType[qtype] if qtype else None
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}

    def put(name, arr):
        if qt is not None and arr.ndim == 2 and name != "token_embd.weight":
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, np.ascontiguousarray(arr))

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        put(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
