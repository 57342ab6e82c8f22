"""mpsearch's importance matrix against llama.cpp's own tools (results: experiments/imatrix_check.md).

    python experiments/imatrix_check.py compute     # mpsearch.imatrix vs llama-imatrix on the same tokens
    python experiments/imatrix_check.py quantize    # llama-quantize --imatrix: every tensor's bytes vs mpsearch
    python experiments/imatrix_check.py fixtures    # tests/fixtures/imatrix/ (llama-imatrix's own files)

``compute``: SmolLM2-135M (its GGUF converted to F32 by llama-quantize, bit-equal to transformers'
weights, experiments/llamacpp_e2e.md) and a random-initialised Mixtral with 4 experts (top-2, written
as a llama-arch GGUF with ``ffn_*_exps`` tensors): ``llama-imatrix -c CTX --chunks N`` on
mpsearch's calibration plays, and ``mpsearch.imatrix.compute_imatrix`` on the same tokens (the HF
tokenizer's ids of the same text, cut into the same chunks of CTX tokens). Reports the largest and
the median relative difference of the importance per tensor, the token counts (per expert), and
whether mpsearch writes llama-imatrix's file byte for byte. Run with llama.cpp's default f16 KV cache
and with ``-ctk f32 -ctv f32 -fa off``.

``quantize``: ``llama-quantize --imatrix FILE`` of SmolLM2 (mixes Q2_K, Q4_K_M, IQ4_NL, Q4_0) and of
the random Mixtral (Q4_K_M, Q2_K, Q5_0: 3-D expert tensors with one importance vector per expert),
then every tensor of the output: mpsearch's ``ggml.to_bytes(type,
W, weights)`` of the F32 input with the importance llama-quantize derives from FILE
(``Imatrix.weights``) against the bytes in the file. The same with the file mpsearch writes for
llama-imatrix's statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from llamacpp_fixtures import (LLAMA_CPP, random_llama, random_mixtral, run_quantize,  # noqa: E402
                               smollm2_gguf, write_random_llama_gguf)

WORK = Path(os.environ.get("MPSEARCH_IMATRIX_WORK", "/tmp/mpsearch_imatrix_check"))
FIXTURES = ROOT / "tests" / "fixtures" / "imatrix"
THREADS = int(os.environ.get("MPSEARCH_E2E_THREADS", "2"))
BIN = LLAMA_CPP / "build" / "bin"
#: the random models: a dense Llama of hidden 64, and a Mixtral of hidden 256 (K-quants fit) with
#: 4 experts, 2 used per token
TINY_LLAMA = dict(hidden=64, n_layer=2, n_head=4, n_head_kv=2, intermediate=96, tied=True, seed=0)
TINY_MOE = dict(hidden=256, n_layer=2, n_head=4, n_head_kv=2, intermediate=256, n_expert=4,
                n_expert_used=2, seed=0)
F32_KV = ["-ctk", "f32", "-ctv", "f32", "-fa", "off"]


def calib_text(work: Path = WORK) -> Path:
    from mpsearch.zoo import shakespeare_text

    path = work / "calib.txt"
    if not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(shakespeare_text("calib", max_chars=60000))
    return path


def tokens(n: int, work: Path = WORK) -> list[int]:
    """The first ``n`` token ids of the calibration text (SmolLM2's tokenizer adds no BOS, and
    neither does llama-imatrix for it: tokenizer.ggml.add_bos_token is false)."""
    from transformers import AutoTokenizer

    src = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    ids = tok(calib_text(work).read_text())["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"the calibration text has {len(ids)} tokens, {n} needed")
    return ids[:n]


def models(work: Path = WORK) -> dict:
    """name -> (F32 GGUF path, torch model or a loader)."""
    import torch

    from llamacpp_e2e import smollm2

    work.mkdir(parents=True, exist_ok=True)
    out = {}
    f32 = work / "smollm2-F32.gguf"
    if not f32.exists():
        run_quantize(smollm2_gguf(), f32, "F32", threads=THREADS)
    out["smollm2"] = (f32, smollm2)
    for name, make, kw in (("tiny-llama", random_llama, TINY_LLAMA), ("tiny-moe", random_mixtral, TINY_MOE)):
        path = work / f"{name}-F32.gguf"
        if not path.exists():
            write_random_llama_gguf(path, make(**kw), dtype="f32")
        out[name] = (path, lambda make=make, kw=kw: make(**kw))
    torch.set_num_threads(THREADS)
    return out


def llama_imatrix(gguf: Path, out: Path, ctx: int, chunks: int, extra=(), fmt: str = "gguf") -> Path:
    if not out.exists():
        cmd = [str(BIN / "llama-imatrix"), "-m", str(gguf), "-f", str(calib_text(out.parent)), "-c", str(ctx),
               "--chunks", str(chunks), "-t", str(THREADS), "--no-ppl", "--output-format", fmt, "-o", str(out),
               *extra]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode or not out.exists():
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return out


def mpsearch_imatrix(model, ctx: int, chunks: int, work: Path = WORK):
    import torch

    from mpsearch.imatrix import compute_imatrix

    batch = {"input_ids": torch.tensor(tokens(ctx * chunks, work)).reshape(chunks, ctx)}
    return compute_imatrix(model, [batch], progress=False, chunk_size=ctx, dataset="calib.txt")


def compare(mine, ref) -> dict:
    rows = []
    for name in ref.names:
        if name not in mine:
            rows.append({"tensor": name, "missing": True})
            continue
        a, b = mine.weights(name), ref.weights(name)
        rel = np.abs(a - b) / np.maximum(np.abs(b), np.finfo(np.float32).tiny)
        rows.append({"tensor": name, "max_rel": float(rel.max()), "median_rel": float(np.median(rel)),
                     "counts_equal": mine.entries[name].counts.tolist() == ref.entries[name].counts.tolist()})
    got = [r for r in rows if not r.get("missing")]
    return {"tensors": len(ref), "missing": sum(bool(r.get("missing")) for r in rows),
            "extra": sorted(set(mine.names) - set(ref.names)),
            "counts_equal": all(r["counts_equal"] for r in got),
            "max_rel": max(r["max_rel"] for r in got), "median_rel": float(np.median([r["median_rel"] for r in got])),
            "worst": max(got, key=lambda r: r["max_rel"])["tensor"]}


def run_compute(work: Path = WORK) -> list[dict]:
    from mpsearch.imatrix import read_imatrix

    results = []
    for name, (gguf, load) in models(work).items():
        ctx, chunks = (128, 4) if name == "smollm2" else (32, 4)
        model = load()
        mine = mpsearch_imatrix(model, ctx, chunks, work)
        for label, extra in (("default (f16 KV cache)", ()), ("-ctk f32 -ctv f32 -fa off", F32_KV)):
            tag = "f32kv" if extra else "default"
            ref = read_imatrix(llama_imatrix(gguf, work / f"{name}-{tag}.imatrix.gguf", ctx, chunks, extra))
            r = {"model": name, "llama_imatrix": label, "ctx": ctx, "chunks": chunks, **compare(mine, ref),
                 "rewrite_byte_identical": ref.to_bytes() == Path(ref.path).read_bytes()}
            results.append(r)
            print(json.dumps(r), flush=True)
    return results


#: the mixes of ``quantize``: between them every GGML type mpsearch offers but q5_1 (SmolLM2's
#: 576-column tensors fall back from K-quants to q4_0..q8_0; every type is also checked on every
#: SmolLM2 matrix against ggml_quantize_chunk: ggml_fixtures.py --check --imatrix)
MIXES = {"smollm2": ("Q2_K", "Q4_K_M", "IQ4_NL", "Q4_0"), "tiny-moe": ("Q4_K_M", "Q2_K", "Q5_0")}


def run_quantize_check(work: Path = WORK, mixes: dict = MIXES) -> list[dict]:
    import torch
    from gguf import GGUFReader

    from mpsearch.formats import ggml
    from mpsearch.imatrix import read_imatrix
    from mpsearch.targets.llamacpp_mixes import canonical_type

    results = []
    for name, (gguf, _load) in models(work).items():
        if name not in mixes:
            continue
        ctx, chunks = (128, 4) if name == "smollm2" else (32, 4)
        llama_file = llama_imatrix(gguf, work / f"{name}-default.imatrix.gguf", ctx, chunks)
        im = read_imatrix(llama_file)
        ours = work / f"{name}-default.mpsearch-rewrite.imatrix.gguf"
        im.write(ours)
        src = {t.name: t for t in GGUFReader(str(gguf)).tensors}
        for mix in mixes[name]:
            outs = {}
            for which, path in (("llama-imatrix's file", llama_file), ("mpsearch's rewrite", ours)):
                out = outs[which] = work / f"{name}-{mix}-{path.stem}.gguf"
                if not out.exists():
                    run_quantize(gguf, out, mix, threads=THREADS, extra=["--imatrix", str(path)])
            same_file = _tensor_bytes(outs["llama-imatrix's file"]) == _tensor_bytes(outs["mpsearch's rewrite"])
            for which, out in list(outs.items())[:1]:
                n = bad = checked = weights = 0
                skipped = set()
                for t in GGUFReader(str(out)).tensors:
                    typ = canonical_type(t.tensor_type.name)
                    if typ not in ggml.FORMATS:
                        skipped.add(typ)
                        continue
                    shape = [int(d) for d in reversed(src[t.name].shape.tolist())]
                    x = torch.from_numpy(np.asarray(src[t.name].data, dtype=np.float32).reshape(shape))
                    w = torch.from_numpy(im.weights(t.name)).reshape(*shape[:-2], shape[-1]) \
                        if t.name in im else None
                    mine = ggml.to_bytes(typ, x, w).numpy().reshape(-1)
                    theirs = np.asarray(t.data).view(np.uint8).reshape(-1)
                    n += 1
                    checked += int(w is not None)
                    weights += x.numel()
                    bad += int(not np.array_equal(mine, theirs))
                r = {"model": name, "mix": mix, "imatrix": which, "tensors_compared": n,
                     "with_imatrix_entry": checked, "weights": weights, "tensors_differing": bad,
                     "types_not_compared": sorted(skipped), "file": out.name,
                     "same_tensors_with_mpsearch_written_imatrix": same_file}
                results.append(r)
                print(json.dumps(r), flush=True)
    return results


def _tensor_bytes(path: Path) -> dict:
    """Every tensor's type and bytes (the metadata differ: llama-quantize records the imatrix file name)."""
    from gguf import GGUFReader

    return {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in GGUFReader(str(path)).tensors}


def build_fixtures(work: Path = WORK, out: Path = FIXTURES) -> None:
    """tests/fixtures/imatrix/: llama-imatrix's own files (GGUF and legacy .dat, dense and MoE) and,
    for SmolLM2, the tokens and a few tensors' statistics of ``llama-imatrix -c 64 --chunks 2
    -ctk f32 -ctv f32 -fa off`` (what tests/test_imatrix.py checks compute_imatrix against)."""
    out.mkdir(parents=True, exist_ok=True)
    ms = models(work)
    for name in ("tiny-llama", "tiny-moe"):
        for fmt in ("gguf", "dat"):
            src = llama_imatrix(ms[name][0], work / f"{name}-f32kv.imatrix.{fmt}", 32, 4, F32_KV, fmt=fmt)
            (out / f"{name}.imatrix.{fmt}").write_bytes(src.read_bytes())
    from mpsearch.imatrix import read_imatrix

    ref = read_imatrix(llama_imatrix(ms["smollm2"][0], work / "smollm2-c64-f32kv.imatrix.gguf", 64, 2, F32_KV))
    # the first two blocks: the test runs SmolLM2 cut after block 1 (a causal block sees only earlier ones)
    keep = ["blk.0.attn_q.weight", "blk.0.attn_output.weight", "blk.0.ffn_down.weight",
            "blk.1.attn_output.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight"]
    arrays = {"tokens": np.array(tokens(64 * 2, work), dtype=np.int64)}
    for k in keep:
        arrays[f"{k}__sums"] = ref.entries[k].sums
        arrays[f"{k}__counts"] = ref.entries[k].counts
    np.savez_compressed(out / "smollm2_llama_imatrix.npz", **arrays)
    for f in sorted(out.iterdir()):
        print(f"{f.relative_to(ROOT)}: {f.stat().st_size} bytes")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("compute", "quantize", "fixtures"))
    ap.add_argument("--work", default=str(WORK))
    ap.add_argument("--models", nargs="+", default=list(MIXES), choices=list(MIXES),
                    help="quantize: the models whose mixes are checked")
    args = ap.parse_args(argv)
    work = Path(args.work)
    if args.what == "fixtures":
        build_fixtures(work)
        return
    if args.what == "compute":
        res, name = run_compute(work), "compute"
    else:
        res = run_quantize_check(work, {m: MIXES[m] for m in args.models})
        name = "quantize-" + "-".join(args.models)
    dest = ROOT / "experiments" / "imatrix_check"
    dest.mkdir(exist_ok=True)
    (dest / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
