"""Round-to-nearest fake quantization of weights.

Weights are seen as a matrix of ``out_channels`` rows (one per output channel) by ``in_features``
columns (everything that feeds one output: input features, or in_channels/groups x kernel). Each row is
cut into groups of ``group_size`` columns (the whole row for per-channel options, a shorter last group
where the row does not divide evenly), and each group gets its own scale.

- Symmetric, b >= 2: levels ``s * {-(2^(b-1) - 1) ... 2^(b-1) - 1}`` with ``s = max|w| / (2^(b-1) - 1)``.
- Symmetric, b = 1: levels ``{-s, +s}`` with ``s = mean|w|`` (the least-squares binary scale).
- Asymmetric: ``2^b`` levels spanning ``[min(w, 0), max(w, 0)]`` with an integer zero-point, so that
  zero stays exact.

A group of zeros stays zero, a constant group stays representable, and a weight holding NaN or Inf is
refused with an error naming the layer.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from .errors import QuantizationError
from .options import Option

#: how each layer kind lays out its weight: the axis of output channels
_TRANSPOSED_KINDS = {"conv1d_hf"}  # transformers' Conv1D stores weight as [in, out]
#: stacked experts (``[experts, out, in]``, or ``[experts, in, out]`` for ``expert_t``; one expert's
#: 2-D view without the first axis): each expert's matrix is quantized on its own
_EXPERT_KINDS = {"expert": False, "expert_t": True}


def expert_matrices(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A stacked-expert weight as ``[experts, out, in]`` matrices (a view; one expert's 2-D view
    gives one matrix)."""
    w = weight if weight.dim() == 3 else weight.unsqueeze(0)
    return w.transpose(1, 2) if _EXPERT_KINDS[kind] else w


def _from_expert_matrices(mats: torch.Tensor, like: torch.Tensor, kind: str) -> torch.Tensor:
    w = mats.transpose(1, 2) if _EXPERT_KINDS[kind] else mats
    return w.reshape(like.shape).contiguous()


def weight_matrix(weight: torch.Tensor, kind: str = "linear") -> torch.Tensor:
    """View a layer's weight as a 2-D ``[out_channels, in_features]`` matrix."""
    if kind in _TRANSPOSED_KINDS:
        return weight.t()
    return weight.reshape(weight.shape[0], -1)


def from_weight_matrix(matrix: torch.Tensor, like: torch.Tensor, kind: str = "linear") -> torch.Tensor:
    """Inverse of :func:`weight_matrix`."""
    if kind in _TRANSPOSED_KINDS:
        return matrix.t().contiguous()
    return matrix.reshape(like.shape)


def _grouped(matrix: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    """Reshape ``[out, in]`` into ``[out, n_groups, g]``, padding the last group with NaN."""
    out, cols = matrix.shape
    g = cols if group_size is None else min(group_size, cols)
    n = -(-cols // g)
    pad = n * g - cols
    if pad:
        matrix = torch.nn.functional.pad(matrix, (0, pad), value=float("nan"))
    return matrix.reshape(out, n, g), pad


def check_finite(weight: torch.Tensor, name: str | None = None) -> None:
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        where = f"layer {name!r}" if name else "the weight"
        raise QuantizationError(
            f"{where} holds {bad} NaN or Inf values and cannot be quantized; "
            f"check the checkpoint or exclude the layer"
        )


def int_grid(grouped: torch.Tensor, option: Option, fill=None):
    """``(scale, zero, qmin, qmax)`` of each group (last axis) of ``grouped`` for an integer option of
    at least 2 bits (symmetric: ``s = max|w| / qmax``, levels ±qmax·s; asymmetric: ``2^b`` levels over
    ``[min(w, 0), max(w, 0)]`` with an integer zero-point). ``fill(x, value)`` masks padding."""
    fill = fill or (lambda x, _value: x)
    b = option.bits
    if option.symmetric:
        qmax = 2 ** (b - 1) - 1
        scale = fill(grouped.abs(), 0.0).amax(-1, keepdim=True) / qmax
        return scale, torch.zeros_like(scale), -qmax, qmax
    levels = 2**b - 1
    lo = fill(grouped, 0.0).amin(-1, keepdim=True).clamp(max=0)
    hi = fill(grouped, 0.0).amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-lo / safe), 0, levels


def round_to_grid(x: torch.Tensor, scale, zero, qmin, qmax) -> torch.Tensor:
    """Round ``x`` to the integer grid ``(q - zero) · scale``, ``q`` in ``[qmin, qmax]`` (0 where the
    scale is 0: a group of zeros stays zero)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (torch.clamp(torch.round(x / safe) + zero, qmin, qmax) - zero) * safe
    return torch.where(scale > 0, q, torch.zeros_like(q))


def quantize_matrix(matrix: torch.Tensor, option: Option, name: str | None = None) -> torch.Tensor:
    """Fake-quantize a ``[out, in]`` matrix (float32 math, returned in the input dtype)."""
    if option.is_keep:
        return matrix.clone()
    check_finite(matrix, name)
    dtype = matrix.dtype
    if option.fmt is not None:  # a consumer's own format reproduces the consumer's rounding
        fmt = option.format
        reason = fmt.check_shape(*matrix.shape)
        if reason:
            where = f"layer {name!r}" if name else "the weight"
            raise QuantizationError(f"{where} cannot take {fmt.name}: {reason}")
        return fmt.quantize(matrix.detach().float()).to(dtype)
    out, cols = matrix.shape
    grouped, pad = _grouped(matrix.detach().float(), option.group_size)
    valid = ~torch.isnan(grouped) if pad else None  # only padded groups hold NaN (the input is finite)

    def fill(x, value):  # the padding excluded from a reduction
        return x if valid is None else torch.where(valid, x, torch.full_like(x, value))

    if option.symmetric and option.bits == 1:
        count = valid.sum(-1, keepdim=True).clamp(min=1) if pad else grouped.shape[-1]
        scale = fill(grouped.abs(), 0.0).sum(-1, keepdim=True) / count
        q = torch.where(grouped >= 0, scale, -scale)
    else:
        q = round_to_grid(grouped, *int_grid(grouped, option, fill))
    q = q.reshape(out, -1)
    if pad:
        q = q[:, :cols]
    return q.to(dtype)


def quantize_weight(
    weight: torch.Tensor, option: Option, kind: str = "linear", name: str | None = None
) -> torch.Tensor:
    """Fake-quantize a layer's weight tensor of the given kind; returns a new tensor.

    Inside :func:`rounding` (e.g. :func:`mpsearch.gptq.gptq_rounding`), the active rounder may
    quantize the layer instead of round-to-nearest.
    """
    with torch.no_grad():
        if kind in _EXPERT_KINDS:
            return _quantize_experts(weight.detach(), option, kind, name)
        m = weight_matrix(weight.detach(), kind)
        rounder = _ROUNDER.get()
        if rounder is not None and not option.is_keep:
            check_finite(m, name)
            q = rounder(m, option, name)
            if q is not None:
                return from_weight_matrix(q.to(m.dtype), weight, kind)
        return from_weight_matrix(quantize_matrix(m, option, name), weight, kind)


#: experts quantized together hold at most this many weights (float32 temporaries of ~256 MB)
_CHUNK_ELEMENTS = 1 << 26


def _quantize_experts(weight: torch.Tensor, option: Option, kind: str, name: str | None) -> torch.Tensor:
    """Every expert matrix quantized on its own. Formats whose scales stay within a row (every
    integer and GGML type, the block-scaled float formats) quantize all rows of all experts in one
    call, which is the same arithmetic row by row; formats with a per-tensor scale (NVFP4's global
    scale, ModelOpt FP8) take the experts one at a time."""
    if option.is_keep:
        return weight.clone()
    rounder = _ROUNDER.get()
    if rounder is not None and not getattr(rounder, "stacked", False):
        raise QuantizationError(f"layer {name!r} is a stacked expert tensor: GPTQ rounding works on "
                                f"linear layers only; use --quantizer rtn or exclude the experts")
    mats = expert_matrices(weight, kind)
    n, out, cols = mats.shape
    if option.fmt is not None and option.format.check_shape(out, cols):
        quantize_matrix(mats[0], option, name)  # raises: the shape rule holds per expert matrix
    if rounder is not None:  # one that takes the whole [experts, out, in] stack (an imatrix's)
        check_finite(mats, name)
        q = rounder(mats, option, name)
        if q is not None:
            return _from_expert_matrices(q.to(mats.dtype), weight, kind)
    if option.fmt is None or getattr(option.format, "rows_independent", True):
        step = max(1, _CHUNK_ELEMENTS // max(out * cols, 1))  # bounds the float32 temporaries
        q = torch.empty((n, out, cols), dtype=mats.dtype, device=mats.device)
        for e in range(0, n, step):
            q[e:e + step] = quantize_matrix(mats[e:e + step].reshape(-1, cols), option, name).reshape(-1, out, cols)
    else:
        q = torch.stack([quantize_matrix(mats[e], option, f"{name}[{e}]" if name else None)
                         for e in range(n)])
    return _from_expert_matrices(q, weight, kind)


_ROUNDER: contextvars.ContextVar = contextvars.ContextVar("mpsearch_rounder", default=None)


@contextlib.contextmanager
def rounding(rounder):
    """Within this context :func:`quantize_weight` asks ``rounder(matrix, option, name)`` first; it
    returns the quantized ``[out, in]`` matrix, or ``None`` to leave the layer to round-to-nearest.
    A rounder with ``stacked = True`` is also given stacked experts as ``[experts, out, in]``; with
    any other rounder active, stacked experts are refused."""
    token = _ROUNDER.set(rounder)
    try:
        yield
    finally:
        _ROUNDER.reset(token)


def quantization_error(
    weight: torch.Tensor, option: Option, kind: str = "linear", name: str | None = None
) -> torch.Tensor:
    """``Q(W) - W`` in the weight's own layout (float32)."""
    with torch.no_grad():
        return quantize_weight(weight.float(), option, kind, name) - weight.detach().float()


def max_levels_per_group(weight: torch.Tensor, option: Option, kind: str = "linear") -> int:
    """The largest number of distinct values held by one scale group of ``weight``."""
    if kind in _EXPERT_KINDS:  # scale groups lie within rows: all rows of all experts at once
        mats = expert_matrices(weight.detach(), kind)
        m = mats.reshape(-1, mats.shape[-1]).float()
    else:
        m = weight_matrix(weight.detach(), kind).float()
    group = option.format.level_group if option.fmt is not None else option.group_size
    grouped, _ = _grouped(m, group if not option.is_keep else None)
    flat = grouped.reshape(-1, grouped.shape[-1])
    srt, _ = torch.sort(flat, dim=-1)  # NaN padding sorts last
    valid = ~torch.isnan(srt)
    distinct = (srt[:, 1:] != srt[:, :-1]) & valid[:, 1:]
    counts = distinct.sum(-1) + valid[:, 0].long()
    return int(counts.max()) if counts.numel() else 0
