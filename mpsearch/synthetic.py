"""Synthetic cost tables that carry their known answer (for tests, benchmarks and examples).

:func:`random_table` draws a seeded table with the structure of real ones: a layer's ``size_bits`` is
``params * bits`` plus scale overhead (16-bit scales per output channel), and its damage falls like
``s * 2^(-2 bits)`` with multiplicative noise, ``s`` log-normal across layers. Optional groups tie
consecutive layers, and ``bops``/``latency`` columns give extra budgets.

:func:`exact_frontier` enumerates every plan of a small table and returns its exact Pareto frontier
(damage vs one resource column); :func:`tiny_table` is a 4-layer table that ships with that answer.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from .errors import MpsearchError
from .pareto import pareto_indices
from .problem import group_items
from .table import CostTable

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)


def random_table(
    n_layers: int = 20,
    bits=DEFAULT_BITS,
    *,
    seed: int = 0,
    groups: int = 0,
    keep: bool = False,
    min_params: int = 64,
    max_params: int = 4096,
    param_multiple: int = 1,
    noise: float = 0.3,
    extra_columns: bool = True,
) -> CostTable:
    """A seeded random table of ``n_layers`` x ``len(bits)`` (+ ``keep``) options.

    ``groups``: how many pairs of consecutive layers share a group (must take the same option).
    ``param_multiple``: parameter counts are multiples of this (real layers have round shapes).
    ``extra_columns``: add ``bops`` (MACs x weight bits x 8 activation bits) and ``latency``.
    """
    if n_layers < 1:
        raise MpsearchError(f"random_table: n_layers must be >= 1, got {n_layers}")
    bits = sorted(int(b) for b in bits)
    if not bits or bits[0] < 1 or bits[-1] > 8:
        raise MpsearchError(f"random_table: bits must be integers from 1 to 8, got {bits}")
    if 2 * groups > n_layers:
        raise MpsearchError(f"random_table: {groups} groups of two need at least {2 * groups} layers")
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_layers):
        params = int(rng.integers(min_params, max_params + 1)) // param_multiple * param_multiple
        params = max(params, param_multiple)
        out_ch = max(1, params // int(rng.choice([16, 32, 64, 128])))
        macs = params * int(rng.integers(1, 64))
        s = float(rng.lognormal(0.0, 1.5)) * params
        lat_per_bit = float(rng.uniform(0.5, 2.0)) * params / 1000
        opts = [(b, f"int{b}") for b in bits] + ([(16, "keep")] if keep else [])
        for b, name in opts:
            damage = 0.0 if b == 16 else s * 2.0 ** (-2 * b) * float(np.exp(noise * rng.standard_normal()))
            row = {
                "layer": f"layer{i:04d}",
                "option": name,
                "bits": b,
                "params": params,
                "damage": damage,
                "size_bits": params * b + (0 if b == 16 else 16 * out_ch),
            }
            if extra_columns:
                row["bops"] = macs * b * 8
                row["latency"] = round(lat_per_bit * (4 + b), 6)
            rows.append(row)
    frame = pd.DataFrame(rows)
    if groups:
        gid = {f"layer{2 * g:04d}": f"g{g}" for g in range(groups)}
        gid.update({f"layer{2 * g + 1:04d}": f"g{g}" for g in range(groups)})
        frame["group"] = frame["layer"].map(gid)
    return CostTable(frame, {"estimator": "synthetic", "seed": seed, "n_layers": n_layers})


def transformer_table(
    n_layers: int = 70, bits=tuple(range(1, 9)), *, d: int = 256, seed: int = 0, noise: float = 0.3
) -> CostTable:
    """A seeded table shaped like a transformer stack: blocks of q, k, v, o (d x d) and gate, up,
    down (d x 4d) projections, cut to ``n_layers`` layers.

    Few distinct shapes, as in real models, so size differences share a large common divisor and
    the ``dp`` solver is exact in integer units. ``size_bits`` is ``params * bits`` plus 16-bit scales
    per output channel; damage falls as ``s * 2^(-2 bits)`` with noise; ``bops`` counts MACs per token
    x weight bits x 8; ``latency`` is a made-up per-layer speed x params x (bits + 4).
    """
    if n_layers < 1:
        raise MpsearchError(f"transformer_table: n_layers must be >= 1, got {n_layers}")
    rng = np.random.default_rng(seed)
    shapes = [("q_proj", d, d), ("k_proj", d, d), ("v_proj", d, d), ("o_proj", d, d),
              ("gate_proj", d, 4 * d), ("up_proj", d, 4 * d), ("down_proj", 4 * d, d)]
    rows = []
    for i in range(n_layers):
        name, fan_in, fan_out = shapes[i % len(shapes)]
        params = fan_in * fan_out
        s = float(rng.lognormal(0.0, 1.0)) * params * (1 + i // len(shapes)) ** -0.5
        speed = float(rng.uniform(0.8, 1.25))  # kernels of one shape differ in speed per layer
        for b in sorted(int(x) for x in bits):
            rows.append({
                "layer": f"blocks.{i // len(shapes)}.{name}", "bits": b, "params": params,
                "damage": s * 2.0 ** (-2 * b) * float(np.exp(noise * rng.standard_normal())),
                "size_bits": params * b + 16 * fan_out, "bops": params * b * 8,
                "latency": round(speed * params * (b + 4) * 1e-6, 6),
            })
    return CostTable(pd.DataFrame(rows), {"estimator": "synthetic-transformer", "seed": seed, "d": d})


def exact_frontier(table: CostTable, column: str = "size_bits", max_plans: int = 2_000_000) -> pd.DataFrame:
    """Every non-dominated (``column`` sum, damage) point of a small table, by enumeration.

    Honours the table's groups. Returns a frame sorted by ``column`` with the columns ``column``,
    ``damage`` and ``plan`` (a dict layer -> option). Refuses tables with more than ``max_plans``
    plans.
    """
    layers, options = table.layers, table.options
    items = group_items(layers, table.groups)
    total = len(options) ** len(items)
    if total > max_plans:
        raise MpsearchError(f"exact_frontier: {total} plans is more than max_plans={max_plans}")
    if column not in table.frame:
        raise MpsearchError(f"exact_frontier: the table has no column {column!r}")
    dmg = table.pivot("damage").to_numpy()
    res = table.pivot(column).to_numpy()
    index = {n: j for j, n in enumerate(layers)}
    d_item = np.array([dmg[[index[m] for m in it]].sum(axis=0) for it in items])
    r_item = np.array([res[[index[m] for m in it]].sum(axis=0) for it in items])
    combos = np.array(list(itertools.product(range(len(options)), repeat=len(items))))
    ar = np.arange(len(items))
    d = d_item[ar, combos].sum(axis=1)
    r = r_item[ar, combos].sum(axis=1)
    keep = pareto_indices(r, d)
    return pd.DataFrame(
        {
            column: r[keep],
            "damage": d[keep],
            "plan": [
                {m: options[k] for it, k in zip(items, combos[j]) for m in it} for j in keep
            ],
        }
    )


def tiny_table() -> tuple[CostTable, pd.DataFrame]:
    """A 4-layer x 3-option table with integer sizes, and its exact size_bits frontier."""
    table = random_table(4, bits=(2, 4, 8), seed=7, min_params=8, max_params=64, extra_columns=True)
    return table, exact_frontier(table, "size_bits")
