"""``output-distance``'s statistics across calibration batches, and its stopping rule.

Per-batch statistics: every (batch, layer, option) distance is kept until the end; the table's
``damage`` is their mean weighted by batch size (samples, so tokens for equal-length windows) and its
``damage_std`` column the standard error of that mean: ``sqrt(v / (B - 1))``, ``v`` the weighted
variance of the B per-batch values (the usual ``s / sqrt(B)`` when the batches are of one size; 0 with
one batch). :func:`batch_statistics` is the one definition.

Stopping rule (``stop_when_stable=X``, a fraction of the weights): the batches are measured in order and
after each one (the stop comes at batch ``stable_from`` at the earliest), the plans at the target sizes are solved from the mean so
far and from :data:`RESAMPLES` bootstrap resamples of the batches measured so far (batches drawn with
replacement, a fixed seed per batch count). The agreement at a size is the mean share of the planned
weights whose option in a resample's plan equals the mean's; the estimate stops as soon as the
agreement at every size has been at least X after :data:`STREAK` batches in a row: more batches would
move the plan less than the batches seen so far already disagree. (One check alone is fooled by
chance: two equally sensitive layers whose running means drift apart for a while look settled. On 20
synthetic ties of 40 batches, experiments/calib_size.md, one check stopped 11 and 7 times at 0.95 and
0.99, two in a row 5 and 0; resamples of fewer than about 6 batches are over-confident too, hence
``stable_from``, 8 by default.) The target sizes (``stable_sizes``, in average bits per planned weight) default
to the sizes of the uniform plans of the table's options, all but the cheapest and the dearest (the
plans there have no choice; with fewer than three options the size half-way between them). The plans
are the greedy solver's (:func:`mpsearch.problem.greedy_choice`: milliseconds per plan; ties honoured).
The table's metadata records what happened (``stability``: batches and samples used of those given,
the reason, the agreement per size after every batch, the plan's change from the previous batch), and
one line says it. With ``micro_batch`` the batches are its pieces.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
import torch

from ..errors import MpsearchError
from ..layers import _batch_size
from ..options import KEEP_BITS
from ..problem import compile_problem, Constraint, greedy_choice

#: bootstrap resamples per check (fixed: the rule's cost is RESAMPLES greedy plans per size and batch)
RESAMPLES = 16
#: checks in a row that must reach the agreement before the estimate stops
STREAK = 2


class Sizes:
    """A setting's constraint: a non-empty tuple of positive average bit widths."""

    def accepts(self, value) -> bool:
        return (isinstance(value, tuple) and len(value) > 0
                and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                        for v in value))

    def __str__(self) -> str:
        return "a non-empty tuple of average bit widths > 0"

    def bad_value(self):
        return (4.0, -1.0)


def batch_statistics(values: torch.Tensor, sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, stderr)`` over the first axis of ``values`` (``[B, L, K]`` float64), batch ``b``
    weighted by ``sizes[b]``: the mean added up in batch order (as one process adds them), the
    standard error from the weighted variance (the module doc)."""
    B = values.shape[0]
    sums = torch.zeros(values.shape[1:], dtype=torch.float64)
    for bi in range(B):  # batches in order, as one process adds them
        sums += float(sizes[bi]) * values[bi]
    weight = float(sum(float(s) for s in sizes))
    mean = sums / max(weight, 1e-300)
    wb = torch.tensor([float(s) for s in sizes], dtype=torch.float64)[:, None, None]
    var = (wb * (values - mean) ** 2).sum(0) / max(weight, 1e-300)  # across batches
    std = (var / (B - 1)).sqrt() if B > 1 else torch.zeros_like(mean)
    return mean, std


class StableStop:
    """The stopping rule of one estimate (the module doc): :meth:`after_batch` says whether to stop.

    ``table``: the estimate's table (its layers, options, sizes, groups; the damage is not read);
    ``options``: the option names of the damage arrays' columns, in their order (the estimator's)."""

    def __init__(self, table, options, *, agreement: float, min_batches: int, sizes=None, seed: int = 0):
        problem = compile_problem(table)
        index = {name: i for i, name in enumerate(table.layers)}
        self.members = np.zeros((problem.n_items, len(table.layers)))
        for j, names in enumerate(problem.items):
            self.members[j, [index[n] for n in names]] = 1.0
        params = table.layer_params()
        params = np.array([float(params[n]) for n in table.layers])
        self.params = self.members @ params
        self.problem, self.total = problem, float(params.sum())
        self.columns = [problem.option_names.index(o) for o in options]
        self.caps = self._caps(sizes)
        self.agreement, self.min_batches, self.seed = float(agreement), int(min_batches), int(seed)
        self.curve: list[dict] = []
        self.stopped, self.streak = False, 0
        self._last = None

    def _caps(self, sizes) -> list[float]:
        p = self.problem
        size = p.resources["size_bits"]
        if sizes is None:
            idx = np.arange(p.n_items)
            keep = set(np.flatnonzero(p.option_bits >= KEEP_BITS).tolist())
            uni = sorted({float(size[idx, c].sum()) for k, c in enumerate(p.uniform_choices()) if k not in keep})
            caps = uni[1:-1] or [(uni[0] + uni[-1]) / 2]
        else:
            caps = [float(s) * self.total for s in sizes]
        least = float(np.where(p.allowed, size, np.inf).min(axis=1).sum())
        low = [c for c in caps if c < least * (1 - 1e-12)]
        if low:
            raise MpsearchError(f"stable_sizes: {low[0] / self.total:.4g} bits per weight is below the smallest "
                                f"plan the options allow ({least / self.total:.4g}); give larger sizes")
        return caps

    def plans(self, damage: np.ndarray) -> list[np.ndarray]:
        """The greedy plan (option per item) at every target size for a ``[L, K]`` damage."""
        p = self.problem
        full = np.zeros((damage.shape[0], p.n_options))
        full[:, self.columns] = np.nan_to_num(damage)
        items = np.where(p.allowed, self.members @ full, np.inf)
        out = []
        for cap in self.caps:
            con = Constraint("size_bits", "size_bits", cap)
            out.append(greedy_choice(dataclasses.replace(p, damage=items, constraints=[con])))
        return out

    def _share(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(self.params[a == b].sum() / max(self.params.sum(), 1e-300))

    def after_batch(self, values: torch.Tensor, sizes) -> bool:
        """Record the agreement after the ``len(values)`` batches measured so far (``[b, L, K]`` on
        the host); True when the estimate should stop here."""
        b = values.shape[0]
        mean = batch_statistics(values, sizes)[0].clamp(min=0).numpy()
        base = self.plans(mean)
        changed = None if self._last is None else 1 - min(self._share(x, y) for x, y in zip(base, self._last))
        self._last = base
        if b < 2:
            return False
        rng = np.random.default_rng([self.seed, b])
        w = torch.tensor([float(s) for s in sizes], dtype=torch.float64)
        agree = np.zeros(len(self.caps))
        for _ in range(RESAMPLES):
            pick = torch.from_numpy(rng.integers(0, b, b))
            ww = w[pick]
            damage = ((ww[:, None, None] * values[pick]).sum(0) / ww.sum()).clamp(min=0).numpy()
            agree += [self._share(x, y) for x, y in zip(self.plans(damage), base)]
        agree /= RESAMPLES
        self.curve.append({"batches": b, "samples": int(sum(sizes)), "agreement": round(float(agree.min()), 6),
                           "per_size": [round(float(a), 6) for a in agree],
                           "changed": None if changed is None else round(changed, 6)})
        self.streak = self.streak + 1 if agree.min() >= self.agreement else 0
        self.stopped = b >= self.min_batches and self.streak >= STREAK
        return self.stopped

    def record(self, used: int, batches) -> dict:
        """The table's ``stability`` metadata after ``used`` of ``batches`` were measured."""
        last = self.curve[-1]["agreement"] if self.curve else None
        given = len(batches)
        if self.stopped:
            reason = (f"stable: agreement {last:.4f} >= {self.agreement:g} at {STREAK} batches in a row, after "
                      f"{used} of {given} batches")
        elif used < max(self.min_batches, 2):
            reason = f"all {given} batch(es) used: fewer than stable_from={self.min_batches}"
        else:
            reason = f"all {given} batches used: agreement {last:.4f} < {self.agreement:g}, not yet stable"
        return {"stopped": self.stopped, "reason": reason, "batches_used": used, "batches_given": given,
                "samples_used": int(sum(_batch_size(b) for b in batches[:used])),
                "samples_given": int(sum(_batch_size(b) for b in batches)),
                "agreement": last, "agreement_needed": self.agreement, "stable_from": self.min_batches,
                "sizes_avg_bits": [round(c / self.total, 6) for c in self.caps], "solver": "greedy",
                "resamples": RESAMPLES, "streak": STREAK, "curve": self.curve}

    def line(self, record: dict) -> str:
        sizes = ", ".join(f"{s:.3g}" for s in record["sizes_avg_bits"])
        if record["stopped"]:
            return (f"output-distance: the plans at {sizes} bits per weight were stable after {record['batches_used']} "
                    f"of {record['batches_given']} batches ({record['samples_used']} samples; bootstrap agreement "
                    f"{record['agreement']:.1%} of the weights >= {self.agreement:.0%}): stopped there")
        return (f"output-distance: the plans at {sizes} bits per weight were not yet stable after all "
                f"{record['batches_given']} batches ({record['reason']}); more calibration data would move them")
