"""Sequential blocks and prefix caching, for the output-distance and LIM estimators.

Many models are a chain of blocks: the children of an ``nn.Sequential``, or a ``ModuleList`` of
transformer layers (``encoder.layer``, ``model.layers``, ``transformer.h``) called one after the other.
When only a layer of block k changes, blocks 0..k-1 compute what they computed at full precision, so
their outputs can be cached: :class:`PrefixRunner` replaces block j's ``forward`` by "return the cached
output of block j" for every j before the changed block, and the model runs only the suffix (the
cheap part before the blocks, embeddings, still runs).

This is correct when a block's input depends only on the previous block's output and on values that
no block changes (masks, position ids). The runner checks it once per model on the first batch: the
suffix run from every cached block must reproduce the full output; if not, it warns and falls back
to full forward passes. The cache is bounded by ``max_cache_mb``: when all block outputs do not fit,
evenly spaced ones are kept and a layer's suffix starts after the nearest cached block before it.
With ``cache_device`` (the CPU, when the cache does not fit the GPU) the outputs are kept there and
copied to ``device`` for the run that uses one; with a ``streamer``
(:class:`~mpsearch.sensitivity.offload.BlockStreamer`) the blocks whose cached output is used are not
loaded.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..data import batch_size
from .base import EstimatorWarning
from .losses import forward
from .offload import move_to, tensor_bytes


@dataclass
class BlockList:
    """A container whose children run in sequence: its name and the children's full names."""

    name: str
    names: list[str]
    modules: list[nn.Module]

    def index_of(self, layer_name: str) -> int | None:
        for k, n in enumerate(self.names):
            if layer_name == n or layer_name.startswith(n + "."):
                return k
        return None


def find_blocks(model: nn.Module, layer_names) -> BlockList | None:
    """The ``nn.Sequential``/``ModuleList`` whose children hold the most quantizable layers.

    Ties go to the outermost container; ``None`` when no container holds layers in two children.
    """
    best, best_key = None, None
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Sequential, nn.ModuleList)) or len(mod) < 2:
            continue
        prefix = f"{name}." if name else ""
        children = [(f"{prefix}{cn}", c) for cn, c in mod.named_children()]
        blocks = BlockList(name, [n for n, _ in children], [c for _, c in children])
        holding = {blocks.index_of(ln) for ln in layer_names} - {None}
        key = (len(holding) >= 2, sum(blocks.index_of(ln) is not None for ln in layer_names), -name.count("."))
        if key[0] and (best_key is None or key > best_key):
            best, best_key = blocks, key
    return best


def _batch_len(batch) -> int:
    return batch_size(batch)


def repeat_along_batch(obj, n: int, size: int):
    """Every tensor of ``obj`` whose first axis has length ``size``, repeated ``n`` times along it
    (copy ``i`` is rows ``i*size .. (i+1)*size-1``); other values as they are."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() and obj.shape[0] == size:
            return obj.repeat(n, *([1] * (obj.dim() - 1)))
        return obj
    if isinstance(obj, dict):
        return type(obj)({k: repeat_along_batch(v, n, size) for k, v in obj.items()}) \
            if type(obj) is dict else _repeat_mapping(obj, n, size)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(repeat_along_batch(v, n, size) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(repeat_along_batch(v, n, size) for v in obj)
    return obj


def _repeat_mapping(obj, n, size):
    out = obj.__class__(**{k: repeat_along_batch(v, n, size) for k, v in obj.items()})
    return out


class PrefixRunner:
    """Runs a model from a block onwards, reusing cached block outputs of the current batch."""

    def __init__(self, model: nn.Module, blocks: BlockList | None, *, max_cache_mb: float = 1024.0,
                 enabled: bool = True, cache_device=None, device=None, streamer=None):
        self.model, self.blocks = model, blocks
        # where cached block outputs are kept (None: where they were computed) and where runs use them
        self.cache_device = None if cache_device is None else torch.device(cache_device)
        self.device = None if device is None else torch.device(device)
        self.streamer = streamer  # a BlockStreamer: blocks whose cached output is used are not loaded
        self.limit = float(max_cache_mb) * 2**20
        self.enabled = enabled and blocks is not None
        self.cached: dict[int, object] = {}
        self.cache_bytes = 0
        self.peak_blocks, self.peak_bytes = 0, 0  # the most the cache held for one batch
        self.verified = False
        self.after_blocks: set[str] = set()  # layers outside the blocks that run after all of them
        self.block_runs = 0  # blocks executed by suffix runs (for the cost report)
        self._repeated: dict = {}  # (block, n) -> cached output repeated n times along the batch
        self._batches: dict = {}  # n -> the current batch repeated n times

    def start_of(self, layer_name: str) -> int:
        """The first block a change in ``layer_name`` can affect (0: the whole model)."""
        if self.blocks is None:
            return 0
        k = self.blocks.index_of(layer_name)
        if k is not None:
            return k
        return len(self.blocks.names) if layer_name in self.after_blocks else 0

    @torch.no_grad()
    def reference(self, batch, layer_names=()):
        """Full-precision forward of ``batch``: caches block outputs; returns (output, raw output)."""
        self.release()
        if self.blocks is None:
            return forward(self.model, batch)
        n = len(self.blocks.modules)
        order, handles, keep = [], [], {}

        def block_hook(k):
            def hook(mod, args, output):
                order.append(("block", k))
                if not self.enabled:
                    return
                size = tensor_bytes(output)
                if "stride" not in keep:
                    cap = int(self.limit // max(size, 1))
                    keep["set"] = set(range(n)) if cap >= n else {round((i + 1) * n / cap) - 1 for i in range(cap)}
                    keep["stride"] = True
                if k in keep["set"] and self.cache_bytes + size <= self.limit:
                    self.cached[k] = output if self.cache_device is None else move_to(output, self.cache_device)
                    self.cache_bytes += size
            return hook

        for k, mod in enumerate(self.blocks.modules):
            handles.append(mod.register_forward_hook(block_hook(k)))
        for name in layer_names:
            if self.blocks.index_of(name) is None:
                mod = self.model.get_submodule(name)
                handles.append(mod.register_forward_hook(lambda m, a, o, name=name: order.append(("layer", name))))
        try:
            out = forward(self.model, batch)
        finally:
            for h in handles:
                h.remove()
        if layer_names:
            last_block = max((i for i, (kind, _) in enumerate(order) if kind == "block"), default=-1)
            self.after_blocks = {v for i, (kind, v) in enumerate(order) if kind == "layer" and i > last_block}
        if self.enabled and not self.verified:
            self._verify(batch, out[0])
        self.peak_blocks = max(self.peak_blocks, len(self.cached))
        self.peak_bytes = max(self.peak_bytes, self.cache_bytes)
        return out

    def _verify(self, batch, ref: torch.Tensor) -> None:
        for j in sorted(self.cached):
            got = self.run(batch, j + 1)[0]
            if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-7):
                warnings.warn(
                    f"output-distance: the children of {self.blocks.name or 'the model'!r} do not run as a chain "
                    f"(a suffix run from block {j + 1} does not reproduce the output); prefix caching is off",
                    EstimatorWarning, stacklevel=4,
                )
                self.enabled, self.cached, self.cache_bytes = False, {}, 0
                self.peak_blocks = self.peak_bytes = 0
                break
        self.verified = True

    def release(self) -> None:
        """Forget the current batch's cached outputs (and their repeated copies)."""
        self.cached, self.cache_bytes = {}, 0
        self._repeated, self._batches = {}, {}

    def repeated_batch(self, batch, n: int):
        """``batch`` repeated ``n`` times along the batch axis (kept for the current batch)."""
        if n == 1:
            return batch
        if n not in self._batches:
            self._batches = {n: repeat_along_batch(batch, n, _batch_len(batch))}
        return self._batches[n]

    @torch.no_grad()
    def run(self, batch, start: int, repeat: int = 1):
        """Forward from block ``start`` on (blocks before it return cached outputs where possible).

        ``repeat=n``: ``batch`` is the current batch repeated ``n`` times along the batch axis
        (:meth:`repeated_batch`), and cached outputs are repeated to match."""
        j = max((k for k in self.cached if k < start), default=None)
        n = len(self.blocks.modules) if self.blocks is not None else 0
        if not self.enabled or j is None:
            self.block_runs += n * repeat
            return forward(self.model, batch)
        cached = self.cached[j]
        if self.cache_device is not None and self.device is not None:
            cached = move_to(cached, self.device, non_blocking=True)
        if repeat > 1:
            key = (j, repeat)
            if key not in self._repeated:  # only the latest one is kept: layers run in block order
                size = _batch_len(batch) // repeat
                self._repeated = {key: repeat_along_batch(cached, repeat, size)}
            cached = self._repeated[key]
        patched = self.blocks.modules[: j + 1]
        # a forward set on the instance (accelerate's device-map hooks) is put back afterwards
        saved = [mod.__dict__.get("forward") for mod in patched]
        for mod in patched:
            mod.forward = lambda *a, _c=cached, **k: _c
        try:
            self.block_runs += (n - j - 1) * repeat
            if self.streamer is None:
                return forward(self.model, batch)
            with self.streamer.skipping(range(j + 1)):
                return forward(self.model, batch)
        finally:
            for mod, prev in zip(patched, saved):
                if prev is None:
                    del mod.forward
                else:
                    mod.forward = prev
