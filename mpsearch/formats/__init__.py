"""Consumer formats: the storage formats that real quantizers execute, with their exact costs.

A :class:`Format` is one way a consumer stores a weight matrix (llama.cpp's ``q4_K``, compressed-
tensors' ``w4a16-g128``, ModelOpt's ``fp8``...). It knows

- its nominal weight bit-width ``bits`` (the cost table's ``bits`` column) and, where it quantizes
  the layer's input too, ``act_bits``;
- :meth:`Format.size_bits`: the exact storage of an ``out_channels x in_features`` weight in the
  consumer's own accounting (block scales, mins, super-block scales, zero-points);
- :meth:`Format.check_shape`: whether the consumer can store a matrix of that shape at all;
- :meth:`Format.quantize`: a torch fake-quantizer reproducing the consumer's rounding (float32 in,
  float32 out, the dequantized values the consumer would compute);
- :meth:`Format.quantize_act`: the activation quantizer for formats that quantize inputs.

Formats are registered by name in modules of this package (one per consumer family) that are
imported on first lookup. Module tops stay torch-free so that option parsing stays light.

A format is declared once: its :class:`Format` instance carries, besides the above, the targets that
offer it (:attr:`Format.offers`, one :class:`Offer` each: in the default search set or not, and its
rank in the target's list) and, where the consumer's file names it by more than its integer settings,
the entry its exporter writes (:attr:`Format.consumer_config`). Targets select their options with
:func:`offered_by` and exporters read ``consumer_config``, so adding a consumer format is one
``register(MyFormat(...))`` plus its fake quantizer (``tests/test_format_declared_once.py`` shows it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

#: modules of this package that register formats, imported on the first lookup
_MODULES = ("ggml", "ggml_iq", "intq", "fp")

_REGISTRY: dict[str, "Format"] = {}
_LOWER: dict[str, str] = {}
_loaded = False
#: target name -> its offered formats (:func:`offered_by`), emptied whenever the registry changes
_OFFERED: dict[str, list] = {}


@dataclass(frozen=True)
class Offer:
    """A target that lists a format among its options (:attr:`Format.offers`).

    ``target``: the target's registered name (``"vllm"``, ``"llama.cpp"``); ``default``: in the
    target's default search set; ``imatrix_default``: in its default set when the rounding uses an
    importance matrix (``None``: as ``default``); ``rank``: a target lists its options by rank, then
    in registration order."""

    target: str
    default: bool = False
    imatrix_default: bool | None = None
    rank: int = 0

    @property
    def in_imatrix_default(self) -> bool:
        return self.default if self.imatrix_default is None else self.imatrix_default


class Format:
    """Base class. Subclasses set the class attributes and implement :meth:`quantize`.

    ``level_group`` is the number of consecutive weights of a row that share one set of levels
    (the block or sub-block a scale applies to; ``None`` for the whole row): the validator checks
    that each such group holds at most ``levels`` distinct values (``2 ** bits`` unless the format
    says otherwise: llama.cpp's i-quants put signed grid points on 3, 6 or 16 values per group).
    ``rows_independent`` is false for formats whose scales depend on the whole matrix (a per-tensor
    global scale): the rows of several matrices (stacked experts) may be quantized together only
    when it is true. ``idempotent``: the format promises that its rounding is a projection,
    ``quantize(quantize(W)) == quantize(W)`` exactly (checked by
    :func:`mpsearch.testing.consumers.check_format`); many consumers' roundings are not (a
    symmetric scale of ``max / (2**(b-1) - 0.5)`` moves when applied again).
    """

    name: str = ""
    bits: int = 0
    act_bits: int = 16
    consumer: str = ""
    level_group: int | None = None
    rows_independent: bool = True
    levels: int | None = None
    idempotent: bool = False
    description: str = ""
    #: the targets that offer this format (:class:`Offer`; see :func:`offered_by`)
    offers: tuple = ()
    #: what the consumer's exporter writes for this format where its integer settings (``bits``,
    #: ``group``, ``symmetric``) do not say it: compressed-tensors' ``weights`` /
    #: ``input_activations`` args, torchao's config dict, ModelOpt's ``quantized_layers`` entry
    consumer_config: dict | None = None

    def max_levels(self) -> int:
        """The most distinct values one ``level_group`` may hold."""
        return self.levels if self.levels is not None else 2 ** self.bits

    def bits_per_weight(self, in_features: int | None = None) -> float:
        """Storage per weight of a long row (of ``in_features`` where it matters)."""
        n = in_features or 4096
        return self.size_bits(1, n) / n

    def size_bits(self, out_channels: int, in_features: int) -> int:  # pragma: no cover
        raise NotImplementedError

    def check_shape(self, out_channels: int, in_features: int) -> str | None:
        """``None`` if the consumer can store this shape, else the reason it cannot."""
        return None

    def quantize(self, matrix):  # pragma: no cover
        """Fake-quantize a float32 ``[out_channels, in_features]`` matrix; returns float32."""
        raise NotImplementedError

    def quantize_act(self, x):
        """Fake-quantize a layer's input activation (identity for weight-only formats)."""
        return x

    @property
    def quantizes_activations(self) -> bool:
        return self.act_bits < 16

    def __repr__(self) -> str:
        return f"<format {self.name} ({self.consumer}, {self.bits}-bit)>"


def register(fmt: Format) -> Format:
    """Add a format to the registry (its name must be new, case-insensitively); a plugin's format
    comes after the built-in ones (they are loaded first)."""
    _load()
    key = fmt.name.lower()
    if key in _LOWER and _REGISTRY[_LOWER[key]] is not fmt:
        raise ValueError(f"format {fmt.name!r} is registered twice")
    _REGISTRY[fmt.name] = fmt
    _LOWER[key] = fmt.name
    _OFFERED.clear()
    return fmt


def unregister(name: str) -> None:
    """Remove the format called ``name`` (a plugin's, e.g. at the end of a test); unknown names are
    ignored."""
    canonical = _LOWER.pop(str(name).strip().lower(), None)
    if canonical is not None:
        del _REGISTRY[canonical]
        _OFFERED.clear()


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _MODULES:
        try:
            importlib.import_module(f".{mod}", __name__)
        except ModuleNotFoundError as exc:  # a module of this package not written yet
            if exc.name != f"{__name__}.{mod}":
                raise


def get_format(name: str) -> Format | None:
    """The registered format called ``name`` (case-insensitive), or ``None``."""
    _load()
    canonical = _LOWER.get(str(name).strip().lower())
    return _REGISTRY[canonical] if canonical else None


def format_names() -> list[str]:
    _load()
    return list(_REGISTRY)


def offered_by(target: str) -> list[tuple[str, Offer]]:
    """``(format name, offer)`` for every registered format that ``target`` offers, in the target's
    order (by :attr:`Offer.rank`, then registration order)."""
    _load()
    if target not in _OFFERED:
        found = [(offer.rank, i, name, offer) for i, (name, fmt) in enumerate(_REGISTRY.items())
                 for offer in fmt.offers if offer.target == target]
        _OFFERED[target] = [(name, offer) for _, _, name, offer in sorted(found, key=lambda f: f[:2])]
    return list(_OFFERED[target])
