"""``method="local"``: measured equal-size moves from the best measured plan (ExLlamaV3-style)."""

from __future__ import annotations

import numpy as np

from ..problem import Problem
from .settings import RefineSettings, _settings


def _ranked_options(problem: Problem, size: np.ndarray) -> list[np.ndarray]:
    """Per item, its allowed options sorted by size (then damage)."""
    out = []
    for i in range(problem.n_items):
        ks = np.flatnonzero(problem.allowed[i])
        out.append(ks[np.lexsort((problem.damage[i, ks], size[i, ks]))])
    return out


def candidate_moves(problem: Problem, choice, column: str = "size_bits", cap: float | None = None,
                    limit: int = 4, exclude=()) -> list[tuple[float, np.ndarray]]:
    """The ``limit`` most promising moves from ``choice`` that keep ``column``'s sum within ``cap``
    (default: the current sum) and every other constraint: one item one option up with another one
    down, or one item up where there is room. Ranked by predicted damage change (ties: the order of
    the items); ``exclude``: choices not to propose. Returns ``[(predicted change, new choice)]``."""
    choice = np.asarray(choice, dtype=int)
    size = problem.resources[column]
    idx = np.arange(problem.n_items)
    used = float(size[idx, choice].sum())
    cap = used if cap is None else float(cap)
    ranked = _ranked_options(problem, size)
    pos = [int(np.flatnonzero(r == c)[0]) for r, c in zip(ranked, choice)]
    ups = [(i, ranked[i][pos[i] + 1]) for i in idx if pos[i] + 1 < len(ranked[i])]
    downs = [(j, ranked[j][pos[j] - 1]) for j in idx if pos[j] > 0]
    d0 = problem.damage[idx, choice]
    cands = []
    tol = 1e-9 * max(abs(cap), 1.0)
    for i, ki in ups:
        du, su = problem.damage[i, ki] - d0[i], size[i, ki] - size[i, choice[i]]
        if used + su <= cap + tol:
            cands.append((du, ((i, ki),)))
        for j, kj in downs:
            if j == i:
                continue
            ds = size[j, kj] - size[j, choice[j]]
            if used + su + ds <= cap + tol:
                cands.append((du + problem.damage[j, kj] - d0[j], ((i, ki), (j, kj))))
    cands.sort(key=lambda c: c[0])
    seen = {tuple(np.asarray(e, dtype=int)) for e in exclude}
    out = []
    for delta, moves in cands:
        new = choice.copy()
        for i, k in moves:
            new[i] = k
        key = tuple(new)
        if key in seen or not problem.is_feasible(new):
            continue
        seen.add(key)
        out.append((float(delta), new))
        if len(out) >= limit:
            break
    return out


def local_search(problem: Problem, start, start_loss: float, measure, settings: RefineSettings | None = None, *,
                 cap: float | None = None, tried: list | None = None, **kwargs):
    """Measured local search from ``start`` (a choice vector whose measured loss is ``start_loss``).

    ``measure(choice) -> loss`` measures a plan. Each of ``rounds`` rounds measures up to ``swaps``
    candidate moves (:func:`candidate_moves` on ``column`` within ``cap``) and moves to the best if it
    measured lower, within ``max_evals`` measurements (``settings`` or those fields as keywords).
    Returns ``(choice, loss, log)``; the loss is never above ``start_loss``. ``tried``: choices not to
    propose again (extended with the ones measured here).
    """
    st = _settings(settings, kwargs)
    st.check_column(problem.resources, "the problem")
    cur, cur_loss = np.asarray(start, dtype=int).copy(), float(start_loss)
    tried = tried if tried is not None else []
    tried.append(cur.copy())
    log, evals = [], 0
    for r in range(st.rounds):
        room = st.swaps if st.max_evals is None else min(st.swaps, st.max_evals - evals)
        if room <= 0:
            break
        moves = candidate_moves(problem, cur, st.column, cap, limit=room, exclude=tried)
        if not moves:
            break
        best, best_loss = None, cur_loss
        for _delta, new in moves:
            tried.append(new)
            loss = float(measure(new))
            evals += 1
            if loss < best_loss:
                best, best_loss = new, loss
        gain = cur_loss - best_loss
        if best is not None:
            cur, cur_loss = best, best_loss
        log.append({"round": r + 1, "evals": len(moves), "loss": cur_loss, "gain": gain})
    return cur, cur_loss, log
