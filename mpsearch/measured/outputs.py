"""Step 7 of the measured path: the output folder (CSV frames, plans, ``summary.json``, plots) and
the extra copies a user asked for (``plans_dir``, ``plot``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from .. import plotting
from ..diagnose import non_monotone, zero_damage_options
from ..fileio import atomic_dir, atomic_write, atomic_write_text
from .result import FrontierRun


def extra_outputs(run: FrontierRun, plans_dir, plot) -> None:
    """One plan JSON per frontier point (and refined plan) in ``plans_dir``; the frontier drawn into ``plot``."""
    if plans_dir is not None:  # built beside, put in place whole
        with atomic_dir(Path(plans_dir)) as d:
            for point, plan in run.plans.items():
                plan.save(d / f"point_{point:04d}.json")
            for ref, plan in run.refined.items():
                plan.save(d / f"{ref}.json")
    if plot is not None:
        with plotting.headless():  # a figure of its own: a notebook's backend and figures are left alone
            fig = plotting.plot_measured_frontier(run)
        with atomic_write(plot, None) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format=Path(plot).suffix[1:].lower())


def write(run: FrontierRun, out: Path, *, plots: bool, settings: dict) -> None:
    """Everything into ``out``; plans go to a staging folder renamed to ``plans/`` last, so a
    failure leaves no partial set."""
    stage = out / ".plans.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    front = run.frontier.copy()
    front["plan"] = ""
    for i, row in front.iterrows():
        name = f"point-{int(row['point']):02d}-{row['avg_bits']:.3f}bits.json"
        run.plans[int(row["point"])].save(stage / name)
        front.loc[i, "plan"] = f"plans/{name}"
    for ref, plan in run.refined.items():
        plan.save(stage / f"{ref}.json")
    run.frontier = front
    files = {"table": "table.csv", "frontier": "frontier.csv", "uniform": "uniform.csv",
             "recommended": "recommended.csv", "plans": "plans/"}
    if plots:
        files.update(_plots(run, out))
    if len(run.refined_frame):
        atomic_write_text(out / "refined.csv", run.refined_frame.to_csv(index=False))
        files.update(refined="refined.csv")
    if len(run.refinement):  # the log, also when no refined plan came out of it
        atomic_write_text(out / "refinement.csv", run.refinement.to_csv(index=False))
        files.update(refinement="refinement.csv")
    atomic_write_text(out / "uniform.csv", run.uniform.to_csv(index=False))
    atomic_write_text(out / "recommended.csv", run.recommended.to_csv(index=False))
    summary = _summary(run, front, settings, files)
    shutil.rmtree(out / "plans", ignore_errors=True)
    stage.rename(out / "plans")
    atomic_write_text(out / "frontier.csv", front.to_csv(index=False))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=_jsonable))
    run.files = {k: str(out / v) for k, v in files.items()}


def _summary(run: FrontierRun, front: pd.DataFrame, settings: dict, files: dict) -> dict:
    per_point = ["point", "avg_bits", "measured_loss", "beats_uniform", "uniform_at_size", "uniform_loss",
                 "vs_uniform_line"]
    return {"metric": run.metric, "metric_label": run.metric_label, "baseline": run.baseline,
            # the full-precision model's every value (a causal LM's perplexity, top-1...): the gaps' origin
            "baseline_values": run.baseline_values,
            "higher_is_better": run.higher_is_better, "proxy": run.proxy, "settings": settings,
            "points": len(front), "validated": int(front["validated"].sum()), "uniform_check": run.uniform_check,
            "per_point": _records(front[front["validated"]], per_point),
            "recommended": _records(run.recommended, list(run.recommended.columns)),
            "refinement": _records(run.refinement, list(run.refinement.columns)),
            "table_checks": _table_checks(run.table), "files": files}


def _table_checks(table) -> dict:
    """What the table says about itself (:mod:`mpsearch.diagnose`): free options, non-monotone layers."""
    bad = table.metadata.get("non_monotone")
    bad = non_monotone(table) if bad is None else bad
    free = table.metadata.get("zero_damage_options")
    return {"zero_damage_options": zero_damage_options(table) if free is None else free,
            "non_monotone_layers": sorted(bad), "monotone_fit": table.metadata.get("monotone_fit")}


def _jsonable(v):
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    return float(v)


def _records(frame: pd.DataFrame, cols) -> list:
    if not len(frame):
        return []
    sub = frame[[c for c in cols if c in frame]].astype(object)
    return sub.where(pd.notna(sub), None).to_dict("records")


def plan_to_show(run: FrontierRun) -> str:
    """The plan ``plan_bits.png`` shows: the mixed plan recommended at the middle target budget, else
    the middle validated point (else the middle point)."""
    rec = run.recommended
    mixed = rec[rec["status"] == "mixed"] if len(rec) and "status" in rec else rec
    if len(mixed):
        return str(mixed.iloc[len(mixed) // 2]["plan"])
    front = run.frontier
    val = front[front["validated"]]
    pick = val.iloc[len(val) // 2] if len(val) else front.iloc[len(front) // 2]
    return f"point-{int(pick['point'])}"


def _plots(run: FrontierRun, out: Path) -> dict:
    with plotting.headless():  # figures of their own: never matplotlib.use, never pyplot's figure list
        fig = plotting.plot_measured_frontier(run)
        fig.savefig(out / "frontier.png", dpi=110, bbox_inches="tight")
        ref = plan_to_show(run)
        fig2 = plotting.plot_plan_bits(run.plan_of(ref), run.table, title=plotting.plan_title(run, ref))
        fig2.savefig(out / "plan_bits.png", dpi=110, bbox_inches="tight")
        fig3 = plotting.plot_sensitivity(run.table)
        fig3.savefig(out / "sensitivity.png", dpi=110, bbox_inches="tight")
    return {"frontier_plot": "frontier.png", "plan_plot": "plan_bits.png", "sensitivity_plot": "sensitivity.png"}
