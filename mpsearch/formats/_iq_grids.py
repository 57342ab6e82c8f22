"""The grid i-quants of :mod:`mpsearch.formats.ggml_iq`: IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS.

Each quantizes groups of 4 or 8 weights to points of a fixed grid (gguf-py ships the grids),
with llama.cpp's neighbour lists for level patterns that are not grid points, sign bits per 8
weights and a scale search per sub-block, as ``quantize_row_iq{2,3}_*_impl`` in
ggml/src/ggml-quants.c do it. Kernels take ``[nb, 256]`` blocks and their search weights and
return the GGML bytes; the dequantizers read them back as ``dequantize_row_*`` does."""

from __future__ import annotations

from dataclasses import dataclass

from ._iq_common import (_importance, _read_f16, _read_u16, _read_u32, _sigma2, _sqrtf,
                         _u16_bytes, _u32_bytes)
from .ggml import GROUP_MAX_EPS, QK_K, _c_f32, _full, _fp16, _half_bytes, _nearest_int, _seqsum, _u8


# ---------------------------------------------------------------------------------------------
# grids and their neighbour lists (iq2xs_init_impl / iq3xs_init_impl)

#: type -> (gguf-py class holding the grid, distances kept in a neighbour list: ``nwant``)
_GRID_OF = {"iq3_s": ("IQ3_S", 3), "iq3_xxs": ("IQ3_XXS", 2), "iq2_s": ("IQ2_S", 1),
            "iq2_xs": ("IQ2_XS", 2), "iq2_xxs": ("IQ2_XXS", 2), "iq1": ("IQ1_S", 3)}

_GRID_NUMPY: dict = {}
_GRID_TORCH: dict = {}


def _grid_numpy(kind):
    """The grid of ``kind`` as level indices, its key -> index map and its neighbour lists.

    A grid point of k weights (k = 8 for the 2-bit and 1-bit grids, 4 for the 3-bit ones) is keyed
    ``sum(level_i << bits*i)``. For every key a search can produce (levels 0..2 on the 8-wide
    grids, 0..7 on the 4-wide ones) that is not a grid point, llama.cpp lists the grid points at
    the ``nwant`` smallest squared distances, sorted by (distance, index)."""
    if kind in _GRID_NUMPY:
        return _GRID_NUMPY[kind]
    import numpy as np
    import gguf.quants

    cls_name, nwant = _GRID_OF[kind]
    cls = getattr(gguf.quants, cls_name)
    cls.init_grid()
    values = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    grid_map = np.asarray(cls.grid_map, dtype=np.float32)
    levels = np.argmax(values[..., None] == grid_map, axis=-1)
    n, k = levels.shape
    bits = 2 if k == 8 else 3
    nlev = 3 if k == 8 else 8
    shifts = bits * np.arange(k)
    kmap = np.full(1 << (bits * k), -1, dtype=np.int64)
    kmap[(levels << shifts).sum(1)] = np.arange(n)
    digits = (np.arange(nlev ** k)[:, None] // nlev ** np.arange(k)) % nlev
    keys = (digits << shifts).sum(1)
    off = kmap[keys] < 0
    digits, keys = digits[off], keys[off]
    d2 = ((digits * digits).sum(1)[:, None] + (levels * levels).sum(1)[None, :]
          - 2 * digits @ levels.T)
    # the nwant smallest distinct distances of each key, then its points up to the last of them
    # in (distance, index) order
    big = np.iinfo(d2.dtype).max
    thr = d2.min(axis=1)
    for _ in range(nwant - 1):
        nxt = np.where(d2 > thr[:, None], d2, big).min(axis=1)
        thr = np.where(nxt == big, thr, nxt)
    rows, cols = np.nonzero(d2 <= thr[:, None])
    o = np.lexsort((cols, d2[rows, cols], rows))
    rows, cols = rows[o], cols[o]
    count = np.bincount(rows, minlength=len(keys))
    lists = np.split(cols, np.cumsum(count)[:-1])
    # the lists padded (-1) to a few widths (exact up to 8, then at most ~25% more), one table per
    # width: the key's list is row[key] of table width[key]; beside each table, the offsets
    # i*nlev + level of every listed point's weights (see _best_neighbours)
    step = np.maximum(1, 1 << np.maximum(0, np.floor(np.log2(np.maximum(count, 1))).astype(np.int64) - 2))
    key_width = np.where(count <= 8, count, -(-count // step) * step)
    width = np.zeros(kmap.shape, dtype=np.int64)
    row = np.zeros(kmap.shape, dtype=np.int64)
    tables = {}
    for wdt in np.unique(key_width):
        sel = np.nonzero(key_width == wdt)[0]
        tab = np.full((len(sel), wdt), -1, dtype=np.int64)
        for r, key_row in enumerate(sel):
            tab[r, :count[key_row]] = lists[key_row]
        # coordinate-major ([k, W] per key): the gathered terms of one coordinate are contiguous
        offs = (np.arange(k) * nlev + levels[np.maximum(tab, 0)]).transpose(0, 2, 1).reshape(len(sel), k * wdt)
        tables[int(wdt)] = (tab, offs)
        width[keys[sel]] = wdt
        row[keys[sel]] = np.arange(len(sel))
    out = {"values": values, "levels": levels, "kmap": kmap, "width": width, "row": row,
           "tables": tables, "bits": bits, "k": k, "nlev": nlev}
    _GRID_NUMPY[kind] = out
    return out


def _grid(kind, device):
    """:func:`_grid_numpy` as torch tensors on ``device`` (cached)."""
    import torch

    key = (kind, str(device))
    if key not in _GRID_TORCH:
        g = _grid_numpy(kind)
        t = {name: (torch.from_numpy(v).to(device) if hasattr(v, "dtype") else v) for name, v in g.items()}
        t["tables"] = {wdt: (torch.from_numpy(tab).to(device), torch.from_numpy(offs).to(device))
                       for wdt, (tab, offs) in g["tables"].items()}
        t["levels"] = t["levels"].long()
        t["pos"] = (2 * t["levels"] + 1).float()  # the C grid bytes: 2*level + 1
        t["shifts"] = (g["bits"] * torch.arange(g["k"], device=device)).long()
        _GRID_TORCH[key] = t
    return _GRID_TORCH[key]


def _keys(grid, L):
    """Grid keys of level groups ``L`` ``[G, k]`` (int64)."""
    return (L << grid["shifts"]).sum(1)


def _best_neighbours(grid, keys, xval, w, scale, qlev):
    """The neighbour each off-grid group moves to: for every group (key ``keys[g]``, values
    ``xval[g]``, weights ``w[g]``, scale ``scale[g]``) the first of its neighbour list with the
    smallest ``d2 = sum_i (w_i*diff_i)*diff_i``, ``diff_i = scale*q - xval_i`` where ``q`` is the
    value of the point's level ``i`` in ``qlev`` (``[nlev]``, or ``[G, nlev]`` per group): the C
    ``iq*_find_best_neighbour`` loops.

    Each term takes one of ``nlev`` values per weight, so they are computed once per group
    (``[G, k, nlev]``, in the C order of operations) and gathered for every listed point; the
    sums then run over the k weights in order. Groups are scored in buckets of equal padded list
    length; padding scores +inf, and ``argmin`` takes the first minimum, as the C loop's strict
    ``<`` does."""
    import torch

    G, k = xval.shape
    if G == 0:
        return keys.clone()
    q = qlev if qlev.ndim == 2 else qlev[None, :]
    diff = scale[:, None, None] * q[:, None, :] - xval[:, :, None]
    terms = ((w[:, :, None] * diff) * diff).reshape(G, -1)  # [G, k * nlev]
    widths = grid["width"].index_select(0, keys)
    order = torch.argsort(widths)  # groups of one bucket side by side
    widths = widths.index_select(0, order)
    rows = grid["row"].index_select(0, keys.index_select(0, order))
    terms = terms.index_select(0, order)
    present, counts = torch.unique_consecutive(widths, return_counts=True)
    out = torch.empty_like(keys)
    start = 0
    for wdt, n in zip(present.tolist(), counts.tolist()):
        tab, offs = grid["tables"][wdt]
        r = rows[start:start + n]
        t = terms[start:start + n].gather(1, offs.index_select(0, r)).reshape(-1, k, wdt)
        d2 = t[:, 0]
        for i in range(1, k):
            d2 = d2 + t[:, i]
        cand = tab.index_select(0, r)
        d2 = torch.where(cand >= 0, d2, torch.full_like(d2, float("inf")))
        pick = torch.argmin(d2, dim=1)
        out.index_copy_(0, order[start:start + n], cand.gather(1, pick[:, None]).squeeze(1))
        start += n
    return out


def _assign(grid, l, xval, waux, scale):
    """Levels ``l`` ``[R, n]`` moved onto the grid, group by group of k: a group whose levels are a
    grid point stays, another takes its best neighbour at ``scale`` ``[R]``. Returns (grid index
    ``[R, n/k]``, on-grid flags ``[R, n/k]``)."""
    import torch

    R, n = l.shape
    k = grid["k"]
    ng = n // k
    keys = _keys(grid, l.reshape(R * ng, k))
    gi = grid["kmap"].index_select(0, keys)
    on = gi >= 0
    off = (~on).nonzero().squeeze(1)
    if off.numel():
        xs = xval.reshape(R * ng, k).index_select(0, off)
        ws = waux.reshape(R * ng, k).index_select(0, off)
        sc = scale.index_select(0, off // ng)
        qlev = 2 * torch.arange(grid["nlev"], device=l.device, dtype=torch.float32) + 1  # C: 2*level+1
        gi.index_copy_(0, off, _best_neighbours(grid, keys.index_select(0, off), xs, ws, sc, qlev))
    return gi.reshape(R, ng), on.reshape(R, ng)


def _levels(grid, gi):
    """The level indices of grid points ``gi`` ``[R, m]`` -> ``[R, m * k]``."""
    return grid["levels"].index_select(0, gi.reshape(-1)).reshape(gi.shape[0], -1)


def _signs(xs, ws, parity):
    """Absolute values and sign bytes of sub-blocks ``xs`` ``[M, n]`` (8 weights per sign byte).

    With ``parity`` (iq2_xxs, iq2_xs, iq3_xxs: 7 stored bits, the 8th implied by an even count),
    a group of 8 with an odd number of negatives flips the sign of its weight of least
    ``w*x*x`` (the first such), whose value then enters the search negated."""
    import torch

    M, n = xs.shape
    neg = xs < 0
    xval = torch.where(neg, -xs, xs)
    if parity:
        n8 = neg.reshape(M, n // 8, 8)
        odd = (n8.sum(-1) % 2) == 1
        imin = torch.argmin(((ws * xs) * xs).reshape(M, n // 8, 8), dim=-1)
        flip = odd[..., None] & (torch.arange(8, device=xs.device) == imin[..., None])
        flip = flip.reshape(M, n)
        xval = torch.where(flip, -xval, xval)
        neg = neg ^ flip
    bits = (neg.reshape(M, n // 8, 8).long() << torch.arange(8, device=xs.device)).sum(-1)
    return xval, (bits & 127) if parity else bits


def _sumqx_q2(ws, wx, L):
    """``sumqx += w*xval*q; sumq2 += w*q*q`` with ``q = 2*L + 1`` over each row, in order."""
    q = (2 * L + 1).float()
    return _seqsum(wx * q), _seqsum((ws * q) * q)


@dataclass(frozen=True)
class _Cfg:
    """The settings that tell the iq2/iq3 searches apart (read off ggml-quants.c)."""

    kind: str
    bs: int
    kmaxq: int
    steps: int  # candidates is = -steps..steps, id = (2kMaxQ-1 + is*step)/max
    step: float
    parity: bool
    eps: float | None  # None: a sub-block is skipped when max == 0
    init_on: bool
    requant_all: bool
    qp: bool = False


def _grid_search(x, w, cfg):
    """The sub-block search of quantize_row_iq2_{xxs,xs,s}_impl / iq3_{xxs,s}_impl, all blocks at
    once. ``x``, ``w``: ``[nb, 256]`` weights and search weights. Returns per sub-block (rows of
    ``[nb * 256/bs]``): scale (0 where skipped), grid indices ``[., bs/k]``, sign bytes
    ``[., bs/8]``, the skipped flags."""
    import torch

    grid = _grid(cfg.kind, x.device)
    bs, kmaxq = cfg.bs, cfg.kmaxq
    xs = x.reshape(-1, bs)
    ws = w.reshape(-1, bs)
    M = xs.shape[0]
    waux = _sqrtf(ws)
    xval, signs = _signs(xs, ws, cfg.parity)
    mx = xval.amax(dim=1)
    skip = (mx == 0) if cfg.eps is None else (mx < cfg.eps)
    maxs = torch.where(skip, torch.ones_like(mx), mx)
    wx = ws * xval
    zero = torch.zeros_like(mx)
    if cfg.qp:
        scale = _make_qp_quants(xval, ws, kmaxq + 1)
        eff_max = scale * _full(scale, kmaxq)
        skip = skip | (eff_max <= 0)
        denom = torch.where(skip, torch.ones_like(eff_max), eff_max)
    else:
        scale = maxs / _full(maxs, 2 * kmaxq - 1)
        denom = maxs
    best = zero.clone()
    ng = bs // grid["k"]
    gi = torch.zeros(M, ng, dtype=torch.long, device=x.device)
    on = torch.full((M, ng), cfg.init_on, dtype=torch.bool, device=x.device)
    L = torch.zeros_like(xs, dtype=torch.long)
    for is_ in range(-cfg.steps, cfg.steps + 1):
        c = float(_c_f32(2 * kmaxq - 1) + _c_f32(is_) * _c_f32(cfg.step))
        id_ = _full(denom, c) / denom
        this_scale = torch.ones_like(id_) / id_
        lv = torch.clamp(_nearest_int((id_[:, None] * xval - 1.0) * 0.5), 0, kmaxq - 1).long()
        gaux, on_aux = _assign(grid, lv, xval, waux, this_scale)
        Laux = _levels(grid, gaux)
        sumqx, sumq2 = _sumqx_q2(ws, wx, Laux)
        upd = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        scale = torch.where(upd, sumqx / sumq2, scale)
        best = torch.where(upd, scale * sumqx, best)
        gi = torch.where(upd[:, None], gaux, gi)
        L = torch.where(upd[:, None], Laux, L)
        on = torch.where(upd[:, None], on_aux, on)
    if cfg.qp:  # iq2_xxs tracks no on-grid flags: every group is redone when the scale is positive
        need = scale > 0
    else:
        need = (~on).any(dim=1) & (scale > 0)
    need = need & ~skip
    rows = need.nonzero().squeeze(1)
    if rows.numel():
        sc = scale[rows]
        id_ = torch.ones_like(sc) / sc
        lv = torch.clamp(_nearest_int((id_[:, None] * xval[rows] - 1.0) * 0.5), 0, kmaxq - 1).long()
        gr, _ = _assign(grid, lv, xval[rows], waux[rows], sc)
        redo = torch.ones_like(on[rows]) if (cfg.requant_all or cfg.qp) else ~on[rows]
        gnew = torch.where(redo, gr, gi[rows])
        Lnew = _levels(grid, gnew)
        sumqx, sumq2 = _sumqx_q2(ws[rows], wx[rows], Lnew)
        gi[rows] = gnew
        scale[rows] = torch.where(sumq2 > 0, sumqx / sumq2, sc)
    flip = scale < 0  # "should never happen" in ggml-quants.c: the scale turns positive, the signs flip
    signs = torch.where(flip[:, None], (~signs) & (127 if cfg.parity else 255), signs)
    scale = torch.where(flip, -scale, scale)
    scale = torch.where(skip, zero, scale)
    gi = torch.where(skip[:, None], torch.zeros_like(gi), gi)
    signs = torch.where(skip[:, None], torch.zeros_like(signs), signs)
    return scale, gi, signs, skip


def _make_qp_quants(x, w, nmax):
    """``make_qp_quants(n, nmax, x, L, quant_weights)`` over rows ``x`` ``[M, n]``: the scale.

    ``L`` is ``uint8_t`` in C: a negative level (``x`` holds one negated value per odd group)
    wraps to 255.. and is read back so in the refinement; reproduced."""
    import torch

    mx = torch.clamp(x.amax(dim=1), min=0.0)
    empty = mx < GROUP_MAX_EPS
    mx = torch.where(empty, torch.ones_like(mx), mx)
    wx = w * x
    iscale = _full(mx, nmax) / mx

    def levels(isc):
        return torch.clamp(_nearest_int(isc[:, None] * x), max=nmax)

    def mse(scale_, lev):
        diff = x - scale_[:, None] * lev.float()
        return _seqsum((w * diff) * diff)

    best_mse = mse(torch.ones_like(iscale) / iscale, _nearest_int(iscale[:, None] * x) & 0xFF)
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        isc = _full(mx, float(_c_f32(0.1) * _c_f32(is_) + _c_f32(nmax))) / mx
        cur = mse(torch.ones_like(isc) / isc, levels(isc))
        better = cur < best_mse
        best_mse = torch.where(better, cur, best_mse)
        iscale = torch.where(better, isc, iscale)
    lev = levels(iscale)
    sumlx = _seqsum(wx * lev.float())
    suml2 = _seqsum((w * lev.float()) * lev.float())
    Lc = [(lev[:, i] & 0xFF).float() for i in range(x.shape[1])]
    xs = [x[:, i].contiguous() for i in range(x.shape[1])]
    ws = [w[:, i].contiguous() for i in range(x.shape[1])]
    wxs = [wx[:, i].contiguous() for i in range(x.shape[1])]
    for _ in range(5):  # a pass that changes nothing leaves the state as it is: no early exit needed
        for i in range(x.shape[1]):
            li = Lc[i]
            slx = sumlx - wxs[i] * li
            sl2 = suml2 - (ws[i] * li) * li
            new_l = torch.clamp(_nearest_int((xs[i] * sl2) / slx), max=nmax).float()
            slx2 = slx + wxs[i] * new_l
            sl22 = sl2 + (ws[i] * new_l) * new_l
            acc = ((slx > 0) & (sl2 > 0) & (new_l != li)
                   & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22))
            Lc[i] = torch.where(acc, (new_l.long() & 0xFF).float(), li)
            sumlx = torch.where(acc, slx2, sumlx)
            suml2 = torch.where(acc, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return torch.where(empty, torch.zeros_like(scale), scale)


def _block_scales(scales, fudge, nmax=15):
    """``d = max_scale/31``; the fp16 ``d*fudge``; each sub-block's ``nearest_int(0.5*(scale/d - 1))``
    clamped to 0..nmax. ``scales``: ``[nb, n]``. Returns (max_scale, fp16 d, levels)."""
    import torch

    max_scale = torch.clamp(scales.amax(dim=1), min=0.0)
    has = max_scale > 0
    safe = torch.where(has, max_scale, torch.ones_like(max_scale))
    d = safe / _full(safe, 31)
    d16 = _fp16(torch.where(has, d * _full(d, fudge), torch.zeros_like(d)))
    id_ = torch.ones_like(d) / d
    lv = torch.clamp(_nearest_int((id_[:, None] * scales - 1.0) * 0.5), 0, nmax)
    return max_scale, d16, torch.where(has[:, None], lv, torch.zeros_like(lv))


def _weights_iq3(x, qw):
    """quantize_row_iq3_{xxs,s}_impl / iq2_s's ``weight``: ``qw*sqrtf(sigma2 + x*x)`` with
    ``sigma2 = 2*sumx2/256``, or ``x*x`` (iq2_s: ``0.25f*sigma2 + x*x``) without an imatrix."""
    sigma2 = _sigma2(x, 2.0 / QK_K)
    if qw is None:
        return None, sigma2
    return _importance(x, qw, sigma2), sigma2


# ---------------------------------------------------------------------------------------------
# IQ3_S: 512-point grid of 4, 32-weight sub-blocks, 4-bit scales, 8 sign bits per 8


_IQ3_S = _Cfg("iq3_s", bs=32, kmaxq=8, steps=9, step=0.2, parity=False, eps=None, init_on=False,
              requant_all=True)


def _iq3_s(x, qw):
    import torch

    nb = x.shape[0]
    w, _ = _weights_iq3(x, qw)
    w = x * x if w is None else w
    scale, gi, signs, skip = _grid_search(x, w, _IQ3_S)
    scale, gi, signs, skip = scale.reshape(nb, 8), gi.reshape(nb, 8, 8), signs.reshape(nb, 8, 4), skip.reshape(nb, 8)
    max_scale, d16, lv = _block_scales(scale, 1.033)
    # the C code advances its qs and signs pointers only past sub-blocks it quantized: a skipped
    # (all-zero) sub-block shifts the ones after it down by one slot
    kept = (~skip).long()
    slot = torch.where(skip, torch.full_like(kept, 8), torch.cumsum(kept, 1) - kept)
    qs = torch.zeros(nb, 9, 8, dtype=torch.long, device=x.device)
    qs.scatter_(1, slot[:, :, None].expand(nb, 8, 8), gi & 255)
    sg = torch.zeros(nb, 9, 4, dtype=torch.long, device=x.device)
    sg.scatter_(1, slot[:, :, None].expand(nb, 8, 4), signs)
    qh = ((gi >> 8) << torch.arange(8, device=x.device)).sum(-1)
    sc = (lv[:, 0::2] | (lv[:, 1::2] << 4))
    return torch.cat([_half_bytes(d16), _u8(qs[:, :8].reshape(nb, 64)), _u8(qh),
                      _u8(sg[:, :8].reshape(nb, 32)), _u8(sc)], dim=1)


def _sign_mult(bits, n=8):
    """``bits`` ``[..., m]`` sign bytes -> float ``[..., m, n]`` of +1/-1 (bit j set: -1)."""
    import torch

    j = torch.arange(n, device=bits.device)
    return 1.0 - 2.0 * ((bits[..., None] >> j) & 1).float()


def _iq3_s_deq(b):
    import torch

    nb = b.shape[0]
    grid = _grid("iq3_s", b.device)
    values = grid["values"]
    d = _read_f16(b[:, 0:2])
    qs = b[:, 2:66].long().reshape(nb, 8, 8)
    qh = b[:, 66:74].long()
    signs = b[:, 74:106].long().reshape(nb, 8, 4)
    sc = b[:, 106:110].long()
    ib = torch.arange(8, device=b.device)
    ls = (sc[:, ib // 2] >> (4 * (ib % 2))) & 0xF
    db = d[:, None] * (1 + 2 * ls).float()
    idx = qs | (((qh[:, :, None] >> torch.arange(8, device=b.device)) & 1) << 8)
    g = values[idx].reshape(nb, 8, 4, 8)  # 8 groups of 4 = 4 sign bytes of 8
    y = (db[:, :, None, None] * g) * _sign_mult(signs)
    return y.reshape(nb, QK_K)


# ---------------------------------------------------------------------------------------------
# IQ3_XXS: 256-point grid of 4, 32-weight sub-blocks, 7 sign bits per 8 (+ parity), 4-bit scales


_IQ3_XXS = _Cfg("iq3_xxs", bs=32, kmaxq=8, steps=15, step=0.2, parity=True, eps=1e-8, init_on=True,
                requant_all=False)


def _ksigns(device):
    """ggml's ``ksigns_iq2xs``: 7 stored sign bits -> the 8-bit pattern (the 8th makes the count even)."""
    import torch

    s = torch.arange(128, device=device)
    pop = sum(((s >> j) & 1) for j in range(7))
    return s | ((pop & 1) << 7)


def _iq3_xxs(x, qw):
    import torch

    nb = x.shape[0]
    w, _ = _weights_iq3(x, qw)
    w = x * x if w is None else w
    scale, gi, signs, skip = _grid_search(x, w, _IQ3_XXS)
    scale, gi, signs = scale.reshape(nb, 8), gi.reshape(nb, 8, 8), signs.reshape(nb, 8, 4)
    max_scale, d16, lv = _block_scales(scale, 1.0125)
    words = signs[..., 0] | (signs[..., 1] << 7) | (signs[..., 2] << 14) | (signs[..., 3] << 21) | (lv << 28)
    has = (max_scale > 0)[:, None]
    qs = torch.where(has, gi.reshape(nb, 64), torch.zeros_like(gi.reshape(nb, 64)))
    words = torch.where(has, words, torch.zeros_like(words))
    return torch.cat([_half_bytes(d16), _u8(qs), _u32_bytes(words)], dim=1)


def _iq3_xxs_deq(b):
    import torch

    nb = b.shape[0]
    values = _grid("iq3_xxs", b.device)["values"]
    d = _read_f16(b[:, 0:2])
    qs = b[:, 2:66].long().reshape(nb, 8, 8)
    words = _read_u32(b[:, 66:98])
    db = (d[:, None] * (0.5 + (words >> 28).float())) * 0.5
    ks = _ksigns(b.device)
    signs = ks[(words[:, :, None] >> (7 * torch.arange(4, device=b.device))) & 127]  # [nb, 8, 4]
    g = values[qs].reshape(nb, 8, 4, 8)  # two grid points of 4 per sign byte
    y = (db[:, :, None, None] * g) * _sign_mult(signs)
    return y.reshape(nb, QK_K)


# ---------------------------------------------------------------------------------------------
# IQ2_S: 1024-point grid of 8, 16-weight sub-blocks, 8 sign bits per 8, 4-bit scales


_IQ2_S = _Cfg("iq2_s", bs=16, kmaxq=3, steps=9, step=0.1, parity=False, eps=1e-8, init_on=True,
              requant_all=False)


def _iq2_s(x, qw):
    import torch

    nb = x.shape[0]
    w, sigma2 = _weights_iq3(x, qw)
    if w is None:
        w = (sigma2 * _full(sigma2, 0.25))[:, None] + x * x
    scale, gi, signs, _ = _grid_search(x, w, _IQ2_S)
    scale, gi, signs = scale.reshape(nb, 16), gi.reshape(nb, 32), signs.reshape(nb, 32)
    _, d16, lv = _block_scales(scale, 0.9875)
    qh = ((gi >> 8).reshape(nb, 8, 4) << (2 * torch.arange(4, device=x.device))).sum(-1)
    sc = lv[:, 0::2] | (lv[:, 1::2] << 4)
    return torch.cat([_half_bytes(d16), _u8(gi & 255), _u8(signs), _u8(qh), _u8(sc)], dim=1)


def _iq2_db(d, sc):
    """``db = d * (0.5f + scale) * 0.25f`` for the two 4-bit scales of each byte of ``sc``."""
    import torch

    ls = torch.stack([sc & 0xF, sc >> 4], dim=-1).reshape(sc.shape[0], -1)
    return (d[:, None] * (0.5 + ls.float())) * 0.25


def _iq2_s_deq(b):
    import torch

    nb = b.shape[0]
    values = _grid("iq2_s", b.device)["values"]
    d = _read_f16(b[:, 0:2])
    low = b[:, 2:34].long()
    signs = b[:, 34:66].long()
    qh = b[:, 66:74].long()
    db = _iq2_db(d, b[:, 74:82].long())  # [nb, 16]: one per 16 weights
    high = (qh[:, :, None] >> (2 * torch.arange(4, device=b.device))) & 3
    g = values[low | (high.reshape(nb, 32) << 8)]  # [nb, 32, 8]
    y = (db.repeat_interleave(2, dim=1)[:, :, None] * g) * _sign_mult(signs)
    return y.reshape(nb, QK_K)


# ---------------------------------------------------------------------------------------------
# IQ2_XS and IQ2_XXS: 512- and 256-point grids of 8, 7 sign bits per 8 (+ parity); imatrix required


_IQ2_XS = _Cfg("iq2_xs", bs=16, kmaxq=3, steps=9, step=0.1, parity=True, eps=GROUP_MAX_EPS,
               init_on=True, requant_all=False)
_IQ2_XXS = _Cfg("iq2_xxs", bs=32, kmaxq=3, steps=6, step=0.1, parity=True, eps=GROUP_MAX_EPS,
                init_on=True, requant_all=True, qp=True)


def _weights_iq2(x, qw):
    """quantize_row_iq2_{xxs,xs}_impl's ``weight``: ``qw*sqrtf(sigma2 + x*x)``, ``sigma2 = sumx2/256``."""
    return _importance(x, qw, _sigma2(x, 1.0 / QK_K))


def _iq2_xs(x, qw):
    import torch

    nb = x.shape[0]
    scale, gi, signs, _ = _grid_search(x, _weights_iq2(x, qw), _IQ2_XS)
    scale, gi, signs = scale.reshape(nb, 16), gi.reshape(nb, 32), signs.reshape(nb, 32)
    max_scale, d16, lv = _block_scales(scale, 1.0)
    has = (max_scale > 0)[:, None]
    q2 = torch.where(has, gi | (signs << 9), torch.zeros_like(gi))
    sc = lv[:, 0::2] | (lv[:, 1::2] << 4)
    return torch.cat([_half_bytes(d16), _u16_bytes(q2), _u8(sc)], dim=1)


def _iq2_xs_deq(b):
    nb = b.shape[0]
    values = _grid("iq2_xs", b.device)["values"]
    d = _read_f16(b[:, 0:2])
    q2 = _read_u16(b[:, 2:66])  # [nb, 32]
    db = _iq2_db(d, b[:, 66:74].long())
    signs = _ksigns(b.device)[q2 >> 9]
    y = (db.repeat_interleave(2, dim=1)[:, :, None] * values[q2 & 511]) * _sign_mult(signs)
    return y.reshape(nb, QK_K)


def _iq2_xxs(x, qw):
    import torch

    nb = x.shape[0]
    scale, gi, signs, _ = _grid_search(x, _weights_iq2(x, qw), _IQ2_XXS)
    scale, gi, signs = scale.reshape(nb, 8), gi.reshape(nb, 8, 4), signs.reshape(nb, 8, 4)
    max_scale, d16, lv = _block_scales(scale, 1.0)
    first = gi[..., 0] | (gi[..., 1] << 8) | (gi[..., 2] << 16) | (gi[..., 3] << 24)
    second = signs[..., 0] | (signs[..., 1] << 7) | (signs[..., 2] << 14) | (signs[..., 3] << 21) | (lv << 28)
    words = torch.stack([first, second], dim=-1).reshape(nb, 16)
    words = torch.where((max_scale > 0)[:, None], words, torch.zeros_like(words))
    return torch.cat([_half_bytes(d16), _u32_bytes(words)], dim=1)


def _iq2_xxs_deq(b):
    import torch

    nb = b.shape[0]
    values = _grid("iq2_xxs", b.device)["values"]
    d = _read_f16(b[:, 0:2])
    words = _read_u32(b[:, 2:66]).reshape(nb, 8, 2)
    db = (d[:, None] * (0.5 + (words[..., 1] >> 28).float())) * 0.25
    idx = (words[..., 0:1] >> (8 * torch.arange(4, device=b.device))) & 255
    signs = _ksigns(b.device)[(words[..., 1:2] >> (7 * torch.arange(4, device=b.device))) & 127]
    y = (db[:, :, None, None] * values[idx]) * _sign_mult(signs)
    return y.reshape(nb, QK_K)
