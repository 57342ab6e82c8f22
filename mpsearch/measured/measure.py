"""Step 3 of the measured path: apply plans and measure them (cached per plan in ``measured.json``),
and turn the measurements into the frontier's and the uniform plans' frames."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..distributed import current, measure_plans
from ..fileio import atomic_write_text
from ..metrics import Metric
from ..plan import BitPlan
from ..refine import plan_key
from ..sensitivity.base import progress_bar
from ..sensitivity.cache import data_fingerprint
from ..table import CostTable
from ..validate import validate_plan
from .predicted import baseline_kind
from .result import ProxyWarning


class MeasureCache:
    """Measured results by plan, kept in ``measured.json`` so an interrupted run resumes; ``context``
    (the table, metric, evaluation data and baseline) must match for a stored result to be reused."""

    def __init__(self, path: Path | None, context: str):
        self.path, self.context, self.data = path, context, {}
        if path is not None and path.is_file():
            try:
                doc = json.loads(path.read_text())
                if doc.get("context") == context:
                    self.data = doc.get("results", {})
            except (json.JSONDecodeError, OSError):
                pass

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value
        if self.path is not None:
            atomic_write_text(self.path, json.dumps({"context": self.context, "results": self.data}))


_MeasureCache = MeasureCache  # the older private name


def metric_key(metric: Metric) -> str:
    """What a measurement depends on besides the plan: the metric's class, settings and data."""
    parts = {"class": type(metric).__name__}
    for k, v in sorted(vars(metric).items()):
        if k.startswith("_"):
            continue  # derived state (the fitted reference)
        if isinstance(v, (int, float, str, bool)) or v is None:
            parts[k] = repr(v)
        elif isinstance(v, (torch.Tensor, list, tuple, dict)):
            parts[k] = data_fingerprint([v] if isinstance(v, torch.Tensor) else v)  # a tensor is one batch
        elif callable(v):
            parts[k] = f"{getattr(v, '__module__', '')}.{getattr(v, '__qualname__', type(v).__name__)}"
    return json.dumps(parts, sort_keys=True)


def is_main() -> bool:
    """Whether this process writes (rank 0 under torchrun, else always)."""
    return current().is_main


def measure(model, plan: BitPlan, metric: Metric, cache: MeasureCache | None = None) -> dict:
    """Apply ``plan``, check it (levels per scale group), and measure its size and quality."""
    key = plan_key(plan)
    if cache is not None and cache.get(key) is not None:
        return cache.get(key)
    report = validate_plan(model, plan, metric=metric, baseline=False)
    size = sum(r["size_bits"] for r in report.layers)
    params = sum(r["params"] for r in report.layers)
    result = {"quality": report.quality, "size_bits": size, "avg_bits": size / params,
              "model_size_mb": report.size_mb, "levels_ok": report.ok,
              **{f"measured_{k}": v for k, v in report.metrics.items()}}  # e.g. kld, kld_p99, top1, perplexity
    if cache is not None:
        cache.put(key, result)
    return result


def measure_spread(model, plans, metric: Metric, cache: MeasureCache | None = None, *, workers: int = 1,
                   progress: bool = False) -> list[dict]:
    """:func:`measure` for every plan, spread over ``workers`` processes or ``torchrun`` ranks
    (:func:`mpsearch.distributed.measure_plans`); cached results are reused, new ones cached (by rank 0)."""
    keys = [plan_key(p) for p in plans]
    missing = [i for i, k in enumerate(keys) if cache is None or cache.get(k) is None]
    if current().enabled or int(workers) != 1:
        got = measure_plans(model, [plans[i] for i in missing], lambda m, p: measure(m, p, metric),
                            workers=workers)
    else:  # one process: with a progress bar, each result cached as it comes
        got = [measure(model, plans[i], metric, cache)
               for i in progress_bar(missing, enabled=progress, desc="apply & measure")]
    for i, result in zip(missing, got):
        if cache is not None:
            if is_main():
                cache.put(keys[i], result)
            else:
                cache.data[keys[i]] = result
    if cache is None:
        return got
    return [cache.get(k) for k in keys]


def baseline(model, metric: Metric) -> tuple[float, dict]:
    """The metric on the full-precision model (``metric`` fitted to it first), and every value a
    multi-value metric reports with it (a causal LM's ``perplexity``, ``top1``, ``kld``...)."""
    metric.fit(model)
    value = float(metric(model))
    values = dict(getattr(metric, "values", None) or {})
    return value, {k: float(v) for k, v in values.items()}


def rank_correlation(predicted, measured) -> float:
    """Spearman rank correlation (NaN with fewer than 3 points or no variation)."""
    from scipy.stats import spearmanr

    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    if len(p) < 3 or np.ptp(p) == 0 or np.ptp(m) == 0:
        return float("nan")
    return float(spearmanr(p, m).statistic)


def plan_damage_std(table: CostTable, plan: BitPlan) -> float:
    """sqrt(sum of the plan's layers' ``damage_std`` squared): the spread of its predicted damage."""
    std = table.frame.set_index(["layer", "option"])["damage_std"]
    return float(np.sqrt(sum(float(std[(n, plan.option_name(n))]) ** 2 for n in plan.bits)))


def frontier_frame(table, metric, baseline_value, front, measured, chosen, plans) -> pd.DataFrame:
    """The predicted frontier with its measurements: ``validated``, the metric, ``measured_loss``,
    the measured size, every other value of the metric, and ``damage_std`` where the table has it."""
    qcol = f"measured_{metric.name}"
    front = front.copy()
    got = [measured.get(("point", i), {}) for i in front.index]
    front["validated"] = [i in chosen for i in front.index]
    front[qcol] = [m.get("quality", np.nan) for m in got]
    front["measured_loss"] = [metric.loss(q, baseline_value) if np.isfinite(q) else np.nan for q in front[qcol]]
    front["measured_avg_bits"] = [m.get("avg_bits", np.nan) for m in got]
    front["measured_size_bits"] = [m.get("size_bits", np.nan) for m in got]
    for extra in sorted({k for m in got for k in m if k.startswith("measured_")} - {qcol}):
        front[extra] = [m.get(extra, np.nan) for m in got]  # every value of a multi-value metric
    front.insert(0, "point", range(len(front)))
    if "damage_std" in table.frame:  # independent layers: the plan's std adds in quadrature
        front["damage_std"] = [plan_damage_std(table, p) for p in plans]
    return front


def uniform_frame(table, metric, baseline_value, measured, uniform, key, aliases=None) -> pd.DataFrame:
    """One row per uniform plan (or consumer recipe) with its predicted damage and its measurements;
    ``kind`` says which (``uniform``: one type per layer; ``recipe``: a consumer's mix) and
    ``same_as`` names the other recipes that are the same plan (``aliases``: name -> names)."""
    qcol = f"measured_{metric.name}"
    rows = []
    damage_of = table.frame.set_index(["layer", "option"])["damage"]
    for opt, (plan, use) in uniform.items():
        m = measured[("uniform", opt)]
        # a uniform option, or a consumer recipe (llama.cpp's mixes): its bits as the most common
        bits = table.option_bits().get(opt) or max(set(plan.bits.values()), key=list(plan.bits.values()).count)
        damage = float(sum(damage_of[(n, plan.option(n).name)] for n in plan.layers))
        rows.append({"option": opt, "kind": baseline_kind(table, opt), "same_as": ", ".join((aliases or {}).get(opt, [])),
                     "bits": bits, "avg_bits": m["avg_bits"],
                     **({key: use} if key != "avg_bits" else {}), "size_bits": m["size_bits"],
                     "damage": damage, qcol: m["quality"],
                     "measured_loss": metric.loss(m["quality"], baseline_value),
                     **{k: v for k, v in m.items() if k.startswith("measured_") and k != qcol}})
    return pd.DataFrame(rows)


def proxy_check(front, uframe, estimator, threshold) -> dict:
    """Spearman(predicted damage, measured loss) over the validated and uniform points (information)."""
    val = front[front["validated"]]
    pred = list(val["damage"]) + list(uframe.get("damage", []))
    loss = list(val["measured_loss"]) + list(uframe.get("measured_loss", []))
    rho = rank_correlation(pred, loss)
    proxy = {"spearman": rho, "points": len(pred), "threshold": threshold, "poor": False}
    if not np.isfinite(rho) or rho < threshold:
        proxy["poor"] = True
        proxy["message"] = (
            f"the predicted damage of {estimator!r} ranks the {len(pred)} measured plans poorly "
            f"(Spearman {rho:.2f} < {threshold}): trust measured quality, or try another estimator"
        )
        warnings.warn(proxy["message"], ProxyWarning, stacklevel=4)
    return proxy
