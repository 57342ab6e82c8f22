"""Resumable estimator caches.

An estimator with a ``cache_dir`` gets a :class:`Checkpoint` in its context: a file
``<cache_dir>/<estimator>-<key>.pt`` where ``key`` hashes everything the result depends on (the
estimator's settings, the model's weights, the calibration data, the layers and options). Estimators
save their partial state after each unit of work (a probe, a chunk of samples, a layer), at most once
every ``cache_every`` seconds; a run that was interrupted loads the state and goes on from there.
When the work is done the finished damage is stored too, so running again returns it at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from ..errors import OutputError
from ..fileio import torch_save
from ..fingerprint import data_fingerprint, model_fingerprint  # noqa: F401  (re-exported)


def default_cache_dir() -> Path:
    """Where the CLI keeps estimator caches unless told otherwise (``--param cache_dir=DIR``, or
    ``cache_dir=None`` for none): ``$MPSEARCH_ESTIMATOR_CACHE``, else ``estimator/`` under
    ``$MPSEARCH_CACHE`` or ``~/.cache/mpsearch`` (created when first written)."""
    import os

    if os.environ.get("MPSEARCH_ESTIMATOR_CACHE"):
        return Path(os.environ["MPSEARCH_ESTIMATOR_CACHE"]).expanduser()
    root = os.environ.get("MPSEARCH_CACHE") or Path.home() / ".cache" / "mpsearch"
    return Path(root).expanduser() / "estimator"


_NOT_KEYED = {"cache_dir", "cache_every", "options", "max_variant_mb"}  # options: keyed as estimated, below;
# max_variant_mb changes no number (the kept variants are the tensors made again otherwise)


def cache_key(estimator, model, batches, layers, options) -> str:
    params = {k: v for k, v in estimator.get_params().items() if k not in _NOT_KEYED}
    doc = {
        "estimator": estimator.name,
        "params": params,
        "model": model_fingerprint(model),
        "data": data_fingerprint(batches),
        "layers": [lay.name for lay in layers],
        "options": [o.name for o in options],
    }
    return hashlib.sha1(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Checkpoint:
    """One estimator run's partial state on disk, written atomically."""

    def __init__(self, directory, stem: str, every: float = 0.0):
        self.path = Path(directory) / f"{stem}.pt"
        self.every = float(every)
        self._last_save = time.monotonic()
        self._t0 = time.perf_counter()
        self.previous_seconds = 0.0
        self.saves = 0
        self.broken = False  # set when a write failed: no more tries
        self._state = None
        if self.path.is_file():
            try:
                self._state = torch.load(self.path, weights_only=True)
            except Exception:  # a corrupt or foreign file: start over
                self._state = None
        if self._state is not None:
            self.previous_seconds = float(self._state.get("_seconds", 0.0))

    def load(self) -> dict | None:
        """The saved partial state (a dict), or ``None`` when there is none."""
        if self._state is None or "state" not in self._state:
            return None
        return self._state["state"]

    def result(self) -> dict | None:
        """The finished result of an earlier run, or ``None``."""
        return None if self._state is None else self._state.get("result")

    def save(self, state: dict, *, force: bool = False) -> bool:
        """Save ``state`` if ``cache_every`` seconds have passed since the last save (or ``force``)."""
        if not force and time.monotonic() - self._last_save < self.every:
            return False
        self._write({"state": state})
        return True

    def save_result(self, result: dict) -> None:
        self._write({"result": result})

    def _write(self, doc: dict) -> None:
        doc["_seconds"] = self.previous_seconds + time.perf_counter() - self._t0

        if self.broken:
            return
        try:
            torch_save(doc, self.path)
        except (OSError, OutputError) as exc:  # a cache that cannot be written costs the resume, not the run
            import warnings

            self.broken = True
            warnings.warn(f"the estimator cache {self.path} cannot be written ({getattr(exc, 'strerror', None) or exc}): the run "
                          f"goes on without it (an interruption now starts over)", RuntimeWarning, stacklevel=2)
            return
        self._state = doc
        self._last_save = time.monotonic()
        self.saves += 1
