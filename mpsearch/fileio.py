"""Output files and folders: checked before any work, written whole or not at all.

Every command that writes calls :func:`check_output_path` on each output first (an empty path, an
existing directory where a file goes, a path below a regular file, a directory that cannot be
written, an unsupported suffix: one :class:`~mpsearch.errors.OutputError` line). Files are then
written through :func:`atomic_write` (a temporary sibling, ``os.replace`` last), and a folder of
outputs through :func:`atomic_dir` (built in a hidden sibling, renamed or moved in last), so a
failure leaves nothing half-written behind; the files of one output (a CSV and its ``.npz`` or
metadata) through :func:`atomic_files`, together. A full, read-only or forbidden file system
(``ENOSPC``, ``EROFS``, ``EACCES``...) met while writing is one ``OutputError`` line, and the
temporary files are removed. Two runs building one folder are excluded by a lock on its staging
folder: the second is refused in one line.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from pathlib import Path

from .env import world_size
from .errors import disk_error, OutputError

try:  # advisory locks: POSIX (elsewhere concurrent runs are not excluded)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["check_output_path", "atomic_write", "atomic_files", "atomic_write_text", "atomic_write_bytes",
           "atomic_dir", "staged_dir_name", "torch_save"]


def _as_path(path, flag: str) -> Path:
    if path is None or (isinstance(path, str) and not path.strip()):
        raise OutputError(f"{flag}: the output path is empty; give a file or folder name")
    if not isinstance(path, (str, os.PathLike)):
        raise OutputError(f"{flag}: the output path must be a string, got {type(path).__name__}")
    return Path(path)


def check_output_path(path, *, flag: str = "-o", kind: str = "file", suffixes=None) -> Path:
    """Check that ``path`` can be written as a ``kind`` (``"file"`` or ``"dir"``) before any work.

    ``suffixes``: the allowed suffixes (lower case, with the dot), e.g. the image formats of a plot.
    Raises :class:`OutputError` with one line saying what is wrong; returns the path.
    """
    p = _as_path(path, flag)
    if str(p) in (".", "..", os.sep) or p.name in ("", ".", ".."):
        raise OutputError(f"{flag} {str(path)!r}: name a {kind} to write, not {str(path)!r}")
    if os.path.lexists(p) and not p.exists():
        raise OutputError(f"{flag} {str(p)!r} is a broken link (to {os.readlink(p)!r}); remove it or give "
                          f"another path")
    if kind == "file":
        if p.is_dir():
            raise OutputError(f"{flag} {str(p)!r} is an existing directory; give a file path "
                              f"(for example {str(p / 'out')!r} with a suffix)")
        if p.exists() and not p.is_file():
            raise OutputError(f"{flag} {str(p)!r} exists and is not a regular file")
    elif kind == "dir":
        if p.exists() and not p.is_dir():
            raise OutputError(f"{flag} {str(p)!r} is an existing file; give a folder path")
        if stage_is_busy(p):
            raise OutputError(f"{flag} {busy_message(p)}")
    else:  # pragma: no cover - programming error
        raise ValueError(kind)
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise OutputError(f"{flag} {str(p)!r}: unsupported format {p.suffix or '(no suffix)'!r}; "
                          f"use one of {', '.join(sorted(suffixes))}")
    # the first existing ancestor must be a writable directory
    parent = p.parent if str(p.parent) else Path(".")
    while not parent.exists() and not os.path.lexists(parent):
        if parent == parent.parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"{flag} {str(p)!r}: {str(parent)!r} is a regular file, not a directory")
    if os.path.lexists(parent) and not parent.exists():
        raise OutputError(f"{flag} {str(p)!r}: {str(parent)!r} is a broken link")
    if parent.exists() and not _writable(parent):
        raise OutputError(f"{flag} {str(p)!r}: the directory {str(parent)!r} is not writable")
    return p


def _writable(directory: Path) -> bool:
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return True
    # root passes os.access everywhere: try for real (read-only mounts)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".mpsearch-probe.")
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing ancestors; return those created, deepest first."""
    missing = []
    d = Path(directory)
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    Path(directory).mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(dirs) -> None:
    for d in dirs:  # deepest first; a folder another writer filled meanwhile stays
        with contextlib.suppress(OSError):
            d.rmdir()


def _mode_of_new_file() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", **open_kw):
    """Open a temporary sibling of ``path`` for writing; ``os.replace`` it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left as it was. Parent folders
    are created. ``with atomic_write("a.json") as fh: fh.write(...)``; ``atomic_write(p, "wb")``
    for bytes; ``atomic_write(p, None)`` yields the temporary *path* (for writers that take a
    file name, such as ``savefig``; for ``torch.save`` use :func:`torch_save`). A full, read-only or forbidden file system
    (``ENOSPC``, ``EROFS``, ``EACCES``...) is one :class:`OutputError` line naming ``path``.
    """
    with atomic_files(path) as (tmp,):
        if mode is None:
            yield tmp
        else:
            with open(tmp, mode, **open_kw) as fh:
                yield fh


@contextlib.contextmanager
def atomic_files(*paths):
    """Temporary siblings of ``paths`` (yielded as a list of paths) put in place together on success,
    in the order given (the last one last), or none of them on an error: the group of files one
    output is (a frontier CSV and its ``.npz``, a table and its metadata).
    """
    paths = [Path(p) for p in paths]
    created: list[Path] = []
    tmps: list[str] = []
    try:
        for p in paths:
            created += _make_parents(p.parent)
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp" + p.suffix)
            os.close(fd)
            tmps.append(tmp)
        yield tmps
        for tmp, p in zip(tmps, paths):
            os.chmod(tmp, _mode_of_new_file())
            os.replace(tmp, p)
    except BaseException as exc:
        for tmp in tmps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        _remove_empty(created)
        refusal = disk_error(exc, paths[-1])
        if refusal is not None:
            raise refusal from None
        raise


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling, so no half-written file is left."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def torch_save(obj, path) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`. torch writes through a Python file
    object here: given a path, its own writer turns a full disk into a bare ``RuntimeError``
    ("iostream error"); through a file object the ``OSError`` (``ENOSPC``) comes out and is one line."""
    import torch

    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def staged_dir_name(dest) -> Path:
    """The hidden sibling a folder of outputs is built in (kept after an interruption, to resume)."""
    dest = Path(dest)
    return dest.parent / f".{dest.name}.partial"


def final_dir(path) -> Path:
    """Where a folder being built (:func:`staged_dir_name`) will be put: ``path`` itself otherwise."""
    path = Path(path)
    if path.name.startswith(".") and path.name.endswith(".partial") and len(path.name) > len("..partial"):
        return path.parent / path.name[1:-len(".partial")]
    return path


@contextlib.contextmanager
def atomic_dir(dest, *, keep_on_interrupt: bool = True, seed=()):
    """Build a folder of outputs beside ``dest`` and put it in place last.

    Yields the staging folder (``.NAME.partial`` beside ``dest``). If ``dest`` already exists, the
    staging folder starts with a copy of its entries named in ``seed`` (caches to reuse; ``None``:
    all of it) and, on success, each new or
    changed file is moved into ``dest`` (files of ``dest`` that were not rewritten stay); otherwise
    the staging folder is renamed to ``dest``. On an error the staging folder is removed; on
    Ctrl-C it is kept (``keep_on_interrupt``) so a rerun resumes the cached work in it.

    The staging folder is locked while it is built: a second run on the same ``dest`` is refused
    in one :class:`OutputError` line (never two runs in one folder); a folder left by a killed run
    is not locked, and is resumed. A full or forbidden file system is one line too.
    """
    dest = Path(dest)
    stage = staged_dir_name(dest)
    if stage.is_symlink() or (stage.exists() and not stage.is_dir()):
        stage.unlink()
    created = []
    lock, ours = None, False
    try:
        created = _make_parents(stage.parent)
        lock, fresh = _lock_stage(stage, dest)
        ours = True
        if fresh and dest.is_dir():
            if seed is None:
                shutil.copytree(dest, stage, symlinks=True, dirs_exist_ok=True)
            for name in seed or ():
                src = dest / name
                if src.is_dir():
                    shutil.copytree(src, stage / name, symlinks=True)
                elif src.is_file():
                    shutil.copy2(src, stage / name)
        yield stage
        if not dest.exists():
            os.replace(stage, dest)
            return
        for root, _dirs, files in os.walk(stage):
            rel = Path(root).relative_to(stage)
            (dest / rel).mkdir(parents=True, exist_ok=True)
            for f in files:
                os.replace(Path(root) / f, dest / rel / f)
        shutil.rmtree(stage, ignore_errors=True)
    except KeyboardInterrupt:
        if not keep_on_interrupt:
            shutil.rmtree(stage, ignore_errors=True)
            _remove_empty(created)
        raise
    except BaseException as exc:
        if ours:  # not a folder another run holds
            shutil.rmtree(stage, ignore_errors=True)
        _remove_empty(created)
        refusal = disk_error(exc, dest)
        if refusal is not None:
            raise refusal from None
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _lock_stage(stage: Path, dest: Path):
    """Create (or find) ``stage`` and lock it: ``(descriptor holding the lock, whether it is new)``.

    Refused when another process holds it. The lock is taken on the folder itself, and the folder
    checked to be still the one at ``stage`` (a run that just finished renamed it to ``dest``)."""
    while True:
        try:
            stage.mkdir()
            fresh = True
        except FileExistsError:
            fresh = False
        if fcntl is None:  # pragma: no cover - no advisory locks here
            return None, fresh
        fd = os.open(stage, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(busy_message(dest)) from None
        try:
            now = os.stat(stage)
        except FileNotFoundError:
            now = None
        held = os.fstat(fd)
        if now is not None and (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev):
            return fd, fresh
        os.close(fd)  # the folder we locked was renamed away meanwhile: start again


def busy_message(dest) -> str:
    return (f"{str(dest)!r} is being written by another mpsearch run now (its work folder "
            f"{staged_dir_name(dest).name!r} is locked); wait for that run to finish or give another output path")


def stage_is_busy(dest) -> bool:
    """Whether another process is building ``dest`` now (its staging folder is locked)."""
    stage = staged_dir_name(dest)
    if fcntl is None or not stage.is_dir() or stage.is_symlink():
        return False
    try:
        fd = os.open(stage, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def atomic_output_dir(arg: str = "out", seed=()):
    """Decorator: the keyword argument ``arg`` (a folder) is built with :func:`atomic_dir`.

    The function receives the staging folder; when it returns, the folder is put in place and any
    path in the result's ``out`` and ``files`` attributes is rewritten to the final folder.
    """

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            dest = kwargs.get(arg)

            if dest is None or world_size() > 1:
                return fn(*args, **kwargs)  # under torchrun the ranks share the folder (rank 0 writes)
            dest = check_output_path(dest, flag=arg, kind="dir")
            with atomic_dir(dest, seed=seed) as stage:
                kwargs[arg] = stage
                result = fn(*args, **kwargs)
            _relocate(result, stage, dest)
            return result

        return inner

    return wrap


def _relocate(result, stage: Path, dest: Path) -> None:
    def fix(value):
        text = str(value)
        s = str(stage)
        if text == s or text.startswith(s + os.sep):
            new = str(dest) + text[len(s):]
            return Path(new) if isinstance(value, Path) else new
        return value

    if hasattr(result, "out") and result.out is not None:
        with contextlib.suppress(AttributeError):
            result.out = fix(result.out)
    files = getattr(result, "files", None)
    if isinstance(files, dict):
        for k, v in list(files.items()):
            files[k] = fix(v)
