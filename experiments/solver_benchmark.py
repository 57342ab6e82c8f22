"""Solver benchmark: time and optimality gap of every solver on synthetic tables of 50, 200 and 1,000
layers x 8 options, the whole frontier in one DP pass against re-solving an ILP once per budget,
and a three-constraint ILP. Writes experiments/solver_benchmark.md (every number comes from this run).

    python experiments/solver_benchmark.py            # ~5 minutes on 2 CPU cores
    python experiments/solver_benchmark.py --quick    # smaller, for a smoke test
    python experiments/solver_benchmark.py --only-big # only the 1,000 x 6 CLI frontier + dp vs ilp

Tables (mpsearch.synthetic): ``transformer`` stacks (q/k/v/o and MLP shapes, 1-8 bits: few shapes, so
the DP is exact in integer units) and ``random`` layers (arbitrary sizes, 1-6, 8 bits and keep: the
DP's whole-frontier pass discretises and states its bound; single budgets are proved). Gaps are relative to the proved ILP optimum (HiGHS).
Times are medians over repeats of ``solve()`` wall time, which includes compiling the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from mpsearch.budget import Budget
from mpsearch.problem import compile_problem
from mpsearch.registry import get_solver
from mpsearch.solvers.dp import DPSolver
from mpsearch.synthetic import random_table, transformer_table

HERE = Path(__file__).resolve().parent


def tables(sizes):
    for n in sizes:
        yield "transformer", n, transformer_table(n, bits=range(1, 9), seed=n)
        yield "random", n, random_table(n, bits=(1, 2, 3, 4, 5, 6, 8), keep=True, seed=n)


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def fmt_t(s):
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_gap(g):
    return "—" if g is None or not np.isfinite(g) else ("0" if abs(g) < 5e-10 else f"{g:.2e}")


def single_budget(table, n, quick):
    budget = Budget.parse(["avg_bits=4"])
    trials = 10 if quick else (60 if n <= 200 else 20)
    solvers = [
        ("greedy", {}, 5), ("baq", {}, 5), ("dp", {}, 3), ("ilp", {"backend": "highs"}, 3),
        ("ilp", {"backend": "cbc", "time_limit": 30}, 1), ("evolutionary", {}, 1),
        ("optuna", {"n_trials": trials}, 1),
    ]
    rows, opt = [], None
    for name, kw, reps in solvers:
        solver = get_solver(name, **kw)
        t, res = timed(lambda: solver.solve(table, budget), reps)
        label = name + (f" ({kw['backend']})" if "backend" in kw else "") + (f" ({trials} trials)" if name == "optuna" else "")
        rows.append([label, res.status, t, res.stats.get("time_s", np.nan), res.plan.predicted["damage"], reps])
        if name == "ilp" and res.plan is not None:
            opt = min(opt or np.inf, res.plan.predicted["damage"])
    for r in rows:
        r.append(r[4] / opt - 1 if opt else np.nan)
    return rows


def three_constraints(table, quick):
    f = table.frame.groupby("layer")
    budget = Budget.parse(["avg_bits=4", f"bops={float(f.bops.max().sum() * 0.5)!r}",
                           f"latency={float(f.latency.max().sum() * 0.7)!r}"])
    out, opt = [], None
    for label, name, kw, reps in [("ilp (highs)", "ilp", {"backend": "highs"}, 3),
                                  ("ilp (cbc, 30 s limit)", "ilp", {"backend": "cbc", "time_limit": 30}, 1),
                                  ("greedy", "greedy", {}, 3), ("evolutionary", "evolutionary", {}, 1)]:
        solver = get_solver(name, **kw)
        t, res = timed(lambda: solver.solve(table, budget), reps)
        if label.startswith("ilp") and res.plan is not None:
            opt = min(opt or np.inf, res.plan.predicted["damage"])
        out.append([label, res.status, t, res.plan.predicted["damage"], res.stats.get("gap")])
    for r in out:
        r.append(r[3] / opt - 1 if opt else np.nan)
    return out


def frontier_vs_sweeps(table, n_budgets, quick):
    """DP's whole frontier in one pass vs re-solving an ILP per budget (the plain approach)."""
    problem = compile_problem(table, Budget.parse(["avg_bits=1e9"]))
    dp = DPSolver()
    t_dp, fr = timed(lambda: dp.frontier(problem), 3)
    w = problem.resources["size_bits"]
    lo = np.where(problem.allowed, w, np.inf).min(axis=1).sum()
    hi = np.where(problem.allowed, w, -np.inf).max(axis=1).sum()
    caps = np.linspace(lo, hi, n_budgets + 2)[1:-1] / problem.total_params
    rows = {"dp": {"time": t_dp, "points": len(fr["cost"]), "mode": fr["stats"]["mode"],
                   "statuses": "optimal" if fr["stats"]["mode"] == "exact" else "feasible"}}
    for label, kw in [("ilp (cbc)", {"backend": "cbc", "time_limit": 10}), ("ilp (highs)", {"backend": "highs"}),
                      ("greedy", None)]:
        solver = get_solver("greedy") if kw is None else get_solver("ilp", **kw)
        t0 = time.perf_counter()
        results = [solver.solve(table, Budget(constraints={"avg_bits": float(c)})) for c in caps]
        statuses = sorted({r.status for r in results})
        print(f"  {label}: {statuses}", file=sys.stderr, flush=True)
        damages = [r.plan.predicted["damage"] if r.plan else np.nan for r in results]
        rows[label] = {"time": time.perf_counter() - t0, "damages": np.array(damages),
                       "statuses": ", ".join(f"{s} ×{sum(r.status == s for r in results)}" for s in statuses)}
    # the DP frontier's best point under each budget, against the exact ILP optimum there
    best = np.array([fr["damage"][fr["cost"] <= c * problem.total_params * (1 + 1e-12)].min() for c in caps])
    rows["dp"]["damages"] = best
    exact = np.fmin(rows["ilp (highs)"]["damages"], rows["ilp (cbc)"]["damages"])
    for r in rows.values():
        r["max_gap"] = float(np.nanmax(r["damages"] / exact - 1))
    return rows


BIG_SECTION = "## Big frontier: 1,000 layers × 6 options through the CLI"


def big_frontier(quick):
    """``mpsearch frontier --solver dp`` end to end on random_table(1000) (int2..int6, int8; arbitrary
    sizes), timed with /usr/bin/time -v, then dp against the ILP at 10 budgets on the same table."""
    import re
    import subprocess
    import tempfile

    n = 200 if quick else 1000
    table = random_table(n, seed=1000)
    lines = [BIG_SECTION, "",
             f"`random_table({n}, seed=1000)`: {n} layers with arbitrary parameter counts, options "
             f"{', '.join(table.options)}; the sizes share no divisor that fits the DP's 32768 units, so the",
             "whole-frontier pass is discretised (every point a real plan, with the LP bound at its size) and",
             "each single budget is proved optimal by reduced-cost fixing + an exact search on the core.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        path = table.write(Path(tmp) / "table.csv")
        out = Path(tmp) / "out" / "frontier.csv"
        cmd = [sys.executable, "-m", "mpsearch", "frontier", "--table", str(path), "--solver", "dp", "-o", str(out)]
        env = dict(os.environ, PYTHONPATH=str(HERE.parent))
        timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
        run = subprocess.run(timer + cmd, capture_output=True, text=True, env=env, check=True)
        wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", run.stderr)
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)
        secs = (int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))) if wall else float("nan")
        peak = int(rss.group(1)) / 1e6 if rss else float("nan")
        import pandas as pd

        rows = len(pd.read_csv(out))
        from mpsearch.frontier import read_points

        points = len(read_points(out)[0])
        csv_mb, npz_mb = out.stat().st_size / 1e6, out.with_suffix(".npz").stat().st_size / 1e6
    lines += ["```bash", "python -c \"from mpsearch.synthetic import random_table; random_table(1000, seed=1000).write('t.csv')\"",
              "/usr/bin/time -v mpsearch frontier --table t.csv --solver dp -o out/frontier.csv", "```", "",
              "| wall time | peak RSS | points (.npz) | CSV rows (`--max-points` 200) | CSV | .npz |", "|---|---|---|---|---|---|",
              f"| {secs:.2f} s | {peak:.2f} GB | {points} | {rows} | {csv_mb:.1f} MB | {npz_mb:.1f} MB |", ""]
    f = table.frame.groupby("layer")
    lo, hi = f.size_bits.min().sum(), f.size_bits.max().sum()
    lines += ["dp against the ILP (HiGHS) at 10 evenly spaced `size_bits` budgets strictly between the smallest",
              "and the largest size. `Δ damage` = dp − ilp.", "",
              "| budget (avg bits) | dp status | dp time | core items | ilp status | ilp time | Δ damage |",
              "|---|---|---|---|---|---|---|"]
    params = sum(table.layer_params().values())
    worst = 0.0
    for cap in np.linspace(lo, hi, 12)[1:-1]:
        budget = Budget.parse(["size_bits=%r" % float(cap)])
        t_dp, dp = timed(lambda: get_solver("dp").solve(table, budget), 1)
        t_ilp, ilp = timed(lambda: get_solver("ilp").solve(table, budget), 1)
        delta = dp.plan.predicted["damage"] - ilp.plan.predicted["damage"]
        worst = max(worst, abs(delta) / ilp.plan.predicted["damage"])
        lines.append(f"| {cap / params:.3f} | {dp.status} | {fmt_t(t_dp)} | {dp.stats.get('core_items', '—')} | "
                     f"{ilp.status} | {fmt_t(t_ilp)} | {delta:.3g} |")
    lines += ["", f"Largest relative difference: {worst:.2g}.", ""]
    return lines, {"big frontier CLI < 5 s": secs, "big frontier peak RSS < 1 GB": peak}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ap.add_argument("-o", "--output", default=str(HERE / "solver_benchmark.md"))
    ap.add_argument("--only-big", action="store_true",
                    help="run only the big-frontier section and replace it in the existing output file")
    args = ap.parse_args(argv)
    if args.only_big:
        lines, big_targets = big_frontier(args.quick)
        out = Path(args.output)
        text = out.read_text() if out.exists() else ""
        if BIG_SECTION in text:
            head, rest = text.split(BIG_SECTION, 1)
            nxt = rest.find("\n## ")
            tail = rest[nxt + 1:] if nxt >= 0 else ""
        else:  # a file from before this section: put it before the targets
            i = text.find("## Targets")
            head, tail = (text[:i], text[i:]) if i >= 0 else (text + "\n", "")
        import re

        for name, v in big_targets.items():  # and its rows of the targets table
            shown = f"{v:.2f} GB" if "GB" in name else fmt_t(v)
            met = "yes" if v < (1.0 if "GB" in name else 5.0) else "no"
            tail = re.sub(rf"^\| {re.escape(name)} \|.*$", f"| {name} | {shown} | {met} |", tail, flags=re.M)
        out.write_text(head + "\n".join(lines) + "\n" + tail)
        print("\n".join(lines))
        return
    warnings.filterwarnings("ignore")
    sizes = (30, 60) if args.quick else (50, 200, 1000)
    n_budgets = 4 if args.quick else 10
    t_start = time.perf_counter()
    lines = [
        "# Solver benchmark",
        "",
        "Written by `experiments/solver_benchmark.py` (do not edit by hand). Reproduce with",
        "",
        "```bash",
        "python experiments/solver_benchmark.py" + (" --quick" if args.quick else ""),
        "```",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {sys.version.split()[0]}, numpy {np.__version__}.",
        "Tables from `mpsearch.synthetic`: **transformer** (q/k/v/o/gate/up/down shapes, options int1–int8;",
        "few shapes, so `dp` is exact in integer units) and **random** (arbitrary layer sizes, int1–int6,",
        "int8 and keep; `dp`'s whole-frontier pass discretises to 32768 units, each single budget is still proved). Gap = damage / best ILP",
        "plan (HiGHS or CBC; see their statuses: `optimal` is proved) − 1. `time` = median wall time of `solve(table, budget)` (includes compiling the",
        "table); `solver time` = the solver's own `stats['time_s']` (model building included).",
        "",
    ]
    targets = {}
    # ------------------------------------------------------------------ single budget
    lines += ["## One budget: avg_bits ≤ 4", ""]
    for family, n, table in tables(sizes):
        print(f"one budget: {family} {n}", file=sys.stderr, flush=True)
        rows = single_budget(table, n, args.quick)
        lines += [f"### {family}, {n} layers × {len(table.options)} options", "",
                  "| solver | status | time | solver time | damage | gap | repeats |", "|---|---|---|---|---|---|---|"]
        for label, status, t, ts, dmg, reps, gap in rows:
            lines.append(f"| {label} | {status} | {fmt_t(t)} | {fmt_t(ts)} | {dmg:.6g} | {fmt_gap(gap)} | {reps} |")
            if n == max(sizes) and label in ("greedy", "baq"):
                targets.setdefault(f"{label} in milliseconds ({n} layers, solver time)", []).append(ts)
        lines.append("")
    # ------------------------------------------------------------------ three constraints
    lines += ["## Three constraints at once: avg_bits ≤ 4, bops ≤ 50 % of max, latency ≤ 70 % of max", "",
              "| table | solver | status | time | damage | gap | reported gap bound |", "|---|---|---|---|---|---|---|"]
    for family, n, table in tables(sizes):
        for label, status, t, dmg, bound, gap in three_constraints(table, args.quick):
            lines.append(f"| {family} {n} | {label} | {status} | {fmt_t(t)} | {dmg:.6g} | {fmt_gap(gap)} | {fmt_gap(bound)} |")
            if n == max(sizes) and label == "ilp (highs)":
                targets.setdefault(f"ILP, 3 constraints, {n} layers < 2 s", []).append(t)
    lines.append("")
    # ------------------------------------------------------------------ frontier
    lines += [f"## Whole frontier: one DP pass vs re-solving once per budget ({n_budgets} budgets)", "",
              "`dp` returns every non-dominated point in one pass; the others solve each budget of an",
              f"evenly spaced sweep of {n_budgets}. `max gap` compares, at each swept budget, the best",
              "point found with the best ILP plan there. `ratio` = time / dp time.", "",
              "| table | method | time | points | statuses | max gap | ratio |", "|---|---|---|---|---|---|---|"]
    for family, n, table in tables(sizes):
        print(f"frontier: {family} {n}", file=sys.stderr, flush=True)
        rows = frontier_vs_sweeps(table, n_budgets, args.quick)
        t_dp = rows["dp"]["time"]
        for label, r in rows.items():
            pts = f"{r['points']} ({r['mode']})" if label == "dp" else str(n_budgets)
            name = "dp (whole frontier)" if label == "dp" else f"{label} × {n_budgets} budgets"
            lines.append(f"| {family} {n} | {name} | {fmt_t(r['time'])} | {pts} | {r['statuses']} | {fmt_gap(r['max_gap'])} | {r['time'] / t_dp:.1f} |")
            if n == max(sizes) and label == "dp" and family == "transformer":
                targets.setdefault(f"exact whole frontier, {n} × 8 < 1 s", []).append(r["time"])
    lines.append("")
    # ------------------------------------------------------------------ big frontier
    print("big frontier", file=sys.stderr, flush=True)
    big, big_targets = big_frontier(args.quick)
    lines += big
    # ------------------------------------------------------------------ targets
    lines += ["## Targets (largest size of this run)", "", "| target | measured | met |", "|---|---|---|"]
    for name, vals in targets.items():
        limit = 1.0 if "frontier" in name else 2.0 if "ILP" in name else 0.1
        lines.append(f"| {name} | {', '.join(fmt_t(v) for v in vals)} | {'yes' if max(vals) < limit else 'no'} |")
    for name, v in big_targets.items():
        shown = f"{v:.2f} GB" if "GB" in name else fmt_t(v)
        lines.append(f"| {name} | {shown} | {'yes' if v < (1.0 if 'GB' in name else 5.0) else 'no'} |")
    lines += ["", f"Total benchmark time: {time.perf_counter() - t_start:.0f} s.", ""]
    Path(args.output).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
