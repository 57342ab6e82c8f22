"""The measured frontier for a consumer target: its options per layer, its recipes measured beside
the uniform plans and solved at, and the recommended plan never worse than any of them."""

import pytest
import torch

from mpsearch import zoo
from mpsearch.metrics import CausalLMMetric
from mpsearch.pipeline import measured_frontier


@pytest.fixture(scope="module")
def llama():
    # hidden 96: K-quants (256-blocks) cannot take q/k/v/o or gate/up; down_proj (256 inputs) can
    return zoo.random_llama("tiny", hidden_size=96, intermediate_size=256, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128, seed=0)


def test_llamacpp_frontier_measures_the_consumers_recipes(llama, tmp_path):
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 128, (2, 32), generator=g)]
    metric = CausalLMMetric(torch.randint(0, 128, (1, 512), generator=g), window=64, batch_size=4)
    run = measured_frontier(llama, calib, metric, estimator="weight-error", solver="ilp", target="llama.cpp",
                            validate=2, points=6, refine=0, progress=False, out=tmp_path / "out")
    table = run.table
    assert table.metadata["target"] == "llama.cpp"
    # llama.cpp's types rounded as llama-quantize --imatrix does, with the imatrix of the calibration data
    assert table.metadata["rounding"] == "imatrix"
    assert (tmp_path / "out" / "imatrix.gguf").is_file()
    offered = table.frame.groupby("layer")["option"].apply(set)
    assert "q4_K" not in offered["model.layers.0.self_attn.q_proj"]
    assert "q4_K" in offered["model.layers.0.mlp.down_proj"]
    assert "lm_head" in offered.index  # not tied in this model: its own GGUF tensor 'output'
    labels = set(run.uniform["option"])
    # llama.cpp's pure types (with its fallback on the 96-column tensors) and built-in mixes
    assert {"pure-q4_K", "Q4_K_M", "Q3_K_M"} <= labels, labels
    pure = run.uniform.set_index("option").loc["pure-q4_K"]
    # q4_K (4.5 bits/weight) where the rows allow it, llama.cpp's fallback q5_0 (5.5) elsewhere
    assert 4.5 < pure["avg_bits"] < 5.5
    # every plan along the frontier takes only options its layer offers
    for plan in run.plans.values():
        for lay in plan.layers:
            assert plan.option(lay).name in offered[lay]
    rec = run.recommended
    q4km = rec[rec["budget"] == "Q4_K_M"].iloc[0]
    mix_loss = run.uniform.set_index("option").loc["Q4_K_M", "measured_loss"]
    assert q4km["measured_loss"] <= mix_loss + 1e-12  # never worse than the consumer's own mix
    assert q4km["size_bits"] <= run.uniform.set_index("option").loc["Q4_K_M", "size_bits"] + 1e-6
    # a pure type every layer can take is the uniform plan itself: listed once
    assert "q4_0" in labels and "pure-q4_0" not in labels
    assert (tmp_path / "out" / "frontier.csv").is_file()
    # the full-precision model's every value, so that a perplexity (or top-1) gap can be read
    import json

    base = json.loads((tmp_path / "out" / "summary.json").read_text())["baseline_values"]
    assert base["kld"] == 0 and base["top1"] == 100 and base["perplexity"] > 1
    assert base == run.baseline_values and base["kld"] == run.baseline
    assert (run.uniform["measured_perplexity"] > base["perplexity"]).any()


def tiny_llama():
    """The model spec of the CLI tests below (``tests/test_target_frontier.py:tiny_llama``)."""
    return zoo.random_llama("tiny", hidden_size=96, intermediate_size=256, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128, seed=0)


def llama_calib():
    return [torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))]


def llama_eval():
    return torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(1))


def test_estimate_for_a_target_records_its_options_and_shares_the_frontiers_cache(tmp_path, capsys):
    """``estimate --target llama.cpp`` recorded params.options '2,3,4,8' (the estimator's unused
    default) while the table held GGML types, and that value entered the estimator cache key: it
    never reused ``frontier --model --target llama.cpp``'s work unless --bits spelled the list out."""
    from mpsearch.cli import main
    from mpsearch.table import CostTable
    from mpsearch.targets import get_target

    spec = f"{__file__}:"
    common = ["--model", spec + "tiny_llama", "--data", spec + "llama_calib", "--target", "llama.cpp",
              "--estimator", "lim"]
    out = tmp_path / "front"
    assert main(["frontier", *common, "--eval-data", spec + "llama_eval", "--validate", "0", "--points", "3",
                 "--seq-len", "32", "-o", str(out)]) == 0
    assert main(["estimate", *common, "--param", f"cache_dir={out / 'estimator-cache'}", "--no-progress",
                 "-o", str(tmp_path / "t.csv")]) == 0
    capsys.readouterr()
    table = CostTable.read(tmp_path / "t.csv")
    default = ",".join(get_target("llama.cpp").default_options)
    assert table.metadata["params"]["options"] == default  # the options it estimated
    assert table.metadata["cost"].get("from_cache") is True  # the frontier's estimate, reused
    assert len(list((out / "estimator-cache").iterdir())) == 1
    front = CostTable.read(out / "table.csv")
    assert front.metadata["params"]["options"] == default
    assert front.frame.equals(table.frame)


def test_a_recipe_equal_to_a_uniform_plan_is_listed_once_and_each_budget_is_named_with_its_size(tmp_path):
    """vLLM's own recipe 'uniform-w4a16-g32' is the uniform w4a16-g32 plan: one row (uniform.csv, the
    recommendations, the printout) that names both; each printed budget says its own size."""
    from mpsearch.cli.frontier import summarize

    llama = zoo.random_llama("tiny", vocab_size=128, seed=0)  # hidden 32: w4a16-g32 fits every layer
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 128, (2, 32), generator=g)]
    metric = CausalLMMetric(torch.randint(0, 128, (1, 256), generator=g), window=64, batch_size=4)
    run = measured_frontier(llama, calib, metric, estimator="weight-error", solver="ilp", target="vllm",
                            options="mxfp4,w4a16-g32,w8a8-int8,keep", validate=2, points=4, progress=False,
                            out=tmp_path / "out")
    uni = run.uniform.set_index("option")
    assert "uniform-w4a16-g32" not in uni.index and uni.loc["w4a16-g32", "same_as"] == "uniform-w4a16-g32"
    assert uni.loc["w4a16-g32", "kind"] == "uniform"
    assert list(run.recommended["budget"]).count("w4a16-g32") == 1
    assert "uniform-w4a16-g32" not in set(run.recommended["budget"])
    text = summarize(run, "tiny")
    row = run.recommended.set_index("budget").loc["w4a16-g32"]
    line = next(ln for ln in text.splitlines() if ln.startswith("  at w4a16-g32 ("))
    assert line.startswith(f"  at w4a16-g32 ({row['budget_avg_bits']:.3f} bits/weight): recommended {row['plan']} "
                           f"({row['avg_bits']:.3f} bits/weight), kld ")
    assert abs(row["budget_avg_bits"] - uni.loc["w4a16-g32", "avg_bits"]) < 1e-9
