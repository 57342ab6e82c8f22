"""Layer discovery: the quantizable modules of a model and their tie groups.

:func:`discover_layers` finds Linear, Conv1d, Conv2d (grouped and depthwise too), transformers'
``Conv1D`` and, on request, Embedding modules, by fully-qualified name, and the weights of
mixture-of-experts blocks (:mod:`mpsearch.moe`): stacked 3-D expert parameters (named by the
parameter, ``model.layers.0.mlp.experts.gate_up_proj``, kinds ``expert``/``expert_t``; with
``per_expert=True`` one layer per expert, ``...gate_up_proj[3]``), routers (kind ``router``) and
the roles of shared experts and per-expert Linears. With example inputs it runs one forward pass and
records each layer's multiply-accumulates per sample.

:func:`tie_groups` puts layers that must share one option in the same group: the fused projections of
common transformer blocks (q/k/v, gate/up) and layers matched by user regexes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .data import run_model
from .data import leading_size as _batch_size  # noqa: F401  (the name estimators import)
from .errors import check_patterns, close_matches, MpsearchError
from .moe import _index_tensor, EXPERT_KINDS, experts_layout, scan, split_name
from .quant import expert_matrices
from .ties import FUSED_SIBLINGS, tie_groups  # noqa: F401  (re-exported)


@dataclass
class Layer:
    """A quantizable module.

    ``out_channels`` x ``in_features`` is its weight seen as a matrix (one row per output channel);
    ``macs`` is multiply-accumulates per sample, or ``None`` when no forward pass was run.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    out_channels: int
    in_features: int
    macs: int | None = None
    group: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def role(self) -> str | None:
        """``expert``, ``shared_expert``, ``router`` in a mixture-of-experts block, else ``None``."""
        return self.extra.get("role")

    @property
    def matrices(self) -> int:
        """How many ``out_channels x in_features`` matrices the layer holds (its experts, else 1)."""
        return int(self.extra.get("experts", 1)) if self.kind in EXPERT_KINDS else 1

    def size_bits(self, option) -> int:
        """Storage of the layer's weight under ``option``: one matrix's, times its matrices."""
        return self.matrices * option.size_bits(self.out_channels, self.in_features)


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    # transformers.pytorch_utils.Conv1D (GPT-2): weight [in, out]; matched by name, so that
    # transformers is never imported here.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight"):
        return "conv1d_hf"
    return None


def _matrix_shape(kind: str, weight: torch.Tensor) -> tuple[int, int]:
    if kind == "conv1d_hf":
        return int(weight.shape[1]), int(weight.shape[0])
    return int(weight.shape[0]), int(weight[0].numel())


def iter_quantizable(model: nn.Module, include_embedding: bool = False):
    """Yield ``(name, module, kind)`` for the quantizable modules of ``model``, in module order."""
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None or (kind == "embedding" and not include_embedding):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        yield name, module, kind


def _found_weights(model, moe, excl, include_embedding: bool, per_expert: bool) -> list[tuple]:
    """``(name, weight, kind, out_channels, in_features, extra)`` of every quantizable weight not
    excluded: modules, routers that are not ``nn.Linear``, and stacked experts (one per expert with
    ``per_expert``), in the order found."""
    found = []
    for name, module, kind in iter_quantizable(model, include_embedding):
        if any(p.search(name) for p in excl):
            continue
        out_c, in_f = _matrix_shape(kind, module.weight)
        extra = _moe_role(name, moe)
        found.append((name, module.weight, "router" if extra.get("role") == "router" else kind,
                      out_c, in_f, extra))
    params = dict(model.named_parameters())
    for owner, container in moe.routers.items():  # routers that are not nn.Linear (Qwen3MoeTopKRouter)
        w = params.get(f"{owner}.weight")
        if w is not None and not any(f[0] == owner for f in found) and not any(p.search(owner) for p in excl):
            found.append((owner, w, "router", int(w.shape[0]), int(w.shape[1]),
                          {"role": "router", "container": container}))
    for t in moe.experts:
        names = [f"{t.name}[{e}]" for e in range(t.experts)] if per_expert else [t.name]
        for e, lname in enumerate(names):
            if any(p.search(lname) for p in excl):
                continue
            extra = {"role": "expert", "container": t.container, "experts": t.experts,
                     "fused": t.fused, "transposed": t.transposed}
            if per_expert:
                extra.update(expert=e, experts=1)
            found.append((lname, params[t.name], "expert_t" if t.transposed else "expert",
                          t.out_features, t.in_features, extra))
    return found


def discover_layers(
    model: nn.Module,
    example_inputs=None,
    *,
    include_embedding: bool = False,
    ties: Sequence[str] = (),
    fuse_projections: bool = False,
    exclude: Sequence[str] = (),
    per_expert: bool = False,
) -> list[Layer]:
    """List the quantizable layers of ``model``.

    Parameters
    ----------
    example_inputs:
        One batch (a tensor, a tuple of positional inputs, or a dict of keyword inputs). When given,
        one forward pass in ``torch.no_grad()`` measures each layer's MACs per sample.
    include_embedding:
        Also list ``nn.Embedding`` modules (0 MACs: a lookup).
    ties, fuse_projections:
        Tie groups, see :func:`tie_groups`.
    exclude:
        Regexes of layer names to leave out (matched with ``re.search``).
    per_expert:
        One layer per expert of each stacked expert tensor (``...experts.down_proj[3]``) instead of
        one layer per tensor.
    """

    excl = check_patterns(exclude, "exclude regex")
    moe = scan(model)
    found = _found_weights(model, moe, excl, include_embedding, per_expert)
    if not found:
        raise MpsearchError(
            "the model has no quantizable layer (Linear, Conv1d, Conv2d, transformers Conv1D"
            + (", Embedding" if include_embedding else "")
            + "): nothing to allocate bits to"
        )
    order = {n: i for i, (n, _p) in enumerate(model.named_parameters(remove_duplicate=False))}
    found.sort(key=lambda f: order.get(f"{f[0]}.weight", order.get(split_name(f[0])[0], len(order))))
    macs = measure_macs(model, example_inputs, found, moe) if example_inputs is not None else {}
    layers = []
    for name, weight, kind, out_c, in_f, extra in found:
        n_mat = int(extra.get("experts", 1)) if kind in EXPERT_KINDS else 1
        layers.append(Layer(
            name=name,
            kind=kind,
            shape=tuple(int(s) for s in (weight.shape[1:] if "expert" in extra else weight.shape)),
            params=n_mat * out_c * in_f if kind in EXPERT_KINDS else int(weight.numel()),
            out_channels=out_c,
            in_features=in_f,
            macs=macs.get(name, 0 if example_inputs is not None else None),
            extra=extra,
        ))
    groups = tie_groups([lay.name for lay in layers], ties=ties, fuse_projections=fuse_projections)
    for lay in layers:
        lay.group = groups.get(lay.name)
    return layers


def _moe_role(name: str, moe) -> dict:
    """The MoE role of a module found by :func:`iter_quantizable` (``{}`` for a dense layer)."""
    if name in moe.routers:
        return {"role": "router", "container": moe.routers[name]}
    if name in moe.expert_linears:
        container, index, stack = moe.expert_linears[name]
        return {"role": "expert", "container": container, "expert": index, "stack": stack}
    if any(name.startswith(s + ".") for s in moe.shared):
        return {"role": "shared_expert"}
    return {}


def measure_macs(model: nn.Module, example_inputs, found, moe=None) -> dict[str, int]:
    """MACs per sample of each ``(name, weight, kind, out_c, in_f, extra)`` in ``found``, from one
    forward pass of ``example_inputs`` in ``torch.no_grad()`` with hooks on those modules (experts:
    ``out x in`` per token routed to each expert)."""
    n = max(_batch_size(example_inputs), 1)
    macs: dict[str, int] = {}
    modules = dict(model.named_modules())
    pairs: dict[str, torch.Tensor] = {}  # experts container -> token-expert pairs per expert

    def hook_for(lname, kind, in_f):
        def hook(mod, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            # a lookup costs nothing; every output element of a linear or convolution takes in_f
            # MACs (in_channels/groups x kernel elements for convolutions)
            macs[lname] = 0 if kind == "embedding" else macs.get(lname, 0) + out.numel() * in_f // n

        return hook

    def experts_hook(container, experts):
        def hook(mod, args, kwargs):
            idx = _index_tensor(args, kwargs, experts)
            if idx is not None:
                flat = idx.detach().reshape(-1).to("cpu", torch.int64).clamp(0, experts)
                got = torch.bincount(flat, minlength=experts + 1)[:experts]
            else:  # every expert computes every row it is given (Llama-4's batched experts)
                x = next((a for a in args if isinstance(a, torch.Tensor)), None)
                rows = 0 if x is None else x.reshape(-1, x.shape[-1]).shape[0]
                got = torch.full((experts,), rows // experts, dtype=torch.int64)
            pairs[container] = pairs.get(container, 0) + got

        return hook

    handles = []
    containers = set()
    for name, _w, kind, _o, in_f, extra in found:
        if kind in EXPERT_KINDS:
            containers.add(extra["container"])
        elif name in modules:
            handles.append(modules[name].register_forward_hook(hook_for(name, kind, in_f)))
    for c in containers:
        handles.append(modules[c].register_forward_pre_hook(
            experts_hook(c, moe.containers[c]), with_kwargs=True))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            run_model(model, example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    for name, _w, kind, out_c, in_f, extra in found:
        if kind in EXPERT_KINDS and extra["container"] in pairs:
            got = pairs[extra["container"]]
            routed = int(got[extra["expert"]]) if "expert" in extra else int(got.sum())
            macs[name] = routed * out_c * in_f // n
    return macs


def weight_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The weight a layer name stands for: a module's ``weight``, a parameter (a stacked expert
    tensor), or one expert's 2-D view of it (``...down_proj[3]``)."""
    base, index = split_name(name)
    try:
        module = model.get_submodule(base)
    except AttributeError:
        module = None
    if module is not None and index is None:
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor):
            return w
    try:
        param = model.get_parameter(base)
    except AttributeError:
        get_module(model, base)  # the error names close matches
        raise MpsearchError(f"{base!r} is not a layer with a weight") from None
    if index is None:
        return param
    if param.dim() != 3 or index >= param.shape[0]:
        raise MpsearchError(f"{name!r}: {base!r} has no expert {index} (shape {tuple(param.shape)})")
    return param[index]


def layer_matrix(model: nn.Module, name: str) -> tuple[int, int, int]:
    """``(out_channels, in_features, matrices)`` of layer ``name``: its weight seen as matrices (a
    stacked expert tensor holds one per expert)."""
    kind = layer_kind(model, name)
    w = weight_tensor(model, name)
    if kind in EXPERT_KINDS:
        mats = expert_matrices(w, kind)
        return int(mats.shape[1]), int(mats.shape[2]), int(mats.shape[0])
    out_c, in_f = _matrix_shape(kind if kind != "router" else "linear", w)
    return out_c, in_f, 1


def layer_kind(model: nn.Module, name: str) -> str | None:
    """The storage kind of the layer ``name`` (``linear``, ``expert``...; ``None``: not a layer)."""
    base, _index = split_name(name)
    try:
        module = model.get_submodule(base)
    except AttributeError:
        module = None
    if module is not None:
        return _kind(module) or ("router" if isinstance(getattr(module, "weight", None), torch.Tensor)
                                 and module.weight.dim() == 2 else None)
    parent, _, pname = base.rpartition(".")
    try:
        owner = model.get_submodule(parent)
    except AttributeError:
        return None
    p = getattr(owner, pname, None)
    if not isinstance(p, torch.Tensor) or p.dim() != 3:
        return None
    layout = experts_layout(owner)
    if layout is None:
        return None
    return "expert_t" if layout[0] else "expert"


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of ``model``; an unknown name is an error listing close matches."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise MpsearchError(
            f"the model has no layer {name!r}{close_matches(name, names)}"
        ) from None


def quantizable_names(model: torch.nn.Module, keep=None) -> list[str]:
    """The names of every weight mpsearch can quantize: modules (embeddings included), stacked
    expert tensors and routers (as :func:`~mpsearch.layers.discover_layers` names them); ``keep``
    (a function of the :class:`~mpsearch.layers.Layer`) selects some of them."""
    try:
        return [lay.name for lay in discover_layers(model, include_embedding=True) if keep is None or keep(lay)]
    except MpsearchError:
        return []
