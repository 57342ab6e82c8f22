"""Plots for notebooks and the CLI. Plot data is computed apart from drawing; matplotlib is imported
only inside the drawing functions, so ``import mpsearch`` never loads it."""

from __future__ import annotations

from .errors import MpsearchError


def frontier_plot_data(frontier, x: str | None = None, y: str = "damage") -> dict:
    """The arrays a frontier plot draws: ``{"x", "y", "x_label", "y_label"}``.

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
    sub = frame[[x, y]].dropna().sort_values(x)
    xs = sub[x].to_numpy(dtype=float)
    x_label = {"avg_bits": "average bits per weight", "size_bits": "size (MB)"}.get(x, x)
    if x == "size_bits":
        xs = xs / 8e6
    y_label = "predicted damage" if y == "damage" else y.replace("measured_", "measured ")
    return {"x": xs, "y": sub[y].to_numpy(dtype=float), "x_label": x_label, "y_label": y_label}


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
