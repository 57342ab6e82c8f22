"""Budgets: the constraints a plan must meet, and the per-layer bounds and pins.

A constraint is "the sum of a table column <= value". Keys:

- ``avg_bits``: sum(size_bits) / sum(params) <= value (the table needs a ``params`` column);
- ``size_mb``: sum(size_bits) / 8e6 <= value;
- any numeric column of the table (``size_bits``, ``bops``, ``latency``...);
- the consumer's whole file, in the user's words (:mod:`mpsearch.filesize`; the table must carry
  the file model its estimate recorded): ``size=Q4_K_M`` (the exact file of one of the consumer's
  recipes or uniform options for this model: ``size=w4a16-g32``, ``size=q4_0``), ``file=3.2GiB``
  (bytes, with B/KB/MB/GB/KiB/MiB/GiB...), ``bpw=4.5`` (bits per weight of the whole file as
  llama.cpp reports it).

On the command line: ``--budget avg_bits=4 --budget bops=1.2e9``.

Per-layer rules name layers exactly or by regex with a ``re:`` prefix (``re:.*attention.*``), or
``*`` for all layers: ``min_bits``/``max_bits`` bound the bit-width, ``pins`` fix an option (name or
bit-width). ``ties`` are extra tie regexes (see :func:`mpsearch.layers.tie_groups`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .errors import BudgetError, check_patterns, compile_regex  # noqa: F401  (re-exported)
from .filesize import check_file_budget

#: keys that are not table columns
DERIVED_KEYS = ("avg_bits", "size_mb")
#: keys that measure the consumer's whole file (kept as the user wrote them, resolved at solve time)
FILE_KEYS = ("size", "file", "bpw")
#: the largest budget value (larger ones overflow once converted to bits)
MAX_VALUE = 1e300


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise BudgetError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise BudgetError(f"{what}: the value must be finite, got {text!r}")
    if abs(value) > MAX_VALUE:
        raise BudgetError(f"{what}: {text!r} is too large (at most {MAX_VALUE:g}); use smaller units")
    return value


@dataclass
class Budget:
    """Constraints (key -> upper bound) plus per-layer bounds, pins and ties."""

    constraints: dict[str, float] = field(default_factory=dict)
    min_bits: dict[str, int] = field(default_factory=dict)
    max_bits: dict[str, int] = field(default_factory=dict)
    pins: dict[str, str | int] = field(default_factory=dict)
    ties: list[str] = field(default_factory=list)
    file: dict[str, str] = field(default_factory=dict)  # size/file/bpw -> the value as written

    def __post_init__(self):
        if not isinstance(self.file, dict):
            raise BudgetError(f"file budgets must be a mapping of size/file/bpw to a value, got {self.file!r}")
        self.file = {key: check_file_budget(key, value) for key, value in self.file.items()}
        for key, value in self.constraints.items():
            if not isinstance(key, str) or not key:
                raise BudgetError(f"a budget key must be a non-empty string, got {key!r}")
            v = _number(value, f"budget {key}")
            if v < 0:
                raise BudgetError(f"budget {key}={value}: the value must be >= 0")
            self.constraints[key] = v
        if isinstance(self.ties, str) or not all(isinstance(t, str) for t in self.ties):
            raise BudgetError(f"ties must be a list of regexes, got {self.ties!r}")
        check_patterns(self.ties, "tie regex")
        for rule in (self.min_bits, self.max_bits, self.pins):
            for pattern in rule:
                if not isinstance(pattern, str) or not pattern:
                    raise BudgetError(f"a layer pattern must be a non-empty string, got {pattern!r}")
                if pattern.startswith("re:"):
                    compile_regex(pattern[3:], f"layer pattern {pattern!r}:")

    # ----------------------------------------------------------------- parsing
    @classmethod
    def parse(
        cls,
        budgets=(),
        *,
        min_bits=(),
        max_bits=(),
        pins=(),
        ties=(),
    ) -> Budget:
        """Build a budget from CLI strings.

        ``budgets``: ``"KEY=VALUE"`` items (``avg_bits=4``, ``size_mb=12.5``, ``bops=3e9``).
        ``min_bits``/``max_bits``: ``"BITS"`` (all layers) or ``"PATTERN=BITS"``.
        ``pins``: ``"PATTERN=OPTION"`` (``lm_head=keep``, ``re:.*embed.*=8``).
        """
        constraints, file = {}, {}
        for item in budgets:
            key, value = _split(item, "--budget", "avg_bits=4")
            if key in FILE_KEYS:
                file[key] = value
            else:
                constraints[key] = _number(value, f"--budget {item}")
        return cls(
            constraints=constraints,
            file=file,
            min_bits=_bit_rules(min_bits, "--min-bits"),
            max_bits=_bit_rules(max_bits, "--max-bits"),
            pins=dict(_split(p, "--pin", "lm_head=keep") for p in pins),
            ties=list(ties),
        )

    def to_dict(self) -> dict:
        out = {
            "constraints": dict(self.constraints),
            "min_bits": dict(self.min_bits),
            "max_bits": dict(self.max_bits),
            "pins": dict(self.pins),
            "ties": list(self.ties),
        }
        if self.file:
            out["file"] = dict(self.file)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Budget:
        return cls(**{k: d[k] for k in ("constraints", "min_bits", "max_bits", "pins", "ties", "file") if k in d})

    def with_constraints(self, **constraints) -> Budget:
        """A copy with some constraints replaced (used by frontier sweeps)."""
        d = self.to_dict()
        d["constraints"].update(constraints)
        return Budget.from_dict(d)

    def __str__(self) -> str:
        parts = [f"{k}<={v:g}" for k, v in self.constraints.items()]
        parts += [f"{k}<={v}" for k, v in self.file.items()]
        parts += [f"min_bits[{k}]={v}" for k, v in self.min_bits.items()]
        parts += [f"max_bits[{k}]={v}" for k, v in self.max_bits.items()]
        parts += [f"pin[{k}]={v}" for k, v in self.pins.items()]
        return ", ".join(parts) or "unconstrained"


def _split(item: str, flag: str, example: str) -> tuple[str, str]:
    if not isinstance(item, str) or "=" not in item:
        raise BudgetError(f"{flag} {item!r}: write KEY=VALUE, for example {flag} {example}")
    key, _, value = item.rpartition("=")
    key, value = key.strip(), value.strip()
    if not key or not value:
        raise BudgetError(f"{flag} {item!r}: write KEY=VALUE, for example {flag} {example}")
    return key, value


def _bit_rules(items, flag: str) -> dict[str, int]:
    rules = {}
    for item in items:
        if isinstance(item, str) and "=" not in item:
            pattern, value = "*", item
        else:
            pattern, value = _split(item, flag, "re:.*embed.*=8")
        try:
            bits = int(value)
        except ValueError:
            raise BudgetError(f"{flag} {item!r}: the bit-width must be an integer") from None
        if not 1 <= bits <= 32:
            raise BudgetError(f"{flag} {item!r}: the bit-width must be from 1 to 32 (16 = keep)")
        rules[pattern] = bits
    return rules


def matches(pattern: str, layer: str) -> bool:
    """Does a per-layer rule pattern (exact name, ``re:REGEX`` or ``*``) apply to ``layer``?"""
    if pattern == "*":
        return True
    if pattern.startswith("re:"):
        return re.search(pattern[3:], layer) is not None
    return pattern == layer
