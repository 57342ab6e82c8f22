"""The one default recipe and the demo's data sizes: plain data, no torch, so the CLI's parser can
name the defaults without importing the measured path (see experiments/measured_loop.md for the
evidence); :func:`resolve` fills in what a user left out (options, estimator, metric), the one place
that decides it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .options import DEFAULT_SEARCH_OPTIONS, LLM_SEARCH_OPTIONS, parse_options
from .registry import get_estimator

#: estimator, solver and options of ``frontier --model``, ``estimate --data`` and ``demo``
DEFAULT_RECIPE = {"estimator": "output-distance", "solver": "ilp", "options": DEFAULT_SEARCH_OPTIONS,
                  "refine": 0, "refine_method": "calibrate"}

#: the recipe's options for a causal LM (``*ForCausalLM``): the ``llm`` preset, group-wise formats
#: beside the per-channel ones (SmolLM2: 54% / 61% of the gap at 4 / 5 bits against 21% / 41%)
CAUSAL_LM_OPTIONS = LLM_SEARCH_OPTIONS


def recipe_options(causal_lm: bool) -> str:
    """The default recipe's options for a model: :data:`CAUSAL_LM_OPTIONS` for a causal LM, else
    ``DEFAULT_RECIPE["options"]`` (the evidence: experiments/measured_loop.md, section 5)."""
    return CAUSAL_LM_OPTIONS if causal_lm else DEFAULT_RECIPE["options"]


#: the refinement methods (mpsearch.refine; named here so that the CLI's parser needs no torch)
REFINE_METHODS = ("calibrate", "local", "both", "evolve")

#: frontier points solved when none are asked for
DEFAULT_POINTS = 24

#: the demo's data sizes (all-MiniLM-L6-v2, Shakespeare passages of disjoint plays)
DEMO_DATA = {"calib": 16, "eval": 64, "max_length": 48, "validate": 5}


#: the recipe's estimator for a causal LM on a CPU: output-distance runs one suffix pass per layer and
#: batch with every option stacked (SmolLM2 --target llama.cpp on 2 cores: about 4 hours), fisher one
#: backward pass per calibration sample; at equal sizes on SmolLM2 their plans measure alike
#: (experiments/target_comparison.md: vLLM -31.6% vs -32.0% KL at uniform w4a16-g32's size; llama.cpp
#: -37.9% / -50.1% vs -35.4% / -51.5% at Q3_K_M's / Q4_K_M's)
CPU_LLM_ESTIMATOR = "fisher"


def default_estimator(has_data: bool, model=None) -> str:
    """The recipe's estimator: ``DEFAULT_RECIPE["estimator"]`` with calibration data
    (:data:`CPU_LLM_ESTIMATOR` for a causal LM whose weights are on a CPU), else the data-free
    ``weight-error``."""
    if not has_data:
        return "weight-error"
    if model is not None and is_causal_lm(model) and _on_cpu(model):
        return CPU_LLM_ESTIMATOR
    return DEFAULT_RECIPE["estimator"]


def _on_cpu(model) -> bool:
    for p in model.parameters():
        return p.device.type == "cpu"
    return True


def estimator_note(recipe) -> str | None:
    """One line when the recipe's estimator was chosen for the device (said before the work starts)."""
    if recipe.estimator_chosen and recipe.estimator == CPU_LLM_ESTIMATOR:
        return (f"recipe: the {CPU_LLM_ESTIMATOR} estimator, chosen for a causal LM on the CPU (output-distance, the "
                f"recipe on a GPU, runs one suffix pass per layer and batch: hours on a few CPU cores; "
                f"--estimator output-distance to use it)")
    return None


#: a model of fewer parameters estimates in seconds even on a busy CPU: no busy-machine note for it
BUSY_NOTE_MIN_PARAMS = 10_000_000


def busy_cpu_note(model, *, load: float | None = None, cores: int | None = None,
                  threads: int | None = None) -> str | None:
    """One line when ``model`` (of at least :data:`BUSY_NOTE_MIN_PARAMS` parameters, computing on the CPU)
    runs on a machine busier than its cores (the 1-minute ``load`` average at least ``cores``) with torch on more than
    one thread: the threads then wait for each other's turn on every operation (on SmolLM2 on a 2-core
    machine at load 11, fisher's per-sample gradients took 112 s a sample on 2 threads, 21 s on 1:
    experiments/fisher_cpu_busy.md). ``load``/``cores``/``threads``: the machine's when not given."""
    import torch  # start-up: the CLI's parser loads only what it needs

    if sum(p.numel() for p in model.parameters()) < BUSY_NOTE_MIN_PARAMS:
        return None
    if load is None and not hasattr(os, "getloadavg"):  # Windows: no load average to read
        return None
    load = os.getloadavg()[0] if load is None else load
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = torch.get_num_threads() if threads is None else threads
    if threads < 2 or load < cores:
        return None
    return (f"note: the CPU is busy (1-minute load average {load:.1f} on {cores} cores): torch's {threads} threads "
            f"wait for each other's turn on every operation, which can make this several times slower than one "
            f"thread; while the machine stays busy, OMP_NUM_THREADS=1 mpsearch ... runs faster")


def is_causal_lm(model) -> bool:
    """A causal LM: a transformers ``*ForCausalLM``/``*LMHeadModel`` (by class name: no import)."""
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def default_metric(model, batch=None) -> str:
    """``kld`` for causal LMs (with top-1 agreement and perplexity from the same pass), ``cosine``
    for encoders, ``accuracy`` when the batch has labels, ``agreement`` otherwise."""
    cls = type(model).__name__
    if is_causal_lm(model):
        return "kld"
    config = getattr(model, "config", None)
    if config is not None and not cls.endswith(("ForSequenceClassification", "Classification")):
        return "cosine"
    if batch is not None:
        from .data import split_batch  # start-up: the CLI's parser loads only what it needs

        if split_batch(batch)[2] is not None:
            return "accuracy"
    return "agreement"


def is_callable_spec(name) -> bool:
    """Whether a metric name is a ``package.module:callable`` (or ``file.py:callable``) spec."""
    return isinstance(name, str) and ":" in name


@dataclass(frozen=True)
class Recipe:
    """What :func:`resolve` decided: the target (a :class:`~mpsearch.targets.Target`), the options to
    cost (a comma list), the estimator's name and the metric (a name, a ``package.module:callable``
    spec, a :class:`~mpsearch.metrics.Metric` as given, or ``None`` when no model was given)."""

    target: object
    options: str
    estimator: str
    metric: object = None
    estimator_chosen: bool = False  # the estimator was not given: the recipe chose it (for the model and device)


def resolve(*, target=None, options=None, estimator=None, metric=None, model=None, batch=None,
            has_data: bool = True, imatrix: bool = False, gpu: bool = False) -> Recipe:
    """The one place that fills in what the user left out (every entry point calls it once):

    - ``options``: as given; else a consumer ``target``'s default set (llama.cpp's i-quants join it
      when the rounding uses an importance matrix, ``imatrix``, and the work runs on a ``gpu``: their
      searches take about 2 hours for a 135M model on 2 CPU cores; left out on the CPU with a
      warning, as are the target's ``cpu_imatrix_left_out``, none for llama.cpp); else the recipe's for the model (:func:`recipe_options`: the ``llm`` preset for a causal LM);
    - ``estimator``: as given, else :func:`default_estimator` (``has_data``: calibration data given;
      ``fisher`` for a causal LM on a CPU);
    - ``metric``: as given, else the model's default (:func:`default_metric`, ``batch`` an
      evaluation batch: its labels mean accuracy).

    ``target`` is a name, a :class:`~mpsearch.targets.Target` or ``None`` (mpsearch's own)."""
    from .targets import DEFAULT_TARGET, get_target  # start-up: the CLI's parser loads only what it needs

    chosen = get_target(target)
    if options is None:
        causal = model is not None and is_causal_lm(model)
        options = recipe_options(causal) if chosen.name == DEFAULT_TARGET else ",".join(target_default_options(chosen, imatrix, gpu))
    if metric is None and model is not None:
        metric = default_metric(model, batch)
    return Recipe(chosen, options, estimator or default_estimator(has_data, model), metric,
                  estimator_chosen=estimator is None)


def target_default_options(target, imatrix: bool, gpu: bool) -> tuple[str, ...]:
    """A consumer target's default options: with an importance matrix, its imatrix set (llama.cpp's
    i-quants) on a GPU; on the CPU the plain set, and a warning that says what was left out."""
    names = target.default_option_names(imatrix and gpu)
    if imatrix and not gpu and target.imatrix_default_options:
        import warnings

        names = tuple(o for o in names if o not in target.cpu_imatrix_left_out)
        left = [o for o in target.imatrix_default_options if o not in names]
        if left:
            slow = [o for o in left if o in target.cpu_imatrix_left_out]
            why = "their searches take hours there" + (
                f"; {' and '.join(slow)}: their imatrix rounding takes as long as all the others'" if slow else "")
            warnings.warn(f"{', '.join(left)} left out of {target.name}'s default options on the CPU ({why}); "
                          f"give them with --bits to cost them anyway", stacklevel=3)
    return names


def check(*, target=None, options=None, estimator=None, params=None, has_data: bool = True,
          imatrix: bool = False) -> None:
    """Refuse, before any model loads, what :func:`resolve` and the estimator would refuse later: an
    unknown target or estimator, bad estimator settings (``params``), options the target cannot
    execute (llama.cpp's iq1/iq2 types without an importance matrix, ``imatrix``)."""
    from .targets import DEFAULT_TARGET, get_target  # start-up: the CLI's parser loads only what it needs

    chosen = get_target(target)
    get_estimator(estimator or default_estimator(has_data), **dict(params or {}))
    if options is not None:
        parse_options(options) if chosen.name == DEFAULT_TARGET else chosen.parsed_options(options, imatrix=imatrix)
