"""Conformance suites that ship with the package, so a third-party solver or estimator registered
with :func:`mpsearch.registry.register` runs the same checks as the built-in ones (as optuna ships
its sampler tests under ``optuna/testing``).

Each suite is a list of named checks, plain functions that raise ``AssertionError`` naming what
failed; they need no test runner. With pytest::

    import pytest
    from mpsearch.registry import register
    from mpsearch.testing import solver_checks

    register("solver", "mine", "mypkg.solvers:MySolver")

    @pytest.mark.parametrize("check", solver_checks(), ids=lambda c: c.__name__)
    def test_my_solver(check):
        check("mine")

or all at once: ``check_solver("mine")``, ``check_estimator("my-estimator")``; for consumers,
``check_format(my_format)`` and ``check_target(my_target)`` (:mod:`mpsearch.testing.consumers`). The checks read the
solver's declared abilities (``exact``, ``single_resource``, ``whole_frontier``) and run what
applies: exact solvers must equal the exhaustive oracle, boundary budgets included.
"""

from .consumers import check_format, check_target
from .estimators import check_estimator, estimator_checks
from .models import tiny_cnn, tiny_lm
from .solvers import check_solver, solver_checks

__all__ = ["check_estimator", "check_format", "check_solver", "check_target", "estimator_checks", "solver_checks",
           "tiny_cnn", "tiny_lm"]
