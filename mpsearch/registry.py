"""Name -> implementation registries for solvers and estimators, imported lazily.

Entries are ``"module:Class"`` strings so that listing names never imports optional dependencies
(PuLP, Optuna, transformers). Third-party code can add entries with :func:`register`.
"""

from __future__ import annotations

import importlib

from .errors import MpsearchError, close_matches

SOLVERS: dict[str, str] = {
    "greedy": "mpsearch.solvers.greedy:GreedySolver",
    "exhaustive": "mpsearch.solvers.exhaustive:ExhaustiveSolver",
    "ilp": "mpsearch.solvers.ilp:ILPSolver",
    "dp": "mpsearch.solvers.dp:DPSolver",
    "baq": "mpsearch.solvers.baq:BAQSolver",
    "evolutionary": "mpsearch.solvers.evolutionary:EvolutionarySolver",
    "optuna": "mpsearch.solvers.optuna_solver:OptunaSolver",
}

ESTIMATORS: dict[str, str] = {
    "weight-error": "mpsearch.sensitivity.weight_error:WeightErrorEstimator",
    "hessian": "mpsearch.sensitivity.hessian:HessianEstimator",
    "fisher": "mpsearch.sensitivity.fisher:FisherEstimator",
    "lrp": "mpsearch.sensitivity.lrp:LRPEstimator",
    "output-distance": "mpsearch.sensitivity.output_distance:OutputDistanceEstimator",
    "lim": "mpsearch.sensitivity.output_distance:LIMEstimator",
}

_KINDS = {"solver": SOLVERS, "estimator": ESTIMATORS}


def register(kind: str, name: str, target: str) -> None:
    """Register ``target`` (``"module:Class"``) as solver or estimator ``name``."""
    _KINDS[kind][name] = target


def load_class(kind: str, name: str):
    table = _KINDS[kind]
    if name not in table:
        raise MpsearchError(
            f"unknown {kind} {name!r}{close_matches(name, table)}; available: {', '.join(sorted(table))}"
        )
    module, _, cls = table[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def _make(kind: str, name: str, params: dict):
    cls = load_class(kind, name)
    try:
        return cls(**params)
    except TypeError as exc:
        import inspect

        valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise MpsearchError(
            f"{kind} {name!r} does not take these settings: {exc}; it takes: {', '.join(valid) or 'none'}"
        ) from None


def get_solver(name: str, **params):
    """A solver instance by name: ``get_solver("greedy")``, ``get_solver("ilp", time_limit=10)``."""
    return _make("solver", name, params)


def get_estimator(name: str, **params):
    """An estimator instance by name: ``get_estimator("weight-error", options="2,4,8")``."""
    return _make("estimator", name, params)


def solver_names() -> list[str]:
    return sorted(SOLVERS)


def estimator_names() -> list[str]:
    return sorted(ESTIMATORS)
