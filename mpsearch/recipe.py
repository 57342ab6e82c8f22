"""The one default recipe and the demo's data sizes: plain data, no torch, so the CLI's parser can
name the defaults without importing the pipeline (see experiments/measured_loop.md for the evidence)."""

from __future__ import annotations

from .options import DEFAULT_SEARCH_OPTIONS

#: estimator, solver and options of ``frontier --model``, ``estimate --data`` and ``demo``
DEFAULT_RECIPE = {"estimator": "output-distance", "solver": "ilp", "options": DEFAULT_SEARCH_OPTIONS,
                  "refine": 0, "refine_method": "calibrate"}

#: the refinement methods (mpsearch.refine; named here so that the CLI's parser needs no torch)
REFINE_METHODS = ("calibrate", "local", "both", "evolve")

#: frontier points solved when none are asked for
DEFAULT_POINTS = 24

#: the demo's data sizes (all-MiniLM-L6-v2, Shakespeare passages of disjoint plays)
DEMO_DATA = {"calib": 16, "eval": 64, "max_length": 48, "validate": 5}
