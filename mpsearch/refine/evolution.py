"""``method="evolve"``: a measured (1 + lambda) evolutionary search over size levels (EvoPress), with
multi-step selection on a ladder of search data and a checkpoint it resumes from exactly."""

from __future__ import annotations

import time

import numpy as np

from ..errors import MpsearchError
from ..fileio import atomic_write_text
from ..problem import Problem
from .local import _ranked_options
from .settings import _settings, RefineSettings


def size_levels(problem: Problem, column: str = "size_bits") -> list[list[np.ndarray]]:
    """Per item, its allowed options grouped by ``column`` (ascending): options of equal size (q4_0,
    iq4_nl and q4_K in llama.cpp) share a level, lowest predicted damage first."""
    size = problem.resources[column]
    out = []
    for i, ks in enumerate(_ranked_options(problem, size)):
        levels: list[list[int]] = []
        for k in ks:
            if levels and np.isclose(size[i, k], size[i, levels[-1][0]], rtol=1e-12, atol=0):
                levels[-1].append(int(k))
            else:
                levels.append([int(k)])
        out.append([np.array(lv) for lv in levels])
    return out


def mutate(problem: Problem, choice, rng: np.random.Generator, *, switches: int = 1, fill: bool = True,
           levels: list | None = None, column: str = "size_bits") -> np.ndarray | None:
    """A level-switch mutation of ``choice`` that stays feasible, on the size levels of
    :func:`size_levels`: ``switches`` times, one random item one level up (or, where its level holds
    other options of the same size, to one of them half of the time), then random other items one
    level down until every constraint holds; with ``fill``, a pass over the untouched items in
    random order taking each one level up where the plan still fits. A level of several options
    gives one of them at random. ``None`` when no feasible child came out."""
    levels = levels if levels is not None else size_levels(problem, column)
    level_of = [{int(k): lv for lv, ks in enumerate(item) for k in ks} for item in levels]
    n = problem.n_items
    new = np.asarray(choice, dtype=int).copy()
    touched = np.zeros(n, dtype=bool)

    def level(i):
        return level_of[i][int(new[i])]

    def one(ks):
        return int(ks[0]) if len(ks) == 1 else int(rng.choice(ks))  # no draw where there is no choice

    def pick(i, lv):
        return one(levels[i][lv])

    for _ in range(int(switches)):
        movable = [i for i in range(n) if not touched[i]
                   and (level(i) + 1 < len(levels[i]) or len(levels[i][level(i)]) > 1)]
        if not movable:
            break
        i = int(rng.choice(movable))
        touched[i] = True
        same = [int(k) for k in levels[i][level(i)] if k != new[i]]
        if same and (level(i) + 1 == len(levels[i]) or rng.random() < 0.5):
            new[i] = one(same)  # the same size, another format
        else:
            new[i] = pick(i, level(i) + 1)
        while not problem.is_feasible(new):
            down = [j for j in range(n) if j != i and level(j) > 0]
            if not down:
                return None
            j = int(rng.choice(down))
            new[j] = pick(j, level(j) - 1)
            touched[j] = True
    if not problem.is_feasible(new):
        return None
    if fill:
        for i in rng.permutation([i for i in range(n) if not touched[i] and level(i) + 1 < len(levels[i])]):
            old = new[i]
            new[i] = pick(i, level(i) + 1)
            if not problem.is_feasible(new):
                new[i] = old
    if np.array_equal(new, choice):
        return None
    return new


def _choice_key(choice) -> str:
    import hashlib

    return hashlib.sha1(np.asarray(choice, dtype=np.int64).tobytes()).hexdigest()[:16]


def _evolve_signature(problem, start, settings: dict, context: str) -> str:
    """What an evolve checkpoint must match to be resumed: the problem, the start and the settings."""
    import hashlib
    import json

    doc = {"items": problem.items, "options": problem.option_names, "caps": problem.caps().tolist(),
           "allowed": problem.allowed.astype(int).tolist(), "start": [int(c) for c in start],
           "settings": settings, "context": context}
    return hashlib.sha1(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def evolve(problem: Problem, start, measure, settings: RefineSettings | None = None, *,
           start_loss: float | None = None, checkpoint=None, context: str = "", progress: bool | str = False,
           **kwargs):
    """A measured (1 + ``offspring``) evolutionary search from the feasible choice ``start``.

    ``settings`` (a :class:`RefineSettings`, or its fields as keywords; ``generations`` is another
    name of ``rounds``, 50 when not given): ``rounds`` generations, ``offspring``, ``survivors``,
    ``max_switches``, ``seed``, ``max_evals``, ``time_limit``, ``column``.

    ``measure(choice, level) -> loss``: the loss of a plan on level ``level`` of a data ladder
    (``0`` the cheapest, ``len(survivors)`` the full search data). Each generation makes
    ``offspring`` distinct children (:func:`mutate`, 1 to ``max_switches`` switches, geometric),
    measures them at level 0, the best ``survivors[0]`` of them again at level 1, and so on
    (EvoPress's multi-step selection); the best child at the last level replaces the parent if it
    measured lower there. ``max_evals``: the most ``measure`` calls in all (a generation that does
    not fit is not started); ``time_limit``: seconds after which no generation is started (the
    generations done are in the log: the same ``seed`` and that many ``generations`` repeat the
    run exactly). ``checkpoint``: a JSON file written after every generation (parent, random
    state, plans seen, log); a later call with the same problem, start, settings and ``context``
    (what ``measure`` measures) resumes from it, and ends exactly as one uninterrupted call would;
    more ``generations`` continue a finished search. ``progress``: a bar over the generations (a
    string: its description). Returns ``(choice, loss, log)``: the loss (at the last level) is never
    above the start's; ``log`` has one row per generation (row 0: the start).
    """
    from ..sensitivity.base import progress_bar  # start-up: keeps this module free of torch

    if "generations" in kwargs:
        kwargs["rounds"] = kwargs.pop("generations")
    st = _settings(settings, kwargs, rounds=50)
    st.check_column(problem.resources, "the problem")
    survivors = tuple(st.survivors or ())
    cur = np.asarray(start, dtype=int).copy()
    if not problem.is_feasible(cur):
        raise MpsearchError("evolve: the start plan does not fit the budget")
    run = _EvolveRun(problem, cur, st, start_loss, checkpoint, context)
    if run.log is None:  # a fresh search: the start measured at the top level unless its loss is given
        run.begin(cur, start_loss if start_loss is not None else measure(cur, len(survivors)),
                  measured=start_loss is None)
    levels = size_levels(problem, st.column)
    per_gen = st.offspring + sum(survivors)
    t0 = time.monotonic()
    done = run.log[-1]["generation"]
    bar = progress_bar(range(done + 1, st.rounds + 1), enabled=bool(progress), total=max(st.rounds - done, 0),
                       desc=progress if isinstance(progress, str) else "evolve")
    for g in bar:
        if st.max_evals is not None and run.evals + per_gen > st.max_evals:
            break
        if st.time_limit is not None and time.monotonic() - t0 > st.time_limit:
            break
        kids = _children(problem, run, st, levels)
        if not kids:
            break
        best_loss, best, spent = _select(kids, measure, survivors)
        run.step(g, best, best_loss, spent, len(kids))
        bar.set_postfix(loss=f"{run.loss:.4g}")
    return run.choice, run.loss, run.log


class _EvolveRun:
    """The state of one :func:`evolve` search (parent, random state, plans seen, log), resumed from
    and saved to its checkpoint file when it has one."""

    def __init__(self, problem, start, st: RefineSettings, start_loss, checkpoint, context):
        import json
        from pathlib import Path

        self.rng = np.random.default_rng(st.seed)
        self.signature = _evolve_signature(problem, start, {
            "offspring": st.offspring, "survivors": tuple(st.survivors or ()), "seed": st.seed,
            "max_switches": st.max_switches, "column": st.column, "start_loss": start_loss}, context)
        self.path = Path(checkpoint) if checkpoint is not None else None
        self.choice, self.loss, self.evals, self.seen, self.log = start, None, 0, set(), None
        state = None
        if self.path is not None and self.path.is_file():
            try:
                state = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                state = None
            if not isinstance(state, dict) or state.get("signature") != self.signature:
                state = None  # another search's: start afresh (it is overwritten)
        if state is not None:
            self.choice, self.loss = np.array(state["choice"], dtype=int), float(state["loss"])
            self.evals, self.seen, self.log = int(state["evals"]), set(state["seen"]), state["log"]
            self.rng.bit_generator.state = state["rng"]

    def begin(self, start, loss, measured: bool) -> None:
        self.choice, self.loss, self.evals = start, float(loss), int(measured)
        self.seen = {_choice_key(start)}
        self.log = [{"generation": 0, "evals": self.evals, "loss": self.loss, "improved": False, "children": 0}]

    def step(self, generation, best, best_loss, spent, children) -> None:
        """One generation done: the best child replaces the parent if it measured lower."""
        import json

        self.evals += spent
        better = best_loss < self.loss
        if better:
            self.choice, self.loss = best.copy(), best_loss
        self.log.append({"generation": generation, "evals": self.evals, "loss": self.loss, "improved": bool(better),
                         "children": children})
        if self.path is not None:
            atomic_write_text(self.path, json.dumps({
                "signature": self.signature, "choice": [int(c) for c in self.choice], "loss": self.loss,
                "evals": self.evals, "rng": self.rng.bit_generator.state, "seen": sorted(self.seen),
                "log": self.log}))


def _children(problem: Problem, run: _EvolveRun, st: RefineSettings, levels) -> list[np.ndarray]:
    """Up to ``offspring`` mutations of the parent never seen before (at most 20 tries per child)."""
    kids = []
    for _ in range(20 * st.offspring):
        if len(kids) >= st.offspring:
            break
        switches = min(int(run.rng.geometric(0.5)), st.max_switches)
        kid = mutate(problem, run.choice, run.rng, switches=switches, levels=levels, column=st.column)
        key = None if kid is None else _choice_key(kid)
        if key is not None and key not in run.seen:
            run.seen.add(key)
            kids.append(kid)
    return kids


def _select(kids, measure, survivors) -> tuple[float, np.ndarray, int]:
    """Multi-step selection: every child measured at level 0, the best ``survivors[j]`` again at
    level ``j + 1``; returns the best child's loss at the last level, the child and the measurements."""
    pool = [(float(measure(k, 0)), k) for k in kids]
    spent = len(pool)
    for level, keep in enumerate(survivors, start=1):
        pool = sorted(pool, key=lambda e: e[0])[:keep]
        pool = [(float(measure(k, level)), k) for _, k in pool]
        spent += len(pool)
    best_loss, best = min(pool, key=lambda e: e[0])
    return best_loss, best, spent
