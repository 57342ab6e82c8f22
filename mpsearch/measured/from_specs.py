"""The measured path from specs: :func:`model_frontier` (``mpsearch frontier --model``) loads the
model, its calibration and evaluation data and the metric, then runs :func:`measured_frontier`;
:func:`run_demo` is ``mpsearch demo``."""

from __future__ import annotations

from dataclasses import dataclass
import torch

from .. import zoo
from ..data import first_batch
from ..distributed import check_device_map, current, load_device_map, place_model
from ..errors import MpsearchError
from ..metrics import EmbeddingCosine, FunctionMetric, make_metric, token_ids
from ..recipe import DEMO_DATA, is_callable_spec, resolve
from ..settings import Interval, Settings
from ..specs import (_is_text, _load_callable, has_tokenizer, is_causal_lm, load_calibration, load_data,
                     load_metric, load_model, load_tokenizer, tokenizer_for)
from .result import FrontierRun
from .run import measured_frontier
from .settings import FrontierSettings

ZOO_DATA = {"minilm": "shakespeare", "fashion-cnn": "fashion-mnist", "digits-mlp": "digits"}

_SIZE = [Interval(int, 1, None), None]


@dataclass(frozen=True)
class DataSettings(Settings):
    """Where a run's model, data and metric come from and how text is cut (checked before any model
    loads): calibration ``data`` and ``eval_data`` specs, the ``metric`` (a name,
    ``package.module:callable`` or ``None``: the model's default), accelerate's ``device_map``, the
    model's ``device`` and ``dtype``, and the sizes of tokenized text (:func:`mpsearch.specs.load_calibration`,
    :func:`mpsearch.specs.load_metric`)."""

    data: str | None = None
    eval_data: str | None = None
    metric: str | None = None
    device_map: object = None
    device: str | None = None
    dtype: str | None = None
    seq_len: int | None = None
    calib_samples: int | None = None
    eval_tokens: int | None = None
    eval_window: int | None = None
    eval_stride: int | None = None
    batch_size: int = 8

    _parameter_constraints = {"seq_len": _SIZE, "calib_samples": _SIZE, "eval_tokens": _SIZE,
                              "eval_window": _SIZE, "eval_stride": _SIZE, "batch_size": [Interval(int, 1, None)]}

    def _check(self) -> None:
        """The device map parsed and its devices checked (a GPU this host has), before any model loads."""
        if self.device_map is not None:
            object.__setattr__(self, "device_map", check_device_map(self.device_map))


def _zoo_eval(spec: str, tokenizer):
    if spec == "minilm":
        return zoo.minilm_batches(zoo.shakespeare_lines(64, "eval", seed=1), 32, 48, tokenizer=tokenizer)
    if spec == "fashion-cnn":
        return zoo.fashion_batches("test", n=2000, batch_size=500)
    if spec == "digits-mlp":
        return zoo.digits_batches("test")
    return None


def build_metric(name, model, evals):
    """A :class:`~mpsearch.metrics.Metric` from a name (``None``: by model, :func:`mpsearch.recipe.resolve`),
    or a ``package.module:callable`` returning ``fn(model) -> float``."""
    if is_callable_spec(name):
        return FunctionMetric(_load_callable(name, "metric"))
    if evals is None:
        raise MpsearchError("evaluation data is required for this model: calibration and evaluation data "
                            "must be disjoint (give --eval-data, or --metric package.module:callable)")
    name = resolve(metric=name, model=model, batch=first_batch(evals)).metric
    if name == "perplexity":
        evals = token_ids(evals)  # padding left out
    return make_metric(name, evals)


def load_inputs(model: str, d: DataSettings):
    """``(model, calibration data, metric)`` from the specs of ``d`` (the model placed for torchrun)."""
    net = load_device_map(model, d.device_map) if d.device_map else load_model(model, device=d.device, dtype=d.dtype)
    place_model(net, current())  # under torchrun: ranks share the estimate and the measurements
    text = dict(window=d.eval_window, stride=d.eval_stride, eval_tokens=d.eval_tokens)
    # text: the model's own tokenizer; a causal LM with one (smollm2, a folder, a cached id, a GGUF) defaults
    # to the Shakespeare plays, calibration and evaluation from disjoint plays
    llm_text = is_causal_lm(net) and has_tokenizer(model)
    if llm_text or _is_text(d.data) or _is_text(d.eval_data):
        sizes = dict(seq_len=d.seq_len, batch_size=d.batch_size, tokenizer=tokenizer_for(model))
        calib = load_calibration(d.data or "shakespeare", net, model, samples=d.calib_samples, **sizes)
        if is_callable_spec(d.metric):
            return net, calib, build_metric(d.metric, net, None)
        evals = d.eval_data or ("shakespeare" if llm_text else None)
        return net, calib, load_metric(d.metric, evals, net, model, **text, **sizes)
    if is_causal_lm(net) and d.eval_data and not is_callable_spec(d.metric):  # token ids (.pt, callables)
        calib = load_calibration(d.data, net, model, seq_len=d.seq_len, samples=d.calib_samples,
                                 batch_size=d.batch_size)
        return net, calib, load_metric(d.metric, d.eval_data, net, model, batch_size=d.batch_size,
                                       seq_len=d.seq_len, **text)
    tokenizer = load_tokenizer(model) if model == "minilm" else None
    calib = load_data(d.data, tokenizer=tokenizer) if d.data else None
    if calib is None and model in ZOO_DATA:
        calib = load_data(ZOO_DATA[model])
    evals = load_data(d.eval_data, tokenizer=tokenizer) if d.eval_data else _zoo_eval(model, tokenizer)
    return net, calib, build_metric(d.metric, net, evals)


def model_frontier(model: str, data: DataSettings | None = None, settings=None, **kwargs) -> FrontierRun:
    """:func:`measured_frontier` from specs: a model spec (HF directory, ``package.module:callable``,
    ``file.py:callable`` or a zoo name) and a :class:`DataSettings` (calibration and evaluation data
    specs, defaults for the zoo models; a metric name; an accelerate ``device_map`` (``auto``,
    ``balanced``, JSON); the model's ``device``/``dtype``; the sizes of tokenized text), or its fields
    as keywords; ``settings`` (a :class:`~mpsearch.measured.FrontierSettings`) and the other keywords
    go to :func:`measured_frontier`."""
    fields = DataSettings.field_names()
    given = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    data = data.replace(**given) if data is not None else DataSettings(**given)
    run = {k: kwargs.pop(k) for k in ("refine_metric", "out", "plans_dir", "plot") if k in kwargs}
    settings = FrontierSettings.from_kwargs(settings, **kwargs)  # every setting checked before the model loads
    net, calib, metric = load_inputs(model, data)
    return measured_frontier(net, calib, metric, settings, **run)


def run_demo(out="mpsearch-demo", settings=None, *, progress=True, device=None, dtype=None, **kwargs) -> FrontierRun:
    """``mpsearch demo``: the default recipe on all-MiniLM-L6-v2 with Shakespeare text (calibration and
    evaluation passages from different plays; quality = embedding cosine to the fp32 model).
    ``settings`` (a :class:`~mpsearch.measured.FrontierSettings`) or its fields as keywords; without
    settings, ``validate`` is the demo's (``DEMO_DATA``)."""
    if settings is None:
        kwargs.setdefault("validate", DEMO_DATA["validate"])
    torch.manual_seed(0)
    model, tok = zoo.load_minilm()
    model = load_model(model, device=device, dtype=dtype)
    calib = zoo.minilm_batches(zoo.shakespeare_lines(DEMO_DATA["calib"], "calib"), 16,
                               DEMO_DATA["max_length"], tokenizer=tok)
    evals = zoo.minilm_batches(zoo.shakespeare_lines(DEMO_DATA["eval"], "eval", seed=1), 32,
                               DEMO_DATA["max_length"], tokenizer=tok)
    return measured_frontier(model, calib, EmbeddingCosine(evals), settings, out=out, progress=progress, **kwargs)
