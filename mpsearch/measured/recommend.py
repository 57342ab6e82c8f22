"""Step 6 of the measured path: at each target budget, the best *measured* plan that fits it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..problem import compile_problem
from ..refine import _choice_of


def recommend(candidates: list, problems: dict) -> pd.DataFrame:
    """The best measured plan fitting each target budget, uniform plans included.

    ``candidates``: ``(ref, source, plan, measured dict with quality/measured_loss/avg_bits/size_bits)``
    with source ``mixed``, ``refined`` or ``uniform``. ``problems``: target label -> compiled problem
    of that budget (its caps, bounds, pins and ties decide what fits). Status: ``mixed`` when a mixed
    (or refined) plan measured best, ``uniform_better`` when a uniform plan beat every mixed plan
    that fits, ``uniform_only`` when no mixed plan that fits was measured, ``none`` when nothing fits.
    """
    rows = []
    for label, problem in problems.items():
        fit = []
        for ref, source, plan, m in candidates:
            try:
                ok = problem.is_feasible(_choice_of(problem, plan))
            except ValueError:
                ok = False
            if ok and np.isfinite(m["measured_loss"]):
                fit.append((m["measured_loss"], ref, source, m))
        if not fit:
            rows.append({"budget": label, "status": "none"})
            continue
        loss, ref, source, m = min(fit, key=lambda e: e[0])
        mixed = [e for e in fit if e[2] != "uniform"]
        uni = [e for e in fit if e[2] == "uniform"]
        status = ("uniform_only" if not mixed else "uniform_better" if source == "uniform" else "mixed")
        rows.append({"budget": label, "plan": ref, "source": source, "status": status,
                     "measured_loss": loss, "quality": m["quality"], "avg_bits": m["avg_bits"],
                     "size_bits": m["size_bits"],
                     "best_mixed_loss": min((e[0] for e in mixed), default=np.nan),
                     "best_uniform_loss": min((e[0] for e in uni), default=np.nan),
                     # every value of a multi-value metric (measured_kld, measured_top1, measured_perplexity...)
                     **{k: v for k, v in m.items() if k.startswith("measured_") and k != "measured_loss"}})
    return pd.DataFrame(rows)


def _measured(row, metric_name: str) -> dict:
    """A measured row (frontier, uniform or refined) as :func:`recommend` reads it."""
    skip = ("measured_loss", "measured_avg_bits", "measured_size_bits")
    return {"measured_loss": float(row["measured_loss"]), "quality": float(row[f"measured_{metric_name}"]),
            "avg_bits": float(row["measured_avg_bits"] if "measured_avg_bits" in row else row["avg_bits"]),
            "size_bits": float(row["measured_size_bits"] if "measured_size_bits" in row else row["size_bits"]),
            **{k: row[k] for k in row.index if k.startswith("measured_") and pd.notna(row[k]) and k not in skip}}


def _baseline_ref(table, name: str) -> str:
    """How a recommendation names a baseline plan: ``uniform-<option>`` for a uniform option, a
    consumer recipe by its own name (``Q4_K_M``, ``pure-q4_K``, ``uniform-w4a16-g32``)."""
    return f"uniform-{name}" if name in table.options else name


def recommendations(session, targets: dict, measured) -> pd.DataFrame:
    """:func:`recommend` over every plan of ``measured`` (a :class:`~.result.Measured`): validated
    frontier points, uniform plans and recipes, refined plans; ``targets``: label -> budget value."""
    front, uframe, rframe = measured.front, measured.uframe, measured.rframe
    cands = [(f"point-{int(r['point'])}", "mixed", measured.plans[i], r) for i, r in front[front["validated"]].iterrows()]
    cands += [(_baseline_ref(session.table, r["option"]), "uniform", measured.uniform[r["option"]][0], r)
              for _, r in uframe.iterrows()]
    cands += [(r["plan"], "refined", measured.refined[r["plan"]], r) for _, r in rframe.iterrows()]
    cands = [(ref, src, p, _measured(r, session.metric.name)) for ref, src, p, r in cands]
    key = session.key
    problems = {t: compile_problem(session.table, session.base.with_constraints(**{key: v})) for t, v in targets.items()}
    rec = recommend(cands, problems)
    if len(rec):
        rec.insert(1, f"budget_{key}", [targets[t] for t in rec["budget"]])
    return rec
