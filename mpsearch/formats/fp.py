"""Floating-point formats (FP8 E4M3, NVFP4, MXFP4) of compressed-tensors (vLLM) and ModelOpt, with their
activation quantization.

These formats quantize the layer's input too (``act_bits < 16``): :meth:`quantize_act` reproduces
the consumer's activation fake-quantization. Where the consumer calibrates a static activation
range (ModelOpt ``fp8``'s per-tensor ``amax``, NVFP4's per-tensor global scale), the format has a
:meth:`calibrate` method that returns that range from calibration activations (the max of
``|x|``, as the consumers' max / static-minmax observers compute it); without one,
``quantize_act`` takes the range of the batch it is given (the dynamic approximation).

Registered names and what they reproduce:

- ``w8a8-fp8``: compressed-tensors ``FP8_DYNAMIC``: FP8 E4M3 weights with one scale per output
  channel (``max|w| / 448``, in the weight dtype), dynamic per-token FP8 activations.
  Storage (``float-quantized``): fp8 weight + 16-bit ``weight_scale [out, 1]``.
- ``nvfp4``: compressed-tensors ``NVFP4``: FP4 E2M1 values in blocks of 16 with FP8 E4M3 block
  scales and an fp32 per-tensor global scale ``448 * 6 / max|w|``; activations the same, with a
  statically calibrated global scale (``input_global_scale``, observer ``static_minmax``) and
  per-block scales computed on the fly. Storage: ``weight_packed`` uint8 ``[out, in/2]`` +
  ``weight_scale`` fp8 ``[out, in/16]`` + ``weight_global_scale`` and ``input_global_scale`` fp32.
- ``mxfp4`` / ``mxfp4-w4a4``: compressed-tensors ``MXFP4A16`` / ``MXFP4``: FP4 E2M1 in groups of
  32 with E8M0 power-of-two scales (``generate_mx_scales``: the group max rounded to a power of two,
  exponent minus 2); ``-w4a4`` quantizes activations the same way, dynamically. Storage
  (``mxfp4-pack-quantized``): ``weight_packed`` uint8 ``[out, in/2]`` + ``weight_scale`` uint8
  ``[out, in/32]``.
- ``fp8``: ModelOpt ``FP8_DEFAULT_CFG``: FP8 E4M3 weights with one per-tensor ``amax``, static
  per-tensor FP8 activations (``amax`` calibrated with the max calibrator). Storage: fp8 weight +
  fp32 ``weight_scale`` + fp32 ``input_scale``.
- ``nvfp4-modelopt``: ModelOpt ``NVFP4_DEFAULT_CFG`` as its export writes it
  (``NVFP4QTensor.quantize``): block scales ``block_amax / (6 * weight_scale_2)`` with
  ``weight_scale_2 = max|w| / (6 * 448)``, clamped to ``[2**-9, 448]`` in FP8. (ModelOpt's own
  fake-quant of NVFP4 runs only on CUDA; on CPU this is checked against ``NVFP4QTensor``.)
  Storage: as ``nvfp4``, with ``weight_scale_2`` and ``input_scale`` fp32.
"""

from __future__ import annotations

from . import Format, Offer, register
from .intq import _cdiv

E4M3_MAX = 448.0
E2M1_MAX = 6.0


def e2m1_round(x):
    """Round to the nearest FP4 E2M1 value (ties to even), as compressed-tensors' ``cast_to_fp4``
    and ModelOpt's ``NVFP4QTensor._cast_fp4`` do; ``|x|`` above 6 gives 6.

    The E2M1 grid is uniform within each binade (steps 0.5 below 2, 1 below 4, 2 up to 6), so
    ``round(|x| / step) * step`` with round-half-to-even is exactly the nearest-even grid value
    (next to a binade edge both steps give the same value, so the step's choice there is moot).
    """
    import torch

    a = torch.clamp(x.abs(), max=E2M1_MAX)
    step = torch.clamp(a, min=1.0).log2_().floor_().clamp_(max=2.0).exp2_().mul_(0.5)
    return a.div_(step).round_().mul_(step).copysign_(x)


class FloatFormat(Format):
    #: the activation range is calibrated once (static) rather than taken from each batch
    act_static = False

    def bits_per_weight(self, in_features: int | None = None) -> float:
        """Storage per weight of a 4096-row layer of ``in_features`` (4096) inputs."""
        n = in_features or 4096
        return self.size_bits(4096, n) / (4096 * n)

    def __init__(self, name: str, bits: int, act_bits: int, level_group, description: str, *,
                 offers=(), consumer_config=None):
        self.name = name
        self.bits = bits
        self.act_bits = act_bits
        self.level_group = level_group
        self.description = description
        self.offers = tuple(offers)
        self.consumer_config = consumer_config

    def calibrate(self, x):
        """The static activation range (``max |x|``, a scalar in ``x``'s dtype) of calibration ``x``."""
        import torch

        return x.detach().abs().amax() if x.numel() else torch.tensor(0.0, dtype=x.dtype)


# ------------------------------------------------------------------------------------------------
# compressed-tensors
# ------------------------------------------------------------------------------------------------

def ct_fp8_qdq(x, scale):
    """compressed-tensors ``_quantize_dequantize`` for FP8 args (symmetric, no zero-point shift)."""
    import torch

    scaled = x / scale
    q = torch.clamp(scaled, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype)
    return q.to(scale.dtype) * scale


def ct_fp8_rowwise(x):
    """compressed-tensors FP8, one scale per row of the last axis (channel / token strategy)."""
    import torch

    mn = torch.clamp(x.amin(-1, keepdim=True), max=0)
    mx = torch.clamp(x.amax(-1, keepdim=True), min=0)
    pos = torch.max(torch.abs(mn), torch.abs(mx))
    bit_range = torch.tensor(E4M3_MAX) - torch.tensor(-E4M3_MAX)
    scale = pos / (bit_range.to(pos.dtype) / 2)
    eps = torch.finfo(scale.dtype).eps
    scale = torch.where(scale == 0, torch.tensor(eps, dtype=scale.dtype), scale)
    return ct_fp8_qdq(x, scale)


def ct_nvfp4_global_scale(amax):
    """compressed-tensors ``generate_gparam``: ``448 * 6 / amax`` (fp32), 1 where undefined."""
    import torch

    amax = torch.clamp(amax, min=torch.finfo(amax.dtype).tiny)
    g = E4M3_MAX * E2M1_MAX / amax
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32).reshape([1])


def ct_nvfp4_qdq(x, global_scale, group: int = 16):
    """compressed-tensors NVFP4 (tensor_group strategy) on the last axis of ``x``."""
    import torch

    shape = x.shape
    v = x.unflatten(-1, (shape[-1] // group, group))
    mn = torch.clamp(v.amin(-1), max=0)
    mx = torch.clamp(v.amax(-1), min=0)
    pos = torch.max(torch.abs(mn), torch.abs(mx))
    bit_range = torch.tensor(E2M1_MAX) - torch.tensor(-E2M1_MAX)
    scales = pos / (bit_range.to(pos.dtype) / 2)
    scales = global_scale * scales
    finfo = torch.finfo(torch.float8_e4m3fn)
    scales = torch.clamp(scales, finfo.min, finfo.max).to(torch.float8_e4m3fn).to(scales.dtype)
    scales = torch.where(scales == 0, torch.tensor(0.125, dtype=scales.dtype), scales)
    scale = (scales / global_scale).unsqueeze(-1)
    scaled = v / scale
    q = e2m1_round(torch.clamp(scaled, -E2M1_MAX, E2M1_MAX)).to(v.dtype)
    out = q.to(scale.dtype) * scale
    return out.flatten(start_dim=-2).to(x.dtype)


class CTFp8Dynamic(FloatFormat):
    consumer = "compressed-tensors"
    idempotent = True

    def quantize(self, matrix):
        return ct_fp8_rowwise(matrix)

    def quantize_act(self, x, amax=None):
        if x.numel() == 0:
            return x
        return ct_fp8_rowwise(x)

    def size_bits(self, out_channels: int, in_features: int) -> int:
        return 8 * out_channels * in_features + 16 * out_channels

    def checkpoint_tensors(self, out_channels: int, in_features: int, dtype: str = "BF16") -> list:
        """``(suffix, safetensors dtype, shape)`` of what llm-compressor saves for one layer."""
        return [("weight", "F8_E4M3", (out_channels, in_features)), ("weight_scale", dtype, (out_channels, 1))]


class CTNvfp4(FloatFormat):
    rows_independent = False  # the fp32 global scale is taken over the whole matrix
    consumer = "compressed-tensors"
    act_static = True  # input_global_scale is calibrated (observer static_minmax)

    def check_shape(self, out_channels: int, in_features: int) -> str | None:
        if in_features % 16:
            return f"NVFP4 needs in_features divisible by 16 (this weight has {in_features})"
        return None

    def quantize(self, matrix):
        return ct_nvfp4_qdq(matrix, ct_nvfp4_global_scale(matrix.abs().amax()))

    def quantize_act(self, x, amax=None):
        if x.numel() == 0 or x.shape[-1] % 16:
            return x
        if amax is None:
            amax = x.detach().abs().amax()
        return ct_nvfp4_qdq(x, ct_nvfp4_global_scale(amax).to(x.device))

    def size_bits(self, out_channels: int, in_features: int) -> int:
        return 8 * out_channels * _cdiv(in_features, 2) + 8 * out_channels * in_features // 16 + 64

    def checkpoint_tensors(self, out_channels: int, in_features: int, dtype: str = "BF16") -> list:
        """``(suffix, safetensors dtype, shape)`` of what llm-compressor saves for one layer."""
        return [("weight_packed", "U8", (out_channels, _cdiv(in_features, 2))),
                ("weight_scale", "F8_E4M3", (out_channels, in_features // 16)),
                ("weight_global_scale", "F32", (1,)), ("input_global_scale", "F32", (1,))]


def ct_mx_scale(pos):
    """compressed-tensors ``generate_mx_scales`` (E2M1 elements) and back to a float scale:
    the group max rounded to a power of two (``round_to_power_2``), its exponent minus 2, as a
    biased E8M0 byte, then ``2 ** (byte - 127)``."""
    import torch

    dtype = pos.dtype
    if dtype == torch.bfloat16:
        int_dtype, mantissa, exponent = torch.uint16, 7, 8
    elif dtype == torch.float16:
        int_dtype, mantissa, exponent = torch.uint16, 10, 5
    elif dtype == torch.float32:
        int_dtype, mantissa, exponent = torch.uint32, 23, 8
    else:
        raise TypeError(f"unsupported dtype {dtype}")
    bits = pos.view(int_dtype).to(torch.int32) if int_dtype in (torch.uint16, torch.uint32) \
        else pos.view(int_dtype).to(torch.int64)
    add = 1 << (mantissa - 1 - 1)  # E2M1 has one mantissa bit
    mask = ((1 << (exponent + 1)) - 1) << mantissa
    p2 = torch.bitwise_and(bits + add, mask)
    p2 = p2.to(int_dtype).view(dtype) if int_dtype is torch.uint16 else p2.view(dtype)
    e = 127 + torch.floor(torch.log2(p2)) - 2
    e = torch.round(torch.clamp(e, 0, 255)).to(torch.uint8).to(dtype)
    scale = (2.00 ** ((e.to(torch.int32) - 127).to(torch.float))).to(dtype)
    return torch.where(scale == 0, torch.tensor(1, dtype=dtype), scale)


def ct_mxfp4_qdq(x, group: int = 32):
    """compressed-tensors MXFP4 (group strategy, E8M0 scales) on the last axis of ``x``."""
    import torch

    shape = x.shape
    v = x.unflatten(-1, (shape[-1] // group, group))
    mn = torch.clamp(v.amin(-1), max=0)
    mx = torch.clamp(v.amax(-1), min=0)
    scale = ct_mx_scale(torch.max(torch.abs(mn), torch.abs(mx))).unsqueeze(-1)
    q = e2m1_round(torch.clamp(v / scale, -E2M1_MAX, E2M1_MAX)).to(v.dtype)
    return (q.to(scale.dtype) * scale).flatten(start_dim=-2).to(x.dtype)


class CTMxfp4(FloatFormat):
    consumer = "compressed-tensors"
    idempotent = True  # power-of-two scales of the group's max: a second pass finds the same ones

    def check_shape(self, out_channels: int, in_features: int) -> str | None:
        if in_features % 32:
            return f"MXFP4 needs in_features divisible by 32 (this weight has {in_features})"
        return None

    def quantize(self, matrix):
        return ct_mxfp4_qdq(matrix)

    def quantize_act(self, x, amax=None):
        if self.act_bits >= 16 or x.numel() == 0 or x.shape[-1] % 32:
            return x
        return ct_mxfp4_qdq(x)

    def size_bits(self, out_channels: int, in_features: int) -> int:
        return 8 * out_channels * _cdiv(in_features, 2) + 8 * out_channels * in_features // 32

    def checkpoint_tensors(self, out_channels: int, in_features: int, dtype: str = "BF16") -> list:
        """``(suffix, safetensors dtype, shape)`` of what llm-compressor saves for one layer."""
        return [("weight_packed", "U8", (out_channels, _cdiv(in_features, 2))),
                ("weight_scale", "U8", (out_channels, in_features // 32))]


def ct_float_args(bits: int, strategy: str, group: int | None = None, dynamic=False, **extra) -> dict:
    """compressed-tensors ``QuantizationArgs`` of a float format, field for field as its presets
    (``PRESET_SCHEMES``) have them."""
    args = {"num_bits": bits, "type": "float", "symmetric": True, "strategy": strategy}
    if group is not None:
        args["group_size"] = group
    args["dynamic"] = dynamic
    return {**args, **extra}


_MX = {"scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8"}
_NV = {"scale_dtype": "torch.float8_e4m3fn"}
# options of --target vllm, not in its default set, listed after its integer formats (rank 0) in
# the order FP8, NVFP4 (rank 1), MXFP4, MXFP4-W4A4 (rank 2)
_VLLM_FP, _VLLM_MX = (Offer("vllm", rank=1),), (Offer("vllm", rank=2),)

register(CTMxfp4("mxfp4", 4, 16, 32,
                 "compressed-tensors MXFP4A16: FP4 E2M1 in groups of 32 with E8M0 (power-of-two) "
                 "scales, 16-bit activations", offers=_VLLM_MX,
                 consumer_config={"weights": ct_float_args(4, "group", 32, **_MX)}))
register(CTMxfp4("mxfp4-w4a4", 4, 4, 32,
                 "compressed-tensors MXFP4: MXFP4A16's weights and dynamic MXFP4 activations "
                 "(groups of 32 along the hidden axis)", offers=_VLLM_MX,
                 consumer_config={"weights": ct_float_args(4, "group", 32, **_MX),
                                  "input_activations": ct_float_args(4, "group", 32, dynamic=True, **_MX)}))
register(CTFp8Dynamic("w8a8-fp8", 8, 8, None,
                      "compressed-tensors FP8_DYNAMIC: FP8 E4M3 weights per output channel, "
                      "dynamic per-token FP8 activations", offers=_VLLM_FP,
                      consumer_config={"weights": ct_float_args(8, "channel"),
                                       "input_activations": ct_float_args(8, "token", dynamic=True)}))
register(CTNvfp4("nvfp4", 4, 4, 16,
                 "compressed-tensors NVFP4 (W4A4): FP4 E2M1 in blocks of 16, FP8 E4M3 block scales, "
                 "fp32 per-tensor global scale; activations with a calibrated global scale", offers=_VLLM_FP,
                 consumer_config={"weights": ct_float_args(4, "tensor_group", 16, **_NV),
                                  "input_activations": ct_float_args(4, "tensor_group", 16, dynamic="local", **_NV,
                                                                     observer="static_minmax")}))


# ------------------------------------------------------------------------------------------------
# ModelOpt
# ------------------------------------------------------------------------------------------------

def modelopt_fp8_qdq(x, amax):
    """modelopt ``tensor_quant._fp8_eager`` (the CPU path of ``scaled_e4m3``)."""
    import torch

    dtype = x.dtype
    amax = amax.to(torch.float32)
    epsilon = 1.0 / (1 << 24)
    safe = torch.where(amax <= epsilon, torch.ones_like(amax), amax)
    scale = 448.0 / safe
    scale_inv = 1 / scale
    y = (x.to(torch.float32) * scale).clamp(min=-448.0, max=448.0)
    y = y.to(torch.float8_e4m3fn)
    return (y.to(torch.float32) * scale_inv).to(dtype)


def modelopt_nvfp4_qdq(x, global_amax, group: int = 16):
    """ModelOpt ``NVFP4QTensor.quantize`` then ``dequantize`` on the last axis of ``x``."""
    import torch

    dtype = x.dtype
    shape = x.shape
    wsf2 = global_amax.float() / (E2M1_MAX * E4M3_MAX)
    v = x.view(*shape[:-1], shape[-1] // group, group)
    block_amax = v.abs().amax(-1).float()
    pbs = block_amax / (E2M1_MAX * wsf2)
    pbs = torch.where(pbs == 0, torch.ones_like(pbs), pbs)
    pbs = pbs.clamp(min=2**-9, max=E4M3_MAX).to(torch.float8_e4m3fn)
    scale = (pbs.to(torch.float32) * wsf2).unsqueeze(-1)
    q = e2m1_round(v / scale)
    out = q.to(torch.float32) * scale
    return out.reshape(shape).to(dtype)


class ModelOptFp8(FloatFormat):
    rows_independent = False  # one per-tensor amax
    consumer = "modelopt"
    act_static = True  # input amax from the max calibrator

    def quantize(self, matrix):
        return modelopt_fp8_qdq(matrix, matrix.abs().amax())

    def quantize_act(self, x, amax=None):
        if x.numel() == 0:
            return x
        if amax is None:
            amax = x.detach().abs().amax()
        return modelopt_fp8_qdq(x, amax.to(x.device))

    def size_bits(self, out_channels: int, in_features: int) -> int:
        return 8 * out_channels * in_features + 64


class ModelOptNvfp4(CTNvfp4):
    consumer = "modelopt"
    checkpoint_tensors = None  # ModelOpt's export writes other tensors than compressed-tensors' NVFP4

    def quantize(self, matrix):
        return modelopt_nvfp4_qdq(matrix, matrix.abs().amax())

    def quantize_act(self, x, amax=None):
        if x.numel() == 0 or x.shape[-1] % 16:
            return x
        if amax is None:
            amax = x.detach().abs().amax()
        return modelopt_nvfp4_qdq(x, amax.to(x.device))


register(ModelOptFp8("fp8", 8, 8, None,
                     "ModelOpt FP8_DEFAULT_CFG: FP8 E4M3 weights with a per-tensor amax, static "
                     "per-tensor FP8 activations (calibrated amax)",
                     offers=(Offer("modelopt", default=True),), consumer_config={"quant_algo": "FP8"}))
register(ModelOptNvfp4("nvfp4-modelopt", 4, 4, 16,
                       "ModelOpt NVFP4_DEFAULT_CFG as exported (NVFP4QTensor): FP4 E2M1 blocks of 16, "
                       "FP8 block scales, fp32 weight_scale_2; activations with a calibrated amax",
                       offers=(Offer("modelopt", default=True),),
                       consumer_config={"quant_algo": "NVFP4", "group_size": 16}))
