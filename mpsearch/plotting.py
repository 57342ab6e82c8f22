"""Plots for notebooks and the CLI. Plot data is computed apart from drawing; matplotlib is imported
only inside the drawing functions, so ``import mpsearch`` never loads it."""

from __future__ import annotations

import contextlib
import math

from .errors import MpsearchError

_HEADLESS = [False]


@contextlib.contextmanager
def headless():
    """Figures made inside are plain ``matplotlib.figure.Figure`` objects, not pyplot's: for files
    written by the library, which must neither switch a notebook's backend (``matplotlib.use``) nor
    leave figures for it to show."""
    _HEADLESS[0], saved = True, _HEADLESS[0]
    try:
        yield
    finally:
        _HEADLESS[0] = saved


def _figure(figsize):
    if _HEADLESS[0]:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        FigureCanvasAgg(fig)  # a renderer of its own (text sizes for label placement, savefig)
        return fig
    import matplotlib.pyplot as plt

    return plt.figure(figsize=figsize)


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
    if not isinstance(frontiers, dict):
        frontiers = {getattr(frontiers, "solver", "") or "frontier": frontiers}
    if ax is None:
        ax = _figure((6, 4)).add_subplot(111)
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
    """Draw with :func:`plot_frontier` on a figure of its own (no pyplot: a notebook's backend and
    figures are left alone) and save it to ``path``."""
    with headless():
        ax = plot_frontier(frontiers, **kw)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=120)


__all__ = ["frontier_plot_data", "plot_frontier", "save_frontier_plot"]


# ---------------------------------------------------------------- measured frontier (pipeline)
#: the measured frontier's figure: size in inches and the axes' box in it (fractions), for label placement
FRONTIER_FIGSIZE = (7.5, 4.6)
_AXES_BOX = (0.11, 0.12, 0.76, 0.78)  # left, bottom, width, height
_LABEL_PT = 7  # label font size (points)


def measured_frontier_data(run) -> dict:
    """Plot data of a :class:`mpsearch.measured.FrontierRun`, computed apart from drawing.

    ``measured``: the validated mixed plans (x = bits per weight, y = the metric), sorted by size;
    ``uniform``: the uniform options (and a consumer's one-type recipes: llama.cpp's ``pure-*``) as
    one line sorted by size; ``recipes``: a consumer's mixes (Q4_K_M...) as markers; their
    ``*_labels`` name each point (``a = b`` where a recipe is the same plan as another);
    ``predicted``: every frontier point's predicted damage (right axis); ``labels``: where each
    uniform and recipe label goes (:func:`place_labels`: no two overlap, none covers a marker);
    ``log_y``: a quality that falls over decades (KL divergence) is drawn on a log scale.
    """
    import numpy as np

    f, u = run.frontier, run.uniform
    q = f"measured_{run.metric}"
    val = f[f["validated"]].dropna(subset=[q]).sort_values("avg_bits")
    kinds = u["kind"] if "kind" in u else None
    rows = u.dropna(subset=[q]) if len(u) else u

    def part(kind):
        sub = rows if kinds is None and kind == "uniform" else rows[rows.get("kind", "uniform") == kind] \
            if len(rows) else rows
        sub = sub.sort_values("avg_bits") if len(sub) else sub
        names = [o + (f" = {a}" if isinstance(a, str) and a else "")
                 for o, a in zip(sub.get("option", []), sub.get("same_as", [""] * len(sub)))]
        return (sub["avg_bits"].to_numpy(float), sub[q].to_numpy(float)) if len(sub) else None, names

    uniform, uniform_labels = part("uniform")
    recipes, recipe_labels = part("recipe") if kinds is not None else (None, [])
    ys = np.concatenate([val[q].to_numpy(float)] + [p[1] for p in (uniform, recipes) if p is not None])
    log_y = bool(not run.higher_is_better and len(ys) and (ys > 0).all() and ys.max() / ys.min() > 50)
    xs = np.concatenate([val["avg_bits"].to_numpy(float)] + [p[0] for p in (uniform, recipes) if p is not None])
    limits = _limits(xs, np.concatenate([ys, [run.baseline]]) if not log_y else ys, log_y)
    points = [(x, y) for p in (uniform, recipes, (val["avg_bits"].to_numpy(float), val[q].to_numpy(float)))
              if p is not None for x, y in zip(*p)]
    named = [(x, y, t) for p, names in ((uniform, uniform_labels), (recipes, recipe_labels)) if p is not None
             for x, y, t in zip(*p, names)]
    lines = [p for p in ((val["avg_bits"].to_numpy(float), val[q].to_numpy(float)), uniform) if p is not None]
    dmg = f["damage"].to_numpy(float)
    return {
        "predicted": (f["avg_bits"].to_numpy(float), dmg),
        "predicted_std": f["damage_std"].to_numpy(float) if "damage_std" in f else None,
        "measured": (val["avg_bits"].to_numpy(float), val[q].to_numpy(float)),
        "uniform": uniform, "uniform_labels": uniform_labels,
        "recipes": recipes, "recipe_labels": recipe_labels,
        "baseline": run.baseline, "ylabel": run.metric_label, "log_y": log_y, "limits": limits,
        "labels": place_labels(named, points, limits, log_y, lines=lines), "named": named, "points": points,
        "lines": lines,
        "title": f"size / quality frontier (Spearman predicted vs measured: "
                 f"{run.proxy.get('spearman', float('nan')):.2f})",
    }


def _limits(xs, ys, log_y: bool) -> tuple:
    """``(x0, x1, y0, y1)``: the data range with margins (room above for labels)."""
    import numpy as np

    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    ys = ys[np.isfinite(ys)]
    if not len(xs) or not len(ys):
        return (0.0, 1.0, 0.0, 1.0)
    x0, x1 = float(xs.min()), float(xs.max())
    pad = max(x1 - x0, 0.5) * 0.06
    if log_y:
        lo, hi = math.log10(ys.min()), math.log10(ys.max())
        span = max(hi - lo, 0.5)
        return (x0 - pad, x1 + pad * 2, 10 ** (lo - 0.08 * span), 10 ** (hi + 0.15 * span))
    lo, hi = float(ys.min()), float(ys.max())
    span = max(hi - lo, abs(hi) * 1e-3, 1e-12)
    return (x0 - pad, x1 + pad * 2, lo - 0.08 * span, hi + 0.15 * span)


def _to_points(x, y, limits, log_y):
    """Data coordinates -> points from the axes' lower-left corner, for the frontier figure's size and
    axes box (the geometry :func:`measured_frontier_data` plans its labels with; the drawing measures
    its own axes and text)."""
    x0, x1, y0, y1 = limits
    w = FRONTIER_FIGSIZE[0] * 72 * _AXES_BOX[2]
    h = FRONTIER_FIGSIZE[1] * 72 * _AXES_BOX[3]
    fx = (x - x0) / (x1 - x0)
    if log_y:
        fy = (math.log10(y) - math.log10(y0)) / (math.log10(y1) - math.log10(y0))
    else:
        fy = (y - y0) / (y1 - y0)
    return fx * w, fy * h


def _text_size(text: str) -> tuple[float, float]:
    """An estimate of a label's size in points (DejaVu Sans at ``_LABEL_PT``)."""
    return 0.62 * _LABEL_PT * len(text), _LABEL_PT * 1.25


def label_box(px, py, dx, dy, size, ha):
    """The box (points: x0, y0, x1, y1) a label of ``size`` (w, h) takes at offset ``(dx, dy)``."""
    left = px + dx - (size[0] if ha == "right" else 0)
    return (left, py + dy, left + size[0], py + dy + size[1])


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


#: candidate label offsets (points) tried in order: right-above, right-below, left-above, left-below, farther
_OFFSETS = [(6, 3, "left"), (6, -12, "left"), (-6, 3, "right"), (-6, -12, "right"), (6, 12, "left"),
            (6, -21, "left"), (-6, 12, "right"), (-6, -21, "right"), (6, 21, "left"), (-6, 21, "right"),
            (6, -30, "left"), (-6, -30, "right"), (6, 30, "left"), (-6, 30, "right"), (0, 40, "left"),
            (0, -40, "left")]


def place_labels(named, points, limits=None, log_y: bool = False, *, lines=(), to_points=None, text_size=None,
                 area=None) -> list[dict]:
    """A place for each label ``(x, y, text)``: the first offset of a fixed list at which its box
    overlaps no label placed before it, no marker (``points``, a 9-point square each) and no drawn
    line (``lines``: polylines, as ``(xs, ys)``), inside the axes; a label with no such place is left
    out (``shown`` False), never overprinted.

    Geometry in points: ``to_points(x, y)`` (default: the frontier figure's axes with ``limits``),
    ``text_size(text) -> (w, h)`` and ``area`` (the axes' ``(w, h)``). Returns
    ``[{text, x, y, dx, dy, ha, box, shown}]``."""
    if to_points is None:
        def to_points(x, y):
            return _to_points(x, y, limits, log_y)
    text_size = text_size or _text_size
    w, h = area or (FRONTIER_FIGSIZE[0] * 72 * _AXES_BOX[2], FRONTIER_FIGSIZE[1] * 72 * _AXES_BOX[3])
    marks = []
    for x, y in points:
        px, py = to_points(x, y)
        marks.append((px - 4.5, py - 4.5, px + 4.5, py + 4.5))
    for xs, ys in lines:  # each segment as small boxes every 3 points along it
        pts = [to_points(x, y) for x, y in zip(xs, ys)]
        for (ax_, ay), (bx, by) in zip(pts, pts[1:]):
            n = max(1, int(math.hypot(bx - ax_, by - ay) / 3))
            for i in range(n + 1):
                cx, cy = ax_ + (bx - ax_) * i / n, ay + (by - ay) * i / n
                marks.append((cx - 1.5, cy - 1.5, cx + 1.5, cy + 1.5))
    placed, out = [], []
    for x, y, text in sorted(named, key=lambda t: (t[0], t[1])):
        px, py = to_points(x, y)
        size = text_size(text)
        spot = None
        for dx, dy, ha in _OFFSETS:
            box = label_box(px, py, dx, dy, size, ha)
            inside = box[0] >= 0 and box[2] <= w and box[1] >= 0 and box[3] <= h
            if inside and not any(_overlap(box, b) for b in placed + marks):
                spot = (dx, dy, ha, box)
                break
        if spot is None:
            out.append({"text": text, "x": x, "y": y, "shown": False})
            continue
        placed.append(spot[3])
        out.append({"text": text, "x": x, "y": y, "dx": spot[0], "dy": spot[1], "ha": spot[2], "box": spot[3],
                    "shown": True})
    return out


def plot_measured_frontier(run, ax=None):
    """Size vs quality: the measured mixed plans along the frontier (a line), the uniform options (a
    line sorted by size, each labelled), a consumer's own mixes (labelled markers), full precision,
    and on the right axis (log scale) the predicted damage of every frontier point. Labels never
    overprint (:func:`place_labels`). Returns the figure."""
    import numpy as np

    d = measured_frontier_data(run)
    fig = ax.figure if ax is not None else _figure(FRONTIER_FIGSIZE)
    ax = ax or fig.add_axes(_AXES_BOX)
    ax.plot(*d["measured"], "o-", color="C0", label="mixed precision (measured)", zorder=3)
    if d["uniform"] is not None:
        ax.plot(*d["uniform"], "s--", color="C3", label="uniform (measured)", zorder=2)
    if d["recipes"] is not None:
        ax.plot(*d["recipes"], "D", color="C1", ms=5, label="consumer's mixes (measured)", zorder=2)
    if d["log_y"]:
        ax.set_yscale("log")
    elif np.isfinite(d["baseline"]):
        ax.axhline(d["baseline"], color="grey", lw=0.8, ls=":", label="full precision")
    x0, x1, y0, y1 = d["limits"]
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    _draw_labels(ax, d)
    ax.set_xlabel("bits per weight (scales included)")
    ax.set_ylabel(d["ylabel"] + (" (log scale)" if d["log_y"] else ""))
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    px, py = d["predicted"]
    pos = py > 0
    ax2.plot(px[pos], py[pos], ".", color="C2", alpha=0.6, ms=4, label="predicted damage (right axis)")
    if d.get("predicted_std") is not None:
        ax2.errorbar(px[pos], py[pos], yerr=d["predicted_std"][pos], fmt="none", color="C2", alpha=0.4, lw=0.8,
                     capsize=2)
    if pos.any():
        ax2.set_yscale("log")
    ax2.set_ylabel("predicted damage (estimator units, log scale)")
    ax2.set_xlim(x0, x1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right" if d["log_y"] or not run.higher_is_better
              else "lower right", framealpha=0.85)
    ax.set_title(d["title"], fontsize=9)
    return fig


def _draw_labels(ax, d) -> None:
    """The uniform and recipe labels, placed by :func:`place_labels` with this axes' own geometry and
    the renderer's text sizes (so that no two overprint in the picture itself)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer() if hasattr(fig.canvas, "get_renderer") else fig._get_renderer()
    scale = 72.0 / fig.dpi  # display pixels -> points
    corner = ax.get_window_extent(renderer).p0

    def to_points(x, y):
        px, py = ax.transData.transform((x, y))
        return (px - corner[0]) * scale, (py - corner[1]) * scale

    probe = ax.text(0, 0, "", fontsize=_LABEL_PT)

    def text_size(text):
        probe.set_text(text)
        ext = probe.get_window_extent(renderer)
        return ext.width * scale, ext.height * scale

    box = ax.get_window_extent(renderer)
    labels = place_labels(d["named"], d["points"], lines=d["lines"], to_points=to_points, text_size=text_size,
                          area=(box.width * scale, box.height * scale))
    probe.remove()
    colour = {t: "C3" for t in d["uniform_labels"]} | {t: "C1" for t in d["recipe_labels"]}
    for lab in labels:
        if lab["shown"]:
            far = abs(lab["dy"]) > 15  # a leader line to a label set apart from its marker
            ax.annotate(lab["text"], (lab["x"], lab["y"]), textcoords="offset points", xytext=(lab["dx"], lab["dy"]),
                        ha=lab["ha"], va="bottom", fontsize=_LABEL_PT, color=colour.get(lab["text"], "k"), zorder=5,
                        arrowprops=dict(arrowstyle="-", lw=0.5, color="grey", shrinkA=0, shrinkB=3) if far else None)


def plan_title(run, ref: str) -> str:
    """What a plan picture shows, in words: the plan's name (``point-7``, ``uniform-int4-asym``,
    ``Q4_K_M``), the budgets it is recommended at, its size and its measured quality."""
    plan = run.plan_of(ref)
    rec = run.recommended
    at = [str(b) for b in rec.loc[rec["plan"] == ref, "budget"]] if len(rec) and "plan" in rec else []
    details = []
    if plan.predicted.get("avg_bits"):
        details.append(f"{plan.predicted['avg_bits']:.3f} bits/weight")
    q = f"measured_{run.metric}"
    kind, _, name = ref.partition("-")
    rows = run.frontier[run.frontier["point"] == int(name)] if kind == "point" and name.isdigit() else \
        run.uniform[run.uniform["option"] == (name if kind == "uniform" and name in run.table.options else ref)] \
        if len(run.uniform) else run.uniform
    if len(rows) and q in rows and rows[q].notna().any():
        details.append(f"{run.metric} {float(rows[q].dropna().iloc[0]):.4g}")
    head = f"plan {ref}" + (f", recommended at {', '.join(at)}" if at else "")
    return head + (": " + ", ".join(details) if details else "")


def plot_plan_bits(plan, table=None, ax=None, title: str | None = None):
    """A plan's bit-width per layer (bars, in model order), each bar coloured by the layer's
    parameter count (colour bar, log scale); titled ``title`` (default: the plan's size)."""
    import numpy as np
    from matplotlib import cm
    from matplotlib.colors import LogNorm

    layers = list(table.layers) if table is not None else list(plan.bits)
    bits = [plan.bits[n] for n in layers]
    fig = ax.figure if ax is not None else _figure((max(6, 0.18 * len(layers)), 3.6))
    ax = ax or fig.add_subplot(111)
    colors, mappable = None, None
    if table is not None and table.layer_params():
        params = np.array([table.layer_params()[n] for n in layers], dtype=float)
        norm = LogNorm(vmin=params.min(), vmax=max(params.max(), params.min() * 1.0001))
        mappable = cm.ScalarMappable(norm=norm, cmap="viridis")
        colors = mappable.to_rgba(params)
    ax.bar(range(len(layers)), bits, color=colors)
    names = [plan.option_name(n) for n in layers]
    if any(not (n == "keep" or n.startswith("int")) for n in names):  # a consumer's formats: q5_0 and q5_K differ
        for i, (n, b) in enumerate(zip(names, bits)):
            ax.text(i, 0.15, n, rotation=90, ha="center", va="bottom", fontsize=6, color="white")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=90, fontsize=6)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("weight bits")
    if mappable is not None:
        fig.colorbar(mappable, ax=ax, label="parameters in the layer", pad=0.01)
    avg = plan.predicted.get("avg_bits")
    ax.set_title(title or ("per-layer bit-widths" + (f" (average {avg:.2f} bits/weight)" if avg else "")), fontsize=9)
    return fig


def plot_sensitivity(table, column: str = "damage", ax=None):
    """The cost table as a heat map: layers x options, log10 of ``column``."""
    import numpy as np

    piv = table.pivot(column)
    vals = np.log10(np.clip(piv.to_numpy(dtype=float), 1e-12, None))
    fig = ax.figure if ax is not None else _figure((4 + 0.4 * len(piv.columns), max(3, 0.16 * len(piv))))
    ax = ax or fig.add_subplot(111)
    im = ax.imshow(vals, aspect="auto", cmap="magma")
    ax.set_yticks(range(len(piv)))
    ax.set_yticklabels(piv.index, fontsize=6)
    ax.set_xticks(range(len(piv.columns)))
    ax.set_xticklabels(piv.columns, fontsize=8, rotation=45, ha="right")
    ax.set_xlabel("option")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label=f"log10 {column} ({table.metadata.get('estimator', 'estimator')} units)")
    from .diagnose import non_monotone  # start-up: keeps this module free of numpy

    bad = non_monotone(table) if column == "damage" else {}
    rows, cols = {n: i for i, n in enumerate(piv.index)}, {o: j for j, o in enumerate(piv.columns)}
    cells = [(cols[e["option"]], rows[lay]) for lay, es in bad.items() for e in es]
    if cells:  # more damage than a smaller option of the same layer
        ax.plot(*zip(*cells), "x", color="cyan", ms=5, label="more damage than a smaller option")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title("sensitivity table" + (f" ({len(bad)} layers with non-monotone damage: x)" if bad else ""),
                 fontsize=9)
    return fig
