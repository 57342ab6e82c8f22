import json

import numpy as np
import pandas as pd
import pytest

from mpsearch.budget import Budget
from mpsearch.errors import BudgetError, PlanError, TableError
from mpsearch.plan import BitPlan
from mpsearch.problem import compile_problem
from mpsearch.table import CostTable


def make_frame(layers=("a", "b", "c"), bits=(2, 4, 8), params=(100, 200, 50), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for name, p in zip(layers, params):
        s = rng.uniform(0.5, 2)
        for b in bits:
            rows.append({"layer": name, "bits": b, "damage": s * 2.0 ** (-2 * b), "size_bits": p * b, "params": p})
    return pd.DataFrame(rows)


def test_csv_round_trip_keeps_rows_and_metadata(tmp_path):
    t = CostTable(make_frame(), {"estimator": "unit", "nested": {"probes": 3}})
    path = t.write(tmp_path / "t.csv")
    back = CostTable.read(path)
    pd.testing.assert_frame_equal(back.frame, t.frame)
    assert back.metadata == t.metadata
    # pandas alone reads the rows
    assert len(pd.read_csv(path, comment="#")) == 9
    json_back = CostTable.read(t.write(tmp_path / "t.json"))
    pd.testing.assert_frame_equal(json_back.frame, t.frame, check_dtype=False)
    assert json_back.metadata == t.metadata


def test_default_option_names_and_views():
    t = CostTable(make_frame(bits=(2, 16)))
    assert t.options == ["int2", "keep"]
    assert t.layers == ["a", "b", "c"]
    assert t.resource_columns == ["size_bits", "params"]
    assert t.pivot("size_bits").loc["b", "keep"] == 200 * 16


def test_table_read_without_metadata_line(tmp_path):
    p = tmp_path / "plain.csv"
    make_frame().to_csv(p, index=False)
    assert CostTable.read(p).metadata == {}


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (lambda f: f.drop(columns="damage"), "lacks the required column.*'damage'"),
        (lambda f: f.assign(damage=f.damage.where(f.index != 4, np.nan)), r"row 5 \(layer 'b'.*'damage' must hold finite"),
        (lambda f: f.assign(damage=f.damage.where(f.index != 2, -1.0)), r"row 3 .*'damage' must be >= 0"),
        (lambda f: pd.concat([f, f.iloc[[1]]]), "layer 'a' has option 'int4' twice"),
        (lambda f: f.assign(bits=f.bits.where(f.index != 0, 2.5)), "'bits' must be an integer"),
        (lambda f: f.assign(size_bits=f.size_bits.astype(object).where(f.index != 7, "big")), "'size_bits' must hold finite"),
        (lambda f: f.iloc[0:0], "no rows"),
        (lambda f: f.assign(layer=f.layer.where(f.index != 3, "")), "row 4: the 'layer' column is empty"),
    ],
)
def test_bad_tables_name_the_row(mutate, msg):
    with pytest.raises(TableError, match=msg):
        CostTable(mutate(make_frame()))


def test_ragged_option_sets_are_a_table_unless_complete_is_asked():
    f = make_frame().drop(index=5)  # layer 'b' has no int8 row
    t = CostTable(f)
    assert sorted(t.frame[t.frame.layer == "b"]["option"]) == ["int2", "int4"]
    assert np.isnan(t.pivot().loc["b", "int8"])
    with pytest.raises(TableError, match="layer 'b' lacks option.*'int8'"):
        CostTable(f, complete=True)


def test_group_members_must_share_options():
    f = make_frame()
    f["group"] = f.layer.map({"a": "g1", "b": "g1", "c": None})
    CostTable(f)  # fine
    f2 = pd.concat([f, pd.DataFrame([{"layer": "a", "bits": 3, "damage": 0.1, "size_bits": 300, "params": 100, "group": "g1"}])])
    with pytest.raises(TableError, match="group 'g1': layers 'a' and 'b' offer different options"):
        CostTable(f2, complete=False)


def test_unreadable_and_wrong_version_files(tmp_path):
    with pytest.raises(TableError, match="does not exist"):
        CostTable.read(tmp_path / "nope.csv")
    bad = tmp_path / "v2.csv"
    bad.write_text('# mpsearch.table {"version": 3}\nlayer,bits,damage,size_bits\na,4,0.1,10\n')
    with pytest.raises(TableError, match="version 3 is not supported"):
        CostTable.read(bad)
    j = tmp_path / "x.json"
    j.write_text(json.dumps({"rows": []}))
    with pytest.raises(TableError, match="not an mpsearch table"):
        CostTable.read(j)


# ----------------------------------------------------------------- budgets


def test_budget_parsing():
    b = Budget.parse(["avg_bits=4", "size_mb=1.5", "bops=3e9"], min_bits=["2", "re:^a$=4"],
                     max_bits=["c=4"], pins=["b=keep"], ties=["x"])
    assert b.constraints == {"avg_bits": 4.0, "size_mb": 1.5, "bops": 3e9}
    assert b.min_bits == {"*": 2, "re:^a$": 4}
    assert b.pins == {"b": "keep"}
    assert Budget.from_dict(b.to_dict()) == b


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"budgets": ["avg_bits"]}, "write KEY=VALUE"),
        ({"budgets": ["avg_bits=four"]}, "'four' is not a number"),
        ({"budgets": ["avg_bits=-1"]}, "must be >= 0"),
        ({"budgets": ["size_mb=inf"]}, "must be finite"),
        ({"min_bits": ["a=x"]}, "must be an integer"),
        ({"pins": ["re:([=4"]}, "does not compile"),
    ],
)
def test_bad_budgets(kw, msg):
    with pytest.raises(BudgetError, match=msg):
        Budget.parse(**kw)


def test_budget_against_table():
    t = CostTable(make_frame())
    p = compile_problem(t, Budget.parse(["avg_bits=4"]))
    assert p.constraints[0].column == "size_bits" and p.constraints[0].cap == pytest.approx(4 * 350)
    p = compile_problem(t, Budget.parse(["size_mb=1"]))
    assert p.constraints[0].cap == pytest.approx(8e6)
    with pytest.raises(BudgetError, match="budget key 'sise_bits' is not a column.*did you mean 'size_bits'"):
        compile_problem(t, Budget.parse(["sise_bits=4"]))
    with pytest.raises(BudgetError, match="min_bits rule 'z' matches no layer"):
        compile_problem(t, Budget.parse(min_bits=["z=4"]))
    with pytest.raises(BudgetError, match="no option with that bit-width"):
        compile_problem(t, Budget.parse(pins=["a=3"]))
    with pytest.raises(BudgetError, match="leave it no option"):
        compile_problem(t, Budget.parse(min_bits=["a=8"], max_bits=["a=4"]))
    no_params = CostTable(make_frame().drop(columns="params"))
    with pytest.raises(BudgetError, match="avg_bits needs a 'params' column"):
        compile_problem(no_params, Budget.parse(["avg_bits=4"]))


def test_bounds_pins_and_ties_compile_to_items_and_masks():
    t = CostTable(make_frame())
    p = compile_problem(t, Budget.parse(min_bits=["4"], pins=["c=8"], ties=["^(a|b)$"]))
    # a regex with a capture group ties only equal captures: a and b stay apart
    assert p.items == [["a"], ["b"], ["c"]]
    p = compile_problem(t, Budget.parse(min_bits=["4"], pins=["c=8"], ties=["^(?:a|b)$"]))
    assert p.items == [["a", "b"], ["c"]]
    assert p.allowed.tolist() == [[False, True, True], [False, False, True]]
    # tied item's costs are the members' sums
    assert p.resources["size_bits"][0, 1] == (100 + 200) * 4


# ----------------------------------------------------------------- plans


def test_plan_round_trip(tmp_path):
    plan = BitPlan(bits={"a": 4, "b": 16}, options={"a": {"name": "int4-g32", "bits": 4, "group_size": 32, "symmetric": True}},
                   predicted={"damage": 0.5, "size_bits": 123.0}, provenance={"solver": "x"})
    back = BitPlan.load(plan.save(tmp_path / "p.json"))
    assert back == plan
    assert back.option("a").group_size == 32 and back.option("b").is_keep
    assert back.to_frame()["option"].tolist() == ["int4-g32", "keep"]


@pytest.mark.parametrize(
    "doc, msg",
    [
        ([], "a plan is a JSON object"),
        ({"format": "other", "version": 1, "bits": {"a": 4}}, "not an mpsearch plan"),
        ({"format": "mpsearch.plan", "version": 7, "bits": {"a": 4}}, "version 7 is not supported"),
        ({"format": "mpsearch.plan", "version": 1}, "has no 'bits'"),
        ({"format": "mpsearch.plan", "version": 1, "bits": {"a": 4.5}}, "bits must be an integer"),
        ({"format": "mpsearch.plan", "version": 1, "bits": {}}, "non-empty 'bits'"),
        ({"format": "mpsearch.plan", "version": 1, "bits": {"a": 4}, "options": {"b": {}}}, "absent from 'bits'"),
        ({"format": "mpsearch.plan", "version": 1, "bits": {"a": 4}, "options": {"a": {"bits": 8}}}, "its option says 8"),
    ],
)
def test_malformed_plans(tmp_path, doc, msg):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanError, match=msg):
        BitPlan.load(path)


def test_plan_file_errors(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        BitPlan.load(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        BitPlan.load(tmp_path / "x.json")
