"""IQ1_S and IQ1_M of :mod:`mpsearch.formats.ggml_iq`: levels -1/0/+1 shifted by +-1/8.

The levels of each 32 (iq1_s) or 16 (iq1_m) weights come from an exhaustive search over the two
boundaries that split the sorted weights into three groups (``quantize_row_iq1_{s,m}_impl`` in
ggml/src/ggml-quants.c), then move to the 2048-point grid of 8."""

from __future__ import annotations

from ._iq_common import _importance, _read_f16, _read_u16, _sigma2, _u16_bytes
from ._iq_grids import _best_neighbours, _grid, _keys
from .ggml import QK_K, _c_f32, _full, _fp16, _half_bytes, _nearest_int, _seqsum, _u8


# ---------------------------------------------------------------------------------------------
# IQ1_S and IQ1_M: levels {-1, 0, 1} + a shift of +-1/8 on a 2048-point grid of 8


IQ1_DELTA = 0.125
_X_P = (-1 + IQ1_DELTA, IQ1_DELTA, 1 + IQ1_DELTA)
_X_M = (-1 - IQ1_DELTA, -IQ1_DELTA, 1 - IQ1_DELTA)


def _prefix_t(terms):
    """``s[0] = 0; s[j+1] = s[j] + terms[j]`` along the last axis, one term at a time, laid out
    ``[n+1, M]`` (prefix index first)."""
    import torch

    out = [torch.zeros(terms.shape[0], dtype=terms.dtype, device=terms.device)]
    for j in range(terms.shape[1]):
        out.append(out[-1] + terms[:, j])
    return torch.stack(out)


def _sorted(xs):
    """Ascending order of each row as glibc's qsort (a stable merge sort) gives it; -0 ties +0."""
    import torch

    return torch.sort(xs + 0.0, dim=1, stable=True).indices


def _pairs(n, device):
    """All ``(i1, i2)``, ``0 <= i1 <= i2 <= n``, in the C loops' order."""
    import torch

    i1, i2 = torch.triu_indices(n + 1, n + 1, device=device)
    return i1, i2


#: the float32 test ``sumqx*sumqx > best*sumq2`` is off by at most a few roundings (~2.4e-7): a
#: float64 score ``sumqx^2/sumq2`` this close (relatively) to a threshold may fall on either side
_BAND = 2e-6
#: the products of that test must stay well inside float32's normal range for that bound to hold
_SAFE = (1e-30, 1e36)
#: how many of the best candidates the shortcut of :func:`_scan` looks at
_TOPK = 32


def _scan(qx, q2):
    """The C loop ``if (sumq2 > 0 && sumqx*sumqx > best*sumq2) {scale = sumqx/sumq2; best =
    scale*sumqx; pick = c}`` over candidates ``c`` (rows of ``qx``, ``q2`` ``[C, M]``, in order)
    from ``best = -FLT_MAX``. Returns (scale, picked candidate or -1) per column.

    Exact shortcut. Sort a column's scores ``(sumqx/sumq2)*sumqx`` from the top and cut after the
    first ``j`` at a gap wider than ``2*_BAND``: the candidates above the cut are the only ones the
    loop can end on. Rounding moves each test, and each score, by far less than ``_BAND``, so the first of them is accepted whatever came before it, and every candidate below
    the cut is rejected after it: the loop over those ``j`` candidates, in their order, ends where
    the full loop ends (``j = 1``: the top candidate). Columns without such a gap among the top
    ``_TOPK``, or with products near float32's limits, run the full loop."""
    import torch

    C, M = qx.shape
    device = qx.device
    pos = q2 > 0
    # (sumqx/sumq2)*sumqx: within 2 roundings of sumqx^2/sumq2, and no float32 overflow of sumqx^2
    score = torch.where(pos, (qx / torch.where(pos, q2, torch.ones_like(q2))) * qx,
                        torch.full_like(qx, -1.0))
    top, arg = score.max(dim=0)
    second = score.scatter(0, arg[None], -2.0).amax(dim=0)
    alone = second * (1 + _BAND) < top * (1 - _BAND)
    j = torch.ones_like(arg)
    idx = arg[None]
    has_gap = alone.clone()
    crowd = (~alone).nonzero().squeeze(1)
    if crowd.numel():  # near ties at the top: look further down for a gap
        K = min(_TOPK, C)
        vals, cidx = score[:, crowd].topk(K, dim=0)
        gap = vals[1:] * (1 + _BAND) < vals[:-1] * (1 - _BAND)
        has_gap[crowd] = gap.any(dim=0)
        j[crowd] = torch.argmax(gap.to(torch.uint8), dim=0) + 1
        idx = torch.full((K, M), C, dtype=torch.long, device=device)
        idx[0] = arg
        idx[:, crowd] = cidx
    q2min = torch.where(pos, q2, torch.full_like(q2, float("inf"))).amin(dim=0)
    safe = (top * q2min > _SAFE[0]) & (top * q2.amax(dim=0) < _SAFE[1]) & has_gap
    none = ~pos.any(dim=0)
    scale = torch.zeros(M, device=device)
    pick = torch.full((M,), -1, dtype=torch.long, device=device)
    one = (safe & ~none & (j == 1)).nonzero().squeeze(1)
    scale[one] = qx[arg[one], one] / q2[arg[one], one]
    pick[one] = arg[one]
    short = (safe & ~none & (j > 1)).nonzero().squeeze(1)
    if short.numel():
        # the near candidates of each column in the loop's order, padded with C (skipped)
        rank = torch.arange(idx.shape[0], device=device)[:, None]
        members = torch.where(rank < j[short], idx[:, short], torch.full_like(idx[:, short], C))
        members = members.sort(dim=0).values
        n = int(j[short].max())
        hx = torch.cat([qx[:, short], torch.zeros_like(qx[:1, short])])
        h2 = torch.cat([q2[:, short], torch.zeros_like(q2[:1, short])])
        best = torch.full((short.numel(),), -3.4028234663852886e38, device=device)
        hs = torch.zeros(short.numel(), device=device)
        hp = torch.full((short.numel(),), -1, dtype=torch.long, device=device)
        for t in range(n):
            c = members[t:t + 1]
            a, b = hx.gather(0, c)[0], h2.gather(0, c)[0]
            upd = (b > 0) & (a * a > best * b)
            hs = torch.where(upd, a / b, hs)
            best = torch.where(upd, hs * a, best)
            hp = torch.where(upd, c[0], hp)
        scale[short] = hs
        pick[short] = hp
    full = (~safe & ~none).nonzero().squeeze(1)
    if full.numel():
        hx, h2 = qx[:, full], q2[:, full]
        best = torch.full((full.numel(),), -3.4028234663852886e38, device=device)
        hs = torch.zeros(full.numel(), device=device)
        hp = torch.full((full.numel(),), -1, dtype=torch.long, device=device)
        for c in range(C):
            a, b = hx[c], h2[c]
            upd = (b > 0) & (a * a > best * b)
            hs = torch.where(upd, a / b, hs)
            best = torch.where(upd, hs * a, best)
            hp = torch.where(upd, torch.full_like(hp, c), hp)
        scale[full] = hs
        pick[full] = hp
    return scale, pick


def _levels_from_split(order, i1, i2):
    """Levels 0/1/2 of a row by sorted position: below ``i1``, between, from ``i2`` on."""
    import torch

    M, n = order.shape
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=order.device).expand(M, n))
    return (rank >= i1[:, None]).long() + (rank >= i2[:, None]).long()


def _iq1_values(device):
    """``[2, 3]``: the level values x_p (shift +1) and x_m (shift -1)."""
    import torch

    return torch.tensor([_X_P, _X_M], dtype=torch.float32, device=device)


def _iq1_to_grid(grid, L, xs, ws, scale, which):
    """The grid point of each group of 8 levels ``L`` (``[M, n]``): itself if on the grid, else
    ``iq1_find_best_neighbour2`` (distance over the signed weights with the level values of shift
    ``which`` ``[M, n/8]``: 0 = x_p, 1 = x_m). Returns (grid index ``[M, n/8]``, all on grid ``[M]``)."""
    M, n = L.shape
    ng = n // 8
    keys = _keys(grid, L.reshape(M * ng, 8))
    gi = grid["kmap"][keys]
    on = gi >= 0
    off = (~on).nonzero().squeeze(1)
    if off.numel():
        qlev = _iq1_values(L.device)[which.reshape(-1)[off]]  # x_p or x_m per group
        gi[off] = _best_neighbours(grid, keys[off], xs.reshape(M * ng, 8)[off],
                                   ws.reshape(M * ng, 8)[off], scale.repeat_interleave(ng)[off], qlev)
    return gi.reshape(M, ng), on.reshape(M, ng).all(dim=1)


def _refit_terms(grid, gi, xs, ws, which, mult=None):
    """The terms ``w*q*x`` and ``w*q*q`` (``q = xx[level]``, times ``mult``) of the C refits."""
    M, n = xs.shape
    vals = _iq1_values(xs.device)
    lv = grid["levels"][gi].reshape(M, n // 8, 8)
    q = vals[which[:, :, None].expand_as(lv), lv].reshape(M, n)
    if mult is not None:
        q = q * mult
    wq = ws * q
    return wq * xs, wq * q


def _refit(grid, gi, xs, ws, which):
    """``sumqx += w*q*x; sumq2 += w*q*q`` over each row, in order."""
    tx, t2 = _refit_terms(grid, gi, xs, ws, which)
    return _seqsum(tx), _seqsum(t2)


def _iq1_s(x, qw):
    import torch

    nb = x.shape[0]
    grid = _grid("iq1", x.device)
    sigma2 = _sigma2(x, 2.0 / QK_K)
    w = _importance(x, qw, sigma2)
    xs, ws = x.reshape(-1, 32), w.reshape(-1, 32)
    M = xs.shape[0]
    skip = xs.abs().amax(dim=1) < 1e-12
    order = _sorted(xs)
    sx = _prefix_t((ws * xs).gather(1, order))  # [33, M]
    sw = _prefix_t(ws.gather(1, order))
    i1, i2 = _pairs(32, x.device)
    # candidates in the C order: for each (i1, i2), first x_p then x_m: [pairs, 2, M]
    a, b, c = sx[i1], sx[i2] - sx[i1], sx[32:33] - sx[i2]
    aw, bw, cw = sw[i1], sw[i2] - sw[i1], sw[32:33] - sw[i2]
    pv = [torch.tensor([float(_c_f32(vp)), float(_c_f32(vm))], device=x.device)[None, :, None]
          for vp, vm in zip(_X_P, _X_M)]
    a, b, c, aw, bw, cw = (t[:, None, :] for t in (a, b, c, aw, bw, cw))
    qx = ((a * pv[0] + b * pv[1]) + c * pv[2]).reshape(-1, M)
    q2 = (((aw * pv[0]) * pv[0] + (bw * pv[1]) * pv[1]) + (cw * pv[2]) * pv[2]).reshape(-1, M)
    scale, pick = _scan(qx, q2)
    skip = skip | (pick < 0)
    pick = torch.clamp(pick, min=0)
    shift_m = (pick % 2) == 1  # best_shift = -1
    L = _levels_from_split(order, i1[pick // 2], i2[pick // 2])
    neg = scale < 0
    L = torch.where(neg[:, None], 2 - L, L)
    scale = torch.where(neg, -scale, scale)
    shift_m = shift_m ^ neg
    which = shift_m.long()[:, None].expand(M, 4)
    gi, all_on = _iq1_to_grid(grid, L, xs, ws, scale, which)
    sqx, sq2 = _refit(grid, gi, xs, ws, which)
    scale = torch.where(~all_on & (sqx > 0) & (sq2 > 0), sqx / sq2, scale)
    scale = torch.where(skip, torch.zeros_like(scale), scale)
    gi = torch.where(skip[:, None], torch.zeros_like(gi), gi)
    shift_m = shift_m & ~skip
    scale, gi, shift_m = scale.reshape(nb, 8), gi.reshape(nb, 8, 4), shift_m.reshape(nb, 8)
    max_scale = torch.clamp(scale.amax(dim=1), min=0.0)
    has = max_scale > 0
    safe = torch.where(has, max_scale, torch.ones_like(max_scale))
    d = safe / _full(safe, 15)
    d16 = _fp16(torch.where(has, d * _full(d, 1.125), torch.zeros_like(d)))
    id_ = torch.ones_like(d) / d
    lv = torch.clamp(_nearest_int((id_[:, None] * scale - 1.0) * 0.5), 0, 7) | (shift_m.long() << 3)
    qh = ((gi >> 8) << (3 * torch.arange(4, device=x.device))).sum(-1)
    qh = torch.where(has[:, None], qh | (lv << 12), qh)
    return torch.cat([_half_bytes(d16), _u8((gi & 255).reshape(nb, 32)), _u16_bytes(qh)], dim=1)


def _iq1_s_deq(b):
    import torch

    nb = b.shape[0]
    values = _grid("iq1", b.device)["values"]
    d = _read_f16(b[:, 0:2])
    qs = b[:, 2:34].long().reshape(nb, 8, 4)
    qh = _read_u16(b[:, 34:50])  # [nb, 8]
    dl = d[:, None] * (2 * ((qh >> 12) & 7) + 1).float()
    delta = torch.where((qh & 0x8000) != 0, -IQ1_DELTA, IQ1_DELTA)
    idx = qs | (((qh[:, :, None] >> (3 * torch.arange(4, device=b.device))) & 7) << 8)
    y = dl[:, :, None, None] * (values[idx] + delta[:, :, None, None])
    return y.reshape(nb, QK_K)


def _iq1_m(x, qw):
    import torch

    nb = x.shape[0]
    grid = _grid("iq1", x.device)
    sigma2 = _sigma2(x, 2.0 / QK_K)
    w = x * x if qw is None else _importance(x, qw, sigma2)
    xs, ws = x.reshape(-1, 16), w.reshape(-1, 16)
    M = xs.shape[0]
    skip = xs.abs().amax(dim=1) < 1e-7
    order = _sorted(xs)
    half = (order >= 8)  # the half of the block each sorted weight sits in
    wx = (ws * xs).gather(1, order)
    wo = ws.gather(1, order)
    zero = torch.zeros_like(wx)
    px = [_prefix_t(torch.where(half, zero, wx)), _prefix_t(torch.where(half, wx, zero))]  # [17, M]
    pw = [_prefix_t(torch.where(half, zero, wo)), _prefix_t(torch.where(half, wo, zero))]
    i1, i2 = _pairs(16, x.device)
    p2, m2 = (float(_c_f32(t)) for t in (_X_P[2], _X_M[2]))
    f = lambda t: float(_c_f32(t))  # noqa: E731
    cp1 = f(f(_X_P[0]) * f(_X_P[0]) - f(_X_P[1]) * f(_X_P[1]))
    cp2 = f(f(_X_P[1]) * f(_X_P[1]) - f(_X_P[2]) * f(_X_P[2]))
    cm1 = f(f(_X_M[0]) * f(_X_M[0]) - f(_X_M[1]) * f(_X_M[1]))
    cm2 = f(f(_X_M[1]) * f(_X_M[1]) - f(_X_M[2]) * f(_X_M[2]))
    qx_p, qx_m, q2_p, q2_m = [], [], [], []
    for h in range(2):
        txs, tws = px[h][16:17], pw[h][16:17]
        sxx = px[h][i1] + px[h][i2]
        qx_p.append(txs * p2 - sxx)
        qx_m.append(txs * m2 - sxx)
        q2_p.append(((tws * p2) * p2 + pw[h][i1] * cp1) + pw[h][i2] * cp2)
        q2_m.append(((tws * m2) * m2 + pw[h][i1] * cm1) + pw[h][i2] * cm2)
    # candidates in the C order: for each (i1, i2), k = 0..3 (++, +-, -+, --)
    qx = torch.stack([qx_p[0] + qx_p[1], qx_p[0] + qx_m[1], qx_m[0] + qx_p[1], qx_m[0] + qx_m[1]], 1)
    q2 = torch.stack([q2_p[0] + q2_p[1], q2_p[0] + q2_m[1], q2_m[0] + q2_p[1], q2_m[0] + q2_m[1]], 1)
    scale, pick = _scan(qx.reshape(-1, M), q2.reshape(-1, M))
    skip = skip | (pick < 0)
    pick = torch.clamp(pick, min=0)
    best_k = pick % 4
    L = _levels_from_split(order, i1[pick // 4], i2[pick // 4])
    neg = scale < 0
    L = torch.where(neg[:, None], 2 - L, L)
    scale = torch.where(neg, -scale, scale)
    best_k = torch.where(neg, 3 - best_k, best_k)
    which = torch.stack([best_k >= 2, (best_k % 2) == 1], dim=1).long()  # x_m for the first / second 8
    gi, all_on = _iq1_to_grid(grid, L, xs, ws, scale, which)
    sqx, sq2 = _refit(grid, gi, xs, ws, which)
    scale = torch.where(~all_on & (sqx > 0) & (sq2 > 0), sqx / sq2, scale)
    scale = torch.where(skip, torch.zeros_like(scale), scale)
    gi = torch.where(skip[:, None], torch.zeros_like(gi), gi)
    best_k = torch.where(skip, torch.zeros_like(best_k), best_k)
    which = torch.where(skip[:, None], torch.zeros_like(which), which)
    scale16, gi16 = scale.reshape(nb, 16), gi.reshape(nb, 16, 2)
    max_scale = torch.clamp(scale16.amax(dim=1), min=0.0)
    has = max_scale > 0
    safe = torch.where(has, max_scale, torch.ones_like(max_scale))
    d = safe / _full(safe, 15)
    id_ = torch.ones_like(d) / d
    lv = torch.clamp(_nearest_int((id_[:, None] * scale16 - 1.0) * 0.5), 0, 7)  # [nb, 16]
    # the super-block scale: a weighted fit of all 256 weights to their levels, scales and shifts
    mult = (2 * lv + 1).float().repeat_interleave(16, dim=1).reshape(M, 16)
    tx, t2 = _refit_terms(grid, gi, xs, ws, which, mult)
    sqx, sq2 = _seqsum(tx.reshape(nb, QK_K)), _seqsum(t2.reshape(nb, QK_K))
    d = torch.where(sq2 > 0, sqx / sq2, d)
    u16 = _fp16(d * _full(d, 1.1125)).view(torch.int16).long() & 0xFFFF
    sc = (lv.reshape(nb, 4, 4) << (3 * torch.arange(4, device=x.device))).sum(-1)
    sc = sc | torch.stack([(u16 & 0xF) << 12, (u16 & 0xF0) << 8, (u16 & 0xF00) << 4, u16 & 0xF000], dim=1)
    sc = torch.where(has[:, None], sc, torch.zeros_like(sc))
    masks = torch.tensor([0x00, 0x80, 0x08, 0x88], device=x.device)
    qh = (gi16[..., 0] >> 8) | ((gi16[..., 1] >> 8) << 4)
    qh = torch.where(has[:, None], qh | masks[best_k.reshape(nb, 16)], qh)
    return torch.cat([_u8((gi16 & 255).reshape(nb, 32)), _u8(qh), _u16_bytes(sc)], dim=1)


def _iq1_m_deq(b):
    import torch

    nb = b.shape[0]
    values = _grid("iq1", b.device)["values"]
    qs = b[:, 0:32].long().reshape(nb, 8, 4)
    qh = b[:, 32:48].long().reshape(nb, 8, 2)
    sc = _read_u16(b[:, 48:56])  # [nb, 4]
    u16 = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000)
    d = u16.to(torch.int16).view(torch.float16).float()
    s = torch.arange(16, device=b.device)
    dl = d[:, None] * (2 * ((sc[:, s // 4] >> (3 * (s % 4))) & 7) + 1).float()  # [nb, 16]
    high = torch.stack([qh[..., 0] << 8, qh[..., 0] << 4, qh[..., 1] << 8, qh[..., 1] << 4], dim=2) & 0x700
    idx = qs | high
    flag = torch.stack([qh[..., 0] & 0x08, qh[..., 0] & 0x80, qh[..., 1] & 0x08, qh[..., 1] & 0x80], dim=2)
    delta = torch.where(flag != 0, -IQ1_DELTA, IQ1_DELTA)
    y = dl.reshape(nb, 8, 2)[:, :, :, None, None] * (values[idx].reshape(nb, 8, 2, 2, 8)
                                                      + delta.reshape(nb, 8, 2, 2)[..., None])
    return y.reshape(nb, QK_K)
