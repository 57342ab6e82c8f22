"""Layer discovery: the quantizable modules of a model and their tie groups.

:func:`discover_layers` finds Linear, Conv1d, Conv2d (grouped and depthwise too), transformers'
``Conv1D`` and, on request, Embedding modules, by fully-qualified name. With example inputs it runs one
forward pass and records each layer's multiply-accumulates per sample.

:func:`tie_groups` puts layers that must share one option in the same group: the fused projections of
common transformer blocks (q/k/v, gate/up) and layers matched by user regexes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .errors import MpsearchError
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


def _batch_size(inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    if isinstance(inputs, dict):
        for v in inputs.values():
            if isinstance(v, torch.Tensor):
                return _batch_size(v)
    if isinstance(inputs, (list, tuple)) and inputs:
        return _batch_size(inputs[0])
    return 1


def discover_layers(
    model: nn.Module,
    example_inputs=None,
    *,
    include_embedding: bool = False,
    ties: Sequence[str] = (),
    fuse_projections: bool = False,
    exclude: Sequence[str] = (),
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
    """
    from .budget import check_patterns

    excl = check_patterns(exclude, "exclude regex")
    found = []
    for name, module, kind in iter_quantizable(model, include_embedding):
        if any(p.search(name) for p in excl):
            continue
        out_c, in_f = _matrix_shape(kind, module.weight)
        found.append((name, module, kind, out_c, in_f))
    if not found:
        raise MpsearchError(
            "the model has no quantizable layer (Linear, Conv1d, Conv2d, transformers Conv1D"
            + (", Embedding" if include_embedding else "")
            + "): nothing to allocate bits to"
        )
    macs: dict[str, int] = {}
    if example_inputs is not None:
        from .data import run_model

        n = _batch_size(example_inputs)
        handles = []

        def hook_for(lname, kind, module, in_f):
            def hook(mod, args, output):
                out = output[0] if isinstance(output, (tuple, list)) else output
                if kind == "embedding":
                    macs[lname] = 0
                    return
                if kind in ("conv1d", "conv2d"):
                    per_out = in_f  # in_channels/groups * kernel elements
                    total = out.numel() * per_out
                else:  # linear, conv1d_hf: each output element takes in_features MACs
                    total = out.numel() * in_f
                macs[lname] = macs.get(lname, 0) + total // max(n, 1)

            return hook

        for name, module, kind, out_c, in_f in found:
            handles.append(module.register_forward_hook(hook_for(name, kind, module, in_f)))
        try:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                run_model(model, example_inputs)
            model.train(was_training)
        finally:
            for h in handles:
                h.remove()
    layers = [
        Layer(
            name=name,
            kind=kind,
            shape=tuple(int(s) for s in module.weight.shape),
            params=int(module.weight.numel()),
            out_channels=out_c,
            in_features=in_f,
            macs=macs.get(name, 0 if example_inputs is not None else None),
        )
        for name, module, kind, out_c, in_f in found
    ]
    groups = tie_groups([lay.name for lay in layers], ties=ties, fuse_projections=fuse_projections)
    for lay in layers:
        lay.group = groups.get(lay.name)
    return layers


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of ``model``; an unknown name is an error listing close matches."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        from .errors import close_matches

        names = [n for n, _ in model.named_modules() if n]
        raise MpsearchError(
            f"the model has no layer {name!r}{close_matches(name, names)}"
        ) from None
