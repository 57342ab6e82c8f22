"""llama.cpp's built-in mixes, re-implemented, against what the real llama-quantize wrote.

The fixture tests/fixtures/llamacpp/mixes.json is made by experiments/llamacpp_fixtures.py, which
runs llama-quantize (llama-cpp-python 0.3.36's vendored llama.cpp) on SmolLM2-135M and on a random
Llama with hidden 256, and reads each output's tensor types with gguf-py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpsearch.errors import MpsearchError
from mpsearch.targets.llamacpp_mixes import (
    FTYPES, GGML_TYPES, allows_quantization, canonical_ftype, mix_nbytes, mix_types,
    tensor_order, type_nbytes)

FIXTURE = json.loads(
    (Path(__file__).parent / "fixtures" / "llamacpp" / "mixes.json").read_text())
MODELS = FIXTURE["models"]
#: tiny random Qwen3-MoE, Qwen2-MoE (shared experts) and OLMoE, converted by llama.cpp's
#: convert_hf_to_gguf.py and quantized by llama-quantize (experiments/llamacpp_fixtures.py --moe)
MOE_FIXTURE = json.loads(
    (Path(__file__).parent / "fixtures" / "llamacpp" / "moe_mixes.json").read_text())
MOE_MODELS = MOE_FIXTURE["models"]
CASES = ([(key, f) for key in sorted(MODELS) for f in FIXTURE["ftypes"]]
         + [(key, f) for key in sorted(MOE_MODELS) for f in MOE_FIXTURE["ftypes"]])


def _call(model, ftype, **kw):
    return mix_types(ftype, model["tensors"], arch=model["arch"], n_layer=model["n_layer"],
                     n_head=model["n_head"], n_head_kv=model["n_head_kv"],
                     n_expert=model["n_expert"], **kw)


@pytest.mark.parametrize("key, ftype", CASES)
def test_mix_equals_llama_quantize(key, ftype):
    model = MODELS.get(key) or MOE_MODELS[key]
    names = [n for n, _ in model["tensors"]]
    real = dict(zip(names, model["mixes"][ftype]))
    given = dict(zip(names, model["input_types"]))
    got = _call(model, ftype)
    wrong = {n: (got[n], real[n]) for n in got if got[n] != real[n]}
    assert not wrong, f"{key} {ftype}: (ours, llama-quantize) differ on {wrong}"
    # every tensor left out is one llama-quantize copied unchanged, and every tensor whose type
    # llama-quantize changed is typed by us
    for n in names:
        if n not in got:
            assert real[n] == given[n], n
        if real[n] != given[n]:
            assert n in got, n
    if not model["n_expert"]:
        assert len(got) >= len(names) * 0.7


def test_moe_fixture_reaches_the_moe_rules():
    """The MoE fixture is not trivial: stacked experts are typed per tensor, routers and the
    shared-expert gate stay f32, llama.cpp's 8-expert rules and 3-D fallbacks show."""
    def types(key, ftype):
        m = MOE_MODELS[key]
        return dict(zip([n for n, _ in m["tensors"]], m["mixes"][ftype]))

    shapes = {k: dict((n, tuple(s)) for n, s in m["tensors"]) for k, m in MOE_MODELS.items()}
    q3 = types("qwen3moe_8x256", "Q4_K_M")
    assert shapes["qwen3moe_8x256"]["blk.0.ffn_down_exps.weight"] == (8, 256, 256)
    # use_more_bits(i, 8) on ffn_down_exps: layers 0, 7 and (i - 1) % 3 == 2 -> 3, 6
    six = sorted(int(n.split(".")[1]) for n, t in q3.items()
                 if n.endswith("ffn_down_exps.weight") and t == "q6_K")
    assert six == [0, 3, 6, 7]
    assert q3["blk.0.attn_v.weight"] == "q8_0" and q3["blk.0.attn_k.weight"] == "q8_0"  # 8 experts
    assert q3["blk.0.ffn_gate_inp.weight"] == "f32"
    q2 = types("qwen2moe_4x320_shared", "Q4_K_M")
    assert q2["blk.0.ffn_gate_inp_shexp.weight"] == "f32"  # (1, 256): 1-D to ggml, kept
    assert shapes["qwen2moe_4x320_shared"]["blk.0.ffn_gate_inp_shexp.weight"] == (1, 256)
    assert q2["blk.0.ffn_down_exps.weight"] in ("q5_0", "q8_0")  # 320 columns: K-quant falls back
    assert q2["blk.0.ffn_up_shexp.weight"] == "q4_K"
    ol = types("olmoe_16x128", "Q4_K_M")
    assert ol["blk.0.attn_v.weight"] == "q6_K"  # 16 experts: the dense rule
    mx = types("olmoe_16x128", "MXFP4_MOE")
    assert mx["blk.0.ffn_up_exps.weight"] == "mxfp4" and mx["blk.0.attn_q.weight"] == "q8_0"
    assert {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"} <= {
        n.split(".")[2] for n in q3 if n.startswith("blk.")}


def test_moe_tensor_type_file_overrides_as_llama_quantize():
    ov = MOE_FIXTURE["overrides"]
    model = MOE_MODELS[ov["model"]]
    pairs = [tuple(line.split("=", 1)) for line in ov["tensor_types"]]
    got = _call(model, ov["ftype"], tensor_types=pairs,
                token_embedding_type=ov["token_embedding_type"],
                output_tensor_type=ov["output_tensor_type"])
    names = [n for n, _ in model["tensors"]]
    real = dict(zip(names, ov["types"]))
    assert {n: real[n] for n in got} == got
    for pat, t in pairs:  # 256 columns everywhere: every stacked expert tensor took its type
        name = pat.strip("^$").replace("\\.", ".")
        assert real[name] == t, name
    assert real["token_embd.weight"] == "q4_K" and real["output.weight"] == "q5_K"


def test_ggml_n_dims():
    from mpsearch.targets.llamacpp_mixes import ggml_n_dims

    assert ggml_n_dims((1, 256)) == 1 and ggml_n_dims((256,)) == 1
    assert ggml_n_dims((2, 256)) == 2 and ggml_n_dims((1, 4, 256)) == 2
    assert ggml_n_dims((8, 1, 256)) == 3 and ggml_n_dims((1, 1)) == 1
    assert not allows_quantization("blk.0.ffn_gate_inp_shexp.weight", (1, 256))
    assert allows_quantization("blk.0.ffn_up_exps.weight", (8, 256, 256))
    assert not allows_quantization("blk.0.ffn_gate_inp.weight", (8, 256))


@pytest.mark.parametrize("key", sorted(MODELS))
@pytest.mark.parametrize("ftype", FIXTURE["imatrix_ftypes"])
def test_mix_with_imatrix_equals_llama_quantize(key, ftype):
    """The same choice with ``--imatrix`` (llama-quantize --dry-run with an importance matrix)."""
    model = MODELS[key]
    names = [n for n, _ in model["tensors"]]
    real = dict(zip(names, model["mixes_imatrix"][ftype]))
    got = _call(model, ftype, has_imatrix=True)
    wrong = {n: (got[n], real[n]) for n in got if got[n] != real[n]}
    assert not wrong, f"{key} {ftype} --imatrix: (ours, llama-quantize) differ on {wrong}"
    assert set(got) <= set(names)


def test_the_imatrix_changes_the_mixes_that_read_it():
    from mpsearch.targets.llamacpp_mixes import IQ_FTYPES

    assert set(IQ_FTYPES) <= set(FIXTURE["ftypes"]) and set(IQ_FTYPES) <= set(FIXTURE["imatrix_ftypes"])
    smol = MODELS["smollm2"]  # the first ffn_down tensors get more bits without an imatrix
    names = [n for n, _ in smol["tensors"]]
    for ftype, plain_t, imat_t in (("IQ3_XXS", "q4_K", "iq3_xxs"), ("IQ4_XS", "q5_K", "iq4_xs"),
                                   ("Q4_0", "q4_0", "q4_1")):
        plain = dict(zip(names, smol["mixes"][ftype]))
        imat = dict(zip(names, smol["mixes_imatrix"][ftype]))
        assert (plain["blk.0.ffn_down.weight"], imat["blk.0.ffn_down.weight"]) == (plain_t, imat_t)


def test_every_type_of_every_mix_has_a_bit_exact_quantizer():
    """Every mix llama.cpp builds is a plan mpsearch can measure: each tensor type is a format."""
    from mpsearch.formats import get_format

    for model in MODELS.values():
        for key in ("mixes", "mixes_imatrix"):
            for ftype, types in model[key].items():
                for t in set(types) - {"f32", "f16", "bf16"}:
                    fmt = get_format(t)
                    assert fmt is not None and fmt.consumer == "llama.cpp", (ftype, t)


def test_fixture_covers_the_requested_ftypes_and_real_mixes():
    for f in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
              "Q6_K", "Q8_0", "Q4_0"):
        assert f in FIXTURE["ftypes"] and f in FTYPES
    # the fixture is not trivial: the mixes do mix, and the two models differ (fallbacks)
    small, smol = MODELS["random_llama_256"], MODELS["smollm2"]
    assert len(set(small["mixes"]["Q4_K_M"])) >= 4
    smol_q = dict(zip([n for n, _ in smol["tensors"]], smol["mixes"]["Q4_K_M"]))
    small_q = dict(zip([n for n, _ in small["tensors"]], small["mixes"]["Q4_K_M"]))
    assert small_q["blk.3.attn_q.weight"] == "q4_K"  # 256 columns: the K-quant fits
    assert smol_q["blk.3.attn_q.weight"] == "q5_0"   # 576 columns: llama.cpp's fallback
    assert "output.weight" in [n for n, _ in small["tensors"]]
    assert "output.weight" not in [n for n, _ in smol["tensors"]]


def test_tensor_type_file_overrides_as_llama_quantize():
    ov = FIXTURE["overrides"]
    model = MODELS[ov["model"]]
    pairs = [tuple(line.split("=", 1)) for line in ov["tensor_types"]]
    got = _call(model, ov["ftype"], tensor_types=pairs,
                token_embedding_type=ov["token_embedding_type"])
    names = [n for n, _ in model["tensors"]]
    real = dict(zip(names, ov["types"]))
    assert {n: real[n] for n in got} == got
    # the hand-written file asked for these exact types and got them (no fallback needed)
    for pat, t in pairs:
        name = pat.strip("^$").replace("\\.", ".")
        assert real[name] == t, name
    assert real["token_embd.weight"] == "q4_0"


def test_fallback_rules_of_the_issue():
    # llama.cpp's fallback for K-quants on 576 columns (issue 10): q2_K/q3_K -> q4_0,
    # q4_K -> q5_0, q5_K -> q5_1, q6_K -> q8_0; 1536 columns take K-quants as asked
    tensors = [("blk.0.attn_q.weight", (576, 576)), ("blk.0.ffn_down.weight", (576, 1536))]
    for want, fb in (("q2_K", "q4_0"), ("q3_K", "q4_0"), ("q4_K", "q5_0"), ("q5_K", "q5_1"),
                     ("q6_K", "q8_0"), ("q8_0", "q8_0"), ("q4_1", "q4_1")):
        got = mix_types("Q8_0", tensors, n_layer=1, n_head=9, n_head_kv=3,
                        tensor_types=[("blk", want)])
        assert got == {"blk.0.attn_q.weight": fb, "blk.0.ffn_down.weight": want}
    # a column count no 32-block type divides becomes f16
    got = mix_types("Q4_K_M", [("blk.0.attn_q.weight", (64, 100))], n_layer=1, n_head=1,
                    n_head_kv=1)
    assert got == {"blk.0.attn_q.weight": "f16"}


def test_q4_k_m_use_more_bits_by_hand():
    # Q4_K_M gives ffn_down q6_K where use_more_bits(i, n): i < n/8, i >= 7n/8, (i - n/8) % 3 == 2.
    n = 16
    tensors = [(f"blk.{i}.ffn_down.weight", (256, 256)) for i in range(n)]
    got = mix_types("Q4_K_M", tensors, n_layer=n, n_head=4, n_head_kv=4)
    six = sorted(int(k.split(".")[1]) for k, v in got.items() if v == "q6_K")
    assert six == [0, 1, 4, 7, 10, 13, 14, 15]
    assert set(got.values()) == {"q4_K", "q6_K"}


def test_order_and_quantizable():
    assert tensor_order(["blk.10.a.weight", "blk.2.b.weight", "token_embd.weight",
                         "blk.2.a.weight", "output.weight"]) == [
        "output.weight", "token_embd.weight", "blk.2.a.weight", "blk.2.b.weight",
        "blk.10.a.weight"]
    assert not allows_quantization("blk.0.attn_norm.weight", (576, 1))
    assert not allows_quantization("blk.0.attn_q.bias", (576, 576))
    assert not allows_quantization("blk.0.attn_q.weight", (576,))
    assert allows_quantization("blk.0.attn_q.weight", (576, 576))
    assert not allows_quantization("output.weight", (10, 32), quantize_output_tensor=False)


def test_type_sizes_match_gguf_py():
    gguf = pytest.importorskip("gguf")
    for t, (block, nbytes) in GGML_TYPES.items():
        q = getattr(gguf.GGMLQuantizationType, t.upper(), None)
        if q is None:  # Q2_0 is newer than the installed gguf-py
            continue
        assert gguf.GGML_QUANT_SIZES[q] == (block, nbytes), t
    # q4_K is 4.5 bits per weight, q3_K 3.4375, q6_K 6.5625, q8_0 8.5 (issue 10)
    for t, bpw in (("q4_K", 4.5), ("q3_K", 3.4375), ("q6_K", 6.5625), ("q8_0", 8.5),
                   ("q2_K", 2.625)):
        assert type_nbytes(t, (4, 1024)) * 8 / 4096 == bpw
    assert mix_nbytes({"a": "q8_0"}, [("a", (2, 64)), ("b", (2, 64))]) == 2 * 2 * 34


@pytest.mark.parametrize("call, match", [
    (lambda: mix_types("Q4_K_X", [("a.weight", (32, 32))], n_layer=1, n_head=1, n_head_kv=1),
     "unknown llama.cpp mix 'Q4_K_X'.*did you mean"),
    (lambda: mix_types("Q4_K_M", [], n_layer=1, n_head=1, n_head_kv=1), "non-empty list"),
    (lambda: mix_types("Q4_K_M", [("a.weight", (32, "x"))], n_layer=1, n_head=1, n_head_kv=1),
     "bad tensor entry"),
    (lambda: mix_types("Q4_K_M", [("a.weight", (32, 32))] * 2, n_layer=1, n_head=1,
                       n_head_kv=1), "listed twice"),
    (lambda: mix_types("Q4_K_M", [("a.weight", (32, 32))], n_layer=0, n_head=1, n_head_kv=1),
     "n_layer must be an integer >= 1"),
    (lambda: mix_types("Q8_0", [("a.weight", (32, 32))], n_layer=1, n_head=1, n_head_kv=1,
                       tensor_types=[("a", "q4_x")]), "unknown ggml tensor type 'q4_x'"),
    (lambda: mix_types("Q8_0", [("a.weight", (32, 32))], n_layer=1, n_head=1, n_head_kv=1,
                       tensor_types=[("(", "q4_0")]), "bad tensor-type regex"),
    (lambda: type_nbytes("q4_K", (4, 576)), "576 columns cannot be stored as q4_K"),
])
def test_bad_input(call, match):
    with pytest.raises(MpsearchError, match=match):
        call()


def test_aliases():
    assert canonical_ftype("q4_k") == "Q4_K_M" and canonical_ftype("Q3_K_s") == "Q3_K_S"


def _hf_layers(model):
    from types import SimpleNamespace

    back = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}
    layers = {}
    for name, shape in model["tensors"]:
        parts = name.split(".")
        if name == "output.weight":
            hf = "lm_head"
        elif parts[0] == "blk" and parts[2] in back:
            hf = f"model.layers.{parts[1]}.{back[parts[2]]}"
        else:
            continue
        layers[hf] = name
        yield SimpleNamespace(name=hf, out_channels=shape[0], in_features=shape[1]), name


@pytest.mark.parametrize("key", sorted(MODELS))
def test_recipes_for_layers_are_the_real_mixes(key):
    from mpsearch.targets.llamacpp_mixes import RECIPE_FTYPES, recipes_for_layers

    from mpsearch.targets.llamacpp_mixes import mix_needs_imatrix

    model = MODELS[key]
    pairs = list(_hf_layers(model))
    names = [n for n, _ in model["tensors"]]
    for has_imatrix, mixes in ((False, model["mixes"]), (True, model["mixes_imatrix"])):
        recipes = recipes_for_layers([lay for lay, _ in pairs], has_imatrix=has_imatrix)
        for ftype in RECIPE_FTYPES:
            if ftype not in mixes:
                continue
            real = dict(zip(names, mixes[ftype]))
            if not has_imatrix and mix_needs_imatrix(ftype, real):
                assert ftype not in recipes, ftype  # llama-quantize refuses it without an imatrix
                continue
            want = {lay.name: ("keep" if real[g] in ("f16", "f32", "bf16") else real[g])
                    for lay, g in pairs}
            assert recipes[ftype] == want, (ftype, has_imatrix)
    # IQ2_XXS needs an imatrix (its tensors are iq2_xxs); IQ4_XS and IQ3_M do not
    assert "IQ2_XXS" not in recipes_for_layers([lay for lay, _ in pairs])
    assert {"IQ4_XS", "IQ3_M"} <= set(recipes_for_layers([lay for lay, _ in pairs]))
    assert "IQ2_XXS" in recipes_for_layers([lay for lay, _ in pairs], has_imatrix=True)
    # a model that is not Llama-family gets no mixes
    from types import SimpleNamespace
    assert recipes_for_layers([SimpleNamespace(name="encoder.layer.0.x", out_channels=4,
                                               in_features=32)]) == {}
