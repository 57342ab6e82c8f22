"""Name -> implementation registries for solvers and estimators, imported lazily.

Entries are ``"module:Class"`` strings so that listing names never imports optional dependencies
(PuLP, Optuna, transformers). Third-party code can add entries with :func:`register`.
"""

from __future__ import annotations

import importlib
import inspect
import math
import types
import typing
from dataclasses import dataclass

from .errors import MpsearchError, SettingsError, close_matches

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

#: metric name -> "module:Class" (the ``--metric`` names of ``frontier --model``)
METRICS: dict[str, str] = {
    "cosine": "mpsearch.metrics:EmbeddingCosine",
    "accuracy": "mpsearch.metrics:Accuracy",
    "agreement": "mpsearch.metrics:Top1Agreement",
    "kl": "mpsearch.metrics:KLDivergence",
    "perplexity": "mpsearch.metrics:Perplexity",
}

_KINDS = {"solver": SOLVERS, "estimator": ESTIMATORS, "metric": METRICS}

#: extra sections of ``mpsearch list`` (title -> callable returning [(name, [Setting...]), ...]);
#: the targets of mpsearch.targets can add theirs here
LIST_SECTIONS: dict = {}


class _TargetLine:
    def __init__(self, text):
        self.text = text

    def describe(self) -> str:
        return self.text


def _target_rows():
    from .targets import get_target, target_names

    rows = []
    for name in target_names():
        t = get_target(name)
        rows.append((name, [_TargetLine(f"options: {', '.join(t.options)}"),
                            _TargetLine(f"default: {', '.join(t.default_options)}; export: {t.exporter or '-'}"
                                        f"{'; fused q/k/v, gate/up' if t.fused_runtime else ''}")]))
    return rows


LIST_SECTIONS["targets"] = _target_rows


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


@dataclass(frozen=True)
class Setting:
    """One setting of an estimator or solver: its name, declared type and default."""

    name: str
    type: object = None  # the annotation (``int``, ``float | None``...); None: any value
    default: object = inspect.Parameter.empty

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @property
    def type_name(self) -> str:
        return _type_name(self.type)

    def describe(self) -> str:
        default = "(required)" if self.required else f"= {self.default!r}"
        return f"{self.name}: {self.type_name} {default}"


def settings_of(cls) -> list[Setting]:
    """The settings a class declares: the keyword parameters of its ``__init__``, with their type
    annotations and defaults (the one declaration, scikit-learn style; ``get_params`` reads the same)."""
    sig = inspect.signature(cls.__init__)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not evaluate: leave those settings untyped
        hints = {}
    out = []
    for name, p in sig.parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out.append(Setting(name, hints.get(name), p.default))
    return out


def settings(kind: str, name: str) -> list[Setting]:
    """The declared settings of solver or estimator ``name``."""
    return settings_of(load_class(kind, name))


def check_settings(kind: str, name: str, params: dict, cls=None) -> dict:
    """Refuse unknown settings (with close matches) and values of the wrong type, before any work.

    Returns the params with CLI-friendly conversions applied (``3`` for a float setting becomes
    ``3.0``, ``"true"`` for a bool ``True``). Raises :class:`SettingsError`.
    """
    cls = cls or load_class(kind, name)
    declared = {s.name: s for s in settings_of(cls)}
    out = {}
    for key, value in params.items():
        if key not in declared:
            raise SettingsError(
                f"{kind} {name!r} has no setting {key!r}{close_matches(str(key), declared)}; "
                f"its settings: {', '.join(declared) or 'none'} (see 'mpsearch list')"
            )
        s = declared[key]
        ok, converted = _conform(value, s.type)
        if not ok:
            raise SettingsError(
                f"{kind} {name!r}: setting {key!r} must be {s.type_name}, got {value!r} "
                f"({type(value).__name__})" + ("" if s.required else f"; default {s.default!r}")
            )
        out[key] = converted
    missing = [s.name for s in declared.values() if s.required and s.name not in out]
    if missing:
        raise SettingsError(f"{kind} {name!r} needs the setting(s) {', '.join(missing)}")
    return out


def _make(kind: str, name: str, params: dict):
    cls = load_class(kind, name)
    params = check_settings(kind, name, params, cls)
    obj = cls(**params)
    check = getattr(obj, "_check", None)  # value checks a class declares (choices, ranges)
    if callable(check) and not any(
        p.default is inspect.Parameter.empty for p in inspect.signature(check).parameters.values()
    ):
        try:
            check()
        except MpsearchError:
            raise
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"{kind} {name!r}: invalid settings: {exc}") from None
    return obj


def _type_name(hint) -> str:
    if hint is None:
        return "any"
    if hint is type(None):
        return "None"
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    return getattr(hint, "__name__", str(hint))


def _conform(value, hint):
    """(ok, value converted) for ``value`` against a type annotation."""
    if hint is None or hint is typing.Any:
        return True, value
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            ok, v = _conform(value, arm)
            if ok:
                return True, v
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        if isinstance(value, bool):
            return True, value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return True, value.lower() in ("true", "yes")
        return False, value
    if hint is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return True, int(value)
        return False, value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return True, float(value)
    if hint is str:
        return isinstance(value, str), value
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value  # Callable, generics: not checked here


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
