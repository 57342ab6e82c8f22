"""``solve --fit``: the plan, KV cache type and placement for a machine (mpsearch.fit)."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mpsearch.deploy import ArchInfo, Serving, memory
from mpsearch.errors import MpsearchError
from mpsearch.filemodels import llamacpp_file_model
from mpsearch.fit import FitSpec, solve_fit
from mpsearch.table import CostTable

ROOT = Path(__file__).resolve().parents[1]
LOGS = json.loads((ROOT / "tests" / "fixtures" / "llamacpp" / "deploy_logs.json").read_text())
MIB = 2**20


# ----------------------------------------------------------------------------- parsing
def test_fit_spec_parses_the_users_words():
    s = FitSpec.parse("gpu=16GiB,ram=64GiB,ctx=8192,parallel=2")
    assert (s.gpu, s.ram, s.ctx, s.parallel, s.kv) == (16 * 2**30, 64 * 2**30, 8192, 2, "auto")
    s = FitSpec.parse("ram=900MB,ctx=512,kv=q8_0/f16,placement=cpu,ram_bw=80,min_tps=5")
    assert (s.ram, s.kv, s.ram_bw, s.min_tps) == (9e8, "q8_0/f16", 80e9, 5.0)


@pytest.mark.parametrize("text,match", [
    ("ctx=4096", "give the machine's memory"), ("gpu=24GB,ctx=abc", "whole number"),
    ("gpu=24 parsecs", "write a size"), ("gpu=24GiB,vram=2GiB", "unknown key 'vram'"),
    ("gpu=24GiB,kv=q3_K", "kv=q3_K"), ("ram=1GiB,placement=experts-cpu", "needs gpu=SIZE"),
    ("gpu=1GiB,gpu=2GiB", "given twice"), ("gpu", "KEY=VALUE"), ("", "give the machine"),
    ("gpu=1GiB,ctx=0", "from 1"), ("gpu=1GiB,min_tps=-3", "positive"),
    ("gpu=1GiB,cpu=arm", "cpu=arm"),
])
def test_bad_fit_specs_are_refused_in_one_line(text, match):
    with pytest.raises(MpsearchError, match=match) as exc:
        FitSpec.parse(text)
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------- a real MoE's GGUF
def _moe_problem(options=("q4_0", "q8_0", "q4_K", "q6_K", "q2_K"), seed: int = 0):
    """A table over the attention tensors of the fixture's Qwen3-MoE GGUF (the experts unplanned,
    typed by the base mix), with the GGUF's own tensor list and shape."""
    from mpsearch.options import parse_option

    m = LOGS["models"]["qwen3moe"]
    from mpsearch.targets.llamacpp_mixes import canonical_type

    tensors = [(n, tuple(s), canonical_type(t)) for n, s, t, _ in m["tensors"]]
    kv = m["kv"]
    arch = ArchInfo.from_gguf({"kv": kv, "arch": kv["general.architecture"], "tensors": tensors})
    planned = {f"model.layers.{i}.self_attn.{p}_proj": [f"blk.{i}.attn_{g}.weight"]
               for i in range(arch.n_layer) for p, g in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))}
    hp = {"arch": arch.arch, "n_layer": arch.n_layer, "n_head": arch.n_head[0], "n_head_kv": arch.n_head_kv[0],
          "n_expert": arch.n_expert}
    fm = llamacpp_file_model(tensors, hp, planned, header_kv_bytes=4096, header_measured=False, header_note="test")
    shapes = {n: s for n, s, _ in tensors}
    rng = np.random.default_rng(seed)
    rows = []
    for lay, (t,) in planned.items():
        r, c = shapes[t]
        for o in options:
            opt = parse_option(o)
            if opt.check_shape(r, c) is None:
                rows.append({"layer": lay, "option": o, "bits": opt.bits, "size_bits": opt.size_bits(r, c),
                             "params": r * c, "damage": float(rng.random()) / opt.bits ** 2})
    meta = {"target": "llama.cpp", "file": fm.to_dict(), "deploy": arch.to_dict(),
            "kv_damage": {"k": {"f16": 0.0, "q8_0": 1e-4, "q4_0": 2e-3}, "v": {"f16": 0.0, "q8_0": 1e-4, "q4_0": 3e-3},
                          "metric": "kl"}}
    return CostTable(pd.DataFrame(rows), meta), fm, arch


def test_plan_fits_the_machine_and_the_parts_add_up():
    table, fm, arch = _moe_problem()
    res = solve_fit(table, FitSpec.parse("ram=48MiB,ctx=4096"))
    assert res.status == "feasible" and res.placement is None
    m = res.memory
    assert m.ram_total <= 48 * MIB and m.gpu_total == 0
    again = memory(arch, res.tensor_bytes, res.serving, None, tensor_types=res.tensor_types, rows=res.rows)
    assert again.ram == m.ram  # the summary is the cost model of the chosen plan
    assert set(res.tensor_bytes) == set(fm.bases[fm.default_base]["tensors"]) | {
        t for names in fm.planned.values() for t in names}


def _brute(table, spec: FitSpec, kv_pairs) -> float:
    """Exhaustive: every plan x KV pair, the least total damage whose whole memory fits (CPU only;
    repacked tensors held twice for spec.cpu)."""
    from mpsearch.filesize import FileModel
    from mpsearch.fit import _Problem

    fm = FileModel.from_dict(table.metadata["file"])
    arch = ArchInfo.from_dict(table.metadata["deploy"])
    prob = _Problem(table, fm, arch, fm.default_base)
    groups = [g for _, g in table.frame.groupby("layer", sort=False)]
    best = math.inf
    kvd = table.metadata["kv_damage"]
    for tk, tv in kv_pairs:
        s = Serving(ctx=spec.ctx, type_k=tk, type_v=tv)
        for combo in itertools.product(*[g.to_dict("records") for g in groups]):
            tb, types = dict(prob.unplanned), dict(prob.types)
            for r in combo:
                t = prob.tensor_of[r["layer"]][0]
                tb[t], types[t] = int(r["size_bits"] // 8), r["option"]
            if memory(arch, tb, s, None, tensor_types=types, rows=prob.rows, repack=spec.cpu).ram_total <= spec.ram:
                best = min(best, sum(r["damage"] for r in combo) + kvd["k"][tk] + kvd["v"][tv])
    return best


def test_joint_kv_choice_is_the_exhaustive_optimum_and_beats_a_fixed_cache():
    """On a 4-tensor slice (3 options each), solve_fit's plan + KV pair equals the exhaustive search
    over every plan and every KV pair, with llama.cpp's repacked second copy of q4_0 counted (cpu=avx512)
    and not (cpu=none); the fixed-f16 cache is never better."""
    table, fm, arch = _moe_problem(options=("q4_0", "q8_0", "q6_K"))
    keep = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    frame = table.frame[table.frame["layer"].isin(keep)]
    meta = dict(table.metadata)
    fmd = dict(meta["file"])
    fmd["planned"] = {k: v for k, v in fmd["planned"].items() if k in keep}
    # the other attention tensors become unplanned: give them q8_0 bytes in the base
    base = dict(fmd["bases"][fmd["default_base"]])
    tens, types = dict(base["tensors"]), dict(base["tensor_types"])
    for lay, (t,) in meta["file"]["planned"].items():
        if lay not in keep:
            r, c = LOGS_SHAPES[t]
            tens[t], types[t] = r * c // 32 * 34, "q8_0"
    base.update(tensors=tens, tensor_types=types)
    fmd["bases"] = {**fmd["bases"], fmd["default_base"]: base}
    meta["file"] = fmd
    # damage falls with bits (as a real table's does): the smallest option is then the one a solver
    # that forgot the repacked copy would pick under a tight budget
    frame = frame.assign(damage=frame["params"] / frame["bits"] ** 2 * 1e-6)
    small = CostTable(frame.reset_index(drop=True), meta)
    # a short context: the cache does not dwarf the slice's weights, and the weights' choice matters
    pairs = [(k, v) for k in ("f16", "q8_0", "q4_0") for v in ("f16", "q8_0", "q4_0")]
    # q4_0 is the smallest weight held once, but held twice (repacked) it costs more than q6_K
    once = frame.loc[frame["option"] == "q4_0", "size_bits"].sum() / 8
    for cpu in ("avx512", "none"):
        lo = _fit_total(small, "q4_0", "q4_0", "q4_0", cpu) - (once if cpu != "none" else 0)
        hi = _fit_total(small, "q8_0", "f16", "f16", cpu)
        assert lo < _fit_total(small, "q6_K", "q4_0", "q4_0", cpu) < hi
        for ram in np.linspace(lo, hi, 8)[1:-1]:
            spec = FitSpec.parse(f"ram={int(ram)}B,ctx={CTX},cpu={cpu}")
            res = solve_fit(small, spec)
            want = _brute(small, spec, pairs)
            if want == math.inf:
                assert res.status == "infeasible"
                continue
            assert res.status == "feasible" and res.damage == pytest.approx(want, rel=1e-9)
            assert res.memory.ram_total <= int(ram)
            fixed = solve_fit(small, FitSpec.parse(f"ram={int(ram)}B,ctx={CTX},kv=f16,cpu={cpu}"))
            assert fixed.plan is None or fixed.damage >= res.damage - 1e-15


LOGS_SHAPES = {n: tuple(s) for n, s, _, _ in LOGS["models"]["qwen3moe"]["tensors"]}


CTX = 256


def _fit_total(table, opt, tk, tv, cpu="avx512") -> float:
    """RAM of the plan with every layer at ``opt`` and the cache at tk/tv (ctx CTX)."""
    from mpsearch.filesize import FileModel
    from mpsearch.fit import _Problem
    from mpsearch.plan import BitPlan

    fm = FileModel.from_dict(table.metadata["file"])
    arch = ArchInfo.from_dict(table.metadata["deploy"])
    prob = _Problem(table, fm, arch, fm.default_base)
    from mpsearch.options import parse_option

    o = parse_option(opt)
    plan = BitPlan(bits={n: o.bits for n in table.layers}, options={n: {**o.to_dict(), "name": opt} for n in table.layers})
    return memory(arch, prob.tensor_bytes(plan), Serving(ctx=CTX, type_k=tk, type_v=tv), None,
                  tensor_types=prob.tensor_types(plan), rows=prob.rows, repack=cpu).ram_total


def test_moe_puts_routed_experts_in_ram_when_the_gpu_is_small():
    table, fm, arch = _moe_problem()
    res = solve_fit(table, FitSpec.parse("gpu=24MiB,ram=64MiB,ctx=4096"))
    assert res.status == "feasible" and res.placement.cpu_regex
    assert res.memory.gpu_total <= 24 * MIB and res.memory.ram_total <= 64 * MIB
    server = res.commands()[1]
    assert "--override-tensor" in server and "-ngl 9" in server and "-c 4096" in server and "-fa on" in server
    whole = solve_fit(table, FitSpec.parse("gpu=200MiB,ram=64MiB,ctx=4096"))
    assert whole.placement.cpu_regex == "" and whole.placement.ngl == arch.n_layer + 1
    # all on the GPU but the token embedding (llama.cpp keeps the input layer on the CPU) and the logits
    emb = whole.tensor_bytes["token_embd.weight"]
    assert whole.memory.ram == {"weights": -(-emb // 32) * 32, "output": arch.n_vocab * 4}


def test_infeasible_machine_names_a_machine_that_fits_and_the_largest_context():
    table, fm, arch = _moe_problem()
    res = solve_fit(table, FitSpec.parse("ram=44MiB,ctx=8192"))
    assert res.status == "infeasible" and res.plan is None
    m = re.search(r"the smallest machine for ctx=8192 x 1 \(KV (\S+)/(\S+), every layer at its smallest option\) "
                  r"is ram=([\d.]+)MiB; the largest context that fits this machine is (\d+) tokens", res.message)
    assert m, res.message
    need = float(m.group(3))
    ok = solve_fit(table, FitSpec.parse(f"ram={need}MiB,ctx=8192,kv={m.group(1)}/{m.group(2)}"))
    assert ok.status == "feasible"
    ctx = int(m.group(4))
    assert 4096 < ctx < 8192
    assert solve_fit(table, FitSpec.parse(f"ram=44MiB,ctx={ctx},kv={m.group(1)}/{m.group(2)}")).status == "feasible"
    assert solve_fit(table, FitSpec.parse(f"ram=44MiB,ctx={ctx + 256},kv={m.group(1)}/{m.group(2)}")).status \
        == "infeasible"


def test_the_largest_context_reported_is_the_largest_that_fits():
    table, fm, arch = _moe_problem()
    spec = FitSpec.parse("ram=48MiB,ctx=2048")
    res = solve_fit(table, spec)
    import dataclasses

    def ram(ctx):
        return memory(arch, res.tensor_bytes, dataclasses.replace(res.serving, ctx=ctx), None,
                      tensor_types=res.tensor_types, rows=res.rows).ram_total

    assert res.max_ctx >= 2048 and ram(res.max_ctx) <= spec.ram < ram(res.max_ctx + 256)


def test_without_measured_kv_damage_the_cache_stays_f16_and_says_so():
    table, fm, arch = _moe_problem()
    meta = dict(table.metadata)
    del meta["kv_damage"]
    res = solve_fit(CostTable(table.frame, meta), FitSpec.parse("ram=64MiB,ctx=4096"))
    assert (res.serving.type_k, res.serving.type_v) == ("f16", "f16")
    assert any("no measured KV damage" in n for n in res.notes)


def test_fit_refuses_tables_it_cannot_plan_for():
    table = CostTable(pd.DataFrame([{"layer": "a", "bits": 4, "damage": 1.0, "size_bits": 64.0}]))
    with pytest.raises(MpsearchError, match="no file model"):
        solve_fit(table, FitSpec.parse("ram=1GiB"))


# ----------------------------------------------------------------------------- KV damage, CLI
def test_kv_damage_grows_as_the_cache_shrinks():
    import transformers

    from mpsearch.kvcache import measure_kv_damage

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=128)).eval()
    batches = [torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))]
    d = measure_kv_damage(model, batches, ("f32", "f16", "q8_0", "q4_0"))
    for which in ("k", "v"):
        assert d[which]["f32"] == 0.0  # the cache path itself changes nothing
        assert 0 <= d[which]["f16"] < d[which]["q8_0"] < d[which]["q4_0"]
    assert d["tokens"] == 96


def test_cli_fit_writes_plan_types_and_commands(tmp_path, capsys):
    from mpsearch.cli import main

    table, fm, arch = _moe_problem()
    path = tmp_path / "t.json"
    table.write(path)
    plan = tmp_path / "plan.json"
    assert main(["solve", "--table", str(path), "--solver", "ilp", "--fit", "gpu=24MiB,ram=64MiB,ctx=4096",
                 "-o", str(plan)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "plan.types.txt").read_text().count("=") == len(table.layers)
    assert re.search(r"llama-quantize --tensor-type-file \S+plan.types.txt \S+ \S+ Q4_K_M", out)
    assert re.search(r"llama-server -m \S+ -c 4096 -np 1 -fa on -ctk \S+ -ctv \S+ -ngl 9 --override-tensor", out)
    assert "GPU:" in out and "RAM:" in out and "largest context" in out
    code = main(["solve", "--table", str(path), "--fit", "ram=20MiB,ctx=8192", "-o", str(tmp_path / "no.json")])
    err = capsys.readouterr().err.strip()
    assert code == 3 and "\n" not in err and "smallest machine" in err and not (tmp_path / "no.json").exists()
    assert main(["solve", "--table", str(path), "--fit", "ram=1GiB", "--budget", "avg_bits=4",
                 "-o", str(tmp_path / "x.json")]) == 2


# ----------------------------------------------------------------------------- llama.cpp's own buffer lines
def _fit_runs():
    runs = []
    for name in ("smollm2", "moe"):
        f = ROOT / "experiments" / "deploy_fit" / f"{name}.json"
        if f.exists():
            runs += [r for r in json.loads(f.read_text()) if r["status"] == "feasible" and "gguf_tensors" in r]
    return runs


@pytest.mark.parametrize("run", _fit_runs(), ids=lambda r: r["label"])
def test_memory_of_the_quantized_file_matches_llamacpps_buffer_lines(run):
    """The emitted commands, run (experiments/deploy_fit.py): from the quantized GGUF's tensors,
    mpsearch.deploy predicts llama-server's CPU buffer lines: the repacked copy and the KV cache to
    its printed 0.01 MiB, the mapped weights as an upper bound within 1.5%, the total within 3%."""
    arch = ArchInfo.from_dict(run["arch"])
    t = run["gguf_tensors"]
    s = Serving(ctx=run["ctx"], parallel=run["parallel"], type_k=run["type_k"], type_v=run["type_v"])
    m = memory(arch, {n: v[1] for n, v in t.items()}, s, None, tensor_types={n: v[0] for n, v in t.items()},
               rows={n: v[2] for n, v in t.items()}, repack=run["cpu"])
    logged = {}
    for b in run["logged_buffers"]:
        logged[(b["buffer"], b["kind"])] = logged.get((b["buffer"], b["kind"]), 0.0) + b["mib"]
    assert m.ram.get("repacked", 0) / MIB == pytest.approx(logged.get(("CPU_REPACK", "model"), 0.0), abs=0.006)
    assert m.ram["kv_cache"] / MIB == pytest.approx(logged[("CPU", "KV")], abs=0.006)
    assert m.ram["output"] / MIB == pytest.approx(logged[("CPU", "output")], abs=0.006)
    mapped = logged[("CPU_Mapped", "model")]
    assert mapped - 0.006 <= m.ram["weights"] / MIB <= mapped * 1.015
    assert m.ram_total / MIB == pytest.approx(sum(logged.values()), rel=0.03)
    # and the plan that was run is within its budget as llama.cpp counts it
    assert sum(logged.values()) <= run["budget_mib"] + 1e-9


def test_repacking_follows_llamacpps_cpu_rules():
    from mpsearch.deploy import repacked

    assert repacked("blk.0.attn_q.weight", "q4_K", 576, "avx2")
    assert not repacked("blk.0.attn_q.weight", "q4_K", 572, "avx2")  # rows not a multiple of 8
    assert not repacked("token_embd.weight", "q4_0", 49152, "avx512")  # a row lookup, not a matmul
    assert repacked("blk.0.ffn_up.weight", "q2_K", 1536, "avx512") and not repacked(
        "blk.0.ffn_up.weight", "q2_K", 1536, "avx2")
    assert not any(repacked("blk.0.ffn_up.weight", t, 1536, "avx512") for t in ("q8_0", "q5_K", "q6_K", "q4_1"))
    assert not repacked("blk.0.ffn_up.weight", "q4_0", 1536, "none")
    with pytest.raises(MpsearchError, match="unknown CPU"):
        repacked("x", "q4_0", 8, "arm")


def test_cpu_none_counts_one_copy_and_emits_no_repack():
    table, fm, arch = _moe_problem(options=("q4_0", "q8_0"))
    a = solve_fit(table, FitSpec.parse("ram=64MiB,ctx=4096,kv=f16"))
    b = solve_fit(table, FitSpec.parse("ram=64MiB,ctx=4096,kv=f16,cpu=none"))
    assert "repacked" not in b.memory.ram and "--no-repack" in b.commands()[1]
    assert "--no-repack" not in a.commands()[1]
    # with no repacking q4_0 costs its bytes once: the plan is never more damaged
    assert b.damage <= a.damage
    rep = sum(-(-a.tensor_bytes[n] // 32) * 32 for n, t in a.tensor_types.items()
              if t in ("q4_0", "q4_K") and n != "token_embd.weight" and a.rows[n] % 8 == 0)
    assert a.memory.ram["repacked"] == rep
    assert any("counted twice" in n and "q4_0" in n for n in a.notes) and not any("counted twice" in n for n in b.notes)


def test_a_table_without_tensor_rows_says_repacking_is_not_counted():
    table, fm, arch = _moe_problem()
    meta = dict(table.metadata, file={k: v for k, v in table.metadata["file"].items() if k != "rows"})
    res = solve_fit(CostTable(table.frame, meta), FitSpec.parse("ram=64MiB,ctx=4096"))
    assert "repacked" not in res.memory.ram and any("not counted" in n for n in res.notes)
