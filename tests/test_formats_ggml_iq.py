"""llama.cpp's i-quants (mpsearch/formats/ggml_iq.py) against llama.cpp's own output.

The fixtures under tests/fixtures/ggml_iq/ were written by experiments/ggml_iq_fixtures.py with
libggml-base's ``ggml_quantize_chunk`` (with the importance matrix llama-quantize passes, and
with NULL where the C quantizer allows it) and ggml's own dequantizer; the rows are SmolLM2-135M
``down_proj`` weights under their real importance (mean squared inputs), a 4096-column random
matrix under real importance, Laplace rows and adversarial rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mpsearch.errors import QuantizationError
from mpsearch.formats import format_names, get_format, ggml, ggml_iq
from mpsearch.options import Option, parse_option
from mpsearch.quant import quantize_matrix

FIXTURES = Path(__file__).parent / "fixtures" / "ggml_iq"
TYPES = list(ggml_iq.FORMATS)

#: bytes per 256-weight block, from the block structs of ggml/src/ggml-common.h
BLOCK_BYTES = {"iq4_xs": 2 + 2 + 4 + 128, "iq3_s": 2 + 64 + 8 + 32 + 4, "iq3_xxs": 2 + 96,
               "iq2_s": 2 + 64 + 8 + 8, "iq2_xs": 2 + 64 + 8, "iq2_xxs": 2 + 64,
               "iq1_m": 32 + 16 + 8, "iq1_s": 2 + 32 + 16}
NOMINAL_BITS = {"iq4_xs": 4, "iq3_s": 3, "iq3_xxs": 3, "iq2_s": 2, "iq2_xs": 2, "iq2_xxs": 2,
                "iq1_m": 1, "iq1_s": 1}
#: ggml_quantize_chunk asserts a non-NULL imatrix for these (ggml_quantize_requires_imatrix and the
#: quantizers' GGML_ASSERT(quant_weights))
C_NEEDS_IMATRIX = {"iq2_xxs", "iq2_xs", "iq1_s"}


@pytest.fixture(scope="module")
def inputs():
    return dict(np.load(FIXTURES / "inputs.npz"))


def _load(name):
    data = np.load(FIXTURES / f"{name}.npz")
    cases = sorted(k[:-3] for k in data.files if k.endswith("__q"))
    return data, cases


def _cases(key="__q"):
    out = []
    for name in TYPES:
        data, cases = _load(name)
        out += [(name, c) for c in cases if f"{c}{key}" in data.files]
    return out


def _bits(t) -> torch.Tensor:
    return torch.as_tensor(t).contiguous().view(torch.int32)


def _x_w(inputs, case):
    return torch.from_numpy(inputs[case]), torch.from_numpy(inputs[f"{case}__imatrix"])


def test_every_type_has_real_wide_and_adversarial_fixtures(inputs):
    for name in TYPES:
        data, cases = _load(name)
        for case in ("smollm2_down_proj_0", "smollm2_down_proj_29", "normal_4096", "adversarial_256",
                     "adversarial_256_ones"):
            assert case in cases, (name, case)
            assert (f"{case}__q0" in data.files) == (name not in C_NEEDS_IMATRIX), (name, case)
    assert inputs["normal_4096"].shape[1] == 4096
    imat = inputs["normal_4096__imatrix"]
    assert (imat > 0).all() and imat.max() / np.median(imat) > 10  # a real, uneven importance


@pytest.mark.parametrize("name,case", _cases())
def test_bytes_equal_llamacpp_with_imatrix(name, case, inputs):
    data, _ = _load(name)
    x, w = _x_w(inputs, case)
    got = ggml_iq.to_bytes(name, x, w)
    assert got.dtype == torch.uint8 and got.shape == data[f"{case}__q"].shape
    assert torch.equal(got, torch.from_numpy(data[f"{case}__q"]))


@pytest.mark.parametrize("name,case", _cases())
def test_values_equal_llamacpp_bit_for_bit_with_imatrix(name, case, inputs):
    data, _ = _load(name)
    x, w = _x_w(inputs, case)
    got = get_format(name).quantize(x, w)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.equal(_bits(got), _bits(data[f"{case}__y"]))  # also the sign of every zero


@pytest.mark.parametrize("name,case", _cases("__q0"))
def test_bytes_and_values_equal_llamacpp_without_imatrix(name, case, inputs):
    data, _ = _load(name)
    x = torch.from_numpy(inputs[case])
    ref = torch.from_numpy(data[f"{case}__q0"])
    assert torch.equal(ggml_iq.to_bytes(name, x), ref)
    fmt = get_format(name)
    assert torch.equal(_bits(fmt.quantize(x)), _bits(fmt.dequantize(ref)))


@pytest.mark.parametrize("name,case", _cases())
def test_dequantizer_is_ggmls(name, case):
    data, _ = _load(name)
    got = get_format(name).dequantize(torch.from_numpy(data[f"{case}__q"]))
    assert torch.equal(_bits(got), _bits(data[f"{case}__y"]))


@pytest.mark.parametrize("name", TYPES)
def test_gguf_py_dequantizes_llamacpp_bytes_to_llamacpp_values(name):
    """An independent dequantizer (gguf-py's numpy one) reads the same values from ggml's bytes."""
    gguf = pytest.importorskip("gguf")
    import gguf.quants

    data, cases = _load(name)
    for case in cases:
        q, ref = data[f"{case}__q"], data[f"{case}__y"]
        got = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[name.upper()]).astype(np.float32)
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), case


@pytest.mark.parametrize("name", TYPES)
def test_sizes_are_ggml_block_sizes(name):
    fmt = get_format(name)
    assert fmt.block == 256 and fmt.type_size == BLOCK_BYTES[name]
    assert fmt.row_size(1536) == 6 * BLOCK_BYTES[name]
    assert fmt.size_bits(3, 4096) == 3 * 16 * BLOCK_BYTES[name] * 8
    assert fmt.bits_per_weight() == BLOCK_BYTES[name] * 8 / 256
    opt = parse_option(name.upper())
    assert opt == Option(bits=NOMINAL_BITS[name], fmt=name)
    assert opt.format.consumer == "llama.cpp" and name in format_names()
    assert opt.size_bits(8, 4096) == 8 * 16 * BLOCK_BYTES[name] * 8


@pytest.mark.parametrize("name", TYPES)
def test_shapes_llamacpp_cannot_store_are_refused_naming_its_fallback(name):
    fmt = get_format(name)
    for cols in (32, 576, 1000):
        reason = fmt.check_shape(4, cols)
        assert reason and "multiple of its block of 256" in reason and str(cols) in reason
        with pytest.raises(QuantizationError, match="multiple of its block"):
            fmt.quantize(torch.zeros(2, cols), torch.ones(cols))
        with pytest.raises(QuantizationError, match="cannot take"):
            quantize_matrix(torch.zeros(2, cols), parse_option(name), name="layer.w")
    # src/llama-quant.cpp tensor_type_fallback: every i-quant falls back to iq4_nl, then F16
    assert "iq4_nl" in fmt.check_shape(4, 576)
    assert ggml.fallback_type(name, 576) == "iq4_nl"
    assert ggml.fallback_type(name, 48) == "f16"
    assert ggml.fallback_type(name, 1536) == name
    assert fmt.check_shape(3, 256) is None


@pytest.mark.parametrize("name", TYPES)
def test_the_imatrix_requirement_is_llamacpps(name):
    fmt = get_format(name)
    x = torch.randn(2, 256) * 0.02
    if name in C_NEEDS_IMATRIX:
        assert fmt.needs_imatrix == "c"
        with pytest.raises(QuantizationError, match="--imatrix"):
            fmt.quantize(x)
    else:
        assert fmt.quantize(x).shape == x.shape
    # tensor_requires_imatrix (src/llama-quant.cpp): llama-quantize refuses these without --imatrix
    refused = {"iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq1_m", "iq1_s"}
    assert (fmt.needs_imatrix is not None) == (name in refused)


@pytest.mark.parametrize("name", TYPES)
def test_bad_importance_weights_are_refused(name):
    fmt = get_format(name)
    x = torch.randn(2, 512)
    with pytest.raises(QuantizationError, match="one value per input column"):
        fmt.quantize(x, torch.ones(256))
    with pytest.raises(QuantizationError, match="NaN or Inf"):
        fmt.quantize(x, torch.full((512,), float("nan")))
    with pytest.raises(QuantizationError, match="2-D"):
        fmt.quantize(torch.zeros(256), torch.ones(256))


@pytest.mark.parametrize("name", TYPES)
def test_stacked_experts_take_their_own_importance(name, inputs):
    """A [experts, out, in] tensor: llama.cpp gives each expert its slice of the imatrix."""
    fmt = get_format(name)
    x, w = _x_w(inputs, "laplace_512")
    stacked = torch.stack([x, x.flip(0)])
    ws = torch.stack([w, w.flip(0)])
    got = fmt.quantize(stacked, ws)
    assert torch.equal(got[0], fmt.quantize(x, w))
    assert torch.equal(got[1], fmt.quantize(x.flip(0), w.flip(0)))
    b = fmt.to_bytes(stacked, ws)
    assert b.shape == (2, 4, fmt.row_size(512))
    assert torch.equal(b[1], fmt.to_bytes(x.flip(0), w.flip(0)))
    with pytest.raises(QuantizationError, match="per expert"):
        fmt.quantize(stacked, torch.ones(3, 512))


@pytest.mark.parametrize("name", TYPES)
def test_levels_per_group_within_the_formats_limit(name, inputs):
    """What the validator checks: at most ``max_levels()`` distinct values per scale group."""
    fmt = get_format(name)
    x, w = _x_w(inputs, "normal_4096")
    groups = fmt.quantize(x, w).reshape(-1, fmt.level_group)
    distinct = max(len(torch.unique(g)) for g in groups)
    assert distinct <= fmt.max_levels()
    assert distinct >= min(fmt.max_levels(), fmt.level_group) // 2  # the levels are used


@pytest.mark.parametrize("name", TYPES)
def test_chunked_passes_give_the_same_bytes(name, inputs, monkeypatch):
    data, _ = _load(name)
    monkeypatch.setattr(ggml_iq, "_CHUNK_WEIGHTS", 768)  # 3 blocks a pass: passes cut rows
    x, w = _x_w(inputs, "laplace_512")
    assert torch.equal(ggml_iq.to_bytes(name, x, w), torch.from_numpy(data["laplace_512__q"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", TYPES)
def test_cuda_gives_the_same_bytes_and_values(name, inputs):
    data, cases = _load(name)
    fmt = get_format(name)
    for case in cases:
        x, w = _x_w(inputs, case)
        got = fmt.to_bytes(x.cuda(), w.cuda())
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), torch.from_numpy(data[f"{case}__q"])), case
        assert torch.equal(_bits(fmt.quantize(x.cuda(), w.cuda()).cpu()), _bits(data[f"{case}__y"])), case


def _libggml():
    import importlib.util
    import os

    path = os.environ.get("MPSEARCH_LIBGGML",
                          "/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/libggml-base.so")
    if not Path(path).is_file():
        return None, None
    spec = importlib.util.spec_from_file_location(
        "ggml_iq_fixtures", Path(__file__).parents[1] / "experiments" / "ggml_iq_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, mod.GgmlIq(path)


@pytest.mark.parametrize("name", TYPES)
def test_fresh_random_rows_against_libggml_when_it_is_built(name):
    """Beyond the fixtures: new rows (scales 1e-7..1e3, heavy tails, sparse blocks) under a new
    importance, straight against llama.cpp's library where it is built (CI reads the fixtures)."""
    mod, lib = _libggml()
    if lib is None:
        pytest.skip("libggml-base.so not built here")
    rng = np.random.default_rng(4321 + TYPES.index(name))
    rows = []
    for scale in (1e-7, 1e-3, 0.02, 1.0, 1e3):
        rows.append(rng.standard_normal(512) * scale)
        rows.append(rng.standard_t(2, 512) * scale)
        rows.append(np.where(rng.random(512) < 0.1, rng.standard_normal(512) * scale, 0.0))
    x = np.stack(rows).astype(np.float32)
    w = mod.adversarial_imatrix(512, rng)
    fmt = get_format(name)
    for qw in (w, None):
        if qw is None and name in C_NEEDS_IMATRIX:
            continue
        q = lib.quantize(name, x, qw)
        y = lib.dequantize(name, q, x.shape[1])
        tw = None if qw is None else torch.from_numpy(qw)
        assert torch.equal(ggml_iq.to_bytes(name, torch.from_numpy(x), tw), torch.from_numpy(q))
        assert torch.equal(_bits(fmt.quantize(torch.from_numpy(x), tw)), _bits(y))


@pytest.mark.parametrize("kind,nwant", [("iq3_xxs", 2), ("iq3_s", 3), ("iq2_xxs", 2), ("iq2_s", 1)])
def test_neighbour_lists_are_iq2xs_iq3xs_init_impls(kind, nwant):
    """Brute force from the definition in ggml-quants.c: for a key that is not a grid point, the grid
    points at its ``nwant`` smallest squared distances (positions 2*level+1), by (distance, index)."""
    import itertools

    from mpsearch.formats._iq_grids import _grid_numpy

    g = _grid_numpy(kind)
    levels, k, bits = g["levels"], g["k"], g["bits"]
    nlev = 3 if k == 8 else 8
    rng = np.random.default_rng(0)
    combos = list(itertools.product(range(nlev), repeat=k))
    for idx in rng.choice(len(combos), 300, replace=False):
        lv = np.array(combos[idx])
        key = int((lv << (bits * np.arange(k))).sum())
        on = np.nonzero((levels == lv).all(1))[0]
        if on.size:
            assert g["kmap"][key] == on[0]
            continue
        assert g["kmap"][key] == -1
        pos, grid_pos = 2 * lv + 1, 2 * levels + 1
        d2 = ((grid_pos - pos) ** 2).sum(1)
        keep = d2 <= np.unique(d2)[:nwant].max()
        want = sorted(np.nonzero(keep)[0], key=lambda j: (d2[j], j))
        tab, _ = g["tables"][int(g["width"][key])]
        got = [int(v) for v in tab[g["row"][key]] if v >= 0]
        assert got == want
