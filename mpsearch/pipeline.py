"""The measured frontier: estimate -> solve across budgets -> apply and measure plans along it.

:func:`measured_frontier` does the whole job on a model:

1. **estimate** a cost table with any registered estimator (cached: an interrupted run, or a second
   run with the same settings, reads the table back instead of estimating again);
2. **solve** the predicted frontier with :func:`mpsearch.frontier.compute_frontier` (any solver, any
   budget key, the budget's other constraints, bounds, pins and ties at every point), plus one
   solve at the exact size of each uniform option and at each requested budget (their
   :class:`~mpsearch.SolveResult` kept);
3. **validate** ``validate`` plans spread along it plus the plans at the uniform sizes: apply, check
   the enforced levels, count the real size, measure quality on held-out data (cached per plan);
4. measure the **uniform** options alongside, and **compare**: each measured mixed plan against the
   best measured uniform plan of equal or smaller size (``uniform_at_size``, ``beats_uniform``) and
   against the straight line between its two neighbouring uniform points (``vs_uniform_line``,
   negative = better than the line), with a :class:`UniformWarning` when a mixed plan loses;
5. optionally **refine** (``refine=R``): R rounds of measure -> recalibrate -> re-solve
   (:mod:`mpsearch.refine`) within ``refine_evals`` measured plans;
6. **recommend** at each target budget the best *measured* plan that fits it, uniform plans
   included, with an explicit status (``mixed``, ``uniform_better``, ``uniform_only``);
7. **proxy check** (information): the Spearman rank correlation between predicted damage and
   measured loss over the validated points, with a :class:`ProxyWarning` below
   ``min_rank_correlation``.

With ``out`` set it writes ``table.csv``, ``frontier.csv`` (predicted and measured), ``uniform.csv``,
``recommended.csv``, ``refined.csv`` (with ``refine``), ``plans/*.json``, ``summary.json`` and the
plots ``frontier.png``, ``plan_bits.png``, ``sensitivity.png``.

:func:`model_frontier` is the same job from specs (a model spec, data specs, a metric name), the
library side of ``mpsearch frontier --model``; :func:`run_demo` is ``mpsearch demo``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .budget import Budget
from .errors import MpsearchError
from .fileio import atomic_output_dir, atomic_write_text
from .frontier import compute_frontier, non_dominated
from .metrics import Metric
from .options import DEFAULT_SEARCH_OPTIONS
from .plan import BitPlan
from .problem import compile_problem
from .refine import METHODS, plan_key, refine as refine_loop
from .registry import get_estimator, get_solver, load_class
from .recipe import DEFAULT_POINTS, DEFAULT_RECIPE, DEMO_DATA  # noqa: F401  (the one default recipe)
from .table import CostTable

DEFAULT_OPTIONS = DEFAULT_SEARCH_OPTIONS



class ProxyWarning(UserWarning):
    """The predicted damage ranks the validated plans poorly against their measured quality."""


class UniformWarning(UserWarning):
    """A measured mixed-precision plan lost to a measured uniform plan of equal or smaller size."""


class InfeasibleBudget(MpsearchError):
    """A requested budget admits no plan (the CLI exits with code 3)."""


@dataclass
class FrontierRun:
    """What :func:`measured_frontier` returns: plain frames plus the table and plans."""

    table: CostTable
    frontier: pd.DataFrame  # one row per frontier point, predicted + measured where validated
    uniform: pd.DataFrame  # one row per uniform option, measured
    baseline: float  # the metric on the full-precision model
    metric: str
    metric_label: str
    higher_is_better: bool
    proxy: dict
    plans: dict[int, BitPlan] = field(default_factory=dict)  # frontier point -> plan
    recommended: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per target budget
    refinement: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per round x target
    refined: dict[str, BitPlan] = field(default_factory=dict)  # "refined-N" -> plan
    refined_frame: pd.DataFrame = field(default_factory=pd.DataFrame)  # refined plans, measured
    results: dict = field(default_factory=dict)  # target label -> SolveResult at that budget
    uniform_check: dict = field(default_factory=dict)  # counts of mixed plans beating / losing to uniform
    key: str = "avg_bits"
    out: Path | None = None
    files: dict[str, str] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """Frontier and uniform rows in one frame, with a ``kind`` column."""
        f = self.frontier.assign(kind="frontier")
        u = self.uniform.assign(kind="uniform")
        return pd.concat([f, u], ignore_index=True, sort=False)

    def validated(self) -> pd.DataFrame:
        return self.frontier[self.frontier["validated"]]

    def plan_of(self, ref: str) -> BitPlan:
        """The plan a ``recommended`` row names: ``point-N``, ``uniform-OPTION`` or ``refined-N``."""
        kind, _, name = ref.partition("-")
        if kind == "point":
            return self.plans[int(name)]
        if kind == "uniform":
            return BitPlan.uniform(self.table.layers, name)
        return self.refined[ref]


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


def _metric_key(metric: Metric) -> str:
    """What a measurement depends on besides the plan: the metric's class, settings and data."""
    from .sensitivity.cache import data_fingerprint

    parts = {"class": type(metric).__name__}
    for k, v in sorted(vars(metric).items()):
        if k.startswith("_"):
            continue  # derived state (the fitted reference)
        if isinstance(v, (int, float, str, bool)) or v is None:
            parts[k] = repr(v)
        elif isinstance(v, (torch.Tensor, list, tuple, dict)):
            parts[k] = data_fingerprint([v] if isinstance(v, torch.Tensor) else v)  # a tensor is one batch
        elif callable(v):
            parts[k] = f"{getattr(v, '__module__', '')}.{getattr(v, '__qualname__', type(v).__name__)}"
    return json.dumps(parts, sort_keys=True)


def measure(model, plan: BitPlan, metric: Metric, cache: _MeasureCache | None = None) -> dict:
    """Apply ``plan``, check it (levels per scale group), and measure its size and quality."""
    from .validate import validate_plan

    key = plan_key(plan)
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

    keys = [plan_key(p) for p in plans]
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




# ------------------------------------------------------------------------- predicted frontier
def _key_of(table: CostTable, key: str, budget: Budget):
    """The compiled problem with ``key`` unconstrained, and the constraint that measures ``key``."""
    problem = compile_problem(table, budget.with_constraints(**{key: 1e300}))
    con = next(c for c in problem.constraints if c.key == key)
    return problem, con


def uniform_plans(table: CostTable, key: str = "avg_bits", budget: Budget | None = None) -> dict:
    """option -> (uniform plan, its use of ``key`` in the user's units), for every option that
    every layer offers (a ragged table's per-layer options have no uniform plan)."""
    problem, con = _key_of(table, key, budget or Budget())
    offered = table.frame.groupby("option")["layer"].nunique()
    out = {}
    for k, opt in enumerate(problem.option_names):
        if offered.get(opt, 0) < len(table.layers):
            continue
        use = sum(float(problem.resources[con.column][i, k]) for i in range(problem.n_items))
        out[opt] = (BitPlan.uniform(table.layers, opt), con.to_user(use))
    return out


def _row(predicted: dict, **extra) -> dict:
    row = {"damage": predicted.get("damage"), "size_bits": predicted.get("size_bits"),
           "avg_bits": predicted.get("avg_bits")}
    row.update({k: v for k, v in predicted.items() if k not in row and k != "params"})
    row.update(extra)
    return row


def predicted_frontier(table: CostTable, solver, *, key: str = "avg_bits", points: int | None = DEFAULT_POINTS,
                       budget: Budget | None = None, targets: dict | None = None, progress: bool = False):
    """The predicted frontier (:func:`~mpsearch.frontier.compute_frontier`) plus one solve at each
    target budget (label -> value of ``key``), kept even when another point dominates it.

    Returns ``(frame, plans, results)``: one row per point sorted by size (``at_budget`` names the
    target budgets a row was solved for, empty otherwise), the plans in row order, and the
    :class:`~mpsearch.SolveResult` of each target. An infeasible target raises
    :class:`InfeasibleBudget` naming the smallest achievable value.
    """
    from .sensitivity.base import progress_bar

    budget = budget or Budget()
    if getattr(solver, "risk", 0):  # ilp risk=λ: the frontier of damage + λ·damage_std
        from .solvers.ilp import risk_adjusted

        table = risk_adjusted(table, solver.risk)
    fr = compute_frontier(table, solver, points=points, key=key, budget=budget)
    if fr.status == "infeasible":
        raise InfeasibleBudget(f"no plan meets the budget: {fr.message}")
    rows = [_row(p.predicted, budget=p.budget, status=p.status, at_budget="") for p in fr.points]
    plans = [p.plan for p in fr.points]
    results = {}
    for label, value in progress_bar(list((targets or {}).items()), enabled=progress, desc="solve targets"):
        b = budget.with_constraints(**{key: float(value)})
        res = solver.solve_problem(compile_problem(table, b), b)
        if res.plan is None:
            raise InfeasibleBudget(f"budget {key}={value:g} ({label}): {res.message}")
        results[label] = res
        rows.append(_row(res.plan.predicted, budget=f"{key}<={value:.6g}", status=res.status, at_budget=label))
        plans.append(res.plan)
    allpts = pd.DataFrame(rows).assign(_i=range(len(rows)))
    front = pareto(allpts)
    extra = allpts[(allpts["at_budget"] != "") & ~allpts["_i"].isin(front["_i"])]
    front = pd.concat([front, extra])
    # a plan solved for several targets (or also a frontier point) keeps one row naming them all
    front["_key"] = [plan_key(plans[i]) for i in front["_i"]]
    names = front.groupby("_key")["at_budget"].agg(lambda s: ",".join(t for t in dict.fromkeys(s) if t))
    front = front.drop_duplicates("_key").copy()
    front["at_budget"] = front["_key"].map(names)
    front = front.sort_values(["size_bits", "damage"], kind="stable").reset_index(drop=True)
    ordered = [plans[i] for i in front["_i"]]
    return front.drop(columns=["_i", "_key"]), ordered, results


# ---------------------------------------------------------------------- uniform comparison
def compare_with_uniform(frame: pd.DataFrame, uniform: pd.DataFrame, size: str = "measured_size_bits",
                         loss: str = "measured_loss") -> pd.DataFrame:
    """Each measured row of ``frame`` against the measured uniform plans (``uniform``: ``size_bits``,
    ``measured_loss``, ``option``).

    Adds ``uniform_at_size`` (the best uniform option of equal or smaller size), its
    ``uniform_loss``, ``beats_uniform`` (measured loss at most that uniform's; True where no uniform
    plan is as small), and ``vs_uniform_line`` (measured loss minus the straight line between the
    two neighbouring uniform points at this size; negative = better; NaN outside their range).
    """
    out = frame.copy()
    u = uniform.dropna(subset=["measured_loss"]).sort_values("size_bits") if len(uniform) else uniform
    at, uloss, beats, line = [], [], [], []
    for s, lo in zip(out[size], out[loss]):
        if not np.isfinite(lo) or not len(u):
            at.append(""); uloss.append(np.nan); beats.append(None); line.append(np.nan)
            continue
        fit = u[u["size_bits"] <= s * (1 + 1e-9)]
        if len(fit):
            best = fit.loc[fit["measured_loss"].idxmin()]
            at.append(str(best["option"])); uloss.append(float(best["measured_loss"]))
            beats.append(bool(lo <= best["measured_loss"] + 1e-12))
        else:
            at.append(""); uloss.append(np.nan); beats.append(True)
        xs, ys = u["size_bits"].to_numpy(float), u["measured_loss"].to_numpy(float)
        inside = len(xs) >= 2 and xs[0] <= s <= xs[-1]
        line.append(float(lo - np.interp(s, xs, ys)) if inside else np.nan)
    out["uniform_at_size"], out["uniform_loss"] = at, uloss
    out["beats_uniform"], out["vs_uniform_line"] = beats, line
    return out


def _warn_losers(front: pd.DataFrame, metric_label: str) -> list[str]:
    msgs = []
    for _, r in front[front["beats_uniform"].eq(False)].iterrows():
        msgs.append(f"the mixed plan at {r['avg_bits']:.3f} bits/weight measured worse ({metric_label} loss "
                    f"{r['measured_loss']:.4g}) than uniform {r['uniform_at_size']} (loss {r['uniform_loss']:.4g}) "
                    f"of equal or smaller size: the recommendation there falls back to the better plan")
    for m in msgs:
        warnings.warn(m, UniformWarning, stacklevel=3)
    return msgs


def recommend(candidates: list, problems: dict) -> pd.DataFrame:
    """The best measured plan fitting each target budget, uniform plans included.

    ``candidates``: ``(ref, source, plan, measured dict with quality/measured_loss/avg_bits/size_bits)``
    with source ``mixed``, ``refined`` or ``uniform``. ``problems``: target label -> compiled problem
    of that budget (its caps, bounds, pins and ties decide what fits). Status: ``mixed`` when a mixed
    (or refined) plan measured best, ``uniform_better`` when a uniform plan beat every mixed plan
    that fits, ``uniform_only`` when no mixed plan that fits was measured, ``none`` when nothing fits.
    """
    from .refine import _choice_of

    rows = []
    for label, problem in problems.items():
        fit = []
        for ref, source, plan, m in candidates:
            try:
                ok = problem.is_feasible(_choice_of(problem, plan))
            except ValueError:
                ok = False
            if ok and np.isfinite(m["measured_loss"]):
                fit.append((m["measured_loss"], ref, source, m))
        if not fit:
            rows.append({"budget": label, "status": "none"})
            continue
        loss, ref, source, m = min(fit, key=lambda e: e[0])
        mixed = [e for e in fit if e[2] != "uniform"]
        uni = [e for e in fit if e[2] == "uniform"]
        status = ("uniform_only" if not mixed else "uniform_better" if source == "uniform" else "mixed")
        rows.append({"budget": label, "plan": ref, "source": source, "status": status,
                     "measured_loss": loss, "quality": m["quality"], "avg_bits": m["avg_bits"],
                     "size_bits": m["size_bits"],
                     "best_mixed_loss": min((e[0] for e in mixed), default=np.nan),
                     "best_uniform_loss": min((e[0] for e in uni), default=np.nan),
                     # every value of a multi-value metric (measured_kld, measured_top1, measured_perplexity...)
                     **{k: v for k, v in m.items() if k.startswith("measured_") and k != "measured_loss"}})
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------------- pipeline
def _check_refine_params(params) -> None:
    """Refuse a ``refine_params`` key that :func:`mpsearch.refine.refine` does not take, in one line."""
    import inspect

    known = [k for k, v in inspect.signature(refine_loop).parameters.items() if v.kind is v.KEYWORD_ONLY
             and k not in ("rounds", "method", "max_evals", "base_budget", "key", "search", "levels",
                           "checkpoint_dir", "context", "progress")]
    unknown = sorted(set(params or {}) - set(known))
    if unknown:
        raise MpsearchError(f"refine_params: unknown setting {unknown[0]!r}; the refinement's settings: "
                            f"{', '.join(known)}")


def _check_args(metric, validate, points, refine, refine_method, refine_evals):
    if not isinstance(metric, Metric):
        raise MpsearchError(f"metric must be an mpsearch.metrics.Metric, got {type(metric).__name__}; "
                            f"build one with mpsearch.metrics.make_metric")
    if int(validate) != validate or validate < 0:
        raise MpsearchError(f"validate must be an integer >= 0 (plans to measure), got {validate!r}")
    if points is not None and (int(points) != points or points < 2):
        raise MpsearchError(f"points must be an integer >= 2, got {points!r}")
    if int(refine) != refine or refine < 0:
        raise MpsearchError(f"refine must be an integer >= 0 (rounds), got {refine!r}")
    if refine_method not in METHODS:
        raise MpsearchError(f"refine_method must be one of {', '.join(METHODS)}, got {refine_method!r}")
    if refine_evals is not None and (int(refine_evals) != refine_evals or refine_evals < 0):
        raise MpsearchError(f"refine_evals must be an integer >= 0 (measured plans), got {refine_evals!r}")


def _search_metric(metric: Metric, calib):
    """``evolve``'s default search metric: ``metric``'s measurement on the calibration data, or,
    where it has none (a user callable), ``metric`` itself with a warning (it then selects on the
    evaluation data). A causal LM's calibration text of 16 windows or more becomes a ladder of its
    first 1/16, 1/4 and all of its tokens (multi-step selection)."""
    from .metrics import CausalLMMetric

    try:
        found = metric.on_data(calib) if calib is not None else None
    except MpsearchError:  # e.g. an accuracy metric on calibration data without labels
        found = None
    if found is None:
        warnings.warn(f"refine_method='evolve': metric {metric.name!r} cannot be measured on the calibration "
                      f"data, so the search measures on the evaluation data and its result is selected there; "
                      f"give refine_metric= on other data", ProxyWarning, stacklevel=4)
        return metric
    if isinstance(found, CausalLMMetric) and len(found.windows()) >= 16:
        n = found.input_ids.numel()
        return [found.on_data(found.input_ids[: n // k]) for k in (16, 4)] + [found]
    return found


def _refine_targets(targets: dict, wanted) -> dict:
    """The targets to refine: all, or those ``wanted`` names (each must be one)."""
    if wanted is None:
        return targets
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    unknown = [w for w in wanted if w not in targets]
    if unknown:
        raise MpsearchError(f"refine_targets: no target budget named {unknown[0]!r}; the targets are "
                            f"{', '.join(targets) or 'none'}")
    return {t: targets[t] for t in wanted}


def _targets(table, key, budget, uniform, budgets, match_uniform):
    """Target budgets (label -> value of ``key``) and the budget without ``key``."""
    values = [float(b) for b in budgets]
    if key in budget.constraints:  # --budget avg_bits=4 on the model path: a target, not a sweep cap
        values.append(budget.constraints[key])
        budget = Budget.from_dict({**budget.to_dict(), "constraints": {k: v for k, v in budget.constraints.items()
                                                                      if k != key}})
    targets = {f"{key}={v:g}": v for v in values}
    if match_uniform:
        problem, con = _key_of(table, key, budget)
        w = np.where(problem.allowed, problem.resources[con.column], np.nan)
        lo, hi = con.to_user(np.nanmin(w, axis=1).sum()), con.to_user(np.nanmax(w, axis=1).sum())
        for opt, (_plan, use) in uniform.items():
            if lo * (1 + 1e-9) < use < hi * (1 - 1e-9):
                targets[opt] = use
    return targets, budget


def _measure_all(model, metric, front, plans, uniform, chosen, mcache, progress, workers=1):
    work = [("point", i) for i in sorted(chosen)] + [("uniform", o) for o in uniform]
    todo = [plans[ref] if kind == "point" else uniform[ref][0] for kind, ref in work]
    return dict(zip(work, measure_spread(model, todo, metric, mcache, workers=workers, progress=progress)))


def plan_damage_std(table: CostTable, plan: BitPlan) -> float:
    """sqrt(sum of the plan's layers' ``damage_std`` squared): the spread of its predicted damage."""
    std = table.frame.set_index(["layer", "option"])["damage_std"]
    return float(np.sqrt(sum(float(std[(n, plan.option_name(n))]) ** 2 for n in plan.bits)))


def _frames(table, metric, baseline, front, measured, chosen, uniform, key, plans):
    qcol = f"measured_{metric.name}"
    front = front.copy()
    got = [measured.get(("point", i), {}) for i in front.index]
    front["validated"] = [i in chosen for i in front.index]
    front[qcol] = [m.get("quality", np.nan) for m in got]
    front["measured_loss"] = [metric.loss(q, baseline) if np.isfinite(q) else np.nan for q in front[qcol]]
    front["measured_avg_bits"] = [m.get("avg_bits", np.nan) for m in got]
    front["measured_size_bits"] = [m.get("size_bits", np.nan) for m in got]
    for extra in sorted({k for m in got for k in m if k.startswith("measured_")} - {qcol}):
        front[extra] = [m.get(extra, np.nan) for m in got]  # every value of a multi-value metric
    front.insert(0, "point", range(len(front)))
    if "damage_std" in table.frame:  # independent layers: the plan's std adds in quadrature
        front["damage_std"] = [plan_damage_std(table, p) for p in plans]
    urows = []
    damage_of = table.frame.set_index(["layer", "option"])["damage"]
    for opt, (_u, use) in uniform.items():
        m = measured[("uniform", opt)]
        # a uniform option, or a consumer recipe (llama.cpp's mixes): its bits as the most common
        bits = table.option_bits().get(opt) or max(set(_u.bits.values()), key=list(_u.bits.values()).count)
        damage = float(sum(damage_of[(n, _u.option(n).name)] for n in _u.layers))
        urows.append({"option": opt, "bits": bits, "avg_bits": m["avg_bits"],
                      **({key: use} if key != "avg_bits" else {}), "size_bits": m["size_bits"],
                      "damage": damage, qcol: m["quality"],
                      "measured_loss": metric.loss(m["quality"], baseline),
                      **{k: v for k, v in m.items() if k.startswith("measured_") and k != qcol}})
    return front, pd.DataFrame(urows)


def proxy_check(front, uframe, estimator, threshold) -> dict:
    """Spearman(predicted damage, measured loss) over the validated and uniform points (information)."""
    val = front[front["validated"]]
    pred = list(val["damage"]) + list(uframe.get("damage", []))
    loss = list(val["measured_loss"]) + list(uframe.get("measured_loss", []))
    rho = rank_correlation(pred, loss)
    proxy = {"spearman": rho, "points": len(pred), "threshold": threshold, "poor": False}
    if not np.isfinite(rho) or rho < threshold:
        proxy["poor"] = True
        proxy["message"] = (
            f"the predicted damage of {estimator!r} ranks the {len(pred)} measured plans poorly "
            f"(Spearman {rho:.2f} < {threshold}): trust measured quality, or try another estimator"
        )
        warnings.warn(proxy["message"], ProxyWarning, stacklevel=3)
    return proxy


class SearchLadder:
    """``search(plan, level) -> loss`` for the ``evolve`` refinement: the plan switched into the model
    in place (:class:`~mpsearch.apply.PlanSwitch`) and measured with rung ``level`` of a ladder of
    metrics (cheapest first; fitted on the full-precision model here). :meth:`restore` puts the model
    back (before any other measurement)."""

    def __init__(self, model, layers, metrics):
        self.model, self.metrics = model, list(metrics)
        for m in self.metrics:
            if not isinstance(m, Metric):
                raise MpsearchError(f"refine_metric must be a Metric or a list of them, got {type(m).__name__}")
        self.baselines = []
        for m in self.metrics:
            m.fit(model)
            self.baselines.append(float(m(model)))
        from .apply import PlanSwitch

        self.switch = PlanSwitch(model, layers)

    @property
    def levels(self) -> int:
        return len(self.metrics)

    def __call__(self, plan, level):
        self.switch.apply(plan)
        m = self.metrics[level]
        return float(m.loss(m(self.model), self.baselines[level]))

    def restore(self):
        self.switch.restore()


def _refine(table, slv, targets, base, key, model, metric, baseline, mcache, front, plans, uniform,
            measured, rounds, method, max_evals, params, search_metric=None, out=None, progress=False):
    """Run :func:`mpsearch.refine.refine`; returns (refined plans, their measured rows, round log)."""
    search = None
    if method == "evolve":  # the children measured in place, on the search data (measured_frontier's default:
        # the metric on the calibration data, _search_metric)
        ladder = list(search_metric) if isinstance(search_metric, (list, tuple)) else [search_metric]
        search = SearchLadder(model, table.layers, ladder)
        context = json.dumps([mcache.context, [_metric_key(m) for m in search.metrics]])
        params = {"levels": search.levels, "progress": progress, "context": context,
                  "checkpoint_dir": None if out is None else out / "evolve", **params}

    def loss_of(plan):
        if search is not None:
            search.restore()
        return metric.loss(measure(model, plan, metric, mcache)["quality"], baseline)

    history = [(plans[i], float(front.loc[i, "measured_loss"])) for i in front.index[front["validated"]]]
    history += [(u, metric.loss(measured[("uniform", o)]["quality"], baseline)) for o, (u, _) in uniform.items()]
    n0 = len(history)
    try:
        res = refine_loop(table, slv, targets, history, loss_of, rounds=rounds, method=method, max_evals=max_evals,
                          base_budget=base, key=key, search=search, **params)
    finally:
        if search is not None:
            search.restore()
    refined, rows = {}, []
    problem = compile_problem(table, base)
    from .refine import _choice_of

    for j, (plan, loss) in enumerate(history[n0:]):
        ref = f"refined-{j}"
        m = measure(model, plan, metric, mcache)
        pred = problem.totals(_choice_of(problem, plan))
        plan.predicted = pred
        refined[ref] = plan
        rows.append({"plan": ref, "method": plan.provenance.get("refine", "local"), "damage": pred["damage"],
                     "avg_bits": m["avg_bits"], **{k: v for k, v in m.items() if k.startswith("measured_")},
                     f"measured_{metric.name}": m["quality"], "measured_loss": loss,
                     "measured_size_bits": m["size_bits"]})
    return refined, pd.DataFrame(rows), pd.DataFrame(res.log)


def _recommendations(table, metric, targets, base, key, front, plans, uframe, uniform, refined, rframe):
    """:func:`recommend` over every measured plan: validated frontier points, uniform, refined."""
    cands = [(f"point-{int(r['point'])}", "mixed", plans[i], r) for i, r in front[front["validated"]].iterrows()]
    cands += [(f"uniform-{r['option']}", "uniform", uniform[r["option"]][0], r) for _, r in uframe.iterrows()]
    cands += [(r["plan"], "refined", refined[r["plan"]], r) for _, r in rframe.iterrows()]
    cands = [(ref, src, p, {"measured_loss": float(r["measured_loss"]), "quality": float(r[f"measured_{metric.name}"]),
                            "avg_bits": float(r["measured_avg_bits"] if "measured_avg_bits" in r else r["avg_bits"]),
                            "size_bits": float(r["measured_size_bits"] if "measured_size_bits" in r else r["size_bits"]),
                            **{k: r[k] for k in r.index if k.startswith("measured_") and pd.notna(r[k])
                               and k not in ("measured_loss", "measured_avg_bits", "measured_size_bits")}})
             for ref, src, p, r in cands]
    problems = {t: compile_problem(table, base.with_constraints(**{key: v})) for t, v in targets.items()}
    rec = recommend(cands, problems)
    if len(rec):
        rec.insert(1, f"budget_{key}", [targets[t] for t in rec["budget"]])
    return rec


# the folder is built beside ``out`` and put in place last; its caches seed the build
@atomic_output_dir("out", seed=("table.csv", "table.csv.meta.json", "measured.json", "estimator-cache", "evolve"))
def measured_frontier(
    model: torch.nn.Module, calib, metric: Metric, *, estimator: str = DEFAULT_RECIPE["estimator"],
    solver: str = DEFAULT_RECIPE["solver"], options=None, validate: int = 5,
    points: int | None = DEFAULT_POINTS, key: str = "avg_bits", budget: Budget | None = None, budgets=(),
    match_uniform: bool = True, estimator_params: dict | None = None, solver_params: dict | None = None,
    estimate_kwargs: dict | None = None, min_rank_correlation: float = 0.5,
    refine: int = DEFAULT_RECIPE["refine"], refine_method: str = DEFAULT_RECIPE["refine_method"],
    refine_evals: int | None = None, refine_params: dict | None = None, refine_metric=None, refine_targets=None,
    out=None, plans_dir=None, plot=None, plots: bool = True, progress: bool = True, n_points: int | None = None,
    workers: int = 1, target=None,
) -> FrontierRun:
    """Estimate, solve, measure, compare with uniform, refine and recommend (see the module doc).

    ``points`` (old name ``n_points``) frontier budgets of ``key``; ``budget``: constraints, bounds,
    pins, ties at every point (its ``key`` constraint and ``budgets`` are target budgets, like the
    uniform sizes when ``match_uniform``); ``refine`` rounds of ``refine_method`` (``calibrate``,
    ``local``, ``both``) within ``refine_evals`` measured plans, ``refine_params`` for
    :func:`mpsearch.refine.refine`; ``refine_targets``: the target labels to refine (default: all);
    ``refine_metric``: what ``evolve`` measures its children with, a :class:`~mpsearch.metrics.Metric`
    on data apart from ``metric``'s (or a list of them on growing data, cheapest first: multi-step
    selection); default ``metric``'s measurement on ``calib`` (:meth:`~mpsearch.metrics.Metric.on_data`).
    ``plans_dir``/``plot``: extra copies of the plans and the plot.
    ``workers``: processes measuring plans (under ``torchrun`` the ranks share them; rank 0 writes).
    ``options``: the options to cost; ``None`` (default): the recipe's (:func:`mpsearch.recipe.recipe_options`:
    the ``llm`` preset for a causal LM, else per-channel int2..int8), or with ``target`` its default set.
    ``target``: the consumer (:mod:`mpsearch.targets`): its options, per-layer rules and runtime
    ties; its own recipes (llama.cpp's pure types and built-in mixes...) are measured beside the
    uniform plans, and solved at.
    """
    points = n_points if n_points is not None else points
    options, estimate_kwargs = _with_target(target, options, estimate_kwargs)
    if options is None:  # the recipe's options for this model: the llm preset for a causal LM
        from .recipe import recipe_options
        from .specs import is_causal_lm

        options = recipe_options(is_causal_lm(model))
    _check_args(metric, validate, points, refine, refine_method, refine_evals)
    _check_refine_params(refine_params)
    if refine_metric is not None and refine_method != "evolve":
        raise MpsearchError(f"refine_metric is what refine_method='evolve' measures with; refine_method "
                            f"{refine_method!r} measures with the metric itself: drop refine_metric")
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    table = estimate_cached(model, calib, estimator=estimator, options=options,
                            estimator_params=estimator_params, progress=progress,
                            cache=out / "table.csv" if out else None, **(estimate_kwargs or {}))
    slv = get_solver(solver, **(solver_params or {}))
    from .targets import solve_budget

    budget = solve_budget(table, budget or Budget(), target)
    uniform = uniform_plans(table, key, Budget(constraints={k: v for k, v in budget.constraints.items() if k != key}))
    uniform.update(_recipe_baselines(table, target, model, key, budget))
    targets, base = _targets(table, key, budget, uniform, budgets, match_uniform)
    to_refine = _refine_targets(targets, refine_targets)
    front, plans, results = predicted_frontier(table, slv, key=key, points=points, budget=base, targets=targets,
                                               progress=progress)
    chosen = set(spread(front["avg_bits"], validate)) | set(front.index[front["at_budget"] != ""])

    metric.fit(model)
    baseline = float(metric(model))
    context = json.dumps({"table": table.metadata.get("pipeline_key"), "metric": metric.name,
                          "model": table.metadata.get("model", {}).get("fingerprint"),
                          "eval": _metric_key(metric), "baseline": repr(baseline)})
    mcache = _MeasureCache(out / "measured.json" if out else None, context)
    measured = _measure_all(model, metric, front, plans, uniform, chosen, mcache, progress, workers)
    front, uframe = _frames(table, metric, baseline, front, measured, chosen, uniform, key, plans)
    front = compare_with_uniform(front, uframe)
    losers = _warn_losers(front, metric.name)
    proxy = proxy_check(front, uframe, estimator, min_rank_correlation)

    refined, rframe, log = {}, pd.DataFrame(), pd.DataFrame()
    if refine and to_refine and refine_method == "evolve" and refine_metric is None:
        refine_metric = _search_metric(metric, calib)
    if refine and to_refine:
        refined, rframe, log = _refine(table, slv, to_refine, base, key, model, metric, baseline, mcache, front,
                                       plans, uniform, measured, refine, refine_method, refine_evals,
                                       dict(refine_params or {}), refine_metric, out, progress)
        if len(rframe):
            rframe = compare_with_uniform(rframe, uframe)
    rec = _recommendations(table, metric, targets, base, key, front, plans, uframe, uniform, refined, rframe)
    run = FrontierRun(table=table, frontier=front, uniform=uframe, baseline=baseline, metric=metric.name,
                      metric_label=metric.label, higher_is_better=metric.higher_is_better, proxy=proxy,
                      plans={int(front.loc[i, "point"]): plans[i] for i in front.index}, recommended=rec,
                      refinement=log, refined=refined, refined_frame=rframe, results=results, key=key, out=out,
                      uniform_check={"validated": int(front["validated"].sum()), "warnings": losers,
                                     **front["beats_uniform"].map({True: "beats_uniform", False: "loses"})
                                     .value_counts().reindex(["beats_uniform", "loses"], fill_value=0)
                                     .astype(int).to_dict()})
    if out is not None and _is_main():
        _write(run, out, plots=plots, settings={"estimator": estimator, "solver": solver, "options": str(options),
                                                "validate": validate, "points": points, "key": key,
                                                "budget": base.to_dict(), "refine": refine,
                                                "refine_method": refine_method, "refine_evals": refine_evals})
    if _is_main():
        _extra_outputs(run, plans_dir, plot)
    return run


def _with_target(target, options, estimate_kwargs):
    """The options and estimate() keywords for ``target`` (its default set when ``options`` is None,
    or the default recipe's string as before)."""
    if target is None:
        return options, estimate_kwargs
    from .targets import DEFAULT_TARGET, get_target

    chosen = get_target(target)
    kwargs = {**(estimate_kwargs or {}), "target": chosen.name}
    if chosen.name != DEFAULT_TARGET and options in (None, DEFAULT_RECIPE["options"]):
        options = ",".join(chosen.default_options)
    return options, kwargs


def _recipe_baselines(table: CostTable, target, model, key: str, budget: Budget) -> dict:
    """recipe name -> (plan, its use of ``key``) for the target's own recipes that are not uniform
    plans already (llama.cpp: pure types with fallbacks, built-in mixes)."""
    if target is None:
        return {}
    from .layers import discover_layers
    from .targets import recipe_plans

    wanted = set(table.layers)
    layers = [lay for lay in discover_layers(model, include_embedding=True) if lay.name in wanted]
    problem, con = _key_of(table, key, Budget(constraints={k: v for k, v in budget.constraints.items() if k != key}))
    index = {o: k for k, o in enumerate(problem.option_names)}
    item_of = {n: i for i, members in enumerate(problem.items) for n in members}
    out = {}
    for name, plan in recipe_plans(table, target, layers).items():
        if name.startswith("pure-") and name[5:] in table.options and all(
                plan.option(n).name == name[5:] for n in table.layers):
            continue  # the uniform plan of that option, already a baseline
        choice = {}
        for n in table.layers:
            choice.setdefault(item_of[n], set()).add(plan.option(n).name)
        if any(len(v) > 1 for v in choice.values()):
            continue  # the recipe breaks a tie the solver must keep: not comparable
        use = sum(float(problem.resources[con.column][i, index[next(iter(v))]]) for i, v in choice.items())
        out[name] = (plan, con.to_user(use))
    return out


def _extra_outputs(run: FrontierRun, plans_dir, plot) -> None:
    if plans_dir is not None:
        d = Path(plans_dir)
        d.mkdir(parents=True, exist_ok=True)
        for point, plan in run.plans.items():
            plan.save(d / f"point_{point:04d}.json")
        for ref, plan in run.refined.items():
            plan.save(d / f"{ref}.json")
    if plot is not None:
        import matplotlib

        if "matplotlib.pyplot" not in sys.modules:  # headless default; keep a notebook's own backend
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from . import plotting

        fig = plotting.plot_measured_frontier(run)
        fig.savefig(plot, dpi=110, bbox_inches="tight")
        plt.close(fig)


def _write(run: FrontierRun, out: Path, *, plots: bool, settings: dict) -> None:
    """Plans go to a staging folder renamed to ``plans/`` last, so a failure leaves no partial set."""
    import shutil

    stage = out / ".plans.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    front = run.frontier.copy()
    front["plan"] = ""
    for i, row in front.iterrows():
        name = f"point-{int(row['point']):02d}-{row['avg_bits']:.3f}bits.json"
        run.plans[int(row["point"])].save(stage / name)
        front.loc[i, "plan"] = f"plans/{name}"
    for ref, plan in run.refined.items():
        plan.save(stage / f"{ref}.json")
    run.frontier = front
    files = {"table": "table.csv", "frontier": "frontier.csv", "uniform": "uniform.csv",
             "recommended": "recommended.csv", "plans": "plans/"}
    if plots:
        files.update(_plots(run, out))
    if len(run.refined_frame):
        atomic_write_text(out / "refined.csv", run.refined_frame.to_csv(index=False))
        files.update(refined="refined.csv")
    if len(run.refinement):  # the log, also when no refined plan came out of it
        atomic_write_text(out / "refinement.csv", run.refinement.to_csv(index=False))
        files.update(refinement="refinement.csv")
    atomic_write_text(out / "uniform.csv", run.uniform.to_csv(index=False))
    atomic_write_text(out / "recommended.csv", run.recommended.to_csv(index=False))
    summary = {"metric": run.metric, "metric_label": run.metric_label, "baseline": run.baseline,
               "higher_is_better": run.higher_is_better, "proxy": run.proxy, "settings": settings,
               "points": len(front), "validated": int(front["validated"].sum()),
               "uniform_check": run.uniform_check,
               "per_point": _records(front[front["validated"]], ["point", "avg_bits", "measured_loss", "beats_uniform",
                                                                 "uniform_at_size", "uniform_loss", "vs_uniform_line"]),
               "recommended": _records(run.recommended, list(run.recommended.columns)),
               "refinement": _records(run.refinement, list(run.refinement.columns)),
               "files": files}
    shutil.rmtree(out / "plans", ignore_errors=True)
    stage.rename(out / "plans")
    atomic_write_text(out / "frontier.csv", front.to_csv(index=False))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=_jsonable))
    run.files = {k: str(out / v) for k, v in files.items()}


def _jsonable(v):
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    return float(v)


def _records(frame: pd.DataFrame, cols) -> list:
    if not len(frame):
        return []
    sub = frame[[c for c in cols if c in frame]].astype(object)
    return sub.where(pd.notna(sub), None).to_dict("records")


def _plots(run: FrontierRun, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from . import plotting

    front = run.frontier
    fig = plotting.plot_measured_frontier(run)
    fig.savefig(out / "frontier.png", dpi=110, bbox_inches="tight")
    val = front[front["validated"]]
    best = val.iloc[len(val) // 2] if len(val) else front.iloc[len(front) // 2]
    fig2 = plotting.plot_plan_bits(run.plans[int(best["point"])], run.table)
    fig2.savefig(out / "plan_bits.png", dpi=110, bbox_inches="tight")
    fig3 = plotting.plot_sensitivity(run.table)
    fig3.savefig(out / "sensitivity.png", dpi=110, bbox_inches="tight")
    for f in (fig, fig2, fig3):
        plt.close(f)
    return {"frontier_plot": "frontier.png", "plan_plot": "plan_bits.png", "sensitivity_plot": "sensitivity.png"}


# ----------------------------------------------------------------------- from specs (the CLI)
ZOO_DATA = {"minilm": "shakespeare", "fashion-cnn": "fashion-mnist", "digits-mlp": "digits"}


def _zoo_eval(spec: str, tokenizer):
    from . import zoo

    if spec == "minilm":
        return zoo.minilm_batches(zoo.shakespeare_lines(64, "eval", seed=1), 32, 48, tokenizer=tokenizer)
    if spec == "fashion-cnn":
        return zoo.fashion_batches("test", n=2000, batch_size=500)
    if spec == "digits-mlp":
        return zoo.digits_batches("test")
    return None


def build_metric(name, model, evals):
    """A :class:`~mpsearch.metrics.Metric` from a name (``None``: by model), or a
    ``package.module:callable`` returning ``fn(model) -> float``."""
    from .data import first_batch
    from .metrics import FunctionMetric, default_metric_name, make_metric
    from .specs import _load_callable

    if name and ":" in name:
        return FunctionMetric(_load_callable(name, "metric"))
    if evals is None:
        raise MpsearchError("evaluation data is required for this model: calibration and evaluation data "
                            "must be disjoint (give --eval-data, or --metric package.module:callable)")
    name = name or default_metric_name(model, first_batch(evals))
    if name == "perplexity":
        from .metrics import token_ids

        evals = token_ids(evals)  # padding left out
    return make_metric(name, evals)


def model_frontier(model: str, *, data: str | None = None, eval_data: str | None = None,
                   metric: str | None = None, device_map=None, device=None, dtype=None, seq_len=None,
                   calib_samples=None, eval_tokens=None, eval_window=None, eval_stride=None, batch_size=8,
                   **kwargs) -> FrontierRun:
    """:func:`measured_frontier` from specs: a model spec (HF directory, ``package.module:callable``,
    ``file.py:callable`` or a zoo name), calibration and evaluation data specs (defaults for the zoo
    models), a metric name, an accelerate ``device_map`` (``auto``, ``balanced``, JSON), the model's
    ``device``/``dtype`` and the sizes of tokenized text (see :func:`mpsearch.specs.load_calibration`,
    :func:`mpsearch.specs.load_metric`); ``kwargs`` go to :func:`measured_frontier`."""
    from .distributed import current, load_device_map, place_model
    from .specs import _is_text, load_calibration, load_data, load_metric, load_model, load_tokenizer, tokenizer_for

    net = load_device_map(model, device_map) if device_map else load_model(model, device=device, dtype=dtype)
    place_model(net, current())  # under torchrun: ranks share the estimate and the measurements
    if model == "smollm2" or _is_text(data) or _is_text(eval_data):  # text: the model's own tokenizer
        tok = tokenizer_for(model)
        sizes = dict(seq_len=seq_len, batch_size=batch_size, tokenizer=tok)
        calib = load_calibration(data or "shakespeare", net, model, samples=calib_samples, **sizes)
        if metric and ":" in str(metric):
            m = build_metric(metric, net, None)
        else:
            m = load_metric(metric, eval_data or ("shakespeare" if model == "smollm2" else None), net, model,
                            eval_tokens=eval_tokens, window=eval_window, stride=eval_stride, **sizes)
        return measured_frontier(net, calib, m, **kwargs)
    from .specs import is_causal_lm

    if is_causal_lm(net) and eval_data and not (metric and ":" in str(metric)):  # token ids (.pt, callables)
        calib = load_calibration(data, net, model, seq_len=seq_len, samples=calib_samples, batch_size=batch_size)
        m = load_metric(metric, eval_data, net, model, eval_tokens=eval_tokens, window=eval_window,
                        stride=eval_stride, batch_size=batch_size, seq_len=seq_len)
        return measured_frontier(net, calib, m, **kwargs)
    tokenizer = load_tokenizer(model) if model == "minilm" or Path(model).is_dir() else None
    calib = load_data(data, tokenizer=tokenizer) if data else None
    if calib is None and model in ZOO_DATA:
        calib = load_data(ZOO_DATA[model])
    evals = load_data(eval_data, tokenizer=tokenizer) if eval_data else _zoo_eval(model, tokenizer)
    return measured_frontier(net, calib, build_metric(metric, net, evals), **kwargs)




def run_demo(out="mpsearch-demo", *, estimator=DEFAULT_RECIPE["estimator"], solver=DEFAULT_RECIPE["solver"],
             validate=DEMO_DATA["validate"], progress=True, device=None, dtype=None, **kwargs) -> FrontierRun:
    """``mpsearch demo``: the default recipe on all-MiniLM-L6-v2 with Shakespeare text (calibration and
    evaluation passages from different plays; quality = embedding cosine to the fp32 model)."""
    from . import zoo
    from .metrics import EmbeddingCosine

    torch.manual_seed(0)
    from .specs import load_model

    model, tok = zoo.load_minilm()
    model = load_model(model, device=device, dtype=dtype)
    calib = zoo.minilm_batches(zoo.shakespeare_lines(DEMO_DATA["calib"], "calib"), 16,
                               DEMO_DATA["max_length"], tokenizer=tok)
    evals = zoo.minilm_batches(zoo.shakespeare_lines(DEMO_DATA["eval"], "eval", seed=1), 32,
                               DEMO_DATA["max_length"], tokenizer=tok)
    return measured_frontier(model, calib, EmbeddingCosine(evals), estimator=estimator, solver=solver,
                             validate=validate, out=out, progress=progress, **kwargs)
