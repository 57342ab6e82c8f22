"""The estimator conformance suite: every check takes a registered estimator name and its settings.

On a tiny CNN (with labels) and a tiny transformer LM (without), with options int2, int4, int8 and
keep: one row per layer and option in layer order, finite non-negative damage, keep costs nothing,
2 bits cost more than 8 bits in total; the same seed gives the same table and, with
``seed_matters=True`` (estimators that draw random probes or samples), another seed another
table; the metadata records the estimator, its settings (the options as estimated), the model's fingerprint, the data and
the cost; estimators that need data refuse to run without it.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import MpsearchError
from ..layers import iter_quantizable
from ..registry import get_estimator
from ..sensitivity.base import EstimatorWarning
from ..sensitivity.cache import model_fingerprint
from .models import tiny_cnn, tiny_lm

CASES = {"cnn": tiny_cnn, "lm": tiny_lm}
OPTIONS = "2,4,8,keep"


def _estimate(name, case, settings, seed=0):
    model, batches = CASES[case]()
    est = get_estimator(name, options=OPTIONS, **{"seed": seed, **settings})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EstimatorWarning)
        return est.estimate(model, batches, progress=False), model, est


def check_table_shape_and_damage(name, **settings):
    for case in CASES:
        table, model, _ = _estimate(name, case, settings)
        layers = [n for n, _m, _k in iter_quantizable(model)]
        assert table.layers == layers, f"{name} ({case}): layers {table.layers} != {layers}"
        assert table.options == ["int2", "int4", "int8", "keep"], f"{name} ({case}): options {table.options}"
        d = table.pivot("damage").to_numpy()
        assert np.isfinite(d).all() and (d >= 0).all(), f"{name} ({case}): damage not finite and >= 0"
        assert (d[:, -1] == 0).all(), f"{name} ({case}): keep must cost nothing"
        assert d[:, 0].sum() >= d[:, 2].sum() > 0, f"{name} ({case}): 2 bits must cost more than 8 bits, and > 0"


def check_seeded_determinism(name, seed_matters: bool = False, **settings):
    for case in CASES:
        first = _estimate(name, case, settings)[0].frame["damage"].to_numpy()
        again = _estimate(name, case, settings)[0].frame["damage"].to_numpy()
        assert np.array_equal(first, again), f"{name} ({case}): the same seed gave another table"
        if seed_matters:
            other = _estimate(name, case, settings, seed=1)[0].frame["damage"].to_numpy()
            assert not np.array_equal(first, other), f"{name} ({case}): another seed gave the same table"


def check_metadata(name, **settings):
    table, model, est = _estimate(name, "cnn", settings)
    md = table.metadata
    assert md["estimator"] == name
    # the settings, with the options as estimated (the names, not the spec that asked for them)
    assert md["params"] == {**est.get_params(), "options": "int2,int4,int8,keep"}
    assert md["options"] == ["int2", "int4", "int8", "keep"]
    assert md["model"]["fingerprint"] == model_fingerprint(model)
    assert md["data"]["batches"] == 2
    assert md["cost"]["seconds"] >= 0


def check_refuses_missing_data(name, **settings):
    est = get_estimator(name, **settings)
    if not est.needs_data:
        return
    model, _ = tiny_cnn()
    try:
        est.estimate(model, None, progress=False)
    except MpsearchError as exc:
        assert "needs calibration data" in str(exc), f"{name}: message {exc}"
    else:
        raise AssertionError(f"{name} needs data but ran without it")


_CHECKS = [check_table_shape_and_damage, check_seeded_determinism, check_metadata, check_refuses_missing_data]


def estimator_checks() -> list:
    """The checks, each ``check(name, **settings)`` (``check_seeded_determinism`` also takes
    ``seed_matters``)."""
    return list(_CHECKS)


def check_estimator(name: str, seed_matters: bool = False, **settings) -> None:
    """Run every check on the registered estimator ``name`` with ``settings``."""
    for check in _CHECKS:
        check(name, seed_matters=seed_matters, **settings) if check is check_seeded_determinism else check(name, **settings)
