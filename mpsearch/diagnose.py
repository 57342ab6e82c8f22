"""What a cost table says about itself that a user must know before trusting a plan made from it.

- **Free options**: an option whose damage is zero (or about zero: at most ``1e-6`` of the layer's
  largest damage) on every layer that offers it. The likely cause is the *source grid*: weights
  dequantized from a quantized file (a Q4_1 GGUF) lie on that format's grid already, so the format
  re-quantizes them at no loss, looks free, and every plan picks it. :class:`DamageWarning` says so.
- **Non-monotone damage**: a layer whose option of larger size has *more* damage than a smaller one
  (``int4`` 0.0201 > ``int3`` 0.0140): estimator noise or a format that suits the layer badly. Per
  layer in the table's metadata (``non_monotone``) and counted in the summaries; a solver never
  picks the dominated option, and ``--monotone`` on ``solve`` and ``frontier`` (:func:`monotone_fit`,
  ``monotone=True`` in :func:`~mpsearch.measured.measured_frontier`) fits the damage to a
  non-increasing function of size first.

:func:`annotate` writes both into the table's metadata (every estimator calls it) and warns.
"""

from __future__ import annotations

import warnings

import numpy as np

from .sources import source_grid_message

#: an option's damage counts as zero at most this fraction of the layer's largest damage
ZERO = 1e-6
#: a larger option's damage must exceed a smaller one's by this fraction to be flagged
SLACK = 1e-6


class DamageWarning(UserWarning):
    """A cost table's damage that a plan would silently follow: a free option."""


def _rounded(frame):
    """The rows of options that round (16-bit ``keep`` costs nothing by definition)."""
    return frame[frame["bits"] < 16]


def zero_damage_options(table) -> dict:
    """option -> layers that offer it, for each option whose damage is about zero on every one of
    them while some other option of the table costs something."""
    frame = _rounded(table.frame)
    if not len(frame) or not (frame["damage"] > 0).any():
        return {}
    scale = frame.groupby("layer")["damage"].transform("max")
    tiny = frame["damage"] <= ZERO * scale
    out = {}
    for opt, rows in frame.assign(_tiny=tiny).groupby("option", sort=False):
        if rows["_tiny"].all():
            out[str(opt)] = int(rows["layer"].nunique())
    return out


def non_monotone(table) -> dict:
    """layer -> ``[{option, damage, smaller, smaller_damage}]``: each option with more damage than an
    option of smaller size on the same layer (the smaller one of least damage is named)."""
    out = {}
    frame = _rounded(table.frame)
    for layer, rows in frame.groupby("layer", sort=False):
        rows = rows.sort_values(["size_bits", "damage"], kind="stable")
        sizes, dmg, names = (rows[c].to_numpy() for c in ("size_bits", "damage", "option"))
        found = []
        for j in range(len(rows)):
            smaller = np.flatnonzero(sizes < sizes[j])
            if not len(smaller):
                continue
            best = smaller[np.argmin(dmg[smaller])]
            if dmg[j] > dmg[best] * (1 + SLACK) and dmg[j] - dmg[best] > 0:
                found.append({"option": str(names[j]), "damage": float(dmg[j]),
                              "smaller": str(names[best]), "smaller_damage": float(dmg[best])})
        if found:
            out[str(layer)] = found
    return out


def zero_damage_message(table, free: dict) -> str:
    grid = table.metadata.get("source_grid")
    names = ", ".join(f"{o!r} ({n} layers)" for o, n in free.items())
    cause = ("the weights likely already lie on its grid (a model dequantized from a quantized file: "
             "the source grid)")
    if grid:

        cause = "the model's weights already lie on a grid: " + source_grid_message(grid).split(": ", 1)[0]
    return (f"option(s) {names} cost zero damage on every layer: {cause}; such an option looks free, every "
            f"plan takes it and its measured quality says nothing of a real checkpoint. Drop it (--bits "
            f"without it) or plan from a 16-bit checkpoint")


def non_monotone_line(table) -> str | None:
    """One line for a summary: how many layers have more damage at a larger option, or ``None``."""
    fit = table.metadata.get("monotone_fit")
    if fit is not None:
        return (f"monotone fit: {fit['rows_changed']} rows of the table changed so that each layer's damage falls "
                f"with size (--monotone)")
    bad = table.metadata.get("non_monotone")
    if bad is None:
        bad = non_monotone(table)
    if not bad:
        return None
    worst = max(((lay, e) for lay, es in bad.items() for e in es),
                key=lambda le: le[1]["damage"] / max(le[1]["smaller_damage"], 1e-300))
    lay, e = worst
    return (f"non-monotone damage: {len(bad)} of {len(table.layers)} layers have more damage at a larger option "
            f"(worst: {lay} {e['option']} {e['damage']:.4g} > {e['smaller']} {e['smaller_damage']:.4g}); "
            f"listed in the table's metadata 'non_monotone'; --monotone (solve, frontier) fits each layer's damage "
            f"to fall with size")


def annotate(table, *, warn: bool = True):
    """Record :func:`non_monotone` and :func:`zero_damage_options` in ``table.metadata`` (in place)
    and warn (:class:`DamageWarning`) of free options. Returns the table."""
    table.metadata["non_monotone"] = non_monotone(table)
    free = zero_damage_options(table)
    table.metadata["zero_damage_options"] = free
    if free and warn:
        warnings.warn(zero_damage_message(table, free), DamageWarning, stacklevel=3)
    return table


# --------------------------------------------------------------------------- the monotone fit
def _pava_decreasing(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares fit of ``y`` (ordered) by a non-increasing sequence (pool adjacent
    violators)."""
    vals, wts, counts = [], [], []
    for yi, wi in zip(y.astype(float), w.astype(float)):
        vals.append(yi)
        wts.append(wi)
        counts.append(1)
        while len(vals) > 1 and vals[-2] < vals[-1]:
            v, wv, c = vals.pop(), wts.pop(), counts.pop()
            tot = wts[-1] + wv
            vals[-1] = (vals[-1] * wts[-1] + v * wv) / tot
            wts[-1] = tot
            counts[-1] += c
    return np.repeat(vals, counts)


def monotone_fit(table):
    """A copy of ``table`` whose damage falls (weakly) with size on every layer: per layer, the
    weighted least-squares non-increasing fit of damage ordered by ``size_bits`` (isotonic
    regression, pool adjacent violators; options of equal size keep their order by damage, so
    they are fitted as one level only if they violate). 16-bit ``keep`` rows stay as they are. The
    metadata records ``monotone_fit`` with the rows changed."""
    frame = table.frame.copy()
    changed = 0
    rounding = frame["bits"] < 16
    for _layer, idx in frame[rounding].groupby("layer", sort=False).groups.items():
        rows = frame.loc[idx].sort_values(["size_bits", "damage"], ascending=[True, False], kind="stable")
        fit = _pava_decreasing(rows["damage"].to_numpy(), np.ones(len(rows)))
        fit = np.maximum(fit, 0.0)
        diff = ~np.isclose(fit, rows["damage"].to_numpy(), rtol=1e-12, atol=0)
        changed += int(diff.sum())
        frame.loc[rows.index, "damage"] = fit
    return table.with_frame(frame, monotone_fit={"rows_changed": changed}, non_monotone={})
