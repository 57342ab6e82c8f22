"""Coverage: which share of a model's matrix weights a table or plan decides, and what it leaves.

A model's *matrix weights* are its floating-point parameters of two or more dimensions, each counted
once (tied weights are one tensor), biases left aside. Every one of them is

- **planned**: the weight of a layer the table or plan names (a slice of a stacked expert tensor
  plans its expert's share);
- **kept**: a weight the target does not quantize by its own rules (embeddings unless included,
  routers, a tied ``lm_head`` in GGUF, ``lm_head`` for the serving stacks) or a parameter table that
  is not a weight matrix (position embeddings, tokens, bias tables);
- **excluded**: named by the user's ``--exclude``;
- **unplanned**: a layer the target could quantize that the plan does not name, or a weight held by a
  module mpsearch does not understand (a 2-D/3-D parameter of an unknown container).

``share`` is planned / all matrix weights; ``target_share`` is planned / (planned + unplanned), the
share of what the target can quantize. Below ``min_coverage`` (default 1.0: everything the target
can quantize) :meth:`Coverage.check` refuses with one line naming the largest unplanned tensors and
``--exclude``, the flag that accepts leaving them out: a model is never half-planned in silence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .budget import check_patterns
from .errors import MpsearchError
from .layers import discover_layers, weight_tensor
from .moe import scan, split_name
from .targets import get_target

#: parameter names (the last part) that hold tables, not weight matrices
_NOT_WEIGHT = re.compile(r"bias|pos|position|token|embed|relative|rel_|table|sink|scale|norm|gamma|beta|alpha")
#: how many unplanned tensors a report lists
LISTED = 12


@dataclass
class Coverage:
    """The coverage of one table or plan over one model (see the module docstring)."""

    total: int = 0
    planned: int = 0
    kept: int = 0
    excluded: int = 0
    unplanned: int = 0
    entries: list[dict] = field(default_factory=list)  # every tensor not wholly planned, largest first
    target: str = "mpsearch"
    exclude: list[str] = field(default_factory=list)
    min_coverage: float = 1.0

    @property
    def share(self) -> float:
        return self.planned / self.total if self.total else 1.0

    @property
    def target_share(self) -> float:
        return self.planned / (self.planned + self.unplanned) if self.planned + self.unplanned else 1.0

    def summary(self) -> str:
        """One line: the planned share and the largest unplanned tensors by category."""
        text = (f"coverage: plans {self.planned:,} of the model's {self.total:,} matrix weights "
                f"({100 * self.share:.2f}%; {100 * self.target_share:.2f}% of what target "
                f"{self.target!r} can quantize)")
        parts = []
        for cat in ("unplanned", "excluded", "kept"):
            items = [e for e in self.entries if e["category"] == cat]
            if items:
                n = getattr(self, cat)
                reasons = sorted({e["reason"] for e in items}, key=lambda r: -sum(
                    e["params"] for e in items if e["reason"] == r))
                parts.append(f"{cat} {100 * n / max(self.total, 1):.2f}% ({'; '.join(reasons[:3])}"
                             f"{'; ...' if len(reasons) > 3 else ''})")
        return text + (": " + ", ".join(parts) if parts else "")

    def to_dict(self) -> dict:
        return {"matrix_weights": self.total, "planned": self.planned, "share": self.share,
                "target_share": self.target_share, "kept": self.kept, "excluded": self.excluded,
                "unplanned": self.unplanned, "target": self.target, "exclude": list(self.exclude),
                "min_coverage": self.min_coverage, "tensors": self.entries[:LISTED]}

    def check(self) -> Coverage:
        """Refuse (one line) when less than ``min_coverage`` of what the target can quantize is planned."""
        if self.target_share + 1e-12 >= self.min_coverage:
            return self
        bad = [e for e in self.entries if e["category"] == "unplanned"][:4]
        named = ", ".join(f"{e['name']!r} ({e['params']:,} weights: {e['reason']})" for e in bad)
        raise MpsearchError(
            f"only {100 * self.target_share:.2f}% of the weights target {self.target!r} can quantize would be "
            f"planned (at least {100 * self.min_coverage:g}% required); unplanned: {named}"
            f"{' ...' if len([e for e in self.entries if e['category'] == 'unplanned']) > 4 else ''}; "
            f"pass --exclude REGEX for each to accept leaving them out")


def matrix_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's matrix weights by their first name (tied weights once, biases left aside)."""
    out = {}
    for name, p in model.named_parameters():  # remove_duplicate: a tied tensor under its first name
        if p.dim() >= 2 and p.is_floating_point() and not name.rpartition(".")[2].endswith("bias"):
            out[name] = p
    return out


def model_coverage(model: torch.nn.Module, planned, *, target=None, exclude=(),
                   min_coverage: float = 1.0, unnamed_layers: str = "unplanned") -> Coverage:
    """The coverage of the layers named in ``planned`` (a table's or plan's layer names) over
    ``model``, with the rules of ``target`` and the user's ``exclude`` regexes. ``unnamed_layers``:
    how a layer the target could quantize but ``planned`` does not name counts: ``"unplanned"``
    (against the threshold) or ``"kept"`` (a hand-made plan that leaves layers at 16 bits on purpose;
    weights mpsearch does not understand still count against it)."""
    if not isinstance(min_coverage, (int, float)) or not 0 <= float(min_coverage) <= 1:
        raise MpsearchError(f"min_coverage must be a number from 0 to 1, got {min_coverage!r}")
    chosen = get_target(target)
    excl = check_patterns(exclude, "exclude regex")
    weights = matrix_weights(model)
    by_id = {id(p): n for n, p in weights.items()}
    planned = set(planned)
    slices: dict[str, int] = {}  # stacked tensor -> how many of its experts are planned layers of their own
    for name in planned:
        base, index = split_name(name)
        if index is not None:
            slices[base] = slices.get(base, 0) + 1
    known: dict[str, list] = {}  # parameter name -> the discovered layers on it
    for lay in discover_layers(model, include_embedding=True):
        try:
            base = weight_tensor(model, split_name(lay.name)[0])
        except MpsearchError:
            continue
        pname = by_id.get(id(base))
        if pname is not None:
            known.setdefault(pname, []).append(lay)
    moe = scan(model)
    cov = Coverage(target=chosen.name, exclude=[p.pattern for p in excl], min_coverage=float(min_coverage))
    modules = dict(model.named_modules())
    for pname, p in weights.items():
        n = int(p.numel())
        cov.total += n
        layers = known.get(pname, [])
        done = sum(int(p.numel()) if lay.name in planned
                   else slices.get(lay.name, 0) * int(p[0].numel()) if p.dim() == 3 else 0 for lay in layers)
        done = min(done, n)
        cov.planned += done
        rest = n - done
        if rest <= 0:
            continue
        shown = layers[0].name if layers else pname
        if any(rx.search(lay.name) for lay in layers for rx in excl) or any(rx.search(pname) for rx in excl):
            cat, why = "excluded", "--exclude"
        elif layers:
            lay = layers[0]
            why = chosen.unplanned_reason(lay, model)
            if why is None and lay.kind == "embedding":
                why = "embedding: not planned unless included (--include-embedding)"
            cat = "kept" if why is not None or unnamed_layers == "kept" else "unplanned"
            why = why or ("not named by the plan (left at 16 bits)" if unnamed_layers == "kept"
                          else "a layer the target can quantize that the plan does not name")
        else:
            owner = modules.get(pname.rpartition(".")[0])
            leaf = pname.rpartition(".")[2]
            if pname in moe.not_understood:
                cat, why = "unplanned", f"not understood: {moe.not_understood[pname]}"
            elif _NOT_WEIGHT.search(leaf) and leaf != "weight":
                cat, why = "kept", "a parameter table, not a weight matrix"
            else:
                cat = "unplanned"
                why = (f"held by {type(owner).__name__ if owner is not None else '?'}, a module mpsearch "
                       f"does not know how to quantize")
        setattr(cov, cat, getattr(cov, cat) + rest)
        cov.entries.append({"name": shown, "params": rest, "category": cat, "reason": why})
    cov.entries.sort(key=lambda e: (-e["params"], e["name"]))
    return cov


def recorded(metadata) -> dict | None:
    """The coverage recorded in a table's metadata or a plan's provenance (``None`` when absent)."""
    if not isinstance(metadata, dict):
        return None
    cov = metadata.get("coverage")
    if cov is None and isinstance(metadata.get("table"), dict):
        cov = metadata["table"].get("coverage")
    return cov if isinstance(cov, dict) else None


def recorded_summary(metadata) -> str:
    """One line for a table or plan: its recorded coverage, or that it records none."""
    cov = recorded(metadata)
    if cov is None:
        return "coverage: not recorded (a table or plan made without a model, or by an older mpsearch)"
    try:
        return Coverage(total=int(cov["matrix_weights"]), planned=int(cov["planned"]), kept=int(cov["kept"]),
                        excluded=int(cov["excluded"]), unplanned=int(cov["unplanned"]),
                        entries=[dict(t) for t in cov.get("tensors", [])], target=str(cov.get("target"))).summary()
    except (KeyError, TypeError, ValueError):
        return "coverage: the recorded coverage is malformed"


def check_recorded(metadata, min_coverage: float | None = None) -> None:
    """Refuse a table or plan whose recorded coverage is below its (or the given) threshold."""
    cov = recorded(metadata)
    if cov is None:
        return
    try:
        share, need = float(cov["target_share"]), float(cov.get("min_coverage", 1.0))
    except (KeyError, TypeError, ValueError):
        return
    if min_coverage is not None:
        need = float(min_coverage)
    if share + 1e-12 < need:
        bad = [t for t in cov.get("tensors", []) if t.get("category") == "unplanned"][:4]
        raise MpsearchError(
            f"the plan covers only {100 * share:.2f}% of the weights its target can quantize (at least "
            f"{100 * need:g}% required); unplanned: {', '.join(repr(t.get('name')) for t in bad)}; "
            f"re-estimate with --exclude REGEX for each to accept leaving them out")
