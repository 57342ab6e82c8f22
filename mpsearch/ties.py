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
    # merge groups sharing a layer (union-find over names)
    parent: dict[str, str] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for group in members.values():
        for other in group[1:]:
            parent[find(other)] = find(group[0])
    comps: dict[str, list[str]] = {}
    for group in members.values():
        for n in group:
            comps.setdefault(find(n), []).append(n)
    result = {}
    for comp in comps.values():
        uniq = [n for n in names if n in set(comp)]
        if len(uniq) > 1:
            gid = uniq[0] + "+" + str(len(uniq) - 1)
            for n in uniq:
                result[n] = gid
    return result
