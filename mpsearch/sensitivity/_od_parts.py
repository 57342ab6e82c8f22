"""Pieces of the ``output-distance`` estimator's suffix passes (:mod:`.output_distance`): options
stacked along the batch axis, the reference a distance compares with, and quantized weights kept
across calibration batches; the base point (``base``) the damage is measured around."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import MpsearchError
from ..metrics import kl_from_logits
from ..options import parse_option
from ..plan import BitPlan
from ..quant import quantize_weight
from .base import Context, weight_of
from .blocks import PrefixRunner


@dataclass(frozen=True)
class _BatchPass:
    """One calibration batch's suffix passes: the runner, the batch, the run's context, and the
    full-precision output they are compared with (``target``, its ``kind``, the accumulation dtype)."""

    runner: PrefixRunner
    batch: object
    ctx: Context
    target: object
    kind: str
    acc: torch.dtype


class VariantCache:
    """Quantized weights kept across calibration batches while they fit in ``limit_mb``; the rest
    are made again when asked for (``made`` / ``reused`` count both)."""

    def __init__(self, limit_mb: float):
        self.limit = float(limit_mb) * 2**20
        self.store: dict = {}
        self.bytes = self.peak = 0
        self.made = self.reused = 0

    def get(self, key, make):
        if key in self.store:
            self.reused += 1
            return self.store[key]
        value = make()
        self.made += 1
        size = value.numel() * value.element_size()
        if self.bytes + size <= self.limit:
            self.store[key] = value
            self.bytes += size
            self.peak = max(self.peak, self.bytes)
        return value


class _Variants(dict):
    """Quantized weights made when asked for (and dropped by ``pop``): a stacked expert tensor's
    options are measured one at a time, so one quantized copy is alive at a time."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def __missing__(self, k):
        return self._make(k)

    def pop(self, k, *default):
        return super().pop(k) if k in self else self._make(k)


class stacked_weights:
    """Context manager: copy ``i`` of the layer's input (along the batch axis, in ``len(weights)``
    equal chunks) is multiplied by ``weights[i]``; the module's own weight is untouched."""

    def __init__(self, module, kind: str, weights):
        self.module, self.kind, self.weights = module, kind, list(weights)

    def _one(self, x, w):
        m = self.module
        if self.kind == "linear":
            return F.linear(x, w, m.bias)
        if self.kind in ("conv1d", "conv2d"):
            return m._conv_forward(x, w, m.bias)
        if self.kind == "embedding":
            return F.embedding(x, w, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
        size = x.size()[:-1] + (m.nf,)  # transformers' Conv1D: weight [in, out]
        return torch.addmm(m.bias, x.reshape(-1, x.size(-1)), w).view(size)

    def __enter__(self):
        n = len(self.weights)

        def forward(x, *args, **kwargs):
            return torch.cat([self._one(xc, w) for xc, w in zip(x.chunk(n), self.weights)])

        self._saved = self.module.__dict__.get("forward")  # an instance-level forward (hooks) stays
        self.module.forward = forward
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            self.module.forward = self._saved
        else:
            del self.module.forward
        return False


def _prepare(ref: torch.Tensor, metric: str, kind: str, acc) -> dict:
    """What the distance compares with, computed once per batch from the reference output."""
    metric = ("cosine" if kind == "embedding" else "kl") if metric == "auto" else metric
    b = ref.reshape(-1, ref.shape[-1]).to(acc)
    if metric == "cosine":
        return {"metric": metric, "ref": b}
    if metric == "mse":
        return {"metric": metric, "ref": b}
    if acc == torch.float64:
        return {"metric": metric, "ref": F.log_softmax(b, -1)}
    return {"metric": "kl-logits", "ref": b, "p": torch.softmax(b, -1)}


def _distance(out: torch.Tensor, reference: dict, metric: str, kind: str, acc) -> torch.Tensor:
    """The distance of one output to the prepared reference, as a 0-d tensor on the device
    (the same numbers as :func:`mpsearch.sensitivity.losses.distance`)."""
    a = out.reshape(-1, out.shape[-1]).to(acc)
    b = reference["ref"]
    if reference["metric"] == "cosine":
        return (1 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)).mean()
    if reference["metric"] == "mse":
        return (a - b).pow(2).mean()
    if reference["metric"] == "kl-logits":
        return kl_from_logits(b, a, reference["p"]).mean()
    return F.kl_div(F.log_softmax(a, -1), b, log_target=True, reduction="batchmean")


def _base_spec(base):
    """``base`` as given (``None``, an option name) or a plan's layer -> option-name mapping."""
    if base is None or isinstance(base, str):
        return base or None

    if isinstance(base, BitPlan):
        return {n: base.option_name(n) for n in base.layers}
    if isinstance(base, dict):
        return {str(k): str(v) for k, v in base.items()}
    raise MpsearchError(f"output-distance base must be an option name, a layer -> option mapping or a BitPlan, "
                        f"got {type(base).__name__}")


class _BasePoint:
    """The base's weights of the planned layers, swapped in and out of the model in place."""

    def __init__(self, model, ctx: Context, base):
        def parse(spec):
            try:
                return parse_option(spec)
            except ValueError as e:  # MpsearchError too: say that it is the base's option
                raise MpsearchError(f"output-distance base: {e}") from None

        if isinstance(base, str):
            opt = parse(base)  # every layer that may take it (a target's rules); the rest stay fp
            picks = {i: opt for i in range(len(ctx.layers))
                     if opt.name in {o.name for _, o in ctx.layer_options(i)}}
        else:
            names = [lay.name for lay in ctx.layers]
            unknown = sorted(set(base) - set(names))
            if unknown:
                raise MpsearchError(f"output-distance base names layer(s) the table does not plan: "
                                    f"{', '.join(unknown[:3])}; give an option for planned layers only")
            picks = {names.index(n): parse(v) for n, v in base.items()}
        acts = sorted({o.name for o in picks.values() if _quantizes_activations(o)})
        if acts:
            raise MpsearchError(f"output-distance base takes weight-only options; {', '.join(acts)} also "
                                f"quantize activations")
        self.weights, self.fp, self.based = {}, {}, {}
        for i, opt in picks.items():
            if opt.is_keep:
                continue
            lay = ctx.layers[i]
            w = weight_of(model, lay)
            self.weights[i] = w
            self.fp[i] = w.detach().clone()
            self.based[i] = quantize_weight(self.fp[i], opt, lay.kind, lay.name)
        ctx.extra_metadata["base"] = {"layers": len(self.based),
                                      "options": sorted({picks[i].name for i in self.based})}

    def apply(self):
        with torch.no_grad():
            for i, w in self.weights.items():
                w.copy_(self.based[i])

    def restore(self):
        with torch.no_grad():
            for i, w in self.weights.items():
                w.copy_(self.fp[i])


def _quantizes_activations(opt) -> bool:
    return getattr(opt, "act_bits", 16) < 16 and getattr(opt, "fmt", None) is not None
