"""C semantics in torch for mpsearch.formats.ggml (float32 everywhere): the rounding, casts and
sums of ggml-quants.c, with the constants the GGML types share.
"""

from __future__ import annotations

QK_K = 256

#: iq4_nl's non-linear levels (kvalues_iq4nl in ggml/src/ggml-common.h)
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

GROUP_MAX_EPS = 1e-15

#: blocks quantized per torch pass (bounds the temporaries: ~2**20 weights per pass)
_CHUNK_WEIGHTS = 1 << 20

#: weights per pass of the candidate searches on the CPU: their temporaries (a few [block, blocks]
#: float32) stay in the last-level cache while the Python overhead of each torch call stays small
#: (2**16 and 2**20 were slower, experiments/imatrix_speed.md); a GPU takes 16 times more per pass
_SEARCH_WEIGHTS = 1 << 18


def _search_step(x, per_block: int) -> int:
    """Blocks per pass of a search over the blocks of ``x`` that holds ``per_block`` values each."""
    weights = _SEARCH_WEIGHTS if x.device.type == "cpu" else _SEARCH_WEIGHTS << 4
    return max(1, weights // per_block)


_ZERO_INDEX: dict = {}


def _seqsum_into(acc, terms_t):
    """``acc = 0; for (i...) acc += terms_t[i];`` in place (``acc`` [...], ``terms_t`` [n, ...]), in
    that order. On the CPU, ``index_add_`` of every row into one row adds them one after another in
    index order (the same float32 additions as a loop of ``add_``, without a Python call per row;
    tests/test_formats_ggml.py checks it bit for bit against that loop on adversarial sums); on a
    GPU it adds with atomics in no set order, so there the loop stays."""
    import torch

    if terms_t.device.type != "cpu":
        acc.zero_()
        for row in terms_t:
            acc.add_(row)
        return acc
    n = terms_t.shape[0]
    key = (n, terms_t.device)
    idx = _ZERO_INDEX.get(key)
    if idx is None:
        idx = _ZERO_INDEX[key] = torch.zeros(n, dtype=torch.long, device=terms_t.device)
    # into a strided ``acc`` index_add_ falls back to a loop per element: sum into a dense one
    out = acc if acc.is_contiguous() else torch.empty(acc.shape, dtype=acc.dtype, device=acc.device)
    out.zero_()
    out.unsqueeze(0).index_add_(0, idx, terms_t)
    return acc if out is acc else acc.copy_(out)


def _search_buffers(k, shape, like):
    """``k`` flat float32 buffers of ``prod(shape)`` values, and a function that views each one as
    ``shape`` with its last size cut to ``m`` (contiguous, for ``out=``): the passes of a search
    reuse them instead of allocating fresh temporaries (which the C library returns to the system
    and faults in again, page by page)."""
    import math

    import torch

    size = math.prod(shape)
    bufs = [torch.empty(size, dtype=like.dtype, device=like.device) for _ in range(k)]

    def views(m):
        cut = (*shape[:-1], m)
        return [b[:math.prod(cut)].view(cut) for b in bufs]

    return views


def _candidate_sums(xt, inv, levels_, terms_):
    """The two C-order sums of every candidate scale of a search whose candidates depend on the
    block alone (make_qx_quants, iq4_nl): for candidate ``c`` the levels are ``levels_(x * inv[c],
    spare)`` (in place, or into ``spare``), and ``terms_(q, cols, t1, t2)`` writes the terms of the
    two sums (``cols``: the blocks of this pass). ``xt`` [n, nb], ``inv`` [C, nb]; returns two [C, nb]."""
    import torch

    n, nb = xt.shape
    C = inv.shape[0]
    s1 = torch.empty(C, nb, dtype=xt.dtype, device=xt.device)
    s2 = torch.empty_like(s1)
    step = _search_step(xt, C * n)
    views = _search_buffers(4, (n, C, min(step, nb)), xt)
    for i in range(0, nb, step):
        j = min(nb, i + step)
        al, spare, t1, t2 = views(j - i)
        torch.mul(xt[:, None, i:j], inv[None, :, i:j], out=al)
        terms_(levels_(al, spare), slice(i, j), t1, t2)
        _seqsum_into(s1[:, i:j], t1)
        _seqsum_into(s2[:, i:j], t2)
    return s1, s2


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


def _roundf(f):
    """C ``roundf``: half away from zero."""
    import torch

    t = torch.trunc(f)
    return t + torch.where((f - t).abs() >= 0.5, torch.sign(f), torch.zeros_like(f))


def _seqsum(terms):
    """``float s = 0; for (i...) s += terms[i];`` over the last axis, in that order."""
    return _seqsum_t(terms.t().contiguous())


def _seqsum_t(terms_t):
    """:func:`_seqsum` of terms already laid out ``[n, blocks]`` (one row per term index)."""
    import torch

    acc = torch.empty(terms_t.shape[1], dtype=torch.float32, device=terms_t.device)
    return _seqsum_into(acc, terms_t)


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
