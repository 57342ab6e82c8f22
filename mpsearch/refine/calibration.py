"""``method="calibrate"``: per-group damage multipliers fitted to measured losses (NNLS; HIGGS's
linearity), the table rescaled and the budget solved again."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import MpsearchError
from ..table import CostTable


def layer_type(name: str) -> str:
    """The layer's type: its name with the block indices dropped (``model.layers.3.mlp.up_proj`` ->
    ``model.layers.*.mlp.up_proj``)."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


def _group_of(table: CostTable, groups) -> dict[str, str]:
    if groups == "type":
        return {n: layer_type(n) for n in table.layers}
    if groups == "layer":
        return {n: n for n in table.layers}
    if groups == "one":
        return {n: "all" for n in table.layers}
    if callable(groups):
        return {n: str(groups(n)) for n in table.layers}
    raise MpsearchError(f"calibration groups must be 'type', 'layer', 'one' or a callable, got {groups!r}")


def plan_features(table: CostTable, plans, group_of: dict[str, str]) -> tuple[np.ndarray, list[str]]:
    """``[n_plans, n_groups]``: each group's predicted damage summed over its layers under each plan."""
    names = list(dict.fromkeys(group_of[n] for n in table.layers))
    gi = {g: j for j, g in enumerate(names)}
    dmg = table.frame.set_index(["layer", "option"])["damage"]
    x = np.zeros((len(plans), len(names)))
    for r, plan in enumerate(plans):
        for layer in table.layers:
            x[r, gi[group_of[layer]]] += float(dmg[(layer, plan.option_name(layer))])
    return x, names


@dataclass
class Calibration:
    """Fitted multipliers, group by group, and the fit's residual."""

    multipliers: dict[str, float]
    group_of: dict[str, str]
    residual: float
    plans: int

    def apply(self, table: CostTable) -> CostTable:
        """The table with each layer's damage (and ``damage_std``) scaled by its group's multiplier."""
        f = table.to_frame()
        scale = f["layer"].map(lambda n: self.multipliers[self.group_of[n]]).to_numpy(dtype=float)
        for col in [c for c in f.columns if c.startswith("damage")]:
            f[col] = f[col].to_numpy(dtype=float) * scale
        meta = dict(table.metadata)
        meta["calibration"] = {"multipliers": self.multipliers, "plans": self.plans, "residual": self.residual}
        return CostTable(f, meta)


def calibrate(table: CostTable, plans, losses, *, groups="type", ridge: float = 1e-3) -> Calibration:
    """Fit per-group damage multipliers ``a_g >= 0`` so that ``sum_g a_g t_g(plan)`` matches the
    measured ``losses`` of ``plans`` (non-negative least squares; ``ridge`` pulls each multiplier
    toward the single best scalar, relative to the data's scale; ``ridge=0``: plain NNLS)."""
    from scipy.optimize import nnls

    plans, y = list(plans), np.asarray(losses, dtype=float)
    if len(plans) != len(y) or not len(plans):
        raise MpsearchError(f"calibrate needs one measured loss per plan, got {len(plans)} plans and {len(y)} losses")
    if not np.all(np.isfinite(y)):
        raise MpsearchError("calibrate: the measured losses must be finite numbers")
    if ridge < 0:
        raise MpsearchError(f"calibrate: ridge must be >= 0, got {ridge}")
    group_of = _group_of(table, groups)
    x, names = plan_features(table, plans, group_of)
    tot = x.sum(axis=1)
    scalar = float(max(tot @ y, 0.0) / (tot @ tot)) if tot @ tot > 0 else 1.0
    a, rhs = x, y
    if ridge > 0:
        lam = np.sqrt(ridge * float((x ** 2).sum()) / len(names))
        a = np.vstack([x, lam * np.eye(len(names))])
        rhs = np.concatenate([y, lam * scalar * np.ones(len(names))])
    alpha, _ = nnls(a, rhs, maxiter=50 * max(len(names), 10))
    resid = float(np.linalg.norm(x @ alpha - y))
    return Calibration({g: float(v) for g, v in zip(names, alpha)}, group_of, resid, len(plans))
