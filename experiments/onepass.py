"""The ``response`` estimator (a few measured probes per layer, the rest fitted) against the full
``output-distance`` table, by the MEASURED quality of their plans at equal size (issue 24, items 1 and 3).

For each model: both tables on the same calibration data (``response`` in its variants), the ILP plan
of each at the exact sizes of uniform int3/int4/int5/int6-asym, each plan applied and measured on
held-out data, and the best measured uniform plan that fits each size. ``gap closed`` = 1 -
loss(plan) / loss(best uniform that fits), loss = the metric's distance to full precision (KL per
token / image, 1 - cosine), as in measured_loop.py. Also: how well each ``response`` table predicts
output-distance's measured damage of the options it did not probe (per layer x option, log ratio),
and the estimators' cost (seconds in this run, suffix block evaluations).

``calibration`` (item 3): the ``response`` estimator on many small calibration batches, then a
bootstrap over the batches at n = 1, 2, 4 ... batches: the plan at each target size re-solved from the
resampled table, and the fraction of layers whose option differs from the plan of all batches, with
the rank correlation of the resampled damage with the full one.

    python experiments/onepass.py compare --model fashion-cnn        # CPU, ~3 min
    python experiments/onepass.py compare --model minilm             # CPU, ~10 min
    python experiments/onepass.py compare --model smollm2            # CPU, see the .md for sizes
    python experiments/onepass.py calibration --model smollm2
    python experiments/onepass.py report                             # results -> onepass.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mpsearch import zoo  # noqa: E402
from mpsearch.budget import Budget  # noqa: E402
from mpsearch.options import DEFAULT_SEARCH_OPTIONS, LLM_SEARCH_OPTIONS  # noqa: E402
from mpsearch.pipeline import _MeasureCache, _metric_key, measure, uniform_plans  # noqa: E402
from mpsearch.registry import get_estimator, get_solver  # noqa: E402
from mpsearch.sensitivity.base import EstimatorWarning  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "onepass_results"
TARGETS = ["int3-asym", "int4-asym", "int5-asym", "int6-asym"]
WORK = Path(os.environ.get("ONEPASS_WORK", "/tmp/onepass"))

#: label -> (estimator, settings): the tables compared
VARIANTS = {
    "output-distance": ("output-distance", {}),
    "response": ("response", {}),
    "response (noise probes)": ("response", {"probe_kind": "noise"}),
    "response (3 probes, power fit)": ("response", {"probes": 3, "fit": "power"}),
    "fisher": ("fisher", {}),
}
#: what ``compare`` runs unless --variants says otherwise
DEFAULT_VARIANTS = "output-distance;response;response (noise probes);fisher"


# ------------------------------------------------------------------------------ models
def load(name, args):
    """``(model, calibration batches, metric, options, description)``."""
    torch.manual_seed(0)
    if name == "fashion-cnn":
        from mpsearch.metrics import KLDivergence

        model = zoo.fashion_mnist_cnn(progress=False)
        calib = zoo.fashion_batches("train", n=args.calib_n or 256, batch_size=args.batch or 128)
        evals = zoo.fashion_batches("test", n=10000, batch_size=1000)
        return (model, calib, KLDivergence(evals), DEFAULT_SEARCH_OPTIONS,
                f"calibration {args.calib_n or 256} train images (batches of {args.batch or 128}), evaluation "
                f"the 10,000 test images, KL to fp32")
    if name == "minilm":
        from mpsearch.metrics import EmbeddingCosine

        model, tok = zoo.load_minilm()
        n, b = args.calib_n or 16, args.batch or 16
        calib = zoo.minilm_batches(zoo.shakespeare_lines(n, "calib"), b, 48, tokenizer=tok)
        evals = zoo.minilm_batches(zoo.shakespeare_lines(args.eval_n, "eval", seed=1), 32, 48, tokenizer=tok)
        return (model, calib, EmbeddingCosine(evals), DEFAULT_SEARCH_OPTIONS,
                f"calibration {n} passages of the calibration plays (batches of {b}), evaluation {args.eval_n} "
                f"passages of other plays, loss 1 - embedding cosine")
    if name == "smollm2":
        from mpsearch.metrics import NextTokenKL

        model = zoo.smollm2(device=args.device, dtype="float32")
        tok = zoo.smollm2_tokenizer()
        n, seq, b = args.calib_n or 1, args.seq_len, args.batch or 1
        calib = zoo.token_windows(tok, zoo.shakespeare_text("calib", 400_000), seq, n, b)
        ids = zoo.token_stream(tok, zoo.shakespeare_text("eval", 400_000), args.eval_tokens)
        return (model, calib, NextTokenKL(ids, window=512, batch_size=8), LLM_SEARCH_OPTIONS,
                f"calibration {n} window(s) of {seq} tokens from the start of the calibration plays (batches of "
                f"{b}), evaluation {args.eval_tokens} tokens of other plays (windows of 512), KL to fp32; options: "
                f"the llm preset")
    raise SystemExit(f"unknown model {name!r}")


#: response tables built from the output-distance table (every option measured) and the relative errors
#: t of the ``response`` run on the same data: exactly what the estimator computes with these probes
#: (rounding probes, measured values kept), without running it once per variant. ``rotate``: each layer
#: probes the anchor option and one more, in turn over the other options, and a factor per option
#: shared by all layers corrects the fit (log d = a_layer + c_option + log t).
SIMULATED = {
    "probes int3, int6 (the default's)": {"probes": ["int3-asym", "int6-asym"]},
    "probes int3, int5": {"probes": ["int3-asym", "int5-asym"]},
    "probes int4, int6": {"probes": ["int4-asym", "int6-asym"]},
    "probes int3, int4-g64, int5": {"probes": ["int3-asym", "int4-g64-asym", "int5-asym"]},
    "probes int3, int4, int5 (3, power fit)": {"probes": ["int3-asym", "int4-asym", "int5-asym"], "fit": "power"},
    "probe int4 (1)": {"probes": ["int4-asym"]},
    "rotating, anchor int4, option factors": {"rotate": "int4-asym"},
}


def estimate(label, model, calib, options, work, device, repeats=1):
    """The table of ``label`` and the wall seconds of each of ``repeats`` fresh runs (no estimator cache:
    every run does all its work), the raw probe numbers of a response run."""
    name, settings = VARIANTS[label]
    times, table, raw = [], None, None
    for _ in range(repeats):
        est = get_estimator(name, options=options, device=device, **settings)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EstimatorWarning)
            table = est.estimate(model, calib, progress=sys.stderr.isatty())
        times.append(time.perf_counter() - t0)
        raw = getattr(est, "measurements_", None)
    return table, times, raw


def simulated(od, raw, spec):
    """The response table ``spec`` would give, from output-distance's table and the run's relative errors
    (``None`` when a probe is not among the options)."""
    from mpsearch.sensitivity.response import fit_table

    opts, layers, t = raw["options"], raw["layers"], raw["t"]
    idx = {o: k for k, o in enumerate(opts)}
    od_d = od.frame.set_index(["layer", "option"])["damage"]
    D = np.array([[od_d.get((lay, o), 0.0) if o != "keep" else 0.0 for o in opts] for lay in layers])
    L = len(layers)
    if "probes" in spec:
        if any(p not in idx for p in spec["probes"]):
            return None
        pk = [[idx[p] for p in spec["probes"]] for _ in range(L)]
        d = np.stack([D[i, pk[i]] for i in range(L)])
        tp = np.stack([t[i, pk[i]] for i in range(L)])
        dmg = fit_table(d, t, tp, pk, [[]] * L, spec.get("fit", "linear"), True, False)[0]
    else:
        a = idx.get(spec["rotate"])
        if a is None:
            return None
        others = [k for k, o in enumerate(opts) if o != "keep" and k != a]
        pk = [[a, others[(3 * i) % len(others)]] for i in range(L)]
        r = np.log(np.maximum(D, 1e-300) / np.where(t > 0, t, 1.0))
        c = np.zeros(len(opts))
        for o in others:
            ls = [i for i in range(L) if pk[i][1] == o and D[i, o] > 0 and D[i, a] > 0]
            c[o] = np.mean([r[i, o] - r[i, a] for i in ls]) if ls else 0.0
        dmg = np.zeros_like(D)
        for i in range(L):
            dmg[i] = t[i] * np.exp(np.mean([r[i, k] - c[k] for k in pk[i]]) + c)
            dmg[i, pk[i]] = D[i, pk[i]]
    frame = od.frame.copy()
    where = {(lay, o): (i, k) for i, lay in enumerate(layers) for k, o in enumerate(opts)}
    frame["damage"] = [0.0 if r.option == "keep" else max(float(dmg[where[(r.layer, r.option)]]), 0.0)
                       for r in frame.itertuples()]
    meta = {**od.metadata, "response": {"layers": {lay: {"probes": [opts[k] for k in pk[i]]}
                                                   for i, lay in enumerate(layers)}}}
    return od.__class__(frame, meta)


def prediction_error(table, od) -> dict:
    """log(damage / output-distance's damage) over the (layer, option) rows the response table did
    not measure (both > 0), and per layer the share of option pairs they order alike."""
    probes = {k: set(v["probes"]) for k, v in table.metadata.get("response", {}).get("layers", {}).items()}
    a, b = table.frame.set_index(["layer", "option"])["damage"], od.frame.set_index(["layer", "option"])["damage"]
    logs, alike, pairs = [], 0, 0
    for layer in table.layers:
        opts = [o for o in table.options if o != "keep" and (layer, o) in a.index]
        held = [o for o in opts if o not in probes.get(layer, set())]
        for o in held:
            if a[(layer, o)] > 0 and b[(layer, o)] > 0:
                logs.append(float(np.log(a[(layer, o)] / b[(layer, o)])))
        for i, o1 in enumerate(opts):
            for o2 in opts[i + 1:]:
                pairs += 1
                alike += (a[(layer, o1)] - a[(layer, o2)]) * (b[(layer, o1)] - b[(layer, o2)]) > 0
    logs = np.array(logs)
    if not len(logs):
        return {}
    return {"rows": len(logs), "rms_log": float(np.sqrt(np.mean(logs**2))), "median_log": float(np.median(logs)),
            "within_2x": float(np.mean(np.abs(logs) < np.log(2))), "pairs_ordered_alike": alike / max(pairs, 1)}


def compare(args):
    model, calib, metric, options, desc = load(args.model, args)
    work = WORK / args.model
    work.mkdir(parents=True, exist_ok=True)
    doc = {"model": args.model, "data": desc, "device": args.device, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "load_before": os.getloadavg()[0], "tables": {}, "rows": []}
    tables, raws = {}, {}
    for label in args.variants.split(";"):
        table, times, raws[label] = estimate(label, model, calib, options, work, args.device, args.repeats)
        tables[label] = table
        cost = table.metadata["cost"]
        secs = float(np.median(times))
        doc["tables"][label] = {"seconds": secs, "seconds_runs": times, "cost": cost, "response": {
            k: v for k, v in table.metadata.get("response", {}).items() if k != "layers"}}
        print(f"{label}: {secs:.0f} s {cost}", flush=True)
    od = tables.get("output-distance")
    if od is not None and raws.get("response") is not None and args.simulate:
        for label, spec in SIMULATED.items():
            table = simulated(od, raws["response"], spec)
            if table is not None:
                tables[f"sim: {label}"] = table
                doc["tables"][f"sim: {label}"] = {"seconds": None, "cost": {}, "simulated": spec}
    for label, table in tables.items():
        if od is not None and label != "output-distance":
            doc["tables"][label]["prediction"] = prediction_error(table, od)
    metric.fit(model)
    baseline = float(metric(model))
    cache = _MeasureCache(work / "measured.json", json.dumps({"metric": _metric_key(metric), "base": repr(baseline)}))
    ref = next(iter(tables.values()))
    uniform = uniform_plans(ref)
    doc["uniform"] = []
    for opt, (plan, bits) in uniform.items():
        if bits > uniform[TARGETS[-1]][1] + 1e-9:
            continue
        q = measure(model, plan, metric, cache)["quality"]
        doc["uniform"].append({"option": opt, "avg_bits": bits, "loss": metric.loss(q, baseline)})
        print(f"uniform {opt}: {doc['uniform'][-1]['loss']:.4g}", flush=True)
    ilp = get_solver("ilp")
    for t in TARGETS:
        size = uniform[t][1]
        fits = [u for u in doc["uniform"] if u["avg_bits"] <= size + 1e-9]
        best = min(fits, key=lambda u: u["loss"])
        for label, table in tables.items():
            plan = ilp.solve(table, Budget(constraints={"avg_bits": size})).plan
            r = measure(model, plan, metric, cache)
            loss = metric.loss(r["quality"], baseline)
            doc["rows"].append({"estimator": label, "target": t, "avg_bits": size, "plan_avg_bits": r["avg_bits"],
                                "loss": loss, "best_uniform": best["option"], "uniform_loss": best["loss"],
                                "gap_closed": 1 - loss / best["loss"] if best["loss"] > 0 else float("nan"),
                                "options": {n: plan.option_name(n) for n in plan.layers}})
            print(f"{t} {label}: {loss:.4g} (uniform {best['option']} {best['loss']:.4g}, "
                  f"gap {100 * doc['rows'][-1]['gap_closed']:.1f}%)", flush=True)
    doc["load_after"] = os.getloadavg()[0]
    save(doc, f"{args.model}{args.tag}")


# ------------------------------------------------------------------------------ calibration size
def calibration(args):
    """Bootstrap over calibration batches of the response table's plans (item 3)."""
    model, calib, metric, options, desc = load(args.model, args)
    work = WORK / f"{args.model}-calibration"
    est = get_estimator("response", options=options, cache_dir=str(work / "cache"))
    t0 = time.perf_counter()
    table = est.estimate(model, calib, progress=sys.stderr.isatty())
    secs = time.perf_counter() - t0
    rows = bootstrap_plans(table, est, samples_per_batch(calib), args.resamples)
    doc = {"model": args.model, "data": desc, "seconds": secs, "batches": len(calib), "resamples": args.resamples,
           "cost": table.metadata["cost"], "rows": rows}
    save(doc, f"{args.model}-calibration{args.tag}")


def samples_per_batch(calib) -> float:
    """Tokens per batch for token batches, samples otherwise."""
    def n(b):
        if isinstance(b, dict) and "input_ids" in b:
            return b["input_ids"].numel()
        return (b[0] if isinstance(b, (tuple, list)) else b).shape[0]
    return float(np.mean([n(b) for b in calib]))


def bootstrap_plans(table, est, per_batch, resamples=20, seed=0, targets=TARGETS) -> list[dict]:
    """For n = 1, 2, 4 ... batches (resampled with replacement from the run's batches): the response
    table refitted from the resampled probe distances (the relative errors t stay those of all the
    batches), its ILP plan at each target size, the share of layers whose option differs from the plan
    of all the batches, the regret (the full table's damage of the resampled plan over that of the full
    plan, minus 1) and the Spearman correlation of the resampled damage with the full one."""
    from scipy.stats import spearmanr

    from mpsearch.sensitivity.response import fit_table

    raw = est.measurements_
    d, wb = raw["d"], raw["weights"]
    measured = est.measured_probes and est.probe_kind == "rounding"
    B = d.shape[0]
    rng = np.random.default_rng(seed)
    ilp = get_solver("ilp")
    uniform = uniform_plans(table)
    sizes = {tg: uniform[tg][1] for tg in targets}
    where = {(lay, o): (i, k) for i, lay in enumerate(raw["layers"]) for k, o in enumerate(raw["options"])}
    rows_ix = [where[(r.layer, r.option)] for r in table.frame.itertuples()]
    keep = (table.frame["option"] == "keep").to_numpy()
    full_damage = table.frame.set_index(["layer", "option"])["damage"]

    def table_from(idx):
        w = wb[idx]
        mean = (w[:, None, None] * d[idx]).sum(0) / w.sum()
        dmg = fit_table(mean, raw["t"], raw["t_probe"], raw["probes"], raw["direct"], est.fit, measured,
                        raw["floor"])[0]
        frame = table.frame.copy()
        frame["damage"] = np.where(keep, 0.0, np.clip([dmg[i, k] for i, k in rows_ix], 0, None))
        return table.__class__(frame, table.metadata)

    def damage_of(plan):
        return sum(full_damage[(n, plan.option_name(n))] for n in plan.layers)

    full = {tg: ilp.solve(table, Budget(constraints={"avg_bits": s})).plan for tg, s in sizes.items()}
    rows = []
    for n in sorted({n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n < B} | {B}):
        for r in range(resamples):
            tb = table_from(rng.choice(B, size=n, replace=True))
            rho = float(spearmanr(tb.frame["damage"], table.frame["damage"]).statistic)
            for tg, s in sizes.items():
                plan = ilp.solve(tb, Budget(constraints={"avg_bits": s})).plan
                changed = float(np.mean([plan.option_name(x) != full[tg].option_name(x) for x in plan.layers]))
                regret = float(damage_of(plan) / damage_of(full[tg]) - 1)
                rows.append({"batches": n, "tokens": int(n * per_batch), "resample": r, "target": tg,
                             "changed": changed, "regret": regret, "spearman": rho})
        sel = [x for x in rows if x["batches"] == n]
        print(f"n={n}: changed {np.mean([x['changed'] for x in sel]):.3f}, regret "
              f"{np.mean([x['regret'] for x in sel]):.4f}", flush=True)
    return rows


# ------------------------------------------------------------------------------ files
def save(doc, stem) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{stem}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=float))
    tmp.replace(path)
    print(f"wrote {path}")
    return path


def _model_section(f, doc) -> list[str]:
    measured = [k for k, t in doc["tables"].items() if t.get("seconds") is not None]
    simulated = [k for k in doc["tables"] if k not in measured]
    row = {(x["estimator"], x["target"]): x for x in doc["rows"]}
    lines = [f"### {doc['model']}", "", doc["data"] + f"; {doc.get('threads', '?')} thread(s), device "
             f"{doc['device']}, machine load average {doc.get('load_before', 0):.1f} before and "
             f"{doc.get('load_after', 0):.1f} after; raw: `{f.relative_to(HERE)}`", "",
             "Measured loss of each table's ILP plan at the size of the uniform plan (gap closed against the best "
             "measured uniform plan that fits):", "",
             "| estimator | " + " | ".join(TARGETS) + " |", "|---|" + "---|" * len(TARGETS)]
    for label in measured:
        lines.append(f"| {label} | " + " | ".join(
            f"{row[(label, tg)]['loss']:.4g} ({100 * row[(label, tg)]['gap_closed']:.1f}%)" for tg in TARGETS) + " |")
    lines.append("| best uniform that fits | " + " | ".join(
        f"{row[(measured[0], tg)]['best_uniform']} {row[(measured[0], tg)]['uniform_loss']:.4g}" for tg in TARGETS)
        + " |")
    od = doc["tables"].get("output-distance", {}).get("seconds")
    lines += ["", "Cost, same process, one after another (median of the runs; each run fresh, no estimator cache):",
              "", "| estimator | seconds (median) | runs (s) | output-distance / this | suffix passes | block "
              "evaluations | prediction of unprobed options vs output-distance: rms log ratio, within 2x, option "
              "pairs ordered alike | fit_error median / p90 |", "|---|---|---|---|---|---|---|---|"]
    for label in measured:
        t = doc["tables"][label]
        p = t.get("prediction") or {}
        pred = f"{p['rms_log']:.2f}, {100 * p['within_2x']:.0f}%, {100 * p['pairs_ordered_alike']:.0f}%" if p else "-"
        r = t.get("response") or {}
        fe = f"{r['fit_error_median']:.2f} / {r['fit_error_p90']:.2f}" if r.get("fit_error_median") is not None else "-"
        c = t["cost"]
        runs = ", ".join(f"{x:.1f}" for x in t.get("seconds_runs", [t["seconds"]]))
        ratio = f"{od / t['seconds']:.2f}" if od else "-"
        lines.append(f"| {label} | {t['seconds']:.1f} | {runs} | {ratio} | {c.get('suffix_passes', '-')} | "
                     f"{c.get('block_evaluations', '-')} | {pred} | {fe} |")
    if simulated:
        lines += ["", "Response tables built from output-distance's table and the response run's relative errors "
                  "(what the estimator computes with these probes, without running it; no time of their own): "
                  "measured loss (gap closed) and prediction as above:", "",
                  "| variant | " + " | ".join(TARGETS) + " | prediction |", "|---|" + "---|" * (len(TARGETS) + 1)]
        for label in simulated:
            p = doc["tables"][label].get("prediction") or {}
            pred = (f"{p['rms_log']:.2f}, {100 * p['within_2x']:.0f}%, {100 * p['pairs_ordered_alike']:.0f}%"
                    if p else "-")
            lines.append(f"| {label[5:]} | " + " | ".join(
                f"{row[(label, tg)]['loss']:.4g} ({100 * row[(label, tg)]['gap_closed']:.1f}%)" for tg in TARGETS)
                + f" | {pred} |")
    return lines + [""]


def report(args):
    """The tables of every results file, written into onepass.md between its markers (the prose around
    them is kept)."""
    lines = ["<!-- tables: written by `python experiments/onepass.py report` -->", ""]
    for f in sorted(RESULTS.glob("*.json")):
        if "calibration" not in f.stem:
            lines += _model_section(f, json.loads(f.read_text()))
    for f in sorted(RESULTS.glob("*calibration*.json")):
        doc = json.loads(f.read_text())
        lines += [f"### Calibration size: {doc['model']}", "", doc["data"] + f"; {doc['resamples']} bootstrap "
                  f"resamples per size; raw: `{f.relative_to(HERE)}`", "",
                  "| batches | tokens | layers whose option changes (" + " / ".join(TARGETS) + ") | regret (same) "
                  "| Spearman with the full table |", "|---|---|---|---|---|"]
        for n in sorted({r["batches"] for r in doc["rows"]}):
            rs = [r for r in doc["rows"] if r["batches"] == n]
            ch = " / ".join(f"{100 * np.mean([r['changed'] for r in rs if r['target'] == tg]):.0f}%" for tg in TARGETS)
            rg = " / ".join(f"{100 * np.mean([r['regret'] for r in rs if r['target'] == tg]):.1f}%" for tg in TARGETS)
            lines.append(f"| {n} | {rs[0]['tokens']} | {ch} | {rg} | {np.mean([r['spearman'] for r in rs]):.3f} |")
        lines.append("")
    lines.append("<!-- end of tables -->")
    out = HERE / "onepass.md"
    text = out.read_text() if out.is_file() else "<!-- tables -->\n<!-- end of tables -->\n"
    start, end = text.index("<!-- tables"), text.index("<!-- end of tables -->") + len("<!-- end of tables -->")
    out.write_text(text[:start] + "\n".join(lines) + text[end:])
    print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["compare", "calibration", "report"])
    ap.add_argument("--model", choices=["fashion-cnn", "minilm", "smollm2"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="';'-separated labels of VARIANTS")
    ap.add_argument("--repeats", type=int, default=3, help="fresh runs of each estimator (median seconds)")
    ap.add_argument("--calib-n", type=int, default=None, help="calibration samples (windows for smollm2)")
    ap.add_argument("--batch", type=int, default=None, help="samples per calibration batch")
    ap.add_argument("--seq-len", type=int, default=64, help="smollm2: tokens per calibration window")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="smollm2: evaluation tokens")
    ap.add_argument("--eval-n", type=int, default=128, help="minilm: evaluation passages")
    ap.add_argument("--resamples", type=int, default=20, help="calibration: bootstrap resamples per size")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--no-simulate", dest="simulate", action="store_false",
                    help="skip the response variants built from the output-distance table")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    {"compare": compare, "calibration": calibration, "report": report}[args.step](args)


if __name__ == "__main__":
    main()
