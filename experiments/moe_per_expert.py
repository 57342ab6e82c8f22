"""Per-tensor vs per-expert decisions for the ``mpsearch`` target on a trained MoE (issue 22).

The ``mpsearch`` target may give each expert of a stacked tensor its own option
(``estimate --per-expert``); llama.cpp and vLLM cannot (one type per stacked tensor, one scheme
per layer). Does deciding per expert buy anything at equal size? This script estimates both tables
with the same estimator, options and calibration windows, solves each with the ILP at the same
average bits per weight, applies the plans and measures the next-token KL divergence against the
full-precision model on held-out text (mpsearch's ``kld`` metric, the evaluation plays).

    MPSEARCH_MOE_DIR=/tmp/moe python experiments/moe_per_expert.py --bits 3,3.5,4,5 \
        --out experiments/moe_per_expert.json        # then --markdown for the table

The model is ``experiments/train_moe.py``'s (``$MPSEARCH_MOE_DIR/hf``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(args) -> list[dict]:
    import torch

    import mpsearch
    from mpsearch.apply import apply_plan
    from mpsearch.budget import Budget
    from mpsearch.metrics import make_metric
    from mpsearch.specs import eval_token_ids, load_calibration, load_model
    from mpsearch.zoo import shakespeare_text

    torch.manual_seed(0)
    hf = Path(os.environ.get("MPSEARCH_MOE_DIR", "/tmp/mpsearch_moe")) / "hf"
    model = load_model(str(hf))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calib, evals = work / "calib.txt", work / "eval.txt"
    calib.write_text(shakespeare_text("calib"))
    evals.write_text(shakespeare_text("eval", max_chars=400_000))
    batches = load_calibration(str(calib), model, str(hf), seq_len=args.seq_len, samples=args.samples)
    ids = eval_token_ids(str(evals), model, str(hf), eval_tokens=args.eval_tokens)
    metric = make_metric("kld", ids).fit(model)
    tables = {}
    for mode in ("per-tensor", "per-expert"):
        t0 = time.perf_counter()
        est = mpsearch.get_estimator(args.estimator, options=args.options)
        tables[mode] = est.estimate(model, batches, progress=False, per_expert=mode == "per-expert")
        print(f"{mode}: {len(tables[mode].layers)} layers, {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for bits in args.bits:
        for mode, table in tables.items():
            res = mpsearch.get_solver("ilp").solve(table, Budget(constraints={"avg_bits": bits}))
            q = apply_plan(model, res.plan)
            kl = float(metric(q))
            rows.append({"avg_bits_budget": bits, "mode": mode, "avg_bits": res.plan.predicted.get("avg_bits"),
                         "size_bits": res.plan.predicted.get("size_bits"), "predicted_damage": res.plan.predicted["damage"],
                         "kld": kl, "layers": len(table.layers)})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"model": str(hf), "estimator": args.estimator, "options": args.options, "seq_len": args.seq_len,
            "samples": args.samples, "eval_tokens": args.eval_tokens, "torch": torch.__version__,
            "mpsearch": mpsearch.__version__}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return rows


def markdown(path: Path) -> str:
    doc = json.loads(Path(path).read_text())
    by = {}
    for r in doc["rows"]:
        by.setdefault(r["avg_bits_budget"], {})[r["mode"]] = r
    lines = ["| budget (avg bits) | per-tensor: bits, KLD | per-expert: bits, KLD | per-expert / per-tensor KLD |",
             "|---|---|---|---|"]
    for b, m in sorted(by.items()):
        t, e = m["per-tensor"], m["per-expert"]
        lines.append(f"| {b} | {t['avg_bits']:.4f}, {t['kld']:.5f} | {e['avg_bits']:.4f}, {e['kld']:.5f} | "
                     f"{e['kld'] / t['kld']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--estimator", default="fisher")
    ap.add_argument("--options", default="2,3,4,5,6,8")
    ap.add_argument("--bits", type=lambda s: [float(x) for x in s.split(",")], default=[3.0, 3.5, 4.0, 5.0])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--work", default="/tmp/moe_per_expert")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "moe_per_expert.json"))
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(Path(args.out)))
        return
    run(args)


if __name__ == "__main__":
    main()
