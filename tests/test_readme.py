"""The README's runnable parts, as pasted: the Python quick start, and the newcomer walkthrough's
commands (the blocks `experiments/newcomer_cpu.py` times on SmolLM2) on a tiny Llama."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from mpsearch import zoo
from mpsearch.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _newcomer():
    spec = importlib.util.spec_from_file_location("newcomer_cpu", ROOT / "experiments" / "newcomer_cpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_python_quick_start_runs_as_pasted(tmp_path, monkeypatch, capsys):
    text = README.read_text(encoding="utf-8")
    block = re.search(r"In Python \(runs as pasted.*?```python\n(.*?)```", text, re.S)
    assert block, "the README's Python quick start block is gone"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    assert scope["result"].status == "feasible"
    assert scope["result"].plan.predicted["avg_bits"] <= 4
    quality, fp32 = scope["report"].quality, scope["report"].baseline_quality
    assert 0 < quality <= 100 and 80 < fp32 <= 100
    printed = capsys.readouterr().out
    assert "feasible" in printed and f"{quality}" in printed


@pytest.mark.parametrize("path", ["llama.cpp", "vllm"])
def test_the_newcomer_commands_run_on_a_tiny_llama(path, tmp_path, monkeypatch, capsys):
    """The same commands as the README's walkthrough, with `smollm2` replaced by a tiny Llama folder
    (hidden 32 for g32 groups, intermediate 256 so ffn_down takes K-quants), each exiting 0 and writing
    the consumer's file."""
    commands = _newcomer().readme_commands(path)
    assert [c.split()[:2] for c in commands] == [["mpsearch", "estimate"], ["mpsearch", "solve"],
                                                 ["mpsearch", "export"]]
    assert any("--budget size=Q4_K_M" in c for c in commands) if path == "llama.cpp" else \
        any("--budget size=w4a16-g32" in c for c in commands)
    tiny = zoo.save_tiny_llama(tmp_path / "tiny", intermediate_size=256)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPSEARCH_ESTIMATOR_CACHE", str(tmp_path / "cache"))
    for cmd in commands:
        argv = [str(tiny) if a == "smollm2" else a for a in shlex.split(cmd)[1:]]
        assert main(argv + ["--no-progress"] * (argv[0] == "estimate")) == 0, cmd
    out = capsys.readouterr().out
    exported = Path(shlex.split(commands[-1])[-1])
    assert exported.is_file()
    if path == "llama.cpp":
        lines = exported.read_text().split()  # ^blk\.0\.attn_q\.weight$=q4_K: llama-quantize's regex=type
        assert lines and all(re.fullmatch(r"\^[\w.\\]+\$=(q\d_K|q\d_[01]|iq4_nl|q8_0|f16|bf16|f32)", ln)
                             for ln in lines), lines
        assert re.search(r"llama-quantize .*--tensor-type-file \S+ \S+ \S+ Q4_K_M$", out, re.M)
    else:
        recipe = yaml.safe_load(exported.read_text())
        text = exported.read_text()
        assert recipe and "QuantizationModifier" in text and "config_groups" in text
