"""Issue 10's remaining measurements on SmolLM2-135M (CPU, real weights), with mpsearch's own
causal-LM KL metric (``mpsearch.metrics.NextTokenKL``) on held-out Shakespeare (the eval split).

    python experiments/target_comparison.py vllm        # frontier --target vllm at uniform sizes
    python experiments/target_comparison.py gptqmodel   # frontier --target gptqmodel at uniform sizes
    python experiments/target_comparison.py llamacpp    # KL of experiments/llamacpp_e2e/plans/ vs the mixes
    python experiments/target_comparison.py report      # print the tables from the saved results

``vllm``/``gptqmodel`` run the CLI (``python -m mpsearch frontier --model smollm2 --target T``), which
solves with the ILP at the exact sizes of each uniform plan and measures the plans; the measured
rows (``uniform.csv``, ``recommended.csv``/``frontier.csv``) are copied to
``experiments/target_comparison/<run>/``. The work folder (the cost table cache, plans) stays in
``experiments/_cache/target_comparison/`` (ignored by git).

``llamacpp`` imports each tensor-type file of ``experiments/llamacpp_e2e/plans/`` with
``mpsearch.export.import_plan(path, "llama.cpp", layers=model)``, builds llama.cpp's Q3_K_M/Q4_K_M
mixes with ``mpsearch.targets.llamacpp_mixes.recipes_for_layers`` (the 210 block matrices; the
tied token embedding is not planned and stays fp32 in every row here, while in the GGUF files
llama.cpp stored it as q8_0), applies each with ``mpsearch.apply.apply_plan`` (the bit-exact torch
GGML quantizers of ``mpsearch.formats.ggml``) and measures the same metric on the same tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "target_comparison"
WORK = HERE / "_cache" / "target_comparison"

#: the sizes of the text (stated in the markdown): calibration windows x tokens, evaluation tokens
SEQ_LEN, CALIB, EVAL_TOKENS = 128, 8, 8192

RUNS = {
    "vllm": ["--target", "vllm", "--bits", "w4a16-g128,w4a16-g32,w8a16,keep"],
    "gptqmodel": ["--target", "gptqmodel", "--bits", "gptq-int3-g128,gptq-int4-g128,gptq-int8-g128,keep"],
}


def run_frontier(target: str, estimator: str, extra=()) -> Path:
    name = f"smollm2-{target}-{estimator}"
    work = WORK / name
    cmd = [sys.executable, "-m", "mpsearch", "frontier", "--model", "smollm2", *RUNS[target],
           "--estimator", estimator, "--solver", "ilp", "--validate", "0", "--refine", "0", "--points", "4",
           "--seq-len", str(SEQ_LEN), "--calib-samples", str(CALIB), "--eval-tokens", str(EVAL_TOKENS),
           *extra, "-o", str(work)]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    dest = RESULTS / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("uniform.csv", "recommended.csv", "frontier.csv", "summary.json", "run.json"):
        if (work / f).exists():
            shutil.copy(work / f, dest / f)
    (dest / "command.txt").write_text(" ".join(cmd[1:]).replace(str(work), "OUT") +
                                      f"\n# wall time {time.time() - t0:.0f} s\n")
    return dest


def _mix_plan(choice: dict):
    from mpsearch.options import parse_option
    from mpsearch.plan import BitPlan

    opts = {n: {**parse_option(o).to_dict(), "name": o} for n, o in choice.items()}
    return BitPlan(bits={n: int(parse_option(o).bits) for n, o in choice.items()}, options=opts,
                   provenance={"solver": "recipe"})


def _plan_bits(plan, layers) -> tuple[int, dict]:
    """Storage bits of ``plan`` over ``layers`` as llama.cpp stores them, and the type counts."""
    from collections import Counter

    from mpsearch.targets.llamacpp_mixes import type_nbytes

    shapes = {lay.name: (int(lay.out_channels), int(lay.in_features)) for lay in layers}
    total, counts = 0, Counter()
    for n in plan.bits:
        t = plan.option(n).name
        counts[t] += 1
        total += 8 * type_nbytes(t, shapes[n])  # torch order (out, in)
    return total, dict(counts.most_common())


def llamacpp(only: str | None = None) -> None:
    """``only``: measure just the plans whose name holds this text, keeping the other rows of
    ``llamacpp.json`` (same model, metric and evaluation tokens)."""
    import torch

    from mpsearch.apply import apply_plan
    from mpsearch.export import import_plan
    from mpsearch.layers import discover_layers
    from mpsearch.plan import BitPlan
    from mpsearch.specs import load_metric, load_model, tokenizer_for
    from mpsearch.targets.llamacpp_mixes import recipes_for_layers

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("MPSEARCH_THREADS", "1")))
    net = load_model("smollm2")
    tok = tokenizer_for("smollm2")
    metric = load_metric(None, "shakespeare", net, "smollm2", eval_tokens=EVAL_TOKENS, seq_len=SEQ_LEN,
                         tokenizer=tok)
    metric.fit(net)
    # the tied lm_head is the token embedding: llama.cpp does not plan it (nor do these plans)
    layers = [lay for lay in discover_layers(net) if lay.name != "lm_head"]
    mixes = recipes_for_layers(layers, ("Q3_K_M", "Q4_K_M"))
    plans = {f"llama.cpp {k}": _mix_plan(v) for k, v in zip(("Q3_K_M", "Q4_K_M"), mixes.values())}
    for path in sorted((HERE / "llamacpp_e2e" / "plans").glob("smollm2-mpsearch-*.txt")):
        plan = import_plan(path, "llama.cpp", layers=net)
        keep = [n for n in plan.bits if n in {lay.name for lay in layers}]  # not model.embed_tokens (q8_0)
        plans[path.stem.replace("smollm2-", "")] = plan.subset(keep) if hasattr(plan, "subset") else BitPlan(
            bits={n: plan.bits[n] for n in keep}, options={n: plan.options[n] for n in keep if n in plan.options})
    out = {"eval_tokens": EVAL_TOKENS, "window": SEQ_LEN, "baseline": float(metric(net)),
           "baseline_values": dict(metric.values), "plans": {}}
    print("fp32", out["baseline_values"], flush=True)
    old = RESULTS / "llamacpp.json"
    if only and old.exists():
        prev = json.loads(old.read_text())
        if (prev["eval_tokens"], prev["window"]) == (EVAL_TOKENS, SEQ_LEN):
            out["plans"] = prev["plans"]
        plans = {k: v for k, v in plans.items() if only in k}
    e2e = _e2e_kld()
    for name in out["plans"]:  # llama-perplexity's numbers for the rows kept
        out["plans"][name]["llama_perplexity"] = e2e.get(name)
    for name, plan in plans.items():
        t0 = time.time()
        q = apply_plan(net, plan)
        value = float(metric(q))
        bits, counts = _plan_bits(plan, layers)
        row = {"kld": value, **{k: float(v) for k, v in metric.values.items()}, "layers": len(plan.bits),
               "block_bits": bits, "types": counts, "llama_perplexity": e2e.get(name)}
        out["plans"][name] = row
        print(f"{name}: {row} ({time.time() - t0:.0f} s)", flush=True)
        del q
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "llamacpp.json").write_text(json.dumps(out, indent=1))


def llamacpp_uniform(uniform=("q4_0", "iq4_nl", "q5_0"), at=("q4_0", "q5_0"), refine_rounds: int = 0,
                     method: str = "both", swaps: int = 4, device: str = "cpu", time_limit: float | None = None,
                     ladder=(2048, 8192, 32768), tag: str = "") -> None:
    """Issue 14 with a target: the default recipe's llama.cpp table (output-distance, q4_1 dropped)
    solved by the ILP at the exact size of uniform ``at`` types, against the measured uniform plans
    (the best that fits), on the same metric and tokens as :func:`llamacpp`.

    ``method="evolve"``: the refinement is the measured evolutionary search, its children measured on
    ``ladder`` tokens of the calibration plays (windows of ``SEQ_LEN``; the evaluation plays are only
    used for the result), ``refine_rounds`` generations or ``time_limit`` seconds per size; results
    go to ``llamacpp_evolve{tag}.json``."""
    import torch

    from mpsearch.apply import apply_plan
    from mpsearch.budget import Budget
    from mpsearch.pipeline import uniform_plans
    from mpsearch.solvers import get_solver
    from mpsearch.specs import load_metric, load_model, tokenizer_for
    from mpsearch.table import CostTable

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("MPSEARCH_THREADS", "1")))
    table = CostTable.read(HERE / "llamacpp_e2e" / "tables" / "smollm2-llamacpp-output-distance.csv")
    table = table.with_frame(table.frame[table.frame["option"] != "q4_1"])
    net = load_model("smollm2", device=device)
    metric = load_metric(None, "shakespeare", net, "smollm2", eval_tokens=EVAL_TOKENS, seq_len=SEQ_LEN,
                         tokenizer=tokenizer_for("smollm2"))
    metric.fit(net)
    uni = uniform_plans(table, "size_bits")
    out = {"eval_tokens": EVAL_TOKENS, "window": SEQ_LEN, "table": "llamacpp_e2e/tables/smollm2-llamacpp-output-distance.csv",
           "dropped": ["q4_1"], "uniform": {}, "mixed": {}, "device": device}
    dest = RESULTS / (f"llamacpp_evolve{tag}.json" if method == "evolve" else "llamacpp_uniform.json")

    def measure(plan):
        value = float(metric(apply_plan(net, plan)))
        return {"kld": value, **{k: float(v) for k, v in metric.values.items()}}

    for opt in uniform:
        plan, bits = uni[opt]
        out["uniform"][opt] = {"size_bits": bits, **measure(plan)}
        print(opt, out["uniform"][opt], flush=True)
        dest.write_text(json.dumps(out, indent=1))
    mixed_plans = {}
    for opt in at:
        bits = uni[opt][1]
        res = get_solver("ilp").solve(table, Budget(constraints={"size_bits": bits}))
        from collections import Counter

        types = Counter(res.plan.option_name(n) for n in res.plan.bits)
        out["mixed"][opt] = {"budget_size_bits": bits, "size_bits": float(res.plan.predicted["size_bits"]),
                             "types": dict(types), **measure(res.plan)}
        mixed_plans[opt] = res.plan
        fits = [u for u in out["uniform"].values() if u["size_bits"] <= bits]
        best = min(u["kld"] for u in fits)
        out["mixed"][opt]["best_uniform_kld"] = best
        out["mixed"][opt]["gap_closed"] = 1 - out["mixed"][opt]["kld"] / best
        print("at", opt, out["mixed"][opt], flush=True)
        dest.write_text(json.dumps(out, indent=1))
    if refine_rounds:  # measured refinement at the same sizes (mpsearch.refine), uniform plans in the history
        from mpsearch.refine import refine

        history = [(uni[o][0], out["uniform"][o]["kld"]) for o in uniform]
        history += [(mixed_plans[o], out["mixed"][o]["kld"]) for o in at]
        t0 = time.time()
        kw, search = {"swaps": swaps}, None
        if method == "evolve":
            from mpsearch.metrics import make_metric
            from mpsearch.pipeline import SearchLadder
            from mpsearch.zoo import shakespeare_text

            ids = tokenizer_for("smollm2")(shakespeare_text("calib", max_chars=600_000), return_tensors="pt").input_ids[0]
            rungs = [make_metric("kld", ids[:n], window=SEQ_LEN, batch_size=64) for n in ladder]
            search = SearchLadder(net, table.layers, rungs)
            kw = {"search": search, "levels": len(rungs), "time_limit": time_limit, "seed": 0}
            out["search"] = {"tokens": [int(min(n, ids.numel())) for n in ladder], "window": SEQ_LEN,
                             "text": "calibration plays", "time_limit": time_limit}

        def evaluate(plan):
            if search is not None:
                search.restore()
            return measure(plan)["kld"]

        ref = refine(table, get_solver("ilp"), {o: uni[o][1] for o in at}, history, evaluate,
                     rounds=refine_rounds, method=method, key="size_bits", **kw)
        for opt in at:
            plan, loss = ref.best[opt]
            m = out["mixed"][opt]
            rows = [r for r in ref.log if r["budget"] == opt and r.get("data") != "search"]
            m["refined"] = {"method": method, "rounds": refine_rounds, "swaps": swaps, "kld": loss,
                            "evals": int(sum(r["evals"] for r in rows)),
                            "gap_closed": 1 - loss / m["best_uniform_kld"], "seconds": time.time() - t0}
            if method == "evolve":
                m["refined"].update({k: rows[-1][k] for k in ("round", "search_loss_before", "search_loss_after")})
                m["refined"].update({f"{k}": v for k, v in measure(plan).items() if k != "kld"})
            print("refined at", opt, m["refined"], flush=True)
        dest.write_text(json.dumps(out, indent=1))


def _e2e_kld() -> dict:
    """llama-perplexity's mean KLD and same-top-p % of the same plans (experiments/llamacpp_e2e/*.json)."""
    found = {}
    for f in sorted((HERE / "llamacpp_e2e").glob("*.json")):
        for r in json.loads(f.read_text()):
            if r.get("mean_kld") is None or not r["label"].startswith("smollm2-"):
                continue
            label = r["label"][len("smollm2-"):]
            name = f"llama.cpp {label}" if label in ("Q3_K_M", "Q4_K_M") else label
            found[name] = {"kld": r["mean_kld"], "same_top_p_pct": r["same_top_p_pct"]}
    return found


def report() -> None:
    import pandas as pd

    for d in sorted(RESULTS.glob("smollm2-*")):
        print(f"## {d.name}")
        for f in ("uniform.csv", "recommended.csv"):
            if (d / f).exists():
                print(f, "\n", pd.read_csv(d / f).to_string(), "\n")
    if (RESULTS / "llamacpp.json").exists():
        doc = json.loads((RESULTS / "llamacpp.json").read_text())
        print("fp32:", doc["baseline_values"])
        for name, r in doc["plans"].items():
            print(f"{name:55s} kld {r['kld']:.4f} top1 {r['top1']:.1f} ppl {r['perplexity']:.2f} "
                  f"bits {r['block_bits']} llama-perplexity {r['llama_perplexity']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["vllm", "gptqmodel", "llamacpp", "llamacpp-uniform", "report"])
    p.add_argument("--estimator", default="weight-error")
    p.add_argument("--only", help="llamacpp: measure only the plans whose name holds this text")
    p.add_argument("--refine", type=int, default=0, help="llamacpp-uniform: rounds of measured refinement")
    p.add_argument("--method", default="both", help="llamacpp-uniform: the refinement method (both, evolve...)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--time-limit", type=float, default=None, help="llamacpp-uniform --method evolve: seconds per size")
    p.add_argument("--at", default="q4_0,q5_0", help="llamacpp-uniform: the uniform types whose sizes are solved at")
    p.add_argument("--ladder", default="2048,8192,32768", help="llamacpp-uniform --method evolve: search tokens")
    p.add_argument("--tag", default="", help="llamacpp-uniform --method evolve: results file suffix")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more frontier flags")
    a = p.parse_args()
    if a.what in RUNS:
        run_frontier(a.what, a.estimator, a.extra)
    elif a.what == "llamacpp":
        llamacpp(a.only)
    elif a.what == "llamacpp-uniform":
        llamacpp_uniform(at=tuple(a.at.split(",")), refine_rounds=a.refine, method=a.method, device=a.device,
                         time_limit=a.time_limit, ladder=tuple(int(x) for x in a.ladder.split(",")), tag=a.tag)
    else:
        report()


if __name__ == "__main__":
    main()
