"""Exporters and importers of bit plans (torch-free parts and the CLI).

Tests against the consumers' own installed code live in test_export_consumers.py; here every format
is checked against its documented schema and semantics, and every importer round-trips.
"""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest
import yaml

from mpsearch.cli import main
from mpsearch.export import (ExportError, export_plan, export_text, format_names, get_exporter,
                             import_plan, save_export)
from mpsearch.export._base import compact_pattern
from mpsearch.export.gptqmodel_dynamic import resolve
from mpsearch.export.llamacpp_types import KEEP_TYPES, TYPES, llama_gguf_name
from mpsearch.options import parse_option
from mpsearch.plan import BitPlan

PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def llama_names(blocks=4, head=True):
    names = [f"model.layers.{i}.{p}" for i in range(blocks) for p in PROJ]
    return names + (["lm_head"] if head else [])


def make_plan(choice) -> BitPlan:
    """A plan from ``{layer: option spec}``."""
    opts = {n: parse_option(o) for n, o in choice.items()}
    return BitPlan(bits={n: o.bits for n, o in opts.items()}, options={n: o.to_dict() for n, o in opts.items()},
                   predicted={"damage": 1.0})


def tied_plan(specs=("int4-g32", "int8", "int2", "int3-g32-asym", "keep", "int4", "int8-g64", "int5"),
              blocks=4, seed=0) -> BitPlan:
    """A Llama-like plan whose fused siblings (q/k/v, gate/up) share one option."""
    rng = random.Random(seed)
    choice = {}
    for i in range(blocks):
        qkv, gu = rng.choice(specs), rng.choice(specs)
        for p in PROJ:
            leaf = p.split(".")[1]
            choice[f"model.layers.{i}.{p}"] = qkv if leaf in ("q_proj", "k_proj", "v_proj") else (
                gu if leaf in ("gate_proj", "up_proj") else rng.choice(specs))
    choice["lm_head"] = rng.choice(specs)
    return make_plan(choice)


def options_of(plan):
    """Each layer's exact integer settings (a consumer's integer format counts as its settings)."""
    from mpsearch.export._base import int_settings

    return {n: (o.bits, o.group_size, o.symmetric) for n, o in ((n, int_settings(plan.option(n))) for n in plan.layers)}


# ----------------------------------------------------------------- registry and checks
def test_format_names_and_aliases():
    assert format_names() == ["torchao", "gptqmodel", "llm-compressor", "llama.cpp", "autoround", "modelopt"]
    assert get_exporter("GGUF").name == "llama.cpp"
    assert get_exporter("compressed-tensors").name == "llm-compressor"


def test_unknown_format_and_setting():
    plan = tied_plan()
    with pytest.raises(ExportError, match=r"unknown export format 'gguff'.*did you mean 'gguf'.*available: torchao"):
        export_plan(plan, "gguff")
    with pytest.raises(ExportError, match=r"format 'llama.cpp' does not take the settings \['colour'\]; it takes: arch, keep_type"):
        export_plan(plan, "llama.cpp", colour=1)
    with pytest.raises(ExportError, match="export_plan needs a BitPlan, got dict"):
        export_plan({"a": 4}, "torchao")


@pytest.mark.parametrize("fmt,spec,msg", [
    ("llama.cpp", "int7", r"llama.cpp cannot express the option of 1 layer\(s\): 'lm_head \(int7\)'; GGUF has types for 2, 3, 4, 5, 6 and 8"),
    ("llama.cpp", "int1", r"llama.cpp cannot express .*int1"),
    ("gptqmodel", "int5", r"gptqmodel cannot express .*'lm_head \(int5\)'; GPTQModel quantizes to 2, 3, 4 or 8 bits"),
    ("modelopt", "int3", r"modelopt cannot express .*int3.*int8 per channel \(W8A16\) and int4 in groups \(W4A16_AWQ\)"),
    ("modelopt", "int4-g32-asym", r"modelopt cannot express .*'lm_head \(int4-g32-asym\)'"),
    ("modelopt", "int4", r"modelopt cannot express .*'lm_head \(int4\)'"),
    ("modelopt", "int8-g32", r"modelopt cannot express .*'lm_head \(int8-g32\)'"),
    ("autoround", "int1", r"autoround cannot express .*int1.*2-8 bits"),
    ("autoround", "int8-asym", r"autoround cannot express .*'lm_head \(int8-asym\)'; AutoRound refuses 8-bit asymmetric"),
    ("llm-compressor", "int1", r"llm-compressor cannot express .*int1.*2-8 bits"),
])
def test_unexportable_option_is_refused(fmt, spec, msg):
    choice = {n: "int4-g32" for n in llama_names(1)}
    choice["lm_head"] = spec
    with pytest.raises(ExportError, match=msg):
        export_plan(make_plan(choice), fmt)


def test_every_format_exports_what_it_can_express():
    plan = make_plan({n: ("int4-g32" if "mlp" in n else "int8") for n in llama_names(2)} | {"lm_head": "keep"})
    for fmt in format_names():
        assert export_text(plan, fmt).strip(), fmt


# ----------------------------------------------------------------- runtime ties
def test_fused_disagreement_is_refused_with_names_unless_forced():
    choice = {n: "int4-g32" for n in llama_names(2)}
    choice["model.layers.1.self_attn.k_proj"] = "int8"
    plan = make_plan(choice)
    for fmt in ("gptqmodel", "llm-compressor", "autoround", "modelopt"):
        with pytest.raises(ExportError, match=(
                rf"{re.escape(fmt)}: these layers are fused into one matrix by .*: "
                r"model\.layers\.1\.self_attn\.q_proj=int4-g32, model\.layers\.1\.self_attn\.k_proj=int8, "
                r"model\.layers\.1\.self_attn\.v_proj=int4-g32; re-solve with a tie .* or export anyway with --force")):
            export_plan(plan, fmt)
        assert export_plan(plan, fmt, force=True)
    # torchao quantizes modules one by one and llama.cpp keeps attn_q/k/v apart: no refusal
    assert export_plan(plan, "torchao") and export_plan(plan, "llama.cpp")


def test_gate_up_disagreement_is_named():
    choice = {n: "int4" for n in llama_names(1)}
    choice["model.layers.0.mlp.up_proj"] = "int4-g32"
    with pytest.raises(ExportError, match=r"gate_proj=int4, model\.layers\.0\.mlp\.up_proj=int4-g32"):
        export_plan(make_plan(choice), "modelopt")


# ----------------------------------------------------------------- compact regexes
def test_compact_pattern_matches_exactly_its_names_brute_force():
    universe = llama_names(12) + ["model.embed_tokens", "features.0", "features.10", "0", "1", "classifier"]
    rng = random.Random(1)
    for _ in range(200):
        chosen = rng.sample(universe, rng.randint(1, 40))
        rx = re.compile(compact_pattern(chosen))
        for name in universe:
            assert bool(rx.match(name)) == (name in chosen), (name, rx.pattern)
    # one index set shared by several projections collapses into one alternation
    pat = compact_pattern([f"model.layers.{i}.{p}" for i in (1, 5) for p in ("mlp.up_proj", "mlp.gate_proj")])
    assert pat == r"^model\.layers\.(?:1|5)(?:\.mlp\.up_proj|\.mlp\.gate_proj)$"


# ----------------------------------------------------------------- GPTQModel
def test_gptqmodel_resolver_follows_the_documented_dynamic_example():
    # GPTQModel README "dynamic" example: +: override, bare regex = override, -: skip.
    doc = {"bits": 4, "group_size": 128, "sym": True, "dynamic": {
        r"+:.*\.18\..*gate.*": {"bits": 8, "group_size": 64},
        r".*\.19\..*gate.*": {"bits": 8, "group_size": 64},
        r"-:.*\.20\..*": {},
    }}
    assert resolve(doc, "model.layers.18.mlp.gate_proj").name == "int8-g64"
    assert resolve(doc, "model.layers.19.mlp.gate_proj").name == "int8-g64"
    assert resolve(doc, "model.layers.20.mlp.gate_proj").is_keep
    assert resolve(doc, "model.layers.18.mlp.up_proj").name == "int4-g128"
    assert resolve(doc, "lm_head").is_keep  # lm_head is only quantized with lm_head=True


@pytest.mark.parametrize("seed", range(5))
def test_gptqmodel_export_is_compact_and_round_trips(seed, tmp_path):
    plan = tied_plan(specs=("int4-g32", "int8", "int2", "int3-g32-asym", "keep", "int4"), blocks=6, seed=seed)
    doc = export_plan(plan, "gptqmodel")
    opts = {plan.option(n) for n in plan.layers}
    keep = any(o.is_keep for o in opts)
    quantized = {o for o in opts if not o.is_keep}
    # one key per non-default option, one -: key for the kept layers
    assert len(doc["dynamic"]) == len(quantized) - 1 + keep
    assert all(k.startswith(("+:", "-:")) for k in doc["dynamic"])
    assert set(doc) <= {"bits", "group_size", "sym", "dynamic", "lm_head"}
    assert doc["bits"] in (2, 3, 4, 8) and (doc["group_size"] == -1 or doc["group_size"] > 0)
    for name in plan.layers:
        assert resolve(doc, name).name == plan.option(name).name
    path = save_export(plan, "gptqmodel", tmp_path / "qc.json")
    back = import_plan(path, "gptqmodel", layers=plan.layers)
    assert options_of(back) == options_of(plan)
    assert back.provenance["imported_from"] == "gptqmodel"


def test_gptqmodel_import_needs_layer_names(tmp_path):
    path = save_export(tied_plan(specs=("int4", "int8")), "gptqmodel", tmp_path / "qc.json")
    with pytest.raises(ExportError, match="names layers by regex, so importing it needs the model's layer names"):
        import_plan(path, "gptqmodel")
    with pytest.raises(ExportError, match="not a GPTQModel QuantizeConfig"):
        import_plan({"hello": 1}, "gptqmodel", layers=["a"])


def test_gptqmodel_all_keep_is_refused():
    with pytest.raises(ExportError, match="keeps every layer at 16 bits; there is nothing to quantize"):
        export_plan(make_plan({n: "keep" for n in llama_names(1)}), "gptqmodel")


# ----------------------------------------------------------------- torchao (JSON form)
@pytest.mark.parametrize("seed", range(3))
def test_torchao_json_round_trip(seed, tmp_path):
    plan = tied_plan(seed=seed)
    path = save_export(plan, "torchao", tmp_path / "ao.json")
    doc = json.loads(path.read_text())
    assert doc["_type"] == "FqnToConfig"
    assert list(doc["_data"]["fqn_to_config"]) == plan.layers
    back = import_plan(path, "torchao")
    assert back.bits == plan.bits and options_of(back) == options_of(plan)


def test_torchao_import_resolves_regex_and_default_and_other_configs():
    def intx(bits, group=None):
        gran = ({"_type": "PerGroup", "_data": {"group_size": group}} if group
                else {"_type": "PerAxis", "_data": {"axis": 0}})
        return {"_type": "IntxWeightOnlyConfig", "_data": {"weight_dtype": {"_type": "torch.dtype", "_data": f"int{bits}"},
                                                           "granularity": gran}}
    doc = {"_type": "FqnToConfig", "_data": {"fqn_to_config": {
        "model.layers.0.mlp.down_proj": intx(8),
        r"re:model\.layers\.\d+\.self_attn\..*": intx(3, 32),
        "lm_head": None,
        "model.layers.1.mlp.up_proj": {"_type": "Int4WeightOnlyConfig", "_data": {"group_size": 64}},
        "_default": {"_type": "Int8WeightOnlyConfig", "_data": {}},
    }}}
    names = llama_names(2)
    got = {n: o.name for n, o in ((n, import_plan(doc, "torchao", layers=names).option(n)) for n in names)}
    assert got["model.layers.0.mlp.down_proj"] == "int8"
    assert got["model.layers.1.self_attn.k_proj"] == "int3-g32"
    assert got["model.layers.1.mlp.up_proj"] == "int4-g64-asym"
    assert got["model.layers.0.mlp.gate_proj"] == "int8"  # _default
    assert got["lm_head"] == "keep"
    with pytest.raises(ExportError, match="names layers by regex"):
        import_plan(doc, "torchao")
    with pytest.raises(ExportError, match="not a torchao FqnToConfig"):
        import_plan({"_type": "Int4WeightOnlyConfig"}, "torchao")
    bad = {"_type": "FqnToConfig", "_data": {"fqn_to_config": {"a": {"_type": "Float8WeightOnlyConfig", "_data": {}}}}}
    with pytest.raises(ExportError, match="'a' has a Float8WeightOnlyConfig config; mpsearch reads weight-only integer"):
        import_plan(bad, "torchao")


# ----------------------------------------------------------------- llama.cpp
def test_llamacpp_file_follows_llama_quantize_syntax(tmp_path):
    plan = tied_plan(specs=("int2", "int3", "int4-g32", "int5", "int6", "int8", "keep"), blocks=3)
    text = save_export(plan, "llama.cpp", tmp_path / "t.txt", keep_type="bf16").read_text()
    tokens = text.split()
    assert len(tokens) == len(plan.layers)  # one token per tensor, nothing else (no comments)
    table = dict(t.split("=", 1) for t in tokens)
    expect = {2: "q2_K", 3: "q3_K", 4: "q4_K", 5: "q5_K", 6: "q6_K", 8: "q8_0", 16: "bf16"}
    for name in plan.layers:
        tensor = llama_gguf_name(name) + ".weight"
        hits = [p for p in table if re.search(p, tensor)]
        assert len(hits) == 1 and table[hits[0]] == expect[plan.bits[name]]
        assert hits[0] == hits[0].lower()  # llama-quantize lower-cases patterns
    assert "^blk\\.0\\.attn_q\\.weight$" in table and "^output\\.weight$" in table


def test_llamacpp_name_map():
    assert llama_gguf_name("model.layers.7.self_attn.o_proj") == "blk.7.attn_output"
    assert llama_gguf_name("layers.2.mlp.down_proj") == "blk.2.ffn_down"
    assert llama_gguf_name("model.embed_tokens") == "token_embd"
    assert llama_gguf_name("lm_head") == "output"
    assert llama_gguf_name("model.layers.0.mlp.router") is None
    with pytest.raises(ExportError, match=r"no GGUF tensor name for 'classifier' \(arch 'llama'\)"):
        export_plan(make_plan({"classifier": "int4"}), "llama.cpp")
    with pytest.raises(ExportError, match="keep_type must be one of f16, bf16, f32"):
        export_plan(make_plan({"lm_head": "keep"}), "llama.cpp", keep_type="q4_0")


@pytest.mark.parametrize("seed", range(3))
def test_llamacpp_round_trip(seed, tmp_path):
    exact = tied_plan(specs=("int2", "int3", "int4", "int5", "int6", "int8", "keep"), seed=seed)
    path = save_export(exact, "llama.cpp", tmp_path / "t.txt")
    assert options_of(import_plan(path, "llama.cpp")) == options_of(exact)
    # grouped options: GGUF fixes its own blocks, so the bits come back
    grouped = tied_plan(specs=("int4-g32", "int8-g64", "int3-g32-asym", "keep"), seed=seed)
    path = save_export(grouped, "llama.cpp", tmp_path / "g.txt")
    assert import_plan(path, "llama.cpp").bits == grouped.bits
    assert import_plan(path, "llama.cpp", layers=grouped.layers).bits == grouped.bits


def test_llamacpp_import_of_hand_written_patterns(tmp_path):
    path = tmp_path / "hand.txt"
    path.write_text("attn_v=q8_0 ffn_down=Q6_K\nblk\\.[0-9]+\\.=q4_0\noutput.weight=f16\n")
    plan = import_plan(path, "llama.cpp", layers=llama_names(2))
    assert plan.bits["model.layers.1.self_attn.v_proj"] == 8   # first matching pattern wins
    assert plan.bits["model.layers.0.mlp.down_proj"] == 6
    assert plan.bits["model.layers.0.self_attn.q_proj"] == 4
    assert plan.bits["lm_head"] == 16
    with pytest.raises(ExportError, match=r"pattern 'attn_v' is not one Llama tensor name; pass the model's layer names"):
        import_plan(path, "llama.cpp")
    path.write_text("blk.0.attn_q.weight\n")
    with pytest.raises(ExportError, match=r"'blk.0.attn_q.weight' is not PATTERN=TYPE"):
        import_plan(path, "llama.cpp")
    path.write_text("^blk\\.0\\.attn_q\\.weight$=q9_K\n")
    with pytest.raises(ExportError, match="unknown GGML type 'q9_K'"):
        import_plan(path, "llama.cpp")
    path.write_text("\n")
    with pytest.raises(ExportError, match="the tensor-type file is empty"):
        import_plan(path, "llama.cpp")


# ----------------------------------------------------------------- llm-compressor (schema)
def test_llmcompressor_recipe_schema():
    plan = tied_plan(specs=("int4-g32", "int8", "int3-g32-asym", "keep"), blocks=3)
    text = export_text(plan, "llm-compressor", modifier="QuantizationModifier")
    doc = yaml.safe_load(text)
    body = doc["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    seen = {}
    for group in body["config_groups"].values():
        assert set(group) == {"targets", "weights"}
        w = group["weights"]
        assert w["type"] == "int" and w["dynamic"] is False
        assert w["strategy"] == ("group" if "group_size" in w else "channel")
        for t in group["targets"]:
            seen[t] = (w["num_bits"], w.get("group_size"), w["symmetric"])
    for name in plan.layers:
        o = plan.option(name)
        assert (name in body["ignore"]) == o.is_keep
        if not o.is_keep:
            assert seen[name] == (o.bits, o.group_size, o.symmetric)
    assert len(body["config_groups"]) == len({plan.option(n) for n in plan.layers} - {parse_option("keep")})
    with pytest.raises(ExportError, match="modifier must be a class name"):
        export_plan(plan, "llm-compressor", modifier="not a class")


# ----------------------------------------------------------------- AutoRound and ModelOpt (schema)
def test_autoround_layer_config_schema():
    plan = tied_plan(specs=("int4-g32", "int8", "int2", "int3-g32-asym", "keep"), blocks=2)
    doc = export_plan(plan, "autoround")
    # documented entries: {"bits", "group_size", "sym", "data_type"}; kept: {"bits": 16, "data_type": "float"}
    for name in plan.layers:
        o = plan.option(name)
        if o.is_keep:
            assert doc[name] == {"bits": 16, "data_type": "float"}
        else:
            assert doc[name] == {"bits": o.bits, "group_size": o.group_size or -1, "sym": o.symmetric,
                                 "data_type": "int"}


def test_autoround_8bit_asymmetric_only_when_allowed():
    # AutoRound raises on an explicit 8-bit asymmetric entry unless its format serves it
    plan = make_plan({n: ("int8-g32-asym" if "mlp" in n else "int4-g32") for n in llama_names(1)})
    with pytest.raises(ExportError, match=r"autoround cannot express the option of 3 layer\(s\).*AR_ALLOW_W8_ASYM=1"):
        export_plan(plan, "autoround")
    doc = export_plan(plan, "autoround", w8_asym=True)
    assert doc["model.layers.0.mlp.down_proj"] == {"bits": 8, "group_size": 32, "sym": False, "data_type": "int"}
    with pytest.raises(ExportError, match="w8_asym must be True or False, got 'yes'"):
        export_plan(plan, "autoround", w8_asym="yes")


# TensorRT-LLM ``QuantAlgo`` members (tensorrt_llm/quantization/mode.py)
QUANT_ALGOS = {"W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
               "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "INT8", "MIXED_PRECISION", "NVFP4", "NO_QUANT"}


def test_modelopt_hf_quant_config_schema():
    plan = tied_plan(specs=("int4-g32", "int8", "int4-g128", "keep"), blocks=4)
    doc = json.loads(export_text(plan, "modelopt"))
    q = doc["quantization"]
    assert q["quant_algo"] == "MIXED_PRECISION" and q["kv_cache_quant_algo"] is None
    # the entries ModelOpt's own export writes (quant_utils.process_layer_quant_config)
    awq = {"quant_algo": "W4A16_AWQ", "has_zero_point": False, "pre_quant_scale": True}
    expect = {"int4-g32": {**awq, "group_size": 32}, "int4-g128": {**awq, "group_size": 128},
              "int8": {"quant_algo": "W8A16"}}
    for name in plan.layers:
        o = plan.option(name)
        if o.is_keep:
            assert name in q["exclude_modules"] and name not in q["quantized_layers"]
            continue
        entry = q["quantized_layers"][name]
        assert entry["quant_algo"] in QUANT_ALGOS
        assert entry == expect[o.name]


def test_importers_only_where_the_format_carries_bits(tmp_path):
    with pytest.raises(ExportError, match="format 'modelopt' has no importer; plans can be read back from 'torchao', 'gptqmodel', 'llama.cpp'"):
        import_plan(tmp_path / "x.json", "modelopt")
    with pytest.raises(ExportError, match="torchao file '.*nope.json' does not exist"):
        import_plan(tmp_path / "nope.json", "torchao")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ExportError, match="bad.json: not valid JSON"):
        import_plan(tmp_path / "bad.json", "torchao")


# ----------------------------------------------------------------- CLI
def _cli(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_export_and_import_round_trip(tmp_path, capsys):
    plan = tied_plan(specs=("int2", "int4", "int8", "keep"), blocks=3)
    plan.save(tmp_path / "plan.json")
    for fmt, name in [("torchao", "ao.json"), ("gptqmodel", "qc.json"), ("llama.cpp", "t.txt")]:
        code, out, _ = _cli(["export", "--plan", tmp_path / "plan.json", "--to", fmt, "-o", tmp_path / name], capsys)
        assert code == 0 and f"wrote {tmp_path / name}" in out
        extra = ["--layers", tmp_path / "plan.json"] if fmt == "gptqmodel" else []
        code, _, _ = _cli(["import", "--from", fmt, tmp_path / name, "-o", tmp_path / f"{name}.plan.json", *extra], capsys)
        assert code == 0
        assert BitPlan.load(tmp_path / f"{name}.plan.json").bits == plan.bits
    (tmp_path / "names.txt").write_text("\n".join(plan.layers) + "\n")
    code, _, _ = _cli(["import", "--from", "gptqmodel", tmp_path / "qc.json", "--layers", tmp_path / "names.txt",
                       "-o", tmp_path / "p3.json"], capsys)
    assert code == 0 and BitPlan.load(tmp_path / "p3.json").bits == plan.bits
    code, _, _ = _cli(["export", "--plan", tmp_path / "plan.json", "--to", "llama.cpp", "--opt", "keep_type=bf16",
                       "-o", tmp_path / "t2.txt"], capsys)
    assert code == 0 and "=bf16" in (tmp_path / "t2.txt").read_text()


@pytest.mark.parametrize("argv_tail,msg", [
    (["--to", "gguff"], r"unknown export format 'gguff'"),
    (["--to", "gptqmodel"], r"gptqmodel: these layers are fused into one matrix"),
    (["--to", "modelopt", "--force"], r"modelopt cannot express the option of .*int2"),
])
def test_cli_export_errors_exit_2_one_line_no_file(tmp_path, capsys, argv_tail, msg):
    choice = {n: "int4" for n in llama_names(1)}
    choice["model.layers.0.self_attn.v_proj"] = "int2"
    make_plan(choice).save(tmp_path / "plan.json")
    out = tmp_path / "out.file"
    code, _, err = _cli(["export", "--plan", tmp_path / "plan.json", *argv_tail, "-o", out], capsys)
    assert code == 2 and re.search(msg, err) and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out.file*"))


def test_cli_force_writes_and_import_errors(tmp_path, capsys):
    choice = {n: "int4" for n in llama_names(1)}
    choice["model.layers.0.self_attn.v_proj"] = "int8"
    make_plan(choice).save(tmp_path / "plan.json")
    code, _, _ = _cli(["export", "--plan", tmp_path / "plan.json", "--to", "gptqmodel", "--force",
                       "-o", tmp_path / "qc.json"], capsys)
    assert code == 0 and (tmp_path / "qc.json").is_file()
    code, _, err = _cli(["import", "--from", "gptqmodel", tmp_path / "qc.json", "-o", tmp_path / "p.json"], capsys)
    assert code == 2 and "needs the model's layer names" in err and not (tmp_path / "p.json").exists()
    code, _, err = _cli(["import", "--from", "gptqmodel", tmp_path / "qc.json", "--layers", tmp_path / "none.txt",
                         "-o", tmp_path / "p.json"], capsys)
    assert code == 2 and "--layers file" in err and "does not exist" in err


def test_every_importer_round_trips_every_small_plan():
    """Exhaustive over all option assignments of a 1-block model with ties honoured (per format's options)."""
    names = llama_names(1, head=False)
    for fmt, specs in [("torchao", ("int1", "int3-g32-asym", "keep")), ("gptqmodel", ("int2", "int8-g64", "keep")),
                       ("llama.cpp", ("int2", "int6", "keep"))]:
        for qkv, o, gu, down in itertools.product(specs, repeat=4):
            choice = {n: (qkv if "_attn.q" in n or "_attn.k" in n or "_attn.v" in n else o if "o_proj" in n
                          else gu if "gate" in n or "up_proj" in n else down) for n in names}
            plan = make_plan(choice)
            if all(plan.option(n).is_keep for n in names) and fmt == "gptqmodel":
                continue
            doc = export_plan(plan, fmt)
            if fmt == "llama.cpp":
                doc = get_exporter(fmt).loads(get_exporter(fmt).dumps(doc), "mem")
            back = import_plan(doc, fmt, layers=names if fmt == "gptqmodel" else None)
            assert options_of(back) == options_of(plan), (fmt, choice)


def test_llamacpp_types_table_is_documented():
    assert TYPES == {2: "q2_K", 3: "q3_K", 4: "q4_K", 5: "q5_K", 6: "q6_K", 8: "q8_0"}
    assert KEEP_TYPES == ("f16", "bf16", "f32")
