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
