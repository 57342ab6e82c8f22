"""Interaction between layers: how far the additive per-layer model is from joint measurements,
and pairwise corrections for the ILP.

The cost table assumes the loss of a plan is the sum of its layers' losses. Layers of one block
(q/k/v projections, gate/up/down) feed each other, so their errors can compound or cancel. For each
pair inside a block, :func:`measure_pairs` quantizes the two layers together at each pair of options
and records the interaction ``I[a, b] = L(a at k, b at l) - L(a at k) - L(b at l)`` with ``L`` the
same loss measured alone (so the terms are consistent with each other). :func:`pair_terms` turns
them into the ``(item i, item j, [K, K] matrix)`` terms that :func:`mpsearch.solvers.ilp.solve_pairwise`
adds to the objective with product variables (the seed paper: "Augmenting Hessians with
Inter-Layer Dependencies for Mixed-Precision Post-Training Quantization", Schaefer et al., 2023).
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import torch

from .errors import MpsearchError
from .layers import _kind
from .options import parse_option
from .problem import Problem
from .quant import quantize_weight
from .sensitivity.base import progress_bar
from .table import CostTable

#: layers whose names share everything but the last component and match one of these are paired
BLOCK_GROUPS = (r"(q|k|v)_?proj$|query$|key$|value$", r"(gate|up|down)_?proj$|fc1$|fc2$|intermediate\.dense$")


def block_pairs(layers, groups=BLOCK_GROUPS) -> list[tuple[str, str]]:
    """Pairs of layers inside one block: same parent module path, names matching one of ``groups``
    (q/k/v with each other, gate/up/down with each other)."""
    out = []
    for pattern in groups:
        rx = re.compile(pattern)
        by_parent: dict[str, list[str]] = {}
        for n in layers:
            if rx.search(n):
                parent = n.rsplit(".", 2)[0] if n.count(".") >= 2 else ""
                by_parent.setdefault(parent, []).append(n)
        for members in by_parent.values():
            out.extend(itertools.combinations(members, 2))
    return out


def measure_pairs(model: torch.nn.Module, table: CostTable, pairs, loss, options=None, progress=False) -> list:
    """Measured interactions ``[(layer_a, layer_b, option_a, option_b, interaction)]``.

    ``loss(model) -> float``: a loss to full precision (0 for the unquantized model), e.g. KL on
    calibration batches. ``options``: the options to pair (default: every non-keep option of the
    table). Each layer is quantized in place and restored; ``len(pairs) * K^2 + layers * K``
    measurements.
    """
    opts = [o for o in (options or table.options) if not parse_option(o).is_keep]
    if not opts:
        raise MpsearchError("measure_pairs needs at least one option other than keep")
    layers = sorted({n for p in pairs for n in p})
    mods = {n: model.get_submodule(n) for n in layers}
    saved = {n: m.weight.detach().clone() for n, m in mods.items()}

    def set_opt(n, o):
        with torch.no_grad():
            mods[n].weight.copy_(saved[n] if o is None else quantize_weight(saved[n], parse_option(o), _kind(mods[n]), n))

    single = {}
    try:
        for n in progress_bar(layers, enabled=progress, desc="single layers"):
            for o in opts:
                set_opt(n, o)
                single[(n, o)] = float(loss(model))
            set_opt(n, None)
        out = []
        for a, b in progress_bar(list(pairs), enabled=progress, desc="layer pairs"):
            for oa in opts:
                set_opt(a, oa)
                for ob in opts:
                    set_opt(b, ob)
                    joint = float(loss(model))
                    out.append((a, b, oa, ob, joint - single[(a, oa)] - single[(b, ob)]))
                set_opt(b, None)
            set_opt(a, None)
    finally:
        for n in layers:
            set_opt(n, None)
    return out


def pair_terms(problem: Problem, interactions, scale: float = 1.0) -> list:
    """``[(item i, item j, [K, K] matrix)]`` for :func:`mpsearch.solvers.ilp.solve_pairwise` from
    measured interactions (pairs inside one tied item are left out: they always move together).
    ``scale`` converts the interaction's loss units to the table's damage units."""
    item_of = {n: i for i, members in enumerate(problem.items) for n in members}
    k_of = {o: k for k, o in enumerate(problem.option_names)}
    mats: dict[tuple[int, int], np.ndarray] = {}
    for a, b, oa, ob, v in interactions:
        i, j = item_of[a], item_of[b]
        if i == j:
            continue
        ka, kb = k_of[oa], k_of[ob]
        if i > j:
            i, j, ka, kb = j, i, kb, ka
        m = mats.setdefault((i, j), np.zeros((problem.n_options, problem.n_options)))
        m[ka, kb] += scale * v
    return [(i, j, m) for (i, j), m in mats.items()]


def pairwise_damage(problem: Problem, terms, choice) -> float:
    """Additive damage of ``choice`` plus its pairwise terms."""
    choice = np.asarray(choice, dtype=int)
    base = float(problem.damage[np.arange(problem.n_items), choice].sum())
    return base + float(sum(m[choice[i], choice[j]] for i, j, m in terms))
