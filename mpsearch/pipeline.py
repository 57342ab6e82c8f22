"""The measured frontier: estimate -> solve across budgets -> apply and measure plans along it.

:func:`measured_frontier` does the whole job on a model:

1. **estimate** a cost table with any registered estimator (cached: an interrupted run, or a second
   run with the same settings, reads the table back instead of estimating again);
2. **solve** with any registered solver at ``n_points`` average-bit budgets spread between the
   smallest and largest achievable sizes, and keep the non-dominated plans (the predicted frontier);
3. **validate** ``validate`` plans spread along it, plus one plan at the size of each uniform
   bit-width: apply, check the enforced levels, count the real size, and measure quality with the
   metric on held-out data (cached per plan);
4. measure the **uniform** bit-widths alongside as the baseline curve;
5. **proxy check**: the Spearman rank correlation between predicted damage and measured loss over
   the validated points, with a warning when it is below ``min_rank_correlation``.

With ``out`` set it writes ``table.csv``, ``frontier.csv`` (predicted and measured), ``uniform.csv``,
``plans/*.json``, ``summary.json`` and the plots ``frontier.png``, ``plan_bits.png``,
``sensitivity.png``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .budget import Budget
from .errors import MpsearchError
from .frontier import non_dominated
from .metrics import Metric
from .options import DEFAULT_SEARCH_OPTIONS
from .plan import BitPlan
from .registry import get_estimator, get_solver, load_class
from .table import CostTable, atomic_write_text

DEFAULT_OPTIONS = DEFAULT_SEARCH_OPTIONS


class ProxyWarning(UserWarning):
    """The predicted damage ranks the validated plans poorly against their measured quality."""


@dataclass
class FrontierRun:
    """What :func:`measured_frontier` returns: plain frames plus the table and plans."""

    table: CostTable
    frontier: pd.DataFrame  # one row per frontier point, predicted + measured where validated
    uniform: pd.DataFrame  # one row per uniform bit-width, measured
    baseline: float  # the metric on the full-precision model
    metric: str
    metric_label: str
    higher_is_better: bool
    proxy: dict
    plans: dict[int, BitPlan] = field(default_factory=dict)  # frontier point -> plan
    out: Path | None = None
    files: dict[str, str] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """Frontier and uniform rows in one frame, with a ``kind`` column."""
        f = self.frontier.assign(kind="frontier")
        u = self.uniform.assign(kind="uniform")
        return pd.concat([f, u], ignore_index=True, sort=False)

    def validated(self) -> pd.DataFrame:
        return self.frontier[self.frontier["validated"]]


# ------------------------------------------------------------------------------- estimate
def _table_key(estimator, model, batches, extra) -> str:
    from .sensitivity.base import model_fingerprint
    from .sensitivity.cache import data_fingerprint

    doc = {"estimator": estimator.name, "params": {k: str(v) for k, v in estimator.get_params().items()
                                                   if k not in ("cache_dir", "cache_every")},
           "model": model_fingerprint(model), "data": data_fingerprint(batches), **extra}
    return hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def estimate_cached(model, calib, *, estimator="weight-error", options=DEFAULT_OPTIONS,
                    estimator_params=None, cache: Path | None = None, progress=True,
                    **estimate_kwargs) -> CostTable:
    """Estimate a table, or read it from ``cache`` (a CSV path) when it was made with the same
    estimator, settings, model weights, data and layer options."""
    from .data import as_batches

    params = dict(estimator_params or {})
    cls = load_class("estimator", estimator)
    import inspect

    if cache is not None and "cache_dir" in inspect.signature(cls.__init__).parameters:
        params.setdefault("cache_dir", str(Path(cache).parent / "estimator-cache"))
    est = get_estimator(estimator, options=options, **params)
    batches = as_batches(calib)
    key = _table_key(est, model, batches, {k: str(v) for k, v in estimate_kwargs.items()})
    if cache is not None and Path(cache).is_file():
        try:
            table = CostTable.read(cache)
            if table.metadata.get("pipeline_key") == key:
                return table
        except MpsearchError:
            pass  # unreadable or stale: estimate again
    table = est.estimate(model, batches, progress=progress, **estimate_kwargs)
    table.metadata["pipeline_key"] = key
    if cache is not None and _is_main():
        table.write(cache)
    return table


# -------------------------------------------------------------------------------- frontier
def avg_bits_range(table: CostTable) -> tuple[float, float]:
    """Smallest and largest achievable average bits of ``table``."""
    f = table.frame
    if "params" not in f:
        raise MpsearchError("the table has no 'params' column: average-bit budgets need it")
    per_layer = f.groupby("layer")["size_bits"]
    total = float(f.drop_duplicates("layer")["params"].sum())
    return float(per_layer.min().sum()) / total, float(per_layer.max().sum()) / total


def sweep(table: CostTable, solver, budgets, base_budget: Budget | None = None, progress=False):
    """Solve at each average-bit budget; returns ``[(budget, SolveResult)]``."""
    from .sensitivity.base import progress_bar

    base = base_budget or Budget()
    out = []
    for b in progress_bar(list(budgets), enabled=progress, desc="solve frontier"):
        budget = Budget(constraints={**base.constraints, "avg_bits": float(b)}, min_bits=base.min_bits,
                        max_bits=base.max_bits, pins=base.pins, ties=base.ties)
        out.append((float(b), solver.solve(table, budget)))
    return out


def pareto(points: pd.DataFrame, x="size_bits", y="damage") -> pd.DataFrame:
    """The non-dominated rows (smaller ``x`` and smaller ``y`` are better), sorted by ``x``."""
    return non_dominated(points, x, y).reset_index(drop=True)


def spread(values, k: int) -> list[int]:
    """Indices of ``k`` entries of sorted ``values`` spread evenly over their range."""
    values = np.asarray(values, dtype=float)
    if k <= 0 or len(values) == 0:
        return []
    if k >= len(values):
        return list(range(len(values)))
    targets = np.linspace(values.min(), values.max(), k)
    chosen = []
    for t in targets:
        order = np.argsort(np.abs(values - t))
        chosen.append(next((int(i) for i in order if int(i) not in chosen), int(order[0])))
    return sorted(set(chosen))


# --------------------------------------------------------------------------------- measure
def _plan_key(plan: BitPlan) -> str:
    doc = {n: plan.option_name(n) for n in sorted(plan.bits)}
    return hashlib.sha1(json.dumps(doc).encode()).hexdigest()[:16]


class _MeasureCache:
    """Measured results by plan, kept in ``measured.json`` so an interrupted run resumes."""

    def __init__(self, path: Path | None, context: str):
        self.path, self.context, self.data = path, context, {}
        if path is not None and path.is_file():
            try:
                doc = json.loads(path.read_text())
                if doc.get("context") == context:
                    self.data = doc.get("results", {})
            except (json.JSONDecodeError, OSError):
                pass

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value
        if self.path is not None:
            atomic_write_text(self.path, json.dumps({"context": self.context, "results": self.data}))


def measure(model, plan: BitPlan, metric: Metric, cache: _MeasureCache | None = None) -> dict:
    """Apply ``plan``, check it (levels per scale group), and measure its size and quality."""
    from .validate import validate_plan

    key = _plan_key(plan)
    if cache is not None and cache.get(key) is not None:
        return cache.get(key)
    report = validate_plan(model, plan, metric=metric, baseline=False)
    size = sum(r["size_bits"] for r in report.layers)
    params = sum(r["params"] for r in report.layers)
    result = {"quality": report.quality, "size_bits": size, "avg_bits": size / params,
              "model_size_mb": report.size_mb, "levels_ok": report.ok,
              **{f"measured_{k}": v for k, v in report.metrics.items()}}  # e.g. kld, kld_p99, top1, perplexity
    if cache is not None:
        cache.put(key, result)
    return result


def _is_main() -> bool:
    from .distributed import current

    return current().is_main


def measure_spread(model, plans, metric: Metric, cache: _MeasureCache | None = None, *, workers: int = 1,
                   progress: bool = False) -> list[dict]:
    """:func:`measure` for every plan, spread over ``workers`` processes or ``torchrun`` ranks
    (:func:`mpsearch.distributed.measure_plans`); cached results are reused, new ones cached (by rank 0)."""
    from .distributed import current, measure_plans
    from .sensitivity.base import progress_bar

    keys = [_plan_key(p) for p in plans]
    missing = [i for i, k in enumerate(keys) if cache is None or cache.get(k) is None]
    if current().enabled or int(workers) != 1:
        got = measure_plans(model, [plans[i] for i in missing], lambda m, p: measure(m, p, metric),
                            workers=workers)
    else:  # one process: with a progress bar, each result cached as it comes
        got = [measure(model, plans[i], metric, cache)
               for i in progress_bar(missing, enabled=progress, desc="apply & measure")]
    for i, result in zip(missing, got):
        if cache is not None:
            if _is_main():
                cache.put(keys[i], result)
            else:
                cache.data[keys[i]] = result
    if cache is None:
        return got
    return [cache.get(k) for k in keys]


def rank_correlation(predicted, measured) -> float:
    """Spearman rank correlation (NaN with fewer than 3 points or no variation)."""
    from scipy.stats import spearmanr

    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    if len(p) < 3 or np.ptp(p) == 0 or np.ptp(m) == 0:
        return float("nan")
    return float(spearmanr(p, m).statistic)


# -------------------------------------------------------------------------------- pipeline
def measured_frontier(
    model: torch.nn.Module,
    calib,
    metric: Metric,
    *,
    estimator: str = "weight-error",
    solver: str = "greedy",
    options=DEFAULT_OPTIONS,
    validate: int = 5,
    n_points: int = 24,
    budgets=(),
    match_uniform: bool = True,
    uniform: bool = True,
    budget: Budget | None = None,
    estimator_params: dict | None = None,
    solver_params: dict | None = None,
    estimate_kwargs: dict | None = None,
    min_rank_correlation: float = 0.5,
    out=None,
    plots: bool = True,
    progress: bool = True,
    workers: int = 1,
) -> FrontierRun:
    """Estimate, solve the frontier, then apply and measure plans along it (see the module doc).

    ``budgets``: extra average-bit budgets whose plans are always validated. ``match_uniform``:
    also validate a plan at the exact size of each uniform bit-width (the fair comparison).
    ``budget``: extra constraints, bounds and pins applied to every point. ``workers``: processes
    measuring plans (or, under ``torchrun``, the ranks share them; see :func:`measure_spread`).
    """

    if not isinstance(metric, Metric):
        raise MpsearchError(f"metric must be an mpsearch.metrics.Metric, got {type(metric).__name__}; "
                            f"build one with mpsearch.metrics.make_metric")
    if int(validate) != validate or validate < 0:
        raise MpsearchError(f"validate must be an integer >= 0 (plans to measure), got {validate!r}")
    if n_points < 2:
        raise MpsearchError(f"n_points must be >= 2, got {n_points}")
    out = Path(out) if out is not None else None
    if out is not None:
        (out / "plans").mkdir(parents=True, exist_ok=True)
    table = estimate_cached(model, calib, estimator=estimator, options=options,
                            estimator_params=estimator_params, progress=progress,
                            cache=out / "table.csv" if out else None, **(estimate_kwargs or {}))
    slv = get_solver(solver, **(solver_params or {}))

    # predicted frontier over a sweep of average-bit budgets (+ the requested ones)
    lo, hi = avg_bits_range(table)
    uniform_plans = {}
    for opt in table.options:
        u = BitPlan.uniform(table.layers, opt)
        sub = table.frame[table.frame["option"] == opt]
        uniform_plans[opt] = (u, float(sub["size_bits"].sum()) / float(sub["params"].sum()))
    must = [float(b) for b in budgets]
    if match_uniform:
        must += [avg for _opt, (_u, avg) in uniform_plans.items() if lo + 1e-9 < avg < hi - 1e-9]
    grid = sorted(set(np.linspace(lo, hi, n_points).round(6).tolist()) | set(must))
    rows, plans = [], []
    for b, res in sweep(table, slv, grid, budget, progress=progress):
        if res.plan is None:
            if b in must:
                raise MpsearchError(f"budget avg_bits={b:g}: {res.message}")
            continue
        p = res.plan.predicted
        rows.append({"budget_avg_bits": b, "damage": p.get("damage"), "size_bits": p.get("size_bits"),
                     "avg_bits": p.get("avg_bits"), "status": res.status, "must": b in must,
                     **{k: v for k, v in p.items() if k not in ("damage", "size_bits", "avg_bits")},
                     "_i": len(plans)})
        plans.append(res.plan)
    allpts = pd.DataFrame(rows)
    front = pareto(allpts)
    # requested budgets stay even when another point dominates them (same plan at a smaller size)
    extra = allpts[allpts["must"] & ~allpts["_i"].isin(front["_i"])]
    front = pd.concat([front, extra]).drop_duplicates("_i").sort_values(["size_bits", "damage"])
    front = front.reset_index(drop=True)
    chosen = set(spread(front["avg_bits"], validate)) | set(front.index[front["must"]])

    # measure: baseline, chosen frontier plans, uniform plans
    metric.fit(model)
    baseline = float(metric(model))
    context = json.dumps({"table": table.metadata.get("pipeline_key"), "metric": metric.name,
                          "model": table.metadata.get("model", {}).get("fingerprint")})
    mcache = _MeasureCache(out / "measured.json" if out else None, context)
    work = [("frontier", i) for i in sorted(chosen)] + ([("uniform", o) for o in uniform_plans] if uniform else [])
    todo = [plans[int(front.loc[ref, "_i"])] if kind == "frontier" else uniform_plans[ref][0]
            for kind, ref in work]
    measured = dict(zip(work, measure_spread(model, todo, metric, mcache, workers=workers,
                                             progress=progress)))

    qcol = f"measured_{metric.name}"
    front["validated"] = [i in chosen for i in front.index]
    front[qcol] = [measured.get(("frontier", i), {}).get("quality", np.nan) for i in front.index]
    front["measured_loss"] = [metric.loss(q, baseline) if np.isfinite(q) else np.nan for q in front[qcol]]
    front["measured_avg_bits"] = [measured.get(("frontier", i), {}).get("avg_bits", np.nan) for i in front.index]
    for key in sorted({k for m in measured.values() for k in m if k.startswith("measured_")} - {qcol}):
        front[key] = [measured.get(("frontier", i), {}).get(key, np.nan) for i in front.index]
    front.insert(0, "point", range(len(front)))
    urows = []
    if uniform:
        for opt, (u, avg) in uniform_plans.items():
            m = measured[("uniform", opt)]
            urows.append({"option": opt, "bits": table.option_bits()[opt], "avg_bits": avg,
                          "size_bits": m["size_bits"], "damage": float(table.frame.loc[table.frame["option"] == opt, "damage"].sum()),
                          qcol: m["quality"], "measured_loss": metric.loss(m["quality"], baseline),
                          **{k: v for k, v in m.items() if k.startswith("measured_") and k != qcol}})
    uframe = pd.DataFrame(urows)

    # proxy check over validated points (frontier and uniform together)
    val = front[front["validated"]]
    pred = list(val["damage"]) + list(uframe.get("damage", []))
    loss = list(val["measured_loss"]) + list(uframe.get("measured_loss", []))
    rho = rank_correlation(pred, loss)
    proxy = {"spearman": rho, "points": len(pred), "threshold": min_rank_correlation, "poor": False}
    if not np.isfinite(rho) or rho < min_rank_correlation:
        proxy["poor"] = True
        proxy["message"] = (
            f"the predicted damage of {estimator!r} ranks the {len(pred)} measured plans poorly "
            f"(Spearman {rho:.2f} < {min_rank_correlation}): trust measured quality, or try another estimator"
        )
        warnings.warn(proxy["message"], ProxyWarning, stacklevel=2)

    plan_map = {int(front.loc[i, "point"]): plans[int(front.loc[i, "_i"])] for i in front.index}
    front = front.drop(columns=["_i", "must"])
    run = FrontierRun(table=table, frontier=front, uniform=uframe, baseline=baseline, metric=metric.name,
                      metric_label=metric.label, higher_is_better=metric.higher_is_better, proxy=proxy,
                      plans=plan_map, out=out)
    if out is not None and _is_main():
        _write(run, out, plots=plots, settings={"estimator": estimator, "solver": solver,
                                                "options": str(options), "validate": validate})
    return run


def _write(run: FrontierRun, out: Path, *, plots: bool, settings: dict) -> None:
    front = run.frontier.copy()
    front["plan"] = ""
    for i, row in front.iterrows():
        name = f"plans/point-{int(row['point']):02d}-{row['avg_bits']:.3f}bits.json"
        run.plans[int(row["point"])].save(out / name)
        front.loc[i, "plan"] = name
    run.frontier = front
    front.to_csv(out / "frontier.csv", index=False)
    run.uniform.to_csv(out / "uniform.csv", index=False)
    files = {"table": "table.csv", "frontier": "frontier.csv", "uniform": "uniform.csv", "plans": "plans/"}
    if plots:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from . import plotting

        fig = plotting.plot_measured_frontier(run)
        fig.savefig(out / "frontier.png", dpi=110, bbox_inches="tight")
        val = front[front["validated"]]
        best = val.iloc[len(val) // 2] if len(val) else front.iloc[len(front) // 2]
        fig2 = plotting.plot_plan_bits(run.plans[int(best["point"])], run.table)
        fig2.savefig(out / "plan_bits.png", dpi=110, bbox_inches="tight")
        fig3 = plotting.plot_sensitivity(run.table)
        fig3.savefig(out / "sensitivity.png", dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        for f in (fig, fig2, fig3):
            plt.close(f)
        files.update(frontier_plot="frontier.png", plan_plot="plan_bits.png", sensitivity_plot="sensitivity.png")
    summary = {"metric": run.metric, "metric_label": run.metric_label, "baseline": run.baseline,
               "higher_is_better": run.higher_is_better, "proxy": run.proxy, "settings": settings,
               "points": len(front), "validated": int(front["validated"].sum()), "files": files}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=float))
    run.files = {k: str(out / v) for k, v in files.items()}
