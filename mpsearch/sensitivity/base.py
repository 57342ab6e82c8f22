"""The estimator interface: model + calibration data -> CostTable.

An estimator implements :meth:`Estimator._damage`, returning a ``[layers, options]`` array of
damage; the base class discovers the layers (and their MACs with one forward pass), builds the table
with its resource columns (``size_bits`` with scale overhead, ``params``, ``macs``, ``bops``),
and writes the metadata: estimator and settings, model fingerprint, data description, cost.
Constructors only store settings, so they can be copied into the table's metadata.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..data import as_batches
from ..errors import MpsearchError
from ..layers import Layer, discover_layers
from ..options import Option, parse_options
from ..table import CostTable

DEFAULT_OPTIONS = "2,3,4,8"


@dataclass
class Context:
    """What ``_damage`` gets besides the model: the layers, options, batches, and bookkeeping."""

    layers: list[Layer]
    options: list[Option]
    batches: list
    device: torch.device
    progress: bool = True
    cost: dict = field(default_factory=dict)  # passes, probes... written into the metadata
    extra_metadata: dict = field(default_factory=dict)

    def count(self, key: str, n: int = 1) -> None:
        self.cost[key] = self.cost.get(key, 0) + n


class Estimator:
    """Base class. Subclasses set ``name`` (and ``needs_data``) and implement :meth:`_damage`."""

    name = "base"
    needs_data = False

    def __init__(self, *, options=DEFAULT_OPTIONS, seed: int = 0, device: str | None = None):
        self.options = options
        self.seed = seed
        self.device = device

    def get_params(self) -> dict:
        import inspect

        params = {}
        for p in inspect.signature(type(self).__init__).parameters:
            if p != "self" and hasattr(self, p):
                v = getattr(self, p)
                params[p] = v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
        return params

    def parsed_options(self) -> list[Option]:
        return parse_options(self.options)

    def estimate(
        self,
        model: torch.nn.Module,
        data=None,
        *,
        layers: list[Layer] | None = None,
        ties=(),
        fuse_projections: bool = False,
        include_embedding: bool = False,
        exclude=(),
        progress: bool = True,
        act_bits: int = 16,
    ) -> CostTable:
        """Fill a cost table for ``model``.

        ``data`` is a batch or an iterable of batches (see :mod:`mpsearch.data`); the first batch
        also measures MACs. ``ties``/``fuse_projections`` write the ``group`` column.
        """
        if not isinstance(model, torch.nn.Module):
            raise MpsearchError(f"estimate() takes a torch.nn.Module, got {type(model).__name__}")
        batches = as_batches(data)
        if self.needs_data and not batches:
            raise MpsearchError(
                f"estimator {self.name!r} needs calibration data: pass data (or --data on the CLI)"
            )
        options = self.parsed_options()
        device = torch.device(self.device) if self.device else _model_device(model)
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % (2**32))
        if layers is None:
            layers = discover_layers(
                model,
                batches[0] if batches else None,
                include_embedding=include_embedding,
                ties=ties,
                fuse_projections=fuse_projections,
                exclude=exclude,
            )
        ctx = Context(layers=layers, options=options, batches=batches, device=device, progress=progress)
        t0 = time.perf_counter()
        damage = np.asarray(self._damage(model, ctx), dtype=float)
        seconds = time.perf_counter() - t0
        if damage.shape != (len(layers), len(options)):
            raise AssertionError(
                f"{self.name}: damage has shape {damage.shape}, expected {(len(layers), len(options))}"
            )
        metadata = {
            "estimator": self.name,
            "params": self.get_params(),
            "model": {"fingerprint": model_fingerprint(model), "class": type(model).__name__},
            "data": describe_data(batches),
            "cost": {"seconds": round(seconds, 4), **ctx.cost},
            "mpsearch": __version__,
            **ctx.extra_metadata,
        }
        return build_table(layers, options, damage, metadata, act_bits=act_bits)

    def _damage(self, model: torch.nn.Module, ctx: Context) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


def build_table(layers, options, damage, metadata=None, *, act_bits: int = 16) -> CostTable:
    """Assemble the long-form table from layers, options and a ``[L, K]`` damage array."""
    rows = []
    damage = np.asarray(damage, dtype=float)
    for i, lay in enumerate(layers):
        for k, opt in enumerate(options):
            row = {
                "layer": lay.name,
                "option": opt.name,
                "bits": opt.bits,
                "damage": max(float(damage[i, k]), 0.0),
                "size_bits": opt.size_bits(lay.out_channels, lay.in_features),
                "params": lay.params,
            }
            if lay.macs is not None:
                row["macs"] = lay.macs
                row["bops"] = lay.macs * opt.bits * act_bits
            if lay.group:
                row["group"] = lay.group
            rows.append(row)
    frame = pd.DataFrame(rows)
    if "group" in frame:
        frame["group"] = frame["group"].where(frame["group"].notna(), None)
    return CostTable(frame, metadata)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's parameter names, shapes and values (cheap summaries)."""
    h = hashlib.sha1()
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.detach().float()
            h.update(f"{name}:{tuple(t.shape)}:{float(t.sum()):.6e}:{float(t.abs().sum()):.6e}".encode())
    return h.hexdigest()[:16]


def describe_data(batches) -> dict:
    from ..data import split_batch

    if not batches:
        return {"batches": 0}
    args, kwargs, target = split_batch(batches[0])
    shapes = [list(a.shape) for a in args if isinstance(a, torch.Tensor)]
    shapes += [f"{k}:{list(v.shape)}" for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return {"batches": len(batches), "first_batch": shapes, "targets": target is not None}


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def progress_bar(iterable, *, enabled: bool = True, desc: str = "", total=None):
    """A tqdm progress bar on stderr (disabled when not wanted)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False)
