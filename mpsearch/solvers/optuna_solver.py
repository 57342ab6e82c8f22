"""Optuna: TPE or NSGA-II over per-item option choices, resumable and shareable through storage.

Each item (a layer, or a tie group named by its first layer) is one categorical parameter over its
allowed options. The objective is the table's summed damage, or a user callable on the
:class:`~mpsearch.BitPlan` (measured quality). Budgets are Optuna constraints
(``use_c / cap_c − 1 <= 0``), which both samplers understand, and the answer is the best feasible
trial. With ``storage`` (an Optuna storage URL such as ``sqlite:///study.db``) the study is created or
loaded by name, so an interrupted search resumes where it stopped and several processes can work on
one study: each runs until the study holds ``n_trials`` finished trials. Optuna is imported here,
not by ``import mpsearch``.

Several workers (processes, or ranks of a ``torchrun`` job) on one storage complete exactly
``n_trials`` trials between them: a trial numbered after ``n_trials`` complete-or-running ones is
pruned unmeasured and stops its worker; a plan already measured in the study (or being measured by
a trial numbered before it) is not measured again, its value is reused (``user_attrs["same_as"]``);
each worker's sampler is seeded from ``(seed, worker)`` so workers do not propose the same plans;
the worker that creates the study evaluates the warm-start plans and adds them as finished trials
(enqueued trials popped by several workers of one RDB study race: optuna#4621).
``storage`` is an RDB URL (``sqlite:///study.db``, ``postgresql://...``) or ``journal:PATH`` for
Optuna's JournalStorage on a shared file.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from ..errors import MpsearchError
from ..problem import Problem
from .base import make_plan, Solution, Solver
from .greedy import greedy_choice

SAMPLERS = ("tpe", "nsga2")


class OptunaSolver(Solver):
    """Optuna search over the cost table (or a measured objective).

    Parameters
    ----------
    sampler:
        ``"tpe"`` or ``"nsga2"``.
    n_trials:
        Finished trials the study should hold (a resumed study runs only the remainder).
    seed:
        Sampler seed (runs without storage are deterministic).
    storage, study_name:
        Optuna storage URL and study name; the default name is derived from the problem, so the
        same table and budget resume the same study.
    timeout:
        Seconds for this call's trials (``None``: no limit).
    warm_start:
        Enqueue the greedy plan and the uniform plans as the first trials of a new study.
    objective:
        Optional callable ``objective(plan: BitPlan) -> float`` (lower is better) replacing the
        table's damage.
    worker:
        This worker's number when several share a study (seeds its sampler); default: the
        ``torchrun`` rank, else the process id, when ``storage`` is set.
    """

    name = "optuna"

    def __init__(self, *, sampler: str = "tpe", n_trials: int = 200, seed: int = 0, storage: str | None = None,
                 study_name: str | None = None, timeout: float | None = None, warm_start: bool = True,
                 objective=None, worker: int | None = None):
        self.worker = worker
        self.sampler = sampler
        self.n_trials = n_trials
        self.seed = seed
        self.storage = storage
        self.study_name = study_name
        self.timeout = timeout
        self.warm_start = warm_start
        self.objective = objective

    def _check(self):
        if self.sampler not in SAMPLERS:
            raise MpsearchError(f"optuna: sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise MpsearchError(f"optuna: n_trials must be a positive integer, got {self.n_trials!r}")
        if self.objective is not None and not callable(self.objective):
            raise MpsearchError("optuna: objective must be a callable taking a BitPlan and returning a float")

    def _solve(self, problem: Problem) -> Solution:
        self._check()
        try:
            import optuna
        except ImportError as exc:  # pragma: no cover - optuna is a dependency
            raise MpsearchError("solver 'optuna' needs the optuna package: pip install optuna") from exc
        optuna.logging.set_verbosity(optuna.logging.WARNING)

        N = problem.n_items
        idx = np.arange(N)
        names = [members[0] for members in problem.items]
        choices = [[problem.option_names[k] for k in np.flatnonzero(row)] for row in problem.allowed]
        opt_index = {o: k for k, o in enumerate(problem.option_names)}
        caps = problem.caps()
        cm = problem.constraint_matrix()
        scale = np.maximum(np.abs(caps), 1e-300)

        def violations(choice):
            use = cm[:, idx, choice].sum(axis=1) if len(cm) else np.zeros(0)
            return ((use - caps) / scale).tolist()

        def evaluate(choice):
            if self.objective is not None:
                return float(self.objective(make_plan(problem, choice, solver=self)))
            return float(problem.damage[idx, choice].sum())

        def objective(trial):
            choice = np.array([opt_index[trial.suggest_categorical(n, c)] for n, c in zip(names, choices)])
            values = violations(choice)
            trial.set_user_attr("constraints", values)
            if new_api:  # optuna >= 5: samplers read the trial's constraints
                for c, v in zip(problem.constraints, values):
                    trial.set_constraint(c.key, v)
            if shared:
                reused = _claim(trial, self.n_trials, optuna)
                if reused is not None:
                    return reused
            return evaluate(choice)

        def constraints(trial):
            return trial.user_attrs.get("constraints", [1.0])

        new_api = hasattr(optuna.trial.Trial, "set_constraint")
        shared = self.storage is not None
        seed = self._worker_seed() if shared else self.seed
        kw = {"seed": seed} if new_api else {"seed": seed, "constraints_func": constraints}
        sampler = optuna.samplers.TPESampler(**kw) if self.sampler == "tpe" else optuna.samplers.NSGAIISampler(**kw)
        name = self.study_name or "mpsearch-" + _fingerprint(problem)
        study, created = self._open_study(optuna, name, sampler)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if self.warm_start and not shared and not study.trials:
            for plan in _start_plans(problem):
                study.enqueue_trial({n: problem.option_names[k] for n, k in zip(names, plan)})
        elif self.warm_start and shared and created:
            self._add_start_plans(optuna, study, problem, dict(zip(names, choices)),
                                  lambda plan: (evaluate(plan), violations(plan)))
            done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        remaining = self.n_trials - len(done)
        if remaining > 0:
            study.optimize(
                objective, n_trials=remaining, timeout=self.timeout,
                callbacks=[optuna.study.MaxTrialsCallback(self.n_trials, states=(optuna.trial.TrialState.COMPLETE,))],
            )
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        feasible = [t for t in done if all(v <= 1e-9 for v in t.user_attrs.get("constraints", [1.0]))]
        stats = {"trials": len(done), "study_name": name, "resumed_from": len(done) - max(remaining, 0)}
        if not feasible:
            return Solution(None, "infeasible", f"none of {len(done)} trials met the budget; raise n_trials", stats)
        best = min(feasible, key=lambda t: (t.value, t.number))
        choice = np.array([opt_index[best.params[n]] for n in names])
        if self.objective is not None:
            stats["objective"] = float(best.value)
        return Solution(choice, "feasible", stats=stats)

    def _add_start_plans(self, optuna, study, problem: Problem, choices: dict, score) -> None:
        """The start plans added whole to a shared study, evaluated here: several workers popping
        enqueued trials of one RDB study race (optuna#4621), so the worker that created the study
        adds them. ``choices``: item name -> its options; ``score(choice) -> (value, violations)``."""
        names = list(choices)
        dists = {n: optuna.distributions.CategoricalDistribution(c) for n, c in choices.items()}
        live = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
        for plan in _start_plans(problem):
            params = {n: problem.option_names[k] for n, k in zip(names, plan)}
            trials = study.get_trials(deepcopy=False, states=live)
            if len(trials) >= self.n_trials:
                break
            if any(t.params == params for t in trials):
                continue
            value, violations = score(np.asarray(plan))
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value,
                                                      user_attrs={"constraints": violations}))

    def _worker_seed(self) -> int:
        """A shared study's sampler seed: distinct per worker (rank, or process id), reproducible."""
        from .. import distributed  # start-up: keeps this module free of torch
        from ..sensitivity.base import probe_seed  # start-up: keeps this module free of torch

        worker = self.worker
        if worker is None:
            shard = distributed.current()
            worker = shard.rank if shard.enabled else os.getpid()
        return probe_seed(self.seed, int(worker)) % (2**32)

    def _open_study(self, optuna, name: str, sampler):
        """The study ``name`` in the storage (created, or loaded when it exists): ``(study, created)``."""
        try:
            storage = self.storage
            if isinstance(storage, str):
                from ..distributed import optuna_storage  # start-up: keeps the solvers free of torch

                storage = optuna_storage(storage)
            try:
                return optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                           direction="minimize"), True
            except optuna.exceptions.DuplicatedStudyError:
                return optuna.load_study(study_name=name, storage=storage, sampler=sampler), False
        except MpsearchError:
            raise
        except Exception as exc:  # bad URLs raise storage-specific errors (sqlalchemy, redis...)
            raise MpsearchError(f"optuna: cannot open storage {self.storage!r}: {exc}") from None


def _claim(trial, n_trials: int, optuna):
    """For a shared study: ``None`` to measure this trial, or the value of the same plan measured
    before; prunes (and stops this worker) once ``n_trials`` trials are complete or running."""
    import time

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
    deadline = time.monotonic() + 600.0  # a worker that died mid-trial is not waited for longer
    while True:
        others = [t for t in trial.study.get_trials(deepcopy=False, states=states) if t.number < trial.number]
        if len(others) >= n_trials:
            trial.study.stop()
            raise optuna.TrialPruned(f"the study already has {n_trials} trials")
        same = [t for t in others if _plan_of(t) == trial.params]
        done = [t for t in same if t.state == optuna.trial.TrialState.COMPLETE]
        if done:
            trial.set_user_attr("same_as", done[0].number)
            return float(done[0].value)
        if not same or time.monotonic() > deadline:
            return None
        time.sleep(0.05)  # an earlier trial is measuring this very plan: wait for its value


def _plan_of(t) -> dict:
    """A trial's plan: its parameters, or, for an enqueued trial still suggesting them, the fixed ones."""
    fixed = t.system_attrs.get("fixed_params") if t.state.name == "RUNNING" else None
    return {**fixed, **t.params} if fixed else t.params


def _start_plans(problem: Problem) -> list[np.ndarray]:
    """The greedy plan (when constrained) and the uniform plans that fit the budget."""
    plans = []
    if problem.constraints:
        g = greedy_choice(problem)
        if g is not None:
            plans.append(np.asarray(g))
    return plans + [plan for plan in problem.uniform_choices() if problem.is_feasible(plan)]


def _fingerprint(problem: Problem) -> str:
    doc = {"items": problem.items, "options": problem.option_names, "caps": problem.caps().tolist(),
           "allowed": problem.allowed.astype(int).tolist(),
           "damage": np.round(np.where(problem.allowed, problem.damage, 0), 12).sum(axis=1).tolist()}
    return hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]
