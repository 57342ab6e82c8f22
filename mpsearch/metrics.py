"""Quality metrics: how good is a (quantized) model, measured on held-out evaluation data.

A :class:`Metric` is called on a model and returns one number. Metrics that compare with the
full-precision model (embedding cosine, top-1 agreement, KL) are first :meth:`Metric.fit` on the
reference model; :meth:`Metric.loss` turns a value into a degradation (>= 0 means worse than the
reference) whatever the metric's direction, which is what the proxy check correlates with the
predicted damage.

- :class:`CausalLMMetric` for causal LMs, in batched windows over a held-out token stream: mean KL
  divergence to the full-precision next-token distribution (``kld``, with its 99th percentile),
  top-1 agreement (``top1``) and perplexity, all from one pass; :class:`NextTokenKL`,
  :class:`NextTokenTop1` and :class:`Perplexity` return one of them and keep all in ``values``;
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

from .data import (as_batches, float_dtype, model_device, model_output_tensor, move_batch, run_model,
                   split_batch)
from .errors import MpsearchError
from .fileio import torch_save
from .fingerprint import model_fingerprint
from .recipe import default_metric
from .registry import REGISTRIES
from .zoo import mean_pool


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

    def on_data(self, data) -> Metric | None:
        """The same measurement on other ``data`` (batches; unfitted), or ``None`` where the metric
        is not one of data (a user callable). The ``evolve`` refinement measures with it on the
        calibration data, so that its thousands of measurements never select on the evaluation's."""
        return None

    def _measure(self, model) -> float:  # pragma: no cover - interface
        raise NotImplementedError


def token_ids(batches) -> torch.Tensor:
    """One 1-D stream of the non-padding ``input_ids`` of ``batches`` (a causal LM's text)."""
    return torch.cat([b["input_ids"][b["attention_mask"].bool()] if "attention_mask" in b
                      else b["input_ids"].reshape(-1) for b in as_batches(batches)])


class _BatchMetric(Metric):
    def __init__(self, batches):
        super().__init__()
        self.batches = as_batches(batches)
        if not self.batches:
            raise MpsearchError(f"metric {self.name!r} needs evaluation data: the data holds no batch")
        self._reference: list[torch.Tensor] = []

    def on_data(self, data):
        return type(self)(data)

    def _outputs(self, model):
        dev, dt = model_device(model), float_dtype(model)
        for batch in self.batches:
            b = move_batch(batch, dev, dt)
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


def causal_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, first scored position)`` of the windows over ``n`` tokens: each window of
    ``window`` tokens advances by ``stride`` and starts at most one token before the previous one
    ends, so every token from the second on is scored once, with context."""
    out, start, prev_end = [], 0, 0
    while True:
        end = min(start + window, n)
        out.append((start, end, max(prev_end, start + 1)))
        if end == n:
            return out
        prev_end, start = end, min(start + stride, end - 1)


class CausalLMMetric(Metric):
    """Next-token quality of a causal LM on a token stream, in batched windows.

    One pass over the windows (``batch_size`` windows of ``window`` tokens per forward, advancing by
    ``stride``; only the tokens new to a window are scored, so each token is predicted once) gives:

    - ``kld``: the mean over scored tokens of KL(p_ref || p) between the full-precision model's
      next-token distribution and this model's (nats), and ``kld_p99``, its 99th percentile;
    - ``top1``: the share (%) of scored tokens whose most likely next token is the reference's;
    - ``perplexity``: exp of the mean negative log-likelihood of the actual next tokens.

    The reference is computed once by :meth:`fit` and kept: ``reference="full"`` keeps every scored
    token's fp32 logits (exact KL, computed from logit differences), ``"topk"`` keeps the ``topk`` most likely tokens'
    log-probabilities plus the mass of the rest (the KL of the distributions with the tail merged into
    one outcome: a lower bound of the exact KL, equal when ``topk`` covers the vocabulary), ``"auto"``
    the full form when it fits in ``max_reference_mb``, else top-k. With ``cache_dir`` the reference
    is stored on disk (``reference-<key>.pt``, key = model weights, tokens and settings) and read back
    by a later run. ``value`` names the number :meth:`__call__` returns; :attr:`values` holds all of
    the last measurement. Sums stay on the device until the end (one host synchronisation per call).
    """

    name = "kld"
    unit = "nats, KL to full precision"
    higher_is_better = False
    needs_reference = True
    VALUES = ("kld", "kld_p99", "top1", "perplexity")

    def __init__(self, input_ids, window: int = 512, stride: int | None = None, batch_size: int = 8,
                 reference: str = "auto", topk: int = 256, max_reference_mb: float = 4096.0,
                 cache_dir=None):
        super().__init__()
        ids = torch.as_tensor(input_ids).reshape(-1).long()
        if ids.numel() < 2:
            raise MpsearchError(f"{self.name}: needs at least 2 tokens of evaluation text")
        stride = window if stride is None else stride
        if not isinstance(window, int) or window < 2:
            raise MpsearchError(f"{self.name}: window must be an integer >= 2 tokens, got {window!r}")
        if not isinstance(stride, int) or not 0 < stride <= window:
            raise MpsearchError(f"{self.name}: need 0 < stride <= window, got stride={stride!r}, window={window}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise MpsearchError(f"{self.name}: batch_size must be a positive integer, got {batch_size!r}")
        if reference not in ("auto", "full", "topk"):
            raise MpsearchError(f"{self.name}: reference must be 'auto', 'full' or 'topk', got {reference!r}")
        if not isinstance(topk, int) or topk < 1:
            raise MpsearchError(f"{self.name}: topk must be a positive integer, got {topk!r}")
        self.input_ids, self.window, self.stride, self.batch_size = ids, window, stride, batch_size
        self.reference, self.topk, self.max_reference_mb = reference, topk, float(max_reference_mb)
        self.cache_dir = cache_dir
        self._values: dict[str, float] = {}
        self._ref: list[dict] | None = None
        self.reference_form: str | None = None

    def on_data(self, data):
        """On batches of token windows each window is scored as it is (window = their length); a 1-D
        token stream keeps this metric's window and stride."""
        if isinstance(data, torch.Tensor):
            ids, window, stride = data, self.window, self.stride
        else:
            ids = token_ids(data)
            first = as_batches(data)[0]["input_ids"]
            window = stride = int(first.shape[-1]) if first.dim() == 2 else self.window
        window = min(window, max(ids.numel(), 2))
        return type(self)(ids, window=window, stride=min(stride, window), batch_size=self.batch_size,
                          reference=self.reference, topk=self.topk, max_reference_mb=self.max_reference_mb)

    # ------------------------------------------------------------------ windows and forwards
    def windows(self) -> list[tuple[int, int, int]]:
        return causal_windows(self.input_ids.numel(), self.window, self.stride)

    def _groups(self):
        """Windows in batches of equal length: ``[(starts, length, offsets)]``."""
        by_len: dict[int, list] = {}
        for start, end, first in self.windows():
            by_len.setdefault(end - start, []).append((start, first - start - 1))
        out = []
        for length, items in by_len.items():
            for i in range(0, len(items), self.batch_size):
                chunk = items[i : i + self.batch_size]
                out.append(([s for s, _ in chunk], length, [o for _, o in chunk]))
        return out

    def _scored(self, model):
        """Yield ``(logits [N, V] fp32, targets [N])`` of the scored tokens, batch by batch."""
        dev = model_device(model)
        ids = self.input_ids.to(dev)
        kwargs = _lm_kwargs(model)
        for starts, length, offsets in self._groups():
            x = torch.stack([ids[s : s + length] for s in starts])
            out = model(input_ids=x, **kwargs) if kwargs is not None else model(x)
            logits = model_output_tensor(out)[:, :-1]
            pos = torch.arange(length - 1, device=dev)
            keep = pos[None, :] >= torch.tensor(offsets, device=dev)[:, None]
            yield logits[keep].float(), x[:, 1:][keep]

    # ------------------------------------------------------------------------- reference
    def fit(self, reference):
        was = reference.training
        reference.eval()
        try:
            self._ref = self._load_cached(reference)
            if self._ref is None:
                with torch.no_grad():
                    self._ref = self._make_reference(reference)
                self._save_cached(reference)
        finally:
            reference.train(was)
        self._fitted = True
        return self

    def _form(self, vocab: int) -> str:
        if self.reference != "auto":
            return self.reference
        n = sum(len(s) * (ln - 1) for s, ln, _ in self._groups())
        return "full" if n * vocab * 4 / 2**20 <= self.max_reference_mb else "topk"

    def _make_reference(self, model) -> list[dict]:
        refs, form = [], None
        for z, _tgt in self._scored(model):
            form = form or self._form(z.shape[-1])
            entry = {"top1": z.argmax(-1)}
            if form == "full" or self.topk >= z.shape[-1]:
                entry["logits"] = z
            else:
                logp = F.log_softmax(z, -1)
                val, idx = logp.topk(self.topk, dim=-1)
                entry.update(logp_top=val, idx=idx, log_tail=_log1mexp(torch.logsumexp(val, -1)))
            refs.append(entry)
        self.reference_form = form
        return refs

    def _cache_path(self, model):
        if not self.cache_dir:
            return None
        import hashlib
        from pathlib import Path

        doc = repr((model_fingerprint(model), hashlib.sha1(self.input_ids.numpy().tobytes()).hexdigest(),
                    self.window, self.stride, self.reference, self.topk, self.max_reference_mb))
        return Path(self.cache_dir) / f"reference-{hashlib.sha1(doc.encode()).hexdigest()[:16]}.pt"

    def _load_cached(self, model):
        path = self._cache_path(model)
        if path is None or not path.is_file():
            return None
        try:
            doc = torch.load(path, map_location=model_device(model), weights_only=True)
        except Exception:  # unreadable: compute it again
            return None
        self.reference_form = doc["form"]
        return doc["refs"]

    def _save_cached(self, model):
        path = self._cache_path(model)
        if path is None:
            return

        torch_save({"form": self.reference_form, "refs": self._ref}, path)

    # ------------------------------------------------------------------------- measuring
    def __call__(self, model):
        if self.needs_reference and not self._fitted:
            raise MpsearchError(
                f"metric {self.name!r} compares with the full-precision model: call "
                f"metric.fit(reference_model) first"
            )
        return super().__call__(model)

    def _measure(self, model):
        dev = model_device(model)
        nll = torch.zeros((), dtype=torch.float64, device=dev)
        hits = torch.zeros((), dtype=torch.float64, device=dev)
        kls, count = [], 0
        refs = self._ref if self._fitted else None
        for i, (z, tgt) in enumerate(self._scored(model)):
            logp = F.log_softmax(z, -1)
            nll -= logp.gather(-1, tgt[:, None])[:, 0].double().sum()
            count += tgt.numel()
            if refs is None:
                continue
            ref = refs[i]
            hits += (z.argmax(-1) == ref["top1"]).double().sum()
            kls.append(_kl_rows(ref, z, logp))
        values = {"perplexity": float(torch.exp(nll / count))}
        if refs is not None:
            kl = torch.cat(kls)
            values.update(kld=float(kl.mean()), kld_p99=float(torch.quantile(kl.float(), 0.99)),
                          top1=float(100.0 * hits / count))
        self._values = values
        return values[self.value_key]

    @property
    def values(self) -> dict[str, float]:
        """Every value of the last measurement: ``kld``, ``kld_p99``, ``top1``, ``perplexity``."""
        return dict(self._values)

    value_key = "kld"


def _expm1mx(x: torch.Tensor) -> torch.Tensor:
    """exp(x) - 1 - x without cancellation (a series below |x| = 0.01)."""
    series = x * x * (0.5 + x * (1 / 6 + x * (1 / 24 + x / 120)))
    return torch.where(x.abs() < 1e-2, series, torch.expm1(x) - x)


def kl_from_logits(ref_logits: torch.Tensor, logits: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row KL(softmax(ref) || softmax(logits)), accurate in float32 for nearby distributions.

    With p = softmax(ref), d = logits - ref centred by its p-mean and r = E_p[d] (zero but for
    rounding): KL = log E_p[exp(d)] + r = log1p(r + E_p[exp(d) - 1 - d]) - r, where exp(d) - 1 - d is
    evaluated by its series for small d. Everything is computed from the small logit differences, none
    of it from differences of large log-probabilities (whose float32 rounding, ~1e-7 of |log p|, is as
    large as the KL of an 8-bit layer)."""
    p = torch.softmax(ref_logits, -1) if p is None else p
    d = logits - ref_logits
    d = d - (p * d).sum(-1, keepdim=True)
    r = (p * d).sum(-1)
    return (torch.log1p(r + (p * _expm1mx(d)).sum(-1)) - r).clamp(min=0)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, clamped away from log(0)."""
    return torch.log(torch.clamp(-torch.expm1(x), min=1e-30))


def _kl_rows(ref: dict, z: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p_ref || q): exact with a full reference (from the logit differences, accurate in
    float32 for nearby distributions), with the tail merged into one outcome with a top-k one."""
    if "logits" in ref:

        return kl_from_logits(ref["logits"], z).double()
    lp = ref["logp_top"]
    lq = logq.gather(-1, ref["idx"])
    lq_tail = _log1mexp(torch.logsumexp(lq, -1))
    tail = ref["log_tail"]
    kl = (lp.exp() * (lp - lq)).sum(-1) + tail.exp() * (tail - lq_tail)
    return kl.double().clamp(min=0)


class NextTokenKL(CausalLMMetric):
    """Mean KL divergence to the full-precision next-token distribution (see :class:`CausalLMMetric`)."""


class NextTokenTop1(CausalLMMetric):
    """Top-1 agreement (%) with the full-precision model's next token (see :class:`CausalLMMetric`)."""

    name = "top1"
    unit = "% same top token as full precision"
    higher_is_better = True
    value_key = "top1"


class Perplexity(CausalLMMetric):
    """Perplexity of a causal LM on a token stream, with a sliding window, in batched passes.

    Each window of ``window`` tokens advances by ``stride``; only the tokens new to a window are
    scored (all of them in the first), so every token is predicted once, with at least
    ``window - stride`` (and at least one) tokens of context. Fitted on a reference model it also
    reports ``kld``, ``kld_p99`` and ``top1`` in :attr:`values`; it does not need one.
    """

    name = "perplexity"
    unit = "ppl"
    higher_is_better = False
    needs_reference = False
    value_key = "perplexity"

    def __init__(self, input_ids, window: int = 128, stride: int = 64, batch_size: int = 8, **kwargs):
        super().__init__(input_ids, window=window, stride=stride, batch_size=batch_size, **kwargs)

    def windowed(self, model) -> float:
        """The same perplexity with one forward per window (the unbatched reference computation)."""
        dev = model_device(model)
        nll, count = 0.0, 0
        with torch.no_grad():
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


def _lm_kwargs(model):
    """Keyword arguments for a forward on ``input_ids`` (``None``: call the model positionally)."""
    if not _takes_ids(model):
        return None
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    return {"use_cache": False} if "use_cache" in params else {}


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
        try:
            value = self.fn(model)
        except MpsearchError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's code: its error in one line, with a hint
            dtype = float_dtype(model)
            hint = (f" (the model is {str(dtype).removeprefix('torch.')}: the metric must feed it inputs of that "
                    f"dtype)" if dtype not in (None, torch.float32) else "")
            text = " ".join(str(exc).split())[:300]
            raise MpsearchError(f"metric {self.name!r} failed on the model: {type(exc).__name__}: {text}{hint}") \
                from None
        try:
            return float(value)
        except (TypeError, ValueError):
            raise MpsearchError(
                f"metric {self.name!r} returned {type(value).__name__}, not a number"
            ) from None


#: the metrics of causal LMs (all measured in one pass; each reports the others in ``values``)
CAUSAL_METRICS = ("kld", "top1", "perplexity")


def make_metric(name, data, **kwargs) -> Metric:
    """A metric by name (the metric registry: ``cosine``, ``accuracy``, ``agreement``, ``kl``,
    ``perplexity``, ``kld``, ``top1``; :data:`mpsearch.registry.METRICS`), a
    :class:`Metric` as it is, or a callable wrapped in :class:`FunctionMetric`.

    ``data`` is the evaluation data: batches, or for the causal-LM metrics (``kld``, ``top1``,
    ``perplexity``) a 1-D tensor of token ids.
    """
    if isinstance(name, Metric):
        return name
    if callable(name):
        return FunctionMetric(name, **kwargs)

    return REGISTRIES["metric"].load(name)(data, **kwargs)


def default_metric_name(model: torch.nn.Module, batch=None) -> str:
    """The model's default metric: :func:`mpsearch.recipe.default_metric` (the recipe decides it)."""
    return default_metric(model, batch)
