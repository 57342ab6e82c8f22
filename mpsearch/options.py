"""Quantization options: what a layer can be given, and what it costs to store.

An :class:`Option` is integer weights of 1-8 bits (symmetric or asymmetric, per output channel or in
groups of ``group_size`` input elements) or ``keep`` (16-bit, left as it is). Options have canonical
names that round-trip through :func:`parse_option`::

    keep            16-bit weights, unchanged
    int4            4-bit, symmetric, one scale per output channel
    int4-g128       4-bit, symmetric, one scale per 128 input elements of a row
    int4-g128-asym  4-bit, asymmetric (scale and zero-point per group)
    q4_K            a consumer's own format (see :mod:`mpsearch.formats`), by its consumer's name

Storage counts the scales (``scale_bits`` each, 16 by default) and, for asymmetric options, the
zero-points (``bits`` each): int4-g128 costs 4 + 16/128 = 4.125 bits per weight.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import close_matches, MpsearchError

KEEP_BITS = 16

#: the option set of the default pipeline (``mpsearch demo``, ``mpsearch frontier --model``): asymmetric
#: per-channel round-to-nearest at 2-8 bits. Symmetric 2-bit has only three levels (-s, 0, s), which
#: leaves a 3-bit budget nothing worth trading (experiments/real_models.md).
DEFAULT_SEARCH_OPTIONS = "int2-asym,int3-asym,int4-asym,int5-asym,int6-asym,int8-asym"
#: the default set plus groups of 64 and 32 at 3-5 bits: on SmolLM2-135M the ILP's plans close 54% / 62%
#: of the KL gap to fp32 at the sizes of uniform int4 / int5 with it, against 21% / 41% with the
#: per-channel set (experiments/measured_loop.md). ``--bits llm`` names it.
LLM_SEARCH_OPTIONS = ("int2-asym,int3-asym,int3-g64-asym,int3-g32-asym,int4-asym,int4-g64-asym,int4-g32-asym,"
                      "int5-asym,int5-g64-asym,int6-asym,int8-asym")
#: names that stand for an option set wherever a list of options is read (``--bits llm,keep``)
OPTION_PRESETS = {"default": DEFAULT_SEARCH_OPTIONS, "llm": LLM_SEARCH_OPTIONS}
_NAME = re.compile(r"^int(?P<bits>\d+)(?:-g(?P<g>\d+))?(?P<asym>-asym)?$", re.ASCII)


@dataclass(frozen=True)
class Option:
    """One way to store a layer's weights.

    Parameters
    ----------
    bits:
        Weight bit-width, 1-8, or 16 for ``keep`` (weights left unchanged).
    group_size:
        Input elements that share one scale; ``None`` for one scale per output channel.
    symmetric:
        Symmetric (zero-point fixed at 0) or asymmetric (a zero-point per group) quantization.
    scale_bits:
        Storage of one scale (and the overhead of the format); 16 for fp16 scales.
    fmt:
        The name of a consumer format (:mod:`mpsearch.formats`: ``q4_K``, ``w4a16-g128``...);
        it then decides the rounding, the storage and the option's name, and ``bits`` is its
        nominal bit-width. ``None`` for mpsearch's own integer options.
    """

    bits: int
    group_size: int | None = None
    symmetric: bool = True
    scale_bits: int = 16
    fmt: str | None = None

    def __post_init__(self):
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise MpsearchError(f"option bits must be an integer, got {self.bits!r}")
        if not (1 <= self.bits <= 8 or self.bits == KEEP_BITS):
            raise MpsearchError(
                f"option bits must be 1-8 or {KEEP_BITS} (keep), got {self.bits}"
            )
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise MpsearchError(
                f"option group_size must be a positive integer or None, got {self.group_size!r}"
            )
        if self.fmt is not None:
            f = self.format
            if f is None:
                raise MpsearchError(f"unknown format {self.fmt!r}{_format_hint(self.fmt)}")
            if f.bits != self.bits:
                raise MpsearchError(
                    f"format {f.name!r} stores {f.bits}-bit weights, not {self.bits}"
                )

    @property
    def format(self):
        """The consumer :class:`~mpsearch.formats.Format` of this option (``None`` for intB)."""
        if self.fmt is None:
            return None
        from .formats import get_format  # start-up: the CLI's parser loads only what it needs

        return get_format(self.fmt)

    @property
    def act_bits(self) -> int:
        """Activation bits the option quantizes the layer's input to (16: not quantized)."""
        return self.format.act_bits if self.fmt is not None else KEEP_BITS

    @property
    def is_keep(self) -> bool:
        return self.bits == KEEP_BITS

    @property
    def name(self) -> str:
        if self.fmt is not None:
            return self.format.name
        if self.is_keep:
            return "keep"
        name = f"int{self.bits}"
        if self.group_size is not None:
            name += f"-g{self.group_size}"
        if not self.symmetric:
            name += "-asym"
        return name

    def __str__(self) -> str:
        return self.name

    def n_groups(self, out_channels: int, in_features: int) -> int:
        """Number of scale groups of a weight seen as ``out_channels`` rows of ``in_features``."""
        if self.is_keep:
            return 0
        if self.group_size is None:
            return out_channels
        return out_channels * math.ceil(in_features / self.group_size)

    def size_bits(self, out_channels: int, in_features: int) -> int:
        """Storage of a weight of ``out_channels x in_features``, scales and zero-points included."""
        if self.fmt is not None:
            return int(self.format.size_bits(out_channels, in_features))
        params = out_channels * in_features
        if self.is_keep:
            return params * KEEP_BITS
        per_group = self.scale_bits + (0 if self.symmetric else self.bits)
        return params * self.bits + self.n_groups(out_channels, in_features) * per_group

    def check_shape(self, out_channels: int, in_features: int) -> str | None:
        """``None`` if this option can store a weight of this shape, else the reason."""
        if self.fmt is not None:
            return self.format.check_shape(out_channels, in_features)
        return None

    def to_dict(self) -> dict:
        if self.fmt is not None:
            return {"name": self.name, "bits": self.bits, "format": self.name}
        return {
            "name": self.name,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "scale_bits": self.scale_bits,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Option:
        if d.get("format"):
            opt = parse_option(str(d["format"]))
            if "bits" in d and opt.bits != d["bits"]:
                raise MpsearchError(
                    f"option {d!r}: format {opt.name!r} stores {opt.bits}-bit weights, not {d['bits']!r}"
                )
            return opt
        if "name" in d:
            named = parse_option(d["name"])
            if named.fmt is not None:  # a consumer format decides everything: the other fields cannot
                if "bits" in d and named.bits != d["bits"]:
                    raise MpsearchError(f"option {d!r}: format {named.name!r} stores {named.bits}-bit weights, "
                                        f"not {d['bits']!r}")
                return named
            if not any(k in d for k in ("group_size", "symmetric")):
                return named
        try:
            return cls(
                bits=int(d["bits"]),
                group_size=None if d.get("group_size") is None else int(d["group_size"]),
                symmetric=bool(d.get("symmetric", True)),
                scale_bits=int(d.get("scale_bits", 16)),
            )
        except MpsearchError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise MpsearchError(
                f"an option must be a dict with at least 'bits' (and optionally 'group_size', "
                f"'symmetric'), got {d!r}"
            ) from exc


KEEP = Option(KEEP_BITS)


def option_sort_key(option: Option) -> tuple:
    """Order options by bits, then finer groups last, symmetric before asymmetric."""
    g = option.group_size if option.group_size is not None else 1 << 30
    return (option.bits, -g, not option.symmetric, option.scale_bits, option.fmt or "")


def parse_option(spec: str | int | Option) -> Option:
    """Parse ``'int4'``, ``'int4-g128'``, ``'int3-asym'``, ``'keep'``, ``'4'`` or ``4``."""
    if isinstance(spec, Option):
        return spec
    if isinstance(spec, bool):
        raise MpsearchError(f"cannot read an option from {spec!r}")
    if isinstance(spec, int):
        return Option(spec)
    text = str(spec).strip().lower()
    if text in ("keep", "fp16", "bf16", "16"):
        return KEEP
    if text.isascii() and text.isdigit():
        return Option(int(text))
    m = _NAME.match(text)
    if not m:
        from .formats import get_format  # start-up: the CLI's parser loads only what it needs

        f = get_format(text)
        if f is not None:
            return Option(bits=f.bits, fmt=f.name)
        raise MpsearchError(
            f"unknown option {spec!r}: write 'keep', 'intB', 'intB-gG' or 'intB-gG-asym' "
            f"(for example 'int4-g128'), a bare bit-width such as '4', or a consumer format "
            f"such as 'q4_K' ('mpsearch targets' lists them){_format_hint(text)}"
        )
    return Option(
        bits=int(m["bits"]),
        group_size=int(m["g"]) if m["g"] else None,
        symmetric=m["asym"] is None,
    )


def _format_hint(name: str) -> str:
    from .formats import format_names  # start-up: the CLI's parser loads only what it needs

    return close_matches(str(name), format_names())


def expand_presets(items: list) -> list:
    """``items`` with each preset name (:data:`OPTION_PRESETS`) replaced by its option names."""
    return [x for s in items for x in (
        OPTION_PRESETS[s.strip().lower()].split(",") if isinstance(s, str) and s.strip().lower() in OPTION_PRESETS
        else [s])]


def parse_options(spec: str | list) -> list[Option]:
    """Parse a comma-separated list (``'2,3,4,8,keep'``) or a list of option specs; a preset name
    (``default``, ``llm``: :data:`OPTION_PRESETS`) stands for its options."""
    items = expand_presets([s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec))
    if not items:
        raise MpsearchError("the option list is empty: give at least one, e.g. '2,3,4,8'")
    options = [parse_option(s) for s in items]
    seen = set()
    for o in options:
        if o.name in seen:
            raise MpsearchError(f"option {o.name!r} is listed twice")
        seen.add(o.name)
    return sorted(options, key=option_sort_key)


def default_option_for_bits(bits: int) -> Option:
    """The option a bare bit-width stands for: per-channel symmetric, or keep for 16."""
    return KEEP if bits == KEEP_BITS else Option(int(bits))
