"""experiments/train_moe.py at its tiny CPU size: it trains, resumes, saves a Hugging Face folder
whose expert layout round-trips through transformers, and (where llama.cpp's converter is
installed; not in CI) converts to a GGUF whose stacked expert tensors hold the trained weights."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

EXP = Path(__file__).parents[1] / "experiments"
CONVERTER = Path(os.environ.get("LLAMA_CPP_DIR",
                                "/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp")) \
    / "convert_hf_to_gguf.py"


def _module():
    spec = importlib.util.spec_from_file_location("train_moe", EXP / "train_moe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tm():
    return _module()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from mpsearch.errors import SpecError
    from mpsearch.zoo import smollm2_tokenizer

    try:
        tok = smollm2_tokenizer()
    except SpecError as e:
        pytest.skip(str(e))
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(path))
    return path


def _args(out, tok_dir, *extra):
    return ["train", "--out", str(out), "--tiny", "--no-convert", "--no-progress", "--tokenizer",
            str(tok_dir), "--save-dtype", "f32", "--experts-impl", "eager", *extra]


@pytest.fixture(scope="module")
def trained(tm, tok_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe")
    assert tm.main(_args(out, tok_dir)) == 0
    return out


def test_trains_and_reports(trained):
    rep = json.loads((trained / "report.json").read_text())
    hist = rep["history"]
    assert len(hist) == rep["steps"] == 6
    # the loss starts at ln(vocab) (a random model) and goes down; the router's balancing loss
    # is part of the objective (1 when balanced, 2 when every layer uses 2 of its 4 experts)
    assert abs(hist[0]["train_loss"] - torch.log(torch.tensor(49152.0)).item()) < 0.1
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] - 0.2
    assert all(0.9 < h["aux_loss"] < 2.05 for h in hist)
    shares = torch.tensor(rep["expert_share_per_layer"])
    assert shares.shape == (2, 4)
    assert torch.allclose(shares.sum(1), torch.ones(2), atol=1e-6)
    assert rep["eval_tokens"] > 1000 and rep["unigram_eval_loss"] > 0
    assert rep["kept"].startswith("step ")
    # nothing of the evaluation plays is trained on
    assert not set(rep["eval_plays"]) & set(rep["calib_plays"])


def test_saved_layout_is_per_expert_and_round_trips(trained):
    """The folder holds one matrix per expert (what llama.cpp's converter stacks), each the slice
    of the fused tensor transformers trained; reloading gives the trained model's logits."""
    from safetensors.torch import load_file

    hf = trained / "hf"
    ck = torch.load(trained / "ckpt.pt", map_location="cpu", weights_only=False)
    fused = ck["best_model"]
    disk = load_file(str(hf / "model.safetensors"))
    cfg = transformers.AutoConfig.from_pretrained(hf)
    n_ff = cfg.moe_intermediate_size
    assert not [k for k in disk if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    for i in range(cfg.num_hidden_layers):
        gate_up = fused[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        down = fused[f"model.layers.{i}.mlp.experts.down_proj"]
        assert gate_up.shape == (cfg.num_experts, 2 * n_ff, cfg.hidden_size)
        for e in range(cfg.num_experts):
            p = f"model.layers.{i}.mlp.experts.{e}."
            assert torch.equal(disk[p + "gate_proj.weight"], gate_up[e, :n_ff])
            assert torch.equal(disk[p + "up_proj.weight"], gate_up[e, n_ff:])
            assert torch.equal(disk[p + "down_proj.weight"], down[e])
    # the in-memory (fused) model and the reloaded one give the same logits
    before = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    before.load_state_dict(fused)
    after = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    for m in (before, after):
        m.set_experts_implementation("eager")
    assert cfg.norm_topk_prob and cfg.tie_word_embeddings
    x = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = before(x).logits, after(x).logits
    assert torch.equal(a, b)
    assert (hf / "tokenizer.json").is_file()


def test_an_interrupted_run_resumes_to_the_same_weights(tm, trained, tok_dir, tmp_path):
    out = tmp_path / "resumed"
    assert tm.main(_args(out, tok_dir, "--stop-after", "4")) == 0
    ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ck["state"]["step"] == 4 and not (out / "hf").exists()
    assert tm.main(_args(out, tok_dir)) == 0
    a = torch.load(trained / "ckpt.pt", map_location="cpu", weights_only=False)
    b = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    assert a["state"]["step"] == b["state"]["step"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    # other settings on the same folder: refused with one line, exit 2
    assert tm.main(_args(out, tok_dir, "--lr", "0.01")) == 2


def test_split_and_join_restore_the_folder(tm, trained, tmp_path):
    parts = tmp_path / "parts"
    files = tm.split(trained, parts, 1)
    assert len(files) >= 2 and all(f.stat().st_size <= 2**20 for f in files)
    back = tm.join(parts, tmp_path / "back")
    for f in (trained / "hf").iterdir():
        assert (back / f.name).read_bytes() == f.read_bytes(), f.name
    files[0].write_bytes(b"x" + files[0].read_bytes()[1:])
    with pytest.raises(tm.UsageError, match="sha256"):
        tm.join(parts, tmp_path / "bad")


@pytest.mark.skipif(not CONVERTER.is_file(),
                    reason="llama.cpp's convert_hf_to_gguf.py is not installed here (CI): set "
                           "LLAMA_CPP_DIR to a llama.cpp checkout to run it")
def test_llama_cpp_converter_stacks_the_trained_experts(tm, trained, tmp_path):
    gguf = pytest.importorskip("gguf")
    sys_path = str(EXP)
    import sys

    if sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    from llamacpp_fixtures import convert_hf_to_gguf

    out = convert_hf_to_gguf(trained / "hf", tmp_path / "m.gguf", "f32")
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.architecture"].contents() == "qwen3moe"
    assert r.fields["qwen3moe.expert_count"].contents() == 4
    assert r.fields["qwen3moe.expert_used_count"].contents() == 2
    t = {x.name: x for x in r.tensors}
    from safetensors.torch import load_file

    disk = load_file(str(trained / "hf" / "model.safetensors"))
    for i in range(2):
        for g, h in (("ffn_gate_exps", "gate_proj"), ("ffn_up_exps", "up_proj"),
                     ("ffn_down_exps", "down_proj")):
            want = torch.stack([disk[f"model.layers.{i}.mlp.experts.{e}.{h}.weight"]
                                for e in range(4)])
            got = torch.from_numpy(t[f"blk.{i}.{g}.weight"].data.copy())
            assert torch.equal(got.reshape(want.shape), want), (i, g)
        assert f"blk.{i}.ffn_gate_inp.weight" in t
    assert "output.weight" not in t  # tied embeddings


PERPLEXITY = CONVERTER.parent / "build" / "bin" / "llama-perplexity"


@pytest.mark.skipif(not (CONVERTER.is_file() and PERPLEXITY.is_file()),
                    reason="llama.cpp (its converter and a built llama-perplexity) is not here "
                           "(CI): set LLAMA_CPP_DIR to a built llama.cpp checkout to run it")
def test_llama_cpp_computes_the_trained_model(tm, trained, tmp_path):
    """llama.cpp's log-probs on the converted GGUF (llama-perplexity --kl-divergence-base) equal
    transformers' on the same tokens; a model that differs only in not renormalising its top-2
    routing weights (llama.cpp's qwen3moe always does) is 10x further away."""
    import shutil
    import sys

    if str(EXP) not in sys.path:
        sys.path.insert(0, str(EXP))
    from llamacpp_fixtures import convert_hf_to_gguf

    out = tmp_path / "run"
    shutil.copytree(trained / "hf", out / "hf")
    gg = convert_hf_to_gguf(out / "hf", out / "m-f32.gguf", "f32")
    res = tm.check_gguf(out, gg, chunks=4, ctx=64, threads=1)
    assert res["scored_tokens"] == 4 * 31
    assert res["mean_kld_llamacpp_vs_hf"] < 2e-6
    assert abs(res["ppl_llamacpp"] / res["ppl_hf"] - 1) < 1e-3
    cfg = json.loads((out / "hf" / "config.json").read_text())
    cfg["norm_topk_prob"] = False
    (out / "hf" / "config.json").write_text(json.dumps(cfg))
    wrong = tm.check_gguf(out, gg, chunks=4, ctx=64, threads=1)
    assert wrong["mean_kld_llamacpp_vs_hf"] > 10 * max(res["mean_kld_llamacpp_vs_hf"], 1e-8)
