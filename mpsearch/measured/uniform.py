"""Step 4 of the measured path: each measured mixed plan against the measured uniform plans."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .result import UniformWarning

#: relative size difference within which a uniform plan counts as "of equal size": a plan solved at
#: a uniform plan's size comes out a few bits smaller (SmolLM2 at int4-asym's size: 4.030402 against
#: 4.030439 bits per weight, 9e-6 apart) and must be compared with that uniform plan, not the next
#: smaller one. 1e-3 is 0.004 bits per weight at 4 bits; a uniform plan up to that much larger is a
#: harder comparison for the mixed plan, never an easier one.
EQUAL_SIZE_RTOL = 1e-3


def compare_with_uniform(frame: pd.DataFrame, uniform: pd.DataFrame, size: str = "measured_size_bits",
                         loss: str = "measured_loss", rtol: float = EQUAL_SIZE_RTOL) -> pd.DataFrame:
    """Each measured row of ``frame`` against the measured uniform plans (``uniform``: ``size_bits``,
    ``measured_loss``, ``option``).

    Adds ``uniform_at_size`` (the best uniform option of equal or smaller size: at most ``rtol``
    larger, relatively), its ``uniform_loss``, ``beats_uniform`` (measured loss at most that
    uniform's; True where no uniform plan is as small), and ``vs_uniform_line`` (measured loss
    minus the straight line between the two neighbouring uniform points at this size; negative =
    better; NaN outside their range).
    """
    out = frame.copy()
    u = uniform.dropna(subset=["measured_loss"]).sort_values("size_bits") if len(uniform) else uniform
    at, uloss, beats, line = [], [], [], []
    for s, lo in zip(out[size], out[loss]):
        if not np.isfinite(lo) or not len(u):
            at.append("")
            uloss.append(np.nan)
            beats.append(None)
            line.append(np.nan)
            continue
        fit = u[u["size_bits"] <= s * (1 + rtol)]
        if len(fit):
            best = fit.loc[fit["measured_loss"].idxmin()]
            at.append(str(best["option"]))
            uloss.append(float(best["measured_loss"]))
            beats.append(bool(lo <= best["measured_loss"] + 1e-12))
        else:
            at.append("")
            uloss.append(np.nan)
            beats.append(True)
        xs, ys = u["size_bits"].to_numpy(float), u["measured_loss"].to_numpy(float)
        inside = len(xs) >= 2 and xs[0] <= s <= xs[-1]
        line.append(float(lo - np.interp(s, xs, ys)) if inside else np.nan)
    out["uniform_at_size"], out["uniform_loss"] = at, uloss
    out["beats_uniform"], out["vs_uniform_line"] = beats, line
    return out


def warn_losers(front: pd.DataFrame, metric_label: str, uniform: pd.DataFrame | None = None) -> list[str]:
    """A :class:`UniformWarning` for each measured mixed plan that lost to its uniform plan (or
    consumer recipe: ``uniform``'s ``kind`` tells them apart); the messages."""
    kinds = uniform.set_index("option")["kind"].to_dict() if uniform is not None and "kind" in uniform else {}
    msgs = []
    for _, r in front[front["beats_uniform"].eq(False)].iterrows():
        name = r["uniform_at_size"]
        what = f"the consumer's recipe {name}" if kinds.get(name) == "recipe" else f"uniform {name}"
        msgs.append(f"the mixed plan at {r['avg_bits']:.3f} bits/weight measured worse ({metric_label} loss "
                    f"{r['measured_loss']:.4g}) than {what} (loss {r['uniform_loss']:.4g}) "
                    f"of equal or smaller size: the recommendation there falls back to the better plan")
    for m in msgs:
        warnings.warn(m, UniformWarning, stacklevel=4)
    return msgs


def uniform_check(front: pd.DataFrame, losers: list[str]) -> dict:
    """Counts of validated mixed plans that beat or lose to uniform, and the warnings."""
    counts = front["beats_uniform"].map({True: "beats_uniform", False: "loses"}).value_counts()
    return {"validated": int(front["validated"].sum()), "warnings": losers,
            **counts.reindex(["beats_uniform", "loses"], fill_value=0).astype(int).to_dict()}
