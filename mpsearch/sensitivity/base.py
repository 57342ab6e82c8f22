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
from ..data import as_batches, move_batch
from ..distributed import Shard
from ..errors import MpsearchError
from ..layers import Layer, discover_layers
from ..options import Option, parse_options
from ..table import CostTable
from .cache import model_fingerprint  # noqa: F401  (re-exported)

#: the options an estimator costs when given none (mpsearch's own target): the library's default
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
    seed: int = 0
    checkpoint: object = None  # a cache.Checkpoint when the estimator has a cache_dir, else None
    extra_columns: dict = field(default_factory=dict)  # name -> [L, K] array (e.g. damage_std)
    legal: np.ndarray | None = None  # [L, K] bool: the options each layer may take (None: all)
    shard: Shard = field(default_factory=Shard)  # a distributed.Shard: which work units are this rank's, and the reduction

    def count(self, key: str, n: int = 1) -> None:
        self.cost[key] = self.cost.get(key, 0) + n

    def layer_options(self, i: int):
        """``(k, option)`` for the options layer ``i`` may take (the target's per-tensor rules);
        damage of the others is never computed and their rows are left out of the table."""
        for k, opt in enumerate(self.options):
            if self.legal is None or self.legal[i, k]:
                yield k, opt


class Estimator:
    """Base class. Subclasses set ``name`` (and ``needs_data``) and implement :meth:`_damage`."""

    name = "base"
    needs_data = False
    #: what a default means where its value does not say it (shown by ``mpsearch list``)
    _setting_notes = {"options": "None: 2,3,4,8, or a consumer target's default set; on the CLI: --bits, "
                                 "default the recipe's options"}

    def __init__(self, *, options: str | list | tuple | None = None, seed: int = 0, device: str | None = None):
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

    def parsed_options(self, target=None) -> list[Option]:
        """The options to estimate, checked against ``target`` (a name or a
        :class:`~mpsearch.targets.Target`). ``options=None`` (the default) stands for the target's
        default set, and for mpsearch's own target for :data:`DEFAULT_OPTIONS` (the library's
        default; the CLI and :func:`mpsearch.recipe.resolve` always pass the options they decided)."""
        from ..targets import DEFAULT_TARGET, get_target

        target = get_target(target)
        if target.name == DEFAULT_TARGET:
            return parse_options(DEFAULT_OPTIONS if self.options is None else self.options)
        return target.parsed_options(self.options)

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
        target=None,
        quantizer: str = "rtn",
    ) -> CostTable:
        """Fill a cost table for ``model``.

        ``data`` is a batch or an iterable of batches (see :mod:`mpsearch.data`); the first batch
        also measures MACs. ``ties``/``fuse_projections`` write the ``group`` column. ``target``
        (a :class:`~mpsearch.targets.Target`, or its name, resolved here once) decides the options,
        which layers are planned, which options each layer may take (the table is then ragged) and
        the runtime ties.
        """
        if not isinstance(model, torch.nn.Module):
            raise MpsearchError(f"estimate() takes a torch.nn.Module, got {type(model).__name__}")
        batches = as_batches(data)
        if self.needs_data and not batches:
            raise MpsearchError(
                f"estimator {self.name!r} needs calibration data: pass data (or --data on the CLI)"
            )
        from ..targets import get_target

        target_obj = get_target(target)
        options = self.parsed_options(target_obj)
        check_choice("quantizer", quantizer, ("rtn", "gptq"))
        if quantizer == "gptq" and not batches:
            raise MpsearchError("quantizer 'gptq' needs calibration data (the layers' input Hessians)")
        fuse_projections = fuse_projections or target_obj.fused_runtime
        device = torch.device(self.device) if self.device else _model_device(model)
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % (2**32))
        from ..checks import check_batches, check_weights

        check_batches(model, batches, device)  # one line naming a batch the model cannot run on
        if layers is None:
            layers = discover_layers(
                model,
                move_batch(batches[0], device) if batches else None,
                include_embedding=include_embedding,
                ties=ties,
                fuse_projections=fuse_projections,
                exclude=exclude,
            )
        from ..distributed import current, stats

        shard = current()
        layers, legal, target_obj = _target_layers(model, layers, options, target_obj)
        check_weights(model, [lay.name for lay in layers])
        ctx = Context(layers=layers, options=options, batches=batches, device=device,
                      progress=progress and shard.is_main, seed=self.seed, legal=legal, shard=shard)
        ctx.checkpoint = self._checkpoint(model, batches, layers, options, quantizer, shard)
        t0 = time.perf_counter()
        damage, cached = self._damage_or_resume(model, ctx, quantizer)
        seconds = time.perf_counter() - t0
        spread = stats(shard, seconds, {"cost": dict(ctx.cost)}) if not cached else None
        if spread is not None:
            ctx.extra_metadata["distributed"] = spread
        if damage.shape != (len(layers), len(options)):
            raise AssertionError(
                f"{self.name}: damage has shape {damage.shape}, expected {(len(layers), len(options))}"
            )
        metadata = {
            "estimator": self.name,
            "params": {**self.get_params(), "options": ",".join(o.name for o in options)},  # as estimated
            "options": [o.name for o in options],
            "model": {"fingerprint": model_fingerprint(model), "class": type(model).__name__},
            "data": describe_data(batches),
            "cost": {"seconds": round(seconds, 4), **ctx.cost},
            "mpsearch": __version__,
            "target": target_obj.name,
            "quantizer": quantizer,
            **ctx.extra_metadata,
        }
        from ..filemodels import record_file_model

        record_file_model(metadata, model, [lay.name for lay in layers], target_obj)  # for size=/file=/bpw=
        return build_table(layers, options, damage, metadata, act_bits=act_bits,
                           extra_columns=ctx.extra_columns, legal=legal)

    def _checkpoint(self, model, batches, layers, options, quantizer, shard):
        """The run's cache file (one per shard) when the estimator has a ``cache_dir``, else ``None``."""
        cache_dir = getattr(self, "cache_dir", None)
        if not cache_dir:
            return None
        from .cache import Checkpoint, cache_key

        key = cache_key(self, model, batches, layers, options)
        stem = f"{self.name}-{key}" if quantizer == "rtn" else f"{self.name}-{quantizer}-{key}"
        return Checkpoint(cache_dir, stem + shard.suffix(), every=getattr(self, "cache_every", 0.0))

    def _damage_or_resume(self, model, ctx: Context, quantizer: str) -> tuple[np.ndarray, bool]:
        """The damage matrix and whether it came from a finished earlier run with the same
        settings, model and data; otherwise it is computed (resuming partial state) and stored."""
        done = ctx.checkpoint.result() if ctx.checkpoint is not None else None
        if ctx.shard.enabled and not ctx.shard.min_int([done is not None])[0]:
            done = None  # every rank takes the cached result, or none does
        if done is not None:
            ctx.cost.update(done["cost"], from_cache=True)
            ctx.extra_metadata.update(done["extra_metadata"])
            ctx.extra_columns.update({k: np.asarray(v) for k, v in done["extra_columns"].items()})
            return np.asarray(done["damage"], dtype=float), True
        was_training = model.training
        model.eval()
        try:
            with _rounding(model, ctx, quantizer):
                damage = np.asarray(self._damage(model, ctx), dtype=float)
        finally:
            model.train(was_training)
        if ctx.checkpoint is not None:
            if ctx.checkpoint.previous_seconds:
                ctx.cost["resumed_after_seconds"] = round(ctx.checkpoint.previous_seconds, 4)
            ctx.checkpoint.save_result({
                "damage": damage.tolist(), "cost": dict(ctx.cost),
                "extra_metadata": ctx.extra_metadata,
                "extra_columns": {k: np.asarray(v).tolist() for k, v in ctx.extra_columns.items()},
            })
        return damage, False

    def _damage(self, model: torch.nn.Module, ctx: Context) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


def build_table(layers, options, damage, metadata=None, *, act_bits: int = 16,
                extra_columns: dict | None = None, legal=None) -> CostTable:
    """Assemble the long-form table from layers, options and a ``[L, K]`` damage array.

    ``extra_columns`` maps a column name (``damage_std``...) to another ``[L, K]`` array; ``legal``
    (``[L, K]`` bool) leaves out the rows of options a layer may not take (a ragged table).
    """
    rows = []
    damage = np.asarray(damage, dtype=float)
    extra = {k: np.asarray(v, dtype=float) for k, v in (extra_columns or {}).items()}
    for i, lay in enumerate(layers):
        for k, opt in enumerate(options):
            if legal is not None and not legal[i, k]:
                continue
            row = {
                "layer": lay.name,
                "option": opt.name,
                "bits": opt.bits,
                "damage": max(float(damage[i, k]), 0.0),
                "size_bits": opt.size_bits(lay.out_channels, lay.in_features),
                "params": lay.params,
            }
            for col, values in extra.items():
                row[col] = float(values[i, k])
            if lay.macs is not None:
                row["macs"] = lay.macs
                row["bops"] = lay.macs * opt.bits * min(act_bits, opt.act_bits)
            if lay.group:
                row["group"] = lay.group
            rows.append(row)
    frame = pd.DataFrame(rows)
    if "group" in frame:
        frame["group"] = frame["group"].where(frame["group"].notna(), None)
    return CostTable(frame, metadata, complete=legal is None)


def _rounding(model, ctx: Context, quantizer: str):
    """The rounding the damage is measured with (GPTQ: the layers' input Hessians, collected once)."""
    import contextlib

    if quantizer != "gptq":
        return contextlib.nullcontext()
    from ..gptq import gptq_rounding, input_hessians

    hessians = input_hessians(model, ctx.layers, ctx.batches, ctx.device)
    ctx.count("forward_passes", len(ctx.batches))
    return gptq_rounding(hessians)


def _target_layers(model, layers, options, target):
    """The layers ``target`` (a :class:`~mpsearch.targets.Target`) plans, and the ``[L, K]`` mask of
    options each may take (tied layers share the options all of them may take). Refuses a layer left
    with no option."""
    layers = [lay for lay in layers if target.plans_layer(lay, model)]
    if not layers:
        raise MpsearchError(f"target {target.name!r} plans none of the model's quantizable layers")
    legal = np.array([[target.option_reason(lay, o) is None for o in options] for lay in layers],
                     dtype=bool).reshape(len(layers), len(options))
    groups: dict[str, list[int]] = {}
    for i, lay in enumerate(layers):
        if lay.group:
            groups.setdefault(lay.group, []).append(i)
    for members in groups.values():
        legal[members] = legal[members].all(axis=0)
    for i, lay in enumerate(layers):
        if not legal[i].any():
            reasons = "; ".join(
                f"{o.name}: {target.option_reason(lay, o) or 'not shared by its tied layers'}"
                for o in options
            )
            raise MpsearchError(
                f"layer {lay.name!r} ({lay.out_channels}x{lay.in_features}) can take none of the "
                f"options under target {target.name!r} ({reasons}); add a legal option or --exclude it"
            )
    return layers, (None if legal.all() else legal), target


def weight_of(model: torch.nn.Module, layer: Layer) -> torch.Tensor:
    """The weight parameter of a discovered layer."""
    from ..layers import get_module

    return get_module(model, layer.name).weight


def weight_errors(model: torch.nn.Module, ctx: Context, *, relative: bool = False) -> np.ndarray:
    """``[L, K]`` squared rounding errors ``||Q_b(W_l) - W_l||^2`` (``/ ||W_l||^2`` if relative)."""
    from ..quant import quantization_error

    out = np.zeros((len(ctx.layers), len(ctx.options)))
    for i, lay in enumerate(ctx.layers):
        w = weight_of(model, lay)
        norm = float(w.detach().float().pow(2).sum()) if relative else 1.0
        for k, opt in ctx.layer_options(i):
            err = float(quantization_error(w, opt, lay.kind, lay.name).pow(2).sum())
            out[i, k] = err / norm if norm > 0 else 0.0
    return out


def check_choice(name: str, value, choices) -> None:
    """Refuse a setting that is not one of ``choices``, listing them."""
    if value not in choices:
        raise MpsearchError(
            f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"
        )


def check_positive(name: str, value, *, integer: bool = False, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = ">= 0" if allow_zero else "> 0"
        raise MpsearchError(f"{name} must be {kind} {bound}, got {value!r}")


def describe_data(batches) -> dict:
    from ..data import split_batch

    if not batches:
        return {"batches": 0}
    args, kwargs, labels = split_batch(batches[0])
    shapes = [list(a.shape) for a in args if isinstance(a, torch.Tensor)]
    shapes += [f"{k}:{list(v.shape)}" for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return {"batches": len(batches), "first_batch": shapes, "targets": labels is not None}


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def progress_bar(iterable, *, enabled: bool = True, desc: str = "", total=None):
    """A tqdm progress bar on stderr (disabled when not wanted)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False)


class EstimatorWarning(UserWarning):
    """Something an estimator had to decide for the user (negative traces, a fallback path)."""


def probe_seed(seed: int, *indices: int) -> int:
    """A reproducible seed for one unit of random work (a probe, a chunk), independent of order."""
    h = hashlib.sha1(repr((int(seed),) + tuple(int(i) for i in indices)).encode()).hexdigest()
    return int(h[:15], 16)


class only_weights_require_grad:
    """Context manager: ``requires_grad`` on the given weights only, restored on exit.

    Gradients of biases and norms are never needed, and not building them saves time and memory.
    """

    def __init__(self, model: torch.nn.Module, weights):
        self.model, self.weights = model, list(weights)

    def __enter__(self):
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        for w in self.weights:
            w.requires_grad_(True)
        return self

    def __exit__(self, *exc):
        for p, flag in self.saved:
            p.requires_grad_(flag)
        return False


def math_attention():
    """Run scaled-dot-product attention on the math path, which has a double backward."""
    import contextlib

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)
