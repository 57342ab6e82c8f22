"""Targets and ragged tables: per-layer option sets through estimators, every solver, the applier
and the validator; exact solvers against a brute force over each layer's own options."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from mpsearch.budget import Budget
from mpsearch.errors import MpsearchError
from mpsearch.options import Option, parse_option
from mpsearch.registry import get_estimator, get_solver, solver_names
from mpsearch.synthetic import random_table
from mpsearch.table import CostTable
from mpsearch.targets import get_target, target_names
from target_fixtures import TEST_TARGET, TestTarget


def ragged(seed, n=5):
    """A random table with some options removed per layer (>= 1 left; tied layers alike)."""
    rng = np.random.default_rng(seed)
    t = random_table(n, bits=[2, 3, 4, 6, 8], seed=seed, groups=int(rng.integers(0, 2)),
                     min_params=16, max_params=300)
    f = t.to_frame()
    groups = f.drop_duplicates("layer").set_index("layer")["group"] if "group" in f else None
    keep_for = {}
    for lay in t.layers:
        key = groups[lay] if groups is not None and isinstance(groups[lay], str) else lay
        if key not in keep_for:
            k = int(rng.integers(1, len(t.options) + 1))
            keep_for[key] = set(rng.choice(t.options, size=k, replace=False))
        keep = keep_for[key]
        f = f[(f.layer != lay) | f.option.isin(keep)]
    return CostTable(f, t.metadata), rng


def brute_force(table, cap):
    """Least damage over every combination of each layer's own options (ties: one choice per group)."""
    f = table.frame
    groups = table.groups
    items = {}
    for lay in table.layers:
        items.setdefault(groups.get(lay, lay), []).append(lay)
    choices = [sorted(set(f[f.layer == members[0]].option)) for members in items.values()]
    best = None
    for combo in itertools.product(*choices):
        rows = [f[(f.layer == m) & (f.option == o)].iloc[0] for members, o in zip(items.values(), combo) for m in members]
        size = sum(r.size_bits for r in rows)
        dmg = sum(r.damage for r in rows)
        if size <= cap * (1 + 1e-12) and (best is None or dmg < best):
            best = dmg
    return best


@pytest.mark.parametrize("seed", range(25))
def test_exact_solvers_equal_brute_force_on_ragged_tables(seed):
    table, rng = ragged(seed)
    f = table.frame.groupby("layer")
    lo, hi = f.size_bits.min().sum(), f.size_bits.max().sum()
    cap = float(lo + rng.uniform(0.0, 1.0) * (hi - lo))
    want = brute_force(table, cap)
    for name in ("exhaustive", "ilp", "dp"):
        res = get_solver(name).solve(table, Budget.parse([f"size_bits={cap!r}"]))
        got = None if res.plan is None else res.plan.predicted["damage"]
        assert (got is None) == (want is None), name
        if want is not None:
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("name", [n for n in solver_names() if n != "exhaustive"])
def test_every_solver_picks_only_options_a_layer_offers(name):
    table, _ = ragged(7, n=6)
    f = table.frame.groupby("layer")
    cap = float(f.size_bits.min().sum() + 0.6 * (f.size_bits.max().sum() - f.size_bits.min().sum()))
    params = {"n_trials": 40} if name == "optuna" else {}
    res = get_solver(name, **params).solve(table, Budget.parse([f"size_bits={cap!r}"]))
    assert res.plan is not None
    offered = table.frame.groupby("layer")["option"].apply(set)
    for lay in table.layers:
        assert res.plan.option(lay).name in offered[lay], (name, lay)
    assert res.plan.predicted["size_bits"] <= cap * (1 + 1e-9)


def test_the_test_format_rounds_as_hand_computed():
    m = torch.tensor([[7.0, -3.5, 1.0, 0.0, 0.2, 0.9, -7.0, 2.6] * 2])
    q = parse_option("test_blk8").format.quantize(m)
    # scale 1: round half to even on -3.5 -> -4, 0.2 -> 0, 0.9 -> 1, 2.6 -> 3
    assert q[0, :8].tolist() == [7.0, -4.0, 1.0, 0.0, 0.0, 1.0, -7.0, 3.0]
    assert parse_option("TEST_BLK8") == Option(bits=4, fmt="test_blk8")
    assert parse_option("test_blk8").size_bits(3, 16) == 3 * 16 * 4 + 3 * 2 * 16


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def test_estimate_with_a_target_gives_each_layer_its_legal_options():
    model, x = mlp(), torch.randn(32, 16)
    for est in ("weight-error", "hessian", "output-distance", "fisher"):
        kw = {"probes": 4} if est == "hessian" else {}
        data = (x, torch.randint(0, 4, (32,))) if est == "fisher" else x
        table = get_estimator(est, **kw).estimate(model, data, progress=False, target=TEST_TARGET)
        offered = table.frame.groupby("layer")["option"].apply(set).to_dict()
        assert offered == {"0": {"test_blk8", "int8"}, "2": {"int8"}, "4": {"test_blk8", "int8"}}, est
        assert table.metadata["target"] == "test-target"
    # the 12-column layer cannot take the format; solving and applying respect it
    res = get_solver("ilp").solve(table, Budget.parse(["avg_bits=7.5"]))
    assert res.plan.option("2").name == "int8"
    assert {res.plan.option("0").name, res.plan.option("4").name} == {"test_blk8"}
    from mpsearch.apply import apply_plan
    from mpsearch.validate import validate_plan

    q = apply_plan(model, res.plan)
    w = q[0].weight.detach().reshape(12, 2, 8)
    assert max(len(torch.unique(b)) for b in w.reshape(-1, 8)) <= 16
    report = validate_plan(model, res.plan, target=TEST_TARGET)
    assert report.ok
    from mpsearch.errors import PlanError
    from mpsearch.plan import BitPlan

    bad = BitPlan(bits={"0": 4, "2": 4, "4": 4}, options={n: {"name": "test_blk8", "format": "test_blk8", "bits": 4} for n in "024"})
    with pytest.raises(PlanError, match=r"layer '2' \(16x12\) cannot take test_blk8: 12 columns"):
        validate_plan(model, bad, target=TEST_TARGET)
    assert report.size_bits == pytest.approx(res.plan.predicted["size_bits"])


def test_targets_refuse_foreign_options_and_unknown_names():
    with pytest.raises(MpsearchError, match="cannot execute option 'int4'"):
        TEST_TARGET.parsed_options("test_blk8,int4")
    with pytest.raises(MpsearchError, match="unknown target 'lama.cpp'.*did you mean 'llama.cpp'"):
        get_target("lama.cpp")
    with pytest.raises(MpsearchError, match="takes mpsearch's integer options"):
        get_target("mpsearch").parsed_options("test_blk8")
    assert get_target(None).name == "mpsearch" and "llama.cpp" in target_names()
    assert get_target("gguf").name == "llama.cpp"


def test_a_layer_with_no_legal_option_is_refused():
    class Only8(TestTarget):
        name = "only8"
        options = ("test_blk8",)
        default_options = ("test_blk8",)

    with pytest.raises(MpsearchError, match=r"layer '2' \(16x12\) can take none of the options.*not a multiple of 8"):
        get_estimator("weight-error").estimate(mlp(), torch.randn(4, 16), progress=False, target=Only8())



def test_consumer_targets_list_their_consumers_formats():
    from mpsearch.targets import get_target

    for name, consumer in [("vllm", "compressed-tensors"), ("gptqmodel", "gptqmodel"), ("torchao", "torchao"),
                           ("modelopt", "modelopt"), ("autoround", "autoround")]:
        t = get_target(name)
        for opt in t.parsed_options(list(t.options)):
            assert opt.is_keep or opt.format.consumer == consumer, (name, opt.name)
        assert {o.name for o in t.parsed_options()} <= set(t.options)
    assert get_target("vllm").fused_runtime and not get_target("torchao").fused_runtime
    # exact costs in the consumer's accounting (4096 x 4096 layer)
    assert parse_option("w4a16-g128").size_bits(4096, 4096) / 4096**2 == pytest.approx(4.125, abs=2e-5)
    assert get_target("vllm").describe()[0]["option"] == "w4a16-g128"


def test_solve_budget_adds_runtime_ties_and_checks_the_table_target():
    from mpsearch.targets import solve_budget

    t = random_table(4, bits=[4, 8], seed=0)
    frame = t.to_frame()
    frame["layer"] = frame["layer"].map(dict(zip(t.layers, ["m.q_proj", "m.k_proj", "m.v_proj", "m.o_proj"])))
    frame["option"] = frame["bits"].map({4: "w4a16-g128", 8: "w8a16"})
    table = CostTable(frame, {"target": "vllm"})
    budget = solve_budget(table, Budget.parse(["avg_bits=6"]))
    res = get_solver("ilp").solve(table, budget)
    assert len({res.plan.option(n).name for n in ("m.q_proj", "m.k_proj", "m.v_proj")}) == 1
    with pytest.raises(MpsearchError, match="estimated for target 'vllm', not 'torchao'"):
        solve_budget(table, Budget(), "torchao")
    with pytest.raises(MpsearchError, match="target 'torchao' cannot execute option"):
        solve_budget(CostTable(frame), Budget(), "torchao")


def test_llmcompressor_modifier_follows_the_rounding_the_table_measured():
    from mpsearch.export import export_plan
    from mpsearch.plan import BitPlan

    def plan(quantizer):
        table = {"target": "vllm", **({"quantizer": quantizer} if quantizer else {})}
        return BitPlan(bits={"m.q_proj": 4}, options={"m.q_proj": {"name": "w4a16-g128", "format": "w4a16-g128", "bits": 4}},
                       provenance={"table": table})

    mods = {q: next(iter(export_plan(plan(q), "llm-compressor")["quant_stage"]["quant_modifiers"])) for q in ("rtn", "gptq", None)}
    assert mods == {"rtn": "QuantizationModifier", "gptq": "GPTQModifier", None: "GPTQModifier"}
    doc = export_plan(plan("rtn"), "llm-compressor", modifier="GPTQModifier")
    assert "GPTQModifier" in doc["quant_stage"]["quant_modifiers"]


def test_consumer_targets_leave_the_output_projection_unplanned():
    from mpsearch import zoo

    llama = zoo.random_llama("tiny", hidden_size=128, intermediate_size=256, vocab_size=64)
    x = torch.randint(0, 64, (1, 8))
    vllm = get_estimator("weight-error").estimate(llama, x, progress=False, target="vllm")
    assert "lm_head" not in vllm.layers and len(vllm.layers) == 14
    mp = get_estimator("weight-error").estimate(llama, x, progress=False)
    assert "lm_head" in mp.layers


def test_llamacpp_offers_the_iquants_with_an_imatrix_only():
    t = get_target("llama.cpp")
    iq = {"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs"}
    assert iq <= set(t.options)
    assert not iq & set(t.default_options)  # the default search set without an imatrix
    with_imatrix = {o.name for o in t.parsed_options(imatrix=True)}
    assert iq | set(t.default_options) == with_imatrix
    assert {o.name for o in t.parsed_options()} == set(t.default_options)
    # the ones llama-quantize writes without an imatrix may be asked for without one
    assert [o.name for o in t.parsed_options("iq4_xs,iq3_s,q4_K")] == ["iq4_xs", "iq3_s", "q4_K"]
    for name in ("iq2_xxs", "iq1_m", "iq3_xxs"):
        with pytest.raises(MpsearchError, match=f"writes {name} only with an importance matrix.*--imatrix"):
            t.parsed_options(f"q4_K,{name}")
    rows = {r["option"]: r for r in t.describe()}
    assert rows["iq2_xs"]["bits_per_weight"] == 2.3125 and rows["iq2_xs"]["needs_imatrix"]
    assert rows["iq4_xs"]["default_with_imatrix"] and not rows["iq4_xs"]["default"]
    assert not rows["iq4_xs"]["needs_imatrix"]


def test_llamacpp_recipes_with_an_imatrix_add_the_iquant_mixes():
    from types import SimpleNamespace

    t = get_target("llama.cpp")
    layers = []
    for i in range(4):
        for name, shape in (("self_attn.q_proj", (512, 512)), ("self_attn.k_proj", (128, 512)),
                            ("self_attn.v_proj", (128, 512)), ("self_attn.o_proj", (512, 512)),
                            ("mlp.gate_proj", (1024, 512)), ("mlp.up_proj", (1024, 512)),
                            ("mlp.down_proj", (512, 1024))):
            layers.append(SimpleNamespace(name=f"model.layers.{i}.{name}", out_channels=shape[0],
                                          in_features=shape[1]))
    plain = t.recipes(layers)
    imat = t.recipes(layers, imatrix=True)
    assert "IQ2_M" not in plain and "pure-iq2_xs" not in plain and "IQ4_XS" in plain
    assert {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "pure-iq2_xs"} <= set(imat)
    for name, choice in imat.items():
        assert set(choice.values()) <= set(t.options), name
    assert set(imat["IQ2_XXS"].values()) >= {"iq2_xxs"}


def test_recipe_plans_follow_the_tables_rounding():
    """A table estimated with importance-matrix rounding (metadata ``imatrix``) is measured beside
    llama.cpp's i-quant mixes; one without, only beside the mixes llama-quantize writes without."""
    import pandas as pd
    from types import SimpleNamespace

    from mpsearch.table import CostTable
    from mpsearch.targets import recipe_plans

    t = get_target("llama.cpp")
    layers, rows = [], []
    for i in range(2):
        for name, shape in (("self_attn.q_proj", (512, 512)), ("self_attn.k_proj", (128, 512)),
                            ("self_attn.v_proj", (128, 512)), ("self_attn.o_proj", (512, 512)),
                            ("mlp.gate_proj", (768, 512)), ("mlp.up_proj", (768, 512)),
                            ("mlp.down_proj", (512, 768))):
            lay = SimpleNamespace(name=f"model.layers.{i}.{name}", out_channels=shape[0],
                                  in_features=shape[1])
            layers.append(lay)
            for opt in t.parsed_options(imatrix=True):
                if t.option_reason(lay, opt) is None:
                    rows.append({"layer": lay.name, "bits": opt.bits, "option": opt.name, "damage": 1.0,
                                 "size_bits": opt.size_bits(*shape), "params": shape[0] * shape[1]})
    frame = pd.DataFrame(rows)
    with_imatrix = recipe_plans(CostTable(frame, {"target": "llama.cpp", "imatrix": "sha256:0"}), t, layers)
    without = recipe_plans(CostTable(frame, {"target": "llama.cpp"}), t, layers)
    assert {"IQ2_XXS", "IQ1_M", "IQ2_M", "pure-iq2_xs"} <= set(with_imatrix)
    assert not {"IQ2_XXS", "IQ1_M", "IQ2_M", "pure-iq2_xs"} & set(without)
    assert {"IQ4_XS", "Q4_K_M"} <= set(without)
    plan = with_imatrix["IQ2_XXS"]
    assert plan.options["model.layers.1.self_attn.q_proj"]["name"] == "iq2_xxs"


def test_a_table_with_iquants_needs_its_imatrix_rounding_recorded():
    import pandas as pd

    from mpsearch.table import CostTable
    from mpsearch.targets import table_target

    frame = pd.DataFrame([{"layer": "a", "bits": 2, "option": "iq2_xs", "damage": 1.0, "size_bits": 10},
                          {"layer": "a", "bits": 4, "option": "q4_K", "damage": 0.5, "size_bits": 20}])
    assert table_target(CostTable(frame, {"target": "llama.cpp", "imatrix": "sha256:0"})).name == "llama.cpp"
    with pytest.raises(MpsearchError, match="iq2_xs only with an importance matrix"):
        table_target(CostTable(frame, {"target": "llama.cpp"}))
