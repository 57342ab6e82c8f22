"""Measured quality of mixed precision vs uniform bit-widths on the packaged real models.

For all-MiniLM-L6-v2 (embedding cosine to fp32 on passages from held-out plays) and the
Fashion-MNIST CNN (on the 10,000 test images: accuracy, top-1 agreement with the fp32 model and
KL(fp32 || quantized)), at the exact sizes of uniform 3, 4 and 5 bits (scales and zero-points
included): uniform, every estimator with the ILP solver, and the default pipeline
(``output-distance`` + ``ilp``, the `mpsearch demo` recipe).

Two quantizer families are run, each against its own uniform baseline:

- asymmetric per-channel round-to-nearest (int2-asym ... int8-asym): the default pipeline's;
- symmetric per-channel (int2 ... int8), the default recipe only. Symmetric 2-bit has three levels
  (-s, 0, s), so at a 3-bit budget there is no cheaper option worth taking and the allocator can
  only return the uniform plan (see the table).

    python experiments/real_models.py            # ~20-30 minutes on 2 cores
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

from mpsearch import apply_plan, zoo  # noqa: E402
from mpsearch.cli.demo import DEMO  # noqa: E402
from mpsearch.metrics import Accuracy, EmbeddingCosine, KLDivergence, Top1Agreement  # noqa: E402
from mpsearch.pipeline import measured_frontier  # noqa: E402
from mpsearch.plan import BitPlan  # noqa: E402

BITS = (3, 4, 5)
FAMILIES = {
    "asymmetric": ("int{}-asym", "int2-asym,int3-asym,int4-asym,int5-asym,int6-asym,int8-asym"),
    "symmetric": ("int{}", "int2,int3,int4,int5,int6,int8"),
}
DEFAULT = (DEMO["estimator"], DEMO["solver"])


def workloads(quick):
    """``(name, model, calib, primary metric, extra metrics)`` per real model."""
    model, tok = zoo.load_minilm()
    n_eval = 64 if quick else 128
    yield ("all-MiniLM-L6-v2", model,
           zoo.minilm_batches(zoo.shakespeare_lines(DEMO["calib"], "calib"), 16, DEMO["max_length"], tokenizer=tok),
           EmbeddingCosine(zoo.minilm_batches(zoo.shakespeare_lines(n_eval, "eval", seed=1), 32,
                                              DEMO["max_length"], tokenizer=tok)), [])
    if zoo.fashion_mnist_available():
        ev = zoo.fashion_batches("test", n=2000 if quick else 10000, batch_size=1000)
        yield ("Fashion-MNIST CNN", zoo.fashion_mnist_cnn(), zoo.fashion_batches("train", n=256, batch_size=128),
               Accuracy(ev), [Top1Agreement(ev), KLDivergence(ev)])


def run_recipe(model, calib, metric, extra, est, slv, options, option_fmt):
    """Plans at the sizes of uniform 3/4/5 bits, measured with every metric; and the uniform ones."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = measured_frontier(model, calib, metric, estimator=est, solver=slv, options=options,
                                validate=0, n_points=4, progress=False)
    uni = run.uniform.set_index("option")
    val = run.validated()
    plans, uplans = [], []
    for b in BITS:
        opt = option_fmt.format(b)
        hit = val[val["at_budget"].str.split(",").apply(lambda xs, opt=opt: opt in xs)]  # solved at its size
        plans.append(run.plans[int(hit["point"].iloc[0])])
        uplans.append(BitPlan.uniform(run.table.layers, opt))
    metrics = [metric] + extra
    for m in extra:
        m.fit(model)

    def measure(plan_list):
        out = {}
        for m in metrics:
            out[m.name] = [float(m(apply_plan(model, p))) for p in plan_list]
        return out

    return run, measure(plans), measure(uplans), plans


def fmt(v, name):
    return f"{v:.4f}" if name in ("cosine", "kl") else f"{v:.2f}"


def better(a, b, higher):
    return a > b if higher else a < b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-o", "--output", default=str(Path(__file__).with_suffix(".md")))
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    estimators = ["weight-error", "fisher", "output-distance"] if args.quick else \
        ["weight-error", "hessian", "fisher", "lrp", "output-distance", "lim"]
    lines = ["# Real models: measured quality, mixed precision vs uniform", "",
             f"Command: `python experiments/real_models.py{' --quick' if args.quick else ''}` "
             f"(torch {torch.__version__}, 2 threads). Budgets are the exact sizes of uniform 3/4/5 bits of "
             "the same quantizer family (per-channel fp16 scales, and zero-points for asymmetric, included). "
             f"Default pipeline: {DEFAULT[0]} + {DEFAULT[1]} over asymmetric per-channel int2..int8. "
             "Bold: better than uniform at that budget.", ""]
    summary = []
    for name, model, calib, metric, extra in workloads(args.quick):
        metrics = [metric] + extra
        for family, (option_fmt, options) in FAMILIES.items():
            recipes = [(e, "ilp") for e in estimators] if family == "asymmetric" else [DEFAULT]
            rows, uniform, times, proxy = {}, None, {}, {}
            for est, slv in recipes:
                t0 = time.perf_counter()
                try:
                    run, mixed, uni, _ = run_recipe(model, calib, metric, extra, est, slv, options, option_fmt)
                except Exception as exc:  # an estimator that cannot handle this model: say so
                    rows[(est, slv)] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                    continue
                times[(est, slv)] = time.perf_counter() - t0
                rows[(est, slv)], proxy[(est, slv)] = mixed, run.proxy["spearman"]
                uniform, baseline = uni, run.baseline
                print(f"[{name} / {family}] {est}+{slv}: {mixed} ({times[(est, slv)]:.0f} s)", flush=True)
            lines += [f"## {name}: {family} per-channel options", "",
                      f"Full precision {metric.label}: {baseline:.4f}.", ""]
            for m in metrics:
                hib = m.higher_is_better
                lines += [f"**{m.label}** ({'higher' if hib else 'lower'} is better)", "",
                          "| recipe | " + " | ".join(f"{b} bits" for b in BITS) + " | beats uniform at all 3 |"
                          + (" proxy Spearman | seconds |" if m is metric else ""),
                          "|---|" + "---|" * (len(BITS) + (3 if m is metric else 1))]
                u = uniform[m.name]
                lines.append("| uniform | " + " | ".join(fmt(v, m.name) for v in u) + " | - |"
                             + (" - | - |" if m is metric else ""))
                for key in recipes:
                    r = rows.get(key)
                    title = f"{key[0]} + {key[1]}" + (" (default)" if key == DEFAULT and family == "asymmetric" else "")
                    if isinstance(r, str):
                        lines.append(f"| {title} | {r} |" + " |" * (len(BITS) + (2 if m is metric else 0)))
                        continue
                    vals = r[m.name]
                    wins = [better(a, b, hib) for a, b in zip(vals, u)]
                    cells = [f"**{fmt(a, m.name)}**" if w else fmt(a, m.name) for a, w in zip(vals, wins)]
                    lines.append(f"| {title} | " + " | ".join(cells) + f" | {'yes' if all(wins) else 'no'} |"
                                 + (f" {proxy[key]:.3f} | {times[key]:.0f} |" if m is metric else ""))
                    if key == DEFAULT:
                        summary.append([name, family, m.label, "yes" if all(wins) else "no"])
                lines.append("")
    lines += ["## Summary: does the default recipe beat uniform at 3, 4 and 5 bits?", "",
              "| model | family | metric | beats uniform at all 3 |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in summary]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
