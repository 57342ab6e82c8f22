"""llama.cpp's K-quants for mpsearch.formats.ggml: the searches of ggml-quants.c vectorised over
blocks, and the super-blocks of 256 (q2_K..q6_K).
"""

from __future__ import annotations

from ._ggml_arith import (_c_f32, _f32, _first_absmax, _fp16, _full, _half_bytes, _nearest_int,
                          _candidate_sums, _search_step, _seqsum, _seqsum_into, _sqrtf, _u8, _wrap_i8, _wrap_u8,
                          GROUP_MAX_EPS)

# ---------------------------------------------------------------------------------------------
# the searches of ggml-quants.c, vectorised over blocks ([nb, n] rows)


def _make_qx_quants(x, nmax, qw=None):
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: returns (scale, L in 0..2*nmax-1); the
    weight of each value is ``qw`` where given, else ``x * x``.

    The 19 candidate scales depend on the block's max only: their sums are computed all at once
    (a candidate axis, each sum still in C's order), then the candidates are compared in C's order,
    and the levels of the winner are computed again from its inverse scale."""
    import torch

    mx, amax = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    xt = x.t().contiguous()
    w = xt * xt if qw is None else qw.t().contiguous()
    wx = w * xt
    # candidate 0: iscale = -nmax/max; then nmax + 0.1*is for is = -9..9 without 0, in C's order
    nums = [_f32(nmax)] + [_f32(_c_f32(nmax) + _c_f32(0.1) * _c_f32(is_)) for is_ in range(-9, 10) if is_]
    neg = torch.tensor([-v for v in nums], dtype=x.dtype, device=x.device)
    iscales = neg[:, None] / mx[None, :]  # [C, nb]: _full(mx, -s) / mx
    C = len(nums)

    def levels(v, _spare):  # |iscale * x| <= nmax + 1: round half to even, as nearest_int
        return torch.round(v.clamp_(-nmax, nmax - 1), out=v)

    def terms(l, cols, t1, t2):  # sumlx += (w*x)*l; suml2 += (w*l)*l
        torch.mul(wx[:, None, cols], l, out=t1)
        torch.mul(w[:, None, cols], l, out=t2).mul_(l)

    sumlx, suml2 = _candidate_sums(xt, iscales, levels, terms)
    sx, s2 = sumlx[0], suml2[0]
    scale = torch.where(s2 != 0, sx / s2, torch.zeros_like(sx))
    best = scale * sx
    best_is = iscales[0]
    for c in range(1, C):
        sx, s2 = sumlx[c], suml2[c]
        upd = (s2 > 0) & (sx * sx > best * s2)
        scale = torch.where(upd, sx / s2, scale)
        best = torch.where(upd, scale * sx, best)
        best_is = torch.where(upd, iscales[c], best_is)
    L = torch.round(torch.clamp(x * best_is[:, None], -nmax, nmax - 1)) + nmax
    L = torch.where(zero[:, None], torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L.to(torch.int32)


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
    """``make_qkx2_quants`` (and ``make_qkx3_quants``, the same search with weights given):
    returns (scale, L in 0..nmax, the_min = -min)."""
    import torch

    step = _search_step(x, x.shape[1])
    if x.shape[0] <= step:
        return _qkx2_part(x, w, nmax, rmin, rdelta, nstep, use_mad)
    parts = [_qkx2_part(x[i:i + step], w[i:i + step], nmax, rmin, rdelta, nstep, use_mad)
             for i in range(0, x.shape[0], step)]
    return tuple(torch.cat(p) for p in zip(*parts))


def _select_(dst, src, mask):
    """``dst = mask ? src : dst`` bit for bit (float32 ``[k, m]`` rows, ``mask`` int32 ``[m]``: 0 or
    -1): two xors and an and, several times faster on the CPU than torch.where."""
    import torch

    d = dst.view(torch.int32)
    t = torch.bitwise_xor(d, src.view(torch.int32))
    t &= mask
    d ^= t
    return dst


def _qkx2_part(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """:func:`_make_qkx2_quants` of one pass of blocks. Each candidate's levels depend on the min
    that the candidates before it chose, so the candidates run one after another over all blocks.
    The levels of the best candidate are not kept (a masked copy of [n, nb] per candidate): its
    inverse scale and min are, and the levels are computed again from them at the end."""
    import torch

    xt = x.t().contiguous()
    wt = w.t().contiguous()
    n, nb = xt.shape
    # V: sum_w, sum_x (fixed), then each candidate's sum_l, sum_l2, sum_xl
    V = torch.empty(5, nb, dtype=xt.dtype, device=xt.device)
    sum_w, sum_x = V[0], V[1]
    sum_w.copy_(wt[0])
    torch.mul(sum_w, xt[0], out=sum_x)
    for i in range(1, n):
        sum_w.add_(wt[i])
        sum_x.add_(wt[i] * xt[i])
    mn = x.amin(dim=1)
    mx = x.amax(dim=1)
    zero = torch.zeros_like(mn)
    mn = torch.where(mn > 0, zero, mn)
    flat = mx == mn
    not_flat = ~flat
    lev = torch.empty_like(xt)
    terms = torch.empty(n, 3, nb, dtype=xt.dtype, device=xt.device)
    diff = torch.empty_like(xt)
    # S: the state (best error, the winner's inverse scale and the min its levels used, scale, min);
    # T: the same of the candidate at hand
    S = torch.empty(5, nb, dtype=xt.dtype, device=xt.device)
    T = torch.empty_like(S)
    # the products of D, of the scale's and of the min's numerators: A[k] * B[k], k = 0..5
    ia = torch.tensor([0, 2, 0, 1, 3, 2], device=xt.device)
    ib = torch.tensor([3, 2, 4, 2, 1, 4], device=xt.device)

    def levels(iscale, mn_, out):
        # clamp(nearest_int(iscale * (x - min)), 0, nmax): clamped first, the rounding (half to
        # even, as nearest_int's for |v| < 2**22) cannot leave [0, nmax] and gives no -0
        torch.sub(xt, mn_, out=out)
        out.mul_(iscale).clamp_(0, nmax)
        return torch.round(out, out=out)

    def err(scale, L, mn_, out):  # sum of w * (scale * L + min - x)**2 (|.| with use_mad), in C's order
        torch.mul(L, scale, out=diff)
        diff.add_(mn_).sub_(xt)
        diff.abs_() if use_mad else diff.mul_(diff)
        diff.mul_(wt)
        return _seqsum_into(out, diff)

    iscale = _full(mx, nmax) / (mx - mn)
    S[1] = iscale
    S[2] = mn
    S[3] = torch.ones_like(iscale) / iscale
    S[4] = mn
    err(S[3], levels(iscale, mn, lev), mn, S[0])
    wl, wl2, wxl = terms[:, 0], terms[:, 1], terms[:, 2]
    for is_ in range(nstep + 1):
        num = _f32(_c_f32(rmin) + _c_f32(rdelta) * _c_f32(is_) + _c_f32(nmax))
        torch.div(_full(mx, num), mx - S[4], out=T[1])
        T[2].copy_(S[4])
        Laux = levels(T[1], T[2], lev)
        torch.mul(wt, Laux, out=wl)
        torch.mul(wl, Laux, out=wl2)
        torch.mul(wl, xt, out=wxl)
        _seqsum_into(V[2:].view(-1), terms.view(n, 3 * nb))
        P = torch.index_select(V, 0, ia).mul_(torch.index_select(V, 0, ib))
        Q = P[0::2] - P[1::2]  # D, the scale's and the min's numerators
        torch.div(Q[1:], Q[0], out=T[3:])
        pos = T[4] > 0
        torch.where(pos, V[4] / V[3], T[3], out=T[3])
        torch.where(pos, zero, T[4], out=T[4])
        err(T[3], Laux, T[4], T[0])
        better = (Q[0] > 0) & (T[0] < S[0]) & not_flat
        _select_(S, T, better.to(torch.int32).neg_())
    scale, mn = S[3], S[4]
    L = levels(S[1], S[2], lev).t()
    scale = torch.where(flat, zero, scale)
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    return scale, L.to(torch.int32), -mn


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
