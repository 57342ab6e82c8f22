"""Plots for notebooks and the CLI. Plot data is computed apart from drawing; matplotlib is imported
only inside the drawing functions, so ``import mpsearch`` never loads it."""

from __future__ import annotations

from .errors import MpsearchError


def frontier_plot_data(frontier, x: str | None = None, y: str = "damage") -> dict:
    """The arrays a frontier plot draws: ``{"x", "y", "x_label", "y_label", "yerr"}`` (``yerr``:
    the ``damage_std`` column where the frame has one and ``y`` is the damage, else None).

    ``frontier``: a :class:`~mpsearch.frontier.Frontier` or its ``to_frame()``. ``x`` defaults to
    ``avg_bits`` when present, else ``size_bits`` (shown in MB). ``y`` may be a measured column
    (``measured_accuracy``); points without a value are left out.
    """
    frame = frontier.to_frame() if hasattr(frontier, "to_frame") else frontier
    if x is None:
        x = "avg_bits" if "avg_bits" in frame and frame["avg_bits"].notna().any() else "size_bits"
    for col in (x, y):
        if col not in frame:
            raise MpsearchError(f"frontier plot: no column {col!r}; columns: {', '.join(map(str, frame.columns))}")
    err = "damage_std" if y == "damage" and "damage_std" in frame else None
    sub = frame[[x, y] + ([err] if err else [])].dropna(subset=[x, y]).sort_values(x)
    xs = sub[x].to_numpy(dtype=float)
    x_label = {"avg_bits": "average bits per weight", "size_bits": "size (MB)"}.get(x, x)
    if x == "size_bits":
        xs = xs / 8e6
    y_label = "predicted damage" if y == "damage" else y.replace("measured_", "measured ")
    yerr = sub[err].to_numpy(dtype=float) if err else None
    return {"x": xs, "y": sub[y].to_numpy(dtype=float), "x_label": x_label, "y_label": y_label, "yerr": yerr}


def plot_frontier(frontiers, x: str | None = None, y: str = "damage", ax=None, log_y: bool | None = None,
                  title: str | None = None):
    """Draw one frontier, or several (a dict label -> frontier) on one axes; returns the axes.

    The line is a step: each plan holds until the next, larger one. ``log_y`` defaults to True for
    predicted damage spanning more than two decades.
    """
    import matplotlib.pyplot as plt

    if not isinstance(frontiers, dict):
        frontiers = {getattr(frontiers, "solver", "") or "frontier": frontiers}
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    span = 1.0
    for label, fr in frontiers.items():
        d = frontier_plot_data(fr, x, y)
        if not len(d["x"]):
            continue
        ax.step(d["x"], d["y"], where="post", label=label)
        ax.plot(d["x"], d["y"], ".", ms=3, color=ax.lines[-1].get_color())
        if d.get("yerr") is not None:  # the table's damage_std, summed over layers in quadrature
            ax.errorbar(d["x"], d["y"], yerr=d["yerr"], fmt="none", lw=0.8, capsize=2,
                        color=ax.lines[-1].get_color(), alpha=0.7)
        pos = d["y"][d["y"] > 0]
        if len(pos):
            span = max(span, pos.max() / pos.min())
        ax.set_xlabel(d["x_label"])
        ax.set_ylabel(d["y_label"])
    if log_y if log_y is not None else (y == "damage" and span > 100):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if len(frontiers) > 1:
        ax.legend()
    if title:
        ax.set_title(title)
    return ax


def save_frontier_plot(frontiers, path, **kw) -> None:
    """Draw with :func:`plot_frontier` on a non-interactive canvas and save to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ax = plot_frontier(frontiers, **kw)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=120)
    plt.close(ax.figure)


__all__ = ["frontier_plot_data", "plot_frontier", "save_frontier_plot"]


# ---------------------------------------------------------------- measured frontier (pipeline)
def measured_frontier_data(run) -> dict:
    """Plot data of a :class:`mpsearch.pipeline.FrontierRun`: predicted, measured and uniform."""
    f, u = run.frontier, run.uniform
    q = f"measured_{run.metric}"
    val = f[f["validated"]]
    return {
        "predicted": (f["avg_bits"].to_numpy(), f["damage"].to_numpy()),
        "predicted_std": f["damage_std"].to_numpy() if "damage_std" in f else None,
        "measured": (val["avg_bits"].to_numpy(), val[q].to_numpy()),
        "uniform": (u["avg_bits"].to_numpy(), u[q].to_numpy()) if len(u) else None,
        "uniform_labels": list(u["option"]) if len(u) else [],
        "baseline": run.baseline,
        "ylabel": run.metric_label,
    }


def plot_measured_frontier(run, ax=None):
    """Size vs quality: measured plans along the frontier, uniform bit-widths, and (right axis)
    the predicted damage of every frontier point. Returns the figure."""
    import matplotlib.pyplot as plt

    d = measured_frontier_data(run)
    fig = ax.figure if ax is not None else plt.figure(figsize=(7, 4.2))
    ax = ax or fig.add_subplot(111)
    ax.plot(*d["measured"], "o-", color="C0", label="mixed precision (measured)")
    if d["uniform"] is not None:
        ax.plot(*d["uniform"], "s--", color="C3", label="uniform bit-width (measured)")
        for x, y, lab in zip(*d["uniform"], d["uniform_labels"]):
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color="C3")
    ax.axhline(d["baseline"], color="grey", lw=0.8, ls=":", label="full precision")
    ax.set_xlabel("average weight bits (bits/weight, scales included)")
    ax.set_ylabel(d["ylabel"])
    ax2 = ax.twinx()
    ax2.plot(*d["predicted"], ".", color="C2", alpha=0.6, label="predicted damage (right axis)")
    if d.get("predicted_std") is not None:
        ax2.errorbar(*d["predicted"], yerr=d["predicted_std"], fmt="none", color="C2", alpha=0.5, lw=0.8, capsize=2)
    ax2.set_yscale("symlog", linthresh=max(float(min(d["predicted"][1][d["predicted"][1] > 0], default=1e-6)), 1e-12))
    ax2.set_ylabel("predicted damage (estimator units)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
    ax.set_title(f"size / quality frontier (Spearman predicted vs measured: {run.proxy.get('spearman', float('nan')):.2f})",
                 fontsize=9)
    return fig


def plot_plan_bits(plan, table=None, ax=None):
    """A plan's bit-width per layer (bars, in model order), with layer sizes as bar widths' colour."""
    import matplotlib.pyplot as plt
    import numpy as np

    layers = list(table.layers) if table is not None else list(plan.bits)
    bits = [plan.bits[n] for n in layers]
    fig = ax.figure if ax is not None else plt.figure(figsize=(max(6, 0.18 * len(layers)), 3.4))
    ax = ax or fig.add_subplot(111)
    colors = None
    if table is not None and table.layer_params():
        params = np.array([table.layer_params()[n] for n in layers], dtype=float)
        colors = plt.cm.viridis(np.log(params) / np.log(params).max())
    ax.bar(range(len(layers)), bits, color=colors)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=90, fontsize=6)
    ax.set_xlabel("layer (model order; colour: log parameter count)")
    ax.set_ylabel("weight bits")
    avg = plan.predicted.get("avg_bits")
    ax.set_title("per-layer bit-widths" + (f" (average {avg:.2f} bits/weight)" if avg else ""), fontsize=9)
    return fig


def plot_sensitivity(table, column: str = "damage", ax=None):
    """The cost table as a heat map: layers x options, log10 of ``column``."""
    import matplotlib.pyplot as plt
    import numpy as np

    piv = table.pivot(column)
    vals = np.log10(np.clip(piv.to_numpy(dtype=float), 1e-12, None))
    fig = ax.figure if ax is not None else plt.figure(figsize=(4 + 0.4 * len(piv.columns), max(3, 0.16 * len(piv))))
    ax = ax or fig.add_subplot(111)
    im = ax.imshow(vals, aspect="auto", cmap="magma")
    ax.set_yticks(range(len(piv)))
    ax.set_yticklabels(piv.index, fontsize=6)
    ax.set_xticks(range(len(piv.columns)))
    ax.set_xticklabels(piv.columns, fontsize=8)
    ax.set_xlabel("option")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label=f"log10 {column} ({table.metadata.get('estimator', 'estimator')} units)")
    ax.set_title("sensitivity table", fontsize=9)
    return fig
