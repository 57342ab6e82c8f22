"""Exceptions raised by mpsearch.

Every error that bad input can cause is a :class:`MpsearchError` (a ``ValueError``) whose message
says what is wrong and what to do. The CLI turns it into one line on stderr and exit code 2.
Outcomes such as an infeasible budget are *statuses* of a :class:`~mpsearch.SolveResult`, not
exceptions.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MpsearchError(ValueError):
    """Bad input: a malformed file, an unknown name, an impossible request."""


class TableError(MpsearchError):
    """A cost table that breaks the file contract."""


class PlanError(MpsearchError):
    """A bit plan that is malformed or does not fit the model."""


class BudgetError(MpsearchError):
    """A budget that cannot be parsed or does not fit the table."""


class SpecError(MpsearchError):
    """A model or data spec that cannot be loaded."""


class QuantizationError(MpsearchError):
    """Weights that cannot be quantized (NaN or Inf values, unsupported shapes)."""


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return ``" (did you mean 'a', 'b'?)"`` for the closest candidates, or ``""``."""
    found = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)
    if not found:
        return ""
    return " (did you mean " + ", ".join(repr(f) for f in found) + "?)"


def name_list(names: Iterable[str], limit: int = 8) -> str:
    """Format a list of names for a message, eliding the tail of long lists."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown


class OutputError(MpsearchError):
    """An output path that cannot be written (checked before any work starts)."""


class SettingsError(MpsearchError):
    """An unknown or ill-typed setting of an estimator, solver or format."""
