"""The one default recipe and the demo's data sizes: plain data, no torch, so the CLI's parser can
name the defaults without importing the pipeline (see experiments/measured_loop.md for the evidence)."""

from __future__ import annotations

from .options import DEFAULT_SEARCH_OPTIONS, LLM_SEARCH_OPTIONS

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
