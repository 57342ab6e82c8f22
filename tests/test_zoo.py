"""The packaged real models and data: splits are disjoint, IDX reading is exact, caches are reused."""

import gzip
import struct

import numpy as np
import pytest
import torch

from mpsearch import zoo
from mpsearch.errors import SpecError


def test_shakespeare_splits_are_disjoint_and_seeded():
    calib, evals = zoo.shakespeare_plays("calib"), zoo.shakespeare_plays("eval")
    assert calib and evals and not set(calib) & set(evals)
    a = zoo.shakespeare_lines(20, "calib", seed=3)
    assert a == zoo.shakespeare_lines(20, "calib", seed=3)
    assert a != zoo.shakespeare_lines(20, "calib", seed=4)
    assert all(len(t) >= 60 for t in a)
    assert not set(zoo.shakespeare_lines(200, "calib")) & set(zoo.shakespeare_lines(200, "eval"))


def test_shakespeare_bad_split_and_count():
    with pytest.raises(SpecError, match="split must be 'calib', 'eval' or 'all'"):
        zoo.shakespeare_plays("test")
    with pytest.raises(SpecError, match="n must be >= 1"):
        zoo.shakespeare_lines(0)
    with pytest.raises(SpecError, match="hold only"):
        zoo.shakespeare_lines(10**7, "eval")


def _write_idx(path, arr: np.ndarray, code=0x08, gz=False):
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = head + arr.astype(">u1" if code == 0x08 else ">i4").tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_exact(tmp_path, gz):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / ("x-idx3-ubyte" + (".gz" if gz else ""))
    _write_idx(p, arr, gz=gz)
    assert torch.equal(zoo.read_idx(p), torch.from_numpy(arr))
    q = tmp_path / "y-idx1-ubyte"
    _write_idx(q, np.array([5, -7, 100000]), code=0x0C)
    assert zoo.read_idx(q).tolist() == [5, -7, 100000]


def test_read_idx_errors(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        zoo.read_idx(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(SpecError, match="bad magic number"):
        zoo.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"ab")
    with pytest.raises(SpecError, match="the header says"):
        zoo.read_idx(short)
    with pytest.raises(SpecError, match="Fashion-MNIST split must be"):
        zoo.fashion_mnist("valid")


def test_digits_mlp_trains_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("MPSEARCH_CACHE", str(tmp_path))
    m1 = zoo.digits_mlp()
    files = list(tmp_path.glob("digits-mlp-*.pt"))
    assert len(files) == 1
    x, y = zoo.digits("test")
    with torch.no_grad():
        acc = (m1(x).argmax(1) == y).float().mean().item()
    assert acc > 0.85
    m2 = zoo.digits_mlp()  # loaded from the cache: identical weights
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_minilm_loads_offline_without_pooler():
    model, tok = zoo.load_minilm()
    assert not hasattr(model, "pooler") or model.pooler is None
    batches = zoo.minilm_batches(["To be, or not to be", "that is the question"], 2, tokenizer=tok)
    with torch.no_grad():
        out = model(**batches[0]).last_hidden_state
    emb = zoo.mean_pool(out, batches[0]["attention_mask"])
    assert emb.shape == (2, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    with pytest.raises(SpecError, match="text list is empty"):
        zoo.minilm_batches([], tokenizer=tok)


@pytest.mark.skipif(not zoo.fashion_mnist_available(), reason="Fashion-MNIST IDX files not installed "
                    "(apt-get install dataset-fashion-mnist)")
def test_fashion_data_shapes():
    x, y = zoo.fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert set(y.unique().tolist()) == set(range(10))
