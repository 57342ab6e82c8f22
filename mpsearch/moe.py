"""Mixture-of-experts models: where the expert weights live, how many tokens each expert sees, and
what an expert the calibration data barely reaches is assumed to cost.

**Where transformers keeps experts.** Since transformers 5 the routed experts of a MoE block are
3-D ``nn.Parameter``s of an ``*Experts`` module (``mlp.experts.gate_up_proj`` of shape
``(experts, 2 * intermediate, hidden)`` and ``mlp.experts.down_proj`` ``(experts, hidden,
intermediate)``), and each expert's matrix is applied as ``F.linear(x, W[e])``: rows are outputs,
the *last* dimension is the input features. Some families store them transposed, ``(experts, in,
out)``, applied as ``x @ W[e]`` (gpt-oss, Llama-4). :func:`experts_layout` reads the layout from the
flags transformers' ``@use_experts_implementation`` decorator sets on the module (``is_transposed``,
``has_gate``), from a small table of undecorated classes (``Llama4TextExperts``), or from the shapes
of the pair when they decide it; anything else is not understood (and a model holding it is refused
by :mod:`mpsearch.coverage`, never half-planned). Older layouts with one ``nn.Linear`` per expert
(``experts.3.w1``, ``experts.expert_3.wi``) are found too (:func:`scan`).

**Kinds and roles.** A stacked tensor is one layer of kind ``expert`` (``(E, out, in)``) or
``expert_t`` (``(E, in, out)``), with ``extra["experts"] = E`` and ``out_channels x in_features``
the *per-expert* matrix, so every format's shape rule applies per expert matrix and its size is
``E x`` one matrix's. With ``per_expert=True`` each expert is a layer of its own,
``...experts.down_proj[3]`` (a 2-D view of the parameter). Routers (``mlp.gate``, ``mlp.router``,
Qwen2-MoE's ``shared_expert_gate``) have kind ``router``; shared experts stay ``linear`` with role
``shared_expert``; :attr:`mpsearch.layers.Layer.role` tells the three roles apart.

**Routed tokens.** :func:`routing_counts` runs the calibration batches once with hooks on the experts
modules (the ``top_k_index`` they are called with) or, where the experts module is not given the
indices (Llama-4), on the router's output; it counts the tokens each expert receives.

**The fallback for experts with few tokens.** Data-driven estimators measure a stacked expert
tensor as the calibration data routes it: an expert that no calibration token reaches adds nothing,
although it will be used on other text. :func:`apply_fallback` gives each expert with fewer than
``min_tokens`` calibration tokens the share of tokens it would have under uniform routing: with
``f_e`` the share of the routed token slots expert ``e`` received, ``err_e`` its squared rounding
error at the option and ``rho = measured / sum_e f_e err_e`` the damage per unit of routed error
of the whole tensor (or of all per-expert layers of one tensor), it adds
``max(1/E - f_e, 0) * err_e * rho`` for each such expert. The added part is the table's
``damage_fallback`` column, and ``metadata["moe"]["fallback"]`` names the experts it was given to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .data import move_batch, run_model
from .errors import MpsearchError
from .quant import quantization_error

#: stacked-expert kinds: name -> whether the per-expert matrix is stored transposed, (in, out)
EXPERT_KINDS = {"expert": False, "expert_t": True}
#: undecorated experts classes whose layout transformers does not declare on the module
KNOWN_LAYOUTS = {"Llama4TextExperts": (True, True)}  # class name -> (transposed, has_gate)
#: names of the 3-D weight parameters of an experts module (biases are not weights)
_EXPERT_PARAMS = ("gate_up_proj", "up_proj", "gate_proj", "down_proj")
_SHARED = ("shared_expert", "shared_experts", "shared_mlp")
_SLICE = re.compile(r"^(.*)\[(\d+)\]$")


def split_name(name: str) -> tuple[str, int | None]:
    """``'a.experts.down_proj[3]'`` -> ``('a.experts.down_proj', 3)``; other names -> ``(name, None)``."""
    m = _SLICE.match(name)
    return (m[1], int(m[2])) if m else (name, None)


@dataclass
class ExpertTensor:
    """One stacked expert parameter of an experts module."""

    name: str  # the parameter's fully-qualified name
    container: str  # the experts module's name
    experts: int
    out_features: int  # of one expert's matrix
    in_features: int
    transposed: bool
    fused: str | None = None  # "gate_up" when one parameter holds the gate and up projections


@dataclass
class MoEScan:
    """Everything :func:`scan` found: stacked experts, routers, shared experts, per-expert Linears."""

    experts: list[ExpertTensor] = field(default_factory=list)
    containers: dict[str, int] = field(default_factory=dict)  # experts module -> expert count
    routers: dict[str, str] = field(default_factory=dict)  # module owning a router weight -> its container
    shared: set[str] = field(default_factory=set)  # module-name prefixes of shared experts
    expert_linears: dict[str, tuple[str, int, str]] = field(default_factory=dict)
    #: ^ Linear module name -> (container, expert index, stack: the container + the projection's name)
    not_understood: dict[str, str] = field(default_factory=dict)  # 3-D param name -> why

    @property
    def any(self) -> bool:
        return bool(self.containers)


def experts_layout(module: nn.Module) -> tuple[bool, bool] | None:
    """``(transposed, has_gate)`` of an experts module holding 3-D weights, or ``None`` when mpsearch
    cannot tell how its forward applies them."""
    if hasattr(module, "is_transposed") and hasattr(module, "has_gate"):  # @use_experts_implementation
        return bool(module.is_transposed), bool(module.has_gate)
    known = KNOWN_LAYOUTS.get(type(module).__name__)
    if known is not None:
        return known
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == dn.dim() == 3:
        plain = gu.shape[2] == dn.shape[1] and gu.shape[1] == 2 * dn.shape[2]  # (E, 2I, H), (E, H, I)
        flipped = gu.shape[1] == dn.shape[2] and gu.shape[2] == 2 * dn.shape[1]  # (E, H, 2I), (E, I, H)
        if plain != flipped:
            return flipped, True
    return None


def _three_d_params(module: nn.Module):
    for pname, p in module.named_parameters(recurse=False):
        if p.dim() == 3 and p.is_floating_point():
            yield pname, p


def _router_owner(parent: nn.Module, parent_name: str, skip: nn.Module, experts: int) -> list[str]:
    """Modules under ``parent`` (not under ``skip``) holding a 2-D ``weight`` with one row per expert,
    or Qwen2-MoE's one-row ``shared_expert_gate``."""
    out = []
    for cname, child in parent.named_children():
        if child is skip or cname in _SHARED:
            continue
        prefix = f"{parent_name}.{cname}" if parent_name else cname
        for sub, mod in child.named_modules():
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                continue
            if w.shape[0] == experts or (cname.endswith("shared_expert_gate") and w.shape[0] == 1):
                out.append(f"{prefix}.{sub}" if sub else prefix)
    return out


def scan(model: nn.Module) -> MoEScan:
    """Find the experts (stacked or one Linear per expert), routers and shared experts of ``model``."""
    found = MoEScan()
    modules = dict(model.named_modules())
    for mname, module in modules.items():
        params = dict(_three_d_params(module))
        listed = _expert_list(mname, module)
        if not params and listed is None:
            continue
        parent_name = mname.rpartition(".")[0]
        parent = modules.get(parent_name, model) if mname else None
        if listed is not None:
            n = len(listed)
            found.containers[mname] = n
            for index, (child_name, child) in enumerate(listed):
                for sub, lin in child.named_modules():
                    if isinstance(lin, nn.Linear):
                        full = f"{mname}.{child_name}.{sub}" if sub else f"{mname}.{child_name}"
                        found.expert_linears[full] = (mname, index, f"{mname}.{sub or child_name}")
        else:
            layout = experts_layout(module)
            names = [p for p in params if p in _EXPERT_PARAMS]
            if layout is None or len(names) != len(params):
                why = ("its layout (which dimension is the input) is not declared" if layout is None
                       else f"3-D parameter(s) {sorted(set(params) - set(names))} are not expert projections")
                for pname in params:
                    found.not_understood[f"{mname}.{pname}"] = f"{type(module).__name__}: {why}"
                continue
            transposed, _gated = layout
            n = int(next(iter(params.values())).shape[0])
            found.containers[mname] = n
            for pname in names:
                p = params[pname]
                out_f, in_f = (p.shape[2], p.shape[1]) if transposed else (p.shape[1], p.shape[2])
                found.experts.append(ExpertTensor(
                    name=f"{mname}.{pname}", container=mname, experts=int(p.shape[0]),
                    out_features=int(out_f), in_features=int(in_f), transposed=transposed,
                    fused="gate_up" if pname == "gate_up_proj" else None))
        if parent is not None:
            skip = module
            for owner in _router_owner(parent, parent_name, skip, n):
                found.routers.setdefault(owner, mname)
            for cname in _SHARED:
                if hasattr(parent, cname):
                    found.shared.add(f"{parent_name}.{cname}" if parent_name else cname)
    return found


def _expert_list(mname: str, module: nn.Module):
    """``[(child name, child)]`` when ``module`` is a ModuleList/ModuleDict of experts holding Linear
    layers (``experts.0.w1``, ``experts.expert_0.wi``), else ``None``."""
    if mname.rpartition(".")[2] != "experts" or not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return None
    children = list(module.named_children())
    if len(children) < 2 or not all(any(isinstance(m, nn.Linear) for m in c.modules()) for _, c in children):
        return None
    return children


# ------------------------------------------------------------------------------ routed tokens
@dataclass
class Routing:
    """Tokens each expert received on the calibration batches: ``counts[container]`` (one integer per
    expert) and ``tokens``, the calibration tokens one MoE block saw (its router's input rows)."""

    counts: dict[str, list[int]] = field(default_factory=dict)
    tokens: int = 0
    passes: int = 0

    def to_dict(self) -> dict:
        return {"tokens": int(self.tokens), "counts": {k: [int(x) for x in v] for k, v in self.counts.items()}}


def _index_tensor(args, kwargs, experts: int):
    """The routing indices among an experts module's inputs: an integer tensor ``[tokens, top_k]``."""
    for v in list(args) + list(kwargs.values()):
        if (isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dim() == 2
                and v.dtype not in (torch.bool,) and v.numel() and int(v.max()) <= experts):
            return v
    return None


def routing_counts(model: nn.Module, batches, found: MoEScan, device=None) -> Routing:
    """Count the calibration tokens routed to every expert (one no-grad pass per batch)."""
    modules = dict(model.named_modules())
    counts = {c: torch.zeros(n + 1, dtype=torch.int64) for c, n in found.containers.items()}
    from_router = {c: torch.zeros(n + 1, dtype=torch.int64) for c, n in found.containers.items()}
    seen: dict[str, int] = {}
    direct: set[str] = set()  # containers whose forward is given the routing indices
    handles = []

    def add(container, idx, into=counts):
        n = found.containers[container]
        flat = idx.detach().reshape(-1).to("cpu", torch.int64).clamp(0, n)
        into[container] += torch.bincount(flat, minlength=n + 1)

    def on_experts(container):
        def hook(mod, args, kwargs):
            idx = _index_tensor(args, kwargs, found.containers[container])
            if idx is not None:
                direct.add(container)
                add(container, idx)
        return hook

    def on_router(owner, container):
        def hook(mod, args, output):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is not None:
                seen[container] = seen.get(container, 0) + int(x.reshape(-1, x.shape[-1]).shape[0])
            if container in listed:
                return
            outs = output if isinstance(output, (tuple, list)) else (output,)
            n = found.containers[container]
            idx = _index_tensor(outs, {}, n)
            if idx is None:  # router scores or logits only: take the module's top_k of them
                k = getattr(mod, "top_k", None) or getattr(mod, "num_experts_per_tok", None)
                logits = next((o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()
                               and o.shape[-1] == n), None)
                if k is None or logits is None:
                    return
                idx = logits.reshape(-1, n).float().topk(int(k), dim=-1).indices
            add(container, idx, from_router)
        return hook

    listed = {c for c in found.containers if _expert_list(c, modules[c]) is not None}
    for c in found.containers:
        if c in listed:
            for index, (_cn, child) in enumerate(_expert_list(c, modules[c])):
                def pre(mod, args, c=c, index=index):
                    if args and isinstance(args[0], torch.Tensor):
                        counts[c][index] += int(args[0].reshape(-1, args[0].shape[-1]).shape[0])
                handles.append(child.register_forward_pre_hook(pre))
        else:
            handles.append(modules[c].register_forward_pre_hook(on_experts(c), with_kwargs=True))
    router_of: dict[str, str] = {}
    for owner, c in found.routers.items():
        if c in router_of.values() or owner.endswith("shared_expert_gate"):
            continue  # one router per MoE block (not the shared-expert gate)
        router_of[owner] = c
        handles.append(modules[owner].register_forward_hook(on_router(owner, c)))
    routing = Routing()
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                run_model(model, move_batch(batch, device) if device is not None else batch)
                routing.passes += 1
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    routing.counts = {c: (v if c in direct or c in listed else from_router[c])[: found.containers[c]].tolist()
                      for c, v in counts.items()}
    routing.tokens = max(seen.values(), default=0)
    return routing


# ------------------------------------------------------------------------------ the fallback
def expert_of(layer) -> tuple[str, list[int]] | None:
    """``(container, expert indices)`` whose tokens reach ``layer``'s weight; ``None`` for dense layers."""
    extra = getattr(layer, "extra", None) or {}
    container = extra.get("container")
    if container is None:
        return None
    if "expert" in extra:
        return container, [int(extra["expert"])]
    return container, list(range(int(extra.get("experts", 1))))


def fallback_groups(layers) -> dict[str, list[int]]:
    """Layers measured together: the per-expert layers of one stacked tensor (or one stack of
    per-expert Linears), and each stacked tensor alone. ``{group: [layer indices]}``."""
    groups: dict[str, list[int]] = {}
    for i, lay in enumerate(layers):
        extra = getattr(lay, "extra", None) or {}
        if extra.get("role") != "expert":
            continue
        key = extra.get("stack") or split_name(lay.name)[0]
        groups.setdefault(key, []).append(i)
    return groups


def per_expert_errors(weight, layer, options, legal_row) -> np.ndarray:
    """``[experts of the layer, K]`` squared rounding errors of ``layer``'s ``weight``, one row per
    expert matrix."""
    w = weight
    idx = expert_of(layer)[1]
    out = np.zeros((len(idx), len(options)))
    for k, opt in enumerate(options):
        if not legal_row[k] or opt.is_keep:
            continue
        err = quantization_error(w, opt, layer.kind, layer.name).pow(2)
        if layer.kind in EXPERT_KINDS and err.dim() == 3:
            out[:, k] = err.reshape(err.shape[0], -1).sum(1).double().cpu().numpy()
        else:
            out[:, k] = float(err.sum())
    return out


def apply_fallback(weights, layers, options, damage, routing: Routing, *, min_tokens: int, legal=None):
    """``(damage, damage_fallback, report)``: ``damage`` with the uniform-routing share of every expert
    that received fewer than ``min_tokens`` calibration tokens added (see the module docstring);
    ``weights(layer)`` gives a layer's weight tensor."""
    damage = np.asarray(damage, dtype=float).copy()
    added = np.zeros_like(damage)
    report: dict[str, list[int]] = {}
    K = len(options)
    for key, members in fallback_groups(layers).items():
        container = layers[members[0]].extra["container"]
        counts = np.asarray(routing.counts.get(container, []), dtype=float)
        if not len(counts):
            continue
        n = len(counts)
        total = counts.sum()
        if total <= 0:
            raise MpsearchError(
                f"no calibration token reached the experts of {key!r}: their damage cannot be measured; "
                f"give more calibration data, or --exclude them")
        share = counts / total
        experts = [expert_of(layers[i])[1] for i in members]
        few = sorted({e for ex in experts for e in ex if counts[e] < min_tokens})
        if not few:
            continue
        report[key] = few
        errs = [per_expert_errors(weights(layers[i]), layers[i], options,
                                  np.ones(K, bool) if legal is None else legal[i]) for i in members]
        measured = damage[members].sum(0)  # [K]
        routed_err = sum((share[ex][:, None] * e).sum(0) for ex, e in zip(experts, errs))  # [K]
        rho = np.divide(measured, routed_err, out=np.zeros(K), where=routed_err > 0)
        for i, ex, e in zip(members, experts, errs):
            lift = np.maximum(1.0 / n - share[ex], 0.0) * np.isin(ex, few)  # per expert of the layer
            added[i] = (lift[:, None] * e).sum(0) * rho
    return damage + added, added, report


def routed_tokens_column(layers, routing: Routing) -> np.ndarray:
    """Per layer: the fewest calibration tokens any of its experts received (all tokens for a dense
    layer): the table's ``routed_tokens`` column."""
    out = np.zeros(len(layers))
    for i, lay in enumerate(layers):
        ex = expert_of(lay)
        if ex is None or ex[0] not in routing.counts:
            out[i] = routing.tokens
        else:
            c = routing.counts[ex[0]]
            out[i] = min(c[e] for e in ex[1])
    return out
