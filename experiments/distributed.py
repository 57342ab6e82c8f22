"""Speed-up of the sharded estimators on N ranks, and a model spread over devices with a device map.

For each shape (random-initialised ``LlamaForCausalLM`` from a config, no download; timing does not
depend on trained weights) and estimator (``output-distance``, ``hessian``), the driver launches
``torchrun --nproc-per-node N`` on this script (``--worker``) for every N in ``--ranks`` (nccl on
GPUs, gloo on CPU), and also one plain process (no torchrun). Every rank builds the same model
(each weight drawn from a generator seeded by its name, on the first device) and the same random
token batches, runs the estimator, and reports:

- wall time of ``estimate()`` and speed-up against N=1;
- per rank: busy seconds (its own units), reduce+wait seconds (at the reduction, waiting for the
  slowest rank included), idle = slowest rank's busy - its busy; the reduction's own cost (one
  all-reduce of the same size after a barrier); peak CUDA memory per GPU;
- whether the N-rank table equals the 1-rank one (bit for bit, else the largest relative difference),
  and whether the 1-rank torchrun table equals the plain process's.

``--device-map``: one process with the model spread over devices by accelerate (the first shape,
output-distance): over all GPUs when
there are two or more (contiguous blocks per GPU), over ``cuda:0`` and the CPU when there is one (the
last decoder layer on the CPU, computing there; the rest on the GPU), skipped without a GPU; its time and its table against the
unsplit model's (GPU and CPU arithmetic differ: the largest relative difference is reported).

Shapes: ``tiny`` (4 layers, hidden 64; the CPU smoke test), ``llama-1.1b`` (TinyLlama: 22 layers,
hidden 2048, MLP 5632, 32 heads / 4 KV heads, vocabulary 32000), ``llama-3-8b`` (32 layers, hidden
4096, MLP 14336, 32 / 8 heads, vocabulary 128256).

Run:
  python experiments/distributed.py --quick                        # CPU smoke: tiny, gloo, 1 and 2 ranks
  python experiments/distributed.py --shapes llama-1.1b,llama-3-8b --ranks 1 --dtype bfloat16 \\
      --device-map -o experiments/distributed_h200.md              # one H200
  python experiments/distributed.py --shapes llama-1.1b,llama-3-8b --ranks 1,2 --dtype bfloat16 \\
      --device-map -o experiments/distributed_2gpu.md              # two GPUs (issue 13)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this working tree's mpsearch, first

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}


# ------------------------------------------------------------------------------------ the model


def build_model(shape: str, dtype: torch.dtype, device: torch.device):
    """A random ``LlamaForCausalLM`` of ``shape``: every tensor drawn on ``device`` from a generator
    seeded by its name (the same values on every rank and for every device of that type)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("inv_freq"):
                continue
            if name.endswith("norm.weight") or "layernorm" in name:
                t.fill_(1.0)
                continue
            seed = int(hashlib.sha1(name.encode()).hexdigest()[:15], 16)
            g = torch.Generator(device=device).manual_seed(seed)
            t.normal_(0.0, 0.02, generator=g)
    # rotary frequencies: a fresh module on the device (to_empty left its buffers uninitialised)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg).to(device)
    return model.eval()


def make_batches(vocab: int, batches: int, batch: int, seq: int):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)} for _ in range(batches)]


def estimator_params(name: str, args) -> dict:
    if name == "output-distance":
        return {"options": args.options}
    return {"options": args.options, "probes": args.probes, "min_probes": min(args.probes, 2), "tol": 0.0,
            "micro_batch": args.micro_batch}


# ------------------------------------------------------------------------------------ one run


def worker(args) -> None:
    """One rank (or the plain process): build, estimate, report (rank 0 writes the JSON and npz)."""
    from mpsearch import get_estimator
    from mpsearch.distributed import current
    from mpsearch.sensitivity.base import EstimatorWarning

    warnings.simplefilter("ignore", EstimatorWarning)
    shard = current()
    cuda = torch.cuda.is_available()
    if shard.backend == "nccl":
        device = shard.device
    else:  # gloo: ranks take the GPUs in turn (several per GPU when there are more ranks than GPUs)
        device = torch.device("cuda", shard.rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = build_model(args.shape, dtype, device)
    if args.split:
        model = split_model(model)
    build_s = time.perf_counter() - t0
    batches = make_batches(SHAPES[args.shape]["vocab_size"], args.batches, args.batch, args.seq)
    est = get_estimator(args.estimator, **estimator_params(args.estimator, args))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    shard.barrier()
    t0 = time.perf_counter()
    table = est.estimate(model, batches, progress=False)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    reduce_s = None
    if shard.enabled:  # the reduction alone: the same all-reduce, everyone ready
        L, K = len(table.layers), len(table.options)
        probe = torch.zeros(args.batches, L, K, dtype=torch.float64)
        shard.barrier()
        t1 = time.perf_counter()
        shard.sum(probe)
        reduce_s = time.perf_counter() - t1
    walls = shard.gather(wall)
    if not shard.is_main:
        return
    out = Path(args.result)
    meta = table.metadata
    doc = {"shape": args.shape, "estimator": args.estimator, "world": shard.world, "wall": max(walls),
           "build_seconds": build_s, "reduce_seconds": reduce_s, "cost": meta.get("cost"),
           "distributed": meta.get("distributed"), "split": bool(args.split),
           "peak_gib": [round(torch.cuda.max_memory_allocated(d) / 2**30, 3)
                        for d in range(torch.cuda.device_count())] if cuda else None,
           "devices": sorted({str(p.device) for p in model.parameters()})}
    out.write_text(json.dumps(doc, default=str))
    np.save(out.with_suffix(".npy"), table.frame["damage"].to_numpy())


def split_model(model):
    """Spread the decoder layers over the GPUs (two or more), or over cuda:0 and the CPU (one GPU)."""
    from mpsearch.distributed import dispatch

    n = len(model.model.layers)
    gpus = torch.cuda.device_count()
    if gpus >= 2:
        per = -(-n // gpus)
        dmap = {"model.embed_tokens": 0, "model.rotary_emb": 0}
        dmap.update({f"model.layers.{i}": i // per for i in range(n)})
        dmap.update({"model.norm": gpus - 1, "lm_head": gpus - 1})
        return dispatch(model, dmap)
    dmap = {"model.embed_tokens": 0, "model.rotary_emb": 0}
    dmap.update({f"model.layers.{i}": (0 if i < n - 1 else "cpu") for i in range(n)})  # the last on the CPU
    dmap.update({"model.norm": 0, "lm_head": 0})
    return dispatch(model, dmap, main_device="cpu")


# ------------------------------------------------------------------------------------ driver


def launch(args, shape, estimator, world, result, *, torchrun=True, split=False, port=29700):
    cmd = [sys.executable]
    if torchrun:
        cmd += ["-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port", str(port)]
    cmd += [str(Path(__file__).resolve()), "--worker", "--shape", shape, "--estimator", estimator,
            "--result", str(result), "--dtype", args.dtype, "--batches", str(args.batches),
            "--batch", str(args.batch), "--seq", str(args.seq), "--options", args.options,
            "--probes", str(args.probes)]
    if args.micro_batch:
        cmd += ["--micro-batch", str(args.micro_batch)]
    if split:
        cmd += ["--split"]
    if args.backend:
        os.environ["MPSEARCH_BACKEND"] = args.backend
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "NCCL_NVLS_ENABLE": "0"}  # NVLink multicast stays off
    if not torchrun:
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"run failed: {' '.join(cmd)}")
    doc = json.loads(Path(result).read_text())
    doc["process_seconds"] = time.perf_counter() - t0
    return doc, np.load(Path(result).with_suffix(".npy"))


def compare(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape == b.shape and np.array_equal(a, b):
        return "bit-equal"
    rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-30)
    return f"max rel diff {rel.max():.2e}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke test: tiny shape, ranks 1,2, float32")
    p.add_argument("--shapes", default="llama-1.1b,llama-3-8b")
    p.add_argument("--estimators", default="output-distance,hessian")
    p.add_argument("--ranks", default="1,2", help="world sizes to run (default 1,2)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--options", default="2,4")
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--device-map", action="store_true", help="also the model spread over devices")
    p.add_argument("--backend", default=None, choices=("nccl", "gloo"),
                   help="force a backend (gloo lets several ranks share one GPU: a check, not a speed-up)")
    p.add_argument("-o", "--output", default=str(Path(__file__).with_suffix(".md")))
    # worker-only arguments
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--estimator", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--split", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.shapes, args.ranks, args.dtype = "tiny", "1,2", "float32"
        args.batches, args.batch, args.seq = 3, 2, 16
    ranks = [int(r) for r in args.ranks.split(",")]
    rows, split_rows = [], []
    port = 29700
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            for est in args.estimators.split(","):
                plain, plain_t = launch(args, shape, est, 1, Path(tmp) / "plain.json", torchrun=False)
                base = None
                for n in ranks:
                    port += 1
                    doc, t = launch(args, shape, est, n, Path(tmp) / f"r{n}.json", port=port)
                    if base is None:
                        base = (doc, t)
                    rows.append(row(shape, est, n, doc, t, base, plain, plain_t))
                    print(f"{shape} {est} ranks={n}: {rows[-1]}", file=sys.stderr, flush=True)
                split_here = shape == args.shapes.split(",")[0] and est == "output-distance"
                if args.device_map and torch.cuda.is_available() and split_here:
                    doc, t = launch(args, shape, est, 1, Path(tmp) / "split.json", torchrun=False, split=True)
                    split_rows.append({"shape": shape, "estimator": est, "devices": ", ".join(doc["devices"]),
                                       "seconds": round(doc["wall"], 3),
                                       "unsplit seconds": round(plain["wall"], 3),
                                       "peak GiB per GPU": doc["peak_gib"],
                                       "table vs unsplit": compare(t, plain_t)})
    write_report(args, rows, split_rows)


def row(shape, est, n, doc, t, base, plain, plain_t) -> dict:
    d = doc.get("distributed") or {}
    ranks = d.get("ranks") or []
    busy = [r["busy_seconds"] for r in ranks] or [doc["wall"]]
    wait = [r["reduce_seconds"] for r in ranks] or [0.0]
    return {
        "shape": shape, "estimator": est, "ranks": n, "backend": d.get("backend", "-"),
        "wall s": round(doc["wall"], 3), "speed-up": round(base[0]["wall"] / doc["wall"], 2),
        "busy s per rank": ", ".join(f"{b:.2f}" for b in busy),
        "idle s per rank": ", ".join(f"{max(busy) - b:.2f}" for b in busy),
        "reduce+wait s per rank": ", ".join(f"{w:.3f}" for w in wait),
        "reduction s": "-" if doc["reduce_seconds"] is None else f"{doc['reduce_seconds']:.4f}",
        "peak GiB per rank": ", ".join(str(r.get("peak_gib") or "-") for r in ranks) if ranks else
        ("-" if not doc["peak_gib"] else ", ".join(str(x) for x in doc["peak_gib"])),
        "table vs 1 rank": compare(t, base[1]),
        "1 rank vs plain": compare(base[1], plain_t) if n == base[0]["world"] else "",
    }


def markdown_table(rows: list[dict]) -> str:
    header = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    return "\n".join(lines)


def write_report(args, rows, split_rows) -> None:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "CPU"
    lines = [
        "# Sharded estimators over torch.distributed",
        "",
        f"`python experiments/distributed.py {' '.join(sys.argv[1:])}`",
        "",
        f"Device: {dev} x {max(torch.cuda.device_count(), 1)}; torch {torch.__version__}; "
        f"dtype {args.dtype}; {args.batches} batches of {args.batch} x {args.seq} random tokens; "
        f"options {args.options}; hessian: {args.probes} probes per batch (tol 0: all of them)"
        + (f", micro-batch {args.micro_batch}" if args.micro_batch else "") + ".",
        "",
        "Busy: a rank's own units (without the reduction); idle: the slowest rank's busy time minus its "
        "own; reduce+wait: time in the reductions, waiting for the slowest rank included; reduction: one "
        "all-reduce of the same size after a barrier. The 1-rank run is `torchrun --nproc-per-node 1`; "
        "plain is the same script without torchrun.",
        "",
        markdown_table(rows),
    ]
    if split_rows:
        lines += ["", "## One model spread over devices (accelerate device map, one process)", "",
                  markdown_table(split_rows)]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
