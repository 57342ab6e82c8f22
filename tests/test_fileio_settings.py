"""The output mechanism (checks, atomic files and folders) and the declared settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mpsearch.errors import OutputError, SettingsError
from mpsearch.fileio import atomic_dir, atomic_output_dir, atomic_write, atomic_write_text, check_output_path


# ------------------------------------------------------------------------------ output checks
def test_check_output_path_accepts_new_files_and_folders(tmp_path):
    assert check_output_path(tmp_path / "new" / "deeper" / "a.json") == tmp_path / "new" / "deeper" / "a.json"
    assert check_output_path(tmp_path / "d", kind="dir") == tmp_path / "d"
    (tmp_path / "f.csv").write_text("x")
    assert check_output_path(tmp_path / "f.csv")  # an existing file is replaced, not refused
    assert not (tmp_path / "new").exists()  # checking writes nothing


@pytest.mark.parametrize("make, kind, suffixes, msg", [
    (lambda t: t / "adir", "file", None, "is an existing directory"),
    (lambda t: t / "afile", "dir", None, "is an existing file; give a folder path"),
    (lambda t: t / "afile" / "x" / "y.json", "file", None, "'.*afile' is a regular file, not a directory"),
    (lambda t: "", "file", None, "the output path is empty"),
    (lambda t: "   ", "dir", None, "the output path is empty"),
    (lambda t: t / "plot.xyz", "file", {".png", ".pdf"}, r"unsupported format '.xyz'; use one of .pdf, .png"),
    (lambda t: 3, "file", None, "must be a string, got int"),
])
def test_check_output_path_refusals(tmp_path, make, kind, suffixes, msg):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=msg):
        check_output_path(make(tmp_path), kind=kind, suffixes=suffixes)


# ------------------------------------------------------------------------------ atomic files
def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError):
        with atomic_write(p) as fh:
            fh.write("half")
            raise RuntimeError("disk full")
    assert p.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["a.txt"]
    with atomic_write(p, None) as tmp:  # writers that take a file name
        Path(tmp).write_text("new")
        assert tmp.endswith(".txt") and not p.read_text() == "new"
    assert p.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_atomic_write_removes_the_folders_it_created_on_failure(tmp_path):
    with pytest.raises(ValueError):
        with atomic_write(tmp_path / "x" / "y" / "a.txt") as fh:
            fh.write("x")
            raise ValueError("bad")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ atomic folders
def test_atomic_dir_appears_whole_and_failures_leave_nothing(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(ValueError):
        with atomic_dir(dest) as stage:
            (stage / "table.csv").write_text("t")
            raise ValueError("estimator failed")
    assert os.listdir(tmp_path) == []
    with atomic_dir(dest) as stage:
        (stage / "plans").mkdir()
        (stage / "plans" / "p.json").write_text("{}")
        assert not dest.exists()  # nothing visible until the end
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == ["plans", "plans/p.json"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_dir_over_an_existing_folder_keeps_other_files_and_seeds_caches(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "mine.txt").write_text("user file")
    (dest / "table.csv").write_text("cached")
    with atomic_dir(dest, seed=("table.csv",)) as stage:
        assert (stage / "table.csv").read_text() == "cached" and not (stage / "mine.txt").exists()
        (stage / "frontier.csv").write_text("f")
    assert (dest / "mine.txt").read_text() == "user file" and (dest / "frontier.csv").read_text() == "f"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_dir_keeps_its_work_after_ctrl_c_and_resumes(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(dest) as stage:
            (stage / "cache.pt").write_text("half the work")
            raise KeyboardInterrupt
    assert not dest.exists() and (tmp_path / ".out.partial" / "cache.pt").exists()
    with atomic_dir(dest) as stage:
        assert (stage / "cache.pt").read_text() == "half the work"
    assert (dest / "cache.pt").exists() and sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_output_dir_rewrites_the_result_paths(tmp_path):
    class Run:
        def __init__(self, out):
            self.out, self.files = out, {"table": str(out / "t.csv"), "other": "/elsewhere"}

    @atomic_output_dir("out")
    def work(*, out=None):
        (out / "t.csv").write_text("x")
        return Run(out)

    run = work(out=tmp_path / "res")
    assert run.out == tmp_path / "res" and run.files == {"table": str(tmp_path / "res" / "t.csv"), "other": "/elsewhere"}
    assert (tmp_path / "res" / "t.csv").read_text() == "x"
    with pytest.raises(OutputError, match="is an existing file"):
        work(out=tmp_path / "res" / "t.csv")


# -------------------------------------------------------------------------------- settings
def test_settings_are_the_declared_signature_with_types_and_defaults():
    from mpsearch.registry import settings

    ilp = {s.name: s for s in settings("solver", "ilp")}
    assert ilp["time_limit"].default == 60.0 and ilp["time_limit"].type_name == "float or None"
    assert ilp["backend"].type_name == "str" and ilp["msg"].default is False
    hess = {s.name: s for s in settings("estimator", "hessian")}
    assert hess["probes"].describe() == "probes: int = 64"


def test_settings_are_converted_and_checked_before_construction():
    from mpsearch.registry import check_settings, get_solver

    assert check_settings("solver", "ilp", {"time_limit": 3, "msg": "true"}) == {"time_limit": 3.0, "msg": True}
    assert get_solver("ilp", time_limit=3).time_limit == 3.0
    assert get_solver("dp", max_units=1024.0).max_units == 1024
    with pytest.raises(SettingsError, match=r"'max_units' must be int, got 1.5"):
        get_solver("dp", max_units=1.5)
    with pytest.raises(SettingsError, match=r"'fill' must be bool, got 1 \(int\)"):
        get_solver("greedy", fill=1)
    with pytest.raises(SettingsError, match=r"no setting 'tim_limit' \(did you mean 'time_limit'\?\)"):
        get_solver("ilp", tim_limit=1)


def test_mpsearch_list_shows_every_name_the_flags_accept(capsys):
    """Every name --estimator, --solver, --metric (kld and top1 too), --target and --to accept, with
    the aliases; defaults as the CLI uses them (the estimators' options are --bits, not '2,3,4,8')."""
    from mpsearch.cli import main
    from mpsearch.registry import ESTIMATORS, EXPORTERS, METRICS, REGISTRIES, SOLVERS, TARGETS

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in [*ESTIMATORS, *SOLVERS, *METRICS, *TARGETS, *EXPORTERS]:
        assert f"\n  {name}\n" in out
    assert "\n  kld\n" in out and "\n  top1\n" in out
    assert "also: llamacpp, gguf" in out and "'2,3,4,8'" not in out
    assert "options: str or list or tuple or None = None  (None: 2,3,4,8, or a consumer target's" in out
    assert "time_limit: float or None = 60.0" in out and "probes: int = 64" in out
    assert "window: int = 128" in out and "batches" not in out  # a metric's data is not a setting
    assert main(["list", "solvers"]) == 0
    only = capsys.readouterr().out
    assert "solvers:" in only and "estimators:" not in only
    for kind, reg in REGISTRIES.items():  # what the flags accept is what the registry resolves
        for name in reg.names():
            assert reg.resolve(name.upper() if kind != "metric" else name) == name


def test_every_typed_setting_of_every_part_is_refused_before_any_work():
    """A value of the wrong type, or outside a declared constraint, is refused when the part is made
    (before any model loads), for every setting of every registered estimator and solver."""
    from mpsearch.registry import REGISTRIES, get_estimator, get_solver, settings
    from mpsearch.settings import Interval

    make = {"estimator": get_estimator, "solver": get_solver}
    checked = 0
    for kind, get in make.items():
        for name in REGISTRIES[kind].names():
            for s in settings(kind, name):
                if s.type is None:
                    continue  # declared as any value (device, cache_dir, a callable objective)
                with pytest.raises(SettingsError, match=f"'{s.name}' must be"):
                    get(name, **{s.name: object()})
                checked += 1
                for c in s.constraints:
                    if isinstance(c, Interval) or hasattr(c, "bad_value"):
                        with pytest.raises(SettingsError, match=f"'{s.name}' must be"):
                            get(name, **{s.name: c.bad_value()})
    assert checked > 40


def test_help_names_the_choices(capsys):
    from mpsearch.cli import main

    for cmd, names in (("solve", ["greedy", "ilp", "dp", "optuna"]), ("estimate", ["hessian", "output-distance"])):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert all(n in out for n in names), out


def test_settings_objects_check_every_field_when_made():
    """FrontierSettings, RefineSettings and DataSettings: frozen; each field's type and declared
    constraints checked when the object is made (so before any model loads); names resolved once."""
    import dataclasses

    from mpsearch.errors import MpsearchError
    from mpsearch.measured import DataSettings, FrontierSettings
    from mpsearch.refine import RefineSettings
    from mpsearch.settings import settings_of
    from mpsearch.targets import Target

    for cls in (FrontierSettings, RefineSettings, DataSettings):
        made = cls()
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(made, cls.field_names()[0], None)
        for s in settings_of(cls):
            if s.type is not object:
                with pytest.raises(MpsearchError, match=f"{s.name} must be"):
                    cls(**{s.name: object()})
            for c in s.constraints:
                if hasattr(c, "bad_value"):
                    with pytest.raises(SettingsError, match=f"{s.name} must be"):
                        cls(**{s.name: c.bad_value()})
    assert isinstance(FrontierSettings(target="gguf").target, Target)  # resolved once, to its object
    assert FrontierSettings(target="gguf").target.name == "llama.cpp" and FrontierSettings().target is None
    with pytest.raises(MpsearchError, match="unknown target 'nope'"):
        FrontierSettings(target="nope")
    with pytest.raises(MpsearchError, match="unknown solver 'gredy'"):
        FrontierSettings(solver="gredy")
    with pytest.raises(MpsearchError, match="target 'llama.cpp' cannot execute option 'int4'"):
        FrontierSettings(target="llama.cpp", options="int4")
    with pytest.raises(SettingsError, match="survivors a non-increasing sequence"):
        RefineSettings(offspring=4, survivors=(2, 3))
    assert RefineSettings(survivors=[4, 2]).survivors == (4, 2) and RefineSettings(ridge=0).ridge == 0.0


def test_every_setting_of_the_model_path_has_its_flag():
    """A new field of FrontierSettings / RefineSettings / DataSettings is one argparse line in
    cli/frontier.py (its dest the field's name; the refinement's prefixed refine_, or a
    --refine-param key): the fields below are the library's only."""
    import argparse

    from mpsearch.cli import build_parser
    from mpsearch.measured import DataSettings, FrontierSettings
    from mpsearch.refine import RefineSettings

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    dests = {a.dest for a in sub.choices["frontier"]._actions}
    built = {"estimator_params", "solver_params", "refine"}  # from --estimator-param, --param, --refine-*
    library = {"budgets", "match_uniform", "estimate_kwargs", "min_rank_correlation", "plots", "progress"}
    assert set(FrontierSettings.field_names()) - dests == built | library
    assert set(DataSettings.field_names()) <= dests
    refine = {f for f in RefineSettings.field_names() if f"refine_{f}" in dests or f in RefineSettings.PARAMS}
    assert set(RefineSettings.field_names()) - refine == {"column"}
