"""The settings of a measured frontier run: one frozen object, typed and checked when made.

:class:`FrontierSettings` holds every choice of :func:`~mpsearch.measured.measured_frontier` that is
not data (model, calibration data, metric) or an output path; its ``refine`` field is a
:class:`~mpsearch.refine.RefineSettings`. Each field is declared once (type, default, constraints in
``_parameter_constraints``) and checked by :mod:`mpsearch.settings` when the object is made, so a
bad setting is refused before any model loads. The CLI builds the object from its arguments
(:func:`mpsearch.cli.frontier.frontier_settings`): a new setting is one field here and one
argparse line there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..budget import Budget
from ..errors import close_matches, MpsearchError, SettingsError
from ..imatrix import check_setting, imatrix_expected
from ..recipe import check, DEFAULT_POINTS, DEFAULT_RECIPE
from ..refine import RefineSettings
from ..registry import get_solver
from ..settings import Interval, Settings
from ..targets import get_target


@dataclass(frozen=True)
class FrontierSettings(Settings):
    """What :func:`~mpsearch.measured.measured_frontier` does (see there for the meaning of each)."""

    estimator: str | None = None  # None: the recipe's (mpsearch.recipe.resolve: fisher for a causal LM on a CPU)
    solver: str = DEFAULT_RECIPE["solver"]
    options: str | list | tuple | None = None
    target: object = None  # a Target (a name is resolved to it when the settings are made) or None
    validate: int = 5
    points: int | None = DEFAULT_POINTS
    key: str = "avg_bits"
    budget: Budget = field(default_factory=Budget)
    budgets: tuple[float, ...] = ()
    match_uniform: bool = True
    estimator_params: dict = field(default_factory=dict)
    solver_params: dict = field(default_factory=dict)
    estimate_kwargs: dict = field(default_factory=dict)
    min_rank_correlation: float = 0.5
    refine: RefineSettings = field(default_factory=lambda: RefineSettings(rounds=DEFAULT_RECIPE["refine"],
                                                                          method=DEFAULT_RECIPE["refine_method"]))
    plots: bool = True
    progress: bool = True
    workers: int = 1
    imatrix: object = "auto"  # llama.cpp: "auto" (from the calibration data), None, an Imatrix or its file
    monotone: bool = False

    _parameter_constraints = {
        "validate": [Interval(int, 0, None)], "points": [Interval(int, 2, None), None],
        "min_rank_correlation": [Interval(float, -1, 1)], "workers": [Interval(int, 1, None)],
    }
    _setting_notes = {"validate": "plans to measure"}

    def _check(self) -> None:
        """The target resolved to its object once; the estimator, the solver, their settings and the
        options checked against the target (:func:`mpsearch.recipe.check`)."""
        if self.target is not None:
            object.__setattr__(self, "target", get_target(self.target))

        object.__setattr__(self, "imatrix", check_setting(self.imatrix, self.target))
        check(target=self.target, options=self.options, estimator=self.estimator, params=self.estimator_params,
              imatrix=imatrix_expected(self.imatrix, self.target, True))
        get_solver(self.solver, **self.solver_params)

    #: measured_frontier's keywords for the refinement -> RefineSettings fields
    REFINE_KEYWORDS = {"refine": "rounds", "refine_method": "method", "refine_evals": "max_evals",
                       "refine_targets": "targets"}

    @classmethod
    def from_kwargs(cls, base: FrontierSettings | None = None, **kwargs) -> FrontierSettings:
        """``base`` (default: the defaults) with :func:`~mpsearch.measured.measured_frontier`'s
        keywords applied: the fields, plus ``refine`` as the number of rounds, ``refine_method``,
        ``refine_evals``, ``refine_targets``, ``refine_params`` (the refinement's) and ``n_points``
        (the old name of ``points``). ``None`` for a dict, a budget or ``n_points`` means "not given"."""
        base = base if base is not None else cls()
        if kwargs.get("n_points") is not None:
            kwargs["points"] = kwargs["n_points"]
        kwargs.pop("n_points", None)
        for k in ("estimator_params", "solver_params", "estimate_kwargs", "budget", "refine_params"):
            if k in kwargs and kwargs[k] is None:
                del kwargs[k]
        if isinstance(kwargs.get("refine"), RefineSettings):
            base = dataclasses.replace(base, refine=kwargs.pop("refine"))
        refine = {cls.REFINE_KEYWORDS[k]: kwargs.pop(k) for k in list(kwargs) if k in cls.REFINE_KEYWORDS}
        if isinstance(refine.get("targets"), str):
            refine["targets"] = (refine["targets"],)
        params = kwargs.pop("refine_params", None)
        if refine or params:
            fields = {k: v for k, v in base.refine.to_dict().items() if params is None or k not in params}
            kwargs["refine"] = RefineSettings.from_params(params, **{**fields, **refine})
        names = cls.field_names()
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            raise SettingsError(f"measured_frontier: unknown setting {unknown[0]!r}"
                                f"{close_matches(unknown[0], names + list(cls.REFINE_KEYWORDS))}")
        return dataclasses.replace(base, **kwargs) if kwargs else base


def check_refine_metric(settings: FrontierSettings, refine_metric) -> None:
    """``refine_metric`` is what ``evolve`` measures its children with: refused for other methods."""
    if refine_metric is not None and settings.refine.method != "evolve":
        raise MpsearchError(f"refine_metric is what refine_method='evolve' measures with; refine_method "
                            f"{settings.refine.method!r} measures with the metric itself: drop refine_metric")
