"""--model as users have it (issue 28): a Hugging Face id from the local cache (offline), a folder,
sharded safetensors, a GGUF file (dequantized by transformers, its source grid reported); each
refusal one line. Every model file is made here from a tiny random Llama."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from mpsearch.cli import main
from mpsearch.errors import SpecError
from mpsearch.sources import SourceGridWarning, gguf_tensor_types, model_source
from mpsearch.specs import load_model, load_tokenizer
from mpsearch.table import CostTable

from model_files import fake_hf_cache, tiny_llama_dir, write_gguf

pytest.importorskip("gguf")
TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    folder = tiny_llama_dir(root / "tiny")
    cache = root / "hf-cache"
    fake_hf_cache(cache, "tiny-org/tiny-llama", folder)
    return {"folder": folder, "cache": cache, "f32": write_gguf(folder, root / "tiny-f32.gguf"),
            "q4_1": write_gguf(folder, root / "tiny-q4_1.gguf", "Q4_1"),
            "q8_0": write_gguf(folder, root / "tiny-q8_0.gguf", "Q8_0")}


def _logits(model, tok):
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def test_a_hugging_face_id_loads_from_the_local_cache(files, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(files["cache"]))
    ref = load_model(files["folder"])
    model = load_model("tiny-org/tiny-llama")
    tok = load_tokenizer("tiny-org/tiny-llama")
    assert model_source("tiny-org/tiny-llama").hub_id == "tiny-org/tiny-llama"
    assert torch.equal(_logits(model, tok), _logits(ref, load_tokenizer(files["folder"])))


def test_an_id_not_in_the_cache_is_refused_in_one_line_naming_the_cache(files, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(files["cache"]))
    with pytest.raises(SpecError, match="not in the Hugging Face cache .*hf-cache.*hf download nobody/nothing"):
        load_model("nobody/nothing")
    rc = main(["estimate", "--model", "nobody/nothing", "-o", str(tmp_path / "t.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and str(files["cache"]) in err
    assert not list(tmp_path.iterdir())


def test_the_cli_estimates_a_cached_id(files, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(files["cache"]))
    out = tmp_path / "t.csv"
    assert main(["estimate", "--model", "tiny-org/tiny-llama", "--estimator", "weight-error", "--bits", "4,8",
                 "-o", str(out), "--no-progress"]) == 0
    assert len(CostTable.read(out).layers) == 15  # 2 blocks x 7 + lm_head


def test_a_gguf_file_loads_dequantized_with_its_tokenizer(files):
    ref = load_model(files["folder"])
    ref_tok = load_tokenizer(files["folder"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", SourceGridWarning)  # an F32 GGUF has no source grid
        model = load_model(files["f32"])
    tok = load_tokenizer(files["f32"])
    assert tok(TEXT)["input_ids"] == ref_tok(TEXT)["input_ids"]
    assert torch.equal(_logits(model, tok), _logits(ref, ref_tok))  # q/k rows un-permuted exactly
    assert getattr(model, "mpsearch_source_grid", None) is None


@pytest.mark.parametrize("qtype,levels", [("q4_1", 16), ("q8_0", 256)])
def test_a_quantized_gguf_warns_of_its_source_grid_and_the_table_records_it(files, tmp_path, qtype, levels):
    types = gguf_tensor_types(files[qtype])
    assert types["blk.0.attn_q.weight"] == (qtype.upper(), (32, 32))
    assert types["token_embd.weight"][0] == "F32"
    with pytest.warns(SourceGridWarning, match=rf"stores 15 of its 16 weight matrices as {qtype.upper()}: "
                                               r"dequantized, they already lie on that grid"):
        model = load_model(files[qtype])
    w = model.model.layers[0].mlp.up_proj.weight.detach()
    blocks = w.reshape(-1, 32)  # the stored grid: at most 2^b levels per block of 32
    assert max(len(torch.unique(b)) for b in blocks) <= levels
    out = tmp_path / "t.csv"
    with pytest.warns(SourceGridWarning):
        assert main(["estimate", "--model", str(files[qtype]), "--estimator", "weight-error", "--bits", "4,8",
                     "-o", str(out), "--no-progress"]) == 0
    grid = CostTable.read(out).metadata["source_grid"]
    assert grid["types"] == {qtype.upper(): 15} and grid["file"].endswith(f"tiny-{qtype}.gguf")


def test_sharded_safetensors_load_from_the_folder_or_the_index(files, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = load_model(files["folder"])
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(files["folder"]).save_pretrained(sharded, max_shard_size="20KB")
    load_tokenizer(files["folder"]).save_pretrained(sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    tok = load_tokenizer(sharded)
    for spec in (sharded, sharded / "model.safetensors.index.json"):
        assert torch.equal(_logits(load_model(spec), tok), _logits(ref, tok))


@pytest.mark.parametrize("spec,message", [
    ("missing/model.gguf", "the GGUF file does not exist"),
    ("./no/such/dir", "no such directory or file"),
    ("nosuchname", "not a file, folder or short name"),
])
def test_bad_model_specs_are_refused_in_one_line(spec, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    rc = main(["estimate", "--model", spec, "-o", str(tmp_path / "t.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_file_that_is_not_gguf_is_refused_in_one_line(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    rc = main(["estimate", "--model", str(bad), "-o", str(tmp_path / "t.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "not a GGUF file" in err and len(err.strip().splitlines()) == 1
