"""Sensitivity estimators: model + data -> CostTable. See :mod:`mpsearch.sensitivity.base`."""

from ..registry import estimator_names, get_estimator
from .base import Context, Estimator, build_table, model_fingerprint

__all__ = ["Context", "Estimator", "build_table", "estimator_names", "get_estimator", "model_fingerprint"]
