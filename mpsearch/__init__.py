"""mpsearch: how many bits should each layer get?

Sensitivity estimators fill per-layer cost tables, interchangeable solvers turn a table and a budget
into a bit plan, and a thin torch applier enforces and validates the plan::

    import mpsearch
    table = mpsearch.get_estimator("weight-error", options="2,3,4,8").estimate(model, batches)
    result = mpsearch.get_solver("greedy").solve(table, mpsearch.Budget.parse(["avg_bits=4"]))
    qmodel = mpsearch.apply_plan(model, result.plan)

``import mpsearch`` is light: names are loaded on first use, and neither torch, matplotlib, optuna
nor transformers is imported until something needs it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Option": "options",
    "parse_option": "options",
    "parse_options": "options",
    "CostTable": "table",
    "Budget": "budget",
    "BitPlan": "plan",
    "Layer": "layers",
    "discover_layers": "layers",
    "tie_groups": "ties",
    "SolveResult": "solvers.base",
    "Solver": "solvers.base",
    "Estimator": "sensitivity.base",
    "get_solver": "registry",
    "get_estimator": "registry",
    "solver_names": "registry",
    "estimator_names": "registry",
    "apply_plan": "apply",
    "validate_plan": "validate",
    "ValidationReport": "validate",
    "quantize_weight": "quant",
    "load_model": "specs",
    "load_data": "specs",
    "MpsearchError": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mpsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
