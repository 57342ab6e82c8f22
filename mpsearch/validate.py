"""The validator: does a quantized model hold what the plan says, what does it really weigh, and
what quality does it keep?"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .apply import apply_plan, check_plan
from .coverage import model_coverage, recorded
from .errors import PlanError
from .layers import layer_kind, layer_matrix, weight_tensor
from .options import KEEP_BITS
from .plan import BitPlan
from .quant import expert_matrices, max_levels_per_group
from .targets import DEFAULT_TARGET, get_target


@dataclass
class ValidationReport:
    """The checks and measurements of one plan on one model."""

    layers: list[dict] = field(default_factory=list)  # per layer: name, bits, option, levels, size
    unplanned: list[str] = field(default_factory=list)
    size_bits: float = 0.0
    params: int = 0
    quality: float | None = None
    baseline_quality: float | None = None
    metrics: dict = field(default_factory=dict)  # every value of a multi-value metric (kld, top1, ppl)
    baseline_metrics: dict = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)  # mpsearch.coverage: the planned share of the matrix weights

    @property
    def avg_bits(self) -> float:
        return self.size_bits / self.params if self.params else float("nan")

    @property
    def size_mb(self) -> float:
        return self.size_bits / 8e6

    @property
    def ok(self) -> bool:
        return all(r["levels_ok"] for r in self.layers)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "size_bits": self.size_bits,
            "size_mb": self.size_mb,
            "avg_bits": self.avg_bits,
            "params": self.params,
            "quality": self.quality,
            "baseline_quality": self.baseline_quality,
            "metrics": self.metrics,
            "baseline_metrics": self.baseline_metrics,
            "unplanned": self.unplanned,
            "coverage": self.coverage,
            "layers": self.layers,
        }


def _check_target(model, plan: BitPlan, target) -> None:
    made_for = (plan.provenance.get("table") or {}).get("target") if isinstance(plan.provenance, dict) else None
    chosen = get_target(target if target is not None else made_for)
    for name in plan.layers:
        option = plan.option(name)
        if chosen.name != DEFAULT_TARGET and option.name not in chosen.options:
            raise PlanError(f"layer {name!r} has option {option.name!r}, which target {chosen.name!r} "
                            f"does not execute; its options: {', '.join(chosen.options)}")
        out_c, in_f, mats = layer_matrix(model, name)
        reason = option.check_shape(out_c, in_f)
        if reason:
            shape = f"{mats} experts of {out_c}x{in_f}" if mats > 1 else f"{out_c}x{in_f}"
            raise PlanError(f"layer {name!r} ({shape}) cannot take {option.name}: {reason}")


def _coverage(model, plan: BitPlan, target, exclude, min_coverage):
    made_for = (plan.provenance.get("table") or {}).get("target") if isinstance(plan.provenance, dict) else None
    chosen = get_target(target if target is not None else made_for)
    rec = recorded(plan.provenance) or {}
    excl = list(exclude) + [p for p in rec.get("exclude", []) if isinstance(p, str)]
    need = min_coverage if min_coverage is not None else float(rec.get("min_coverage", 1.0))
    # a plan from a table keeps the table's rule; a hand-made or imported one (no coverage record) may
    # leave layers at 16 bits on purpose, but not weights mpsearch does not understand
    unnamed = "unplanned" if rec or min_coverage is not None else "kept"
    return model_coverage(model, plan.layers, target=chosen, exclude=excl, min_coverage=need,
                          unnamed_layers=unnamed).check()


def _layer_row(quantized, plan: BitPlan, name: str, bits: int) -> dict:
    """One layer of the report: its option, the most distinct values in one of its scale groups
    (against the option's limit), its size and parameters (per expert for stacked experts)."""
    kind = layer_kind(quantized, name)
    weight = weight_tensor(quantized, name)
    option = plan.option(name)
    out_c, in_f, mats = layer_matrix(quantized, name)
    if option.is_keep:
        levels, limit = None, None
        ok = True
    else:
        levels = max_levels_per_group(weight, option, kind)  # every expert's groups, for experts
        limit = option.format.max_levels() if option.fmt is not None else 2**bits
        ok = levels <= limit
    size = mats * option.size_bits(out_c, in_f)
    row = {"layer": name, "bits": bits, "option": option.name, "max_levels": levels,
           "level_limit": limit, "levels_ok": ok, "size_bits": size, "params": mats * out_c * in_f}
    if mats > 1:
        row["experts"] = mats
        if not option.is_keep:  # the most levels of any one expert's groups, expert by expert
            per = expert_matrices(weight, kind)
            row["expert_max_levels"] = [max_levels_per_group(per[e], option) for e in range(mats)]
    return row


def validate_plan(
    model: torch.nn.Module,
    plan: BitPlan,
    *,
    quantized: torch.nn.Module | None = None,
    metric: Callable[[torch.nn.Module], float] | None = None,
    baseline: bool = True,
    target=None,
    exclude=(),
    min_coverage: float | None = None,
    imatrix=None,
) -> ValidationReport:
    """Check ``plan`` against ``model`` and measure it.

    - the plan's layers exist in the model (errors name unknown layers with close matches);
    - every quantized layer of ``quantized`` (the plan applied to ``model`` when not given) holds at
      most 2^b distinct values per scale group;
    - the real size: planned layers with their scale and zero-point overhead, unplanned quantizable
      layers at 16 bits;
    - ``metric(model) -> float``, on the quantized model (and the original when ``baseline``); a
      :class:`~mpsearch.metrics.Metric` that compares with full precision (``kld``, ``top1``...) is
      first fitted on ``model`` when it is not yet, and a metric measuring several values at once
      (the causal-LM metrics: KL, its 99th percentile, top-1 agreement, perplexity) reports them all
      in ``metrics``.
    - ``target`` (default: the plan's own): every layer's option is one the target can execute for
      that layer's shape, so the consumer will store exactly what was planned (no fallback).
    - coverage (:mod:`mpsearch.coverage`): the share of the model's matrix weights the plan decides;
      refused below ``min_coverage`` (default: the one recorded in the plan, else 1.0) of what the
      target can quantize; ``exclude`` (and the exclusions recorded in the plan) accept leaving
      tensors out. A plan that records no coverage (made by hand or imported) may leave layers at
      16 bits unless ``min_coverage`` is given; weights of modules mpsearch does not understand
      count against it either way.
    - ``imatrix``: llama.cpp's types rounded with that importance matrix (``llama-quantize --imatrix``).
    """
    unplanned = check_plan(model, plan)
    _check_target(model, plan, target)
    cov = _coverage(model, plan, target, exclude, min_coverage)
    if quantized is None:
        quantized = apply_plan(model, plan, imatrix=imatrix)
    report = ValidationReport(unplanned=unplanned, coverage=cov.to_dict())
    for name, bits in plan.bits.items():
        row = _layer_row(quantized, plan, name, bits)
        report.layers.append(row)
        report.size_bits += row["size_bits"]
        report.params += row["params"]
    for name in unplanned:
        w = weight_tensor(quantized, name)
        report.size_bits += w.numel() * KEEP_BITS
        report.params += w.numel()
    bad = [r["layer"] for r in report.layers if not r["levels_ok"]]
    if bad:
        r = next(r for r in report.layers if not r["levels_ok"])
        raise PlanError(
            f"layer {r['layer']!r} holds {r['max_levels']} distinct values in one scale group, more "
            f"than its {r['option']} allows ({r['level_limit']}): the model was not quantized by this plan"
        )
    if metric is not None:
        if getattr(metric, "needs_reference", False) and not getattr(metric, "_fitted", True):
            metric.fit(model)
        with torch.no_grad():
            report.quality = float(metric(quantized))
            report.metrics = dict(getattr(metric, "values", None) or {})
            if baseline:
                report.baseline_quality = float(metric(model))
                report.baseline_metrics = dict(getattr(metric, "values", None) or {})
    return report
