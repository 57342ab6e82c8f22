"""The measured frontier under its first name: every public name (and the private ones notebooks,
tests and experiments import) of :mod:`mpsearch.measured`, where the code lives, one module per step."""

from __future__ import annotations

from .measured import *  # noqa: F401,F403
from .measured import __all__ as _measured_all
from .measured.estimate import _table_key  # noqa: F401
from .measured.from_specs import _zoo_eval  # noqa: F401
from .measured.measure import _MeasureCache, baseline, frontier_frame, is_main, uniform_frame  # noqa: F401
from .measured.measure import metric_key as _metric_key  # noqa: F401
from .measured.predicted import _key_of, _row, key_constraint, recipe_baselines, target_budgets  # noqa: F401
from .measured.refining import _search_metric, refine_targets, run_refinement  # noqa: F401
from .measured.uniform import warn_losers  # noqa: F401
from .options import DEFAULT_SEARCH_OPTIONS as DEFAULT_OPTIONS  # noqa: F401
from .recipe import DEFAULT_POINTS, DEFAULT_RECIPE, DEMO_DATA  # noqa: F401  (the one default recipe)
from .refine import METHODS, plan_key  # noqa: F401

__all__ = list(_measured_all)
