"""Integer weight formats of compressed-tensors (vLLM), torchao, ModelOpt, AutoRound and GPTQModel.

Each format reproduces the consumer's own round-to-nearest arithmetic, step by step and in the
same order (a division is a division, a reciprocal-and-multiply stays one), so that the
dequantized values are bit-identical to the consumer's on the same weights; the tests call the
consumers' code (compressed-tensors 0.20, torchao 0.18, nvidia-modelopt 0.47, auto-round 0.16) on
real MiniLM weights and random matrices. The arithmetic runs in the dtype of the matrix it is
given (mpsearch passes float32), as the consumers compute in the weight's dtype; scales that the
consumer stores in a narrower dtype than the weight (AutoRound's and GPTQModel's fp16) are rounded
to it.

``size_bits`` is the exact storage of the consumer's checkpoint tensors for one layer of a 16-bit
(bf16/fp16) model, per consumer:

- compressed-tensors ``pack-quantized`` (``w4a16-*``, ``w8a16``): ``weight_packed`` int32
  ``[out, ceil(in*b/32)]`` + ``weight_scale`` (weight dtype) ``[out, groups]`` + ``weight_shape``
  int64 ``[2]`` + for asymmetric schemes ``weight_zero_point`` int32 ``[ceil(out*b/32), groups]``
  (``compressors/pack_quantized/base.py``); ``int-quantized`` (``w8a8-int8``): ``weight`` int8 +
  ``weight_scale`` ``[out, 1]`` (``compressors/naive_quantized``).
- torchao: ``qdata`` at the nominal bits (``IntxUnpackedToInt8Tensor`` holds them one per int8 in
  memory; its packed/lowered forms hold ``b`` bits) + ``scale`` + ``zero_point`` int8 per group (stored
  for symmetric configs too); ``int8wo``'s scale is float32 (``Int8Tensor.from_hp``).
- ModelOpt (``export_hf_checkpoint``): ``int4_awq``: uint8-packed int4 + float32 ``weight_scale``
  ``[out, in/128]`` (AWQ's ``pre_quant_scale`` is not stored for this round-to-nearest form, where
  it is 1); ``int8_wo``: int8 + float32 ``weight_scale [out]`` (``get_scaling_factor``: "tensorrt_llm
  uses float as the scaling_factors").
- AutoRound ``auto_round`` format and GPTQModel: ``qweight`` int32 ``[in/32*b, out]`` + ``qzeros``
  int32 ``[groups, out/32*b]`` (stored for symmetric too) + ``scales`` fp16 ``[groups, out]``;
  GPTQModel adds ``g_idx`` int32 ``[in]`` (``auto_round_extension/torch/qlinear_torch.py``,
  ``QuantLinear`` with ``g_idx=True`` for the ``gptqmodel`` backend).
"""

from __future__ import annotations

from . import Format, Offer, register


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class IntFormat(Format):
    """A grouped integer weight format; subclasses implement :meth:`_qdq` on ``[out, n, g]``."""

    #: the consumer needs in_features (and for packed int32 layouts out_features) divisible by this
    align_in: int = 1
    align_out: int = 1
    #: the consumer takes a last, shorter group (zero-padded: the padding cannot move a group's
    #: min(w, 0) / max(w, 0), so it changes no scale)
    partial_groups: bool = False

    def __init__(self, name: str, bits: int, group: int | None, symmetric: bool, description: str,
                 act_bits: int = 16, **settings):
        for key, value in settings.items():  # per-format storage settings the class declares
            if not hasattr(type(self), key):
                raise TypeError(f"{type(self).__name__} has no setting {key!r}")
            setattr(self, key, value)
        self.name = name
        self.bits = bits
        self.group = group
        self.symmetric = symmetric
        self.level_group = group
        self.act_bits = act_bits
        self.description = description

    # -- shape rules and storage ---------------------------------------------------------------
    def bits_per_weight(self, in_features: int | None = None) -> float:
        """Storage per weight of a 4096-row layer of ``in_features`` (4096) inputs (per-layer and
        packed-across-rows tensors make a one-row figure meaningless)."""
        n = in_features or 4096
        return self.size_bits(4096, n) / (4096 * n)

    def n_groups(self, out_channels: int, in_features: int) -> int:
        return 1 if self.group is None else _cdiv(in_features, self.group)

    def check_shape(self, out_channels: int, in_features: int) -> str | None:
        if self.group is not None and in_features % self.group and not self.partial_groups:
            return (f"{self.consumer} needs in_features divisible by the group size {self.group} "
                    f"(this weight has {in_features})")
        if in_features % self.align_in:
            return f"{self.consumer} packs in_features in multiples of {self.align_in} (got {in_features})"
        if out_channels % self.align_out:
            return f"{self.consumer} packs out_features in multiples of {self.align_out} (got {out_channels})"
        return None

    # -- rounding -------------------------------------------------------------------------------
    def quantize(self, matrix):
        import torch

        out, cols = matrix.shape
        g = cols if self.group is None else self.group
        pad = -cols % g
        if pad:
            matrix = torch.nn.functional.pad(matrix, (0, pad))
        x = matrix.reshape(out, (cols + pad) // g, g)
        return self._qdq(x).reshape(out, cols + pad)[:, :cols]

    def _qdq(self, x):  # pragma: no cover
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# compressed-tensors (llm-compressor schemes that vLLM serves)
# ------------------------------------------------------------------------------------------------

def ct_int_qparams(x, bits: int, symmetric: bool):
    """compressed-tensors ``calculate_qparams`` on the min/max of the last axis (its observers)."""
    import torch

    bit_min = torch.tensor(-(2.0**bits) / 2)
    bit_max = torch.tensor(2.0**bits / 2 - 1)
    bit_range = bit_max - bit_min
    mn = x.amin(-1, keepdim=True)
    mx = x.amax(-1, keepdim=True)
    mn = torch.min(mn, torch.zeros_like(mn))
    mx = torch.max(mx, torch.zeros_like(mx))
    if symmetric:
        pos = torch.max(torch.abs(mn), torch.abs(mx))
        scale = pos / (bit_range.to(pos.dtype) / 2)
        zp = None
    else:
        scale = (mx - mn) / bit_range.to(mx.dtype)
        zp = torch.clamp(bit_min - (mn / scale), bit_min, bit_max)
        zp = torch.round(torch.clamp(torch.nan_to_num(zp), -128, 127)).to(torch.int8)
    eps = torch.finfo(scale.dtype).eps
    scale = torch.where(scale == 0, torch.tensor(eps, dtype=scale.dtype), scale)
    return scale, zp, bit_min, bit_max


def ct_int_qdq(x, scale, zp, bit_min, bit_max):
    """compressed-tensors ``_quantize_dequantize`` for integer args."""
    import torch

    scaled = x / scale
    if zp is not None:
        scaled = scaled + zp.to(x.dtype)
    q = torch.round(torch.clamp(scaled, bit_min, bit_max)).to(x.dtype)
    deq = q.to(scale.dtype)
    if zp is not None:
        deq = deq - zp.to(scale.dtype)
    return deq * scale


class CompressedTensorsInt(IntFormat):
    consumer = "compressed-tensors"
    #: "pack-quantized" (int32-packed weight + weight_shape) or "int-quantized" (an int8 weight)
    layout = "pack-quantized"

    def _qdq(self, x):
        scale, zp, lo, hi = ct_int_qparams(x, self.bits, self.symmetric)
        return ct_int_qdq(x, scale, zp, lo, hi)

    def size_bits(self, out_channels: int, in_features: int) -> int:
        n = self.n_groups(out_channels, in_features)
        if self.layout == "int-quantized":  # int8 weight + 16-bit weight_scale per group
            return out_channels * in_features * 8 + out_channels * n * 16
        size = 32 * out_channels * _cdiv(in_features * self.bits, 32) + 16 * out_channels * n + 128
        if not self.symmetric:
            size += 32 * _cdiv(out_channels * self.bits, 32) * n
        return size

    def quantize_act(self, x):
        if self.act_bits >= 16:
            return x
        return ct_token_int8(x)

    def checkpoint_tensors(self, out_channels: int, in_features: int, dtype: str = "BF16") -> list:
        """``(suffix, safetensors dtype, shape)`` of what llm-compressor saves for one layer (scales in
        the model's ``dtype``): the tensors :meth:`size_bits` counts."""
        groups = self.n_groups(out_channels, in_features)
        if self.layout == "int-quantized":
            return [("weight", "I8", (out_channels, in_features)), ("weight_scale", dtype, (out_channels, groups))]
        ts = [("weight_packed", "I32", (out_channels, _cdiv(in_features * self.bits, 32))),
              ("weight_scale", dtype, (out_channels, groups)), ("weight_shape", "I64", (2,))]
        if not self.symmetric:
            ts.append(("weight_zero_point", "I32", (_cdiv(out_channels * self.bits, 32), groups)))
        return ts


def ct_token_int8(x):
    """compressed-tensors' dynamic per-token symmetric int8 activation fake-quantization.

    The scale of each token is ``max|x| / 127.5`` over its hidden features (the last axis), levels
    -128..127: ``compute_dynamic_scales_and_zp`` with ``strategy=token`` on a ``[batch, seq,
    hidden]`` input. (On a 2-D input compressed-tensors falls back to one scale for the tensor;
    vLLM quantizes per row there, which is what this does.)
    """
    if x.numel() == 0:
        return x
    scale, zp, lo, hi = ct_int_qparams(x, 8, True)
    return ct_int_qdq(x, scale, zp, lo, hi).to(x.dtype)


_CT_SPECS = [
    # name, bits, group, symmetric, act_bits, in --target vllm's default set, scheme
    ("w4a16-g128", 4, 128, True, 16, True, "W4A16: int4 symmetric, one scale per 128 inputs (Marlin)"),
    ("w4a16-g32", 4, 32, True, 16, True, "W4A16 with group_size=32"),
    ("w4a16-asym", 4, 128, False, 16, False, "W4A16_ASYM: int4 asymmetric g128 with packed zero-points"),
    ("w8a16", 8, 128, True, 16, True, "W8A16: int8 symmetric g128 weight-only (Marlin)"),
    ("w8a8-int8", 8, None, True, 8, False, "W8A8 (INT8): int8 per-channel weights, dynamic per-token "
                                           "int8 activations"),
]
for _n, _b, _g, _s, _a, _default, _d in _CT_SPECS:
    register(CompressedTensorsInt(_n, _b, _g, _s, f"compressed-tensors {_d}", act_bits=_a,
                                  layout="int-quantized" if _a < 16 else "pack-quantized",
                                  offers=(Offer("vllm", default=_default),)))


# ------------------------------------------------------------------------------------------------
# torchao (quantize_ with Int8WeightOnlyConfig / IntxWeightOnlyConfig, CPU)
# ------------------------------------------------------------------------------------------------

def torchao_int_qdq(x, bits: int, symmetric: bool, *, scale_dtype=None, eps: float | None = None):
    """torchao ``choose_qparams_affine`` + ``quantize_affine`` + ``dequantize_affine`` on the last axis."""
    import torch

    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if eps is None:
        eps = torch.finfo(x.dtype).smallest_normal
    mn = x.amin(-1, keepdim=True)
    mx = x.amax(-1, keepdim=True)
    mn = torch.min(mn, torch.zeros_like(mn))
    mx = torch.max(mx, torch.zeros_like(mx))
    if symmetric:
        pos = torch.max(-mn, mx)
        scale = pos / (float(qmax - qmin) / 2)
        zp = torch.full_like(scale, int((qmax + qmin + 1) / 2))
        scale = torch.clamp(scale, min=eps)
    else:
        scale = torch.clamp((mx - mn) / float(qmax - qmin), min=eps)
        zp = torch.clamp(qmin - torch.round(mn / scale), qmin, qmax)
    scale = scale.to(scale_dtype or x.dtype)
    zp = zp.to(torch.int8)
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zp, qmin, qmax).to(torch.int8)
    deq = q.to(x.dtype) - zp.to(x.dtype)
    return (deq * scale).to(x.dtype)


class TorchaoInt(IntFormat):
    consumer = "torchao"
    #: Int8Tensor (Int8WeightOnlyConfig) keeps float32 scales and a float32 eps; Intx keeps the
    #: weight's dtype and its smallest normal
    float32_scales = False

    def _qdq(self, x):
        import torch

        if self.float32_scales:
            return torchao_int_qdq(x, self.bits, self.symmetric, scale_dtype=torch.float32,
                                   eps=torch.finfo(torch.float32).eps)
        return torchao_int_qdq(x, self.bits, self.symmetric)

    def size_bits(self, out_channels: int, in_features: int) -> int:
        n = self.n_groups(out_channels, in_features)
        scale = 32 if self.float32_scales else 16
        return out_channels * in_features * self.bits + out_channels * n * (scale + 8)


#: ``Int8WeightOnlyConfig()`` as torchao's ``config_to_dict`` writes it (torchao 0.18)
INT8WO_CONFIG = {"_type": "Int8WeightOnlyConfig", "_version": 2,
                 "_data": {"group_size": None, "granularity": {"_type": "PerRow", "_version": 1, "_data": {"dim": -1}},
                           "set_inductor_config": True}}

register(TorchaoInt("int8wo", 8, None, True,
                    "torchao Int8WeightOnlyConfig(): int8 symmetric per output channel, float32 scale",
                    float32_scales=True, consumer_config=INT8WO_CONFIG,
                    offers=(Offer("torchao", rank=1),)))  # listed after the IntxWeightOnlyConfig formats
for _b in range(1, 9):
    for _g in (32, 64, 128):
        for _s in (True, False):
            register(TorchaoInt(
                f"intx-{_b}-g{_g}" + ("" if _s else "-asym"), _b, _g, _s,
                f"torchao IntxWeightOnlyConfig(weight_dtype=torch.int{_b}, granularity=PerGroup({_g}), "
                f"mapping_type=MappingType.{'SYMMETRIC' if _s else 'ASYMMETRIC'})",
                # the default search set: asymmetric groups of 32, 2-6 and 8 bits
                offers=(Offer("torchao", default=_g == 32 and not _s and _b not in (1, 7)),)))


# ------------------------------------------------------------------------------------------------
# ModelOpt (modelopt.torch.quantization fake quantization, calibrated with the "max" algorithm)
# ------------------------------------------------------------------------------------------------

def modelopt_int_qdq(x, bits: int, amax):
    """modelopt ``tensor_quant._tensor_quant`` (narrow range, float32 math) with a given ``amax``."""
    import torch

    dtype = x.dtype
    x = x.float()
    amax = amax.float()
    max_bound = torch.tensor(2.0 ** (bits - 1) - 1.0)
    scale = max_bound / amax
    epsilon = 1.0 / (1 << 24)
    zero = amax <= epsilon
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    out = torch.clamp((x * scale).round_(), -max_bound, max_bound)
    scale = torch.where(zero, torch.ones_like(scale), scale)
    return (out / scale).to(dtype)


class ModelOptInt(IntFormat):
    consumer = "modelopt"
    idempotent = True  # the amax maps to +-max_bound exactly, so a second pass finds the same scale

    def _qdq(self, x):
        return modelopt_int_qdq(x, self.bits, x.abs().amax(-1, keepdim=True))

    def size_bits(self, out_channels: int, in_features: int) -> int:
        n = self.n_groups(out_channels, in_features)
        return out_channels * in_features * self.bits + 32 * out_channels * n


register(ModelOptInt("int4_awq", 4, 128, True,
                     "ModelOpt INT4_AWQ_CFG (W4A16_AWQ, block 128): the round-to-nearest part, "
                     "per-block amax, pre_quant_scale = 1 (no AWQ search), float32 block scales",
                     offers=(Offer("modelopt", default=True),)))
register(ModelOptInt("int8_wo", 8, None, True,
                     "ModelOpt INT8_WEIGHT_ONLY_CFG (W8A16): int8 per output channel, amax = max|w|",
                     offers=(Offer("modelopt", default=True),)))


# ------------------------------------------------------------------------------------------------
# AutoRound (iters=0, disable_opt_rtn=True: quant_tensor_sym / quant_tensor_asym, fp16 scales)
# ------------------------------------------------------------------------------------------------

def autoround_int_qdq(x, bits: int, symmetric: bool, scale_dtype=None, q_scale_thresh: float = 1e-5):
    """auto_round.data_type.int ``quant_tensor_sym`` / ``quant_tensor_asym`` (v=0, min/max_scale=1)."""
    import torch

    scale_dtype = scale_dtype or torch.float16
    t = x.reshape(-1, x.shape[-1])
    wmin = torch.clamp(t.min(-1)[0], max=0)
    wmax = torch.clamp(t.max(-1)[0], min=0)
    if symmetric:
        maxq = int(2.0 ** (bits - 1))
        wmin_abs = -(wmin * 1.0)
        wmax_abs = wmax * 1.0
        max_v = (2 * (wmax_abs < wmin_abs).int() - 1) * torch.max(wmax_abs, wmin_abs)
        scale = (max_v / maxq).to(scale_dtype)
        scale = torch.where(scale < 0, torch.clamp(scale, max=-q_scale_thresh),
                            torch.clamp(scale, min=q_scale_thresh))
        scale = scale.unsqueeze(-1)
        q = torch.clamp(torch.round(t / scale), -maxq, maxq - 1)
        out = (scale * q).to(t.dtype)
    else:
        maxq = int(2.0**bits) - 1
        scale = ((wmax - wmin) / maxq).to(scale_dtype)
        scale = torch.clamp(scale, min=q_scale_thresh)
        zp = torch.round(-wmin / scale)
        scale = scale.unsqueeze(-1)
        zp = zp.unsqueeze(-1)
        q = torch.clamp(torch.round(t / scale) + zp, 0, maxq)
        out = (scale * (q - zp)).to(t.dtype)
    return out.reshape(x.shape)


class AutoRoundInt(IntFormat):
    consumer = "autoround"
    align_in = 32
    align_out = 32
    partial_groups = True  # reshape_pad_tensor_by_group_size pads the last group with zeros

    @property
    def idempotent(self) -> bool:  # symmetric: max / 2**(b-1) maps back to the same scale
        return self.symmetric

    def _qdq(self, x):
        return autoround_int_qdq(x, self.bits, self.symmetric)

    def size_bits(self, out_channels: int, in_features: int) -> int:
        n = self.n_groups(out_channels, in_features)
        return (32 * (in_features // 32 * self.bits) * out_channels
                + 32 * n * (out_channels // 32 * self.bits) + 16 * n * out_channels)


for _b in range(2, 9):
    for _g in (32, 128):
        for _s in (True, False):
            register(AutoRoundInt(
                f"autoround-int{_b}-g{_g}" + ("" if _s else "-asym"), _b, _g, _s,
                f"AutoRound RTN (iters=0, disable_opt_rtn=True) bits={_b}, group_size={_g}, "
                f"sym={_s}, 'auto_round' packing (qweight/qzeros int32, fp16 scales)",
                # AutoRound refuses 8-bit asymmetric layers (unless AR_ALLOW_W8_ASYM=1): not offered
                offers=() if _b == 8 and not _s else
                (Offer("autoround", default=_g == 128 and _s and _b in (2, 3, 4, 8)),)))


# ------------------------------------------------------------------------------------------------
# GPTQModel (RTN of its quantizer, packed GPTQ layout with fp16 scales and g_idx)
# ------------------------------------------------------------------------------------------------

def gptq_int_qdq(x, bits: int, symmetric: bool = True):
    """GPTQModel ``Quantizer.find_params`` + ``quantize`` (round to nearest), dequantized with the
    fp16 scales its packed checkpoint stores."""
    import torch

    maxq = 2**bits - 1
    xmin = torch.clamp(x.amin(-1, keepdim=True), max=0)
    xmax = torch.clamp(x.amax(-1, keepdim=True), min=0)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(both, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if symmetric else torch.round(-xmin / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    s16 = scale.to(torch.float16).to(x.dtype)
    return (s16 * (q - zero)).to(x.dtype)


class GPTQModelInt(IntFormat):
    consumer = "gptqmodel"
    align_in = 32
    align_out = 32

    def _qdq(self, x):
        return gptq_int_qdq(x, self.bits, self.symmetric)

    def size_bits(self, out_channels: int, in_features: int) -> int:
        n = self.n_groups(out_channels, in_features)
        return (32 * (in_features // 32 * self.bits) * out_channels
                + 32 * n * (out_channels // 32 * self.bits) + 16 * n * out_channels
                + 32 * in_features)


for _b in (2, 3, 4, 8):
    register(GPTQModelInt(f"gptq-int{_b}-g128", _b, 128, True,
                          f"GPTQModel bits={_b}, group_size=128, sym=True, round to nearest "
                          f"(no Hessian compensation), packed qweight/qzeros, fp16 scales, g_idx",
                          offers=(Offer("gptqmodel", default=True),)))

del _n, _b, _g, _s, _a, _d, _default
