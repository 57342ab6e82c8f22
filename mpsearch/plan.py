"""BitPlan: layer -> option, with predicted totals and provenance. Versioned JSON.

The file contract::

    {"format": "mpsearch.plan", "version": 1,
     "bits": {"encoder.layer.0.attention.self.query": 4, ...},
     "options": {"encoder.layer.0.attention.self.query":
                     {"name": "int4-g128", "bits": 4, "group_size": 128, "symmetric": true}, ...},
     "predicted": {"damage": 0.012, "size_bits": 81234567, "avg_bits": 4.1},
     "provenance": {"solver": "greedy", "budget": {...}, "table": {...}, "mpsearch": "0.1.0"}}

``bits`` and ``predicted`` are the minimum any reader can rely on; ``options`` adds the format of
each layer (16 bits means ``keep``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MpsearchError, PlanError
from .fileio import atomic_write_text
from .options import default_option_for_bits, Option, parse_option

FORMAT = "mpsearch.plan"
VERSION = 1


@dataclass
class BitPlan:
    """The bit-width (and format) chosen for every layer."""

    bits: dict[str, int]
    options: dict[str, dict] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.bits, dict) or not self.bits:
            raise PlanError("a plan needs a non-empty 'bits' mapping of layer name -> bit-width")
        clean = {}
        for layer, b in self.bits.items():
            if not isinstance(layer, str) or not layer:
                raise PlanError(f"plan layer names must be non-empty strings, got {layer!r}")
            clean[layer] = _int_field(b, layer, "bits", 1, 32, label="bits")
        self.bits = clean
        if not isinstance(self.options, dict):
            raise PlanError("plan 'options' must be a mapping of layer name -> option")
        unknown = set(self.options) - set(self.bits)
        if unknown:
            raise PlanError(f"plan 'options' names layers absent from 'bits': {sorted(map(str, unknown))[:5]}")
        for layer, opt in self.options.items():
            _check_option(layer, opt, self.bits[layer])
        if not isinstance(self.predicted, dict):
            raise PlanError("plan 'predicted' must be a mapping of name -> number")
        for key, value in self.predicted.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise PlanError(f"plan 'predicted' {key!r} must be a number, got {value!r}")
        if not isinstance(self.provenance, dict):
            raise PlanError("plan 'provenance' must be a mapping (JSON object)")

    # ----------------------------------------------------------------- access
    @property
    def layers(self) -> list[str]:
        return list(self.bits)

    def option(self, layer: str) -> Option:
        """The quantization option of ``layer`` (per-channel symmetric when only bits are given)."""
        opt = self.options.get(layer)
        if opt:
            if "group_size" in opt or "symmetric" in opt:
                return Option.from_dict(opt)
            return parse_option(opt.get("name", self.bits[layer]))  # its name was checked when the plan was made
        return default_option_for_bits(self.bits[layer])

    def option_name(self, layer: str) -> str:
        opt = self.options.get(layer) or {}
        return opt.get("name") or self.option(layer).name

    def to_frame(self):
        """One row per layer: layer, bits, option."""
        import pandas as pd

        return pd.DataFrame(
            {"layer": self.layers, "bits": list(self.bits.values()),
             "option": [self.option_name(n) for n in self.layers]}
        )

    @property
    def avg_bits(self) -> float | None:
        return self.predicted.get("avg_bits")

    # ----------------------------------------------------------------- I/O
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "bits": dict(self.bits),
            "options": {k: dict(v) for k, v in self.options.items()},
            "predicted": dict(self.predicted),
            "provenance": self.provenance,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def save(self, path: str | os.PathLike) -> Path:
        atomic_write_text(path, self.to_json() + "\n")
        return Path(path)

    @classmethod
    def from_dict(cls, doc, source: str = "plan") -> BitPlan:
        if not isinstance(doc, dict):
            raise PlanError(f"{source}: a plan is a JSON object, got {type(doc).__name__}")
        if doc.get("format") != FORMAT:
            raise PlanError(
                f"{source}: not an mpsearch plan (expected \"format\": \"{FORMAT}\", "
                f"got {doc.get('format')!r})"
            )
        if doc.get("version") != VERSION or isinstance(doc.get("version"), bool):
            raise PlanError(
                f"{source}: plan version {doc.get('version')!r} is not supported (this mpsearch "
                f"reads version {VERSION}); upgrade mpsearch or re-create the plan"
            )
        if "bits" not in doc:
            raise PlanError(f"{source}: the plan has no 'bits' mapping")
        try:
            return cls(
                bits=doc["bits"],
                options=doc.get("options") or {},
                predicted=doc.get("predicted") or {},
                provenance=doc.get("provenance") or {},
            )
        except PlanError as exc:
            raise PlanError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> BitPlan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {str(path)!r} does not exist")
        try:
            doc = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{path}: not valid JSON ({exc})") from None
        except (OSError, RecursionError) as exc:
            raise PlanError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
        return cls.from_dict(doc, source=str(path))

    @classmethod
    def uniform(cls, layers, option: Option | str | int, **provenance) -> BitPlan:
        """The same option for every layer (the baseline plans)."""
        opt = parse_option(option)
        names = [getattr(lay, "name", lay) for lay in layers]
        return cls(
            bits={n: opt.bits for n in names},
            options={n: opt.to_dict() for n in names},
            provenance={"solver": "uniform", **provenance},
        )


#: the fields of an option entry this module checks (others, such as a target's, pass through)
OPTION_FIELDS = ("name", "bits", "group_size", "symmetric", "scale_bits")


def _int_field(value, layer: str, field: str, lo: int, hi: int | None, label: str | None = None) -> int:
    """``value`` as an integer in [lo, hi], or a PlanError naming the layer and the field."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and int(value) == value and value >= lo and (hi is None or value <= hi))
    if not ok:
        span = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        label = label or f"option field {field!r}"
        raise PlanError(f"layer {layer!r}: {label} must be an integer {span}, got {value!r}")
    return int(value)


def _check_option(layer: str, opt, bits: int) -> None:
    """Every field of one ``options`` entry, and that its name, bits and format agree."""
    if not isinstance(opt, dict):
        raise PlanError(f"layer {layer!r}: its option must be an object (name, bits, group_size, "
                        f"symmetric), got {opt!r}")
    if "bits" in opt:
        b = _int_field(opt["bits"], layer, "bits", 1, 32)
        if b != bits:
            raise PlanError(f"layer {layer!r} has bits {bits} but its option says {b}")
    if opt.get("group_size") is not None:
        _int_field(opt["group_size"], layer, "group_size", 1, None)
    if "scale_bits" in opt and opt["scale_bits"] is not None:
        _int_field(opt["scale_bits"], layer, "scale_bits", 1, 64)
    if "symmetric" in opt and not isinstance(opt["symmetric"], bool):
        raise PlanError(f"layer {layer!r}: its option field 'symmetric' must be true or false, "
                        f"got {opt['symmetric']!r}")
    name = opt.get("name")
    if name is None:
        return
    if not isinstance(name, str) or not name.strip():
        raise PlanError(f"layer {layer!r}: its option field 'name' must be a non-empty string, got {name!r}")
    try:  # the one option grammar: keep, intB[-gG][-asym], or a consumer format such as q4_K
        named = parse_option(name)
    except MpsearchError as exc:
        raise PlanError(f"layer {layer!r}: its option name {name!r} is not an option: {exc}") from None
    if named.bits != bits:
        raise PlanError(f"layer {layer!r}: its option name {name!r} means {named.bits} bits but the "
                        f"plan gives the layer {bits} bits; fix the name or the bits")
    if "group_size" in opt and opt["group_size"] != named.group_size:
        raise PlanError(f"layer {layer!r}: its option name {name!r} contradicts its group_size "
                        f"{opt['group_size']!r}")
    if "symmetric" in opt and opt["symmetric"] != named.symmetric:
        raise PlanError(f"layer {layer!r}: its option name {name!r} contradicts symmetric="
                        f"{opt['symmetric']!r}")
