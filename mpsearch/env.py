"""The environment variables mpsearch reads, each through one checked reader.

A variable is read when it is needed (never at import), and a value mpsearch cannot use is refused
in one :class:`~mpsearch.errors.MpsearchError` line naming the variable, its value and what to do,
instead of a ``ValueError`` traceback from a bare ``int()``. An empty value counts as unset
(``WORLD_SIZE= mpsearch ...``). The variables:

==========================  ==================================================================
``RANK``, ``WORLD_SIZE``,   set by ``torchrun``: this process's rank, the number of processes,
``LOCAL_RANK``              its GPU on this host (integers; rank < world size)
``MASTER_ADDR/PORT``        ``torchrun``'s rendezvous (checked by ``torch.distributed``)
``MPSEARCH_BACKEND``        ``nccl`` or ``gloo`` (default: nccl when CUDA is available)
``MPSEARCH_CACHE``          the folder of trained zoo models (default ``~/.cache/mpsearch``)
``MPSEARCH_FASHION_DIR``    where the Fashion-MNIST IDX files are
``MPSEARCH_FUZZ_EXAMPLES``  examples per parser of ``tests/test_fuzz.py`` (tests only)
==========================  ==================================================================
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MpsearchError


class EnvError(MpsearchError):
    """An environment variable whose value mpsearch cannot use."""


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def env_int(name: str, default: int, *, low: int = 0, what: str = "", fix: str = "unset it") -> int:
    """The integer value of ``name`` (``default`` when unset or empty), at least ``low``."""
    value = _raw(name)
    if value is None:
        return default
    try:
        number = int(value, 10)
    except ValueError:
        number = None
    if number is None or number < low:
        about = f" ({what})" if what else ""
        raise EnvError(f"environment variable {name}={os.environ[name]!r} must be an integer >= {low}{about}; {fix}")
    return number


def env_choice(name: str, choices: tuple[str, ...], default: str | None = None) -> str | None:
    """The value of ``name``, one of ``choices`` (``default`` when unset or empty)."""
    value = _raw(name)
    if value is None:
        return default
    if value not in choices:
        raise EnvError(f"environment variable {name}={os.environ[name]!r} must be one of "
                       f"{', '.join(choices)}; set one of them or unset it")
    return value


def env_dir(name: str, default: Path | str, *, what: str, create: bool = True) -> Path:
    """The folder named by ``name`` (``default`` when unset or empty), created when ``create``.

    A path that is a file, lies below a file or cannot be created is refused naming the variable."""
    value = _raw(name)
    path = Path(value).expanduser() if value is not None else Path(default).expanduser()
    source = f"environment variable {name}={value!r}" if value is not None else f"{what} folder {str(path)!r}"
    if path.exists() and not path.is_dir():
        raise EnvError(f"{source} is a file, not a folder; point {name} at a folder ({what}) or unset it")
    if create and not path.is_dir():
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EnvError(f"{source}: the folder cannot be created ({exc.strerror or exc}); point {name} at a "
                           f"writable folder ({what})") from None
    return path


# ------------------------------------------------------------------------------ torchrun
def world_size() -> int:
    """``WORLD_SIZE``: the number of processes of a torchrun job (1 when unset)."""
    return env_int("WORLD_SIZE", 1, low=1, what="the number of processes of a torchrun job",
                   fix="unset it, or launch with torchrun --nproc-per-node N")


def rank() -> int:
    """``RANK``: this process's rank (0 when unset), below ``WORLD_SIZE`` where that is set."""
    r = env_int("RANK", 0, what="this process's rank under torchrun", fix="unset it, or launch with torchrun")
    world = world_size()
    if _raw("WORLD_SIZE") is not None and r >= world:
        raise EnvError(f"environment variable RANK={r} must be below WORLD_SIZE={world}; "
                       f"launch with torchrun (it sets both) or unset them")
    return r


def local_rank() -> int:
    """``LOCAL_RANK``: this process's GPU on its host (0 when unset)."""
    return env_int("LOCAL_RANK", 0, what="this process's GPU under torchrun", fix="unset it, or launch with torchrun")
