"""Closed-loop refinement: measured plans recalibrate the table, or steer a measured local search.

The cost table is a hypothesis (an additive per-layer model of the loss); measured quality is the
verdict. Three methods act on what was measured, each within a stated number of measured plans:

- :func:`calibrate` (``method="calibrate"``): the additive model ``loss(plan) ~= sum_g a_g t_g(plan)``
  with ``t_g`` the predicted damage of the layers of group ``g`` (a layer type such as
  ``self_attn.q_proj``, or each layer) under the plan. The multipliers ``a_g >= 0`` are fitted by
  non-negative least squares (:func:`scipy.optimize.nnls`) to the measured losses of every plan
  measured so far (uniform ones included); the table's damage is rescaled by them and the budget
  solved again. HIGGS's linearity theorem (Malinovskii et al., arXiv 2411.17525) is why a linear
  model of per-layer errors predicts the loss of a whole plan. A small ridge toward the single
  best-fitting scalar (``ridge``) keeps under-determined groups at a sensible scale.
- :func:`local_search` (``method="local"``): from the best measured plan that fits, measure the
  ``swaps`` most promising equal-size moves (one item up an option, another down, or one item up
  when there is room; ranked by their predicted damage change) and keep the best one if it
  measured better. ExLlamaV3's optimizer does this with measured KL differences. It never returns
  a plan worse than its start.
- :func:`evolve` (``method="evolve"``): a measured (1 + lambda) evolutionary search that ignores
  the table's ranking (EvoPress, Sieberling et al., arXiv 2410.14649): each generation mutates the
  best plan so far by size-level switches (one item up a level, others down until the plan fits,
  then the slack filled), measures the offspring, optionally on a ladder of growing data (multi-step
  selection), and keeps the best child if it measured lower on the full search data. Its
  measurements are meant for data apart from the evaluation data (``search`` in :func:`refine`);
  only its result is measured on the evaluation metric. ``rounds`` is its number of generations.

:func:`refine` runs ``rounds`` rounds of one method, or of both (``"both"``: a calibration step and
then local moves each round), over every target budget, and logs the measured gain per round and
the evaluations spent.
"""

from __future__ import annotations

from .calibration import Calibration, _group_of, calibrate, layer_type, plan_features  # noqa: F401
from .evolution import _choice_key, _evolve_signature, evolve, mutate, size_levels  # noqa: F401
from .local import _ranked_options, candidate_moves, local_search  # noqa: F401
from .loop import Refinement, _choice_of, _plan_from_choice, _restamp, plan_key, refine  # noqa: F401
from .settings import METHODS, RefineSettings  # noqa: F401

__all__ = ["METHODS", "Calibration", "RefineSettings", "Refinement", "calibrate", "candidate_moves", "evolve",
           "layer_type", "local_search", "mutate", "plan_features", "plan_key", "refine", "size_levels"]
