"""The applier: fake-quantize a model's weights according to a plan, and check the plan first.

:func:`apply_plan` returns a new model (a deep copy) unless ``inplace=True``; only the layers the
plan names are touched, and ``keep`` (16 bits) leaves a layer as it is.

Options whose format quantizes activations (``option.act_bits < 16``: ``w8a8-int8``, ``w8a8-fp8``,
``nvfp4``, ModelOpt's ``fp8``...) also get a forward pre-hook on their layer that fake-quantizes
the layer's input as the consumer does (:meth:`mpsearch.formats.Format.quantize_act`). The hook
takes the range of each batch it sees (dynamic) until :func:`calibrate_activations` fixes a static
range from calibration batches (the consumers' static per-tensor ``amax`` / global scale).
:func:`remove_activation_hooks` takes them off. Hooks live on the module objects: a saved
``state_dict`` does not carry them.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from .data import as_batches, run_model
from .errors import close_matches, MpsearchError, name_list, PlanError
from .formats import get_format
from .gptq import gptq_rounding, input_hessians
from .imatrix import as_imatrix, rounding_context
from .layers import discover_layers, layer_kind, quantizable_names, weight_tensor  # noqa: F401  (re-exported)
from .moe import split_name
from .plan import BitPlan
from .quant import quantize_weight


def check_plan(model: torch.nn.Module, plan: BitPlan) -> list[str]:
    """Raise on layers the plan names that the model lacks or cannot quantize.

    Returns the quantizable layers of the model that the plan does not name (they stay as they are).
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = [n for n in plan.bits if n not in modules and split_name(n)[0] not in params]
    if unknown:
        hints = "".join(close_matches(n, list(modules) + list(params)) for n in unknown[:1])
        raise PlanError(
            f"the plan names {len(unknown)} layer(s) the model does not have: {name_list(unknown, 5)}"
            f"{hints}; was the plan made for another model?"
        )
    wrong = [n for n in plan.bits if layer_kind(model, n) is None]
    if wrong:
        what = modules.get(wrong[0])
        raise PlanError(
            f"the plan names module(s) or parameter(s) that are not quantizable layers: {name_list(wrong, 5)} "
            f"({type(what).__name__ if what is not None else 'a parameter mpsearch does not understand'})"
        )
    for n in plan.bits:  # an expert index beyond the tensor is named here, not while quantizing
        if split_name(n)[1] is not None:
            try:
                weight_tensor(model, n)
            except MpsearchError as exc:
                raise PlanError(str(exc)) from None
    named = set(plan.bits)
    sliced = {split_name(n)[0] for n in named if split_name(n)[1] is not None}
    out = []
    for n in quantizable_names(model):
        if n in sliced:  # a stacked tensor some of whose experts the plan names: the others
            out += [f"{n}[{e}]" for e in range(weight_tensor(model, n).shape[0]) if f"{n}[{e}]" not in named]
        elif n not in named:
            out.append(n)
    return out


def apply_plan(model: torch.nn.Module, plan: BitPlan, *, inplace: bool = False,
               quantizer: str = "rtn", data=None, imatrix=None) -> torch.nn.Module:
    """Fake-quantize the layers named by ``plan`` (per the layer's option), rounding to nearest or,
    with ``quantizer="gptq"`` and calibration ``data``, with GPTQ (:mod:`mpsearch.gptq`; each
    layer's input Hessian is taken from the full-precision model). ``imatrix`` (an
    :class:`~mpsearch.imatrix.Imatrix` or file): llama.cpp's types are rounded as
    ``llama-quantize --imatrix`` does."""
    import contextlib

    check_plan(model, plan)
    rounding = contextlib.nullcontext()
    if imatrix is not None:
        if quantizer != "rtn":
            raise PlanError(f"quantizer {quantizer!r} and an imatrix do not combine")
        names = set(plan.bits)
        layers = [lay for lay in discover_layers(model, include_embedding=True) if lay.name in names]
        rounding = rounding_context(as_imatrix(imatrix), layers)
    elif quantizer == "gptq":
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
            option = plan.option(name)
            if not option.is_keep:
                _quantize_layer(target, option, name)
    return target


def _module_of(model: torch.nn.Module, name: str):
    """The module whose input a layer's activation hook quantizes (``None`` for expert tensors)."""
    try:
        m = model.get_submodule(name)
    except AttributeError:
        return None
    return m if isinstance(getattr(m, "weight", None), torch.Tensor) else None


def _quantize_layer(model: torch.nn.Module, option, name: str, source: torch.Tensor | None = None) -> None:
    """Set layer ``name``'s weight to ``source`` (default: its own weight) quantized as ``option``
    (not ``keep``), with the option's activation hook replacing any earlier one."""
    weight = weight_tensor(model, name)
    src = weight if source is None else source
    weight.copy_(quantize_weight(src, option, layer_kind(model, name), name))
    module = _module_of(model, name)
    if module is not None:
        _remove_module_hooks(module)  # applying again replaces, never stacks, the hook
        add_activation_hook(module, option)


class PlanSwitch:
    """Many plans applied in turn to one model, in place: each :meth:`apply` re-quantizes only the
    layers whose option changed, from a full-precision copy of their weights, and :meth:`restore`
    puts the model back as it was. A measured search uses it to
    measure thousands of plans without copying the model; every state equals
    ``apply_plan(model, plan)`` on the layers ``plan`` names (rounding to nearest).

    ``layers``: the layer names plans may name (the copy of their weights is kept on the weights'
    own device)."""

    def __init__(self, model: torch.nn.Module, layers):
        self.model = model
        self._fp = {n: weight_tensor(model, n).detach().clone() for n in layers}
        self._current: dict[str, str] = {}  # layer -> name of the applied option (absent: full precision)

    def apply(self, plan: BitPlan) -> int:
        """Bring the model to ``plan`` (layers it does not name: full precision); returns how many
        layers were re-quantized."""
        unknown = [n for n in plan.bits if n not in self._fp]
        if unknown:
            raise PlanError(f"PlanSwitch: the plan names layer(s) it was not made for: {name_list(unknown, 5)}")
        return self._set({n: plan.option(n) for n in plan.bits})

    def restore(self) -> None:
        """The model as it was before the first :meth:`apply`."""
        self._set({})

    def _set(self, options: dict) -> int:
        changed = 0
        with torch.no_grad():
            for name in self._fp:
                option = options.get(name)
                if option is not None and option.is_keep:
                    option = None
                if self._current.get(name) == (option.name if option is not None else None):
                    continue
                if option is None:
                    weight_tensor(self.model, name).copy_(self._fp[name])
                    module = _module_of(self.model, name)
                    if module is not None:
                        _remove_module_hooks(module)
                    self._current.pop(name, None)
                else:
                    _quantize_layer(self.model, option, name, self._fp[name])
                    self._current[name] = option.name
                changed += 1
        return changed


class ActivationQuantizer:
    """A forward pre-hook that fake-quantizes a layer's (floating-point) input with a format.

    ``amax`` is the static range (``None``: each batch's own); while ``calibrating`` it records the
    largest range seen instead of quantizing.
    """

    def __init__(self, fmt_name: str, amax=None):
        self.fmt_name = fmt_name
        self.amax = amax
        self.calibrating = False

    @property
    def format(self):
        return get_format(self.fmt_name)

    def __call__(self, module, args):
        if not args or not torch.is_tensor(args[0]) or not torch.is_floating_point(args[0]):
            return None
        x = args[0]
        fmt = self.format
        static = getattr(fmt, "act_static", False)
        if self.calibrating:
            if static:
                seen = fmt.calibrate(x)
                self.amax = seen if self.amax is None else torch.maximum(self.amax, seen.to(self.amax))
            return None
        with torch.no_grad():
            q = fmt.quantize_act(x, amax=self.amax) if static and self.amax is not None else fmt.quantize_act(x)
        if x.requires_grad:  # straight-through, so that gradient-based estimators still run
            q = x + (q - x).detach()
        return (q, *args[1:])


_HOOKS = "_mpsearch_act_hooks"


def add_activation_hook(module: torch.nn.Module, option, amax=None):
    """Install the activation fake-quantizer of ``option`` on ``module``; ``None`` if it has none."""
    if option.act_bits >= 16 or option.fmt is None:
        return None
    hook = ActivationQuantizer(option.format.name, amax)
    handle = module.register_forward_pre_hook(hook)
    module.__dict__.setdefault(_HOOKS, []).append((handle, hook))
    return handle


def activation_hooks(model: torch.nn.Module) -> dict[str, list[ActivationQuantizer]]:
    """The activation quantizers installed by mpsearch, by module name."""
    out = {}
    for name, m in model.named_modules():
        hooks = [h for handle, h in m.__dict__.get(_HOOKS, []) if handle.id in m._forward_pre_hooks]
        if hooks:
            out[name] = hooks
    return out


def _remove_module_hooks(m: torch.nn.Module) -> int:
    n = 0
    for handle, _hook in m.__dict__.pop(_HOOKS, []):
        if handle.id in m._forward_pre_hooks:
            n += 1
        handle.remove()
    return n


def remove_activation_hooks(model: torch.nn.Module) -> int:
    """Remove every activation hook mpsearch installed on ``model``; returns how many."""
    return sum(_remove_module_hooks(m) for m in model.modules())


@contextlib.contextmanager
def activation_quantized(module: torch.nn.Module, option, amax=None):
    """Within the block, ``module``'s input is fake-quantized as ``option``'s format does it."""
    handle = add_activation_hook(module, option, amax)
    try:
        yield handle
    finally:
        if handle is not None:
            handle.remove()
            module.__dict__[_HOOKS] = [(h, k) for h, k in module.__dict__.get(_HOOKS, []) if h is not handle]


def calibrate_activations(model: torch.nn.Module, batches) -> dict[str, float]:
    """Fix each activation hook's static range to the largest ``|x|`` its layer sees on ``batches``.

    This is the consumers' calibration (ModelOpt's max calibrator, llm-compressor's static-minmax
    observer for NVFP4's input global scale) for the formats whose ``act_static`` is true; dynamic
    formats (per-token FP8/int8, MXFP4) ignore it. Returns the ranges by layer.
    """
    hooks = activation_hooks(model)
    for hs in hooks.values():
        for h in hs:
            h.amax, h.calibrating = None, True
    try:
        with torch.no_grad():
            for batch in batches if isinstance(batches, (list, tuple)) else [batches]:
                run_model(model, batch)
    finally:
        for hs in hooks.values():
            for h in hs:
                h.calibrating = False
    return {name: float(hs[0].amax) for name, hs in hooks.items() if hs[0].amax is not None}
