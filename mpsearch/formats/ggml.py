"""llama.cpp's GGML weight types, reproduced bit for bit in torch.

What ``llama-quantize`` writes for a tensor when no importance matrix is given is
``ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, NULL)`` (ggml/src/ggml.c), which runs
``quantize_row_<type>_ref`` of ggml/src/ggml-quants.c for q8_0, q4_0, q4_1, q5_0, q5_1 and the
K-quants q2_K..q6_K, and ``quantize_iq4_nl`` (its 7-step scale search) for iq4_nl. This module
redoes those computations in vectorised float32 torch, keeping the C code's order of operations:
sums accumulate one term at a time from 0 in the C order, ``nearest_int`` is the same
``x + 12582912.f`` bit trick, ``roundf`` rounds half away from zero, float -> int8/uint8 casts
truncate and wrap as x86 does, fp16 scales round through ``torch.float16`` (round to nearest
even, as ggml's conversion does), and the searches of ``make_qx_quants``, ``make_q3_quants`` and
``make_qkx2_quants`` loop over their fixed small grids with all blocks at once. ggml-base is
compiled without FMA contraction (no -march flags), so every product and sum rounds on its own, as
it does in torch's eager CPU kernels. Two torch habits would break exactness and are avoided:
``scalar / tensor`` is computed as ``reciprocal * scalar`` (so every division here is tensor by
tensor), and float32 ``torch.sqrt`` is not always correctly rounded (``sqrtf`` goes through
float64).

:meth:`GgmlFormat.quantize` returns the float32 values llama.cpp's ``dequantize_row_<type>``
computes from those bytes, and :func:`to_bytes` the GGML blocks themselves (what a GGUF file
holds). Both are checked against llama.cpp's own output in tests/test_formats_ggml.py, on fixtures
written by experiments/ggml_fixtures.py.

With an importance matrix (``llama-quantize --imatrix``), llama-quantize passes each tensor's
per-column importance (:mod:`mpsearch.imatrix`: the mean squared input activation of each column)
as ``ggml_quantize_chunk(..., imatrix)``, and every type but q8_0 runs its weighted search instead:
``quantize_row_<type>_impl`` (q2_K..q6_K, q4_0..q5_1) and ``quantize_iq4_nl``'s weighted path.
:meth:`GgmlFormat.quantize` and :meth:`GgmlFormat.to_bytes` take those weights as ``weights``
(``[in_features]``, or ``[experts, in_features]`` for a ``[experts, out, in]`` stack of experts, one
importance vector per expert as llama-quantize slices it) and reproduce those paths bit for bit too:
each weight of a block counts ``qw[j] * sqrtf(sigma2 + x[j]**2)`` in the scale search (q6_K:
``qw[j]`` alone), ``sigma2`` the mean square of the row (q4_0..q5_1), of the super-block (K-quants,
doubled for q3_K..q5_K) or of the block (iq4_nl, doubled); the K-quants' block scales come from
``make_qp_quants`` (q2_K, q4_K, q5_K) or a weighted ``make_qx_quants`` (q3_K) instead of a plain
rescale. ``weights=None`` is the path above, unchanged.

Shapes: a row (``ne[0]`` = ``in_features``) must be a multiple of the type's block (256 for the
K-quants, 32 otherwise); otherwise llama.cpp's ``tensor_type_fallback`` (src/llama-quant.cpp)
replaces the type, see :data:`FALLBACK` and :func:`fallback_type`.
"""

from __future__ import annotations

from . import Format, format_names, get_format, Offer, register
from ..errors import QuantizationError
from ._ggml_arith import _CHUNK_WEIGHTS
from ._ggml_legacy import (_asym_deq, _iq4_nl, _iq4_nl_deq, _q4_0, _q4_0_pack, _q4_1, _q4_1_pack, _q5_0,
                           _q5_0_pack, _q5_1, _q5_1_pack, _q8_0, _q8_0_deq, _q8_0_pack, _sym_deq)
from ._ggml_kquants import (_q2_K, _q2_K_deq, _q2_K_pack, _q3_K, _q3_K_deq, _q3_K_pack, _q4_K, _q4_K_pack,
                            _q5_K, _q5_K_pack, _q6_K, _q6_K_deq, _q6_K_pack, _qkx_K_deq)
from ._ggml_imatrix import (_iq4_nl_im, _q2_K_im, _q32_asym_im, _q32_im, _q3_K_im, _qkx_K_im, _ROW_SIGMA2,
                            _row_sigma2)
# the arithmetic and block kernels live in _ggml_*.py; these names stay importable from here
from ._ggml_arith import _c_f32, _first_absmax, _fp16, _full, _half_bytes, _nearest_int  # noqa: F401
from ._ggml_arith import _recip_or_zero, _seqsum, _seqsum_t, _u8  # noqa: F401
from ._ggml_arith import GROUP_MAX_EPS, IQ4NL_VALUES, QK_K  # noqa: F401
from ._ggml_legacy import _iq4nl_lookup, _iq4nl_tables, _nibbles_32, iq4nl_block_scales  # noqa: F401

#: llama.cpp's replacement type for a K-quant whose 256-block does not divide the row
#: (``tensor_type_fallback`` in src/llama-quant.cpp of the llama.cpp vendored by llama-cpp-python
#: 0.3.36); when the replacement's 32-block does not divide the row either, llama.cpp writes F16.
FALLBACK = {"q2_K": "q4_0", "q3_K": "q4_0", "q4_K": "q5_0", "q5_K": "q5_1", "q6_K": "q8_0"}

#: enum ggml_type values (ggml/include/ggml.h)
GGML_TYPE = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q2_K": 10, "q3_K": 11,
             "q4_K": 12, "q5_K": 13, "q6_K": 14, "iq4_nl": 20}


def fallback_type(name: str, in_features: int) -> str:
    """The type llama.cpp actually writes for ``name`` on rows of ``in_features`` columns.

    ``name`` itself when its block divides the row; else llama.cpp's fallback (the format's
    ``fallback``: :data:`FALLBACK`, and :data:`mpsearch.formats.ggml_iq.FALLBACK` for the i-quants);
    ``"f16"`` when that does not fit either (or ``name`` is already a 32-block type).
    """
    fmt = get_format(name)
    if not isinstance(fmt, GgmlFormat):
        known = [n for n in format_names() if isinstance(get_format(n), GgmlFormat)]
        raise QuantizationError(f"unknown GGML type {name!r}; known: {', '.join(known)}")
    if in_features % fmt.block == 0:
        return fmt.name
    alt = fmt.fallback
    if alt is not None and in_features % get_format(alt).block == 0:
        return alt
    return "f16"


class GgmlFormat(Format):
    """One GGML type: blocks of ``block`` weights stored in ``type_size`` bytes each."""

    consumer = "llama.cpp"

    def __init__(self, name: str, bits: int, block: int, type_size: int, level_group: int,
                 description: str, *, offers=()):
        self.name = name
        self.offers = tuple(offers)
        self.bits = bits
        self.block = block
        self.type_size = type_size
        self.level_group = level_group
        self.description = description
        self.ggml_type = GGML_TYPE[name]
        self.fallback = FALLBACK.get(name)  # llama.cpp's type where the block does not divide the row
        # the legacy types' scale is the block's max over the largest level (q8_0: /127, q4_0: /-8 ...):
        # quantizing again finds the same scale; the K-quants' searched scales do not promise it
        self.idempotent = name in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")

    def row_size(self, in_features: int) -> int:
        """Bytes of one row, as ``ggml_row_size`` (the row must divide the block)."""
        return self.type_size * (in_features // self.block)

    def size_bits(self, out_channels: int, in_features: int) -> int:
        """Exact storage in bits. A row that the block does not divide is counted as padded to the
        next block (llama.cpp itself refuses such a row: see :meth:`check_shape`)."""
        return 8 * self.type_size * -(-int(in_features) // self.block) * int(out_channels)

    def check_shape(self, out_channels: int, in_features: int) -> str | None:
        if in_features % self.block:
            alt = fallback_type(self.name, in_features)
            return (f"llama.cpp's {self.name} needs the row length (in_features = ne[0]) to be a "
                    f"multiple of its block of {self.block}, got {in_features} (llama-quantize would "
                    f"write {alt} instead)")
        return None

    def _blocks(self, matrix):
        import torch

        if not isinstance(matrix, torch.Tensor) or matrix.ndim not in (2, 3):
            raise QuantizationError(f"{self.name}: expected a 2-D [out_channels, in_features] tensor "
                                    f"(or 3-D [experts, out, in])")
        reason = self.check_shape(*matrix.shape[-2:])
        if reason:
            raise QuantizationError(reason)
        return matrix.detach().to(torch.float32).contiguous().reshape(-1, self.block)

    def _importance(self, matrix, weights):
        """``weights`` checked and laid out as llama-quantize passes them: ``[experts, in]``
        float32 on the matrix's device (``None`` for no imatrix, and for q8_0, which ignores it)."""
        import torch

        if weights is None:
            return None
        experts = matrix.shape[0] if matrix.ndim == 3 else 1
        cols = matrix.shape[-1]
        want = (experts, cols) if matrix.ndim == 3 else (cols,)
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != want:
            got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise QuantizationError(
                f"{self.name}: the importance weights must be a tensor of shape {list(want)} (one value "
                f"per input column{', per expert' if matrix.ndim == 3 else ''}), got {got}")
        w = weights.detach().to(device=matrix.device, dtype=torch.float32).reshape(experts, cols)
        if not torch.isfinite(w).all():
            raise QuantizationError(f"{self.name}: the importance weights hold NaN or Inf "
                                    f"(llama-quantize refuses such an imatrix)")
        return None if self.name == "q8_0" else w

    def _fields(self, matrix, weights=None):
        """Yield the quantized fields of consecutive chunks of blocks (bounded memory)."""
        import torch

        x = self._blocks(matrix)
        w = self._importance(matrix, weights)
        chunk = _CHUNK_WEIGHTS if x.device.type == "cpu" else 16 * _CHUNK_WEIGHTS
        step = max(1, chunk // self.block)
        if w is None:
            for i in range(0, x.shape[0], step):
                yield _KERNELS[self.name][0](x[i:i + step])
            return
        cols = matrix.shape[-1]
        per_row = cols // self.block
        rows_per_expert = matrix.shape[-2]
        qw = w.reshape(-1, self.block)  # [experts * per_row, block]
        sigma2 = _row_sigma2(x.reshape(-1, cols), _CHUNK_WEIGHTS) if self.name in _ROW_SIGMA2 else None
        kernel = _IMATRIX_KERNELS[self.name]
        for i in range(0, x.shape[0], step):
            idx = torch.arange(i, min(i + step, x.shape[0]), device=x.device)
            row = idx // per_row
            wi = (row // rows_per_expert) * per_row + idx % per_row
            extra = sigma2.index_select(0, row) if sigma2 is not None else None
            yield kernel(x[i:i + step], qw.index_select(0, wi), extra)

    def quantize(self, matrix, weights=None):
        """llama.cpp's dequantized values of ``matrix`` quantized to this type (bit-exact), with
        the importance ``weights`` of an imatrix when given (see the module doc)."""
        import torch

        deq = _KERNELS[self.name][1]
        parts = [deq(f) for f in self._fields(matrix, weights)]
        out = torch.cat(parts) if parts else matrix.new_zeros((0, self.block), dtype=torch.float32)
        return out.reshape(matrix.shape)

    def to_bytes(self, matrix, weights=None):
        """The GGML blocks of ``matrix``: a uint8 tensor ``[out_channels, row_size]`` (``[experts,
        out, row_size]`` for a 3-D stack), with the importance ``weights`` of an imatrix when given."""
        import torch

        pack = _KERNELS[self.name][2]
        parts = [pack(f) for f in self._fields(matrix, weights)]
        shape = (*matrix.shape[:-1], self.row_size(matrix.shape[-1]))
        if not parts:
            return torch.zeros(shape, dtype=torch.uint8, device=matrix.device)
        return torch.cat(parts).reshape(shape)


def to_bytes(name: str, matrix, weights=None):
    """The GGML bytes of ``matrix`` quantized to type ``name`` (``[out, row_size]`` uint8), with
    an imatrix's importance ``weights`` when given."""
    return FORMATS[name].to_bytes(matrix, weights)



#: name -> fn(blocks, their imatrix weights, the rows' sigma2 (q4_0..q5_1) or None) -> fields
_IMATRIX_KERNELS = {
    "q4_0": lambda x, qw, s2: _q32_im(x, qw, s2, 8),
    "q5_0": lambda x, qw, s2: _q32_im(x, qw, s2, 16),
    "q4_1": lambda x, qw, s2: _q32_asym_im(x, qw, s2, 15),
    "q5_1": lambda x, qw, s2: _q32_asym_im(x, qw, s2, 31),
    "iq4_nl": _iq4_nl_im,
    "q2_K": _q2_K_im,
    "q3_K": _q3_K_im,
    "q4_K": lambda x, qw, _s2: _qkx_K_im(x, qw, 15),
    "q5_K": lambda x, qw, _s2: _qkx_K_im(x, qw, 31),
    "q6_K": lambda x, qw, _s2: _q6_K(x, qw),
}


_KERNELS = {
    "q8_0": (_q8_0, _q8_0_deq, _q8_0_pack),
    "q4_0": (_q4_0, lambda f: _sym_deq(f, 8), _q4_0_pack),
    "q4_1": (_q4_1, _asym_deq, _q4_1_pack),
    "q5_0": (_q5_0, lambda f: _sym_deq(f, 16), _q5_0_pack),
    "q5_1": (_q5_1, _asym_deq, _q5_1_pack),
    "iq4_nl": (_iq4_nl, _iq4_nl_deq, _q4_0_pack),
    "q2_K": (_q2_K, _q2_K_deq, _q2_K_pack),
    "q3_K": (_q3_K, _q3_K_deq, _q3_K_pack),
    "q4_K": (_q4_K, _qkx_K_deq, _q4_K_pack),
    "q5_K": (_q5_K, _qkx_K_deq, _q5_K_pack),
    "q6_K": (_q6_K, _q6_K_deq, _q6_K_pack),
}

#: name -> (nominal bits, block, bytes per block, weights sharing one level set, rank in
#: ``--target llama.cpp``'s options (10 x bits + place among the types of those bits), description);
#: all are in its default search set, with or without an importance matrix
_SPECS = {
    "q8_0": (8, 32, 34, 32, 81, "8-bit, one fp16 scale per 32 weights (8.5 bits per weight)"),
    "q4_0": (4, 32, 18, 32, 42, "4-bit symmetric, one fp16 scale per 32 weights (4.5 bpw)"),
    "q4_1": (4, 32, 20, 32, 43, "4-bit, fp16 scale and min per 32 weights (5.0 bpw)"),
    "q5_0": (5, 32, 22, 32, 51, "5-bit symmetric, one fp16 scale per 32 weights (5.5 bpw)"),
    "q5_1": (5, 32, 24, 32, 52, "5-bit, fp16 scale and min per 32 weights (6.0 bpw)"),
    "iq4_nl": (4, 32, 18, 32, 45, "4-bit non-linear levels, one fp16 scale per 32 weights (4.5 bpw)"),
    "q2_K": (2, 256, 84, 16, 24, "K-quant: 2-bit, 4-bit scales and mins per 16, fp16 per 256 (2.625 bpw)"),
    "q3_K": (3, 256, 110, 16, 33, "K-quant: 3-bit, 6-bit scales per 16, fp16 per 256 (3.4375 bpw)"),
    "q4_K": (4, 256, 144, 32, 44, "K-quant: 4-bit, 6-bit scales and mins per 32, fp16 per 256 (4.5 bpw)"),
    "q5_K": (5, 256, 176, 32, 53, "K-quant: 5-bit, 6-bit scales and mins per 32, fp16 per 256 (5.5 bpw)"),
    "q6_K": (6, 256, 210, 16, 61, "K-quant: 6-bit, 8-bit scales per 16, fp16 per 256 (6.5625 bpw)"),
}

FORMATS: dict[str, GgmlFormat] = {}
for _name, (_bits, _block, _size, _group, _rank, _desc) in _SPECS.items():
    FORMATS[_name] = register(GgmlFormat(_name, _bits, _block, _size, _group, _desc,
                                         offers=(Offer("llama.cpp", default=True, rank=_rank),)))
