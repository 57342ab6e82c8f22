"""The one registry of pluggable parts: solvers, estimators, metrics, targets and export formats.

Each kind is a :class:`Registry`: name -> ``"module:attribute"``, imported on first use, so that
listing names never imports optional dependencies (PuLP, Optuna, transformers), plus the aliases it
accepts (``gguf`` for ``llama.cpp``). Third-party code adds entries with :func:`register`.

The settings of a registered class are declared once, scikit-learn style: the keyword parameters
of its ``__init__`` with their type annotations and defaults (:func:`settings_of`), and the value
constraints in a ``_parameter_constraints`` class attribute (:mod:`mpsearch.constraints`).
:func:`check_settings` refuses an unknown setting, a value of the wrong type or one outside its
constraints, before any work; the settings objects of the measured path
(:class:`mpsearch.measured.settings.FrontierSettings`) are checked by the same code.
"""

from __future__ import annotations

import importlib
import inspect

from .errors import close_matches, ExportError, MpsearchError, SettingsError
from .settings import check_params, Setting, settings_of


class Registry:
    """Names of one kind of part -> ``"module:attribute"``, loaded lazily.

    ``aliases``: other names accepted for an entry (case does not matter for either); ``noun``:
    how errors name the kind (``"export format"``); ``error``: the exception raised for an unknown
    name; ``hint``: what else is accepted, appended to that error (``"or a callable ..."``).
    """

    def __init__(self, kind: str, entries: dict[str, str], *, aliases: dict[str, str] | None = None,
                 noun: str | None = None, error=MpsearchError, hint: str = "", sort: bool = True):
        self.kind, self.entries, self.aliases = kind, entries, dict(aliases or {})
        self.noun, self.error, self.hint, self.sort = noun or kind, error, hint, sort

    def names(self) -> list[str]:
        return sorted(self.entries) if self.sort else list(self.entries)

    def __contains__(self, name) -> bool:
        return self.find(name) is not None

    def find(self, name) -> str | None:
        """The registered name ``name`` stands for (itself, another case of it, or an alias), or None."""
        key = str(name).strip()
        if key in self.entries:
            return key
        lowered = {k.lower(): k for k in self.entries}
        alias = {k.lower(): v for k, v in self.aliases.items()}
        return lowered.get(key.lower()) or alias.get(key.lower())

    def resolve(self, name) -> str:
        """The registered name ``name`` stands for; an unknown name is refused with close matches."""
        found = self.find(name)
        if found is None:
            known = list(self.entries) + list(self.aliases)
            raise self.error(f"unknown {self.noun} {name!r}{close_matches(str(name), known)}; "
                             f"available: {', '.join(self.names())}{self.hint}")
        return found

    def load(self, name):
        """The class (or instance) registered as ``name``."""
        module, _, attr = self.entries[self.resolve(name)].partition(":")
        return getattr(importlib.import_module(module), attr)

    def aliases_of(self, name: str) -> list[str]:
        return [a for a, v in self.aliases.items() if v == name]

    def register(self, name: str, target: str, aliases=()) -> None:
        self.entries[name] = target
        self.aliases.update({a: name for a in aliases})


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
    "lim": "mpsearch.sensitivity.lim:LIMEstimator",
    "response": "mpsearch.sensitivity.response:ResponseEstimator",
}

#: metric name -> "module:Class" (``--metric`` of ``validate`` and ``frontier --model``)
METRICS: dict[str, str] = {
    "cosine": "mpsearch.metrics:EmbeddingCosine",
    "accuracy": "mpsearch.metrics:Accuracy",
    "agreement": "mpsearch.metrics:Top1Agreement",
    "kl": "mpsearch.metrics:KLDivergence",
    "perplexity": "mpsearch.metrics:Perplexity",
    "kld": "mpsearch.metrics:NextTokenKL",
    "top1": "mpsearch.metrics:NextTokenTop1",
}

#: target name -> "module:attribute" of its :class:`~mpsearch.targets.Target` instance (``--target``)
TARGETS: dict[str, str] = {
    "mpsearch": "mpsearch.targets.generic:MPSEARCH",
    "llama.cpp": "mpsearch.targets.llamacpp:LLAMACPP",
    "vllm": "mpsearch.targets.consumers:VLLM",
    "gptqmodel": "mpsearch.targets.consumers:GPTQMODEL",
    "torchao": "mpsearch.targets.consumers:TORCHAO",
    "modelopt": "mpsearch.targets.consumers:MODELOPT",
    "autoround": "mpsearch.targets.consumers:AUTOROUND",
}

#: export format -> "module:Class" of its exporter (``export --to``, ``import --from``)
EXPORTERS: dict[str, str] = {
    "torchao": "mpsearch.export.torchao_config:TorchaoExporter",
    "gptqmodel": "mpsearch.export.gptqmodel_dynamic:GPTQModelExporter",
    "llm-compressor": "mpsearch.export.llmcompressor_recipe:LLMCompressorExporter",
    "llama.cpp": "mpsearch.export.llamacpp_types:LlamaCppExporter",
    "autoround": "mpsearch.export.autoround_config:AutoRoundExporter",
    "modelopt": "mpsearch.export.modelopt_config:ModelOptExporter",
}


REGISTRIES: dict[str, Registry] = {
    "solver": Registry("solver", SOLVERS),
    "estimator": Registry("estimator", ESTIMATORS),
    "metric": Registry("metric", METRICS, sort=False, hint=", or a callable fn(model) -> float"),
    "target": Registry("target", TARGETS, sort=False,
                       aliases={"llamacpp": "llama.cpp", "gguf": "llama.cpp", "llm-compressor": "vllm",
                                "compressed-tensors": "vllm", "gptq": "gptqmodel"}),
    "exporter": Registry("exporter", EXPORTERS, sort=False, noun="export format", error=ExportError,
                         aliases={"llamacpp": "llama.cpp", "gguf": "llama.cpp", "llmcompressor": "llm-compressor",
                                  "compressed-tensors": "llm-compressor", "auto-round": "autoround",
                                  "gptq": "gptqmodel"}),
}
_KINDS = REGISTRIES  # the name older code used

#: extra sections of ``mpsearch list`` (title -> callable returning [(name, [lines...]), ...])
LIST_SECTIONS: dict = {}


def register(kind: str, name: str, target: str, aliases=()) -> None:
    """Register ``target`` (``"module:Class"``) as ``kind`` (solver, estimator, metric, target,
    exporter) ``name``."""
    REGISTRIES[kind].register(name, target, aliases)


def load_class(kind: str, name: str):
    """The class registered as ``kind`` ``name`` (an unknown name is refused with close matches)."""
    return REGISTRIES[kind].load(name)


def settings(kind: str, name: str) -> list[Setting]:
    """The declared settings of ``kind`` ``name`` (a solver, estimator, metric...)."""
    return settings_of(load_class(kind, name))


def check_settings(kind: str, name: str, params: dict, cls=None) -> dict:
    """``params`` checked against the declared settings of ``kind`` ``name`` (:mod:`mpsearch.settings`):
    unknown names, wrong types and values outside the constraints are refused before any work."""
    return check_params(cls or load_class(kind, name), params, f"{kind} {name!r}")


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


def get_solver(name: str, **params):
    """A solver instance by name: ``get_solver("greedy")``, ``get_solver("ilp", time_limit=10)``."""
    return _make("solver", name, params)


def get_estimator(name: str, **params):
    """An estimator instance by name: ``get_estimator("weight-error", options="2,4,8")``."""
    return _make("estimator", name, params)


def solver_names() -> list[str]:
    return REGISTRIES["solver"].names()


def estimator_names() -> list[str]:
    return REGISTRIES["estimator"].names()
