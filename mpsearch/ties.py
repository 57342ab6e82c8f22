"""Tie groups: layers that must share one option (fused projections, user regexes). Torch-free."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .errors import MpsearchError

#: sibling names that serving runtimes fuse into one matrix
FUSED_SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
)


def tie_groups(
    names: Iterable[str], *, ties: Sequence[str] = (), fuse_projections: bool = False
) -> dict[str, str]:
    """Map layer name -> group id for the layers that must share one option.

    - ``fuse_projections``: siblings named as fused projections (q_proj/k_proj/v_proj,
      query/key/value, gate_proj/up_proj, w1/w3) under the same parent form one group.
    - ``ties``: regexes. Layers matched by the same regex (``re.search``) whose capture groups are
      equal form one group; a regex without capture groups ties every layer it matches. For
      example ``r"layers\\.(\\d+)\\.mlp\\.(?:gate|up)_proj"`` ties gate and up per block.

    Layers in no group are absent from the result. Groups of one layer are dropped.
    """
    names = list(names)
    members: dict[str, list[str]] = {}
    if fuse_projections:
        for name in names:
            parent, _, leaf = name.rpartition(".")
            for sib in FUSED_SIBLINGS:
                if leaf in sib:
                    members.setdefault(f"{parent}.{{{','.join(sib)}}}", []).append(name)
    for i, pattern in enumerate(ties):
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise MpsearchError(f"tie regex {pattern!r} does not compile: {exc}") from exc
        for name in names:
            m = rx.search(name)
            if m:
                key = f"tie{i}:" + "|".join(g or "" for g in m.groups()) if m.groups() else f"tie{i}"
                members.setdefault(key, []).append(name)
    result = {}
    for comp in connected_groups(names, members.values()):
        if len(comp) > 1:
            gid = comp[0] + "+" + str(len(comp) - 1)
            for n in comp:
                result[n] = gid
    return result


def connected_groups(names: Sequence[str], groups: Iterable[Iterable[str]]) -> list[list[str]]:
    """Every name of ``names`` in exactly one component: names that share a group, directly or
    through a chain of groups, end up together (union-find). Components are ordered by their first
    name's position in ``names``, members in ``names`` order; an ungrouped name is its own."""
    names = list(names)
    parent = {n: n for n in names}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for group in groups:
        group = [n for n in group if n in parent]
        for other in group[1:]:
            a, b = find(other), find(group[0])
            if a != b:
                parent[a] = b
    comps: dict[str, list[str]] = {}
    for n in names:
        comps.setdefault(find(n), []).append(n)
    return list(comps.values())


def groups_of(mapping: dict) -> list[list[str]]:
    """``{name: group id}`` -> the lists of names per group id."""
    out: dict = {}
    for n, g in mapping.items():
        out.setdefault(g, []).append(n)
    return list(out.values())
