"""The refinement's settings (:class:`RefineSettings`), typed and checked when made."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import close_matches, SettingsError
from ..recipe import REFINE_METHODS
from ..settings import Choices, Interval, Settings

METHODS = REFINE_METHODS


@dataclass(frozen=True)
class RefineSettings(Settings):
    """The refinement's settings, typed and checked when made (:mod:`mpsearch.settings`).

    ``rounds`` rounds of ``method`` (``evolve``: generations) within ``max_evals`` measured plans
    (``None``: no limit beyond the rounds), at the target budgets named in ``targets`` (``None``:
    all; used by :func:`mpsearch.measured.measured_frontier`). ``calibrate``: damage multipliers
    per ``groups`` (``type``, ``layer``, ``one`` or a callable layer -> group) pulled toward one
    scalar by ``ridge``; ``local``: ``swaps`` measured moves per round; ``evolve``: ``offspring``
    children per generation, ``survivors`` per rung of search data after the first (non-increasing,
    at most ``offspring``; ``None``: a quarter per rung), 1 to ``max_switches`` level switches per
    child, random ``seed``, ``time_limit`` seconds per target. ``column``: the size the moves trade.
    """

    rounds: int = 1
    method: str = "calibrate"
    max_evals: int | None = None
    targets: tuple[str, ...] | None = None
    swaps: int = 4
    groups: str | Callable = "type"
    ridge: float = 1e-3
    offspring: int = 16
    survivors: tuple[int, ...] | None = None
    seed: int = 0
    max_switches: int = 3
    time_limit: float | None = None
    column: str = "size_bits"

    _label = "refine"
    _parameter_constraints = {
        "rounds": [Interval(int, 0, None)], "method": [Choices(*METHODS)], "max_evals": [Interval(int, 0, None), None],
        "swaps": [Interval(int, 1, None)], "groups": [Choices("type", "layer", "one"), callable],
        "ridge": [Interval(float, 0, None)], "offspring": [Interval(int, 1, None)],
        "max_switches": [Interval(int, 1, None)], "time_limit": [Interval(float, 0, None, closed="neither"), None],
    }
    #: the settings ``--refine-param KEY=VALUE`` (and ``refine_params=``) may set
    PARAMS = ("swaps", "groups", "ridge", "offspring", "survivors", "seed", "max_switches", "time_limit")

    def _check(self) -> None:
        sv = self.survivors or ()
        if any(k < 1 for k in sv) or list(sv) != sorted(sv, reverse=True) or (sv and sv[0] > self.offspring):
            raise SettingsError(f"evolve: offspring must be >= 1 and survivors a non-increasing sequence of counts "
                                f"<= offspring, got offspring={self.offspring}, survivors={self.survivors}")

    @classmethod
    def from_params(cls, params: dict | None, **fields) -> RefineSettings:
        """``fields`` plus ``params`` (the ``--refine-param`` settings: :attr:`PARAMS` only)."""
        unknown = sorted(set(params or {}) - set(cls.PARAMS))
        if unknown:
            raise SettingsError(f"refine_params: unknown setting {unknown[0]!r}; the refinement's settings: "
                                f"{', '.join(cls.PARAMS)}")
        return cls(**fields, **dict(params or {}))

    def check_column(self, columns, what: str = "the table") -> None:
        """The size column the moves trade (``column``) is one of ``columns`` (the cost columns)."""
        if self.column not in columns:
            raise SettingsError(f"refine column {self.column!r} is not a cost column of {what}"
                                f"{close_matches(str(self.column), list(columns))}; its columns: {', '.join(columns)}")

    def params(self) -> dict:
        """The :attr:`PARAMS` settings."""
        return {k: getattr(self, k) for k in self.PARAMS}


def _settings(settings: RefineSettings | None, kwargs: dict, **defaults) -> RefineSettings:
    """``settings`` with ``kwargs`` (fields) applied, or new settings from ``defaults`` and ``kwargs``."""
    if settings is None:
        return RefineSettings.from_dict({**defaults, **kwargs}, what="refine")
    return settings.replace(**kwargs) if kwargs else settings
