"""Mixture-of-experts models are planned, every expert tensor, the way each consumer stores it
(issue 22): discovery and coverage on tiny random models of the families transformers builds,
per-expert quantization bit for bit, routed-token counts and the fallback for unrouted experts, the
estimators on stacked experts, apply/validate/export round trips, and the refusals."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import mpsearch
from mpsearch.cli import main
from mpsearch.errors import MpsearchError
from mpsearch.layers import discover_layers
from mpsearch.options import parse_option
from mpsearch.plan import BitPlan
from mpsearch.quant import quantize_matrix, quantize_weight

from moe_models import FAMILIES, GGUF_ARCH, calib, jetmoe, list_moe, tiny_moe, tokens

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
MODELS = __file__.rsplit("/", 1)[0] + "/moe_models.py"
#: the families of the done-when list (and more): Qwen3-MoE, Mixtral, DeepSeek-V3 (MLA, shared
#: experts), gpt-oss (transposed, biased, interleaved gate/up), Llama-4 (undecorated, transposed)
CI_FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "llama4_text", "qwen2_moe", "olmoe", "glm4_moe")


def expected_planned(model, target: str) -> int:
    """The weights a target can quantize, counted from the model's parameters by name alone (not by
    mpsearch): every parameter of 2+ dimensions except biases, the token embedding, the routers
    (``.gate``/``.router``/``shared_expert_gate``: one row per expert) and, for the serving stacks,
    ``lm_head``; tied weights once."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or name.endswith("bias") or id(p) in seen:
            continue
        seen.add(id(p))
        owner = name.rsplit(".", 1)[0]
        if owner.endswith(("embed_tokens", ".gate", ".router", "shared_expert_gate")):
            continue
        if target != "mpsearch" and target != "llama.cpp" and owner == "lm_head":
            continue
        total += p.numel()
    return total


def estimate(model, target=None, data=None, estimator="weight-error", **kw):
    options = {"llama.cpp": "q4_0,q8_0", "vllm": "w4a16-g32,w8a16"}.get(target, "int4,int8")
    return mpsearch.get_estimator(estimator, options=options, **kw.pop("settings", {})).estimate(
        model, data, progress=False, target=target, **kw)


def damage(table, layer, option):
    f = table.frame
    return float(f[(f.layer == layer) & (f.option == option)]["damage"].iloc[0])


# ------------------------------------------------------------------------------- discovery, coverage
@pytest.mark.parametrize("family", CI_FAMILIES)
@pytest.mark.parametrize("target", ["mpsearch", "llama.cpp", "vllm"])
def test_every_weight_the_target_can_quantize_is_planned(family, target):
    model = tiny_moe(family)
    table = estimate(model, target)
    planned = int(table.frame.drop_duplicates("layer")["params"].sum())
    assert planned == expected_planned(model, target)
    cov = table.metadata["coverage"]
    assert cov["target_share"] == 1.0 and cov["planned"] == planned
    stacked = [n for n, p in model.named_parameters() if p.dim() == 3]
    assert stacked and set(stacked) <= set(table.layers)  # every stacked expert tensor is a layer
    kept = {t["name"]: t["reason"] for t in cov["tensors"] if t["category"] == "kept"}
    routers = [n for n in kept if n.endswith((".gate", ".router"))]
    assert routers and (target != "llama.cpp" or all("ffn_gate_inp in F32" in kept[r] for r in routers))


def test_without_expert_discovery_the_experts_would_be_left_out(monkeypatch):
    """The coverage check sees what discovery misses: with expert discovery switched off, the stacked
    tensors are weights of a module mpsearch does not understand, and estimate refuses."""
    import mpsearch.moe as moe

    model = tiny_moe("qwen3_moe")
    real = moe.scan

    def no_experts(m):
        found = real(m)
        for t in found.experts:
            found.not_understood[t.name] = "expert discovery switched off"
        found.experts = []
        return found

    import mpsearch.coverage
    import mpsearch.layers
    import mpsearch.sensitivity.base

    for user in (moe, mpsearch.coverage, mpsearch.layers, mpsearch.sensitivity.base):  # every caller of scan
        monkeypatch.setattr(user, "scan", no_experts)
    with pytest.raises(MpsearchError, match=r"only \d+\.\d+%.*mlp\.experts\.gate_up_proj.*--exclude"):
        estimate(model)


def test_expert_layouts_and_per_expert_shapes():
    by = {lay.name: lay for lay in discover_layers(tiny_moe("qwen3_moe"))}
    gu = by["model.layers.0.mlp.experts.gate_up_proj"]
    assert (gu.kind, gu.role, gu.matrices, gu.out_channels, gu.in_features) == ("expert", "expert", 4, 64, 64)
    assert gu.extra["fused"] == "gate_up" and by["model.layers.0.mlp.gate"].kind == "router"
    oss = {lay.name: lay for lay in discover_layers(tiny_moe("gpt_oss"))}
    gu, dn = oss["model.layers.0.mlp.experts.gate_up_proj"], oss["model.layers.0.mlp.experts.down_proj"]
    # gpt-oss stores (experts, in, out) and applies x @ W[e]: rows = outputs = 2 * intermediate
    assert (gu.kind, gu.out_channels, gu.in_features, dn.out_channels, dn.in_features) == ("expert_t", 192, 64, 64, 96)
    l4 = {lay.name: lay for lay in discover_layers(tiny_moe("llama4_text"))}
    assert l4["model.layers.0.feed_forward.experts.down_proj"].kind == "expert_t"  # undecorated: known layout
    roles = {lay.name: lay.role for lay in discover_layers(tiny_moe("deepseek_v3"))}
    assert roles["model.layers.0.mlp.shared_experts.down_proj"] == "shared_expert"
    assert roles["model.layers.0.self_attn.q_a_proj"] is None


def test_a_model_with_an_unknown_expert_container_is_refused_not_half_planned(tmp_path, capsys):
    with pytest.raises(MpsearchError, match="JetMoeParallelExperts.*--exclude"):
        estimate(jetmoe())
    out = tmp_path / "t.csv"
    code = main(["estimate", "--model", f"{MODELS}:jetmoe", "--no-progress", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--exclude" in err[0] and not out.exists()
    code = main(["estimate", "--model", f"{MODELS}:jetmoe", "--no-progress", "--exclude", "input_linear",
                 "--exclude", "output_linear", "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and out.exists() and "excluded" in text and "--exclude" in text


def test_a_custom_module_holding_a_weight_is_refused():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16, 16))

        def forward(self, x):
            return x @ self.w

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), Odd())
    with pytest.raises(MpsearchError, match=r"'1\.w' \(256 weights: held by Odd"):
        estimate(model)
    assert estimate(model, exclude=[r"^1\.w$"]).metadata["coverage"]["excluded"] == 256


# ------------------------------------------------------------------------------- quantization
def _all_options():
    from mpsearch.formats import format_names

    return ["int4", "int3-asym", "int2-g32", "int8-g32-asym"] + list(format_names())


@pytest.mark.parametrize("kind,chunk", [("expert", None), ("expert_t", None), ("expert", 2 * 64 * 256)])
def test_stacked_experts_quantize_as_each_expert_matrix_alone(kind, chunk, monkeypatch):
    if chunk:  # experts quantized two at a time (the chunks that bound the float32 temporaries)
        monkeypatch.setattr("mpsearch.quant._CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    mats = torch.randn(3, 64, 256, generator=g) * torch.rand(3, 64, 1, generator=g)  # [experts, out, in]
    mats[1, :4] = 0.0
    stored = mats.transpose(1, 2).contiguous() if kind == "expert_t" else mats
    checked = 0
    for name in _all_options():
        opt = parse_option(name)
        if opt.fmt is not None and (opt.format.check_shape(64, 256) or getattr(opt.format, "needs_imatrix", None) == "c"):
            continue  # a shape the format cannot store; an i-quant whose search needs an imatrix
        got = quantize_weight(stored, opt, kind)
        got = got.transpose(1, 2) if kind == "expert_t" else got
        want = torch.stack([quantize_matrix(m, opt) for m in mats])
        assert torch.equal(got, want), name
        checked += 1
    assert checked >= 25


def test_a_shape_rule_holds_per_expert_matrix():
    lay = {lay.name: lay for lay in discover_layers(tiny_moe("qwen3_moe"))}["model.layers.0.mlp.experts.down_proj"]
    target = mpsearch.targets.get_target("llama.cpp")
    assert target.option_reason(lay, parse_option("q4_0")) is None  # rows of 32 (moe_intermediate)
    assert "256" in target.option_reason(lay, parse_option("q4_K"))
    # formats that quantize activations are not offered to fused experts
    assert "activations" in mpsearch.targets.get_target("vllm").option_reason(lay, parse_option("w8a8-fp8"))


# ------------------------------------------------------------------------------- routing, fallback
def test_routed_tokens_are_counted_as_the_router_routes():
    from mpsearch.moe import routing_counts, scan

    model = tiny_moe("qwen3_moe")
    seen = {}
    for i in range(2):
        model.model.layers[i].mlp.gate.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(i, seen.get(i, 0) + torch.bincount(out[2].flatten(), minlength=4)))
    data = tokens(2, 16, batches=2)
    routing = routing_counts(model, data, scan(model))
    for i in range(2):
        assert routing.counts[f"model.layers.{i}.mlp.experts"] == seen[i].tolist()
    assert routing.tokens == 64 and sum(routing.counts["model.layers.0.mlp.experts"]) == 64 * 2
    # Llama-4 gives its experts no indices: the router's scores are nonzero exactly for the chosen experts
    model = tiny_moe("llama4_text")
    chosen = []
    model.model.layers[0].feed_forward.router.register_forward_hook(
        lambda m, a, out: chosen.append((out[0] > 0).sum(0)))
    routing = routing_counts(model, data, scan(model))
    assert routing.counts["model.layers.0.feed_forward.experts"] == sum(chosen).tolist()


def _never_route_to(model, expert: int):
    """Make every router of a Qwen3-MoE model skip ``expert`` (its logit masked to -inf)."""
    for block in model.model.layers:
        gate = block.mlp.gate

        def forward(h, gate=gate):
            logits = F.linear(h.reshape(-1, gate.hidden_dim), gate.weight)
            logits[:, expert] = float("-inf")
            probs = torch.softmax(logits, dtype=torch.float, dim=-1)
            top, idx = torch.topk(probs, gate.top_k, dim=-1)
            top = (top / top.sum(-1, keepdim=True)).to(logits.dtype)
            return logits, top, idx

        gate.forward = forward


@pytest.mark.parametrize("estimator,settings", [("output-distance", {}), ("fisher", {}),
                                                ("hessian", {"probes": 4, "min_probes": 2})])
def test_an_unrouted_expert_gets_its_uniform_share_not_a_silent_zero(estimator, settings):
    model = tiny_moe("qwen3_moe")
    _never_route_to(model, 3)
    data = tokens(2, 16, batches=2)
    table = estimate(model, data=data, estimator=estimator, settings=settings)
    moe = table.metadata["moe"]
    counts = np.array(moe["routed_tokens"]["counts"]["model.layers.0.mlp.experts"], dtype=float)
    assert counts[3] == 0 and moe["fallback"]["model.layers.0.mlp.experts.down_proj"] == [3]
    f = table.frame.set_index(["layer", "option"])
    name = "model.layers.0.mlp.experts.down_proj"
    w = model.get_parameter(name).detach()
    for opt in ("int4", "int8"):
        err = np.array([float((quantize_matrix(w[e], parse_option(opt)) - w[e]).pow(2).sum()) for e in range(4)])
        total, added = f.loc[(name, opt), "damage"], f.loc[(name, opt), "damage_fallback"]
        measured = total - added
        share = counts / counts.sum()
        assert measured > 0 and added > 0
        assert added == pytest.approx(0.25 * err[3] * measured / float((share * err).sum()), rel=1e-9)
        assert f.loc[(name, opt), "routed_tokens"] == 0
    dense = f.loc[("model.layers.0.self_attn.q_proj", "int4")]
    assert dense["damage_fallback"] == 0 and dense["routed_tokens"] == 64


def test_per_expert_layers_of_an_unrouted_expert_are_not_zero():
    model = tiny_moe("qwen3_moe")
    _never_route_to(model, 3)
    table = estimate(model, data=tokens(2, 16, batches=2), estimator="output-distance", per_expert=True)
    p = table.pivot("damage")
    fb = table.pivot("damage_fallback")
    name = "model.layers.0.mlp.experts.down_proj"
    assert fb.loc[f"{name}[3]", "int4"] == p.loc[f"{name}[3]", "int4"] > 0  # all of it is the fallback
    assert (fb.loc[[f"{name}[{e}]" for e in range(3)]].to_numpy() == 0).all()


def test_estimate_cost_is_one_suffix_pass_per_option_for_a_stacked_tensor():
    model = tiny_moe("qwen3_moe")
    table = estimate(model, data=tokens(2, 16), estimator="output-distance")
    experts = [n for n in table.layers if ".experts." in n]
    dense = [n for n in table.layers if n not in experts]
    # dense layers: their 2 options stacked in one pass; each stacked expert tensor: 2 passes
    assert table.metadata["cost"]["suffix_passes"] == len(dense) + 2 * len(experts) == 9 + 8


def test_output_distance_of_an_expert_tensor_is_the_kl_of_quantizing_it():
    model = tiny_moe("qwen3_moe")
    data = tokens(2, 16)
    table = estimate(model, data=data, estimator="output-distance")
    name = "model.layers.1.mlp.experts.gate_up_proj"
    p = model.get_parameter(name)
    with torch.no_grad():
        ref = F.log_softmax(model(data[0]).logits.reshape(-1, 128).double(), -1)
        for opt in ("int4", "int8"):
            saved = p.detach().clone()
            p.copy_(quantize_weight(saved, parse_option(opt), "expert"))
            out = F.log_softmax(model(data[0]).logits.reshape(-1, 128).double(), -1)
            p.copy_(saved)
            kl = float(F.kl_div(out, ref, log_target=True, reduction="batchmean"))
            assert damage(table, name, opt) == pytest.approx(kl, rel=1e-6)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "llama4_text"])
def test_every_estimator_runs_on_stacked_experts(family):
    model = tiny_moe(family)
    data = tokens(2, 16, batches=2)
    runs = [("weight-error", {}), ("weight-error", {"weighted": True}), ("output-distance", {}), ("fisher", {}),
            ("hessian", {"probes": 3, "min_probes": 2}), ("hessian", {"probes": 2, "min_probes": 2, "mode": "diagonal"}),
            ("lim", {})]
    for name, settings in runs:
        if family == "llama4_text" and settings.get("weighted"):
            with pytest.raises(MpsearchError, match="not given its routing indices"):
                estimate(model, data=data, estimator=name, settings=settings)
            continue
        table = estimate(model, data=data, estimator=name, settings=settings)
        p = table.pivot("damage")
        ex = [n for n in p.index if ".experts." in n]
        assert len(ex) == 4 and np.isfinite(p.to_numpy()).all() and (p.to_numpy() >= 0).all(), name
        assert (p.loc[ex, "int4"] >= p.loc[ex, "int8"]).all() and (p.loc[ex, "int4"] > 0).all(), (name, settings)
    with pytest.raises(MpsearchError, match="lrp: .* stacked expert tensor"):
        estimate(model, data=data, estimator="lrp")


def test_hessian_traces_stacked_experts_by_expert():
    model = tiny_moe("qwen3_moe")
    data = tokens(2, 16)
    kw = {"probes": 4, "min_probes": 4}
    whole = estimate(model, data=data, estimator="hessian", settings=kw)
    split = estimate(model, data=data, estimator="hessian", settings=kw, per_expert=True)
    name = "model.layers.0.mlp.experts.down_proj"
    t_whole = whole.metadata["uncertainty"]["trace"][name]
    t_split = [split.metadata["uncertainty"]["trace"][f"{name}[{e}]"] for e in range(4)]
    assert t_whole == pytest.approx(sum(t_split), rel=1e-9)  # the same probes, summed by expert
    # per tensor, each expert's trace weighs its own error: the per-expert damages add up
    for opt in ("int4", "int8"):
        assert damage(whole, name, opt) == pytest.approx(sum(damage(split, f"{name}[{e}]", opt) for e in range(4)),
                                                         rel=1e-9)


# ------------------------------------------------------------------------------- apply, validate
def test_apply_and_validate_stacked_and_per_expert_plans():
    model = tiny_moe("gpt_oss")
    table = estimate(model, per_expert=True)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    spec = {n: ("int3" if n.endswith("[1]") else "int8") for n in table.layers}
    plan = BitPlan(bits={n: parse_option(o).bits for n, o in spec.items()},
                   options={n: parse_option(o).to_dict() for n, o in spec.items()})
    q = mpsearch.apply_plan(model, plan)
    w, wq = model.get_parameter(name).detach(), q.get_parameter(name).detach()
    for e, opt in ((0, "int8"), (1, "int3")):  # (experts, in, out): expert e's matrix is W[e].T
        assert torch.equal(wq[e].t(), quantize_matrix(w[e].t(), parse_option(opt)))
    report = mpsearch.validate_plan(model, plan, quantized=q)
    rows = {r["layer"]: r for r in report.layers}
    assert rows[f"{name}[1]"]["max_levels"] <= 8 and rows[f"{name}[1]"]["params"] == 192 * 64
    assert report.coverage["target_share"] == 1.0
    whole = BitPlan(bits={name: 4}, options={name: parse_option("int4").to_dict()})
    report = mpsearch.validate_plan(model, whole, min_coverage=0.0)
    row = report.layers[0]
    assert row["experts"] == 4 and len(row["expert_max_levels"]) == 4 and max(row["expert_max_levels"]) <= 16
    assert row["size_bits"] == 4 * parse_option("int4").size_bits(192, 64)
    with pytest.raises(MpsearchError, match=r"only .* --exclude"):
        mpsearch.validate_plan(model, whole, min_coverage=1.0)  # the rest of the model is unplanned


def test_per_expert_layers_are_for_the_mpsearch_target_only():
    with pytest.raises(MpsearchError, match="per_expert: target 'llama.cpp'"):
        estimate(tiny_moe("qwen3_moe"), "llama.cpp", per_expert=True)


# ------------------------------------------------------------------------------- export
def _solved(model, target, avg_bits):
    table = estimate(model, target)
    return mpsearch.get_solver("ilp").solve(table, mpsearch.Budget.parse([f"avg_bits={avg_bits}"])).plan


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "gpt_oss", "llama4_text"])
def test_llamacpp_names_are_gguf_pys_for_the_arch_and_read_back(family):
    pytest.importorskip("gguf")
    from mpsearch.export import export_plan, import_plan

    model = tiny_moe(family)
    plan = _solved(model, "llama.cpp", 6)
    doc = export_plan(plan, "llama.cpp")
    assert doc == export_plan(plan, "llama.cpp", arch=GGUF_ARCH[family])  # convert_hf_to_gguf.py's names
    for i in range(2):
        gu = plan.option_name(next(n for n in plan.layers if re.search(rf"layers\.{i}\..*experts\.gate_up_proj$", n)))
        assert doc[rf"^blk\.{i}\.ffn_gate_exps\.weight$"] == doc[rf"^blk\.{i}\.ffn_up_exps\.weight$"] == gu
        assert rf"^blk\.{i}\.ffn_down_exps\.weight$" in doc
        assert not any("gate_inp" in k for k in doc)
    back = import_plan(doc, "llama.cpp", layers=model)
    assert {n: back.option_name(n) for n in back.layers} == {n: plan.option_name(n) for n in plan.layers}


def test_llamacpp_size_of_a_fused_gate_up_is_its_two_gguf_tensors():
    from mpsearch.formats import get_format

    lay = {lay.name: lay for lay in discover_layers(tiny_moe("qwen3_moe"))}["model.layers.0.mlp.experts.gate_up_proj"]
    for t in ("q4_0", "q8_0", "q5_1"):
        half = get_format(t).size_bits(4 * 32, 64)  # ffn_gate_exps: 4 experts x 32 rows of 64
        assert lay.size_bits(parse_option(t)) == 2 * half  # + ffn_up_exps, the same


def test_per_expert_linears_are_one_gguf_tensor_per_projection():
    model = list_moe()
    table = estimate(model, "llama.cpp", data=tokens(2, 16))
    groups = table.groups
    w1 = [f"model.layers.0.block_sparse_moe.experts.{e}.w1" for e in range(4)]
    assert len({groups[n] for n in w1}) == 1 and groups[w1[0]] != groups["model.layers.0.block_sparse_moe.experts.0.w2"]
    counts = table.metadata["moe"]["routed_tokens"]["counts"]["model.layers.0.block_sparse_moe.experts"]
    assert sum(counts) == 32 * 2
    plan = mpsearch.get_solver("ilp").solve(table, mpsearch.Budget.parse(["avg_bits=6"])).plan
    from mpsearch.export import export_plan

    doc = export_plan(plan, "llama.cpp")
    assert doc[r"^blk\.0\.ffn_gate_exps\.weight$"] == plan.option_name(w1[0])
    bad = BitPlan(bits={**plan.bits, w1[1]: 4}, options={**plan.options, w1[1]: parse_option("q4_0").to_dict()})
    if plan.option_name(w1[0]) != "q4_0":
        with pytest.raises(MpsearchError, match="one GGUF tensor"):
            export_plan(bad, "llama.cpp")


def _linearized(model):
    """The model as llm-compressor unfuses it (``llmcompressor/modeling/moe/linearize.py``): each
    experts module becomes a ModuleList of per-expert gate_proj/up_proj/down_proj Linears."""
    import copy

    lin = copy.deepcopy(model)
    for i, block in enumerate(lin.model.layers):
        ex = block.mlp.experts
        inter = ex.down_proj.shape[2]
        experts = torch.nn.ModuleList()
        for e in range(ex.gate_up_proj.shape[0]):
            m = torch.nn.Module()
            for proj, w in (("gate_proj", ex.gate_up_proj[e, :inter]), ("up_proj", ex.gate_up_proj[e, inter:]),
                            ("down_proj", ex.down_proj[e])):
                layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                layer.weight.data.copy_(w)
                setattr(m, proj, layer)
            experts.append(m)
        block.mlp.experts = experts
    return lin


def test_llmcompressor_recipe_targets_the_experts_llmcompressor_makes():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from consumer_oracles import ct_qparams

    from mpsearch.export import export_text

    model = tiny_moe("qwen3_moe")
    plan = _solved(model, "vllm", 6)
    options = {plan.option_name(n) for n in plan.layers if ".experts." in n}
    body = yaml.safe_load(export_text(plan, "llm-compressor"))["quant_stage"]["quant_modifiers"]
    body = next(iter(body.values()))
    lin = _linearized(model)
    apply_quantization_config(lin, QuantizationConfig(config_groups=body["config_groups"], ignore=body["ignore"]))
    for i in range(2):
        gu, dn = (f"model.layers.{i}.mlp.experts.{p}" for p in ("gate_up_proj", "down_proj"))
        assert plan.option_name(gu) == plan.option_name(dn)  # vLLM's FusedMoE: one scheme per layer
        want = parse_option(plan.option_name(gu))
        stacked = quantize_weight(model.get_parameter(gu).detach(), want, "expert")
        for e in range(4):
            for proj, rows in (("gate_proj", slice(0, 32)), ("up_proj", slice(32, 64))):
                mod = lin.get_submodule(f"model.layers.{i}.mlp.experts.{e}.{proj}")
                scheme = mod.quantization_scheme
                assert scheme.weights.group_size == want.format.level_group
                w = mod.weight.detach()
                scale, zp, gs = ct_qparams(w, scheme.weights)
                assert torch.equal(fake_quantize(w, scale, zp, scheme.weights, global_scale=gs), stacked[e, rows])
    assert options


def test_vllm_ties_a_layers_experts_and_export_refuses_a_split():
    model = tiny_moe("qwen3_moe")
    table = estimate(model, "vllm")
    g = table.groups
    assert g["model.layers.0.mlp.experts.gate_up_proj"] == g["model.layers.0.mlp.experts.down_proj"]
    assert g["model.layers.0.mlp.experts.down_proj"] != g.get("model.layers.1.mlp.experts.down_proj")
    plan = _solved(model, "vllm", 6)
    name = "model.layers.0.mlp.experts.down_proj"
    other = "w8a16" if plan.option_name(name) != "w8a16" else "w4a16-g32"
    split = BitPlan(bits={**plan.bits, name: parse_option(other).bits},
                    options={**plan.options, name: parse_option(other).to_dict()}, provenance=plan.provenance)
    from mpsearch.export import export_plan

    with pytest.raises(MpsearchError, match="one fused MoE layer"):
        export_plan(split, "llm-compressor")
    assert export_plan(split, "llm-compressor", force=True)


@pytest.mark.parametrize("to,why", [("torchao", "2-d and 4-d")])
def test_other_exporters_refuse_stacked_experts_in_one_line(to, why, tmp_path, capsys):
    """torchao refuses stacked experts; GPTQModel, AutoRound and ModelOpt write them
    (tests/test_export_moe_consumers.py)."""
    from mpsearch.export import export_plan

    name = "model.layers.0.mlp.experts.down_proj"
    opt = {"torchao": "intx-4-g32"}[to]
    plan = BitPlan(bits={name: 4}, options={name: parse_option(opt).to_dict()})
    with pytest.raises(MpsearchError, match=f"stacked expert tensors.*{why}"):
        export_plan(plan, to)
    path = tmp_path / "p.json"
    plan.save(path)
    assert main(["export", "--plan", str(path), "--to", to, "-o", str(tmp_path / "out")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    sliced = BitPlan(bits={name + "[2]": 4}, options={name + "[2]": parse_option("q4_0").to_dict()})
    with pytest.raises(MpsearchError, match="one expert of a stacked expert tensor"):
        export_plan(sliced, "llama.cpp")


# ------------------------------------------------------------------------------- the CLI, end to end
def test_cli_estimate_solve_export_import_validate(tmp_path, capsys):
    table, plan, types = (str(tmp_path / n) for n in ("t.csv", "p.json", "types.txt"))
    spec = f"{MODELS}:qwen3"
    assert main(["estimate", "--model", spec, "--data", f"{MODELS}:calib", "--target", "llama.cpp",
                 "--bits", "q4_0,q8_0", "--no-progress", "-o", table]) == 0
    out = capsys.readouterr().out
    assert "100.00% of what target 'llama.cpp' can quantize" in out and "ffn_gate_inp in F32" in out
    assert main(["solve", "--table", table, "--solver", "ilp", "--budget", "avg_bits=6", "-o", plan]) == 0
    assert "coverage: plans" in capsys.readouterr().out
    assert main(["export", "--plan", plan, "-o", types]) == 0
    assert "coverage: plans" in capsys.readouterr().out
    text = open(types).read()
    assert "ffn_gate_exps" in text and "ffn_down_exps" in text
    assert main(["import", "--from", "llama.cpp", types, "--model", spec, "-o", str(tmp_path / "back.json")]) == 0
    back = BitPlan.load(tmp_path / "back.json")
    assert set(back.layers) == set(BitPlan.load(plan).layers)
    assert main(["validate", "--model", spec, "--plan", plan]) == 0
    assert "levels ok in all 13 planned layers" in capsys.readouterr().out
    # a plan from a table that covers less than what the target can quantize is refused
    part = BitPlan.load(plan)
    keep = part.layers[:3]
    BitPlan(bits={n: part.bits[n] for n in keep}, options={n: part.options[n] for n in keep},
            provenance=part.provenance).save(tmp_path / "part.json")
    assert main(["validate", "--model", spec, "--plan", str(tmp_path / "part.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--exclude" in err[0] and "experts" in err[0]
    # a hand-made plan (no coverage record) may leave layers at 16 bits: reported, not refused
    BitPlan(bits={n: part.bits[n] for n in keep}, options={n: part.options[n] for n in keep},
            provenance={"table": {"target": "llama.cpp"}}).save(tmp_path / "hand.json")
    assert main(["validate", "--model", spec, "--plan", str(tmp_path / "hand.json")]) == 0
    assert "not named by the plan" in capsys.readouterr().out


def test_the_gpu_timing_script_counts_the_suffix_passes_it_runs(tmp_path):
    """experiments/moe_speed.py (the Qwen3-30B-A3B-shaped table on a GPU) at its tiny shape on the CPU:
    the work it predicts before running is the work the estimator reports after."""
    import importlib.util
    import json

    path = __file__.rsplit("/", 2)[0] + "/experiments/moe_speed.py"
    spec = importlib.util.spec_from_file_location("moe_speed", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for stack in (None, 2):
        args = ["--tiny", "--device", "cpu", "--dtype", "float32", "--calib-samples", "4", "--seq-len", "16",
                "--batch-size", "2", "--options", "int3-asym,int4-asym,int8-asym", "--out", str(tmp_path)] + (["--stack-options", str(stack)] if stack else [])
        assert script.main(args) == 0
    recs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    for rec in recs:
        assert rec["cost"]["suffix_passes"] == rec["expected"]["suffix_passes"]
        assert rec["coverage"]["target_share"] == 1.0
    assert recs[1]["cost"]["suffix_passes"] > recs[0]["cost"]["suffix_passes"]
