"""The measured frontier: estimate -> solve across budgets -> apply and measure plans along it.

:func:`measured_frontier` does the whole job on a model in memory, one module per step:

1. **estimate** (:mod:`.estimate`) a cost table with any registered estimator (cached: an
   interrupted run, or a second run with the same settings, reads the table back instead of
   estimating again); :func:`mpsearch.recipe.resolve` decides the options, estimator and metric
   the user left out;
2. **solve** (:mod:`.predicted`) the predicted frontier with :func:`mpsearch.frontier.compute_frontier`
   (any solver, any budget key, the budget's other constraints, bounds, pins and ties at every
   point), plus one solve at the exact size of each uniform option (and of the target's own recipes)
   and at each requested budget (their :class:`~mpsearch.SolveResult` kept);
3. **measure** (:mod:`.measure`) ``validate`` plans spread along it plus the plans at the uniform
   sizes and the uniform plans themselves: apply, check the enforced levels, count the real size,
   measure quality on held-out data (cached per plan in ``measured.json``);
4. **compare** (:mod:`.uniform`) each measured mixed plan with the best measured uniform plan of
   equal or smaller size (``uniform_at_size``, ``beats_uniform``; equal within a relative
   tolerance) and with the straight line between its two neighbouring uniform points
   (``vs_uniform_line``, negative = better than the line), with a :class:`UniformWarning` when a
   mixed plan loses;
5. optionally **refine** (:mod:`.refining`; ``refine=R``): R rounds of measure -> recalibrate ->
   re-solve (:mod:`mpsearch.refine`) within ``refine_evals`` measured plans;
6. **recommend** (:mod:`.recommend`) at each target budget the best *measured* plan that fits it,
   uniform plans included, with an explicit status (``mixed``, ``uniform_better``, ``uniform_only``);
7. **proxy check** (information): the Spearman rank correlation between predicted damage and
   measured loss over the validated points, with a :class:`ProxyWarning` below
   ``min_rank_correlation``.

With ``out`` set it writes (:mod:`.outputs`) ``table.csv``, ``frontier.csv`` (predicted and measured),
``uniform.csv``, ``recommended.csv``, ``refined.csv`` (with ``refine``), ``plans/*.json``,
``summary.json`` (with the full-precision model's every metric value, ``baseline_values``) and the
plots ``frontier.png``, ``plan_bits.png``, ``sensitivity.png``.

Its settings are one frozen, checked :class:`FrontierSettings` (:mod:`.settings`; the refinement's
a :class:`~mpsearch.refine.RefineSettings`). :func:`model_frontier` (:mod:`.from_specs`) is the same
job from specs (a model spec and a :class:`DataSettings`), the library side of
``mpsearch frontier --model``; :func:`run_demo` is ``mpsearch demo``. :mod:`.run` holds the
orchestration.
"""

from __future__ import annotations

from ..refine import RefineSettings
from .estimate import estimate_cached
from .from_specs import ZOO_DATA, DataSettings, build_metric, model_frontier, run_demo
from .measure import MeasureCache, measure, measure_spread, metric_key, plan_damage_std, proxy_check, rank_correlation
from .predicted import pareto, predicted_frontier, spread, uniform_plans
from .recommend import recommend
from .refining import SearchLadder, search_metric
from .result import FrontierRun, InfeasibleBudget, ProxyWarning, UniformWarning
from .run import measured_frontier
from .settings import FrontierSettings
from .uniform import EQUAL_SIZE_RTOL, compare_with_uniform

__all__ = ["EQUAL_SIZE_RTOL", "DataSettings", "FrontierRun", "FrontierSettings", "InfeasibleBudget",
           "MeasureCache", "ProxyWarning", "RefineSettings", "SearchLadder", "UniformWarning", "ZOO_DATA",
           "build_metric", "compare_with_uniform", "estimate_cached", "measure", "measure_spread",
           "measured_frontier", "metric_key", "model_frontier", "pareto", "plan_damage_std", "predicted_frontier",
           "proxy_check", "rank_correlation", "recommend", "run_demo", "search_metric", "spread", "uniform_plans"]
