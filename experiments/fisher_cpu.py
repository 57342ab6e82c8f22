"""The fisher estimator's per-sample gradients on SmolLM2-135M on the CPU: the old code beside the new.

Usage:
    OMP_NUM_THREADS=2 python experiments/fisher_cpu.py [--old-rev REV] [--repeats 3] [-o experiments/fisher_cpu.md]
    OMP_NUM_THREADS=2 python experiments/fisher_cpu.py --busy 6 --samples 2 --repeats 1 -o experiments/fisher_cpu_busy.md

What ``mpsearch estimate --model smollm2 --data shakespeare --target vllm`` runs on a CPU: the fisher
estimator with its defaults (loop of per-sample backward passes, chunks of 16, labels sampled from the
model) on the CLI's CPU calibration data (16 samples of 128 tokens of Shakespeare, batches of 8),
vLLM's default options. The old fisher module is ``git show REV:mpsearch/sensitivity/fisher.py``
(default: main before issue 28) loaded beside the new one; old and new alternate in each repeat.
Seconds per sample: the gradient phase (everything before the rounding errors) over the samples.

The tables are compared (largest relative difference, Spearman rank correlation) and each is solved
with ``mpsearch solve --solver ilp --budget size=w4a16-g32`` (the README's vLLM step): the plans are
compared layer by layer.

``--busy N`` runs N busy-loop processes beside the measurement (a loaded machine, as the README's
newcomer walkthrough was measured on: experiments/newcomer_cpu.md) and times the new code with 2
threads and with 1 (the plans are not compared then). About 5 minutes on 2 idle cores (``--busy 6
--samples 2``: about 3 minutes, during which the machine is busy).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mpsearch import zoo  # noqa: E402
from mpsearch.recipe import resolve  # noqa: E402
from mpsearch.specs import load_calibration  # noqa: E402
import mpsearch.sensitivity.fisher as new_fisher  # noqa: E402

OLD_REV = "0368585"  # main before issue 28's change to fisher


def old_module(rev: str, tmp: Path):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:mpsearch/sensitivity/fisher.py"],
                         check=True, capture_output=True, text=True).stdout
    path = tmp / "_fisher_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("mpsearch.sensitivity._fisher_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def timed_estimate(mod, model, data, options):
    """``(table, seconds per sample of the gradient phase, seconds of the whole estimate)``."""
    marks = {}
    real = mod.rounding_damage

    def rounding(*a, **kw):
        marks["round"] = time.perf_counter()
        return real(*a, **kw)

    est = mod.FisherEstimator(options=options)
    damage = est._damage

    def start(*a, **kw):
        marks["start"] = time.perf_counter()
        return damage(*a, **kw)

    mod.rounding_damage, est._damage = rounding, start
    try:
        t0 = time.perf_counter()
        table = est.estimate(model, data, target="vllm", progress=False)
        total = time.perf_counter() - t0
    finally:
        mod.rounding_damage = real
    samples = table.metadata["cost"]["samples"]
    return table, (marks["round"] - marks["start"]) / samples, total


def solve(table, path: Path) -> dict:
    table.write(path)
    plan = path.with_suffix(".plan.json")
    subprocess.run([sys.executable, "-m", "mpsearch", "solve", "--table", str(path), "--solver", "ilp",
                    "--budget", "size=w4a16-g32", "-o", str(plan)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    d = json.loads(plan.read_text())
    return {k: v["name"] for k, v in d["options"].items()}


def compare(old, new, tmp: Path) -> dict:
    a, b = old.pivot("damage").to_numpy(), new.pivot("damage").to_numpy()
    ok = np.isfinite(a) & np.isfinite(b)
    rel = np.abs(a[ok] - b[ok]) / np.maximum(np.abs(a[ok]), 1e-300)
    pa, pb = solve(old, tmp / "old.csv"), solve(new, tmp / "new.csv")
    same = sum(pa[k] == pb.get(k) for k in pa)
    return {"cells": int(ok.sum()), "max_rel": float(rel.max()), "median_rel": float(np.median(rel)),
            "spearman": float(spearmanr(a[ok], b[ok]).statistic), "plan_layers": len(pa), "plan_same": int(same),
            "plan_old": dict(sorted(_count(pa).items())), "plan_new": dict(sorted(_count(pb).items()))}


def _count(plan: dict) -> dict:
    out = {}
    for v in plan.values():
        out[v] = out.get(v, 0) + 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-rev", default=OLD_REV)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=None, help="calibration samples (default: the CLI's on a CPU, 16)")
    ap.add_argument("--busy", type=int, default=0, help="busy-loop processes beside the measurement")
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()

    model = zoo.smollm2()
    data = load_calibration("shakespeare", model, "smollm2", samples=a.samples)
    options = resolve(target="vllm", model=model).options
    rows, tables = [], {}
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        old = old_module(a.old_rev, tmp)
        runs = ([("old", old, None), ("new", new_fisher, None)] if not a.busy else
                [("new, 2 threads", new_fisher, 2), ("new, 1 thread", new_fisher, 1)])
        busy = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(a.busy)]
        try:
            time.sleep(3 if a.busy else 0)
            for rep in range(a.repeats):
                for name, mod, threads in runs:
                    torch.set_num_threads(threads or int(os.environ.get("OMP_NUM_THREADS", "2")))
                    table, per_sample, total = timed_estimate(mod, model, data, options)
                    tables[name] = table
                    rows.append({"repeat": rep + 1, "code": name, "threads": torch.get_num_threads(),
                                 "per_sample_s": per_sample, "estimate_s": total,
                                 "load1": os.getloadavg()[0]})
                    print(rows[-1], flush=True)
        finally:
            for p in busy:
                p.kill()
        agree = compare(tables["old"], tables["new"], tmp) if not a.busy else None
    load1 = os.getloadavg()
    text = report(a, rows, agree, load0, load1, [name for name, _, _ in runs], data)
    print(text)
    if a.output:
        Path(a.output).write_text(text)


def report(a, rows, agree, load0, load1, names, data) -> str:
    samples = sum(len(b["input_ids"]) for b in data)
    tokens = data[0]["input_ids"].shape[1]
    med = {n: statistics.median(r["per_sample_s"] for r in rows if r["code"] == n) for n in names}
    tot = {n: statistics.median(r["estimate_s"] for r in rows if r["code"] == n) for n in names}
    cmd = " ".join(["python experiments/fisher_cpu.py"] + sys.argv[1:])
    lines = [
        "# fisher's per-sample gradients on SmolLM2-135M on the CPU" + (f" beside {a.busy} busy processes" if a.busy else ""),
        "",
        f"Made by `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} {cmd}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores, load average (1/5/15 min) {'/'.join(f'{x:.2f}' for x in load0)} before and "
        f"{'/'.join(f'{x:.2f}' for x in load1)} after. SmolLM2-135M-Instruct (the zoo's GGUF, float32), "
        f"{samples} samples of {tokens} tokens of Shakespeare in batches of {len(data[0]['input_ids'])} (the CLI's "
        f"CPU calibration data), fisher's defaults (per-sample loop, labels sampled from the model), vLLM's "
        f"default options. "
        + (f"Old: fisher.py at {a.old_rev} (a labelling forward pass over each chunk, then one forward and "
           f"backward pass per sample); new: this branch's (each sample's labels drawn from its own forward "
           f"pass with the chunk's random draws)." if not a.busy else
           f"This branch's fisher with torch on 2 threads and on 1, {a.busy} busy-loop processes "
           f"(`while 1: pass`) running beside it."),
        "",
        "| repeat | code | threads | s per sample (gradient phase) | whole estimate s | load (1 min) after |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['repeat']} | {r['code']} | {r['threads']} | {r['per_sample_s']:.2f} | {r['estimate_s']:.1f} | {r['load1']:.2f} |")
    lines += ["", f"Median of {a.repeats}: " + ", ".join(f"{n} **{med[n]:.2f} s per sample** ({tot[n]:.1f} s the whole estimate)" for n in names)
              + f"; {names[1]} / {names[0]}: {med[names[1]] / med[names[0]]:.2f} per sample."]
    if agree:
        lines += [
            "",
            "## The tables and plans, old vs new",
            "",
            f"Finite damage cells: {agree['cells']}; largest relative difference {agree['max_rel']:.2e} (median "
            f"{agree['median_rel']:.2e}); Spearman rank correlation {agree['spearman']:.6f}. "
            + ("The tables are equal bit for bit: each sample's labels, drawn from its own forward pass, are those "
               "of the labelling pass over its chunk. " if agree["max_rel"] == 0 else "")
            + "They may differ by float rounding only: each sample's logits come from its own forward pass instead "
              "of the chunk's, and a label can change only where two classes tie to rounding (the tiny test models: "
              "tests/test_sensitivity.py::test_fisher_sampled_labels_equal_one_labelling_pass_per_chunk, within "
              "1e-5 relative).",
            "",
            f"`mpsearch solve --solver ilp --budget size=w4a16-g32` on each table: {agree['plan_same']} of "
            f"{agree['plan_layers']} layers get the same option; options old {agree['plan_old']}, new {agree['plan_new']}.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
