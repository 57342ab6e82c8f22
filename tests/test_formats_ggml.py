"""llama.cpp's GGML types (mpsearch/formats/ggml.py) against llama.cpp's own output.

The fixtures under tests/fixtures/ggml/ were written by experiments/ggml_fixtures.py with
libggml-base's ``ggml_quantize_chunk`` (no imatrix, as llama-quantize calls it) and ggml's own
dequantizer; the rows are SmolLM2-135M weights, random rows and adversarial rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mpsearch.errors import QuantizationError
from mpsearch.formats import format_names, get_format
from mpsearch.formats import ggml
from mpsearch.options import Option, parse_option
from mpsearch.quant import quantize_matrix

FIXTURES = Path(__file__).parent / "fixtures" / "ggml"
TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K"]

#: bits per weight from the block structs of ggml/src/ggml-common.h (bytes per block * 8 / block)
BPW = {"q8_0": 34 * 8 / 32, "q4_0": 18 * 8 / 32, "q4_1": 20 * 8 / 32, "q5_0": 22 * 8 / 32,
       "q5_1": 24 * 8 / 32, "iq4_nl": 18 * 8 / 32, "q2_K": 84 * 8 / 256, "q3_K": 110 * 8 / 256,
       "q4_K": 144 * 8 / 256, "q5_K": 176 * 8 / 256, "q6_K": 210 * 8 / 256}


@pytest.fixture(scope="module")
def inputs():
    return dict(np.load(FIXTURES / "inputs.npz"))


def _load(name):
    data = np.load(FIXTURES / f"{name}.npz")
    cases = sorted(k[:-3] for k in data.files if k.endswith("__q"))
    return data, cases


def _cases():
    out = []
    for name in TYPES:
        _, cases = _load(name)
        out += [(name, c) for c in cases]
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_every_type_has_fixtures_with_real_and_adversarial_rows():
    for name in TYPES:
        _, cases = _load(name)
        assert "adversarial_256" in cases and "smollm2_down_proj_1536" in cases, name
        if ggml.FORMATS[name].block == 32:
            assert "smollm2_q_proj_576" in cases, name


@pytest.mark.parametrize("name,case", _cases())
def test_quantize_equals_llamacpp_bit_for_bit(name, case, inputs):
    data, _ = _load(name)
    x = torch.from_numpy(inputs[case])
    ref = torch.from_numpy(data[f"{case}__y"])
    got = get_format(name).quantize(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.equal(got, ref)
    assert torch.equal(_bits(got), _bits(ref))  # also the sign of every zero


@pytest.mark.parametrize("name,case", _cases())
def test_bytes_equal_llamacpp(name, case, inputs):
    data, _ = _load(name)
    x = torch.from_numpy(inputs[case])
    got = ggml.to_bytes(name, x)
    ref = torch.from_numpy(data[f"{case}__q"])
    assert got.dtype == torch.uint8
    assert torch.equal(got, ref)


@pytest.mark.parametrize("name,case", _cases())
def test_gguf_py_dequantizes_llamacpp_bytes_to_llamacpp_values(name, case):
    gguf = pytest.importorskip("gguf")
    import gguf.quants

    data, _ = _load(name)
    q, ref = data[f"{case}__q"], data[f"{case}__y"]
    got = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[name.upper()]).astype(np.float32)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
def test_sizes_equal_ggml_row_size(name, inputs):
    data, cases = _load(name)
    fmt = get_format(name)
    for case in cases:
        rows, cols = inputs[case].shape
        row_size = int(data[f"{case}__row_size"])
        assert data[f"{case}__q"].shape == (rows, row_size)
        assert fmt.row_size(cols) == row_size
        assert fmt.size_bits(rows, cols) == 8 * rows * row_size
    assert fmt.size_bits(1, 4096) / 4096 == BPW[name]
    assert fmt.bits_per_weight() == BPW[name]


def test_registered_names_bits_and_sizes():
    assert set(TYPES) <= set(format_names())
    expected_bits = {"q8_0": 8, "q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5, "iq4_nl": 4,
                     "q2_K": 2, "q3_K": 3, "q4_K": 4, "q5_K": 5, "q6_K": 6}
    for name, bits in expected_bits.items():
        opt = parse_option(name)
        assert opt == Option(bits=bits, fmt=name)
        assert opt.format.consumer == "llama.cpp"
        assert parse_option(name.upper()).fmt == name  # names are case-insensitive
        # the option's storage is the format's (K-quants: 4.5, 3.4375... bits per weight)
        assert opt.size_bits(8, 4096) == 8 * 4096 * BPW[name]


@pytest.mark.parametrize("name", TYPES)
def test_check_shape_refuses_what_llamacpp_refuses(name):
    data, _ = _load(name)
    fmt = get_format(name)
    refused = [int(c) for c in data["refused"]]
    assert refused  # the fixture lists column counts ggml's block does not divide
    for cols in refused:
        reason = fmt.check_shape(4, cols)
        assert reason and f"multiple of its block of {fmt.block}" in reason and str(cols) in reason
        with pytest.raises(QuantizationError, match="multiple of its block"):
            fmt.quantize(torch.zeros(2, cols))
        with pytest.raises(QuantizationError, match="cannot take"):
            quantize_matrix(torch.zeros(2, cols), parse_option(name), name="layer.w")
    for cols in (fmt.block, 4 * fmt.block, 1536):
        assert fmt.check_shape(3, cols) is None


def test_fallback_is_llama_quant_cpp_tensor_type_fallback():
    # src/llama-quant.cpp, tensor_type_fallback: q2_K/q3_K -> q4_0, q4_K -> q5_0, q5_K -> q5_1,
    # q6_K -> q8_0; F16 when the 32-block of the replacement does not divide the row either
    assert ggml.FALLBACK == {"q2_K": "q4_0", "q3_K": "q4_0", "q4_K": "q5_0", "q5_K": "q5_1",
                             "q6_K": "q8_0"}
    assert ggml.fallback_type("q4_K", 576) == "q5_0"
    assert ggml.fallback_type("q3_K", 576) == "q4_0"
    assert ggml.fallback_type("q6_K", 1536) == "q6_K"
    assert ggml.fallback_type("q4_K", 48) == "f16"
    assert ggml.fallback_type("q8_0", 100) == "f16"
    assert ggml.fallback_type("iq4_nl", 576) == "iq4_nl"
    assert "q5_0" in get_format("q4_K").check_shape(16, 576)
    with pytest.raises(QuantizationError, match="unknown GGML type"):
        ggml.fallback_type("q7_K", 256)


@pytest.mark.parametrize("name", TYPES)
def test_levels_per_group_within_the_nominal_bits(name, inputs):
    """What the validator checks: at most 2**bits distinct values per ``level_group`` weights."""
    fmt = get_format(name)
    y = fmt.quantize(torch.from_numpy(inputs["normal_2048"]))
    groups = y.reshape(-1, fmt.level_group)
    distinct = max(len(torch.unique(g)) for g in groups)
    assert distinct <= 2 ** fmt.bits
    assert distinct > min(2 ** (fmt.bits - 1), fmt.level_group // 2)  # the levels are used


@pytest.mark.parametrize("name", ["q4_0", "q4_K", "q3_K"])
def test_chunked_passes_give_the_same_values(name, inputs, monkeypatch):
    data, _ = _load(name)
    monkeypatch.setattr(ggml, "_CHUNK_WEIGHTS", 512)  # several passes per row
    x = torch.from_numpy(inputs["normal_2048"])
    assert torch.equal(get_format(name).quantize(x), torch.from_numpy(data["normal_2048__y"]))
    assert torch.equal(ggml.to_bytes(name, x), torch.from_numpy(data["normal_2048__q"]))


def test_quantize_matrix_dispatches_to_the_format_and_keeps_dtype(inputs):
    """mpsearch.quant (the applier's and estimators' quantizer) rounds a q4_K option as llama.cpp."""
    x = torch.from_numpy(inputs["smollm2_down_proj_1536"])
    data, _ = _load("q4_K")
    ref = torch.from_numpy(data["smollm2_down_proj_1536__y"])
    assert torch.equal(quantize_matrix(x, parse_option("q4_K")), ref)
    half = quantize_matrix(x.half(), parse_option("q8_0"))
    assert half.dtype == torch.float16
    assert torch.equal(half, get_format("q8_0").quantize(x.half().float()).half())


def test_refuses_a_non_matrix():
    with pytest.raises(QuantizationError, match="2-D"):
        get_format("q8_0").quantize(torch.zeros(32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", TYPES)
def test_cuda_gives_the_same_values_and_bytes(name, inputs):
    data, cases = _load(name)
    fmt = get_format(name)
    for case in cases:
        x = torch.from_numpy(inputs[case]).cuda()
        got = fmt.quantize(x)
        assert got.device == x.device
        assert torch.equal(_bits(got.cpu()), _bits(torch.from_numpy(data[f"{case}__y"]))), case
        assert torch.equal(ggml.to_bytes(name, x).cpu(), torch.from_numpy(data[f"{case}__q"])), case


def _libggml():
    import importlib.util
    import os

    path = os.environ.get("MPSEARCH_LIBGGML",
                          "/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/libggml-base.so")
    if not Path(path).is_file():
        return None
    spec = importlib.util.spec_from_file_location(
        "ggml_fixtures", Path(__file__).parents[1] / "experiments" / "ggml_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Ggml(path)


@pytest.mark.parametrize("name", TYPES)
def test_fresh_random_rows_against_libggml_when_it_is_built(name):
    """Beyond the fixtures: new random rows (scales 1e-7..1e3, heavy tails, sparse blocks) straight
    against llama.cpp's library, where it is built (set MPSEARCH_LIBGGML; CI reads the fixtures)."""
    lib = _libggml()
    if lib is None:
        pytest.skip("libggml-base.so not built here")
    rng = np.random.default_rng(1234 + TYPES.index(name))
    rows = []
    for scale in (1e-7, 1e-3, 0.02, 1.0, 1e3):
        rows.append(rng.standard_normal(512) * scale)
        rows.append(rng.standard_t(2, 512) * scale)
        rows.append(np.where(rng.random(512) < 0.1, rng.standard_normal(512) * scale, 0.0))
    x = np.stack(rows).astype(np.float32)
    q = lib.quantize(name, x)
    y = lib.dequantize(name, q, x.shape[1])
    got = get_format(name).quantize(torch.from_numpy(x))
    assert torch.equal(_bits(got), _bits(torch.from_numpy(y)))
    assert torch.equal(ggml.to_bytes(name, torch.from_numpy(x)), torch.from_numpy(q))


# ------------------------------------------------------------------------------------------------
# with an importance matrix: tests/fixtures/ggml/imatrix.npz (experiments/ggml_fixtures.py --imatrix),
# ggml_quantize_chunk(type, x, ..., imatrix=w) as llama-quantize --imatrix calls it

IMATRIX = FIXTURES / "imatrix.npz"


@pytest.fixture(scope="module")
def imatrix_data():
    return dict(np.load(IMATRIX))


def _imatrix_cases():
    data = np.load(IMATRIX)
    return sorted(tuple(k[:-3].split("__")) for k in data.files if k.endswith("__q"))


def test_imatrix_fixtures_cover_every_type_with_real_and_4096_wide_rows():
    cases = _imatrix_cases()
    for name in TYPES:
        mine = {c for n, c in cases if n == name}
        assert {"smollm2_down_proj_1536", "random_4096", "adversarial_256", "dead_columns_1024"} <= mine, name
        if ggml.FORMATS[name].block == 32:
            assert "smollm2_q_proj_576" in mine, name


@pytest.mark.parametrize("name,case", _imatrix_cases())
def test_imatrix_bytes_and_values_equal_llamacpp(name, case, imatrix_data):
    x = torch.from_numpy(imatrix_data[f"{case}__x"])
    w = torch.from_numpy(imatrix_data[f"{case}__w"])
    ref = torch.from_numpy(imatrix_data[f"{name}__{case}__q"])
    fmt = get_format(name)
    assert torch.equal(fmt.to_bytes(x, w), ref)
    assert torch.equal(ggml.to_bytes(name, x, weights=w), ref)
    gguf = pytest.importorskip("gguf")
    import gguf.quants

    deq = gguf.quants.dequantize(ref.numpy(), gguf.GGMLQuantizationType[name.upper()]).astype(np.float32)
    assert torch.equal(_bits(fmt.quantize(x, w)), _bits(torch.from_numpy(deq)))


@pytest.mark.parametrize("name", TYPES)
def test_imatrix_changes_the_rounding_except_q8_0(name, imatrix_data):
    """The weighted search is a different rounding (q8_0 ignores the imatrix, as ggml does), and
    weights=None is the no-imatrix path, unchanged."""
    x = torch.from_numpy(imatrix_data["random_4096__x"])
    w = torch.from_numpy(imatrix_data["random_4096__w"])
    fmt = get_format(name)
    plain, weighted = fmt.to_bytes(x), fmt.to_bytes(x, w)
    assert torch.equal(fmt.to_bytes(x, None), plain)
    assert torch.equal(plain, weighted) == (name == "q8_0")


@pytest.mark.parametrize("name", ["q4_0", "q4_K", "q3_K", "q2_K"])
def test_imatrix_chunked_passes_and_expert_stacks(name, imatrix_data, monkeypatch):
    """Chunks of a few blocks give the same bytes (the row statistics span chunks), and a stack of
    experts [E, out, in] with weights [E, in] is each expert with its own weights, as llama-quantize
    slices the imatrix per expert."""
    x = torch.from_numpy(imatrix_data["dead_columns_1024__x"])
    w = torch.from_numpy(imatrix_data["dead_columns_1024__w"])
    ref = torch.from_numpy(imatrix_data[f"{name}__dead_columns_1024__q"])
    fmt = get_format(name)
    monkeypatch.setattr(ggml, "_CHUNK_WEIGHTS", 512)
    assert torch.equal(fmt.to_bytes(x, w), ref)
    x2 = torch.from_numpy(imatrix_data["random_4096__x"])[:, :1024]
    w2 = torch.from_numpy(imatrix_data["random_4096__w"])[:1024]
    stack, ws = torch.stack([x[:4], x2]), torch.stack([w, w2])
    got = fmt.to_bytes(stack, ws)
    assert got.shape == (2, 4, fmt.row_size(1024))
    assert torch.equal(got[0], fmt.to_bytes(x[:4], w)) and torch.equal(got[1], fmt.to_bytes(x2, w2))
    assert torch.equal(fmt.quantize(stack, ws)[1], fmt.quantize(x2, w2))


@pytest.mark.parametrize("name", ["q4_0", "iq4_nl", "q5_1", "q2_K", "q3_K", "q4_K", "q6_K"])
def test_search_passes_of_a_few_blocks_give_the_same_bytes(name, imatrix_data, monkeypatch):
    """The candidate searches run over passes of ~_SEARCH_WEIGHTS weights (their buffers reused,
    the last pass shorter): passes of a few blocks give llama.cpp's bytes, with and without an
    imatrix."""
    from mpsearch.formats import _ggml_arith

    x = torch.from_numpy(imatrix_data["dead_columns_1024__x"])
    w = torch.from_numpy(imatrix_data["dead_columns_1024__w"])
    ref = torch.from_numpy(imatrix_data[f"{name}__dead_columns_1024__q"])
    plain = ggml.to_bytes(name, x)
    monkeypatch.setattr(_ggml_arith, "_SEARCH_WEIGHTS", 700)  # 1..21 blocks per pass, none a divisor
    assert torch.equal(ggml.to_bytes(name, x, w), ref)
    assert torch.equal(ggml.to_bytes(name, x), plain)


@pytest.mark.parametrize("threads", [1, 2])
def test_seqsum_adds_in_c_order_bit_for_bit(threads):
    """The searches' sums (one index_add_ per sum on the CPU) are C's ``float s = 0; for (i...)
    s += t[i];``: the same bits as a loop of float32 additions on sums whose value depends on the
    order (cancellations over 16 orders of magnitude, signed zeros), into dense and strided targets."""
    from mpsearch.formats._ggml_arith import _seqsum, _seqsum_into

    def loop(t):
        acc = torch.zeros(t.shape[1:])
        for row in t:
            acc = acc + row
        return acc

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(7)
        for n in (7, 16, 32):
            t = torch.randn(n, 3, 2000, generator=g) * torch.exp(torch.randn(n, 3, 2000, generator=g) * 8)
            t[torch.rand(t.shape, generator=g) < 0.1] = -0.0
            ref = loop(t)
            assert not torch.equal(_bits(t.sum(dim=0)), _bits(ref))  # the order shows in these sums
            assert torch.equal(_bits(_seqsum_into(torch.empty(3, 2000), t)), _bits(ref))
            wide = torch.full((3, 5000), float("nan"))
            _seqsum_into(wide[:, 1000:3000], t)  # a strided target: only its own columns change
            assert torch.equal(_bits(wide[:, 1000:3000]), _bits(ref)) and wide[:, :1000].isnan().all()
            assert wide[:, 3000:].isnan().all()
            flat = t[:, 0]
            assert torch.equal(_bits(_seqsum(flat.t())), _bits(loop(flat)))
            zeros = torch.full((n, 50), -0.0)  # C starts from +0: a sum of -0s is +0
            assert torch.equal(_bits(_seqsum_into(torch.empty(50), zeros)), _bits(torch.zeros(50)))
    finally:
        torch.set_num_threads(old)


def test_imatrix_weights_are_checked():
    x = torch.zeros(2, 256)
    fmt = get_format("q4_K")
    with pytest.raises(QuantizationError, match=r"shape \[256\]"):
        fmt.quantize(x, torch.ones(128))
    with pytest.raises(QuantizationError, match=r"shape \[3, 256\].*per expert"):
        fmt.quantize(torch.zeros(3, 2, 256), torch.ones(256))
    with pytest.raises(QuantizationError, match="NaN or Inf"):
        fmt.quantize(x, torch.full((256,), float("nan")))


@pytest.mark.parametrize("name", TYPES)
def test_imatrix_fresh_rows_against_libggml_when_it_is_built(name):
    """New random rows and importance vectors (log-normal, zero columns) against llama.cpp's library
    where it is built (set MPSEARCH_LIBGGML; CI reads the fixtures)."""
    lib = _libggml()
    if lib is None:
        pytest.skip("libggml-base.so not built here")
    rng = np.random.default_rng(4321 + TYPES.index(name))
    rows = []
    for scale in (1e-6, 0.02, 1.0, 1e3):
        rows.append(rng.standard_normal(512) * scale)
        rows.append(rng.standard_t(2, 512) * scale)
        rows.append(np.where(rng.random(512) < 0.1, rng.standard_normal(512) * scale, 0.0))
    x = np.stack(rows).astype(np.float32)
    for w in (np.exp(rng.standard_normal(512) * 2), np.where(rng.random(512) < 0.5, 0.0, rng.random(512))):
        w = w.astype(np.float32)
        q = lib.quantize(name, x, w)
        assert torch.equal(ggml.to_bytes(name, torch.from_numpy(x), torch.from_numpy(w)), torch.from_numpy(q))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", TYPES)
def test_imatrix_cuda_gives_the_same_bytes(name, imatrix_data):
    for n, case in _imatrix_cases():
        if n != name:
            continue
        x = torch.from_numpy(imatrix_data[f"{case}__x"]).cuda()
        w = torch.from_numpy(imatrix_data[f"{case}__w"]).cuda()
        got = ggml.to_bytes(name, x, w)
        assert got.device == x.device
        assert torch.equal(got.cpu(), torch.from_numpy(imatrix_data[f"{name}__{case}__q"])), case
