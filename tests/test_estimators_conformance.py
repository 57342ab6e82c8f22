"""One conformance suite over every registered estimator: table shape, finite non-negative damage,
seeded determinism, metadata, keep costs nothing, and fewer bits never cost less in total."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import mpsearch
from mpsearch.registry import estimator_names
from mpsearch.sensitivity.base import EstimatorWarning

from sensitivity_models import cnn_batches, lm_batches

#: quick settings per estimator (the defaults are for real models)
FAST = {"hessian": {"probes": 6, "min_probes": 3}, "fisher": {"chunk_size": 4}}
CASES = {"cnn": cnn_batches, "lm": lm_batches}


def _estimate(name, case, seed=0):
    model, batches = CASES[case]()
    est = mpsearch.get_estimator(name, options="2,4,8,keep", seed=seed, **FAST.get(name, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EstimatorWarning)
        return est.estimate(model, batches, progress=False), model


@pytest.fixture(scope="module")
def tables():
    return {}


def _get(tables, name, case):
    if (name, case) not in tables:
        tables[(name, case)] = _estimate(name, case)
    return tables[(name, case)]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", estimator_names())
def test_table_shape_and_damage(tables, name, case):
    table, model = _get(tables, name, case)
    layers = [n for n, _m, _k in mpsearch.layers.iter_quantizable(model)]
    assert table.layers == layers
    assert table.options == ["int2", "int4", "int8", "keep"]
    d = table.pivot("damage").to_numpy()
    assert np.isfinite(d).all() and (d >= 0).all()
    assert (d[:, -1] == 0).all()  # keep changes nothing
    assert d[:, 0].sum() >= d[:, 2].sum() > 0  # 2 bits cost more than 8 bits, and something


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", estimator_names())
def test_seeded_determinism(tables, name, case):
    first, _ = _get(tables, name, case)
    again, _ = _estimate(name, case)
    assert np.array_equal(first.frame["damage"].to_numpy(), again.frame["damage"].to_numpy())


@pytest.mark.parametrize("name", estimator_names())
def test_metadata(tables, name):
    table, model = _get(tables, name, "cnn")
    md = table.metadata
    assert md["estimator"] == name
    assert md["params"]["seed"] == 0 and md["params"]["options"] == "2,4,8,keep"
    assert md["model"]["fingerprint"] == mpsearch.sensitivity.model_fingerprint(model)
    assert md["data"]["batches"] == 2
    assert md["cost"]["seconds"] >= 0
    if name != "weight-error":
        assert md["data"]["targets"] is True
        assert md["cost"].get("forward_passes", 0) >= 1


@pytest.mark.parametrize("name", [n for n in estimator_names() if n != "weight-error"])
def test_data_driven_estimators_refuse_no_data(name):
    model, _ = cnn_batches()
    with pytest.raises(mpsearch.MpsearchError, match=f"estimator '{name}' needs calibration data"):
        mpsearch.get_estimator(name).estimate(model, None, progress=False)


@pytest.mark.parametrize("name", ["hessian", "fisher", "output-distance"])
def test_cuda_when_available(name):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, batches = cnn_batches()
    cpu, _ = _estimate(name, "cnn")
    batches = [(x.cuda(), y.cuda()) for x, y in batches]
    gpu = mpsearch.get_estimator(name, options="2,4,8,keep", **FAST.get(name, {})).estimate(
        model.cuda(), batches, progress=False)
    assert np.isfinite(gpu.frame["damage"]).all()
    if name != "hessian":  # probes are drawn on the device, so they differ from the CPU ones
        np.testing.assert_allclose(gpu.frame["damage"], cpu.frame["damage"], rtol=1e-3, atol=1e-9)
