"""The work and memory of a suffix-pass estimate, said before the long part starts.

After the first reference pass (which fixes the prefix cache's layout and sizes the output),
:func:`count_work` counts what remains: suffix passes, block evaluations and token evaluations, and
estimates the peak memory on the compute device from the model's block sizes, the prefix cache and
the stacked passes (each pass repeats the micro-batch once per stacked option, so its activations
and its stacked output, the logits of a causal LM, grow with ``stack_options``), and a time from one
timed whole forward pass of the stacked batch (the micro-batch repeated once per stacked option, run
once the memory is known to fit): each suffix pass costs its share of the blocks, so the estimate is
that time x the suffix passes counted in whole passes (``whole_passes``). It holds whether the passes
are bound by compute or, with offload, by the copies of the blocks; passes of fewer options than the
stack are counted as full ones (an overestimate). :class:`WorkPlan` prints as one line and refuses (``MpsearchError``) when the
estimated peak exceeds what the device has free, naming the settings that trade memory for time.

The memory is an estimate (not a measurement): weights on the device (all of them, or with offload the
non-block part and ``window`` blocks) + the cache + the quantized weights kept across batches (within
``max_variant_mb``; with offload they are given up first when the plan does not fit) + the prepared reference (float32: logits and their
softmax) + per pass ``stack x (output + the cached block output repeated + 2 x the largest
activation of any module)`` + the distance of one option (3 float32 copies of its output).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from ..errors import MpsearchError
from .offload import tensor_bytes

GB = 2**30


@contextlib.contextmanager
def largest_activation(model: torch.nn.Module, record: dict):
    """While active, ``record["bytes"]`` holds the largest output of any leaf module of a forward."""
    record.setdefault("bytes", 0)

    def hook(mod, args, output):
        record["bytes"] = max(record["bytes"], tensor_bytes(output))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not any(True for _ in m.children())]
    try:
        yield record
    finally:
        for h in handles:
            h.remove()


def device_budget(device: torch.device, given_mb: float | None) -> int | None:
    """Bytes the estimate may use on ``device``: ``given_mb``, else on a GPU what is free plus what this
    process's allocator holds (capped by ``torch.cuda.set_per_process_memory_fraction``); ``None``
    (no check) on the CPU."""
    if given_mb is not None:
        return int(float(given_mb) * 2**20)
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    avail = free + torch.cuda.memory_reserved(device)
    try:
        avail = min(avail, int(total * torch.cuda.get_per_process_memory_fraction(device)))
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        pass
    return int(avail)


@dataclass
class WorkPlan:
    """What the estimate will do from here, and its estimated peak memory and time."""

    device: str
    layers: int
    options: int
    batches: int
    suffix_passes: int
    block_evaluations: int  # blocks run x samples in each pass
    token_evaluations: int
    whole_passes: float  # the suffix passes as a number of whole stacked passes (their blocks of all)
    stack: int
    micro_batch: int
    memory: dict = field(default_factory=dict)  # part -> bytes: weights, cache, reference, passes
    budget: int | None = None
    seconds: float | None = None
    offload: dict | None = None  # window, cache location (with offload)

    @property
    def peak(self) -> int:
        return int(sum(self.memory.values()))

    def line(self) -> str:
        when = f"; ~{_duration(self.seconds)} at the pace of a timed stacked pass" if self.seconds else ""
        off = ""
        if self.offload:
            off = (f"; offload: {self.offload['window']} block(s) on the device at a time, prefix cache on "
                   f"{self.offload['cache']}")
        free = f" of {size_text(self.budget)} available" if self.budget is not None else ""
        return (f"output-distance plan: {self.layers} layers x {self.options} options on {self.batches} "
                f"batch(es): {self.suffix_passes:,} suffix passes ({self.stack} option(s) stacked, "
                f"{self.micro_batch} sample(s) a micro-batch), {self.token_evaluations:,} token evaluations; "
                f"peak on {self.device} ~{size_text(self.peak)}{free} ({_parts(self.memory)}){when}{off}")

    def to_dict(self) -> dict:
        return {"suffix_passes": self.suffix_passes, "block_evaluations": self.block_evaluations,
                "whole_passes": round(self.whole_passes, 3),
                "token_evaluations": self.token_evaluations, "stack": self.stack, "micro_batch": self.micro_batch,
                "peak_gb": round(self.peak / GB, 3), "peak_bytes": self.peak, "memory_bytes": dict(self.memory),
                "budget_bytes": self.budget,
                "seconds": None if self.seconds is None else round(self.seconds, 1), "offload": self.offload}

    def fits(self) -> bool:
        return self.budget is None or self.peak <= self.budget

    def refuse(self, offloaded: bool) -> None:
        """``MpsearchError`` (one line) when the estimated peak exceeds the budget."""
        if self.fits():
            return
        fixes = [] if offloaded else ["--offload (offload=True: decoder blocks streamed from the CPU)"]
        fixes.append(f"a smaller --micro-batch (micro_batch; now {self.micro_batch} samples a pass)")
        fixes.append(f"a smaller --stack-options (stack_options; now {self.stack} options a pass)")
        raise MpsearchError(f"output-distance would need about {size_text(self.peak)} on {self.device} "
                            f"({_parts(self.memory)}) but {size_text(self.budget)} are available: use "
                            f"{', or '.join(fixes)}")


def size_text(n: float) -> str:
    """Bytes as MB below a GB, else GB."""
    return f"{n / 2**20:.1f} MB" if n < GB else f"{n / GB:.2f} GB"


def _parts(memory: dict) -> str:
    return ", ".join(f"{k} {size_text(v)}" for k, v in memory.items())


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def tokens_per_sample(batch) -> int:
    """Tokens in one sample of a batch of token ids (1 for other data)."""
    from ..data import split_batch

    args, kwargs, _ = split_batch(batch)
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.dim() >= 2:
        return int(ids.shape[1])
    return 1


def count_work(runner, ctx, mine, batches, *, stack: int | None, stackable, acts, extra: int = 0) -> dict:
    """Suffix passes, block evaluations (blocks x samples) and token evaluations of the units in
    ``mine`` (``[B, L, K]``), as :meth:`OutputDistanceEstimator.layer_distances` runs them:
    ``stackable[l]``: the layer's options share passes; ``acts[k]``: option k takes a pass of its own;
    ``extra``: options added to every stacked group (the layer at full precision, with a base)."""
    from ..data import batch_size

    n = len(runner.blocks.names) if runner.blocks is not None else 0
    after = []
    for lay in ctx.layers:
        start = runner.start_of(lay.name)
        j = max((k for k in runner.cached if k < start), default=-1) if runner.enabled else -1
        after.append(n - j)  # blocks after the cached one, and the rest of the model as one
    passes = blocks = tokens = 0
    share = 0.0  # sum over passes of the share of a whole pass each runs (its blocks of n + 1)
    for bi in range(len(batches)):
        size, seq = batch_size(batches[bi]), tokens_per_sample(batches[bi])
        for li in range(len(ctx.layers)):
            todo = [k for k in range(mine.shape[2]) if mine[bi, li, k]]
            if not todo:
                continue
            single = [k for k in todo if acts[k]]
            rest = len(todo) - len(single) + extra
            groups = [len(single) * [1]]
            if stackable[li] and rest:
                s = rest if stack is None else max(1, int(stack))
                groups.append([min(s, rest - g) for g in range(0, rest, s)])
            elif rest:
                groups.append(rest * [1])
            for g in (x for grp in groups for x in grp):
                passes += 1
                share += after[li] / (n + 1)
                blocks += after[li] * g * size
                tokens += g * size * seq
    return {"suffix_passes": passes, "block_evaluations": blocks, "token_evaluations": tokens,
            "whole_passes": share}


def memory_parts(*, weights: int, cache: int, out: torch.Tensor, block_out: int, largest: int, stack: int,
                 acc_bytes: int, kl_logits: bool, micro: int, ref_samples: int) -> dict:
    """The estimated peak's parts in bytes (see the module doc); ``out``: the reference output of a
    batch of ``ref_samples`` samples, scaled to ``micro`` samples a pass."""
    scale = micro / max(ref_samples, 1)
    out_bytes = out.numel() * out.element_size() * scale
    out_acc = out.numel() * acc_bytes * scale
    reference = out_acc * (2 if kl_logits else 1)
    per_copy = out_bytes + (block_out + 2 * largest) * scale
    return {"weights": int(weights), "cache": int(cache), "reference": int(reference),
            "passes": int(stack * per_copy + 3 * out_acc)}


def ceil_div(a: int, b: int) -> int:
    return int(math.ceil(a / max(b, 1)))
