"""Fuzzing of every parser: any input either parses or raises an MpsearchError, nothing else.

Each parser gets ``MPSEARCH_FUZZ_EXAMPLES`` hypothesis examples (2,000 by default, the CI run;
``MPSEARCH_FUZZ_EXAMPLES=20000 python -m pytest -q tests/test_fuzz.py`` for the long local run).
Inputs are both free-form (any text or bytes) and structured near-misses (valid documents with one
field replaced by an arbitrary JSON value), which reach the deeper checks.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mpsearch.budget import Budget  # noqa: E402
from mpsearch.errors import MpsearchError  # noqa: E402
from mpsearch.plan import BitPlan  # noqa: E402
from mpsearch.table import CostTable  # noqa: E402

EXAMPLES = int(os.environ.get("MPSEARCH_FUZZ_EXAMPLES", "2000"))


def fuzz(share: int = 1):
    """Settings for one of ``share`` tests of a parser: together they run EXAMPLES examples."""
    return settings(max_examples=-(-EXAMPLES // share), deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


FUZZ = fuzz()
DIR = Path(tempfile.mkdtemp(prefix="mpsearch-fuzz-"))
atexit.register(shutil.rmtree, DIR, True)  # the files the examples are written to

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                                  st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                           max_leaves=8)


def accepts_or_refuses(fn, *args, **kw):
    """Call ``fn``: it returns, or raises an MpsearchError; any other exception fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warnings are not the property under test here
        try:
            return fn(*args, **kw)
        except MpsearchError as exc:
            assert str(exc).strip(), "an empty error message"
            return None


def _file(data, suffix: str) -> Path:
    path = DIR / f"case{suffix}"
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8", errors="surrogatepass")
    return path


def _dumps(doc) -> str:
    return json.dumps(doc, allow_nan=True)


def _mutate(doc, path, value):
    """``doc`` with the node at ``path`` (a list of keys) replaced by ``value``."""
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def paths_of(doc, prefix=()):
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths_of(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths_of(v, prefix + (i,))
    return out


def near_misses(doc):
    """A valid document with one node replaced by any JSON value."""
    paths = paths_of(doc)
    return st.tuples(st.sampled_from(paths), json_values).map(lambda pv: _mutate(doc, pv[0], pv[1]))


# ------------------------------------------------------------------------------ CostTable.read
ROWS = [{"layer": lay, "bits": b, "damage": d, "size_bits": s, "params": p}
        for lay, p in (("a", 100), ("b", 50)) for b, d, s in ((2, 0.5, 220), (4, 0.1, 420), (8, 0.01, 820))]
TABLE_JSON = {"format": "mpsearch.table", "version": 2, "metadata": {"estimator": "x"}, "rows": ROWS}
CSV_HEAD = "layer,bits,damage,size_bits,params"
CSV_CELLS = st.one_of(st.sampled_from(["a", "b", "", "4", "-1", "nan", "inf", "1e308", "0", "16", "x", '"q,r"', "1e-300"]),
                      st.text(alphabet="ab01248.-e,\"# \n", max_size=6))


@fuzz(3)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)), st.sampled_from([".csv", ".json"]))
def test_fuzz_table_read_any_bytes(data, suffix):
    accepts_or_refuses(CostTable.read, _file(data, suffix))


@fuzz(3)
@given(st.lists(st.lists(CSV_CELLS, min_size=5, max_size=5), min_size=1, max_size=8),
       st.one_of(st.just(""), st.sampled_from(["# mpsearch.table null\n", "# mpsearch.table [1]\n", "\ufeff",
                                                '# mpsearch.table {"version": 1, "metadata": [1]}\n',
                                                '# mpsearch.table {"version": 2}\n', "# other\n"])),
       st.one_of(st.none(), json_values))
def test_fuzz_table_read_csv_rows_and_metadata(rows, head, sidecar):
    text = head + CSV_HEAD + "\n" + "\n".join(",".join(r) for r in rows) + "\n"
    path = _file(text, ".csv")
    side = DIR / "case.csv.meta.json"
    if sidecar is None:
        side.unlink(missing_ok=True)
    else:
        side.write_text(_dumps({"format": "mpsearch.table", "version": 2, "metadata": sidecar}))
    try:
        accepts_or_refuses(CostTable.read, path)
    finally:
        side.unlink(missing_ok=True)


@fuzz(3)
@given(near_misses(TABLE_JSON))
def test_fuzz_table_read_json_near_misses(doc):
    accepts_or_refuses(CostTable.read, _file(_dumps(doc), ".json"))


# ------------------------------------------------------------------------------- BitPlan.load
PLAN = {"format": "mpsearch.plan", "version": 1, "bits": {"a": 4, "b": 8},
        "options": {"a": {"name": "int4-g128", "bits": 4, "group_size": 128, "symmetric": True, "scale_bits": 16},
                    "b": {"name": "int8", "bits": 8}},
        "predicted": {"damage": 0.1, "size_bits": 10.0}, "provenance": {"solver": "x"}}


@fuzz(2)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200), json_values.map(_dumps)))
def test_fuzz_plan_load_any_input(data):
    accepts_or_refuses(BitPlan.load, _file(data, ".json"))


@fuzz(2)
@given(near_misses(PLAN))
def test_fuzz_plan_load_near_misses(doc):
    plan = accepts_or_refuses(BitPlan.load, _file(_dumps(doc), ".json"))
    if plan is not None:  # a plan that loads gives every layer a usable option
        for layer in plan.layers:
            accepts_or_refuses(plan.option, layer)


# ------------------------------------------------------------------------------ Budget.parse
_TABLE = []


#: a file model for ROWS' layers (two recipes, one base), so size=/file=/bpw= budgets resolve
FILE_MODEL = {"consumer": "llama.cpp", "source": "fuzz", "header_bytes": 96, "header_measured": True,
              "header_note": "", "alignment": 32, "elements": 400,
              "planned": {"a": ["blk.0.a.weight"], "b": ["blk.0.b.weight"]},
              "bases": {"Q4_K_M": {"command": "Q4_K_M", "tensor_bytes": 40, "padded_bytes": 64, "types": {}}},
              "default_base": "Q4_K_M",
              "recipes": {"Q4_K_M": {"base": "Q4_K_M", "planned_bytes": 80, "planned_padded": 96},
                          "pure-q4_0": {"base": "Q4_K_M", "planned_bytes": 104, "planned_padded": 128}}}


def _table(with_file: bool = False):
    if not _TABLE:
        import pandas as pd

        _TABLE.append(CostTable(pd.DataFrame(ROWS)))
        _TABLE.append(CostTable(pd.DataFrame(ROWS), {"file": FILE_MODEL}))
    return _TABLE[int(with_file)]


budget_items = st.one_of(st.text(max_size=20),
                         st.tuples(st.sampled_from(["avg_bits", "size_mb", "size_bits", "bops", "", "re:(", "*",
                                                    "size", "file", "bpw"]),
                                   st.sampled_from(["=", "==", ":", ""]),
                                   st.one_of(st.text(max_size=8), st.floats().map(repr), st.integers().map(str),
                                             st.tuples(st.floats().map(repr),
                                                       st.sampled_from(["", "B", "MiB", "GiB", "gb", "kb", "X",
                                                                        " MB"])).map("".join),
                                             st.sampled_from(["Q4_K_M", "q4_0", "w4a16-g32", "pure-q8_0", "Q9"])))
                         .map("".join))


@FUZZ
@given(st.lists(budget_items, max_size=3), st.lists(budget_items, max_size=2), st.lists(budget_items, max_size=2),
       st.lists(budget_items, max_size=2), st.lists(st.text(max_size=8), max_size=2))
def test_fuzz_budget_parse(budgets, lo, hi, pins, ties):
    budget = accepts_or_refuses(Budget.parse, budgets, min_bits=lo, max_bits=hi, pins=pins, ties=ties)
    if budget is not None:  # and a parsed budget compiles against a table, or is refused clearly
        from mpsearch.problem import compile_problem

        accepts_or_refuses(compile_problem, _table(), budget)
        accepts_or_refuses(compile_problem, _table(with_file=True), budget)


@FUZZ
@given(near_misses(FILE_MODEL), st.sampled_from(["size=Q4_K_M", "size=q4_0", "file=1KiB", "bpw=3", "size=Q5"]))
def test_fuzz_file_model_metadata(doc, budget):
    """A table's file model (metadata 'file') with any one node replaced: a budget in the user's
    words resolves against it or is refused clearly."""
    import pandas as pd

    from mpsearch.problem import compile_problem

    table = CostTable(pd.DataFrame(ROWS), {"file": doc})
    accepts_or_refuses(compile_problem, table, Budget.parse([budget]))


# --------------------------------------------------------------------------------- importers
def _import(doc_or_text, fmt, suffix, layers):
    from mpsearch.export import import_plan

    path = _file(doc_or_text if isinstance(doc_or_text, (str, bytes)) else _dumps(doc_or_text), suffix)
    return accepts_or_refuses(import_plan, path, fmt, layers=layers)


TORCHAO = {"_type": "FqnToConfig", "_version": 1, "_data": {"fqn_to_config": {
    "a": {"_type": "IntxWeightOnlyConfig", "_version": 2, "_data": {
        "weight_dtype": {"_type": "torch.dtype", "_data": "int4"},
        "granularity": {"_type": "PerGroup", "_data": {"group_size": 32}},
        "mapping_type": {"_type": "MappingType", "_data": "ASYMMETRIC"}}},
    "re:b.*": {"_type": "Int8WeightOnlyConfig", "_data": {"granularity": {"_type": "PerRow", "_data": {}}}},
    "_default": {"_type": "Int4WeightOnlyConfig", "_data": {"group_size": 128}},
    "c": None}}}
GPTQ = {"bits": 4, "group_size": 128, "sym": True, "lm_head": False,
        "dynamic": {"-:^c$": {}, "+:^b$": {"bits": 8, "group_size": -1, "sym": False}}}
LAYERS = st.one_of(st.none(), st.just(["a", "b", "c", "lm_head"]))


@FUZZ
@given(st.one_of(near_misses(TORCHAO), json_values, st.text(max_size=100)), LAYERS)
def test_fuzz_import_torchao(doc, layers):
    _import(doc, "torchao", ".json", layers)


@FUZZ
@given(st.one_of(near_misses(GPTQ), json_values, st.text(max_size=100)), LAYERS)
def test_fuzz_import_gptqmodel(doc, layers):
    _import(doc, "gptqmodel", ".json", layers)


llama_lines = st.lists(st.tuples(st.sampled_from([r"^blk\.0\.attn_q\.weight$", "blk", "(", "", "output", ".*", "token_embd"]),
                                 st.sampled_from(["=", "", "=="]),
                                 st.sampled_from(["q4_K", "q8_0", "f16", "q9", "", "Q4_K_M", "bf16"])).map("".join),
                       max_size=5).map("\n".join)


@FUZZ
@given(st.one_of(llama_lines, st.text(max_size=100), st.binary(max_size=60)),
       st.one_of(st.none(), st.just(["model.layers.0.self_attn.q_proj", "lm_head"])))
def test_fuzz_import_llamacpp(text, layers):
    _import(text, "llama.cpp", ".txt", layers)


# ------------------------------------------------------------------------------ spec parsers
@FUZZ
@given(st.one_of(st.text(max_size=30), st.integers(-3, 40), st.booleans(), st.none(), st.floats()))
def test_fuzz_parse_option(spec):
    from mpsearch.options import parse_option, parse_options

    accepts_or_refuses(parse_option, spec)
    if isinstance(spec, str):
        accepts_or_refuses(parse_options, spec)


@FUZZ
@given(st.dictionaries(st.sampled_from(["name", "bits", "group_size", "symmetric", "scale_bits", "x"]), json_values,
                       max_size=5))
def test_fuzz_option_from_dict(d):
    from mpsearch.options import Option

    accepts_or_refuses(Option.from_dict, d)


@FUZZ
@given(st.lists(st.text(max_size=16), max_size=4))
def test_fuzz_cli_params(items):
    from mpsearch.cli._common import parse_params
    from mpsearch.registry import get_solver

    params = accepts_or_refuses(parse_params, items)
    if params is not None:  # parsed settings are checked by the registry, never a TypeError
        accepts_or_refuses(get_solver, "ilp", **params)
        accepts_or_refuses(get_solver, "greedy", **params)


# module names that cannot exist, so that no real module is imported (and run) by the fuzzer
spec_text = st.text(alphabet="abc._:/-0 ", max_size=16)


@FUZZ
@given(st.one_of(spec_text.map(lambda s: "zz_no_such_mod" + s), spec_text.map(lambda s: str(DIR / "nope") + s),
                 st.sampled_from([".x:y", "..:y", ":", "a:", ":b", "zz_no_such_mod:", "a.b.c:"])))
def test_fuzz_model_and_data_specs(spec):
    from mpsearch.specs import load_data, load_model

    accepts_or_refuses(load_model, spec)
    accepts_or_refuses(load_data, spec)


@FUZZ
@given(st.binary(max_size=200), st.sampled_from([".pt", ".txt"]))
def test_fuzz_data_files(data, suffix):
    from mpsearch.specs import load_data

    accepts_or_refuses(load_data, str(_file(data, suffix)), tokenizer=None)


# ------------------------------------------------------------------------ frontier .npz reader
_NPZ = {}


def _good_npz_arrays() -> dict:
    """The arrays of a frontier .npz as Frontier.write writes it (made once)."""
    if not _NPZ:
        import numpy as np

        from mpsearch.frontier import compute_frontier

        path = DIR / "good.csv"
        compute_frontier(_table(), "dp", key="size_bits").write(path)
        with np.load(path.with_suffix(".npz")) as z:
            _NPZ.update({k: z[k] for k in z.files})
        _NPZ["_bytes"] = path.with_suffix(".npz").read_bytes()
    return _NPZ


def _read_points_fully(path):
    """read_points, then every point's plan and a few that do not exist: each parses or refuses."""
    from mpsearch.frontier import read_points

    got = accepts_or_refuses(read_points, path)
    if got is not None:
        frame, options = got
        for i in [*range(min(len(frame), 5)), len(frame), -1, 10**9]:
            accepts_or_refuses(options, i)


@fuzz(3)
@given(st.one_of(st.binary(max_size=400), st.text(max_size=200).map(str.encode)))
def test_fuzz_npz_any_bytes(data):
    _read_points_fully(_file(data, ".npz"))


@fuzz(3)
@given(st.lists(st.tuples(st.integers(0, 4000), st.binary(min_size=1, max_size=8)), max_size=4),
       st.one_of(st.none(), st.integers(0, 4000)))
def test_fuzz_npz_damaged_bytes(patches, cut):
    """A good file with bytes overwritten here and there, and maybe cut short."""
    data = bytearray(_good_npz_arrays()["_bytes"])
    for pos, chunk in patches:
        pos %= len(data)
        data[pos:pos + len(chunk)] = chunk
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    _read_points_fully(_file(bytes(data), ".npz"))


def _any_array():
    from hypothesis.extra import numpy as hnp

    dtypes = st.sampled_from(["int64", "int8", "uint8", "float64", "float32", "bool", "<U6", "complex64"])
    return hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))


@fuzz(3)
@given(st.lists(st.tuples(st.sampled_from(["choices", "options", "items", "status", "budget", "bound", "sum_damage",
                                           "sum_size_bits", "key", "solver", "extra"]),
                          st.one_of(st.none(), _any_array(), st.text(max_size=30),
                                    st.integers(-3, 9).map(lambda k: ("shift", k)))),
                min_size=1, max_size=3))
def test_fuzz_npz_arrays(changes):
    """A good file with arrays removed (None), replaced by any array or text, or shifted."""
    import numpy as np

    arrays = {k: v for k, v in _good_npz_arrays().items() if k != "_bytes"}
    for key, value in changes:
        if value is None:
            arrays.pop(key, None)
        elif isinstance(value, tuple):
            if key in arrays and arrays[key].dtype.kind in "iuf":
                arrays[key] = arrays[key].astype(np.int64 if arrays[key].dtype.kind in "iu" else float) + value[1]
        else:
            arrays[key] = np.asarray(value)
    path = DIR / "case.npz"
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    _read_points_fully(path)


# ------------------------------------------------------------------------- refinement settings
refine_values = st.one_of(json_values, st.tuples(st.integers(-2, 30), st.integers(-2, 30)).map(tuple),
                          st.sampled_from(["type", "layer", "one", "calibrate", "local", "both", "evolve", "size_bits",
                                           "params", "nope", "(4, 2)", "1e3"]))


@FUZZ
@given(st.dictionaries(st.sampled_from(["swaps", "groups", "ridge", "offspring", "survivors", "seed", "max_switches",
                                        "time_limit", "bogus"]), refine_values, max_size=4),
       st.fixed_dictionaries({}, optional={
           "rounds": st.one_of(st.integers(-1, 3), refine_values),
           "method": st.one_of(st.sampled_from(["calibrate", "local", "both", "evolve"]), refine_values),
           "max_evals": st.one_of(st.integers(-1, 40), refine_values),
           "targets": refine_values,
           "column": st.one_of(st.sampled_from(["size_bits", "params", "damage", "nope"]), refine_values)}))
def test_fuzz_refine_settings(params, fields):
    """Any settings are made or refused; settings that are made run (a small search on a table)."""
    from mpsearch.refine import RefineSettings

    st_ = accepts_or_refuses(RefineSettings.from_params, params, **fields)
    if st_ is not None and st_.rounds <= 2 and st_.offspring <= 6 and st_.swaps <= 6:
        _run_refinement(st_)


@FUZZ
@given(st.lists(st.text(max_size=16), max_size=3), st.lists(st.sampled_from(["rounds", "max_evals", "targets"]),
                                                            max_size=2, unique=True).map(set),
       st.sampled_from(["calibrate", "local", "both", "evolve"]), st.integers(-2, 3))
def test_fuzz_refine_flags(items, given_flags, method, number):
    """``--refine-param`` text as the CLI reads it (with --refine, --refine-evals, --refine-target)."""
    from types import SimpleNamespace

    from mpsearch.cli.frontier import refine_settings

    args = SimpleNamespace(refine_param=items, refine_method=method,
                           refine_rounds=number if "rounds" in given_flags else None,
                           refine_max_evals=number if "max_evals" in given_flags else None,
                           refine_targets=[str(number)] if "targets" in given_flags else None)
    st_ = accepts_or_refuses(refine_settings, args)
    if st_ is not None and st_.rounds <= 2 and st_.offspring <= 6 and st_.swaps <= 6:
        _run_refinement(st_)


def _run_refinement(settings):
    """:func:`mpsearch.refine.refine` with ``settings`` on the fuzz table (measured loss: the damage)."""
    from mpsearch.plan import BitPlan
    from mpsearch.refine import refine

    table = _table()
    frame = table.frame.set_index(["layer", "option"])

    def measure(plan):
        return float(sum(frame.loc[(n, plan.option_name(n)), "damage"] for n in plan.layers))

    history = [(p, measure(p)) for p in (BitPlan.uniform(table.layers, o) for o in ("int2", "int4"))]
    accepts_or_refuses(refine, table, "greedy", {"t": 5.0}, history, measure, settings, key="avg_bits")


# ------------------------------------------------------------------------------ the new surfaces
def _imatrix_seed() -> bytes:
    return (Path(__file__).parent / "fixtures" / "imatrix" / "tiny-moe.imatrix.gguf").read_bytes()


@fuzz(3)
@given(st.one_of(st.binary(max_size=400), st.text(max_size=200).map(str.encode)), st.sampled_from([".gguf", ".dat"]))
def test_fuzz_imatrix_any_bytes(data, suffix):
    from mpsearch.imatrix import read_imatrix

    accepts_or_refuses(read_imatrix, _file(data, suffix))


@fuzz(3)
@given(st.lists(st.tuples(st.integers(0, 20000), st.binary(min_size=1, max_size=8)), min_size=1, max_size=4),
       st.integers(0, 40000))
@example(patches=[(748, b"\x01\x80")], cut=6532)  # found by this test: an empty tensor at the file's end
def test_fuzz_imatrix_damaged_gguf(patches, cut):
    """llama-imatrix's own GGUF (a committed fixture), bytes overwritten and/or cut short."""
    from mpsearch.imatrix import read_imatrix

    data = bytearray(_imatrix_seed())
    for at, chunk in patches:
        at %= len(data)
        data[at:at + len(chunk)] = chunk
    accepts_or_refuses(read_imatrix, _file(bytes(data[:max(cut, 1)] if cut < len(data) else data), ".gguf"))


@FUZZ
@given(st.one_of(st.text(max_size=60),
                 st.lists(st.tuples(st.sampled_from(["gpu", "ram", "ctx", "parallel", "kv", "placement", "cpu",
                                                     "min_tps", "x", ""]),
                                    st.one_of(st.sampled_from(["24GiB", "1.5GB", "0", "-1", "q8_0", "auto", "ngl=3",
                                                               "avx512", "nan", "inf", "1e30", ""]),
                                              st.text(max_size=8))), max_size=4)
                 .map(lambda kv: ",".join(f"{k}={v}" for k, v in kv))))
def test_fuzz_fit_spec(text):
    from mpsearch.fit import FitSpec

    accepts_or_refuses(FitSpec.parse, text)
