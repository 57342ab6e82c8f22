"""GPTQ: Hessian-compensated rounding (Frantar et al., arXiv 2210.17323), for options whose
consumer quantizes with it (GPTQModel, llm-compressor's GPTQModifier, torchao's GPTQ).

Round-to-nearest is mpsearch's default everywhere. ``quantizer="gptq"`` measures damage (and applies
plans) with the rounding those consumers run instead: the columns of a layer's ``[out, in]`` weight
are quantized one by one, and each column's rounding error is spread over the columns not yet
quantized, weighted by the inverse of the layer's input Hessian ``H = 2/n · Σ x xᵀ`` (calibration
inputs of the layer):

- ``H`` gets ``damp · mean(diag H)`` added to its diagonal; inputs that never fire (zero diagonal)
  get 1 there and their weights are set to 0, as the reference implementation does;
- columns are processed in order (no act-order), in blocks of ``block`` columns with the lazy
  batch update of the paper (the result equals the column-by-column OBS recursion, see the tests);
- the scale (and zero-point) of a group is computed when its first column is reached, from the
  group's weights as the previous blocks' updates left them (as the reference implementation and
  GPTQModel do; per-channel options: from the whole row at the start), with exactly the level sets
  of :mod:`mpsearch.quant`.

Only mpsearch's integer options are supported (their scales and levels are explicit here); a
consumer format is refused with a clear message.
"""

from __future__ import annotations


import torch

from .data import move_batch, run_model
from .errors import MpsearchError, QuantizationError
from .layers import get_module
from .options import Option
from .quant import int_grid, round_to_grid, rounding

#: fraction of the mean Hessian diagonal added to it (the reference implementation's ``percdamp``)
DAMP = 0.01
BLOCK = 128


def _qparams(block: torch.Tensor, option: Option):
    """Scale, zero-point and integer range of each row of ``block`` ``[out, g]`` (mpsearch.quant's)."""
    if option.symmetric and option.bits == 1:
        raise QuantizationError("GPTQ needs at least 2 bits (1-bit symmetric has no integer grid)")
    return int_grid(block, option)


def prepare_hessian(H: torch.Tensor, W: torch.Tensor, damp: float = DAMP):
    """Damped ``H`` and ``W`` with dead inputs zeroed; returns (upper Cholesky of H⁻¹, W)."""
    H = H.detach().double().clone()
    W = W.detach().clone().to(torch.float64 if W.dtype == torch.float64 else torch.float32)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += damp * torch.mean(torch.diag(H))
    try:
        L = torch.linalg.cholesky(H)
    except RuntimeError as exc:  # pragma: no cover - damped H of real data is positive definite
        raise QuantizationError(f"GPTQ: the damped input Hessian is not positive definite ({exc})") from None
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    return Hinv.to(W.dtype), W


def gptq_quantize_matrix(W: torch.Tensor, H: torch.Tensor, option: Option, *, block: int = BLOCK,
                         damp: float = DAMP) -> torch.Tensor:
    """GPTQ-quantize a ``[out, in]`` matrix with input Hessian ``H`` ``[in, in]`` (float32 math,
    float64 if ``W`` is float64)."""
    if option.is_keep:
        return W.detach().float().clone()
    if option.fmt is not None:
        raise MpsearchError(
            f"quantizer 'gptq' supports mpsearch's integer options (intB[-gG][-asym]), not the "
            f"consumer format {option.name!r}; use the default round-to-nearest for it"
        )
    out, cols = W.shape
    if H.shape != (cols, cols):
        raise QuantizationError(f"GPTQ: the Hessian is {tuple(H.shape)}, the weight has {cols} columns")
    Hinv, W = prepare_hessian(H.to(W.device), W, damp)
    Q = torch.zeros_like(W)
    g = option.group_size
    params = _qparams(W, option) if g is None else None
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        Wb = W[:, b0:b1].clone()
        Eb = torch.zeros_like(Wb)
        Hb = Hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            i = b0 + j
            if g is not None and i % g == 0:
                # as the reference implementation (and GPTQModel): the group's scale from the
                # weights as the previous blocks' updates left them
                params = _qparams(W[:, i:i + g], option)
            w = Wb[:, j]
            q = round_to_grid(w.unsqueeze(1), *params).squeeze(1)
            Q[:, i] = q
            err = (w - q) / Hb[j, j]
            Wb[:, j:] -= err.unsqueeze(1) * Hb[j, j:].unsqueeze(0)
            Eb[:, j] = err
        W[:, b1:] -= Eb @ Hinv[b0:b1, b1:]
    return Q


def gptq_rounding(hessians: dict[str, torch.Tensor], *, block: int = BLOCK, damp: float = DAMP):
    """A context in which :func:`mpsearch.quant.quantize_weight` of a layer named in ``hessians``
    rounds with GPTQ (estimators and the applier pass layer names); other layers round to nearest."""
    hessians = dict(hessians)

    def rounder(matrix, option, name):
        if name not in hessians:
            return None
        return gptq_quantize_matrix(matrix.float(), hessians[name], option, block=block, damp=damp)

    return rounding(rounder)


def input_hessians(model: torch.nn.Module, layers, batches, device=None, *, progress: bool = False):
    """``{layer: 2/n · Σ x xᵀ}`` over the calibration batches, for Linear-like layers (the inputs
    of a layer seen as rows of its weight matrix's columns)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for lay in layers:
        if lay.kind not in ("linear", "conv1d_hf"):
            raise MpsearchError(
                f"quantizer 'gptq' works on linear layers; {lay.name!r} is a {lay.kind} (exclude it "
                f"or use round-to-nearest)"
            )
        module = get_module(model, lay.name)

        def hook(_mod, args, _out, name=lay.name):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.t() @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                run_model(model, move_batch(batch, device) if device is not None else batch)
    finally:
        for h in handles:
            h.remove()
    missing = [lay.name for lay in layers if lay.name not in sums]
    if missing:
        raise MpsearchError(f"quantizer 'gptq': layer {missing[0]!r} saw no input in the calibration data")
    return {n: 2.0 * s / counts[n] for n, s in sums.items()}
