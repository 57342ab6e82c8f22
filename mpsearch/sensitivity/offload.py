"""Streamed decoder blocks: a model larger than the compute device, run one block (or a small window
of blocks) at a time.

:class:`BlockStreamer` leaves the parameters and buffers of a model's blocks (the chain
:func:`mpsearch.sensitivity.blocks.find_blocks` finds: ``model.layers``...) where they are stored
(the *storage* device, the CPU: pinned there when the compute device is a GPU, so the copies are
asynchronous) and moves everything else (embeddings, final norm, head) to the *compute* device. Each
block is copied to the compute device by a forward pre-hook just before it runs, and dropped after it
ran; the copies run on a side CUDA stream, and while block k runs the next ``window - 1`` blocks are
copied (a prefetch overlapped with compute). Between forward passes no block is on the compute device
and no copy is in flight, so the weights an estimator reads or overwrites (and restores) are always
the stored ones, and every forward pass reads them as they are: the results equal the plain path's
exactly.

Like accelerate's CPU-offload hooks (weights moved in before a module runs and out after), per
decoder block and with a prefetch of the next, so every forward pass of the model streams (layer
discovery, routing counts, the imatrix, the reference and suffix passes). llm-compressor's sequential
pipeline and AutoRound instead run each block once over cached inputs; the estimator's suffix passes
run the blocks after the changed layer once per layer, so here a block is copied once per pass that
runs it (the cost is counted; a block-major schedule would copy each block once per micro-batch). The streamer counts what it moves (``bytes_moved``, ``loads``) and the most blocks
ever on the compute device at once (``max_resident``); with the same device for both (a CPU test)
it still copies, so the logic runs and is checked.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in ``obj`` (a tensor, or nested dicts, tuples and lists of them)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each tensor once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class BlockStreamer:
    """Context manager: the blocks of ``blocks`` (a :class:`~mpsearch.sensitivity.blocks.BlockList`
    of ``model``) streamed from their storage to ``compute``, at most ``window`` at a time."""

    def __init__(self, model: nn.Module, blocks, compute, *, window: int = 2, pin: bool = True):
        self.model, self.blocks = model, blocks
        self.compute = torch.device(compute)
        self.window = max(1, int(window))
        self.pin = pin
        self.resident: dict[int, list] = {}  # block -> its tensors' compute copies
        self.max_resident = 0
        self.bytes_moved = 0
        self.loads = 0
        self.skip: set[int] = set()  # blocks whose forward is replaced (the prefix runner's cache)
        self._events: dict[int, object] = {}
        self._stream = None
        self._handles: list = []
        self._moved: list = []  # (tensor holder, original data) of the non-block tensors
        self._slots: list[list] = []  # per block: [(module, name, is_param, stored tensor)]

    # ------------------------------------------------------------------ setup
    def __enter__(self):
        in_blocks = set()
        cuda = self.compute.type == "cuda"
        for k, block in enumerate(self.blocks.modules):
            slots = []
            for mod in block.modules():
                in_blocks.add(id(mod))
                for name, p in list(mod._parameters.items()):
                    if p is not None:
                        slots.append((mod, name, True, self._stored(p.data, cuda)))
                for name, b in list(mod._buffers.items()):
                    if b is not None:
                        slots.append((mod, name, False, self._stored(b, cuda)))
            for mod, name, is_param, stored in slots:
                self._assign(mod, name, is_param, stored)
            self._slots.append(slots)
        for mod in self.model.modules():  # the rest lives on the compute device
            if id(mod) in in_blocks:
                continue
            for name, p in mod._parameters.items():
                if p is not None and p.device != self.compute:
                    self._moved.append((p, p.data))
                    p.data = p.data.to(self.compute)
            for name, b in list(mod._buffers.items()):
                if b is not None and b.device != self.compute:
                    self._moved.append((mod, name, b))
                    mod._buffers[name] = b.to(self.compute)
        if cuda:
            self._stream = torch.cuda.Stream(self.compute)
        for k, block in enumerate(self.blocks.modules):
            self._handles.append(block.register_forward_pre_hook(self._pre_hook(k)))
            self._handles.append(block.register_forward_hook(self._post_hook(k)))
        self._handles.append(self.model.register_forward_pre_hook(lambda *a: self.evict_all()))
        self._handles.append(self.model.register_forward_hook(lambda *a: self._pass_done()))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        self.evict_all()
        for item in self._moved:
            if len(item) == 2:
                item[0].data = item[1]
            else:
                mod, name, b = item
                mod._buffers[name] = b
        self._moved = []
        return False

    def _stored(self, t: torch.Tensor, cuda: bool) -> torch.Tensor:
        if cuda and t.device.type == "cuda":  # a model given on the GPU: its blocks are stored on the CPU
            t = t.to("cpu")
        if cuda and self.pin and not t.is_pinned():
            try:
                return t.pin_memory()
            except RuntimeError:  # no pinned memory to be had (a locked-memory limit): pageable copies
                self.pin = False
        return t

    @staticmethod
    def _assign(mod, name, is_param, tensor):
        if is_param:
            mod._parameters[name].data = tensor
        else:
            mod._buffers[name] = tensor

    # ------------------------------------------------------------------ streaming
    def block_bytes(self, k: int) -> int:
        return sum(s.numel() * s.element_size() for _, _, _, s in self._slots[k])

    def load(self, k: int, prefetch: bool = False) -> None:
        """Copy block ``k`` to the compute device (on a GPU on the side stream; the compute stream waits
        for it before the block runs, :meth:`_use`)."""
        if k in self.resident or k < 0 or k >= len(self._slots):
            return
        copies = []
        if self._stream is not None:
            current = torch.cuda.current_stream(self.compute)
            for _, _, _, stored in self._slots[k]:  # allocated in the compute stream's order
                copies.append(torch.empty_like(stored, device=self.compute))
            self._stream.wait_stream(current)  # the copies' memory is free in the compute stream's order
            with torch.cuda.stream(self._stream):
                for c, (_, _, _, stored) in zip(copies, self._slots[k]):
                    c.copy_(stored, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
            self._events[k] = event  # the compute stream waits for it before the block runs
        else:  # the same kind of device: a copy all the same, so the streaming is real (and checked)
            copies = [stored.to(self.compute, copy=True) for _, _, _, stored in self._slots[k]]
        self.resident[k] = copies
        self.loads += 1
        self.bytes_moved += self.block_bytes(k)
        self.max_resident = max(self.max_resident, len(self.resident))

    def _use(self, k: int) -> None:
        event = self._events.pop(k, None)
        if event is not None:
            torch.cuda.current_stream(self.compute).wait_event(event)
        for (mod, name, is_param, _), c in zip(self._slots[k], self.resident[k]):
            self._assign(mod, name, is_param, c)

    def evict(self, k: int) -> None:
        if self.resident.pop(k, None) is None:
            return
        event = self._events.pop(k, None)
        if event is not None:  # copied but never run: its memory is reused only after the copy is done
            torch.cuda.current_stream(self.compute).wait_event(event)
        for mod, name, is_param, stored in self._slots[k]:
            self._assign(mod, name, is_param, stored)

    def _pass_done(self) -> None:
        """After a forward pass: no block stays on the device, and every copy from the stored weights has
        finished, so the host may overwrite them (an estimator swaps a layer's weight in place)."""
        self.evict_all()
        if self._stream is not None:
            self._stream.synchronize()

    def evict_all(self) -> None:
        for k in list(self.resident):
            self.evict(k)

    def _pre_hook(self, k):
        def hook(mod, args):
            ahead = [j for j in range(k + 1, k + 1 + self.window) if j not in self.skip]
            if k in self.skip:  # its forward returns a cached output: nothing to load
                if k + 1 not in self.skip:  # the last skipped block: prefetch the first ones to run
                    self._prefetch(ahead)
                return None
            self.load(k)
            self._use(k)
            self._prefetch(ahead)
            return None
        return hook

    def _prefetch(self, ks) -> None:
        for j in ks:
            if len(self.resident) >= self.window:
                break
            self.load(j, prefetch=self._stream is not None)

    def _post_hook(self, k):
        def hook(mod, args, output):
            if k not in self.skip:
                self.evict(k)
            return None
        return hook

    def set_window(self, window: int) -> None:
        """A new window from the next forward pass on; ``max_resident`` counts from here (the earlier
        window is reported as ``offload_first_window``)."""
        self.first_window = getattr(self, "first_window", self.window)
        self.window = max(1, int(window))
        self.max_resident = len(self.resident)

    @contextlib.contextmanager
    def skipping(self, ks):
        """Blocks ``ks`` do not run (their forward returns a cached output): they are not loaded."""
        saved = self.skip
        self.skip = set(ks)
        try:
            yield
        finally:
            self.skip = saved

    def report(self) -> dict:
        out = {"offload_window": self.window, "offload_loads": self.loads,
               "offload_bytes": self.bytes_moved, "offload_max_resident": self.max_resident}
        if getattr(self, "first_window", self.window) != self.window:
            out["offload_first_window"] = self.first_window  # before the work plan shrank it
        return out


def move_to(obj, device, non_blocking: bool = False):
    """Every tensor of ``obj`` (nested tuples, lists, dicts, model-output objects) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        if type(obj) is dict:
            return {k: move_to(v, device, non_blocking) for k, v in obj.items()}
        return obj.__class__(**{k: move_to(v, device, non_blocking) for k, v in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(move_to(v, device, non_blocking) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(v, device, non_blocking) for v in obj)
    return obj
