"""Losses and output distances shared by the data-driven estimators.

Loss settings (``loss=``):

- ``"auto"``: ``"ce"`` when every batch carries labels, else ``"distill"``;
- ``"ce"``: cross-entropy of the logits against the batch labels (class indices aligned with the
  output rows; ``-100`` is ignored);
- ``"distill"``: self-distillation to the full-precision output, KL(p_fp || p) for logits and
  the mean squared error for embeddings (zero at the full-precision weights, so the Hessian is the
  Gauss-Newton matrix of the output);
- a callable ``loss(output, labels) -> scalar``: ``output`` is the model's main output tensor
  (:func:`mpsearch.data.model_output_tensor`), ``labels`` the batch's labels or ``None``.

``output=`` says what the output is: ``"logits"``, ``"embedding"``, or ``"auto"`` (``embedding``
when the model returns ``last_hidden_state``/``sentence_embedding``/``pooler_output``, else
``logits``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import model_output_tensor, split_batch
from ..errors import MpsearchError

LOSSES = ("auto", "ce", "distill")
OUTPUTS = ("auto", "logits", "embedding")
METRICS = ("auto", "cosine", "mse", "kl")
_EMBED_KEYS = ("last_hidden_state", "sentence_embedding", "pooler_output")


def check_loss(loss) -> None:
    if not callable(loss) and loss not in LOSSES:
        raise MpsearchError(
            f"loss must be one of {', '.join(map(repr, LOSSES))} or a callable loss(output, labels), "
            f"got {loss!r}"
        )


def check_output(output) -> None:
    if output not in OUTPUTS:
        raise MpsearchError(f"output must be one of {', '.join(map(repr, OUTPUTS))}, got {output!r}")


def output_kind(raw_output, setting: str = "auto") -> str:
    """``"logits"`` or ``"embedding"`` for a model's raw output."""
    if setting != "auto":
        return setting
    for key in _EMBED_KEYS:
        value = raw_output.get(key) if isinstance(raw_output, dict) else getattr(raw_output, key, None)
        if isinstance(value, torch.Tensor):
            return "embedding"
    return "logits"


def resolve_loss(loss, batches):
    """The loss actually used: ``"ce"``, ``"distill"`` or the callable."""
    check_loss(loss)
    has_labels = bool(batches) and all(split_batch(b)[2] is not None for b in batches)
    if loss == "auto":
        return "ce" if has_labels else "distill"
    if loss == "ce" and not has_labels:
        raise MpsearchError(
            "loss='ce' needs labels in every batch: give (inputs, labels) batches, or use "
            "loss='distill' (self-distillation to the full-precision output)"
        )
    return loss


def cross_entropy(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), labels.reshape(-1).long(),
                           ignore_index=-100)


def distill(out: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
    """KL(softmax(ref) || softmax(out)) averaged over rows, or the MSE for embeddings."""
    if kind == "embedding":
        return F.mse_loss(out.float(), ref.float())
    logp = F.log_softmax(out.reshape(-1, out.shape[-1]).float(), -1)
    logq = F.log_softmax(ref.reshape(-1, ref.shape[-1]).float(), -1)
    return F.kl_div(logp, logq, log_target=True, reduction="batchmean")


def loss_value(loss, out: torch.Tensor, labels, ref, kind: str) -> torch.Tensor:
    """The scalar loss of one batch (or one sample) for a resolved loss."""
    if callable(loss):
        value = loss(out, labels)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise MpsearchError("a loss callable must return a scalar tensor (loss(output, labels))")
        return value.reshape(())
    if loss == "ce":
        return cross_entropy(out, labels)
    return distill(out, ref, kind)


def forward(model, batch):
    """Run a model on a batch: ``(main output tensor, raw output)``."""
    args, kwargs, _ = split_batch(batch)
    raw = model(*args, **kwargs)
    return model_output_tensor(raw), raw


def distance(out: torch.Tensor, ref: torch.Tensor, metric: str, kind: str) -> float:
    """How far ``out`` is from the full-precision ``ref``: mean over rows of the last axis."""
    if metric == "auto":
        metric = "cosine" if kind == "embedding" else "kl"
    a = out.reshape(-1, out.shape[-1]).double()
    b = ref.reshape(-1, ref.shape[-1]).double()
    if metric == "cosine":
        return float((1 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)).mean())
    if metric == "mse":
        return float((a - b).pow(2).mean())
    return float(F.kl_div(F.log_softmax(a, -1), F.log_softmax(b, -1), log_target=True,
                          reduction="batchmean"))
