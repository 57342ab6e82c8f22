"""Quality metrics: how good is a (quantized) model, measured on held-out evaluation data.

A :class:`Metric` is called on a model and returns one number. Metrics that compare with the
full-precision model (embedding cosine, top-1 agreement, KL) are first :meth:`Metric.fit` on the
reference model; :meth:`Metric.loss` turns a value into a degradation (>= 0 means worse than the
reference) whatever the metric's direction, which is what the proxy check correlates with the
predicted damage.

- :class:`Perplexity` for causal LMs: a sliding window over a held-out token stream;
- :class:`EmbeddingCosine` for encoders: mean cosine between quantized and reference sentence
  embeddings (masked mean pooling, as sentence-transformers does);
- :class:`Accuracy`, :class:`Top1Agreement` and :class:`KLDivergence` for classifiers;
- :class:`FunctionMetric` wraps a user callable ``fn(model) -> float``.

:func:`make_metric` builds one by name; :func:`default_metric_name` picks one for a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .data import as_batches, move_batch, model_output_tensor, run_model, split_batch
from .errors import MpsearchError


def _device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class Metric:
    """Base class: ``metric(model) -> float``."""

    name = "metric"
    unit = ""
    higher_is_better = True
    needs_reference = False

    def __init__(self):
        self._fitted = False

    def fit(self, reference: torch.nn.Module) -> Metric:
        """Record what the full-precision ``reference`` model outputs (no-op for most metrics)."""
        self._fitted = True
        return self

    def __call__(self, model: torch.nn.Module) -> float:
        if self.needs_reference and not self._fitted:
            raise MpsearchError(
                f"metric {self.name!r} compares with the full-precision model: call "
                f"metric.fit(reference_model) first"
            )
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return float(self._measure(model))
        finally:
            model.train(was)

    def loss(self, value: float, baseline: float) -> float:
        """Degradation of ``value`` relative to ``baseline`` (positive = worse)."""
        return (baseline - value) if self.higher_is_better else (value - baseline)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.unit})" if self.unit else self.name

    def _measure(self, model) -> float:  # pragma: no cover - interface
        raise NotImplementedError


class _BatchMetric(Metric):
    def __init__(self, batches):
        super().__init__()
        self.batches = as_batches(batches)
        if not self.batches:
            raise MpsearchError(f"metric {self.name!r} needs evaluation data: the data holds no batch")
        self._reference: list[torch.Tensor] = []

    def _outputs(self, model):
        dev = _device(model)
        for batch in self.batches:
            b = move_batch(batch, dev)
            yield b, model_output_tensor(run_model(model, b))

    def fit(self, reference):
        if self.needs_reference:
            with torch.no_grad():
                self._reference = [self._summary(b, out).cpu() for b, out in self._outputs(reference.eval())]
        return super().fit(reference)

    def _summary(self, batch, out):
        return out.float()


class EmbeddingCosine(_BatchMetric):
    """Mean cosine similarity of sentence embeddings to the reference model's (1 = identical)."""

    name = "cosine"
    unit = "mean cosine to fp32"
    needs_reference = True

    def _summary(self, batch, out):
        from .zoo import mean_pool

        _, kwargs, _ = split_batch(batch)
        if out.dim() == 3:
            return mean_pool(out.float(), kwargs.get("attention_mask"))
        return F.normalize(out.float().reshape(len(out), -1), dim=-1)

    def _measure(self, model):
        total, n = 0.0, 0
        for (b, out), ref in zip(self._outputs(model), self._reference):
            emb = self._summary(b, out).cpu()
            total += float((emb * ref).sum(-1).sum())
            n += len(emb)
        return total / n


class Accuracy(_BatchMetric):
    """Top-1 accuracy against the batches' targets."""

    name = "accuracy"
    unit = "%"

    def __init__(self, batches):
        super().__init__(batches)
        if any(split_batch(b)[2] is None for b in self.batches):
            raise MpsearchError(
                "accuracy needs targets: give (inputs, targets) batches or a dict with 'labels'; "
                "or use the 'agreement' metric, which compares with the full-precision model"
            )

    def _measure(self, model):
        hit, n = 0, 0
        for b, out in self._outputs(model):
            target = split_batch(b)[2]
            hit += int((out.argmax(-1) == target).sum())
            n += target.numel()
        return 100.0 * hit / n


class Top1Agreement(_BatchMetric):
    """Share of samples whose top-1 class matches the reference model's."""

    name = "agreement"
    unit = "% top-1 agreement"
    needs_reference = True

    def _summary(self, batch, out):
        return out.float().argmax(-1)

    def _measure(self, model):
        hit, n = 0, 0
        for (b, out), ref in zip(self._outputs(model), self._reference):
            hit += int((out.argmax(-1).cpu() == ref).sum())
            n += ref.numel()
        return 100.0 * hit / n


class KLDivergence(_BatchMetric):
    """Mean KL(reference || model) of the output distributions (softmax of the logits)."""

    name = "kl"
    unit = "nats"
    higher_is_better = False
    needs_reference = True

    def _summary(self, batch, out):
        return F.log_softmax(out.float(), -1)

    def _measure(self, model):
        total, n = 0.0, 0
        for (b, out), ref in zip(self._outputs(model), self._reference):
            logq = F.log_softmax(out.float(), -1).cpu()
            kl = (ref.exp() * (ref - logq)).sum(-1)
            total += float(kl.sum())
            n += kl.numel()
        return total / n


class Perplexity(Metric):
    """Perplexity of a causal LM on a token stream, with a sliding window.

    Each window of ``window`` tokens advances by ``stride``; only the tokens new to a window are
    scored (all of them in the first), so every token is predicted once, with at least
    ``window - stride`` (and at least one) tokens of context.
    """

    name = "perplexity"
    unit = "ppl"
    higher_is_better = False

    def __init__(self, input_ids, window: int = 128, stride: int = 64, batch_size: int = 8):
        super().__init__()
        ids = torch.as_tensor(input_ids).reshape(-1).long()
        if ids.numel() < 2:
            raise MpsearchError("perplexity needs at least 2 tokens of evaluation text")
        if not 0 < stride <= window:
            raise MpsearchError(f"perplexity: need 0 < stride <= window, got stride={stride}, window={window}")
        self.input_ids, self.window, self.stride, self.batch_size = ids, window, stride, batch_size

    def windows(self) -> list[tuple[int, int, int]]:
        """``(start, end, first scored position)`` of every window; a window starts at most one
        token before the previous one ends, so each token is scored once, with context."""
        out, start, prev_end, n = [], 0, 0, self.input_ids.numel()
        while True:
            end = min(start + self.window, n)
            out.append((start, end, max(prev_end, start + 1)))
            if end == n:
                return out
            prev_end, start = end, min(start + self.stride, end - 1)

    def _measure(self, model):
        dev = _device(model)
        nll, count = 0.0, 0
        for start, end, first in self.windows():
            ids = self.input_ids[start:end].unsqueeze(0).to(dev)
            logits = model_output_tensor(model(input_ids=ids) if _takes_ids(model) else model(ids)).float()
            logp = F.log_softmax(logits[0, :-1], -1)
            tgt = ids[0, 1:]
            lp = logp.gather(-1, tgt[:, None])[:, 0]
            keep = slice(first - start - 1, None)
            nll -= float(lp[keep].sum())
            count += lp[keep].numel()
        return math.exp(nll / count)


def _takes_ids(model) -> bool:
    import inspect

    try:
        return "input_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class FunctionMetric(Metric):
    """A user callable ``fn(model) -> float`` as a metric."""

    def __init__(self, fn: Callable, name: str | None = None, higher_is_better: bool = True, unit: str = ""):
        super().__init__()
        if not callable(fn):
            raise MpsearchError(f"a metric must be callable as fn(model) -> float, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "metric")
        self.higher_is_better = higher_is_better
        self.unit = unit

    def __call__(self, model):
        value = self.fn(model)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise MpsearchError(
                f"metric {self.name!r} returned {type(value).__name__}, not a number"
            ) from None


METRICS = {
    "cosine": EmbeddingCosine,
    "accuracy": Accuracy,
    "agreement": Top1Agreement,
    "kl": KLDivergence,
    "perplexity": Perplexity,
}


def make_metric(name, data, **kwargs) -> Metric:
    """A metric by name (``cosine``, ``accuracy``, ``agreement``, ``kl``, ``perplexity``), a
    :class:`Metric` as it is, or a callable wrapped in :class:`FunctionMetric`.

    ``data`` is the evaluation data: batches, or for ``perplexity`` a 1-D tensor of token ids.
    """
    if isinstance(name, Metric):
        return name
    if callable(name):
        return FunctionMetric(name, **kwargs)
    if name not in METRICS:
        from .errors import close_matches

        raise MpsearchError(
            f"unknown metric {name!r}{close_matches(str(name), METRICS)}; available: {', '.join(METRICS)}, "
            f"or a callable fn(model) -> float"
        )
    return METRICS[name](data, **kwargs)


def default_metric_name(model: torch.nn.Module, batch=None) -> str:
    """``perplexity`` for causal LMs, ``cosine`` for encoders, ``accuracy`` when the batch has
    targets, ``agreement`` otherwise."""
    cls = type(model).__name__
    if cls.endswith(("ForCausalLM", "LMHeadModel")):
        return "perplexity"
    config = getattr(model, "config", None)
    if config is not None and not cls.endswith(("ForSequenceClassification", "Classification")):
        return "cosine"
    if batch is not None and split_batch(batch)[2] is not None:
        return "accuracy"
    return "agreement"
