""":func:`refine`: rounds of one method over every target budget, within a measurement budget."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..budget import Budget
from ..errors import MpsearchError
from ..plan import BitPlan
from ..problem import compile_problem, Problem
from ..solvers.base import make_plan
from ..table import CostTable
from .calibration import calibrate, Calibration
from .evolution import evolve
from .local import local_search
from .settings import _settings, RefineSettings


@dataclass
class Refinement:
    """What :func:`refine` returns: the best measured plan per target and the per-round log."""

    best: dict = field(default_factory=dict)  # target label -> (plan, loss, source)
    log: list = field(default_factory=list)
    evals: int = 0
    calibration: Calibration | None = None


def _choice_of(problem: Problem, plan: BitPlan) -> np.ndarray:
    names = problem.option_names
    return np.array([names.index(plan.option_name(m[0])) for m in problem.items])


def refine(table: CostTable, solver, targets: dict, history: list, measure, settings: RefineSettings | None = None,
           *, base_budget: Budget | None = None, key: str = "avg_bits", search=None, **kwargs) -> Refinement:
    """Measure -> recalibrate -> re-solve for ``rounds`` rounds over every target budget.

    ``targets``: label -> budget value of ``key`` (e.g. ``{"int4-asym": 4.03}``). ``history``: the
    ``(plan, loss)`` pairs measured so far (uniform plans included); it grows as plans are measured.
    ``measure(plan) -> loss`` applies and measures a plan (lower is better). ``settings``: a
    :class:`RefineSettings` (or its fields as keywords: ``rounds``, ``method``, ``max_evals`` (the
    most plans measured in all; ``None``: no limit beyond ``rounds``), ``swaps``, ``groups``,
    ``ridge``...).

    ``method="evolve"``: ``rounds`` generations of :func:`evolve` per target from the best measured
    plan that fits, ``search(plan, level) -> loss`` measuring the children on ``levels`` rungs of
    search data (default: ``measure`` itself, one rung; a search object's own ``levels``); its
    ``offspring``, ``survivors`` (default: a quarter per rung), ``seed``, ``max_switches`` and
    ``time_limit`` (seconds per target) come from the settings; with ``checkpoint_dir`` each
    target's search keeps its checkpoint there (``evolve-<target>.json``, resumed when ``context``
    and the rest match). Only each target's result is measured with ``measure`` and joins
    ``history``; ``max_evals`` counts every measurement (search and ``measure``) and is shared evenly
    by the targets. A ``search`` with a ``restore()`` method (:class:`mpsearch.measured.SearchLadder`)
    has it called after each target's search. The run's own keywords: ``levels``,
    ``checkpoint_dir``, ``context`` and ``progress``.
    """
    run = {k: kwargs.pop(k) for k in ("levels", "checkpoint_dir", "context", "progress") if k in kwargs}
    st = _settings(settings, kwargs)
    st.check_column(table.resource_columns)
    refiner = _Refiner(table, solver, targets, history, measure, st, base_budget or Budget(), key)
    if st.method == "evolve":
        refiner.evolve_all(search, **run)
    else:
        refiner.rounds()
    return refiner.out


class _Refiner:
    """The state :func:`refine` shares between its steps: the problems of the target budgets, the
    measured plans (``known``, ``history``), the moves tried and the result being built."""

    def __init__(self, table, solver, targets, history, measure, st: RefineSettings, base: Budget, key: str):
        self.table, self.solver, self.targets, self.history, self.measure, self.st = \
            table, solver, targets, history, measure, st
        self.known = {plan_key(p): float(loss) for p, loss in history}
        self.out = Refinement()
        self.budgets = {t: base.with_constraints(**{key: v}) for t, v in targets.items()}
        self.problems = {t: compile_problem(table, b) for t, b in self.budgets.items()}
        self.tried = {t: [] for t in targets}

    def fits(self, plan, t) -> bool:
        return self.problems[t].is_feasible(_choice_of(self.problems[t], plan))

    def best_fitting(self, t):
        ok = [(loss, p) for p, loss in self.history if self.fits(p, t)]
        return min(ok, key=lambda e: e[0]) if ok else (np.inf, None)

    def run_measure(self, plan) -> float:
        k = plan_key(plan)
        if k not in self.known:
            self.known[k] = float(self.measure(plan))
            self.history.append((plan, self.known[k]))
            self.out.evals += 1
        return self.known[k]

    def left(self) -> int | None:
        return None if self.st.max_evals is None else self.st.max_evals - self.out.evals

    # ------------------------------------------------------------------- calibrate, local, both
    def rounds(self) -> None:
        for r in range(1, self.st.rounds + 1):
            for t in self.targets:
                if self.left() is not None and self.left() <= 0:
                    break
                self.round(r, t)
        for t in self.targets:
            if t not in self.out.best:
                loss, p = self.best_fitting(t)
                self.out.best[t] = (p, loss)

    def round(self, r: int, t) -> None:
        before, _start = self.best_fitting(t)
        spent0 = self.out.evals
        if self.st.method in ("calibrate", "both"):
            self.calibrate_step(t)
        if self.st.method in ("local", "both") and (self.left() is None or self.left() > 0):
            self.local_step(t)
        after, best = self.best_fitting(t)
        self.out.log.append({"round": r, "budget": t, "method": self.st.method, "evals": self.out.evals - spent0,
                             "evals_total": self.out.evals, "loss_before": before, "loss_after": after,
                             "gain": (before - after) if np.isfinite(before) else np.nan})
        self.out.best[t] = (best, after)

    def calibrate_step(self, t) -> None:
        cal = calibrate(self.table, [p for p, _ in self.history], [loss for _, loss in self.history],
                        groups=self.st.groups, ridge=self.st.ridge)
        self.out.calibration = cal
        res = self.solver.solve(cal.apply(self.table), self.budgets[t])
        if res.plan is not None:
            self.run_measure(_restamp(res.plan, self.table, self.problems[t]))

    def local_step(self, t) -> None:
        _, start = self.best_fitting(t)
        if start is None:
            return
        prob = self.problems[t]
        cal = self.out.calibration
        cal_prob = prob if cal is None else compile_problem(cal.apply(self.table), self.budgets[t])
        local_search(cal_prob, _choice_of(prob, start), self.known[plan_key(start)],
                     lambda c: self.run_measure(_plan_from_choice(prob, c)), self.st, tried=self.tried[t],
                     rounds=1, max_evals=self.left())

    # ------------------------------------------------------------------------------ evolve
    def evolve_all(self, search=None, *, levels: int | None = None, checkpoint_dir=None, context: str = "",
                   progress: bool = False) -> None:
        """The ``evolve`` method, target by target (see :func:`refine`)."""
        if search is None:
            search, levels = (lambda plan, level: self.measure(plan)), 1  # noqa: E731
        levels = int(levels if levels is not None else getattr(search, "levels", 1))
        if levels < 1:
            raise MpsearchError(f"evolve: levels must be >= 1 (rungs of search data), got {levels}")
        st = self.st
        if st.survivors is None:
            st = st.replace(survivors=tuple(max(1, st.offspring // 4 ** k) for k in range(1, levels)))
        if len(st.survivors) != levels - 1:
            raise MpsearchError(f"evolve: survivors needs one count per rung after the first ({levels - 1}), "
                                f"got {st.survivors}")
        order = list(self.targets)
        for n, t in enumerate(order):
            before, start = self.best_fitting(t)
            if start is None:
                continue
            share = None if self.left() is None else self.left() // (len(order) - n) - 1  # one left for measure
            if share is not None and share <= 0:
                break
            ckpt = None
            if checkpoint_dir is not None:
                from pathlib import Path

                Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
                ckpt = Path(checkpoint_dir) / f"evolve-{re.sub(r'[^A-Za-z0-9_.=-]+', '_', t)}.json"
            self.evolve_target(t, start, before, search, st.replace(max_evals=share), ckpt,
                               (f"{context}|{t}", levels, f"evolve {t}" if progress else False))

    def evolve_target(self, t, start, before, search, st, ckpt, run) -> None:
        """:func:`evolve` at target ``t`` from ``start`` (loss ``before``); ``run``: the search's
        context, its number of rungs and its progress bar."""
        context, levels, progress = run
        prob = self.problems[t]

        def lossf(choice, level):
            return search(_plan_from_choice(prob, choice, "refine-evolve"), level)

        choice, s_loss, glog = evolve(prob, _choice_of(prob, start), lossf, st, checkpoint=ckpt, context=context,
                                      progress=progress)
        if hasattr(search, "restore"):  # a search that switched plans into the model puts it back
            search.restore()
        base_evals = self.out.evals
        searched = glog[-1]["evals"]  # every plan the search measured, before a kill and resume too
        self.out.evals += searched
        plan = _plan_from_choice(prob, choice, "refine-evolve")
        plan.provenance["refine"] = "evolve"
        after_plan = self.run_measure(plan)
        measured = self.out.evals - base_evals - searched  # 0 when the search kept its start
        after, best = self.best_fitting(t)
        for prev, row in zip(glog, glog[1:]):  # the search loss, generation by generation
            self.out.log.append({"round": row["generation"], "budget": t, "method": "evolve", "data": "search",
                                 "evals": row["evals"] - prev["evals"], "evals_total": base_evals + row["evals"],
                                 "loss_before": prev["loss"], "loss_after": row["loss"],
                                 "gain": prev["loss"] - row["loss"]})
        self.out.log.append({"round": len(glog) - 1, "budget": t, "method": "evolve", "data": "evaluation",
                             # every plan the search measured, a resumed run's earlier ones too
                             "evals": glog[-1]["evals"] + measured, "evals_total": self.out.evals,
                             "loss_before": before, "loss_after": after_plan, "gain": before - after_plan,
                             "search_loss_before": glog[0]["loss"], "search_loss_after": s_loss,
                             "search_levels": levels})
        self.out.best[t] = (best, after)


def plan_key(plan: BitPlan) -> str:
    """A short hash of the plan's layer -> option mapping (plans with the same key are the same)."""
    import hashlib
    import json

    doc = {n: plan.option_name(n) for n in sorted(plan.bits)}
    return hashlib.sha1(json.dumps(doc).encode()).hexdigest()[:16]


def _plan_from_choice(problem: Problem, choice, solver: str = "refine-local") -> BitPlan:
    return make_plan(problem, choice, solver=solver, status="measured")


def _restamp(plan: BitPlan, table: CostTable, problem: Problem) -> BitPlan:
    """A plan solved on a calibrated table, with its predicted totals recomputed on ``table``."""
    choice = _choice_of(problem, plan)
    plan.predicted = problem.totals(choice)
    plan.provenance["refine"] = "calibrate"
    return plan
