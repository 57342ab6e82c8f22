"""The estimate → solve → validate → apply chain through the CLI, and its exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpsearch.cli import main
from mpsearch.plan import BitPlan
from mpsearch.table import CostTable

HERE = Path(__file__).parent
MODELS = str(HERE / "core_models.py")


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_chain_on_trained_digits_mlp(tmp_path, capsys):
    table, plan, q = tmp_path / "t.csv", tmp_path / "p.json", tmp_path / "q.pt"
    code, out, _ = run(["estimate", "--model", f"{MODELS}:digits_mlp", "--data", f"{MODELS}:digits_calib",
                        "--estimator", "weight-error", "--bits", "2,3,4,8", "--no-progress", "-o", table], capsys)
    assert code == 0 and "4 layers x 4 options" in out
    t = CostTable.read(table)
    assert t.metadata["estimator"] == "weight-error" and t.metadata["model"]["fingerprint"]
    assert {"bops", "macs", "params"} <= set(t.resource_columns)
    code, out, _ = run(["solve", "--table", table, "--solver", "greedy", "--budget", "avg_bits=4", "-o", plan], capsys)
    assert code == 0 and "avg_bits=" in out
    p = BitPlan.load(plan)
    assert p.predicted["avg_bits"] <= 4 and p.provenance["solver"] == "greedy"
    code, out, _ = run(["validate", "--model", f"{MODELS}:digits_mlp", "--plan", plan,
                        "--metric", f"{MODELS}:digits_accuracy", "-o", tmp_path / "r.json"], capsys)
    assert code == 0 and "quality:" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and report["quality"] > 0.8
    code, out, _ = run(["apply", "--model", f"{MODELS}:digits_mlp", "--plan", plan, "-o", q], capsys)
    assert code == 0
    sd = torch.load(q, weights_only=True)
    assert set(sd) == {f"{i}.{w}" for i in (0, 2, 4, 6) for w in ("weight", "bias")}


def test_infeasible_budget_exits_3_and_writes_nothing(tmp_path, capsys):
    table, plan = tmp_path / "t.csv", tmp_path / "p.json"
    run(["estimate", "--model", f"{MODELS}:tiny_cnn", "--no-progress", "-o", table], capsys)
    code, out, err = run(["solve", "--table", table, "--budget", "avg_bits=1", "-o", plan], capsys)
    assert code == 3 and "smallest achievable avg_bits is 2." in err
    assert not plan.exists()


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["estimate", "--model", "nope.module:build", "-o", "{out}"], "cannot import 'nope.module'"),
        (["estimate", "--model", "no_colon", "-o", "{out}"], "not a file, folder or short name"),
        (["estimate", "--model", f"{MODELS}:not_a_module", "-o", "{out}"], "returned ndarray, not a torch.nn.Module"),
        (["estimate", "--model", f"{MODELS}:missing", "-o", "{out}"], "has no attribute 'missing'"),
        (["estimate", "--model", f"{MODELS}:no_quantizable_layers", "-o", "{out}"], "no quantizable layer"),
        (["estimate", "--model", f"{MODELS}:tiny_cnn", "--estimator", "hesian", "-o", "{out}"], "unknown estimator 'hesian'"),
        (["estimate", "--model", f"{MODELS}:tiny_cnn", "--bits", "2,99", "-o", "{out}"], "bits must be 1-8"),
        (["estimate", "--model", f"{MODELS}:tiny_cnn", "--param", "weighted=True", "-o", "{out}"], "needs calibration data"),
        (["solve", "--table", "missing.csv", "--budget", "avg_bits=4", "-o", "{out}"], "does not exist"),
        (["solve", "--table", "{table}", "--budget", "avg_bits", "-o", "{out}"], "write KEY=VALUE"),
        (["solve", "--table", "{table}", "--budget", "latency=3", "-o", "{out}"], "budget key 'latency' is not a column"),
        (["solve", "--table", "{table}", "--pin", "7=4", "-o", "{out}"], "pin rule '7' matches no layer"),
        (["validate", "--model", f"{MODELS}:tiny_lm", "--plan", "{plan}"], "does not have: '0'"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, msg):
    table = tmp_path / "t.csv"
    plan = tmp_path / "p.json"
    run(["estimate", "--model", f"{MODELS}:tiny_cnn", "--no-progress", "-o", table], capsys)
    run(["solve", "--table", table, "--budget", "avg_bits=4", "-o", plan], capsys)
    out = tmp_path / "out.file"
    argv = [a.format(out=out, table=table, plan=plan) for a in argv]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert msg in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["solve"])
    assert exc.value.code == 2


def test_every_command_help_shows_an_example(capsys):
    from mpsearch.cli import COMMANDS

    for name in COMMANDS:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = capsys.readouterr().out
        assert "example:" in out and f"mpsearch {name}" in out
        example = out[out.index("example:"):].splitlines()[1:]
        for prev, line in zip(["  mpsearch"] + example, example):  # each command on its own line(s)
            assert line.startswith("  mpsearch ") or prev.endswith("\\") or line.startswith("  formats:"), line
            assert len(line) <= 110, f"{name} --help: an example line ran on: {line!r}"


def test_console_script_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mpsearch", "solve", "--table", str(tmp_path / "x.csv"),
                        "--budget", "avg_bits=4", "-o", str(tmp_path / "p.json")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_import_is_light():
    code = ("import sys, mpsearch; mpsearch.CostTable; mpsearch.Budget; mpsearch.get_solver('greedy'); "
            "heavy = [m for m in ('torch', 'matplotlib', 'optuna', 'transformers', 'pulp') if m in sys.modules]; "
            "print(','.join(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == ""


def test_cli_parser_starts_without_torch():
    """Every command pays for the parser: building it (and --help) imports no torch or pandas."""
    code = ("import sys, mpsearch.cli as c; c.build_parser(); "
            "print(','.join(m for m in ('torch', 'pandas', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == ""


@pytest.mark.parametrize("uniform_bits", [2, 3, 4])
def test_greedy_plan_no_worse_than_uniform_at_the_same_size(tmp_path, capsys, uniform_bits):
    """On a trained model, `mpsearch solve` at a uniform plan's real size measures no worse."""
    import core_models
    from mpsearch.validate import validate_plan

    model = core_models.digits_mlp()
    table = tmp_path / "t.csv"
    run(["estimate", "--model", f"{MODELS}:digits_mlp", "--bits", "1,2,3,4,5,6,8", "--no-progress", "-o", table], capsys)
    uniform = BitPlan.uniform(CostTable.read(table).layers, uniform_bits)
    ref = validate_plan(model, uniform, metric=core_models.digits_loss)
    plan = tmp_path / "p.json"
    code, _, _ = run(["solve", "--table", table, "--budget", f"avg_bits={ref.avg_bits}", "-o", plan], capsys)
    assert code == 0
    got = validate_plan(model, BitPlan.load(plan), metric=core_models.digits_loss)
    assert got.avg_bits <= ref.avg_bits + 1e-9
    assert got.quality <= ref.quality * (1 + 1e-6)
