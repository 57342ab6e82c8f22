"""Spec additions: zoo short names, Hugging Face directories, text files, IDX files."""

import gzip
import struct

import numpy as np
import pytest
import torch

from mpsearch.errors import SpecError
from mpsearch.specs import load_data, load_model, load_tokenizer


def test_short_names_and_hf_directory():
    from mpsearch.zoo import minilm_path

    m = load_model("digits-mlp")
    assert isinstance(m, torch.nn.Sequential) and not m.training
    enc = load_model(str(minilm_path()))  # a Hugging Face directory: the encoder (AutoModel)
    assert type(enc).__name__ == "BertModel"
    batches = load_data("digits")
    assert batches[0][0].shape[1] == 64


def test_text_file_is_tokenized(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("Now is the winter of our discontent\n\nMade glorious summer\nby this sun of York\n")
    batches = load_data(str(f), tokenizer=load_tokenizer("minilm"), batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    with pytest.raises(SpecError, match="text data needs the model's tokenizer"):
        load_data(str(f))
    with pytest.raises(SpecError, match="the text file does not exist"):
        load_data(str(tmp_path / "missing.txt"))
    (tmp_path / "e.txt").write_text("\n  \n")
    with pytest.raises(SpecError, match="the text file is empty"):
        load_data(str(tmp_path / "e.txt"), tokenizer=object())


def test_idx_file_as_images(tmp_path):
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    p = tmp_path / "imgs-idx3-ubyte.gz"
    with gzip.open(p, "wb") as fh:
        fh.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 3, 3) + arr.tobytes())
    x = load_data(str(p))
    assert x.shape == (2, 1, 3, 3) and torch.allclose(x[:, 0], torch.from_numpy(arr).float() / 255)


def test_bad_model_specs():
    with pytest.raises(SpecError, match="no such directory"):
        load_model("/definitely/not/here")
    with pytest.raises(SpecError, match="no quantizable layer"):
        load_model("torch.nn:Identity")
    with pytest.raises(SpecError, match="no such directory or file"):
        load_tokenizer("/definitely/not/here")
    with pytest.raises(SpecError, match="is not a Hugging Face folder, a cached Hugging Face id, a .gguf file, "
                                        "'minilm' or 'smollm2'"):
        load_tokenizer("torch.nn:Identity")
