"""`mpsearch demo`: the whole job on all-MiniLM-L6-v2 (a cheap estimator here; the CLI default is timed
in the README), its outputs, and its resume from the cached table."""

import json

import pandas as pd

from mpsearch.cli import main
from mpsearch.cli.demo import run_demo, summarize


def test_demo_outputs_and_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--estimator", "weight-error", "--solver", "greedy", "--validate", "2",
               "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and f"outputs in {out}" in text and "proxy check" in text
    for name in ("table.csv", "frontier.csv", "uniform.csv", "frontier.png", "plan_bits.png",
                 "sensitivity.png", "summary.json", "measured.json"):
        assert (out / name).is_file(), name
    front = pd.read_csv(out / "frontier.csv")
    assert front["validated"].sum() >= 2 and front["measured_cosine"].max() <= 1.0 + 1e-6
    uni = pd.read_csv(out / "uniform.csv").set_index("bits")
    assert uni.loc[8, "measured_cosine"] > 0.99 > uni.loc[2, "measured_cosine"]
    stamp = (out / "table.csv").stat().st_mtime_ns
    run = run_demo(out, estimator="weight-error", solver="greedy", validate=2, progress=False)  # resumes from the cache
    assert (out / "table.csv").stat().st_mtime_ns == stamp
    assert json.loads((out / "summary.json").read_text())["settings"]["estimator"] == "weight-error"
    assert "bits/weight" in summarize(run)


def test_demo_help_exits_0(capsys):
    try:
        main(["demo", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "mpsearch demo --out" in capsys.readouterr().out
