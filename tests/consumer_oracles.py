"""The consumers' own code, as oracles: ``reference(name, w)`` is what the consumer that defines
format ``name`` computes for weight ``w`` (an ``[out, in]`` float32 or bfloat16 matrix).

Used by tests/test_formats_consumers.py and experiments/consumer_formats_exactness.py. Each oracle
calls the installed consumer: compressed-tensors (llm-compressor's min/max observer, then
``calculate_qparams`` + ``fake_quantize``), torchao (``quantize_`` on an ``nn.Linear``, then
``dequantize``), ModelOpt (``mtq.quantize`` with the max calibrator, then the weight quantizer;
``NVFP4QTensor`` for NVFP4), AutoRound (the function its RTN path picks) and, for GPTQModel (not
installable here), compressed-tensors' codes on the same symmetric grid times fp16 scales.
"""

from __future__ import annotations

import copy
import warnings

import torch

CT_PRESETS = {  # format -> (compressed-tensors preset, group size override)
    "w4a16-g128": ("W4A16", None),
    "w4a16-g32": ("W4A16", 32),
    "w4a16-asym": ("W4A16_ASYM", None),
    "w8a16": ("W8A16", None),
    "w8a8-int8": ("W8A8", None),
    "w8a8-fp8": ("FP8_DYNAMIC", None),
    "nvfp4": ("NVFP4", None),
    "mxfp4": ("MXFP4A16", None),
    "mxfp4-w4a4": ("MXFP4", None),
}
MODELOPT_CONFIGS = {"int4_awq": "INT4_AWQ_CFG", "int8_wo": "INT8_WEIGHT_ONLY_CFG", "fp8": "FP8_DEFAULT_CFG"}


def ct_scheme(name):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

    preset, group = CT_PRESETS[name]
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if group is not None:
        args = QuantizationArgs(**{**scheme.weights.model_dump(), "group_size": group})
        scheme = QuantizationScheme(targets=["Linear"], weights=args)
    return scheme


def ct_observe(w, args):
    """llm-compressor's min/max observer: per group (or per output channel) of the weight."""
    if args.group_size and args.group_size > 0:
        v = w.unflatten(-1, (w.shape[-1] // args.group_size, args.group_size))
        return v.amin(-1), v.amax(-1)
    return w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)


def ct_qparams(w, args):
    """(scale, zero_point, global_scale) as llm-compressor computes them for a weight."""
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    gs = None
    if args.strategy == "tensor_group":
        gs = generate_gparam(w.amin(), w.amax())
    scale, zp = calculate_qparams(*ct_observe(w, args), args, global_scale=gs)
    return scale, zp, gs


def ct_reference(name, w):
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    args = ct_scheme(name).weights
    scale, zp, gs = ct_qparams(w, args)
    return fake_quantize(w, scale, zp, args, global_scale=gs)


def torchao_config(name):
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, MappingType
    from torchao.quantization.granularity import PerGroup

    if name == "int8wo":
        return Int8WeightOnlyConfig()
    _, b, g, *asym = name.split("-")
    return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{b}"), granularity=PerGroup(int(g[1:])),
                                mapping_type=MappingType.ASYMMETRIC if asym else MappingType.SYMMETRIC)


def torchao_quantized_weight(name, w):
    from torchao.quantization import quantize_

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).to(w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    quantize_(lin, torchao_config(name))
    return lin.weight


def torchao_reference(name, w):
    return torchao_quantized_weight(name, w).dequantize()


def modelopt_linear(w, cfg_name, calib):
    """An ``nn.Linear`` holding ``w``, quantized by ModelOpt's ``mtq.quantize`` (max calibration:
    round to nearest; AWQ's search left out)."""
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(getattr(mtq, cfg_name))
    cfg["algorithm"] = "max"
    seq = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False).to(w.dtype))
    with torch.no_grad():
        seq[0].weight.copy_(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(seq, cfg, forward_loop=lambda m: m(calib.to(w.dtype)))
    return seq[0]


def modelopt_reference(name, w, calib=None):
    if name == "nvfp4-modelopt":
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

        qt, s1, s2 = NVFP4QTensor.quantize(w.clone(), 16)
        return qt.dequantize(dtype=w.dtype, scale=s1, double_scale=s2, block_sizes={-1: 16})
    if calib is None:
        calib = torch.randn(4, w.shape[1], generator=torch.Generator().manual_seed(0))
    m = modelopt_linear(w, MODELOPT_CONFIGS[name], calib)
    with torch.no_grad():
        return m.weight_quantizer(m.weight)


def autoround_function(bits, symmetric):
    """The quantization function AutoRound's RTN path (iters=0, disable_opt_rtn=True) picks."""
    from auto_round.data_type.utils import get_quant_func

    return get_quant_func("int", bits, symmetric, disable_opt_rtn=True, iters=0)


def autoround_reference(name, w):
    from mpsearch.formats import get_format

    fmt = get_format(name)
    fn, _ = autoround_function(fmt.bits, fmt.symmetric)
    return fn(w, bits=fmt.bits, group_size=fmt.group)[0]


def gptq_reference(name, w):
    """GPTQ's symmetric grid is compressed-tensors' (scale = 2 max|w| / (2^b - 1), codes
    -2^(b-1)..2^(b-1)-1): its codes times the fp16 scales GPTQModel's checkpoint stores."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    from mpsearch.formats import get_format

    fmt = get_format(name)
    args = QuantizationArgs(num_bits=fmt.bits, type="int", strategy="group", group_size=fmt.group,
                            symmetric=True)
    scale, zp = calculate_qparams(*ct_observe(w, args), args)
    codes = quantize(w, scale, zp, args, dtype=torch.int8).to(w.dtype)
    s16 = scale.to(torch.float16).to(w.dtype).repeat_interleave(fmt.group, dim=1)
    return codes * s16


def reference(name, w):
    """What the consumer of format ``name`` computes for ``w``."""
    from mpsearch.formats import get_format

    consumer = get_format(name).consumer
    if consumer == "compressed-tensors":
        return ct_reference(name, w)
    if consumer == "torchao":
        return torchao_reference(name, w)
    if consumer == "modelopt":
        return modelopt_reference(name, w)
    if consumer == "autoround":
        return autoround_reference(name, w)
    if consumer == "gptqmodel":
        return gptq_reference(name, w)
    raise KeyError(f"no oracle for {name!r} ({consumer})")
