"""Step 5 of the measured path: the refinement driver (:func:`mpsearch.refine.refine` on the plans
measured so far), with ``evolve``'s search data (:class:`SearchLadder`)."""

from __future__ import annotations

import json
import warnings

import pandas as pd

from ..apply import PlanSwitch
from ..errors import MpsearchError
from ..metrics import CausalLMMetric, Metric
from ..problem import compile_problem
from ..refine import _choice_of, refine, RefineSettings
from .measure import measure, metric_key
from .result import Measured, ProxyWarning, Session


def search_metric(metric: Metric, calib):
    """``evolve``'s default search metric: ``metric``'s measurement on the calibration data, or,
    where it has none (a user callable), ``metric`` itself with a warning (it then selects on the
    evaluation data). A causal LM's calibration text of 16 windows or more becomes a ladder of its
    first 1/16, 1/4 and all of its tokens (multi-step selection)."""
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


_search_metric = search_metric  # the older private name


def refine_targets(targets: dict, wanted) -> dict:
    """The targets to refine: all, or those ``wanted`` names (each must be one)."""
    if wanted is None:
        return targets
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    unknown = [w for w in wanted if w not in targets]
    if unknown:
        raise MpsearchError(f"refine_targets: no target budget named {unknown[0]!r}; the targets are "
                            f"{', '.join(targets) or 'none'}")
    return {t: targets[t] for t in wanted}


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


def run_refinement(session: Session, measured: Measured, targets: dict, settings: RefineSettings,
                   search_with=None, out=None) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Run :func:`mpsearch.refine.refine` from every plan measured so far at ``targets``; ``evolve``
    searches with ``search_with`` (a metric or a ladder of them) and checkpoints under ``out/evolve``.
    Returns (refined plans by ``refined-N``, their measured rows, the round log)."""
    metric, model = session.metric, session.model
    search, run = None, {}
    if settings.method == "evolve":  # the children measured in place, on the search data
        ladder = list(search_with) if isinstance(search_with, (list, tuple)) else [search_with]
        search = SearchLadder(model, session.table.layers, ladder)
        run = {"levels": search.levels, "progress": session.progress,
               "context": json.dumps([session.cache.context, [metric_key(m) for m in search.metrics]]),
               "checkpoint_dir": None if out is None else out / "evolve"}

    def loss_of(plan):
        if search is not None:
            search.restore()
        return metric.loss(measure(model, plan, metric, session.cache)["quality"], session.baseline)

    front = measured.front
    history = [(measured.plans[i], float(front.loc[i, "measured_loss"])) for i in front.index[front["validated"]]]
    history += [(u, metric.loss(measured.by_plan[("uniform", o)]["quality"], session.baseline))
                for o, (u, _) in measured.uniform.items()]
    n0 = len(history)
    try:
        res = refine(session.table, session.solver, targets, history, loss_of, settings, base_budget=session.base,
                     key=session.key, search=search, **run)
    finally:
        if search is not None:
            search.restore()
    return _refined_rows(session, history[n0:]) + (pd.DataFrame(res.log),)


def _refined_rows(session: Session, new: list) -> tuple[dict, pd.DataFrame]:
    """The plans the refinement measured, named ``refined-N``, with their measured rows."""
    metric = session.metric
    problem = compile_problem(session.table, session.base)
    refined, rows = {}, []
    for j, (plan, loss) in enumerate(new):
        ref = f"refined-{j}"
        m = measure(session.model, plan, metric, session.cache)
        pred = problem.totals(_choice_of(problem, plan))
        plan.predicted = pred
        refined[ref] = plan
        rows.append({"plan": ref, "method": plan.provenance.get("refine", "local"), "damage": pred["damage"],
                     "avg_bits": m["avg_bits"], **{k: v for k, v in m.items() if k.startswith("measured_")},
                     f"measured_{metric.name}": m["quality"], "measured_loss": loss,
                     "measured_size_bits": m["size_bits"]})
    return refined, pd.DataFrame(rows)
