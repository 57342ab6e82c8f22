"""The shipped estimator conformance suite (mpsearch.testing) over every registered estimator and a
toy plugin: table shape, finite non-negative damage, keep costs nothing, fewer bits cost more in total,
seeded determinism (and another seed changes what is drawn at random), metadata, refusing no data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import mpsearch
from mpsearch.registry import ESTIMATORS, estimator_names, register
from mpsearch.sensitivity.base import EstimatorWarning
from mpsearch.testing import check_estimator, estimator_checks

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


#: estimators that draw random probes or samples: another seed must change their table
SEEDED = {"hessian"}


@pytest.mark.parametrize("check", estimator_checks(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", estimator_names())
def test_conformance(name, check):
    extra = {"seed_matters": name in SEEDED} if check.__name__ == "check_seeded_determinism" else {}
    check(name, **extra, **FAST.get(name, {}))


def test_a_registered_plugin_runs_the_shipped_suite():
    register("estimator", "toy-weight-error", "toy_plugins:ToyWeightError")
    register("estimator", "toy-inverted", "toy_plugins:ToyInverted")
    try:
        check_estimator("toy-weight-error")
        with pytest.raises(AssertionError, match=r"toy-inverted \(cnn\): keep must cost nothing"):
            check_estimator("toy-inverted")
        with pytest.raises(AssertionError, match="another seed gave the same table"):
            check_estimator("toy-weight-error", seed_matters=True)  # it draws nothing at random
    finally:
        ESTIMATORS.pop("toy-weight-error", None)
        ESTIMATORS.pop("toy-inverted", None)


@pytest.mark.parametrize("name", ["hessian", "fisher", "output-distance", "response"])
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
