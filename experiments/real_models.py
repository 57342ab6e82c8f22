"""Measured quality of mixed precision vs uniform bit-widths on the packaged real models.

For all-MiniLM-L6-v2 (embedding cosine to fp32 on passages from held-out plays) and the
Fashion-MNIST CNN (test accuracy on 10,000 test images; 2,000 with --quick), at the sizes of uniform 3, 4 and 5 bits
(scales included): uniform, every estimator with the ILP solver, and the default pipeline (the
`mpsearch demo` recipe). Writes experiments/real_models.md.

    python experiments/real_models.py            # ~10-20 minutes on 2 cores
    python experiments/real_models.py --quick    # fewer estimators and evaluation samples
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mpsearch import zoo  # noqa: E402
from mpsearch.cli.demo import DEMO  # noqa: E402
from mpsearch.metrics import Accuracy, EmbeddingCosine  # noqa: E402
from mpsearch.pipeline import measured_frontier  # noqa: E402

BITS = (3, 4, 5)
OPTIONS = "2,3,4,5,6,8"


def workloads(quick):
    model, tok = zoo.load_minilm()
    n_eval = 64 if quick else 128
    yield ("all-MiniLM-L6-v2", model,
           zoo.minilm_batches(zoo.shakespeare_lines(DEMO["calib"], "calib"), 16, DEMO["max_length"], tokenizer=tok),
           EmbeddingCosine(zoo.minilm_batches(zoo.shakespeare_lines(n_eval, "eval", seed=1), 32,
                                              DEMO["max_length"], tokenizer=tok)))
    if zoo.fashion_mnist_available():
        yield ("Fashion-MNIST CNN", zoo.fashion_mnist_cnn(),
               zoo.fashion_batches("train", n=256, batch_size=128),
               Accuracy(zoo.fashion_batches("test", n=2000 if quick else 10000, batch_size=1000)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-o", "--output", default=str(Path(__file__).with_suffix(".md")))
    args = ap.parse_args()
    torch.set_num_threads(2)
    estimators = ["weight-error", "fisher", "output-distance"] if args.quick else \
        ["weight-error", "hessian", "fisher", "lrp", "output-distance", "lim"]
    recipes = [(e, "ilp") for e in estimators] + [("default", None)]
    lines = ["# Real models: measured quality, mixed precision vs uniform", "",
             f"Command: `python experiments/real_models.py{' --quick' if args.quick else ''}` "
             f"(torch threads: 2). Options {OPTIONS}; budgets are the exact sizes of uniform 3/4/5 bits "
             f"(per-channel fp16 scales included). Default pipeline = `mpsearch demo` recipe: "
             f"{DEMO['estimator']} + {DEMO['solver']}.", ""]
    for name, model, calib, metric in workloads(args.quick):
        rows, uniform, times = {}, None, {}
        for est, slv in recipes:
            e, s = (DEMO["estimator"], DEMO["solver"]) if est == "default" else (est, slv)
            if est == "default" and (e, s) in recipes and isinstance(rows.get(e), list):
                rows[est], rows[est + "/spearman"], times[est] = rows[e], rows[e + "/spearman"], times[e]
                continue  # the same recipe as a row above: same plans, same measurements
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    run = measured_frontier(model, calib, metric, estimator=e, solver=s, options=OPTIONS,
                                            validate=0, n_points=4, progress=False, uniform=uniform is None)
                except Exception as exc:  # an estimator that cannot handle this model: say so
                    rows[est] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                    continue
            times[est] = time.perf_counter() - t0
            q = f"measured_{run.metric}"
            if uniform is None:
                uniform = run.uniform.set_index("bits")
                baseline, label = run.baseline, run.metric_label
            val = run.validated()
            rows[est] = [float(val.loc[np.isclose(val["budget_avg_bits"], uniform.loc[b, "avg_bits"], atol=1e-6), q].iloc[0])
                         for b in BITS]
            rows[est + "/spearman"] = run.proxy["spearman"]
        lines += [f"## {name}", "", f"Metric: {label}; full precision: {baseline:.4f}.", "",
                  "| recipe | " + " | ".join(f"{b} bits" for b in BITS) + " | beats uniform at all 3 | proxy Spearman | seconds |",
                  "|---|" + "---|" * (len(BITS) + 3)]
        u = [float(uniform.loc[b, f"measured_{run.metric}"]) for b in BITS]
        lines.append("| uniform | " + " | ".join(f"{v:.4f}" for v in u) + " | - | - | - |")
        for est, _ in recipes:
            r = rows.get(est)
            if isinstance(r, str):
                lines.append(f"| {est} + ilp | {r} |" + " |" * (len(BITS) + 2))
                continue
            beats = all(a > b for a, b in zip(r, u))
            title = f"default ({DEMO['estimator']} + {DEMO['solver']})" if est == "default" else f"{est} + ilp"
            lines.append(f"| {title} | " + " | ".join(f"{v:.4f}" for v in r)
                         + f" | {'yes' if beats else 'no'} | {rows[est + '/spearman']:.3f} | {times[est]:.0f} |")
        diffs = [np.median([a - b for a, b in zip(rows[e], u)]) for e, _ in recipes if isinstance(rows.get(e), list)]
        lines += ["", f"Median over recipes of the median gain over uniform: {np.median(diffs):+.4f}.", ""]
        print("\n".join(lines[-len(recipes) - 6:]), flush=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
