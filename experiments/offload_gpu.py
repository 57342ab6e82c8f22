"""The default table of the Llama-3-8B shape on one GPU, with and without ``offload`` (issue 24, item 4).

One process, one model (``zoo.random_llama("llama-3-8b")``, bf16, random weights: timing does not depend
on trained weights), random token ids in windows of ``--seq`` tokens, batches of 8 (the CLI's default),
the default recipe's estimator and options (output-distance, the ``llm`` preset: 11 options) at their
default settings. Two parts, side by side in one run:

- ``plain``: the model on the GPU, no memory cap (as ``mpsearch estimate --device cuda``);
- ``offload``: the model in (pinned) CPU memory, the decoder blocks streamed to the GPU, the process
  capped at ``--cap-gb`` (16 GB) with ``torch.cuda.set_per_process_memory_fraction``; ``--micro-batch``
  when given, else the largest of 8, 4, 2, 1 samples a pass whose work plan fits the cap (the estimator
  refuses a plan over the cap after its first reference pass, in one line, recorded as
  ``offload-refused``; an out-of-memory error, a plan that underestimated, is recorded as
  ``offload-oom``; the plan line is printed before the work).

Each part records wall time, the estimator's own seconds and cost (suffix passes, bytes streamed),
the work plan it printed (estimated peak and time), ``torch.cuda.max_memory_allocated`` and the
largest ``nvidia-smi`` memory.used sampled every 0.5 s during the part, and whether the two tables
are equal (they are computed in bf16 on the same card; offload changes no arithmetic, so equal up to
the non-determinism of the GPU kernels: the largest relative difference is recorded).

    # on one H100 (about 6-8 minutes with --calib 2; see offload_gpu.md for the extrapolation)
    timeout 540 python experiments/offload_gpu.py --out $OUT/offload --calib 2
    # a check of the script on a CPU at the tiny shape (seconds)
    python experiments/offload_gpu.py --out /tmp/offload --device cpu --shape tiny --calib 4 --seq 32

Results are appended as JSON records to ``<out>/results.jsonl``; ``--table`` prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class SmiSampler:
    """The largest nvidia-smi memory.used (MiB) of the GPU while active (``None`` without nvidia-smi)."""

    def __init__(self, index: int = 0, every: float = 0.5):
        self.index, self.every, self.peak = index, every, None
        self._stop = threading.Event()

    def _sample(self):
        try:
            out = subprocess.run(["nvidia-smi", "-i", str(self.index), "--query-gpu=memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
            return float(out.stdout.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    def _run(self):
        while not self._stop.is_set():
            v = self._sample()
            if v is not None:
                self.peak = v if self.peak is None else max(self.peak, v)
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def default_options(model) -> str:
    from mpsearch.recipe import resolve

    return resolve(model=model, has_data=True, gpu=True).options


def run_part(name, model, data, options, device, out, **settings) -> tuple[dict, object]:
    from mpsearch.sensitivity.output_distance import OutputDistanceEstimator

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    est = OutputDistanceEstimator(options=options, device=device, **settings)
    sync(device)
    t0 = time.perf_counter()
    with SmiSampler() if cuda else _Null() as smi:
        table = est.estimate(model, data, progress=True)
        sync(device)
    wall = time.perf_counter() - t0
    cost = table.metadata["cost"]
    rec = {"part": name, "settings": settings, "wall_s": round(wall, 2), "estimator_s": cost.get("seconds"),
           "cost": cost, "work_plan": table.metadata.get("work_plan"),
           "max_memory_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
           "nvidia_smi_peak_gb": round(smi.peak / 1024, 2) if getattr(smi, "peak", None) else None,
           "device": torch.cuda.get_device_name() if cuda else "cpu"}
    write(out, rec)
    return rec, table


class _Null:
    peak = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def write(out: Path, rec: dict):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a") as fh:
        fh.write(json.dumps(rec, default=str) + "\n")
    print(json.dumps(rec, default=str), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--calib", type=int, default=2, help="calibration windows (default 2; the CLI's is 128)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cap-gb", type=float, default=16.0)
    ap.add_argument("--micro-batch", type=int, default=None, help="offload part: samples a pass (default: fitted)")
    ap.add_argument("--parts", default="plain,offload")
    ap.add_argument("--table", action="store_true", help="print the markdown table of <out>/results.jsonl")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    from mpsearch import zoo

    cuda = torch.device(args.device).type == "cuda"
    parts = args.parts.split(",")
    t = time.perf_counter()
    model = zoo.random_llama(args.shape, device=args.device if "plain" in parts else "cpu", dtype="bfloat16")
    build = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.calib, args.seq), generator=g)
    data = [{"input_ids": x} for x in ids.split(args.batch_size)]
    options = default_options(model)
    write(args.out, {"part": "setup", "shape": args.shape, "calib": args.calib, "seq": args.seq,
                     "batch_size": args.batch_size, "options": options, "build_s": round(build, 1),
                     "params": sum(p.numel() for p in model.parameters()), "torch": torch.__version__})
    tables = {}
    if "plain" in parts:
        _, tables["plain"] = run_part("plain", model, data, options, args.device, args.out)
    if "offload" in parts:
        model.to("cpu")
        settings = {"offload": True}
        if cuda:
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 2**30 / total))
            settings["device_memory_mb"] = args.cap_gb * 1024
        else:
            settings["device_memory_mb"] = None
        from mpsearch.errors import MpsearchError

        tries = [args.micro_batch] if args.micro_batch else [m for m in (8, 4, 2, 1) if m <= args.batch_size]
        for mb in tries:  # the estimator refuses a plan over the cap after its first reference pass
            settings["micro_batch"] = mb
            try:
                rec, tables["offload"] = run_part("offload", model, data, options, args.device, args.out,
                                                  **{k: v for k, v in settings.items() if v is not None})
                break
            except MpsearchError as exc:
                write(args.out, {"part": "offload-refused", "micro_batch": mb, "message": str(exc)})
            except torch.cuda.OutOfMemoryError as exc:  # the plan's estimate was too low: recorded, next size
                write(args.out, {"part": "offload-oom", "micro_batch": mb, "message": str(exc).splitlines()[0]})
                torch.cuda.empty_cache()
    if len(tables) == 2:
        a = tables["plain"].frame["damage"].to_numpy()
        b = tables["offload"].frame["damage"].to_numpy()
        rel = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-30)))
        write(args.out, {"part": "compare", "equal": bool(np.array_equal(a, b)), "max_rel_diff": rel,
                         "rows": len(a)})
    return 0


def table(out: Path) -> str:
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
    setup = next(r for r in recs if r["part"] == "setup")
    lines = [f"{setup['shape']}, bf16, {setup['calib']} x {setup['seq']} tokens, options {setup['options']}",
             "", "| part | settings | wall s | estimator s | suffix passes | GB streamed | "
                 "max_memory_allocated GB | nvidia-smi GB | plan: peak GB, time s | device |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        if r["part"] not in ("plain", "offload"):
            continue
        c, p = r["cost"], r.get("work_plan") or {}
        lines.append(f"| {r['part']} | {r['settings']} | {r['wall_s']} | {r['estimator_s']} | {c.get('suffix_passes')} | "
                     f"{round(c.get('offload_bytes', 0) / 2**30, 1)} | {r['max_memory_allocated_gb']} | "
                     f"{r['nvidia_smi_peak_gb']} | {p.get('peak_gb')}, {p.get('seconds')} | {r['device']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
