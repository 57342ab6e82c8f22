"""Exceptions raised by mpsearch.

Every error that bad input can cause is a :class:`MpsearchError` (a ``ValueError``) whose message
says what is wrong and what to do. The CLI turns it into one line on stderr and exit code 2.
Outcomes such as an infeasible budget are *statuses* of a :class:`~mpsearch.SolveResult`, not
exceptions.
"""

from __future__ import annotations

import difflib
import re
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


class ExportError(MpsearchError):
    """A plan that cannot be written to (or read from) a consumer's format."""


class SettingsError(MpsearchError):
    """An unknown or ill-typed setting of an estimator, solver or format."""


#: the errors of a file system that cannot take a write: what each means for the user
DISK_ERRORS = {
    "ENOSPC": "no space is left on the device",
    "EDQUOT": "the disk quota is exceeded",
    "EROFS": "the file system is read-only",
    "EACCES": "permission is denied",
    "EPERM": "the operation is not permitted",
    "EFBIG": "the file is too large for the file system",
}


def disk_error(exc: BaseException, path=None) -> OutputError | None:
    """The one-line :class:`OutputError` of an ``OSError`` that a full, read-only or forbidden file
    system raises (``ENOSPC``, ``EDQUOT``, ``EROFS``, ``EACCES``...): ``path`` is the output being
    written (its temporary files are gone: nothing was written), else the error's own file name;
    ``None`` for any other exception."""
    import errno as errno_

    if not isinstance(exc, OSError) or exc.errno is None:
        return None
    code = errno_.errorcode.get(exc.errno)
    if code not in DISK_ERRORS:
        return None
    if path is not None:
        return OutputError(f"cannot write {str(path)!r}: {DISK_ERRORS[code]} ({code}); nothing was written: "
                           f"free space, fix the permissions or give another output path")
    where = f"{str(exc.filename)!r}: " if exc.filename else ""
    return OutputError(f"{where}{DISK_ERRORS[code]} ({code}); free space, fix the permissions or give "
                       f"another path")


def compile_regex(pattern, what: str = "pattern") -> re.Pattern:
    """``re.compile(pattern)``, or a :class:`BudgetError` naming ``what`` and the regex error."""
    if not isinstance(pattern, str):
        raise BudgetError(f"{what} {pattern!r}: a regex must be a string")
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise BudgetError(f"{what} {pattern!r} does not compile as a regular expression: {exc}") from None


def check_patterns(patterns, what: str = "pattern") -> list:
    """Compile every regex of ``patterns`` (refusing bad ones with one line)."""
    return [compile_regex(p, what) for p in patterns or ()]
