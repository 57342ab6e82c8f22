"""Import optional consumers without their import-time noise.

torchao logs one "Failed to load ... .so" warning per native kernel library it cannot load on this
machine (CPU-only torch), and registers enums that make torch's pytree log deprecation warnings;
transformers imports torchao when it loads any model. Those lines are not mpsearch's and say
nothing to its user, so the imports run with those two loggers raised to ERROR.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging

NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_loggers(names=NOISY_LOGGERS, level: int = logging.ERROR):
    saved = []
    for name in names:
        log = logging.getLogger(name)
        saved.append((log, log.level))
        log.setLevel(level)
    try:
        yield
    finally:
        for log, lvl in saved:
            log.setLevel(lvl)


def import_quietly(name: str):
    """``importlib.import_module(name)`` with torchao's and pytree's import warnings silenced."""
    with quiet_loggers():
        return importlib.import_module(name)


def preload_torchao() -> None:
    """Import torchao quietly if it is installed (later imports, e.g. by transformers, are silent)."""
    if importlib.util.find_spec("torchao") is not None:
        with contextlib.suppress(Exception):
            import_quietly("torchao")
            import_quietly("torchao.quantization")


def import_transformers_quietly():
    """``import transformers`` plus its quantizer registry (which imports torchao), silenced."""
    preload_torchao()
    with quiet_loggers():
        import transformers

        with contextlib.suppress(Exception):
            importlib.import_module("transformers.quantizers.auto")
    return transformers


# --------------------------------------------------------------- warnings held while a command runs
class HeldWarnings:
    """The warnings (``warnings.warn``) and log records (WARNING and above, from loggers that would
    print through Python's last-resort handler) given while a command ran, held back by
    :func:`hold_warnings`. :meth:`release` gives them out as they would have been, each once; a
    command that refuses in one line drops them, so the refusal stays one line."""

    def __init__(self):
        self.warnings: list = []
        self.records: list = []
        self.print_records = False

    def release(self) -> None:
        import sys
        import warnings

        seen = set()
        for w in self.warnings:
            key = (w.category, str(w.message))
            if key in seen:
                continue
            seen.add(key)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        if self.print_records:
            for record in self.records:
                key = (record.name, record.getMessage())
                if key not in seen:
                    seen.add(key)
                    sys.stderr.write(record.getMessage() + "\n")
        self.warnings, self.records = [], []


class _Buffer(logging.Handler):
    def __init__(self, records: list):
        super().__init__(logging.WARNING)
        self.records = records

    def emit(self, record) -> None:
        self.records.append(record)


@contextlib.contextmanager
def hold_warnings():
    """Hold back warnings and last-resort log records while the block runs (see :class:`HeldWarnings`).

    The warning filters stay the caller's (what they ignore is not held; what they turn into errors
    still raises). Log records are held from loggers without a handler of their own (accelerate's,
    for one) when the root logger has none either, which is when Python would print them on stderr."""
    import warnings

    held = HeldWarnings()
    root = logging.getLogger()
    held.print_records = not root.handlers
    handler = _Buffer(held.records)
    with warnings.catch_warnings(record=True) as caught:
        root.addHandler(handler)
        try:
            yield held
        finally:
            root.removeHandler(handler)
            held.warnings = list(caught)
