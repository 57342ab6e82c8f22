""":func:`measured_frontier`: the measured path from a model in memory, step after step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..budget import Budget
from ..diagnose import monotone_fit
from ..errors import MpsearchError
from ..fileio import atomic_output_dir
from ..imatrix import run_rounding
from ..metrics import Metric
from ..recipe import estimator_note, resolve
from ..registry import get_solver
from ..sensitivity.base import on_gpu
from ..targets import solve_budget
from .estimate import estimate_cached
from .measure import (baseline, frontier_frame, is_main, measure_spread, MeasureCache, metric_key,
                      proxy_check, uniform_frame)
from .outputs import extra_outputs, write
from .predicted import (merge_equal, other_constraints, predicted_frontier, recipe_baselines, spread,
                        target_budgets, uniform_plans)
from .recommend import recommendations
from .refining import refine_targets, run_refinement, search_metric
from .result import FrontierRun, Measured, Session
from .settings import check_refine_metric, FrontierSettings
from .uniform import compare_with_uniform, uniform_check, warn_losers


# the folder is built beside ``out`` and put in place last; its caches seed the build
@atomic_output_dir("out", seed=("table.csv", "table.csv.meta.json", "measured.json", "estimator-cache", "evolve"))
def measured_frontier(model: torch.nn.Module, calib, metric: Metric, settings: FrontierSettings | None = None, *,
                      refine_metric=None, out=None, plans_dir=None, plot=None, **kwargs) -> FrontierRun:
    """Estimate, solve, measure, compare with uniform, refine and recommend (see :mod:`mpsearch.measured`).

    ``settings``: a :class:`FrontierSettings`, or its fields as keywords (``estimator``, ``solver``,
    ``options``, ``target``, ``validate``, ``points``, ``key``, ``budget``, ``budgets``,
    ``match_uniform``, ``estimator_params``, ``solver_params``, ``estimate_kwargs``,
    ``min_rank_correlation``, ``plots``, ``progress``, ``workers``), and the refinement's as
    ``refine`` (rounds), ``refine_method``, ``refine_evals``, ``refine_targets``, ``refine_params``.

    ``points`` frontier budgets of ``key``; ``budget``: constraints, bounds, pins, ties at every
    point (its ``key`` constraint and ``budgets`` are target budgets, like the uniform sizes when
    ``match_uniform``); ``refine`` rounds of ``refine_method`` (``calibrate``, ``local``, ``both``,
    ``evolve``) within ``refine_evals`` measured plans at ``refine_targets`` (default: all);
    ``refine_metric``: what ``evolve`` measures its children with, a :class:`~mpsearch.metrics.Metric`
    on data apart from ``metric``'s (or a list of them on growing data, cheapest first: multi-step
    selection); default ``metric``'s measurement on ``calib`` (:meth:`~mpsearch.metrics.Metric.on_data`).
    ``out``: the output folder; ``plans_dir``/``plot``: extra copies of the plans and the plot.
    ``workers``: processes measuring plans (under ``torchrun`` the ranks share them; rank 0 writes).
    ``options``: the options to cost; ``None`` (default): the recipe's (:func:`mpsearch.recipe.resolve`:
    the ``llm`` preset for a causal LM, else per-channel int2..int8; a consumer target's default set).
    ``target``: the consumer (:mod:`mpsearch.targets`): its options, per-layer rules and runtime
    ties; its own recipes (llama.cpp's pure types and built-in mixes...) are measured beside the
    uniform plans, and solved at. ``imatrix`` (llama.cpp): ``"auto"`` (default) computes the importance
    matrix of ``calib`` and rounds the whole run with it (:func:`mpsearch.imatrix.run_rounding`;
    written to ``out/imatrix.gguf``), ``None`` rounds without one, or an Imatrix or its file.
    """
    st = FrontierSettings.from_kwargs(settings, **kwargs)
    if not isinstance(metric, Metric):
        raise MpsearchError(f"metric must be an mpsearch.metrics.Metric, got {type(metric).__name__}; "
                            f"build one with mpsearch.metrics.make_metric")
    check_refine_metric(st, refine_metric)
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    with run_rounding(st.imatrix, model, calib, st.target, out=out if is_main() else None,
                      progress=st.progress) as imatrix:
        recipe = resolve(target=st.target, options=st.options, estimator=st.estimator, model=model,
                         imatrix=imatrix is not None, gpu=on_gpu(model))
        if estimator_note(recipe) and st.progress and is_main():  # said before the work, with the progress bars
            from tqdm.auto import tqdm

            tqdm.write(estimator_note(recipe), file=sys.stderr)
        table = estimate_cached(model, calib, estimator=recipe.estimator, options=recipe.options,
                                estimator_params=st.estimator_params, progress=st.progress,
                                cache=out / "table.csv" if out else None,
                                **{**st.estimate_kwargs, **({"target": st.target} if st.target is not None else {}),
                                   "imatrix": imatrix})
        if st.monotone:  # solved on the fit (each layer's damage falling with size); table.csv keeps the estimate

            table = monotone_fit(table)
        session, measured, targets, results = _solve_and_measure(model, metric, table, st, out)
        to_refine = refine_targets(targets, st.refine.targets)
        front = compare_with_uniform(measured.front, measured.uframe)
        measured.front = front
        losers = warn_losers(front, metric.name, measured.uframe)
        proxy = proxy_check(front, measured.uframe, recipe.estimator, st.min_rank_correlation)
        log = _refine(session, measured, to_refine, st, refine_metric, calib, out)
    run = FrontierRun(table=table, frontier=front, uniform=measured.uframe, baseline=session.baseline,
                      baseline_values=session.baseline_values, metric=metric.name, metric_label=metric.label,
                      higher_is_better=metric.higher_is_better, proxy=proxy,
                      plans={int(front.loc[i, "point"]): measured.plans[i] for i in front.index},
                      recommended=recommendations(session, targets, measured), refinement=log,
                      refined=measured.refined, refined_frame=measured.rframe, results=results, key=st.key, out=out,
                      uniform_check=uniform_check(front, losers),
                      baselines={name: plan for name, (plan, _use) in measured.uniform.items()})
    if out is not None and is_main():
        write(run, out, plots=st.plots, settings=_summary_settings(st, recipe, session.base))
    if is_main():
        extra_outputs(run, plans_dir, plot)
    return run


def _solve_and_measure(model, metric, table, st: FrontierSettings, out):
    """Steps 2-3: the solver, the budgets, the uniform plans and recipes, the predicted frontier,
    the full-precision baseline, then every chosen point and baseline plan measured (cached)."""
    solver = get_solver(st.solver, **st.solver_params)
    key = st.key
    budget = solve_budget(table, st.budget, st.target)
    uniform = uniform_plans(table, key, other_constraints(budget, key))
    uniform.update(recipe_baselines(table, st.target, model, key, budget))
    uniform, aliases = merge_equal(uniform)  # a recipe that is a uniform plan: measured and listed once
    targets, base = target_budgets(table, key, budget, uniform, st.budgets, st.match_uniform)
    refine_targets(targets, st.refine.targets)  # an unknown label is refused before the work
    front, plans, results = predicted_frontier(table, solver, key=key, points=st.points, budget=base,
                                               targets=targets, progress=st.progress)
    chosen = set(spread(front["avg_bits"], st.validate)) | set(front.index[front["at_budget"] != ""])
    value, values = baseline(model, metric)
    context = json.dumps({"table": table.metadata.get("pipeline_key"), "metric": metric.name,
                          "model": table.metadata.get("model", {}).get("fingerprint"),
                          "eval": metric_key(metric), "baseline": repr(value)})
    cache = MeasureCache(out / "measured.json" if out else None, context)
    session = Session(model, metric, value, table, solver, key, base, cache, st.progress, st.workers, values)
    work = [("point", i) for i in sorted(chosen)] + [("uniform", o) for o in uniform]
    todo = [plans[ref] if kind == "point" else uniform[ref][0] for kind, ref in work]
    by_plan = dict(zip(work, measure_spread(model, todo, metric, cache, workers=st.workers, progress=st.progress)))
    measured = Measured(frontier_frame(table, metric, value, front, by_plan, chosen, plans), plans, uniform,
                        uniform_frame(table, metric, value, by_plan, uniform, key, aliases), by_plan)
    return session, measured, targets, results


def _refine(session: Session, measured: Measured, targets: dict, st: FrontierSettings, refine_metric, calib, out):
    """Step 5 (with ``refine`` rounds): the refined plans and their rows into ``measured``; the log.
    ``evolve`` searches with ``refine_metric``, by default the metric on the calibration data."""
    import pandas as pd

    if not (st.refine.rounds and targets):
        return pd.DataFrame()
    search_with = refine_metric
    if search_with is None and st.refine.method == "evolve":
        search_with = search_metric(session.metric, calib)
    measured.refined, rframe, log = run_refinement(session, measured, targets, st.refine, search_with, out)
    measured.rframe = compare_with_uniform(rframe, measured.uframe) if len(rframe) else rframe
    return log


def _summary_settings(st: FrontierSettings, recipe, base: Budget) -> dict:
    return {"estimator": recipe.estimator, "solver": st.solver, "options": str(recipe.options),
            "validate": st.validate, "points": st.points, "key": st.key, "budget": base.to_dict(),
            "refine": st.refine.rounds, "refine_method": st.refine.method, "refine_evals": st.refine.max_evals,
            "monotone": st.monotone}
