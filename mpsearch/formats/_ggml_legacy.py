"""llama.cpp's 32-weight blocks for mpsearch.formats.ggml: q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl.
"""

from __future__ import annotations

from ._ggml_arith import (_first_absmax, _first_equal, _fp16, _full, _half_bytes, _recip_or_zero, _roundf,
                          _candidate_sums, _u8, _wrap_i8, _wrap_u8, GROUP_MAX_EPS,
                          IQ4NL_VALUES)

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


def _iq4nl_lookup_(al, table, out):
    """:func:`_iq4nl_lookup` into ``out``, overwriting ``al`` (both contiguous, float32)."""
    import torch

    t = al.mul_(2.0).floor_().clamp_(_IQ4NL_LO, _IQ4NL_HI).add_(float(12582912 - _IQ4NL_LO))
    pos = t.view(torch.int32).sub_(0x4B400000).clamp_(0, table.shape[0] - 1)  # NaN (empty blocks)
    torch.index_select(table, 0, pos.view(-1), out=out.view(-1))
    return out


def iq4nl_block_scales(x, w):
    """The scale search of ``quantize_row_iq4_nl_impl`` (ntry = 7) for 32-weight blocks ``x``
    ``[nb, 32]`` with search weights ``w``: returns each block's scale (0 for an empty block).

    The 16 candidate scales depend on the block's max only: their sums are computed all at once
    (a candidate axis, each sum in C's order), then compared in C's order."""
    import torch

    _, levels = _iq4nl_tables(x.device)
    mx, amax = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    xt = x.t().contiguous()
    wt = w.t().contiguous()
    nb = xt.shape[1]
    C = 16
    ids = torch.empty(C, nb, dtype=x.dtype, device=x.device)
    d = (-mx) / _full(mx, IQ4NL_VALUES[0])
    torch.div(torch.ones_like(d), d, out=ids[0])  # the first pass: 1/d
    for k, itry in enumerate(range(-7, 8)):
        torch.div(_full(mx, itry + IQ4NL_VALUES[0]), mx, out=ids[k + 1])

    def terms(q, cols, t1, t2):  # sumqx += (w*q)*x; sumq2 += (w*q)*q
        torch.mul(wt[:, None, cols], q, out=t2)
        torch.mul(t2, xt[:, None, cols], out=t1)
        t2.mul_(q)

    sumqx, sumq2 = _candidate_sums(xt, ids, lambda al, spare: _iq4nl_lookup_(al, levels, spare), terms)
    sx, s2 = sumqx[0], sumq2[0]
    d = torch.where(s2 > 0, sx / s2, torch.zeros_like(sx))
    best = d * sx
    for c in range(1, C):
        sx, s2 = sumqx[c], sumq2[c]
        upd = (s2 > 0) & (sx * sx > best * s2)
        d = torch.where(upd, sx / s2, d)
        best = torch.where(upd, d * sx, best)
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
