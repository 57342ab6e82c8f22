"""How many calibration batches does ``output-distance`` need before its plans stop changing?
(issue 24, item 3: the calibration size chosen by evidence, with error bars.)

``run``: one ``output-distance`` estimate on N calibration batches, keeping every batch's distances
(``estimator.batch_damage_``: ``[N, layers, options]``); written to ``calib_size_results/``.

``analyse``: for several orders of the N batches (the first as given, the others shuffled with a fixed
seed), after each batch b:

- the stopping rule's own figure (``stop_when_stable``): the bootstrap agreement of the greedy plans at
  the target sizes (:class:`mpsearch.sensitivity._od_stats.StableStop`, as the estimator runs it);
- the truth it stands for: the share of the weights on which the ILP plan (the default solver) from the
  first b batches agrees with the ILP plan from all N batches, at each target size (the worst size),
  and the regret: the all-N table's damage of the b-batch plan over that of the all-N plan, minus 1
  (the worst size). Plans from b close to N share most of their batches with the reference: read the
  rows up to N/2;
- where the rule would stop for agreement thresholds 0.9 / 0.95 / 0.99 (two checks in a row, from batch 4
  on), and the truth at that batch.

    OMP_NUM_THREADS=1 python experiments/calib_size.py run --model minilm            # CPU, ~5 min
    OMP_NUM_THREADS=1 python experiments/calib_size.py run --model smollm2 --blocks 0,9,19,29 \\
        --options int3-asym,int4-asym,int4-g32-asym,int8-asym --batches 16 --batch-size 4 --seq-len 64
    python experiments/calib_size.py analyse --model minilm        # ~1 min each, -> <model>.json
    python experiments/calib_size.py report                        # the tables of calib_size.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mpsearch import Budget, CostTable, get_estimator, get_solver, zoo  # noqa: E402
from mpsearch.options import DEFAULT_SEARCH_OPTIONS  # noqa: E402
from mpsearch.sensitivity._od_stats import STREAK, StableStop  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "calib_size_results"
THRESHOLDS = (0.9, 0.95, 0.99)
STABLE_FROM = (4, 8)  # stable_from: an early start, and the estimator's default


# ------------------------------------------------------------------------------------------ run
def load(args):
    """(model, batches, options, description)."""
    if args.model == "minilm":
        model, tok = zoo.load_minilm()
        lines = zoo.shakespeare_lines(args.batches * args.batch_size, "calib")
        batches = zoo.minilm_batches(lines, args.batch_size, args.seq_len or 64, tokenizer=tok)
        desc = (f"all-MiniLM-L6-v2, {args.batches} batches of {args.batch_size} Shakespeare passages (calibration "
                f"plays, at most {args.seq_len or 64} tokens), 1 - cosine of the token embeddings")
        return model, batches, args.options or DEFAULT_SEARCH_OPTIONS, desc, []
    if args.model == "smollm2":
        dtype = getattr(torch, args.dtype) if args.dtype else None
        model, tok = zoo.smollm2(device=args.device, dtype=dtype), zoo.smollm2_tokenizer()
        seq = args.seq_len or 64
        batches = zoo.token_windows(tok, zoo.shakespeare_text("calib"), seq, args.batches * args.batch_size,
                                    args.batch_size)
        blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else None
        n_blocks = model.config.num_hidden_layers
        exclude = [] if blocks is None else [rf"^model\.layers\.(?!({'|'.join(map(str, blocks))})\.)\d+\.",
                                             r"^lm_head$"]
        desc = (f"SmolLM2-135M ({args.dtype or 'float32'} on {args.device or 'cpu'}, from the zoo's Q4_1 GGUF), {args.batches} batches of {args.batch_size} windows x {seq} "
                f"tokens of the calibration plays, KL of the next-token distribution; planned: "
                + ("every layer" if blocks is None else f"the 7 linear layers of blocks {args.blocks} of {n_blocks}"))
        return model, batches, args.options or "llm", desc, exclude
    raise SystemExit(f"unknown model {args.model!r}: minilm or smollm2")


def run(args):
    torch.manual_seed(0)
    model, batches, options, desc, exclude = load(args)
    est = get_estimator("output-distance", options=options)
    t0 = time.perf_counter()
    table = est.estimate(model, batches, progress=sys.stderr.isatty(), exclude=exclude,
                         min_coverage=0.0 if exclude else 1.0)
    secs = time.perf_counter() - t0
    RESULTS.mkdir(exist_ok=True)
    table.write(RESULTS / f"{args.model}.csv")
    sizes = [float(_samples(b)) for b in batches]
    np.savez_compressed(RESULTS / f"{args.model}.npz", values=est.batch_damage_, sizes=np.array(sizes),
                        options=np.array(table.metadata["options"]))
    (RESULTS / f"{args.model}.run.json").write_text(json.dumps(
        {"model": args.model, "data": desc, "seconds": round(secs, 1), "batches": len(batches),
         "layers": len(table.layers), "options": table.metadata["options"], "threads": torch.get_num_threads(),
         "cost": {k: v for k, v in table.metadata["cost"].items() if isinstance(v, (int, float))}}, indent=1))
    print(f"{args.model}: {len(batches)} batches, {len(table.layers)} layers x {len(table.options)} options, "
          f"{secs:.0f} s", flush=True)


def _samples(batch) -> int:
    if isinstance(batch, dict):
        return int(batch["input_ids"].shape[0])
    return int((batch[0] if isinstance(batch, (tuple, list)) else batch).shape[0])


# -------------------------------------------------------------------------------------- analyse
def analyse(args):
    table = CostTable.read(RESULTS / f"{args.model}.csv")
    raw = np.load(RESULTS / f"{args.model}.npz")
    values, sizes, options = torch.from_numpy(raw["values"]), raw["sizes"], [str(o) for o in raw["options"]]
    N = values.shape[0]
    cols = [options.index(o) for o in table.options]
    params = table.layer_params()
    weights = np.array([params[n] for n in table.layers], dtype=float)
    caps = StableStop(table, options, agreement=1.0, min_batches=2).caps
    bits = [c / weights.sum() for c in caps]
    ilp = get_solver("ilp")

    def ilp_plans(damage):  # damage [L, K] in the estimator's option order
        frame = table.frame.copy()
        d = damage[:, cols]
        where = {(n, o): (i, k) for i, n in enumerate(table.layers) for k, o in enumerate(table.options)}
        frame["damage"] = [max(float(d[where[(r.layer, r.option)]]), 0.0) for r in frame.itertuples()]
        t = CostTable(frame, table.metadata)
        return [ilp.solve(t, Budget(constraints={"avg_bits": s})).plan for s in bits]

    def mean_of(idx):
        w = torch.tensor(sizes[idx], dtype=torch.float64)
        return ((w[:, None, None] * values[idx]).sum(0) / w.sum()).numpy()

    full_damage = mean_of(np.arange(N))
    ref = ilp_plans(full_damage)
    fd = dict(zip([(n, o) for n in table.layers for o in options], full_damage.reshape(-1)))

    def damage_of(plan):
        return sum(fd[(n, plan.option_name(n))] for n in plan.layers)

    def share(a, b):
        return float(sum(params[n] for n in a.layers if a.option_name(n) == b.option_name(n)) / weights.sum())

    orders = [np.arange(N)] + [np.random.default_rng(o).permutation(N) for o in range(1, args.orders)]
    curves = []
    for o, perm in enumerate(orders):
        rule = StableStop(table, options, agreement=1.0, min_batches=2, seed=0)
        rows = []
        for b in range(1, N + 1):
            idx = perm[:b]
            rule.after_batch(values[idx], list(sizes[idx]))
            plans = ilp_plans(mean_of(idx))
            rows.append({"batches": b, "samples": int(sizes[idx].sum()),
                         "bootstrap": rule.curve[-1]["agreement"] if b > 1 else None,
                         "truth": min(share(p, r) for p, r in zip(plans, ref)),
                         "regret": max(damage_of(p) / damage_of(r) - 1 for p, r in zip(plans, ref))})
        curves.append(rows)
        print(f"order {o}: " + " ".join(f"{r['batches']}:{r['truth']:.2f}" for r in rows[::4]), flush=True)
    doc = {**json.loads((RESULTS / f"{args.model}.run.json").read_text()), "sizes_avg_bits": bits,
           "orders": len(orders), "curves": curves, "stops": stops(curves)}
    (RESULTS / f"{args.model}.json").write_text(json.dumps(doc, indent=1))


def stops(curves) -> dict:
    """Per threshold, stable_from and order: the batch the rule stops at (two checks in a row; None:
    never) and the truth there."""
    out = {}
    for x, start in ((x, start) for start in STABLE_FROM for x in THRESHOLDS):
        out[f"{x}, from {start}"] = []
        for rows in curves:
            streak, hit = 0, None
            for r in rows:
                streak = streak + 1 if r["bootstrap"] is not None and r["bootstrap"] >= x else 0
                if r["batches"] >= start and streak >= STREAK:
                    hit = r
                    break
            out[f"{x}, from {start}"].append(None if hit is None else {k: hit[k] for k in ("batches", "samples", "truth", "regret")})
    return out


# ----------------------------------------------------------------------------------------- ties
def ties(args) -> list[str]:
    """Synthetic: 4 equal layers, two of them equally sensitive under 30% noise per batch (the plan at
    int4's size gives 8 bits to either): in how many of 20 runs of 40 batches does the rule stop,
    with one check or with two in a row?"""
    from mpsearch.layers import Layer
    from mpsearch.options import parse_options
    from mpsearch.sensitivity.base import build_table

    layers = [Layer(f"l{i}", "linear", (64, 64), 64 * 64, 64, 64) for i in range(4)]
    opts = parse_options("int2,int4,int8")
    table = build_table(layers, opts, np.zeros((4, 3)))
    lines = ["| stop_when_stable | stops with one check | stops with two in a row |", "|---|---|---|"]
    for x in (0.95, 0.99):
        one = two = 0
        for seed in range(20):
            rule = StableStop(table, [o.name for o in opts], agreement=x, min_batches=2)
            base = np.array([10.0, 10.0, 1.0, 0.1])[:, None] * np.array([1.0, 0.8, 0.0])
            v = base[None] * (1 + 0.3 * np.random.default_rng(seed).standard_normal((40, 4, 3)))
            v = torch.from_numpy(np.clip(v, 0, None))
            seen = [rule.after_batch(v[:b], [4] * b) is not None and b > 1 and rule.curve[-1]["agreement"] >= x
                    for b in range(1, 41)]  # seen[i]: the check after batch i + 1 reached x
            one += any(seen[3:])
            two += any(a and b for a, b in zip(seen[3:], seen[4:]))
        lines.append(f"| {x} | {one} of 20 | {two} of 20 |")
    return lines


# --------------------------------------------------------------------------------------- report
def report(args):
    lines = ["### Two equally sensitive layers (synthetic)", "",
             "4 layers of 64 x 64, options int2/int4/int8; two layers equally sensitive under 30% noise per batch "
             "(the plan at int4's size gives 8 bits to either of them): in how many of 20 runs of 40 batches "
             "does the rule stop (from batch 4), with one check at the threshold or with two in a row?", "",
             *ties(args), ""]
    for path in sorted(RESULTS.glob("*.json")):
        if path.name.count(".") > 1:  # <model>.run.json, the table's .csv.meta.json
            continue
        doc = json.loads(path.read_text())
        lines += [f"### {doc['model']}", "", f"{doc['data']}; {doc['layers']} layers x {len(doc['options'])} options "
                  f"({', '.join(doc['options'])}); target sizes {', '.join(f'{b:.3f}' for b in doc['sizes_avg_bits'])} "
                  f"bits per weight; the estimate of all {doc['batches']} batches took {doc['seconds']:.0f} s "
                  f"({doc['threads']} thread(s)); {doc['orders']} orders of the batches; raw: "
                  f"`calib_size_results/{doc['model']}.json`", "",
                  "| batches | samples | bootstrap agreement (rule) | agreement with the all-batch ILP plan | regret |",
                  "|---|---|---|---|---|"]
        N = doc["batches"]
        for b in sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64} & set(range(1, N + 1))):
            rows = [c[b - 1] for c in doc["curves"]]
            boot = [r["bootstrap"] for r in rows if r["bootstrap"] is not None]
            lines.append(f"| {b} | {rows[0]['samples']} | {_spread(boot)} | {_spread([r['truth'] for r in rows])} | "
                         f"{_spread([r['regret'] for r in rows], pct=True)} |")
        lines += ["", "Where the rule stops (two checks in a row, from batch `stable_from` on; `-`: not within "
                  f"the {N} batches), median [min, max] over the orders:", "",
                  "| stop_when_stable, stable_from | stops in | stop batch | agreement with the all-batch plan there | regret there |",
                  "|---|---|---|---|---|"]
        for x, hits in doc["stops"].items():
            ok = [h for h in hits if h]
            lines.append(f"| {x} | {len(ok)} of {len(hits)} | {_spread([h['batches'] for h in ok], fmt='{:.0f}')} | "
                         f"{_spread([h['truth'] for h in ok])} | {_spread([h['regret'] for h in ok], pct=True)} |")
        lines.append("")
    md = HERE / "calib_size.md"
    text = md.read_text()
    marker = "<!-- tables: written by `python experiments/calib_size.py report` -->"
    md.write_text(text.split(marker)[0] + marker + "\n\n" + "\n".join(lines))


def _spread(xs, pct=False, fmt=None) -> str:
    if not xs:
        return "-"
    f = fmt or ("{:.2%}" if pct else "{:.3f}")
    med, lo, hi = np.median(xs), min(xs), max(xs)
    return f"{f.format(med)} [{f.format(lo)}, {f.format(hi)}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("run", "analyse", "report"))
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batches", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--options", default=None)
    ap.add_argument("--blocks", default=None, help="smollm2: the blocks whose layers are planned (default all)")
    ap.add_argument("--orders", type=int, default=5, help="analyse: orders of the batches")
    ap.add_argument("--device", default=None, help="run, smollm2: cuda for the GPU")
    ap.add_argument("--dtype", default=None, help="run, smollm2: bfloat16 ...")
    ap.add_argument("--out", default=None, help="the results folder (default experiments/calib_size_results)")
    args = ap.parse_args()
    global RESULTS
    RESULTS = Path(args.out) if args.out else RESULTS
    {"run": run, "analyse": analyse, "report": report}[args.what](args)


if __name__ == "__main__":
    main()
