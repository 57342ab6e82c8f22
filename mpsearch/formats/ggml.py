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

from . import Format, format_names, get_format, register
from ..errors import QuantizationError

QK_K = 256

#: llama.cpp's replacement type for a K-quant whose 256-block does not divide the row
#: (``tensor_type_fallback`` in src/llama-quant.cpp of the llama.cpp vendored by llama-cpp-python
#: 0.3.36); when the replacement's 32-block does not divide the row either, llama.cpp writes F16.
FALLBACK = {"q2_K": "q4_0", "q3_K": "q4_0", "q4_K": "q5_0", "q5_K": "q5_1", "q6_K": "q8_0"}

#: enum ggml_type values (ggml/include/ggml.h)
GGML_TYPE = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q2_K": 10, "q3_K": 11,
             "q4_K": 12, "q5_K": 13, "q6_K": 14, "iq4_nl": 20}

#: iq4_nl's non-linear levels (kvalues_iq4nl in ggml/src/ggml-common.h)
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

GROUP_MAX_EPS = 1e-15

#: blocks quantized per torch pass (bounds the temporaries: ~2**20 weights per pass)
_CHUNK_WEIGHTS = 1 << 20


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
                 description: str):
        self.name = name
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
        sigma2 = _row_sigma2(x.reshape(-1, cols)) if self.name in _ROW_SIGMA2 else None
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


# ---------------------------------------------------------------------------------------------
# helpers: C semantics in torch (float32 everywhere)


def _f32(v) -> float:
    """A Python float holding the float32 value of ``v`` (for scalar constants computed as in C)."""
    import numpy as np

    return float(np.float32(v))


def _c_f32(v):
    """A numpy float32, for scalar constants the C code computes in float (``nmax + 0.1f*is``)."""
    import numpy as np

    return np.float32(v)


def _full(like, v):
    """The float32 constant ``v`` as a tensor shaped like ``like``. Divisions are always tensor by
    tensor: torch computes ``scalar / tensor`` as ``tensor.reciprocal() * scalar`` (two roundings)."""
    import torch

    return torch.full_like(like, _f32(v))


def _nearest_int(f):
    """ggml's ``nearest_int``: ``(bits(f + 12582912.f) & 0x7fffff) - 0x400000`` (int32)."""
    import torch

    return ((f + 12582912.0).view(torch.int32) & 0x7FFFFF) - 0x400000


def _round_small(f):
    """``nearest_int`` as a float for ``|f| < 2**22``: ``(f + 1.5 * 2**23) - 1.5 * 2**23`` rounds to
    the nearest integer, ties to even, in two float32 additions (faster than torch.round)."""
    return (f + 12582912.0) - 12582912.0


def _roundf(f):
    """C ``roundf``: half away from zero."""
    import torch

    t = torch.trunc(f)
    return t + torch.where((f - t).abs() >= 0.5, torch.sign(f), torch.zeros_like(f))


def _seqsum(terms):
    """``float s = 0; for (i...) s += terms[i];`` over the last axis, in that order."""
    import torch

    acc = torch.zeros(terms.shape[0], dtype=torch.float32, device=terms.device)
    for col in terms.t().contiguous():
        acc = acc + col
    return acc


def _seqsum_t(terms_t):
    """:func:`_seqsum` of terms already laid out ``[n, blocks]`` (one row per term index)."""
    import torch

    acc = torch.zeros(terms_t.shape[1], dtype=torch.float32, device=terms_t.device)
    for row in terms_t:
        acc = acc + row
    return acc


def _first_absmax(x):
    """``amax = 0; max = 0; for i: if (|x_i| > amax) {amax = |x_i|; max = x_i;}`` per row."""
    import torch

    ax = x.abs()
    amax = ax.amax(dim=-1)
    idx = (ax == amax.unsqueeze(-1)).to(torch.uint8).argmax(dim=-1)  # the first index of the max
    mx = x.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros_like(mx)
    return torch.where(amax > 0, mx, zero), torch.where(amax > 0, amax, zero)


def _first_equal(x, v):
    """The element of each row of ``x`` that first equals ``v`` (keeps the sign of a zero)."""
    import torch

    idx = (x == v.unsqueeze(-1)).to(torch.uint8).argmax(dim=-1)
    return x.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


def _fp16(v):
    """``GGML_FP32_TO_FP16`` (round to nearest even) as a float16 tensor."""
    import torch

    return v.to(torch.float16)


def _sqrtf(v):
    """C ``sqrtf``: torch's float32 sqrt is not always correctly rounded (off by one ulp on some
    values); the float64 root rounded to float32 is (53 >= 2 * 24 + 2 bits)."""
    import torch

    return torch.sqrt(v.double()).float()


def _recip_or_zero(d):
    """``d ? 1.0f/d : 0.0f``."""
    import torch

    return torch.where(d != 0, torch.ones_like(d) / d, torch.zeros_like(d))


def _wrap_u8(i):
    return i & 0xFF


def _wrap_i8(i):
    return ((i + 128) & 0xFF) - 128


def _half_bytes(h):
    """Little-endian bytes of a float16 tensor ``[n]`` -> uint8 ``[n, 2]``."""
    import torch

    return h.contiguous().view(torch.uint8).reshape(-1, 2)


def _u8(t):
    import torch

    return t.to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# 32-weight blocks: q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl


def _q8_0(x):
    import torch

    amax = x.abs().amax(dim=1)
    d = amax / _full(amax, 127)
    id_ = _recip_or_zero(d)
    q = _roundf(x * id_[:, None]).to(torch.int32)
    return {"d": _fp16(d), "q": _wrap_i8(q)}


def _q8_0_deq(f):
    return f["q"].float() * f["d"].float()[:, None]


def _q8_0_pack(f):
    import torch

    return torch.cat([_half_bytes(f["d"]), f["q"].to(torch.int8).view(torch.uint8)], dim=1)


def _sym_32(x, nlev):
    """q4_0 (nlev 16) and q5_0 (nlev 32): d = max / -(nlev/2), q = min(nlev-1, (int8)(x/d + nlev/2 + 0.5))."""
    import torch

    half = nlev // 2
    mx, _ = _first_absmax(x)
    d = mx / _full(mx, -half)
    id_ = _recip_or_zero(d)
    q = torch.trunc(x * id_[:, None] + (half + 0.5)).to(torch.int32)
    q = torch.clamp(_wrap_i8(q), max=nlev - 1)
    return {"d": _fp16(d), "q": q}


def _asym_32(x, nlev, clamp):
    """q4_1 (16 levels, MIN 15) and q5_1 (32 levels, no MIN): d = (max - min)/(nlev-1)."""
    import torch

    mn = _first_equal(x, x.amin(dim=1))
    mx = _first_equal(x, x.amax(dim=1))
    d = (mx - mn) / _full(mx, nlev - 1)
    id_ = _recip_or_zero(d)
    v = (x - mn[:, None]) * id_[:, None] + 0.5
    q = torch.trunc(v).to(torch.int32)
    q = _wrap_i8(q) if clamp else _wrap_u8(q)
    if clamp:
        q = torch.clamp(q, max=nlev - 1)
    return {"d": _fp16(d), "m": _fp16(mn), "q": q}


def _q4_0(x):
    return _sym_32(x, 16)


def _q5_0(x):
    return _sym_32(x, 32)


def _q4_1(x):
    return _asym_32(x, 16, True)


def _q5_1(x):
    return _asym_32(x, 32, False)


def _sym_deq(f, half):
    return (f["q"] - half).float() * f["d"].float()[:, None]


def _asym_deq(f):
    return f["q"].float() * f["d"].float()[:, None] + f["m"].float()[:, None]


def _nibbles_32(q):
    """``qs[j] = (q[j] & 0xF) | (q[j + 16] & 0xF) << 4`` for a 32-weight block."""
    return _u8((q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4))


def _qh_32(q):
    """The fifth bits of a 32-weight block as the little-endian uint32 ``qh``."""
    import torch

    bits = (q >> 4) & 1
    word = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
    for j in range(32):
        word = word | (bits[:, j].to(torch.int64) << j)
    return _u8(torch.stack([(word >> (8 * k)) & 0xFF for k in range(4)], dim=1))


def _q4_0_pack(f):
    import torch

    return torch.cat([_half_bytes(f["d"]), _nibbles_32(f["q"])], dim=1)


def _q4_1_pack(f):
    import torch

    return torch.cat([_half_bytes(f["d"]), _half_bytes(f["m"]), _nibbles_32(f["q"])], dim=1)


def _q5_0_pack(f):
    import torch

    return torch.cat([_half_bytes(f["d"]), _qh_32(f["q"]), _nibbles_32(f["q"])], dim=1)


def _q5_1_pack(f):
    import torch

    return torch.cat([_half_bytes(f["d"]), _half_bytes(f["m"]), _qh_32(f["q"]), _nibbles_32(f["q"])],
                     dim=1)


_IQ4NL_LO = IQ4NL_VALUES[0] + IQ4NL_VALUES[1] - 1  # 2 * (first midpoint) - 1
_IQ4NL_HI = IQ4NL_VALUES[-2] + IQ4NL_VALUES[-1]  # 2 * (last midpoint)


def _iq4nl_tables(device):
    """Index and level of ``best_index_int8(16, kvalues_iq4nl, al)`` for each ``floor(2 * al)``.

    The C code picks level k+1 over k unless ``al - v[k] < v[k+1] - al``. Both differences are
    exact wherever they are close (integer levels; each midpoint lies in the binade of half the
    gap or above), so the pick is "al >= (v[k] + v[k+1]) / 2", a tie going up. The midpoints are
    half-integers: the answer depends on ``floor(2 * al)`` only."""
    import torch

    values = torch.tensor(IQ4NL_VALUES, dtype=torch.float32, device=device)
    twice = torch.arange(_IQ4NL_LO, _IQ4NL_HI + 1, dtype=torch.float32, device=device)
    idx = ((values[:-1] + values[1:])[None, :] <= twice[:, None]).sum(dim=1)
    return idx.to(torch.int32), values[idx]


def _iq4nl_lookup(al, table):
    """``table[floor(2 * al)]`` (clamped to the table), without a float -> int conversion pass."""
    import torch

    t = torch.clamp(torch.floor(al * 2.0), _IQ4NL_LO, _IQ4NL_HI) + float(12582912 - _IQ4NL_LO)
    pos = (t.view(torch.int32) - 0x4B400000).clamp_(0, table.shape[0] - 1)  # NaN (empty blocks)
    return torch.index_select(table, 0, pos.reshape(-1)).reshape(al.shape)


def iq4nl_block_scales(x, w):
    """The scale search of ``quantize_row_iq4_nl_impl`` (ntry = 7) for 32-weight blocks ``x``
    ``[nb, 32]`` with search weights ``w``: returns each block's scale (0 for an empty block)."""
    import torch

    _, levels = _iq4nl_tables(x.device)
    mx, amax = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    xt = x.t().contiguous()
    wt = w.t().contiguous()

    def sums(id_):
        q = _iq4nl_lookup(xt * id_, levels)
        wq = wt * q
        return _seqsum_t(wq * xt), _seqsum_t(wq * q)

    d = (-mx) / _full(mx, IQ4NL_VALUES[0])
    sumqx, sumq2 = sums(torch.ones_like(d) / d)
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumqx))
    best = d * sumqx
    for itry in range(-7, 8):
        sumqx, sumq2 = sums(_full(mx, itry + IQ4NL_VALUES[0]) / mx)
        upd = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(upd, sumqx / sumq2, d)
        best = torch.where(upd, d * sumqx, best)
    return torch.where(zero, torch.zeros_like(d), d)


def _iq4_nl(x, weight=None):
    """``quantize_iq4_nl``: ``quantize_row_iq4_nl_impl(32, 32, ..., ntry=7)``; ``weight``: each
    value's weight in the search (no imatrix: ``x * x``)."""
    idx_table, _ = _iq4nl_tables(x.device)
    d = iq4nl_block_scales(x, x * x if weight is None else weight)
    idx = _iq4nl_lookup(x * _recip_or_zero(d)[:, None], idx_table)
    return {"d": _fp16(d), "q": idx}


def _iq4_nl_deq(f):
    import torch

    values = torch.tensor(IQ4NL_VALUES, dtype=torch.float32, device=f["d"].device)
    return f["d"].float()[:, None] * values[f["q"].long()]


# ---------------------------------------------------------------------------------------------
# the searches of ggml-quants.c, vectorised over blocks ([nb, n] rows)


def _make_qx_quants(x, nmax, qw=None):
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: returns (scale, L in 0..2*nmax-1); the
    weight of each value is ``qw`` where given, else ``x * x``."""
    import torch

    mx, amax = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    xt = x.t().contiguous()
    w = xt * xt if qw is None else qw.t().contiguous()
    wx = w * xt

    def pass_(iscale):  # |iscale * x| <= nmax + 1 here: nearest_int is round-half-even
        l = torch.clamp(_round_small(iscale * xt), -nmax, nmax - 1)
        return l, _seqsum_t(wx * l), _seqsum_t((w * l) * l)

    l, sumlx, suml2 = pass_(_full(mx, -nmax) / mx)
    L = l + nmax
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        s = _f32(_c_f32(nmax) + _c_f32(0.1) * _c_f32(is_))
        l, sumlx, suml2 = pass_(_full(mx, -s) / mx)
        upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(upd, l + nmax, L)
        scale = torch.where(upd, sumlx / suml2, scale)
        best = torch.where(upd, scale * sumlx, best)
    L = torch.where(zero, torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L.t().to(torch.int32)


def _make_q3_quants(x, nmax):
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: returns (scale, L in 0..2*nmax-1)."""
    import torch

    mx, amax = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    iscale = _full(mx, -nmax) / mx
    L = torch.clamp(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1).float()
    w = x * x
    wx = w * x
    sumlx = _seqsum(wx * L)
    suml2 = _seqsum((w * L) * L)
    n = x.shape[1]
    cols = [L[:, i].clone() for i in range(n)]
    xs = [x[:, i].contiguous() for i in range(n)]
    ws = [w[:, i].contiguous() for i in range(n)]
    wxs = [wx[:, i].contiguous() for i in range(n)]
    for _ in range(5):  # a pass that changes nothing leaves the state as it is: no early exit needed
        for i in range(n):
            li = cols[i]
            slx = sumlx - wxs[i] * li
            sl2 = suml2 - (ws[i] * li) * li
            new_l = torch.clamp(_nearest_int((xs[i] * sl2) / slx), -nmax, nmax - 1).float()
            slx2 = slx + wxs[i] * new_l
            sl22 = sl2 + (ws[i] * new_l) * new_l
            upd = ((slx > 0) & (new_l != li) & (sl22 > 0)
                   & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22))
            cols[i] = torch.where(upd, new_l, li)
            sumlx = torch.where(upd, slx2, sumlx)
            suml2 = torch.where(upd, sl22, suml2)
    L = torch.stack(cols, dim=1) + nmax
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    L = torch.where(zero[:, None], torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L.to(torch.int32)


def _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """``make_qkx2_quants``: returns (scale, L in 0..nmax, the_min = -min)."""
    import torch

    xt = x.t().contiguous()
    wt = w.t().contiguous()
    sum_w = wt[0].clone()
    sum_x = sum_w * xt[0]
    for i in range(1, xt.shape[0]):
        sum_w = sum_w + wt[i]
        sum_x = sum_x + wt[i] * xt[i]
    mn = x.amin(dim=1)
    mx = x.amax(dim=1)
    zero = torch.zeros_like(mn)
    mn = torch.where(mn > 0, zero, mn)
    flat = mx == mn

    def levels(iscale, mn_):  # 0 <= iscale * (x - min) <= nmax + 1: nearest_int is round-half-even
        return torch.clamp(_round_small(iscale * (xt - mn_)), 0, nmax)

    def err(scale, L, mn_):
        diff = (scale * L + mn_) - xt
        diff = diff.abs() if use_mad else diff * diff
        return _seqsum_t(wt * diff)

    iscale = _full(mx, nmax) / (mx - mn)
    scale = torch.ones_like(iscale) / iscale
    L = levels(iscale, mn)
    best_error = err(scale, L, mn)
    for is_ in range(nstep + 1):
        num = _f32(_c_f32(rmin) + _c_f32(rdelta) * _c_f32(is_) + _c_f32(nmax))
        Laux = levels(_full(mx, num) / (mx - mn), mn)
        wl = wt * Laux
        sum_l = _seqsum_t(wl)
        sum_l2 = _seqsum_t(wl * Laux)
        sum_xl = _seqsum_t(wl * xt)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, zero, this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        cur = err(this_scale, Laux, this_min)
        better = (D > 0) & (cur < best_error) & ~flat
        L = torch.where(better, Laux, L)
        best_error = torch.where(better, cur, best_error)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, zero, scale)
    L = torch.where(flat, torch.zeros_like(L), L)
    return scale, L.t().to(torch.int32), -mn


def _requantize(x, L, dj, dm, sub: int, lo: int, hi: int, shift: int = 0):
    """The K-quants' last pass: ``if (d) L = clamp(nearest_int((x + m) / d), lo, hi) + shift`` per
    sub-block of ``sub`` values (``dm`` None: no min); sub-blocks whose scale is 0 keep ``L``."""
    import torch

    rep = lambda t: t.repeat_interleave(sub, dim=1)  # noqa: E731
    v = x if dm is None else x + rep(dm)
    new = torch.clamp(_nearest_int(v / rep(dj)), lo, hi) + shift
    return torch.where(rep(dj) != 0, new, L)


def _positive_max(v):
    """``m = 0; for j: if (v_j > m) m = v_j;`` per row (+0 when no value is positive)."""
    import torch

    m = v.amax(dim=1)
    return torch.where(m > 0, m, torch.zeros_like(m))


# ---------------------------------------------------------------------------------------------
# K-quants: super-blocks of 256


def _q2_K(x):
    import torch

    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales, L, mins = _make_qkx2_quants(sub, sub.abs(), 3, -0.5, 0.1, 15, True)
    scales, mins, L = scales.reshape(nb, 16), mins.reshape(nb, 16), L.reshape(nb, 256)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    has_s = max_scale > 0
    has_m = max_min > 0
    ls = _wrap_u8(_nearest_int((_full(max_scale, 15) / max_scale)[:, None] * scales))
    sc = torch.where(has_s[:, None], ls, torch.zeros_like(ls))
    d = _fp16(torch.where(has_s, max_scale / _full(max_scale, 15), torch.zeros_like(max_scale)))
    lm = _nearest_int((_full(max_min, 15) / max_min)[:, None] * mins)
    sc = torch.where(has_m[:, None], _wrap_u8(sc | (lm << 4)), sc)
    dmin = _fp16(torch.where(has_m, max_min / _full(max_min, 15), torch.zeros_like(max_min)))
    L = _requantize(x, L, d.float()[:, None] * (sc & 0xF).float(), dmin.float()[:, None] * (sc >> 4).float(),
                    16, 0, 3)
    return {"d": d, "dmin": dmin, "scales": sc, "L": L}


def _q2_K_deq(f):
    rep = lambda t: t.repeat_interleave(16, dim=1)  # noqa: E731
    dl = f["d"].float()[:, None] * (f["scales"] & 0xF).float()
    ml = f["dmin"].float()[:, None] * (f["scales"] >> 4).float()
    return rep(dl) * f["L"].float() - rep(ml)


def _pack_2bit(L):
    """``qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6`` (j = 0, 128)."""
    import torch

    parts = []
    for j in (0, 128):
        b = L[:, j:j + 128].reshape(-1, 4, 32)
        parts.append(b[:, 0] | (b[:, 1] << 2) | (b[:, 2] << 4) | (b[:, 3] << 6))
    return _u8(torch.cat(parts, dim=1))


def _q2_K_pack(f):
    import torch

    return torch.cat([_u8(f["scales"]), _pack_2bit(f["L"]), _half_bytes(f["d"]), _half_bytes(f["dmin"])],
                     dim=1)


def _q3_K(x):
    import torch

    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales, L = _make_q3_quants(sub, 4)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 256)
    max_scale, _ = _first_absmax(scales)
    has = max_scale != 0
    iscale = _full(max_scale, -32) / max_scale
    l = torch.clamp(_wrap_i8(_nearest_int(iscale[:, None] * scales)), -32, 31) + 32
    l = torch.where(has[:, None], l, torch.zeros_like(l))
    d = _fp16(torch.where(has, torch.ones_like(iscale) / iscale, torch.zeros_like(iscale)))
    L = _requantize(x, L, d.float()[:, None] * (l - 32).float(), None, 16, -4, 3, 4)
    return {"d": d, "ls": l, "L": L}


def _q3_K_deq(f):
    dl = f["d"].float()[:, None] * (f["ls"] - 32).float()
    return dl.repeat_interleave(16, dim=1) * (f["L"] - 4).float()


def _q3_K_pack(f):
    import torch

    L, ls = f["L"], f["ls"]
    hmask = torch.zeros(L.shape[0], 32, dtype=torch.int32, device=L.device)
    for bit in range(8):
        hmask = hmask | (((L[:, 32 * bit:32 * bit + 32] >> 2) & 1) << bit)
    low = L & 3
    sc_low = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    sc_high = torch.zeros(L.shape[0], 4, dtype=torch.int32, device=L.device)
    for g in range(4):
        sc_high = sc_high | ((ls[:, 4 * g:4 * g + 4] >> 4) << (2 * g))
    return torch.cat([_u8(hmask), _pack_2bit(low), _u8(sc_low), _u8(sc_high), _half_bytes(f["d"])], dim=1)


def _qkx_K(x, nmax, rmin, nstep):
    """q4_K (nmax 15) and q5_K (nmax 31): 8 sub-blocks of 32 with 6-bit scales and mins."""
    import torch

    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    st = sub.t().contiguous()
    sum_x2 = torch.zeros(sub.shape[0], dtype=torch.float32, device=sub.device)
    for row in st:
        sum_x2 = sum_x2 + row * row
    av_x = _sqrtf(sum_x2 / _full(sum_x2, 32))
    weights = av_x[:, None] + sub.abs()
    scales, L, mins = _make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep, False)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 256)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    zero = torch.zeros_like(max_scale)
    inv_scale = torch.where(max_scale > 0, _full(max_scale, 63) / max_scale, zero)
    inv_min = torch.where(max_min > 0, _full(max_min, 63) / max_min, zero)
    ls = torch.clamp(_wrap_u8(_nearest_int(inv_scale[:, None] * scales)), max=63)
    lm = torch.clamp(_wrap_u8(_nearest_int(inv_min[:, None] * mins)), max=63)
    d = _fp16(max_scale / _full(max_scale, 63))
    dmin = _fp16(max_min / _full(max_min, 63))
    L = _requantize(x, L, d.float()[:, None] * ls.float(), dmin.float()[:, None] * lm.float(), 32, 0, nmax)
    return {"d": d, "dmin": dmin, "ls": ls, "lm": lm, "L": L}


def _q4_K(x):
    return _qkx_K(x, 15, -1.0, 20)


def _q5_K(x):
    return _qkx_K(x, 31, -0.5, 15)


def _qkx_K_deq(f):
    rep = lambda t: t.repeat_interleave(32, dim=1)  # noqa: E731
    d1 = f["d"].float()[:, None] * f["ls"].float()
    m1 = f["dmin"].float()[:, None] * f["lm"].float()
    return rep(d1) * f["L"].float() - rep(m1)


def _k4_scales(ls, lm):
    """The 12 bytes of 6-bit scales and mins of q4_K/q5_K (get_scale_min_k4's layout; values of
    8 bits are stored as the C code stores them, high bits or-ed in and truncated to a byte)."""
    import torch

    first = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    second = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    third = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return _u8(torch.cat([first, second, third], dim=1) & 0xFF)


def _k4_unpack(q):
    """``get_scale_min_k4`` for j = 0..7 of the 12 scale bytes ``q`` (int32): (scales, mins)."""
    import torch

    sc = torch.cat([q[:, :4] & 63, (q[:, 8:] & 0xF) | ((q[:, :4] >> 6) << 4)], dim=1)
    mn = torch.cat([q[:, 4:8] & 63, (q[:, 8:] >> 4) | ((q[:, 4:8] >> 6) << 4)], dim=1)
    return sc, mn


def _pack_4bit_64(L):
    """``q[l] = L[j+l] | L[j+l+32] << 4`` for each 64 weights."""
    b = L.reshape(L.shape[0], -1, 2, 32)
    return _u8(((b[:, :, 0] & 0xF) | ((b[:, :, 1] & 0xF) << 4)).reshape(L.shape[0], -1))


def _q4_K_pack(f):
    import torch

    scales = f["k4"] if "k4" in f else _k4_scales(f["ls"], f["lm"])
    return torch.cat([_half_bytes(f["d"]), _half_bytes(f["dmin"]), scales, _pack_4bit_64(f["L"])], dim=1)


def _q5_K_pack(f):
    import torch

    L = f["L"]
    b = L.reshape(L.shape[0], 4, 2, 32)
    qh = torch.zeros(L.shape[0], 32, dtype=torch.int32, device=L.device)
    for k in range(4):
        qh = qh | (((b[:, k, 0] >> 4) & 1) << (2 * k)) | (((b[:, k, 1] >> 4) & 1) << (2 * k + 1))
    return torch.cat([_half_bytes(f["d"]), _half_bytes(f["dmin"]), _k4_scales(f["ls"], f["lm"]),
                      _u8(qh), _pack_4bit_64(L)], dim=1)


def _q6_K(x, qw=None):
    import torch

    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales, L = _make_qx_quants(sub, 32, None if qw is None else qw.reshape(nb * 16, 16))
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 256)
    max_scale, max_abs = _first_absmax(scales)
    empty = max_abs < GROUP_MAX_EPS
    iscale = _full(max_scale, -128) / max_scale
    d = torch.ones_like(iscale) / iscale
    sc = _wrap_i8(torch.clamp(_nearest_int(iscale[:, None] * scales), max=127))
    d = torch.where(empty, torch.zeros_like(d), d)
    sc = torch.where(empty[:, None], torch.zeros_like(sc), sc)
    d = _fp16(d)
    L = _requantize(x, L, d.float()[:, None] * sc.float(), None, 16, -32, 31, 32)
    L = torch.where(empty[:, None], torch.zeros_like(L), L)
    return {"d": d, "sc": sc, "L": L}


def _q6_K_deq(f):
    dl = f["d"].float()[:, None] * f["sc"].float()
    return dl.repeat_interleave(16, dim=1) * (f["L"] - 32).float()


def _q6_K_pack(f):
    import torch

    L = f["L"]
    ql, qh = [], []
    for j in (0, 128):
        b = L[:, j:j + 128].reshape(-1, 4, 32)
        ql.append((b[:, 0] & 0xF) | ((b[:, 2] & 0xF) << 4))
        ql.append((b[:, 1] & 0xF) | ((b[:, 3] & 0xF) << 4))
        qh.append((b[:, 0] >> 4) | ((b[:, 1] >> 4) << 2) | ((b[:, 2] >> 4) << 4) | ((b[:, 3] >> 4) << 6))
    return torch.cat([_u8(torch.cat(ql, dim=1)), _u8(torch.cat(qh, dim=1)),
                      f["sc"].to(torch.int8).view(torch.uint8), _half_bytes(f["d"])], dim=1)


# ---------------------------------------------------------------------------------------------
# with an importance matrix: quantize_row_<type>_impl(..., quant_weights) of ggml-quants.c

#: types whose imatrix weights use the mean square of the whole row (``sum_x2 / n_per_row``)
_ROW_SIGMA2 = ("q4_0", "q4_1", "q5_0", "q5_1")


def _row_sigma2(rows):
    """``float s = 0; for (j...) s += x[j]*x[j]; sigma2 = s/n_per_row;`` for each row ``[rows]``."""
    import torch

    step = max(1, _CHUNK_WEIGHTS // max(1, rows.shape[1]))
    parts = []
    for i in range(0, rows.shape[0], step):
        r = rows[i:i + step]
        parts.append(_seqsum(r * r))
    s = torch.cat(parts) if parts else rows.new_zeros(0)
    return s / _full(s, rows.shape[1])


def _block_sigma2(x, double: bool):
    """Mean square of each block ``[nb]`` (``sumx2/QK_K``; ``2*sumx2/QK_K`` when ``double``)."""
    s = _seqsum(x * x)
    return (s + s if double else s) / _full(s, x.shape[1])


def _qw_sigma(x, qw, sigma2):
    """``qw[j] * sqrtf(sigma2 + x[j]*x[j])``: each value's weight in an imatrix search."""
    return qw * _sqrtf(sigma2[:, None] + x * x)


def _make_qp_quants(x, nmax, w):
    """``make_qp_quants(n, nmax, x, L, quant_weights=w)`` over the rows of ``x`` (the block scales
    or mins of a K-quant super-block): returns (scale, L as the C code stores it: uint8 0..255)."""
    import torch

    n = x.shape[1]
    mx = _positive_max(x)
    zero = mx < GROUP_MAX_EPS
    xt = x.t().contiguous()
    wt = w.t().contiguous()
    iscale = _full(mx, nmax) / mx
    L0 = _wrap_u8(_nearest_int(iscale * xt)).float()
    diff = xt - (torch.ones_like(iscale) / iscale) * L0
    best = _seqsum_t((wt * diff) * diff)
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = _full(mx, _c_f32(0.1) * _c_f32(is_) + _c_f32(nmax)) / mx
        l = torch.clamp(_nearest_int(iscale_is * xt), max=nmax).float()
        diff = xt - (torch.ones_like(iscale_is) / iscale_is) * l
        mse = _seqsum_t((wt * diff) * diff)
        upd = mse < best
        best = torch.where(upd, mse, best)
        iscale = torch.where(upd, iscale_is, iscale)
    l = torch.clamp(_nearest_int(iscale * xt), max=nmax)
    wx = wt * xt
    sumlx = _seqsum_t(wx * l.float())
    suml2 = _seqsum_t((wt * l.float()) * l.float())
    cols = [c for c in _wrap_u8(l)]
    for _ in range(5):  # a pass that changes nothing leaves the state as it is: no early exit needed
        for i in range(n):
            li = cols[i].float()
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (wt[i] * li) * li
            new_l = torch.clamp(_nearest_int((xt[i] * sl2) / slx), max=nmax)
            nl = new_l.float()
            slx2 = slx + wx[i] * nl
            sl22 = sl2 + (wt[i] * nl) * nl
            upd = ((slx > 0) & (sl2 > 0) & (new_l != cols[i])
                   & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22))
            cols[i] = torch.where(upd, _wrap_u8(new_l), cols[i])
            sumlx = torch.where(upd, slx2, sumlx)
            suml2 = torch.where(upd, sl22, suml2)
    L = torch.stack(cols, dim=1)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return (torch.where(zero, torch.zeros_like(scale), scale),
            torch.where(zero[:, None], torch.zeros_like(L), L))


def _sub_weights(x, qw, sub, double):
    """The super-block's values as ``[nb * 256/sub, sub]`` sub-blocks, their imatrix weights, and
    each sub-block's sum of weights ``sw``."""
    nb = x.shape[0]
    sigma2 = _block_sigma2(x, double)
    xs = x.reshape(-1, sub)
    w = _qw_sigma(xs, qw.reshape(-1, sub), sigma2.repeat_interleave(QK_K // sub))
    return xs, w, _seqsum(w).reshape(nb, -1)


def _q32_im(x, qw, sigma2, nmax):
    """q4_0 (nmax 8) and q5_0 (nmax 16): ``make_qx_quants(32, nmax, x, L, 1, weight)``."""
    scale, L = _make_qx_quants(x, nmax, _qw_sigma(x, qw, sigma2))
    return {"d": _fp16(scale), "q": L}


def _q32_asym_im(x, qw, sigma2, nmax):
    """q4_1 (nmax 15) and q5_1 (nmax 31): ``make_qkx3_quants(32, nmax, x, weight, ..., -0.9, 0.05, 36)``."""
    scale, L, the_min = _make_qkx2_quants(x, _qw_sigma(x, qw, sigma2), nmax, -0.9, 0.05, 36, False)
    return {"d": _fp16(scale), "m": _fp16(-the_min), "q": L}


def _iq4_nl_im(x, qw, _sigma2):
    """``quantize_row_iq4_nl_impl`` with ``quant_weights``: sigma2 is twice the block's mean square."""
    return _iq4_nl(x, _qw_sigma(x, qw, _seqsum(x * x) * (2.0 / 32)))


def _q2_K_im(x, qw, _sigma2):
    import torch

    nb = x.shape[0]
    sub, w, sw = _sub_weights(x, qw, 16, False)
    scales, L, mins = _make_qkx2_quants(sub, w, 3, -0.9, 0.05, 36, False)
    scales, mins, L = scales.reshape(nb, 16), mins.reshape(nb, 16), L.reshape(nb, 256)
    dm, Ls = _make_qp_quants(scales, 15, sw)
    mm, Lm = _make_qp_quants(mins, 15, sw)
    d, dmin = _fp16(dm), _fp16(mm)
    sc = (Ls | (Lm << 4)) & 0xFF
    L = _requantize(x, L, d.float()[:, None] * (sc & 0xF).float(), dmin.float()[:, None] * (sc >> 4).float(),
                    16, 0, 3)
    return {"d": d, "dmin": dmin, "scales": sc, "L": L}


def _q3_K_im(x, qw, _sigma2):
    import torch

    nb = x.shape[0]
    sub, w, sw = _sub_weights(x, qw, 16, True)
    scales, L = _make_qx_quants(sub, 4, w)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 256)
    d_block, ls = _make_qx_quants(scales, 32, sw)
    d = _fp16(d_block)
    L = _requantize(x, L, d.float()[:, None] * (ls - 32).float(), None, 16, -4, 3, 4)
    return {"d": d, "ls": ls, "L": L}


def _qkx_K_im(x, qw, nmax):
    """q4_K (nmax 15) and q5_K (nmax 31) with ``quant_weights``."""
    import torch

    nb = x.shape[0]
    sub, w, sw = _sub_weights(x, qw, 32, True)
    scales, L, mins = _make_qkx2_quants(sub, w, nmax, -0.9, 0.05, 36, False)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 256)
    d_block, ls = _make_qp_quants(scales, 63, sw)
    m_block, lm = _make_qp_quants(mins, 63, sw)
    if nmax == 31:  # q5_K clamps its 6-bit scales; q4_K stores the bytes as they come
        ls, lm = torch.clamp(ls, max=63), torch.clamp(lm, max=63)
    k4 = _k4_scales(ls, lm)
    ls, lm = _k4_unpack(k4.to(torch.int32))  # what the file holds (get_scale_min_k4)
    d, dmin = _fp16(d_block), _fp16(m_block)
    L = _requantize(x, L, d.float()[:, None] * ls.float(), dmin.float()[:, None] * lm.float(), 32, 0, nmax)
    return {"d": d, "dmin": dmin, "ls": ls, "lm": lm, "L": L, "k4": k4}


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

#: name -> (nominal bits, block, bytes per block, weights sharing one level set, description)
_SPECS = {
    "q8_0": (8, 32, 34, 32, "8-bit, one fp16 scale per 32 weights (8.5 bits per weight)"),
    "q4_0": (4, 32, 18, 32, "4-bit symmetric, one fp16 scale per 32 weights (4.5 bpw)"),
    "q4_1": (4, 32, 20, 32, "4-bit, fp16 scale and min per 32 weights (5.0 bpw)"),
    "q5_0": (5, 32, 22, 32, "5-bit symmetric, one fp16 scale per 32 weights (5.5 bpw)"),
    "q5_1": (5, 32, 24, 32, "5-bit, fp16 scale and min per 32 weights (6.0 bpw)"),
    "iq4_nl": (4, 32, 18, 32, "4-bit non-linear levels, one fp16 scale per 32 weights (4.5 bpw)"),
    "q2_K": (2, 256, 84, 16, "K-quant: 2-bit, 4-bit scales and mins per 16, fp16 per 256 (2.625 bpw)"),
    "q3_K": (3, 256, 110, 16, "K-quant: 3-bit, 6-bit scales per 16, fp16 per 256 (3.4375 bpw)"),
    "q4_K": (4, 256, 144, 32, "K-quant: 4-bit, 6-bit scales and mins per 32, fp16 per 256 (4.5 bpw)"),
    "q5_K": (5, 256, 176, 32, "K-quant: 5-bit, 6-bit scales and mins per 32, fp16 per 256 (5.5 bpw)"),
    "q6_K": (6, 256, 210, 16, "K-quant: 6-bit, 8-bit scales per 16, fp16 per 256 (6.5625 bpw)"),
}

FORMATS: dict[str, GgmlFormat] = {}
for _name, (_bits, _block, _size, _group, _desc) in _SPECS.items():
    FORMATS[_name] = register(GgmlFormat(_name, _bits, _block, _size, _group, _desc))
