"""llama.cpp's i-quants (IQ4_XS, IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M, IQ1_S) in torch.

What ``llama-quantize`` writes for a tensor of one of these types is ``ggml_quantize_chunk(type,
src, dst, 0, nrows, n_per_row, imatrix)``, which runs ``quantize_<type>`` of
ggml/src/ggml-quants.c on every row with the tensor's importance-matrix column weights (or NULL).
This module redoes those searches in vectorised float32 torch, keeping the C code's order of
operations as :mod:`mpsearch.formats.ggml` does for the other GGML types (sequential sums, the
``nearest_int`` bit trick, ``sqrtf`` taken in float64 and rounded, divisions tensor by tensor, fp16
through ``torch.float16``), and checks them byte for byte against llama.cpp's own output
(tests/test_formats_ggml_iq.py, fixtures from experiments/ggml_iq_fixtures.py).

How the searches are vectorised:

- each candidate scale of a block's search is one pass over *all* blocks at once (the C code
  loops over blocks, then candidates); a pass accepts its candidate where the C test
  ``sumqx*sumqx > best*sumq2`` holds, so the running best is the C one;
- a group of 4 or 8 weights whose rounded levels are not a point of the type's grid is moved to
  its best neighbour (the grid points that ``iq2xs_init_impl`` / ``iq3xs_init_impl`` list for that
  off-grid key, nearest first, ties by index): all (group, neighbour) pairs of a pass are scored
  in one flat tensor and the first minimum of each group is taken with a segmented reduction;
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
from . import register
from .ggml import (GROUP_MAX_EPS, IQ4NL_VALUES, QK_K, GgmlFormat, _c_f32, _first_absmax, _fp16, _full,
                   _half_bytes, _iq4nl_lookup, _iq4nl_tables, _nearest_int, _nibbles_32,
                   _recip_or_zero, _seqsum, _seqsum_t, _u8)

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


# ---------------------------------------------------------------------------------------------
# IQ4_XS: quantize_row_iq4_nl_impl(QK_K, 32, ..., kvalues_iq4nl, qw, ntry=7)


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
        offs = (np.arange(k) * nlev + levels[np.maximum(tab, 0)]).reshape(len(sel), wdt * k)
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
    out = torch.empty_like(keys)
    widths = grid["width"][keys]
    rows = grid["row"][keys]
    for wdt, (tab, offs) in grid["tables"].items():
        sel = (widths == wdt).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        r = rows.index_select(0, sel)
        t = terms.index_select(0, sel).gather(1, offs.index_select(0, r)).reshape(-1, wdt, k)
        d2 = t[..., 0]
        for i in range(1, k):
            d2 = d2 + t[..., i]
        cand = tab.index_select(0, r)
        d2 = torch.where(cand >= 0, d2, torch.full_like(d2, float("inf")))
        pick = torch.argmin(d2, dim=1)
        out[sel] = cand.gather(1, pick[:, None]).squeeze(1)
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
    gi = grid["kmap"][keys]
    on = gi >= 0
    off = (~on).nonzero().squeeze(1)
    if off.numel():
        xs = xval.reshape(R * ng, k)[off]
        ws = waux.reshape(R * ng, k)[off]
        sc = scale.repeat_interleave(ng)[off]
        qlev = 2 * torch.arange(grid["nlev"], device=l.device, dtype=torch.float32) + 1  # C: 2*level+1
        gi[off] = _best_neighbours(grid, keys[off], xs, ws, sc, qlev)
    return gi.reshape(R, ng), on.reshape(R, ng)


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


class _Cfg:
    """The settings that tell the iq2/iq3 searches apart (read off ggml-quants.c)."""

    def __init__(self, kind, bs, kmaxq, steps, step, parity, eps, init_on, requant_all, qp=False):
        self.kind, self.bs, self.kmaxq = kind, bs, kmaxq
        self.steps, self.step = steps, step  # candidates is = -steps..steps, id = (2kMaxQ-1 + is*step)/max
        self.parity, self.eps = parity, eps  # eps None: a sub-block is skipped when max == 0
        self.init_on, self.requant_all, self.qp = init_on, requant_all, qp


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
        Laux = grid["levels"][gaux].reshape(M, bs)
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
        Lnew = grid["levels"][gnew].reshape(-1, bs)
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


# ---------------------------------------------------------------------------------------------
# the formats


class IqFormat(GgmlFormat):
    """One i-quant: super-blocks of 256 weights in ``type_size`` bytes, rounded by llama.cpp's
    search with optional per-column importance weights."""

    def __init__(self, name: str, bits: int, level_group: int, levels: int, description: str):
        self.name = name
        self.bits = bits
        self.block = QK_K
        self.type_size = _TYPE_SIZE[name]
        self.level_group = level_group
        self.levels = levels
        self.description = description
        self.ggml_type = GGML_TYPE[name]
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

#: name -> (nominal bits, weights sharing one scale, distinct values such a group may hold, about)
_SPECS = {
    "iq4_xs": (4, 32, 16, "i-quant: 4-bit non-linear levels, 6-bit scales per 32, fp16 per 256 "
                          "(4.25 bpw)"),
    "iq3_s": (3, 32, 16, "i-quant: 3-bit grid of 4, signs, 4-bit scales per 32, fp16 per 256 "
                         "(3.4375 bpw)"),
    "iq3_xxs": (3, 32, 16, "i-quant: 3-bit grid of 4, 7 sign bits per 8, 4-bit scales per 32, fp16 "
                           "per 256 (3.0625 bpw)"),
    "iq2_s": (2, 16, 6, "i-quant: 2-bit grid of 8 (3 levels), signs, 4-bit scales per 16, fp16 per "
                        "256 (2.5625 bpw)"),
    "iq2_xs": (2, 16, 6, "i-quant: 2-bit grid of 8 (3 levels), 7 sign bits per 8, 4-bit scales per "
                         "16, fp16 per 256 (2.3125 bpw); needs an imatrix"),
    "iq2_xxs": (2, 32, 6, "i-quant: 2-bit grid of 8 (3 levels), 7 sign bits per 8, 4-bit scales per "
                          "32, fp16 per 256 (2.0625 bpw); needs an imatrix"),
    "iq1_m": (1, 16, 6, "i-quant: levels -1/0/1 shifted by 1/8 on a grid of 8, 3-bit scales per 16, "
                        "fp16 split over the scales (1.75 bpw)"),
    "iq1_s": (1, 32, 3, "i-quant: levels -1/0/1 shifted by 1/8 on a grid of 8, 3-bit scales per 32, "
                        "fp16 per 256 (1.5625 bpw); needs an imatrix"),
}

FORMATS: dict[str, IqFormat] = {}
for _name, (_bits, _group, _levels, _desc) in _SPECS.items():
    FORMATS[_name] = register(IqFormat(_name, _bits, _group, _levels, _desc))


def to_bytes(name: str, matrix, weights=None):
    """The GGML bytes of ``matrix`` quantized to i-quant ``name``."""
    return FORMATS[name].to_bytes(matrix, weights)
