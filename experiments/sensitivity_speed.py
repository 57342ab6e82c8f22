"""Speed and memory of the sensitivity estimators, alternatives measured side by side in one run.

1. Hessian traces: mpsearch ``hessian`` (every per-layer trace from the same probes) against
   PyHessian's whole-model ``trace()`` with the same number of probes, on the same model, batch and
   loss (target: <= 1.2x PyHessian's time). PyHessian is run twice: on all parameters (its default)
   and on the same quantized weights only. Install it with ``pip install pyhessian`` (the script
   falls back to a plain Hutchinson whole-model trace written here if it is missing).
2. Peak memory (peak RSS over the RSS before the call, each measurement in a fresh process; the
   kernel's peak counter is reset before the call through /proc/self/clear_refs, so Linux only):
   ``hessian`` against one training step (forward + backward) of the same batch (target <= 3x);
   ``fisher`` for growing sample counts and chunk sizes (bounded by the chunk, not the samples).
3. ``output-distance`` with and without prefix caching (time, block evaluations, equality), and the
   prefix cache under a memory limit.

Run:  python experiments/sensitivity_speed.py          (about 10-15 minutes on 2 busy CPU cores)
Writes experiments/sensitivity_speed.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import gc
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import mpsearch  # noqa: E402
from mpsearch.sensitivity.base import EstimatorWarning, math_attention, only_weights_require_grad  # noqa: E402
from sensitivity_common import fashion, markdown_table, minilm, timed  # noqa: E402

warnings.simplefilter("ignore", EstimatorWarning)


class IdsOnly(torch.nn.Module):
    """PyHessian calls ``model(inputs)`` with one tensor: bind the attention mask."""

    def __init__(self, model, mask):
        super().__init__()
        self.inner, self.mask = model, mask

    def forward(self, ids):
        return self.inner(input_ids=ids, attention_mask=self.mask)


def setup(name: str):
    """``(model taking one tensor, x, target, criterion, probes)`` for a speed/memory case."""
    torch.manual_seed(0)
    if name == "minilm":
        model, calib, _ = minilm(n_calib=8, n_eval=1, max_length=32)
        b = calib[0]
        model = IdsOnly(model, b["attention_mask"]).eval()
        x = b["input_ids"]
        with torch.no_grad():
            target = model(x)
        return model, x, target, lambda out, t: F.mse_loss(out, t), 8
    model, calib, _ = fashion(n_calib=256, n_eval=1)
    x, y = calib[0]
    return model, x, y, lambda out, t: F.cross_entropy(out, t), 32


def layer_weights(model):
    return [m.weight for _n, m, _k in mpsearch.layers.iter_quantizable(model)]


def ours(model, x, t, crit, probes, micro_batch=None):
    if isinstance(model, IdsOnly):  # mpsearch takes the dict batch itself (micro-batches slice the mask too)
        model, x = model.inner, {"input_ids": x, "attention_mask": model.mask}
    est = mpsearch.get_estimator("hessian", probes=probes, min_probes=probes, tol=0.0, loss=crit,
                                 micro_batch=micro_batch)
    return est.estimate(model, [(x, t)], progress=False)


def pyhessian_trace(model, x, t, crit, probes, same_weights: bool):
    grads_on = only_weights_require_grad(model, layer_weights(model)) if same_weights else contextlib.nullcontext()
    with grads_on:
        with math_attention():
            try:
                from pyhessian import hessian

                h = hessian(model, crit, data=(x, t), cuda=False)
                # tol=-inf: PyHessian's relative stop test divides by the running mean, and tol=0.0
                # still stops at the first negative running mean; -inf takes every probe
                return float(np.mean(h.trace(maxIter=probes, tol=float("-inf"))))
            except ImportError:  # plain whole-model Hutchinson
                params = [p for p in model.parameters() if p.requires_grad]
                grads = torch.autograd.grad(crit(model(x), t), params, create_graph=True)
                vals = []
                for _ in range(probes):
                    vs = [torch.randint_like(p, 2) * 2 - 1 for p in params]
                    hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
                    vals.append(float(sum((v * h).sum() for v, h in zip(vs, hv))))
                return float(np.mean(vals))


# ------------------------------------------------------------------------ memory (child process)
def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> float:
    """Reset the peak RSS (Linux: write 5 to clear_refs) and return the current RSS in MB."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def child(kind: str, name: str, samples: int, chunk: int) -> dict:
    torch.set_num_threads(2)
    model, x, t, crit, probes = setup(name)
    if kind == "fisher":
        xs, ys = fashion(n_calib=samples, n_eval=1)[1][0]
    with torch.no_grad():
        model(x)
    base = _reset_peak()
    t0 = time.perf_counter()
    if kind == "train":
        crit(model(x), t).backward()
    elif kind == "hessian":
        ours(model, x, t, crit, probes)
    elif kind == "hessian-micro":
        ours(model, x, t, crit, probes, micro_batch=max(1, len(x) // 4))
    elif kind == "fisher":
        mpsearch.get_estimator("fisher", chunk_size=chunk).estimate(model, [(xs, ys)], progress=False)
    return {"peak_mb": _status_mb("VmHWM") - base, "seconds": time.perf_counter() - t0}


def measure(kind, name, samples=0, chunk=0) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, name, str(samples), str(chunk)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=4, metavar=("KIND", "MODEL", "SAMPLES", "CHUNK"))
    ap.add_argument("--models", default="fashion-cnn,minilm")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("-o", "--output", default=str(Path(__file__).with_suffix(".md")))
    args = ap.parse_args()
    if args.child:
        kind, name, s, c = args.child
        print(json.dumps(child(kind, name, int(s), int(c))))
        return
    try:
        import pyhessian  # noqa: F401

        ref_name = "PyHessian trace()"
    except ImportError:
        ref_name = "plain Hutchinson (pyhessian not installed)"
    speed, memory, od = [], [], []
    for name in args.models.split(","):
        model, x, t, crit, probes = setup(name)
        reps = args.repeats
        cases = {"ours": lambda: ours(model, x, t, crit, probes),
                 "all": lambda: pyhessian_trace(model, x, t, crit, probes, False),
                 "same": lambda: pyhessian_trace(model, x, t, crit, probes, True)}
        times, results = {k: [] for k in cases}, {}
        for r in range(reps):  # interleaved, in a rotating order: drift on a shared machine hits all alike
            order = list(cases)[r % 3:] + list(cases)[:r % 3]
            for k in order:
                sec, results[k] = timed(cases[k], 1)
                times[k].append(sec)
        t_ours, t_all, t_same = (float(np.median(times[k])) for k in ("ours", "all", "same"))
        r_all = float(np.median(np.array(times["ours"]) / np.array(times["all"])))
        r_same = float(np.median(np.array(times["ours"]) / np.array(times["same"])))
        table, tr_same = results["ours"], results["same"]
        layers = len(table.layers)
        tr_ours = sum(table.metadata["uncertainty"]["trace"].values())
        speed.append([name, layers, probes, f"{t_ours:.2f}", f"{t_all:.2f}", f"{t_same:.2f}",
                      f"{r_all:.2f}", f"{r_same:.2f}", f"{tr_ours:.4g}", f"{tr_same:.4g}"])
        print("speed", speed[-1], flush=True)
        tr, he, hm = measure("train", name), measure("hessian", name), measure("hessian-micro", name)
        for label, r in [("hessian, whole batch", he), ("hessian, micro_batch = batch/4", hm)]:
            memory.append([name, len(x), label, f"{tr['peak_mb']:.0f}", f"{r['peak_mb']:.0f}",
                           f"{r['peak_mb'] / max(tr['peak_mb'], 1e-9):.2f}", f"{r['seconds']:.1f}"])
        print("memory", memory[-1], flush=True)
        # output-distance with and without prefix caching
        if name == "minilm":
            m2, calib, _ = minilm(n_calib=8, n_eval=1, max_length=32)
            batches, kw = calib, {"output": "embedding"}
        else:
            m2, batches, kw = model, [(x[:64], t[:64])], {}
        runs = {}
        for label, extra in [("cached", {}), ("uncached", {"prefix_cache": False})]:
            sec, tab = timed(lambda: mpsearch.get_estimator("output-distance", options="2,4", **kw, **extra)
                             .estimate(m2, batches, progress=False), 1 if name == "minilm" else reps)
            runs[label] = (sec, tab)
        diff = float(np.abs(runs["cached"][1].frame["damage"] - runs["uncached"][1].frame["damage"]).max())
        c = runs["cached"][1].metadata["cost"]
        per_block = c["cache_mb"] / max(c["cached_blocks"], 1)
        lim_mb = 2.5 * per_block
        sec_lim, tab_lim = timed(lambda: mpsearch.get_estimator(
            "output-distance", options="2,4", max_cache_mb=lim_mb, **kw).estimate(m2, batches, progress=False), 1)
        cl = tab_lim.metadata["cost"]
        od.append([name, c["block_list"] or "(model)", c["blocks"], f"{runs['cached'][0]:.2f}",
                   f"{runs['uncached'][0]:.2f}", f"{runs['uncached'][0] / runs['cached'][0]:.2f}",
                   c["block_evaluations"], runs["uncached"][1].metadata["cost"]["block_evaluations"],
                   f"{diff:.1e}", f"{lim_mb:.3f}", f"{cl['cache_mb']:.3f} ({cl['cached_blocks']} blocks)",
                   f"{sec_lim:.2f}"])
        print("output-distance", od[-1], flush=True)
    fisher_rows = []
    for samples, chunk in [(128, 8), (1024, 8), (128, 64), (1024, 64)]:
        r = measure("fisher", "fashion-cnn", samples, chunk)
        fisher_rows.append([samples, chunk, f"{r['peak_mb']:.1f}", f"{r['seconds']:.2f}"])
        print("fisher", fisher_rows[-1], flush=True)
    text = [
        "# Sensitivity estimators: speed and memory",
        "",
        f"Written by `python experiments/sensitivity_speed.py` (torch {torch.__version__}, CPU, "
        f"{torch.get_num_threads()} threads; the machine was shared with other jobs, so absolute times "
        f"are noisy while the side-by-side ratios are what to read). Times are medians of {args.repeats} "
        f"interleaved rounds (the three cases in a rotating order); ratios are medians of the per-round "
        f"ratios. Reference: {ref_name}.",
        "",
        "## Hessian traces: all per-layer traces vs one whole-model trace, same probes",
        "",
        "`mpsearch` time is the whole `estimate()` (layer discovery, HVPs, table). Target: ≤ 1.2× PyHessian.",
        "",
        markdown_table(["model", "layers", "probes", "mpsearch s", "PyHessian all params s",
                        "PyHessian same weights s", "ratio vs all", "ratio vs same", "Σ per-layer traces",
                        "whole trace (same weights)"], speed),
        "",
        "## Peak memory (peak RSS above the RSS before the call; fresh process each, peak counter reset)",
        "",
        "Target: `hessian` ≤ 3× one training step (forward + backward) of the same batch. `micro_batch` "
        "holds one quarter of the batch's double-backward graph at a time (the same table, see the tests).",
        "",
        markdown_table(["model", "batch", "estimator run", "training step MB", "hessian MB", "ratio",
                        "hessian s"], memory),
        "",
        "`fisher` per-sample gradients (Fashion CNN): memory follows the chunk size, not the sample count.",
        "",
        markdown_table(["samples", "chunk_size", "peak MB", "seconds"], fisher_rows),
        "",
        "## output-distance: prefix caching (options int2, int4)",
        "",
        markdown_table(["model", "block list", "blocks", "cached s", "uncached s", "speed-up",
                        "block evals cached", "block evals uncached", "max |Δ damage|", "limit MB",
                        "cache held under limit", "limited s"], od),
        "",
    ]
    Path(args.output).write_text("\n".join(text))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
