"""``solve --fit`` checked through llama.cpp: the emitted commands run, llama.cpp's own buffer lines read.

For each model and ``--fit`` budget:

1. ``mpsearch.fit.solve_fit`` on the model's ``--target llama.cpp`` table (plan, KV cache types,
   placement, predicted memory by part);
2. the emitted ``llama-quantize --tensor-type-file PLAN.types.txt IN OUT BASE`` (with
   ``--allow-requantize``: SmolLM2's source is its Q4_1 GGUF) and the emitted ``llama-server`` flags
   (``-c -np -fa on -ctk -ctv -ngl [--override-tensor] --fit off``) on the CPU build: its
   ``model/KV/compute/output buffer size`` lines, summed, against the prediction and the budget.
   A CPU build puts every buffer in RAM, so it checks each part and the total; the GPU/RAM split
   that ``-ngl``/``--override-tensor`` make is the arithmetic of :mod:`mpsearch.deploy` (placement
   by layer, as ``llama-model.cpp`` assigns it) and needs a GPU build to be confirmed;
3. SmolLM2 only: mean KL divergence to SmolLM2's own GGUF with the plan's cache types
   (``llama-perplexity -c 512 --chunks 16 -fa on -ctk T -ctv T --kl-divergence``), and, at two
   budgets, the plan with the KV cache fixed at f16 against the plan with the cache type chosen
   jointly (``kv=auto``).

Models: SmolLM2-135M (the output-distance table of ``experiments/llamacpp_e2e/tables/``, estimated
on a GPU with the e2e calibration passages; q4_1, its lossless source grid, dropped as in
``llamacpp_e2e.md``; KV damage measured here on the same passages) and a random Qwen3-MoE
(``deploy_fixtures.QWEN3MOE``: 8 layers x 8 experts, converted by ``convert_hf_to_gguf.py``;
weight-error table; its routed experts are not yet planned by mpsearch's ``main`` and keep the
base mix's types). Results: ``experiments/deploy_fit/*.json`` and ``experiments/deploy_fit.md``.

    python experiments/deploy_fit.py smollm2        # ~15 min on 2 busy cores
    python experiments/deploy_fit.py moe            # ~2 min
    python experiments/deploy_fit.py report
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from deploy_fixtures import parse_log, random_model, serve_log  # noqa: E402
from file_size_fixtures import convert  # noqa: E402
from llamacpp_fixtures import run_quantize, smollm2_gguf  # noqa: E402

WORK = Path(os.environ.get("MPSEARCH_FIT_WORK", Path(tempfile.gettempdir()) / "mpsearch_deploy_fit"))
RESULTS = ROOT / "experiments" / "deploy_fit"
THREADS = int(os.environ.get("MPSEARCH_FIT_THREADS", "2"))
MIB = 2**20

BUDGETS = {
    "smollm2": ["ram=256MiB,ctx=8192", "ram=200MiB,ctx=4096,parallel=2", "gpu=150MiB,ram=1GiB,ctx=4096"],
    "moe": ["ram=46MiB,ctx=4096", "ram=80MiB,ctx=8192,parallel=2,kv=q8_0", "gpu=24MiB,ram=64MiB,ctx=4096"],
}
#: the KV comparison: kv fixed at f16 against kv chosen with the weights, at two machines
KV_BUDGETS = ["ram=160MiB,ctx=2048", "ram=220MiB,ctx=4096"]


# ----------------------------------------------------------------------------- tables
def smollm2_table():
    """The GPU output-distance table with the file model, the model's shape and the KV damage."""
    import pandas as pd

    from mpsearch.deploy import ArchInfo
    from mpsearch.filemodels import gguf_file_model
    from mpsearch.filesize import read_gguf
    from mpsearch.table import CostTable

    path = WORK / "smollm2-table.json"
    if path.exists():
        return CostTable.read(path)
    src = ROOT / "experiments" / "llamacpp_e2e" / "tables" / "smollm2-llamacpp-output-distance.csv"
    table = CostTable.read(src)
    frame = table.frame[table.frame["option"] != "q4_1"].reset_index(drop=True)
    gguf = smollm2_gguf()
    meta = dict(table.metadata, note="q4_1 (SmolLM2's source grid, lossless) dropped")
    meta["file"] = gguf_file_model(gguf, list(dict.fromkeys(frame["layer"]))).to_dict()
    meta["deploy"] = ArchInfo.from_gguf(read_gguf(gguf)).to_dict()
    import llamacpp_e2e
    from mpsearch.kvcache import measure_kv_damage

    model = llamacpp_e2e.smollm2()
    meta["kv_damage"] = measure_kv_damage(model, llamacpp_e2e.calib(), ("f16", "q8_0", "q5_0", "q4_0"),
                                          arch="llama", progress=True)
    out = CostTable(pd.DataFrame(frame), meta)
    WORK.mkdir(parents=True, exist_ok=True)
    out.write(path)
    return out


def moe_gguf() -> Path:
    out = WORK / "qwen3moe-f16.gguf"
    if not out.exists():
        from mpsearch.zoo import smollm2_tokenizer

        WORK.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=WORK) as tmpd:
            hf = Path(tmpd) / "hf"
            random_model("qwen3moe").save_pretrained(hf)
            smollm2_tokenizer().save_pretrained(hf)
            convert(hf, out)
    return out


def moe_table():
    from mpsearch.deploy import ArchInfo
    from mpsearch.filemodels import gguf_file_model
    from mpsearch.filesize import read_gguf
    from mpsearch.registry import get_estimator
    from mpsearch.table import CostTable

    path = WORK / "qwen3moe-table.json"
    if path.exists():
        return CostTable.read(path)
    model = random_model("qwen3moe")
    table = get_estimator("weight-error").estimate(model, None, target="llama.cpp", exclude=[r"mlp\.gate$"],
                                                   progress=False)
    gguf = moe_gguf()
    table.metadata["file"] = gguf_file_model(gguf, table.layers).to_dict()  # exact: the GGUF is at hand
    table.metadata["deploy"] = ArchInfo.from_gguf(read_gguf(gguf)).to_dict()
    table.write(path)
    return table


# ----------------------------------------------------------------------------- one fit, checked
def _server_flags(cmd: str) -> list[str]:
    """The flags of the emitted llama-server command (after ``-m FILE``; ``serve_log`` adds ``--fit off``)."""
    import shlex

    parts = shlex.split(cmd)[3:]
    i = parts.index("--fit")
    return parts[:i] + parts[i + 2:]


def check_fit(label: str, table, fit: str, src: Path, *, kld: bool = False) -> dict:
    from mpsearch.export import export_text
    from mpsearch.fit import FitSpec, solve_fit
    from mpsearch.registry import get_solver

    spec = FitSpec.parse(fit)
    t0 = time.time()
    res = solve_fit(table, spec, get_solver("ilp"))
    solve_s = time.time() - t0
    row = {"label": label, "fit": fit, "status": res.status, "solve_seconds": round(solve_s, 1)}
    if res.plan is None:
        row["message"] = res.message
        return row
    types = WORK / f"{label}.types.txt"
    types.write_text(export_text(res.plan, "llama.cpp"))
    out = WORK / f"{label}.gguf"
    quant_cmd, server_cmd = res.commands(types.name, src.name, out.name)
    base = quant_cmd.split()[-1]
    run_quantize(src, out, base, threads=THREADS, extra=["--tensor-type-file", str(types)])
    flags = _server_flags(server_cmd)
    log = parse_log(serve_log(out, flags, threads=THREADS))
    by_kind = {}
    for b in log["buffers"]:
        by_kind[b["kind"]] = by_kind.get(b["kind"], 0.0) + b["mib"]
    from mpsearch.deploy import memory

    m = res.memory
    # what the CPU build allocates: no GPU copy of a tied output layer; repacked tensors twice
    cpu = memory(res.arch, res.tensor_bytes, res.serving, None, tensor_types=res.tensor_types, rows=res.rows,
                 repack=res.repack)
    pred = {"weights": (cpu.ram.get("weights", 0) + cpu.ram.get("repacked", 0)) / MIB,
            "KV": cpu.ram.get("kv_cache", 0) / MIB,
            "compute": cpu.ram.get("compute", 0) / MIB, "output": cpu.ram.get("output", 0) / MIB}
    logged = {"weights": by_kind.get("model", 0.0), "KV": by_kind.get("KV", 0.0),
              "compute": by_kind.get("compute", 0.0), "output": by_kind.get("output", 0.0)}
    budget = (spec.gpu or 0) + (spec.ram or 0)
    row.update({
        "ctx": res.serving.ctx, "parallel": res.serving.parallel, "type_k": res.serving.type_k,
        "type_v": res.serving.type_v, "placement": res.placement.label if res.placement else "CPU only",
        "quantize_command": f"llama-quantize --allow-requantize --tensor-type-file {types.name} {src.name} "
                            f"{out.name} {base} {THREADS}",
        "server_command": server_cmd, "predicted_gpu_mib": m.gpu_total / MIB, "predicted_ram_mib": m.ram_total / MIB,
        "predicted_mib": pred, "logged_mib": logged, "budget_mib": budget / MIB,
        "predicted_gpu_parts_mib": {k: v / MIB for k, v in m.gpu.items()},
        "predicted_ram_parts_mib": {k: v / MIB for k, v in m.ram.items()},
        "predicted_total_mib": cpu.ram_total / MIB, "logged_total_mib": sum(logged.values()),
        "damage": res.damage, "weight_damage": res.weight_damage, "kv_damage": res.kv_damage,
        "max_ctx": res.max_ctx, "types": _type_counts(res.plan), "notes": res.notes,
        "file_bytes": out.stat().st_size, "cpu": res.repack,
        # what a test needs to redo the prediction from llama.cpp's side: the shape, each tensor as
        # the quantized GGUF holds it (type, bytes, rows), and llama.cpp's own buffer lines
        "arch": res.arch.to_dict(), "logged_buffers": log["buffers"], "logged_kv_caches": log["kv_caches"],
        "gguf_tensors": gguf_tensors(out),
    })
    row["total_rel_err"] = (row["logged_total_mib"] - row["predicted_total_mib"]) / row["predicted_total_mib"]
    if kld:
        row.update(kld_of(out, res.serving.type_k, res.serving.type_v))
    out.unlink()
    return row


def gguf_tensors(path: Path) -> dict:
    """Tensor -> [ggml type, bytes, rows] as the quantized GGUF holds them (llama.cpp's file)."""
    from mpsearch.filesize import read_gguf
    from mpsearch.targets.llamacpp_mixes import type_nbytes

    return {n: [t, type_nbytes(t, s), int(s[-2]) if len(s) > 1 else 1] for n, s, t in read_gguf(path)["tensors"]}


def _type_counts(plan) -> str:
    counts = {}
    for lay in plan.layers:
        n = plan.options[lay]["name"]
        counts[n] = counts.get(n, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def kld_of(gguf: Path, type_k: str, type_v: str, chunks: int = 16) -> dict:
    import llamacpp_e2e

    base = llamacpp_e2e.kld_base("smollm2", chunks=chunks, work=WORK)
    log = llamacpp_e2e._perplexity(["-m", str(gguf), "-f", str(llamacpp_e2e.eval_text(WORK)), "-c", "512",
                                    "--chunks", str(chunks), "-t", str(THREADS), "-fa", "on", "-ctk", type_k,
                                    "-ctv", type_v, "--kl-divergence-base", str(base), "--kl-divergence"])

    def grab(pat):
        m = re.search(pat, log)
        return float(m.group(1)) if m else None

    return {"mean_kld": grab(r"Mean\s+KLD:\s+([-\d.e+]+)"), "mean_kld_err": grab(r"Mean\s+KLD:\s+[-\d.e+]+\s+±\s+([-\d.e+]+)"),
            "same_top_p_pct": grab(r"Same top p:\s+([-\d.e+]+)"),
            "kld_command": f"llama-perplexity -m {gguf.name} -f shakespeare-eval.txt -c 512 --chunks {chunks} "
                           f"-fa on -ctk {type_k} -ctv {type_v} --kl-divergence-base {base.name} --kl-divergence"}


# ----------------------------------------------------------------------------- runs
def run_model(name: str) -> list[dict]:
    table = smollm2_table() if name == "smollm2" else moe_table()
    src = smollm2_gguf() if name == "smollm2" else moe_gguf()
    rows = []
    for i, fit in enumerate(BUDGETS[name]):
        row = check_fit(f"{name}-fit{i}", table, fit, src, kld=name == "smollm2")
        print(json.dumps(row), flush=True)
        rows.append(row)
    if name == "smollm2":
        for i, fit in enumerate(KV_BUDGETS):
            for kv in ("f16", "auto"):
                row = check_fit(f"{name}-kv{i}-{kv}", table, f"{fit},kv={kv}", src, kld=True)
                row["kv_mode"] = kv
                print(json.dumps(row), flush=True)
                rows.append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def report() -> None:
    lines = ["# `solve --fit` through llama.cpp: predicted memory vs llama.cpp's own buffer lines", "",
             "Written by `python experiments/deploy_fit.py report` from `experiments/deploy_fit/*.json`, made by",
             "", "    PYTHONPATH=$PWD python experiments/deploy_fit.py smollm2   # ~15 min on 2 busy cores",
             "    PYTHONPATH=$PWD python experiments/deploy_fit.py moe       # ~2 min", "",
             "For each `--fit` budget: `solve_fit` on the model's `--target llama.cpp` table picks the plan, the KV "
             "cache types and the placement; the emitted `llama-quantize --tensor-type-file` command writes the GGUF "
             "and the emitted `llama-server` flags load it. **Every `llama.cpp` column is llama-server's own log** "
             "(its `model buffer size`, `KV buffer size`, `compute buffer size` and `output buffer size` lines, "
             "summed per kind); mean KLD is `llama-perplexity --kl-divergence` against SmolLM2's own GGUF (512-token "
             "windows, 16 chunks of the evaluation plays, the plan's `-ctk/-ctv`). llama.cpp: the CPU build of the "
             "copy vendored in llama-cpp-python 0.3.36, on an AVX-512 x86 CPU (`cpu=avx512`, the default).", "",
             "Weights are predicted as llama.cpp's buffers hold them: the mapped file (`CPU_Mapped`) plus the "
             "second, repacked copy of q4_0/q4_K/iq4_nl/q2_K tensors (`CPU_REPACK`). The mapped part is an upper "
             "bound (repacked tensors at either end of the file fall outside the mapped span); the repacked part, "
             "the KV cache and the output buffer are exact to the log's 0.01 MiB "
             "(`tests/test_fit.py::test_memory_of_the_quantized_file_matches_llamacpps_buffer_lines` re-predicts "
             "them from the quantized file's tensors). The compute buffer is the per-family fit of "
             "`mpsearch.deploy`.", "",
             "A CPU build puts every buffer in RAM, so the `gpu=` row checks the parts and the total, not the "
             "GPU/RAM split that `-ngl`/`--override-tensor` make (that split is `mpsearch.deploy`'s arithmetic of "
             "llama.cpp's layer assignment and is not yet checked on a GPU build).", ""]
    head = ["| model | `--fit` | KV K/V | placement | weights (types) | predicted MiB: weights / KV / compute / "
            "output | llama.cpp MiB: model / KV / compute / output | total predicted | total llama.cpp | error | "
            "budget MiB | mean KLD |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def row_of(name, r):
        if r["status"] != "feasible":
            return f"| {name} | `{r['fit']}` | infeasible: {r['message']} |||||||||||"
        p, g = r["predicted_mib"], r["logged_mib"]
        kld = f"{r['mean_kld']:.5f} ± {r['mean_kld_err']:.5f}" if r.get("mean_kld") is not None else "-"
        return (f"| {name} | `{r['fit']}` | {r['type_k']}/{r['type_v']} | {r['placement']} | {r['types']} | "
                f"{p['weights']:.2f} / {p['KV']:.2f} / {p['compute']:.2f} / {p['output']:.2f} | "
                f"{g['weights']:.2f} / {g['KV']:.2f} / {g['compute']:.2f} / {g['output']:.2f} | "
                f"{r['predicted_total_mib']:.2f} | {r['logged_total_mib']:.2f} | {100 * r['total_rel_err']:+.2f}% | "
                f"{r['budget_mib']:.0f} | {kld} |")

    runs = {n: json.loads((RESULTS / f"{n}.json").read_text()) for n in ("smollm2", "moe")
            if (RESULTS / f"{n}.json").exists()}
    lines += ["## Three machines per model", ""] + head
    for name, rows in runs.items():
        lines += [row_of(name, r) for r in rows if "kv_mode" not in r]
    kv = [r for r in runs.get("smollm2", []) if "kv_mode" in r]
    if kv:
        lines += ["", "## The KV cache type as a decision (SmolLM2)", "",
                  "The same machine solved with the cache fixed at f16 (`kv=f16`) and with the cache types chosen "
                  "jointly with the weights (`kv=auto`, the KV damage measured by `mpsearch.kvcache` on the "
                  "calibration passages, in the table's KL units).", "",
                  "| `--fit` | kv | KV K/V | weights (types) | predicted damage (weights + KV) | "
                  "total llama.cpp MiB | mean KLD (llama-perplexity) | same top token |", "|---|---|---|---|---|---|---|---|"]
        for r in kv:
            if r["status"] != "feasible":
                lines.append(f"| `{r['fit']}` | {r['kv_mode']} | infeasible: {r['message']} ||||||")
                continue
            lines.append(f"| `{r['fit'].rsplit(',kv=', 1)[0]}` | {r['kv_mode']} | {r['type_k']}/{r['type_v']} | "
                         f"{r['types']} | {r['damage']:.5f} ({r['weight_damage']:.5f} + {r['kv_damage']:.5f}) | "
                         f"{r['logged_total_mib']:.2f} | {r['mean_kld']:.5f} ± {r['mean_kld_err']:.5f} | "
                         f"{r['same_top_p_pct']:.2f}% |")
    lines += ["", "## Commands", "", "Each row's exact commands (`quantize_command`, `server_command`, "
              "`kld_command`) are in `experiments/deploy_fit/<model>.json`; for example:", ""]
    for name, rows in runs.items():
        r = next((r for r in rows if r["status"] == "feasible"), None)
        if r:
            lines += [f"    # {name}, --fit {r['fit']}", f"    {r['quantize_command']}", f"    {r['server_command']}"]
            if r.get("kld_command"):
                lines.append(f"    {r['kld_command']}")
    (ROOT / "experiments" / "deploy_fit.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("smollm2", "moe", "report"))
    args = ap.parse_args(argv)
    if args.what == "report":
        report()
    else:
        run_model(args.what)


if __name__ == "__main__":
    main()
