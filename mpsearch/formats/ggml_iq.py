"""llama.cpp's i-quants (IQ4_XS, IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M, IQ1_S) in torch.

What ``llama-quantize`` writes for a tensor of one of these types is ``ggml_quantize_chunk(type,
src, dst, 0, nrows, n_per_row, imatrix)``, which runs ``quantize_<type>`` of
ggml/src/ggml-quants.c on every row with the tensor's importance-matrix column weights (or NULL).
This module redoes those searches in vectorised float32 torch, keeping the C code's order of
operations as :mod:`mpsearch.formats.ggml` does for the other GGML types (sequential sums, the
``nearest_int`` bit trick, ``sqrtf`` taken in float64 and rounded, divisions tensor by tensor, fp16
through ``torch.float16``), and checks them byte for byte against llama.cpp's own output
(tests/test_formats_ggml_iq.py, fixtures from experiments/ggml_iq_fixtures.py). The grid types'
kernels are in :mod:`mpsearch.formats._iq_grids`, IQ1's in :mod:`mpsearch.formats._iq1`.

How the searches are vectorised:

- each candidate scale of a block's search is one pass over *all* blocks at once (the C code
  loops over blocks, then candidates); a pass accepts its candidate where the C test
  ``sumqx*sumqx > best*sumq2`` holds, so the running best is the C one;
- a group of 4 or 8 weights whose rounded levels are not a point of the type's grid is moved to
  its best neighbour (the grid points that ``iq2xs_init_impl`` / ``iq3xs_init_impl`` list for that
  off-grid key, nearest first, ties by index): each weight's distance term is computed once per
  level in the C order, gathered for every listed point and summed in order, for all groups of a
  bucket of equal list length at once; the first minimum wins, as C's strict ``<``;
- IQ1's exhaustive split search scores all its candidates at once and loops, in the C order, only
  over those above the first clear gap in score, where the C loop must end;
- the grids are the ones gguf-py ships (``gguf.quants.IQ2_XXS.grid_hex`` ...), read back as level
  indices; the neighbour lists are rebuilt from them as llama.cpp builds its own.

``quantize(matrix, weights=None)`` returns the float32 values llama.cpp's ``dequantize_row_<type>``
computes from those bytes (it dequantizes the bytes :meth:`IqFormat.to_bytes` returns, so the two
agree by construction). ``weights`` is the per-column importance llama-quantize passes
(``[in_features]``; ``[experts, in_features]`` for a stacked ``[experts, out, in]`` tensor).
Types whose C quantizer asserts on a NULL imatrix (iq2_xxs, iq2_xs, iq1_s) refuse to run without
one; llama-quantize refuses iq3_xxs, iq2_s and iq1_m too (except for the token embedding and the
output tensor) but their C code has a no-imatrix path, reproduced here (:attr:`IqFormat.needs_imatrix`
says which refusal applies).
"""

from __future__ import annotations

from ..errors import QuantizationError
from . import Offer, register
from ._iq_common import _importance, _read_f16, _read_u16, _sigma2, _u16_bytes
from .ggml import (IQ4NL_VALUES, QK_K, GgmlFormat, _first_absmax, _fp16, _full, _half_bytes,
                   _iq4nl_lookup, _iq4nl_tables, _nearest_int, _nibbles_32, _recip_or_zero, _u8,
                   iq4nl_block_scales)

#: enum ggml_type values (ggml/include/ggml.h)
GGML_TYPE = {"iq2_xxs": 16, "iq2_xs": 17, "iq3_xxs": 18, "iq1_s": 19, "iq3_s": 21, "iq2_s": 22,
             "iq4_xs": 23, "iq1_m": 29}

#: llama.cpp's replacement when 256 does not divide the row (``tensor_type_fallback``)
FALLBACK = dict.fromkeys(GGML_TYPE, "iq4_nl")

#: types whose C quantizer cannot run without an importance matrix (GGML_ASSERT(quant_weights))
C_NEEDS_IMATRIX = ("iq2_xxs", "iq2_xs", "iq1_s")

#: types llama-quantize refuses to write without an imatrix (``tensor_requires_imatrix`` in
#: src/llama-quant.cpp), except for the token embedding and the output tensor
LLAMA_QUANTIZE_NEEDS_IMATRIX = ("iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq1_m", "iq1_s")

#: bytes per 256 weights of every i-quant mpsearch implements (ggml-common.h's block structs)
_TYPE_SIZE = {"iq4_xs": 136, "iq3_s": 110, "iq3_xxs": 98, "iq2_s": 82, "iq2_xs": 74, "iq2_xxs": 66,
              "iq1_m": 56, "iq1_s": 50}

#: weights quantized per torch pass on the CPU (bounds the temporaries); an accelerator takes
#: _DEVICE_CHUNKS[type] times more (the IQ1 split searches hold ~600-1100 candidates per block)
_CHUNK_WEIGHTS = 1 << 18
_DEVICE_CHUNKS = {"iq1_s": 4, "iq1_m": 4}


# ---------------------------------------------------------------------------------------------
# IQ4_XS: quantize_row_iq4_nl_impl(QK_K, 32, ..., kvalues_iq4nl, qw, ntry=7): iq4_nl's search on
# each 32 (mpsearch.formats.ggml.iq4nl_block_scales), then 6-bit scales under one fp16


def _iq4_xs(x, qw):
    import torch

    nb = x.shape[0]
    sigma2 = _sigma2(x, 2.0 / QK_K)
    w = x * x if qw is None else _importance(x, qw, sigma2)
    scales = iq4nl_block_scales(x.reshape(nb * 8, 32), w.reshape(nb * 8, 32)).reshape(nb, 8)
    max_scale, _ = _first_absmax(scales)
    d = (-max_scale) / _full(max_scale, 32)
    id_ = _recip_or_zero(d)
    ls = torch.clamp(_nearest_int(id_[:, None] * scales), -32, 31)
    dl = d[:, None] * ls.float()
    idl = _recip_or_zero(dl)
    idx_table, _ = _iq4nl_tables(x.device)
    L = _iq4nl_lookup(x.reshape(nb, 8, 32) * idl[:, :, None], idx_table).reshape(nb * 8, 32)
    ls = ls + 32
    scales_h = torch.zeros(nb, dtype=torch.int32, device=x.device)
    for ib in range(8):
        scales_h = scales_h | ((ls[:, ib] >> 4) << (2 * ib))
    scales_l = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)
    return torch.cat([_half_bytes(_fp16(d)), _u16_bytes(scales_h[:, None]), _u8(scales_l),
                      _nibbles_32(L).reshape(nb, 128)], dim=1)


def _iq4_xs_deq(b):
    import torch

    nb = b.shape[0]
    d = _read_f16(b[:, 0:2])
    scales_h = _read_u16(b[:, 2:4])[:, 0]
    scales_l = b[:, 4:8].long()
    ib = torch.arange(8, device=b.device)
    ls = ((scales_l[:, ib // 2] >> (4 * (ib % 2))) & 0xF) | (((scales_h[:, None] >> (2 * ib)) & 3) << 4)
    dl = d[:, None] * (ls - 32).float()
    qs = b[:, 8:].long().reshape(nb, 8, 16)
    q = torch.cat([qs & 0xF, qs >> 4], dim=2)  # y[j] = low nibble of qs[j], y[j+16] = high nibble
    values = torch.tensor(IQ4NL_VALUES, dtype=torch.float32, device=b.device)
    return (dl[:, :, None] * values[q]).reshape(nb, QK_K)


# ---------------------------------------------------------------------------------------------
# the formats


class IqFormat(GgmlFormat):
    """One i-quant: super-blocks of 256 weights in ``type_size`` bytes, rounded by llama.cpp's
    search with optional per-column importance weights."""

    def __init__(self, name: str, bits: int, level_group: int, levels: int, description: str, *,
                 offers=()):
        self.name = name
        self.offers = tuple(offers)
        self.bits = bits
        self.block = QK_K
        self.type_size = _TYPE_SIZE[name]
        self.level_group = level_group
        self.levels = levels
        self.description = description
        self.ggml_type = GGML_TYPE[name]
        self.fallback = FALLBACK[name]
        #: "c": the C quantizer needs weights; "llama-quantize": the tool refuses without an
        #: imatrix (its C code has a no-imatrix path); None: no imatrix needed
        self.needs_imatrix = ("c" if name in C_NEEDS_IMATRIX else
                              "llama-quantize" if name in LLAMA_QUANTIZE_NEEDS_IMATRIX else None)

    def _weights(self, weights, n_cols, experts=None):
        """``weights`` checked and as float32 ``[n_cols]`` (or ``[experts, n_cols]``), or None."""
        import torch

        if weights is None:
            if self.needs_imatrix == "c":
                raise QuantizationError(
                    f"llama.cpp cannot quantize {self.name} without an importance matrix: pass one "
                    f"with --imatrix (or leave {self.name} out of the options)")
            return None
        w = torch.as_tensor(weights).detach().to(torch.float32)
        want = (n_cols,) if experts is None else (experts, n_cols)
        if tuple(w.shape) != want and not (experts is not None and tuple(w.shape) == (n_cols,)):
            raise QuantizationError(
                f"{self.name}: importance weights of shape {tuple(w.shape)} do not fit the matrix: "
                f"expected {want} (one value per input column{', per expert' if experts else ''})")
        if not torch.isfinite(w).all():
            raise QuantizationError(f"{self.name}: the importance weights hold NaN or Inf values")
        return w

    def _chunks(self, matrix, weights):
        """Yield (x blocks [nb, 256], their column weights [nb, 256] or None) in bounded chunks."""
        import torch

        x = self._blocks(matrix)
        nblk = matrix.shape[1] // QK_K
        wb = None if weights is None else weights.to(x.device).reshape(nblk, QK_K)
        chunk = _CHUNK_WEIGHTS if x.device.type == "cpu" else _DEVICE_CHUNKS.get(self.name, 16) * _CHUNK_WEIGHTS
        step = max(1, chunk // QK_K)
        for i in range(0, x.shape[0], step):
            xb = x[i:i + step]
            if wb is None:
                yield xb, None
            else:
                ids = torch.arange(i, i + xb.shape[0], device=x.device) % nblk
                yield xb, wb[ids]

    def _bytes_2d(self, matrix, weights):
        import torch

        kernel = _KERNELS[self.name][0]
        parts = [kernel(xb, wb) for xb, wb in self._chunks(matrix, weights)]
        if not parts:
            return torch.zeros((0, self.type_size), dtype=torch.uint8, device=matrix.device)
        return torch.cat(parts)

    def _each(self, matrix, weights, fn):
        """Apply ``fn(matrix_2d, weights_1d)`` to a 2-D matrix, or to each expert of a 3-D one."""
        import torch

        if not isinstance(matrix, torch.Tensor) or matrix.ndim not in (2, 3):
            raise QuantizationError(f"{self.name}: expected a 2-D [out_channels, in_features] "
                                    "tensor (or a 3-D [experts, out, in] one)")
        if matrix.ndim == 2:
            return fn(matrix, self._weights(weights, matrix.shape[1]))
        w = self._weights(weights, matrix.shape[2], experts=matrix.shape[0])
        outs = [fn(matrix[e], None if w is None else (w if w.ndim == 1 else w[e]))
                for e in range(matrix.shape[0])]
        return torch.stack(outs)

    def quantize(self, matrix, weights=None):
        """llama.cpp's dequantized values of ``matrix`` quantized to this type (bit-exact)."""
        deq = _KERNELS[self.name][1]

        def one(m, w):
            q = self._bytes_2d(m, w)
            return deq(q).reshape(m.shape)

        return self._each(matrix, weights, one)

    def to_bytes(self, matrix, weights=None):
        """The GGML blocks of ``matrix``: uint8 ``[out_channels, row_size]`` (``[experts, out,
        row_size]`` for a 3-D matrix)."""
        def one(m, w):
            return self._bytes_2d(m, w).reshape(m.shape[0], self.row_size(m.shape[1]))

        return self._each(matrix, weights, one)

    def dequantize(self, data):
        """Float32 values of GGML bytes ``data`` (uint8 ``[rows, row_size]``): ggml's
        ``dequantize_row_<type>``."""
        import torch

        data = torch.as_tensor(data)
        rows = data.shape[0]
        blocks = data.reshape(-1, self.type_size)
        return _KERNELS[self.name][1](blocks).reshape(rows, -1)


from ._iq1 import _iq1_m, _iq1_m_deq, _iq1_s, _iq1_s_deq  # noqa: E402
from ._iq_grids import (_iq2_s, _iq2_s_deq, _iq2_xs, _iq2_xs_deq, _iq2_xxs, _iq2_xxs_deq,  # noqa: E402
                        _iq3_s, _iq3_s_deq, _iq3_xxs, _iq3_xxs_deq)

_KERNELS = {
    "iq4_xs": (_iq4_xs, _iq4_xs_deq),
    "iq3_s": (_iq3_s, _iq3_s_deq),
    "iq3_xxs": (_iq3_xxs, _iq3_xxs_deq),
    "iq2_s": (_iq2_s, _iq2_s_deq),
    "iq2_xs": (_iq2_xs, _iq2_xs_deq),
    "iq2_xxs": (_iq2_xxs, _iq2_xxs_deq),
    "iq1_m": (_iq1_m, _iq1_m_deq),
    "iq1_s": (_iq1_s, _iq1_s_deq),
}

#: name -> (nominal bits, weights sharing one scale, distinct values such a group may hold, rank in
#: ``--target llama.cpp``'s options (see :data:`mpsearch.formats.ggml._SPECS`), about); all are in
#: its default search set only when the rounding uses an importance matrix
_SPECS = {
    "iq4_xs": (4, 32, 16, 41, "i-quant: 4-bit non-linear levels, 6-bit scales per 32, fp16 per 256 "
                              "(4.25 bpw)"),
    "iq3_s": (3, 32, 16, 32, "i-quant: 3-bit grid of 4, signs, 4-bit scales per 32, fp16 per 256 "
                             "(3.4375 bpw)"),
    "iq3_xxs": (3, 32, 16, 31, "i-quant: 3-bit grid of 4, 7 sign bits per 8, 4-bit scales per 32, fp16 "
                               "per 256 (3.0625 bpw); llama-quantize needs an imatrix"),
    "iq2_s": (2, 16, 6, 23, "i-quant: 2-bit grid of 8 (3 levels), signs, 4-bit scales per 16, fp16 per "
                            "256 (2.5625 bpw); llama-quantize needs an imatrix"),
    "iq2_xs": (2, 16, 6, 22, "i-quant: 2-bit grid of 8 (3 levels), 7 sign bits per 8, 4-bit scales per "
                             "16, fp16 per 256 (2.3125 bpw); needs an imatrix"),
    "iq2_xxs": (2, 32, 6, 21, "i-quant: 2-bit grid of 8 (3 levels), 7 sign bits per 8, 4-bit scales per "
                              "32, fp16 per 256 (2.0625 bpw); needs an imatrix"),
    "iq1_m": (1, 16, 6, 12, "i-quant: levels -1/0/1 shifted by 1/8 on a grid of 8, 3-bit scales per 16, "
                            "fp16 split over the scales (1.75 bpw); llama-quantize needs an imatrix"),
    "iq1_s": (1, 32, 3, 11, "i-quant: levels -1/0/1 shifted by 1/8 on a grid of 8, 3-bit scales per 32, "
                            "fp16 per 256 (1.5625 bpw); needs an imatrix"),
}

FORMATS: dict[str, IqFormat] = {}
for _name, (_bits, _group, _levels, _rank, _desc) in _SPECS.items():
    FORMATS[_name] = register(IqFormat(_name, _bits, _group, _levels, _desc, offers=(
        Offer("llama.cpp", default=False, imatrix_default=True, rank=_rank),)))


def to_bytes(name: str, matrix, weights=None):
    """The GGML bytes of ``matrix`` quantized to i-quant ``name``."""
    return FORMATS[name].to_bytes(matrix, weights)
