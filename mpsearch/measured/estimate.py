"""Step 1 of the measured path: the cost table, estimated once and read back from its cache."""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

from ..data import as_batches
from ..errors import MpsearchError
from ..options import DEFAULT_SEARCH_OPTIONS
from ..registry import get_estimator, load_class
from ..sensitivity.base import model_fingerprint
from ..sensitivity.cache import data_fingerprint
from ..table import CostTable
from .measure import is_main


def _table_key(estimator, model, batches, extra) -> str:
    doc = {"estimator": estimator.name, "params": {k: str(v) for k, v in estimator.get_params().items()
                                                   if k not in ("cache_dir", "cache_every")},
           "model": model_fingerprint(model), "data": data_fingerprint(batches), **extra}
    return hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def estimate_cached(model, calib, *, estimator="weight-error", options=DEFAULT_SEARCH_OPTIONS, estimator_params=None,
                    cache: Path | None = None, progress=True, **estimate_kwargs) -> CostTable:
    """Estimate a table, or read it from ``cache`` (a CSV path) when it was made with the same
    estimator, settings, model weights, data and layer options. ``options=None``: the estimator's
    own default (a consumer target's default set); a run passes what :func:`mpsearch.recipe.resolve`
    decided."""
    params = dict(estimator_params or {})
    cls = load_class("estimator", estimator)
    if cache is not None and "cache_dir" in inspect.signature(cls.__init__).parameters:
        params.setdefault("cache_dir", str(Path(cache).parent / "estimator-cache"))
    est = get_estimator(estimator, options=options, **params)
    batches = as_batches(calib)
    key = _table_key(est, model, batches, {k: str(getattr(v, "name", v)) for k, v in estimate_kwargs.items()})
    if cache is not None and Path(cache).is_file():
        try:
            table = CostTable.read(cache)
            if table.metadata.get("pipeline_key") == key:
                return table
        except MpsearchError:
            pass  # unreadable or stale: estimate again
    table = est.estimate(model, batches, progress=progress, **estimate_kwargs)
    table.metadata["pipeline_key"] = key
    if cache is not None and is_main():
        table.write(cache)
    return table
