"""The applier: fake-quantize a model's weights according to a plan, and check the plan first.

:func:`apply_plan` returns a new model (a deep copy) unless ``inplace=True``; only the layers the
plan names are touched, and ``keep`` (16 bits) leaves a layer as it is.
"""

from __future__ import annotations

import copy

import torch

from .errors import PlanError, close_matches, name_list
from .layers import _kind, iter_quantizable
from .plan import BitPlan
from .quant import quantize_weight


def check_plan(model: torch.nn.Module, plan: BitPlan) -> list[str]:
    """Raise on layers the plan names that the model lacks or cannot quantize.

    Returns the quantizable layers of the model that the plan does not name (they stay as they are).
    """
    modules = dict(model.named_modules())
    unknown = [n for n in plan.bits if n not in modules]
    if unknown:
        hints = "".join(close_matches(n, modules) for n in unknown[:1])
        raise PlanError(
            f"the plan names {len(unknown)} layer(s) the model does not have: {name_list(unknown, 5)}"
            f"{hints}; was the plan made for another model?"
        )
    wrong = [n for n in plan.bits if _kind(modules[n]) is None]
    if wrong:
        raise PlanError(
            f"the plan names module(s) that are not quantizable layers: {name_list(wrong, 5)} "
            f"({type(modules[wrong[0]]).__name__})"
        )
    named = set(plan.bits)
    return [n for n, _m, _k in iter_quantizable(model, include_embedding=True) if n not in named]


def apply_plan(model: torch.nn.Module, plan: BitPlan, *, inplace: bool = False,
               quantizer: str = "rtn", data=None) -> torch.nn.Module:
    """Fake-quantize the layers named by ``plan`` (per the layer's option), rounding to nearest or,
    with ``quantizer="gptq"`` and calibration ``data``, with GPTQ (:mod:`mpsearch.gptq`; each
    layer's input Hessian is taken from the full-precision model)."""
    import contextlib

    check_plan(model, plan)
    rounding = contextlib.nullcontext()
    if quantizer == "gptq":
        from .data import as_batches
        from .gptq import gptq_rounding, input_hessians
        from .layers import discover_layers

        batches = as_batches(data)
        if not batches:
            raise PlanError("apply_plan(quantizer='gptq') needs calibration data (data=...)")
        names = {n for n in plan.bits if not plan.option(n).is_keep}
        layers = [lay for lay in discover_layers(model, include_embedding=True) if lay.name in names]
        device = next(model.parameters()).device
        rounding = gptq_rounding(input_hessians(model, layers, batches, device))
    elif quantizer != "rtn":
        raise PlanError(f"quantizer must be 'rtn' or 'gptq', got {quantizer!r}")
    target = model if inplace else copy.deepcopy(model)
    with torch.no_grad(), rounding:
        for name in plan.bits:
            module = target.get_submodule(name)
            option = plan.option(name)
            if option.is_keep:
                continue
            q = quantize_weight(module.weight, option, _kind(module), name)
            module.weight.copy_(q)
    return target
