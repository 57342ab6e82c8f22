"""Streamed decoder blocks (``offload``) and the work plan said up front (issue 24, items 4 and 5).

The offload path runs its streaming logic on the CPU too (the compute copies are real copies), so
these tests compare it with the plain path exactly and watch, from hooks of their own, how many
blocks ever hold compute copies at once.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from mpsearch import zoo
from mpsearch.errors import MpsearchError
from mpsearch.sensitivity.output_distance import OutputDistanceEstimator
from moe_models import tiny_moe, tokens


def _llama():
    return zoo.random_llama("tiny", num_hidden_layers=4, seed=1)


def _data(vocab=128, n=2, seq=12, batches=2):
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, vocab, (n, seq), generator=g)} for _ in range(batches)]


class ResidencyWatch:
    """Hooks on every module inside the blocks: at each call, how many blocks hold tensors other than
    their stored ones (compute copies), and whether the running block is one of them."""

    def __init__(self, model, blocks):
        self.blocks = blocks
        self.stored = [{id(m): [p.data_ptr() for p in m.parameters(recurse=False)] for m in b.modules()}
                       for b in blocks]
        self.max_streamed, self.calls, self.unstreamed_runs = 0, 0, 0
        self.handles = []
        for k, b in enumerate(blocks):
            for m in b.modules():
                if any(True for _ in m.parameters(recurse=False)):
                    self.handles.append(m.register_forward_pre_hook(self._hook(k)))

    def _streamed(self, k) -> bool:
        return any(p.data_ptr() != ptr for m in self.blocks[k].modules()
                   for p, ptr in zip(m.parameters(recurse=False), self.stored[k][id(m)]))

    def _hook(self, k):
        def hook(mod, args):
            self.calls += 1
            self.max_streamed = max(self.max_streamed, sum(self._streamed(j) for j in range(len(self.blocks))))
            if not self._streamed(k):
                self.unstreamed_runs += 1
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _table(model, data, **kw):
    return OutputDistanceEstimator(options="2,4,8", **kw).estimate(model, data, progress=False)


@pytest.mark.parametrize("window", [1, 2])
def test_offload_equals_plain_on_llama(window):
    model, data = _llama(), _data()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = _table(model, data)
    watch = ResidencyWatch(model, list(model.model.layers))
    try:
        off = _table(model, data, offload=True, device="cpu", offload_window=window)
    finally:
        watch.close()
    assert np.array_equal(plain.frame["damage"].to_numpy(), off.frame["damage"].to_numpy())
    assert np.array_equal(plain.frame["damage_std"].to_numpy(), off.frame["damage_std"].to_numpy())
    assert watch.calls > 0 and watch.unstreamed_runs == 0  # every block ran from a compute copy
    assert 1 <= watch.max_streamed <= window
    cost = off.metadata["cost"]
    assert cost["offload_max_resident"] <= window and cost["offload_window"] == window
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    assert cost["offload_bytes"] == cost["offload_loads"] * block  # equal blocks: every load counted whole
    for n, p in model.named_parameters():  # the model is left as it was, its weights where they were
        assert torch.equal(p, before[n]) and p.device.type == "cpu", n
    assert all(not watch._streamed(k) for k in range(4))


def test_offload_equals_plain_on_qwen3_moe():
    model = tiny_moe("qwen3_moe")
    data = [{"input_ids": t} for t in tokens(2, 16, batches=2)]
    plain = _table(model, data)
    watch = ResidencyWatch(model, list(model.model.layers))
    try:
        off = _table(model, data, offload=True, device="cpu")
    finally:
        watch.close()
    assert any(k == "expert" or "experts" in n for n, k in zip(plain.frame["layer"], plain.frame["layer"]))
    assert np.array_equal(plain.frame["damage"].to_numpy(), off.frame["damage"].to_numpy())
    assert watch.unstreamed_runs == 0 and 1 <= watch.max_streamed <= 2


def test_offload_cache_on_the_cpu_and_small_windows_keep_the_table():
    """A budget that fits the weights of one block but not the prefix cache on the device: the cache
    moves to the storage side and the window shrinks, and the table is the same."""
    model, data = _llama(), _data()
    plain = _table(model, data)
    est = OutputDistanceEstimator(options="2,4,8", offload=True, device="cpu", offload_window=2)
    probe = _table(model, data, offload=True, device="cpu")
    need = probe.metadata["work_plan"]
    assert need["offload"] == {"window": 2, "cache": "device"} and need["budget_bytes"] is None
    # a budget just below the plan: the cache goes to the CPU first
    cache = need["memory_bytes"]["cache"]
    assert cache > 0
    kept = need["memory_bytes"]["variants"]  # quantized weights kept across the 2 batches: given up first
    assert kept > 0
    est.device_memory_mb = (need["peak_bytes"] - kept / 2) / 2**20
    off = est.estimate(model, data, progress=False)
    assert "variants" not in off.metadata["work_plan"]["memory_bytes"]
    assert off.metadata["work_plan"]["offload"] == {"window": 2, "cache": "device"}
    assert off.metadata["cost"]["quantizations_reused"] == 0
    assert np.array_equal(plain.frame["damage"].to_numpy(), off.frame["damage"].to_numpy())
    # then the prefix cache goes to the CPU
    est.device_memory_mb = (need["peak_bytes"] - kept - cache / 2) / 2**20
    off = est.estimate(model, data, progress=False)
    assert off.metadata["work_plan"]["offload"] == {"window": 2, "cache": "cpu"}
    assert off.metadata["work_plan"]["peak_bytes"] <= est.device_memory_mb * 2**20
    assert np.array_equal(plain.frame["damage"].to_numpy(), off.frame["damage"].to_numpy())
    # below that, one block at a time (the cache stays on the CPU)
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    est.device_memory_mb = (off.metadata["work_plan"]["peak_bytes"] - block / 2) / 2**20
    off = est.estimate(model, data, progress=False)
    assert off.metadata["work_plan"]["offload"] == {"window": 1, "cache": "cpu"}
    assert off.metadata["cost"]["offload_max_resident"] == 1
    assert np.array_equal(plain.frame["damage"].to_numpy(), off.frame["damage"].to_numpy())


def test_work_plan_line_counts_the_passes_the_run_makes(capsys):
    model, data = _llama(), _data()
    table = OutputDistanceEstimator(options="2,4,8", stack_options=2).estimate(model, data, progress=True)
    err = capsys.readouterr().err
    line = next(ln for ln in re.split(r"[\r\n]", err) if "output-distance plan:" in ln)
    plan = table.metadata["work_plan"]
    assert plan["suffix_passes"] == table.metadata["cost"]["suffix_passes"]  # counted, then run
    assert f"{plan['suffix_passes']:,} suffix passes" in line and "token evaluations" in line and "peak on cpu" in line
    # tokens: each of 2 batches x every layer runs its 3 options' copies of a 2 x 12 batch
    assert plan["token_evaluations"] == 2 * len(table.layers) * 3 * 2 * 12
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert plan["memory_bytes"]["weights"] == weights
    assert plan["stack"] == 2 and plan["micro_batch"] == 2


def test_work_plan_shrinks_with_the_settings_that_trade_memory():
    model, data = _llama(), _data(n=4)
    peak = {}
    for name, kw in {"all": {}, "stack1": {"stack_options": 1}, "micro1": {"micro_batch": 1}}.items():
        peak[name] = _table(model, data, **kw).metadata["work_plan"]["peak_bytes"]
    assert peak["stack1"] < peak["all"] and peak["micro1"] < peak["all"]


def test_work_plan_refuses_over_a_small_device_budget():
    model, data = _llama(), _data()
    need = _table(model, data).metadata["work_plan"]["peak_bytes"] / 2**20
    with pytest.raises(MpsearchError, match=r"would need about .* but .* available: use --offload .*--micro-batch"
                                            r".*--stack-options"):
        _table(model, data, device_memory_mb=need * 0.9)
    _table(model, data, device_memory_mb=need * 1.01)  # enough: it runs


def test_offload_refuses_a_budget_below_one_block_and_a_model_without_blocks():
    model, data = _llama(), _data()
    with pytest.raises(MpsearchError, match="cannot hold even one decoder block"):
        _table(model, data, offload=True, device="cpu", device_memory_mb=0.01)
    flat = torch.nn.Linear(8, 8)
    with pytest.raises(MpsearchError, match="has none: run it without offload"):
        _table(flat, [torch.randn(2, 8)], offload=True, device="cpu")
    with pytest.raises(MpsearchError, match="offload_window must be an integer > 0"):
        _table(model, data, offload=True, offload_window=0)


def test_cli_estimate_offload(tmp_path):
    from mpsearch.cli import main

    common = ["estimate", "--model", "tests/moe_models.py:qwen3", "--data", "tests/moe_models.py:calib",
              "--bits", "2,4", "--device", "cpu", "--no-progress", "--param", "cache_dir=None"]
    assert main(common + ["--offload", "-o", str(tmp_path / "off.csv")]) == 0
    assert main(common + ["--estimator", "output-distance", "-o", str(tmp_path / "plain.csv")]) == 0
    import pandas as pd

    off, plain = pd.read_csv(tmp_path / "off.csv"), pd.read_csv(tmp_path / "plain.csv")
    assert off["damage"].tolist() == plain["damage"].tolist()


@pytest.mark.parametrize("extra, message", [
    (["--offload", "--estimator", "weight-error"], "--offload streams decoder blocks .* 'weight-error' cannot take it"),
    (["--micro-batch", "2", "--estimator", "fisher"], "--micro-batch is a setting of the output-distance"),
    (["--offload", "--device-memory", "0.01"], "cannot hold even one decoder block"),
    (["--estimator", "output-distance", "--device-memory", "0.2"], "would need about .*--offload"),
])
def test_cli_memory_flags_refused_in_one_line(tmp_path, capsys, monkeypatch, extra, message):
    from mpsearch.cli import main

    monkeypatch.setenv("MPSEARCH_ESTIMATOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "t.csv"
    rc = main(["estimate", "--model", "tests/moe_models.py:qwen3", "--data", "tests/moe_models.py:calib",
               "--bits", "2,4", "--device", "cpu", "--no-progress", "-o", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    line = [ln for ln in err if ln.startswith("mpsearch estimate: error:")]
    assert len(line) == 1 and re.search(message, line[0]), err


def test_cli_frontier_memory_flags(tmp_path, capsys):
    from mpsearch.cli import main

    base = ["frontier", "--model", "tests/moe_models.py:qwen3", "--data", "tests/moe_models.py:calib", "--device",
            "cpu", "-o", str(tmp_path / "f")]
    assert main(base + ["--offload"]) == 2
    err = capsys.readouterr().err
    assert "measuring the plans does not stream the model yet" in err and not (tmp_path / "f").exists()
    assert main(base + ["--estimator", "fisher", "--stack-options", "2"]) == 2
    assert "--stack-options is a setting of the output-distance estimator" in capsys.readouterr().err


def test_cli_offload_conflicts_refused(tmp_path, capsys):
    from mpsearch.cli import main

    base = ["estimate", "--model", "tests/moe_models.py:qwen3", "--data", "tests/moe_models.py:calib", "--offload",
            "-o", str(tmp_path / "t.csv")]
    assert main(base + ["--device-map", "auto"]) == 2
    assert "give one of them" in capsys.readouterr().err
