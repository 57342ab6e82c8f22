"""Test-wide settings: the CLI's estimator cache (on by default, in the user's cache folder) goes to a
fresh folder per test, so no test reads another's cached table and none writes into ~/.cache."""

from __future__ import annotations

import hashlib
import os

import pytest


def pytest_configure(config):
    # before any test module is imported: environments copied at import time (subprocess tests) get it too
    base = config._tmp_path_factory.getbasetemp() if hasattr(config, "_tmp_path_factory") else None
    os.environ.setdefault("MPSEARCH_ESTIMATOR_CACHE", str((base or _fallback()) / "estimator-cache-session"))


def _fallback():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="mpsearch-tests-"))


@pytest.fixture(autouse=True)
def _estimator_cache_per_test(request, monkeypatch, tmp_path_factory):
    key = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
    monkeypatch.setenv("MPSEARCH_ESTIMATOR_CACHE", str(tmp_path_factory.getbasetemp() / "estimator-cache" / key))
