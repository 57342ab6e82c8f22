"""llama.cpp's weighted paths for mpsearch.formats.ggml (``llama-quantize --imatrix``):
``quantize_row_<type>_impl(..., quant_weights)`` of ggml-quants.c.
"""

from __future__ import annotations

from ._ggml_arith import (_c_f32, _CHUNK_WEIGHTS, _fp16, _full, _nearest_int, _seqsum, _seqsum_t, _sqrtf,
                          _wrap_u8, GROUP_MAX_EPS, QK_K)
from ._ggml_legacy import _iq4_nl
from ._ggml_kquants import (_k4_scales, _k4_unpack, _make_qkx2_quants, _make_qx_quants, _positive_max,
                            _requantize)

# ---------------------------------------------------------------------------------------------
# with an importance matrix: quantize_row_<type>_impl(..., quant_weights) of ggml-quants.c

#: types whose imatrix weights use the mean square of the whole row (``sum_x2 / n_per_row``)
_ROW_SIGMA2 = ("q4_0", "q4_1", "q5_0", "q5_1")


def _row_sigma2(rows, chunk: int = _CHUNK_WEIGHTS):
    """``float s = 0; for (j...) s += x[j]*x[j]; sigma2 = s/n_per_row;`` for each row ``[rows]``."""
    import torch

    step = max(1, chunk // max(1, rows.shape[1]))
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
