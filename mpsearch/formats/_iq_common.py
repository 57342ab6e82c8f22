"""Shared pieces of the i-quant kernels (:mod:`mpsearch.formats.ggml_iq`): C float semantics
and little-endian byte packing."""

from __future__ import annotations

from .ggml import _seqsum, _u8


def _sqrtf(v):
    """C ``sqrtf`` (correctly rounded): torch's float32 sqrt is not always; float64 then round is."""
    return v.double().sqrt().float()


def _sigma2(x, factor):
    """``sumx2 = 0; for i: sumx2 += x[i]*x[i];`` over each 256-block, times ``factor`` (exact: a
    power of two)."""
    return _seqsum(x * x) * factor


def _importance(x, qw, sigma2):
    """``weight[i] = qw[i] * sqrtf(sigma2 + x[i]*x[i])`` for the blocks ``x`` ([nb, n])."""
    return qw * _sqrtf(sigma2[:, None] + x * x)


def _u16_bytes(v):
    """Little-endian bytes of integer tensor ``v`` ``[n, m]`` as uint16 -> uint8 ``[n, 2m]``."""
    import torch

    return _u8(torch.stack([v & 0xFF, (v >> 8) & 0xFF], dim=-1).reshape(v.shape[0], -1))


def _u32_bytes(v):
    import torch

    return _u8(torch.stack([(v >> s) & 0xFF for s in (0, 8, 16, 24)], dim=-1).reshape(v.shape[0], -1))


def _read_u16(b):
    """uint8 ``[n, 2m]`` little-endian -> int64 ``[n, m]``."""
    b = b.long()
    return b[:, 0::2] | (b[:, 1::2] << 8)


def _read_u32(b):
    b = b.long()
    return b[:, 0::4] | (b[:, 1::4] << 8) | (b[:, 2::4] << 16) | (b[:, 3::4] << 24)


def _read_f16(b):
    """The fp16 at bytes ``b`` ``[n, 2]`` as float32 ``[n]``."""
    import torch

    return b.contiguous().view(torch.float16).float().reshape(-1)
