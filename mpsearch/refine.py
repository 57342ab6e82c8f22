"""Closed-loop refinement: measured plans recalibrate the table, or steer a measured local search.

The cost table is a hypothesis (an additive per-layer model of the loss); measured quality is the
verdict. Three methods act on what was measured, each within a stated number of measured plans:

- :func:`calibrate` (``method="calibrate"``): the additive model ``loss(plan) ~= sum_g a_g t_g(plan)``
  with ``t_g`` the predicted damage of the layers of group ``g`` (a layer type such as
  ``self_attn.q_proj``, or each layer) under the plan. The multipliers ``a_g >= 0`` are fitted by
  non-negative least squares (:func:`scipy.optimize.nnls`) to the measured losses of every plan
  measured so far (uniform ones included); the table's damage is rescaled by them and the budget
  solved again. HIGGS's linearity theorem (Malinovskii et al., arXiv 2411.17525) is why a linear
  model of per-layer errors predicts the loss of a whole plan. A small ridge toward the single
  best-fitting scalar (``ridge``) keeps under-determined groups at a sensible scale.
- :func:`local_search` (``method="local"``): from the best measured plan that fits, measure the
  ``swaps`` most promising equal-size moves (one item up an option, another down, or one item up
  when there is room; ranked by their predicted damage change) and keep the best one if it
  measured better. ExLlamaV3's optimizer does this with measured KL differences. It never returns
  a plan worse than its start.
- :func:`evolve` (``method="evolve"``): a measured (1 + lambda) evolutionary search that ignores
  the table's ranking (EvoPress, Sieberling et al., arXiv 2410.14649): each generation mutates the
  best plan so far by size-level switches (one item up a level, others down until the plan fits,
  then the slack filled), measures the offspring, optionally on a ladder of growing data (multi-step
  selection), and keeps the best child if it measured lower on the full search data. Its
  measurements are meant for data apart from the evaluation data (``search`` in :func:`refine`);
  only its result is measured on the evaluation metric. ``rounds`` is its number of generations.

:func:`refine` runs ``rounds`` rounds of one method, or of both (``"both"``: a calibration step and
then local moves each round), over every target budget, and logs the measured gain per round and
the evaluations spent.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np

from .budget import Budget
from .errors import MpsearchError
from .plan import BitPlan
from .problem import Problem, compile_problem
from .recipe import REFINE_METHODS
from .table import CostTable

METHODS = REFINE_METHODS


def layer_type(name: str) -> str:
    """The layer's type: its name with the block indices dropped (``model.layers.3.mlp.up_proj`` ->
    ``model.layers.*.mlp.up_proj``)."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


def _group_of(table: CostTable, groups) -> dict[str, str]:
    if groups == "type":
        return {n: layer_type(n) for n in table.layers}
    if groups == "layer":
        return {n: n for n in table.layers}
    if groups == "one":
        return {n: "all" for n in table.layers}
    if callable(groups):
        return {n: str(groups(n)) for n in table.layers}
    raise MpsearchError(f"calibration groups must be 'type', 'layer', 'one' or a callable, got {groups!r}")


def plan_features(table: CostTable, plans, group_of: dict[str, str]) -> tuple[np.ndarray, list[str]]:
    """``[n_plans, n_groups]``: each group's predicted damage summed over its layers under each plan."""
    names = list(dict.fromkeys(group_of[n] for n in table.layers))
    gi = {g: j for j, g in enumerate(names)}
    dmg = table.frame.set_index(["layer", "option"])["damage"]
    x = np.zeros((len(plans), len(names)))
    for r, plan in enumerate(plans):
        for layer in table.layers:
            x[r, gi[group_of[layer]]] += float(dmg[(layer, plan.option_name(layer))])
    return x, names


@dataclass
class Calibration:
    """Fitted multipliers, group by group, and the fit's residual."""

    multipliers: dict[str, float]
    group_of: dict[str, str]
    residual: float
    plans: int

    def apply(self, table: CostTable) -> CostTable:
        """The table with each layer's damage (and ``damage_std``) scaled by its group's multiplier."""
        f = table.to_frame()
        scale = f["layer"].map(lambda n: self.multipliers[self.group_of[n]]).to_numpy(dtype=float)
        for col in [c for c in f.columns if c.startswith("damage")]:
            f[col] = f[col].to_numpy(dtype=float) * scale
        meta = dict(table.metadata)
        meta["calibration"] = {"multipliers": self.multipliers, "plans": self.plans, "residual": self.residual}
        return CostTable(f, meta)


def calibrate(table: CostTable, plans, losses, *, groups="type", ridge: float = 1e-3) -> Calibration:
    """Fit per-group damage multipliers ``a_g >= 0`` so that ``sum_g a_g t_g(plan)`` matches the
    measured ``losses`` of ``plans`` (non-negative least squares; ``ridge`` pulls each multiplier
    toward the single best scalar, relative to the data's scale; ``ridge=0``: plain NNLS)."""
    from scipy.optimize import nnls

    plans, y = list(plans), np.asarray(losses, dtype=float)
    if len(plans) != len(y) or not len(plans):
        raise MpsearchError(f"calibrate needs one measured loss per plan, got {len(plans)} plans and {len(y)} losses")
    if not np.all(np.isfinite(y)):
        raise MpsearchError("calibrate: the measured losses must be finite numbers")
    if ridge < 0:
        raise MpsearchError(f"calibrate: ridge must be >= 0, got {ridge}")
    group_of = _group_of(table, groups)
    x, names = plan_features(table, plans, group_of)
    tot = x.sum(axis=1)
    scalar = float(max(tot @ y, 0.0) / (tot @ tot)) if tot @ tot > 0 else 1.0
    a, rhs = x, y
    if ridge > 0:
        lam = np.sqrt(ridge * float((x ** 2).sum()) / len(names))
        a = np.vstack([x, lam * np.eye(len(names))])
        rhs = np.concatenate([y, lam * scalar * np.ones(len(names))])
    alpha, _ = nnls(a, rhs, maxiter=50 * max(len(names), 10))
    resid = float(np.linalg.norm(x @ alpha - y))
    return Calibration({g: float(v) for g, v in zip(names, alpha)}, group_of, resid, len(plans))


# ---------------------------------------------------------------------------------- local search
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


def local_search(problem: Problem, start, start_loss: float, measure, *, rounds: int = 1, swaps: int = 4,
                 max_evals: int | None = None, column: str = "size_bits", cap: float | None = None,
                 tried: list | None = None):
    """Measured local search from ``start`` (a choice vector whose measured loss is ``start_loss``).

    ``measure(choice) -> loss`` measures a plan. Each round measures up to ``swaps`` candidate moves
    (:func:`candidate_moves`) and moves to the best if it measured lower. Returns
    ``(choice, loss, log)``; the loss is never above ``start_loss``. ``tried``: choices not to
    propose again (extended with the ones measured here).
    """
    cur, cur_loss = np.asarray(start, dtype=int).copy(), float(start_loss)
    tried = tried if tried is not None else []
    tried.append(cur.copy())
    log, evals = [], 0
    for r in range(rounds):
        room = swaps if max_evals is None else min(swaps, max_evals - evals)
        if room <= 0:
            break
        moves = candidate_moves(problem, cur, column, cap, limit=room, exclude=tried)
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


# ------------------------------------------------------------------------------ evolution
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


def evolve(problem: Problem, start, measure, *, generations: int = 50, offspring: int = 16, survivors=(),
           max_evals: int | None = None, seed: int = 0, max_switches: int = 3, start_loss: float | None = None,
           column: str = "size_bits", time_limit: float | None = None, checkpoint=None, context: str = "",
           progress: bool = False, desc: str = "evolve"):
    """A measured (1 + ``offspring``) evolutionary search from the feasible choice ``start``.

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
    more ``generations`` continue a finished search. ``progress``: a bar over the generations.
    Returns ``(choice, loss, log)``: the loss (at the last level) is never above the start's;
    ``log`` has one row per generation (row 0: the start).
    """
    import json
    from pathlib import Path

    from .fileio import atomic_write_text
    from .sensitivity.base import progress_bar

    survivors = tuple(int(k) for k in survivors)
    if offspring < 1 or any(k < 1 for k in survivors) or list(survivors) != sorted(survivors, reverse=True) \
            or (survivors and survivors[0] > offspring):
        raise MpsearchError(f"evolve: offspring must be >= 1 and survivors a non-increasing sequence of counts "
                            f"<= offspring, got offspring={offspring}, survivors={survivors}")
    rng = np.random.default_rng(seed)
    top = len(survivors)
    levels = size_levels(problem, column)
    cur = np.asarray(start, dtype=int).copy()
    if not problem.is_feasible(cur):
        raise MpsearchError("evolve: the start plan does not fit the budget")
    signature = _evolve_signature(problem, cur, {"offspring": offspring, "survivors": survivors, "seed": seed,
                                                 "max_switches": max_switches, "column": column,
                                                 "start_loss": start_loss}, context)
    path = Path(checkpoint) if checkpoint is not None else None
    state = None
    if path is not None and path.is_file():
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            state = None
        if not isinstance(state, dict) or state.get("signature") != signature:
            state = None  # another search's: start afresh (it is overwritten)
    if state is not None:
        cur, cur_loss, evals = np.array(state["choice"], dtype=int), float(state["loss"]), int(state["evals"])
        rng.bit_generator.state = state["rng"]
        seen, log = set(state["seen"]), state["log"]
    else:
        evals = 0
        if start_loss is None:
            start_loss, evals = measure(cur, top), 1
        cur_loss = float(start_loss)
        seen = {_choice_key(cur)}
        log = [{"generation": 0, "evals": evals, "loss": cur_loss, "improved": False, "children": 0}]
    per_gen = offspring + sum(survivors)
    t0 = time.monotonic()
    done = log[-1]["generation"]
    bar = progress_bar(range(done + 1, int(generations) + 1), enabled=progress, desc=desc,
                       total=max(int(generations) - done, 0))
    for g in bar:
        if max_evals is not None and evals + per_gen > max_evals:
            break
        if time_limit is not None and time.monotonic() - t0 > time_limit:
            break
        kids = []
        for _ in range(20 * offspring):
            if len(kids) >= offspring:
                break
            switches = min(int(rng.geometric(0.5)), max_switches)
            kid = mutate(problem, cur, rng, switches=switches, levels=levels, column=column)
            key = None if kid is None else _choice_key(kid)
            if key is not None and key not in seen:
                seen.add(key)
                kids.append(kid)
        if not kids:
            break
        pool = [(float(measure(k, 0)), k) for k in kids]
        evals += len(pool)
        for level, keep in enumerate(survivors, start=1):
            pool = sorted(pool, key=lambda e: e[0])[:keep]
            pool = [(float(measure(k, level)), k) for _, k in pool]
            evals += len(pool)
        best_loss, best = min(pool, key=lambda e: e[0])
        better = best_loss < cur_loss
        if better:
            cur, cur_loss = best.copy(), best_loss
        log.append({"generation": g, "evals": evals, "loss": cur_loss, "improved": bool(better),
                    "children": len(kids)})
        bar.set_postfix(loss=f"{cur_loss:.4g}")
        if path is not None:
            atomic_write_text(path, json.dumps({"signature": signature, "choice": [int(c) for c in cur],
                                                "loss": cur_loss, "evals": evals, "rng": rng.bit_generator.state,
                                                "seen": sorted(seen), "log": log}))
    return cur, cur_loss, log


# --------------------------------------------------------------------------------------- refine
@dataclass
class Refinement:
    """What :func:`refine` returns: the best measured plan per target and the per-round log."""

    best: dict = field(default_factory=dict)  # target label -> (plan, loss, source)
    log: list = field(default_factory=list)
    evals: int = 0
    calibration: Calibration | None = None


def _choice_of(problem: Problem, plan: BitPlan) -> np.ndarray:
    names = problem.option_names
    return np.array([names.index(plan.option_name(m[0])) for m in problem.items])


def refine(table: CostTable, solver, targets: dict, history: list, measure, *, rounds: int = 1,
           method: str = "calibrate", max_evals: int | None = None, swaps: int = 4, groups="type",
           ridge: float = 1e-3, base_budget: Budget | None = None, key: str = "avg_bits", search=None,
           levels: int = 1, offspring: int = 16, survivors=None, seed: int = 0, max_switches: int = 3,
           time_limit: float | None = None, checkpoint_dir=None, context: str = "",
           progress: bool = False) -> Refinement:
    """Measure -> recalibrate -> re-solve for ``rounds`` rounds over every target budget.

    ``targets``: label -> budget value of ``key`` (e.g. ``{"int4-asym": 4.03}``). ``history``: the
    ``(plan, loss)`` pairs measured so far (uniform plans included); it grows as plans are measured.
    ``measure(plan) -> loss`` applies and measures a plan (lower is better). ``max_evals``: the most
    plans measured in all (``None``: no limit beyond ``rounds``).

    ``method="evolve"``: ``rounds`` generations of :func:`evolve` per target from the best measured
    plan that fits, ``search(plan, level) -> loss`` measuring the children on ``levels`` rungs of
    search data (default: ``measure`` itself, one rung); ``offspring``, ``survivors`` (default: a
    quarter per rung), ``seed``, ``max_switches`` and ``time_limit`` (seconds per target) go to
    :func:`evolve`; with ``checkpoint_dir`` each target's search keeps its checkpoint there
    (``evolve-<target>.json``, resumed when ``context`` and the rest match). Only each target's result
    is measured with ``measure`` and joins ``history``; ``max_evals`` counts every measurement
    (search and ``measure``) and is shared evenly by the targets. A ``search`` with a ``restore()``
    method (:class:`mpsearch.pipeline.SearchLadder`) has it called after each target's search.
    """
    if method not in METHODS:
        raise MpsearchError(f"refine method must be one of {', '.join(METHODS)}, got {method!r}")
    if int(rounds) != rounds or rounds < 0:
        raise MpsearchError(f"refine rounds must be an integer >= 0, got {rounds!r}")
    if max_evals is not None and (int(max_evals) != max_evals or max_evals < 0):
        raise MpsearchError(f"refine_evals must be an integer >= 0, got {max_evals!r}")
    base = base_budget or Budget()
    known = {plan_key(p): float(loss) for p, loss in history}
    out = Refinement()
    budgets = {t: base.with_constraints(**{key: v}) for t, v in targets.items()}
    problems = {t: compile_problem(table, b) for t, b in budgets.items()}
    tried = {t: [] for t in targets}

    def fits(plan, t):
        return problems[t].is_feasible(_choice_of(problems[t], plan))

    def best_fitting(t):
        ok = [(loss, p) for p, loss in history if fits(p, t)]
        return min(ok, key=lambda e: e[0]) if ok else (np.inf, None)

    def run_measure(plan):
        k = plan_key(plan)
        if k not in known:
            known[k] = float(measure(plan))
            history.append((plan, known[k]))
            out.evals += 1
        return known[k]

    def left():
        return None if max_evals is None else max_evals - out.evals

    if method == "evolve":
        _evolve_targets(out, problems, targets, best_fitting, run_measure, left, rounds, search,
                        levels, offspring, survivors, seed, max_switches, measure, time_limit,
                        checkpoint_dir, context, progress)
        return out
    for r in range(1, int(rounds) + 1):
        for t in targets:
            if left() is not None and left() <= 0:
                break
            before, start = best_fitting(t)
            spent0 = out.evals
            if method in ("calibrate", "both"):
                cal = calibrate(table, [p for p, _ in history], [loss for _, loss in history],
                                groups=groups, ridge=ridge)
                out.calibration = cal
                res = solver.solve(cal.apply(table), budgets[t])
                if res.plan is not None:
                    plan = _restamp(res.plan, table, problems[t])
                    run_measure(plan)
            if method in ("local", "both") and (left() is None or left() > 0):
                _, start = best_fitting(t)
                if start is not None:
                    prob = problems[t]
                    cal_prob = prob if out.calibration is None else compile_problem(out.calibration.apply(table), budgets[t])
                    lossf = lambda c: run_measure(_plan_from_choice(prob, c))  # noqa: E731
                    local_search(cal_prob, _choice_of(prob, start), known[plan_key(start)], lossf, rounds=1,
                                 swaps=swaps, max_evals=left(), tried=tried[t])
            after, best = best_fitting(t)
            out.log.append({"round": r, "budget": t, "method": method, "evals": out.evals - spent0,
                            "evals_total": out.evals, "loss_before": before, "loss_after": after,
                            "gain": (before - after) if np.isfinite(before) else np.nan})
            out.best[t] = (best, after)
    for t in targets:
        if t not in out.best:
            loss, p = best_fitting(t)
            out.best[t] = (p, loss)
    return out


def _evolve_targets(out, problems, targets, best_fitting, run_measure, left, rounds, search,
                    levels, offspring, survivors, seed, max_switches, measure, time_limit,
                    checkpoint_dir=None, context="", progress=False):
    """The ``evolve`` method of :func:`refine`, target by target (see there)."""
    if search is None:
        search, levels = (lambda plan, level: measure(plan)), 1  # noqa: E731
    levels = int(levels)
    if levels < 1:
        raise MpsearchError(f"evolve: levels must be >= 1 (rungs of search data), got {levels}")
    if survivors is None:
        survivors = tuple(max(1, offspring // 4 ** k) for k in range(1, levels))
    if len(tuple(survivors)) != levels - 1:
        raise MpsearchError(f"evolve: survivors needs one count per rung after the first ({levels - 1}), "
                            f"got {tuple(survivors)}")
    order = list(targets)
    for n, t in enumerate(order):
        before, start = best_fitting(t)
        if start is None:
            continue
        share = None if left() is None else left() // (len(order) - n) - 1  # one left for ``measure``
        if share is not None and share <= 0:
            break
        prob = problems[t]
        spent = {"n": 0}

        def lossf(choice, level, prob=prob):
            spent["n"] += 1
            return search(_plan_from_choice(prob, choice, "refine-evolve"), level)

        ckpt = None
        if checkpoint_dir is not None:
            from pathlib import Path

            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            ckpt = Path(checkpoint_dir) / f"evolve-{re.sub(r'[^A-Za-z0-9_.=-]+', '_', t)}.json"
        choice, s_loss, glog = evolve(prob, _choice_of(prob, start), lossf, generations=int(rounds),
                                      offspring=offspring, survivors=survivors, max_evals=share, seed=seed,
                                      max_switches=max_switches, time_limit=time_limit, checkpoint=ckpt,
                                      context=f"{context}|{t}", progress=progress, desc=f"evolve {t}")
        if hasattr(search, "restore"):  # a search that switched plans into the model puts it back
            search.restore()
        base_evals = out.evals
        out.evals += spent["n"]
        plan = _plan_from_choice(prob, choice, "refine-evolve")
        plan.provenance["refine"] = "evolve"
        after_plan = run_measure(plan)
        measured = out.evals - base_evals - spent["n"]  # 0 when the search kept its start
        after, best = best_fitting(t)
        for prev, row in zip(glog, glog[1:]):  # the search loss, generation by generation
            out.log.append({"round": row["generation"], "budget": t, "method": "evolve", "data": "search",
                            "evals": row["evals"] - prev["evals"], "evals_total": base_evals + row["evals"],
                            "loss_before": prev["loss"], "loss_after": row["loss"],
                            "gain": prev["loss"] - row["loss"]})
        out.log.append({"round": len(glog) - 1, "budget": t, "method": "evolve", "data": "evaluation",
                        # every plan the search measured, a resumed run's earlier ones too
                        "evals": glog[-1]["evals"] + measured, "evals_total": out.evals, "loss_before": before,
                        "loss_after": after_plan, "gain": before - after_plan,
                        "search_loss_before": glog[0]["loss"], "search_loss_after": s_loss, "search_levels": levels})
        out.best[t] = (best, after)


def plan_key(plan: BitPlan) -> str:
    """A short hash of the plan's layer -> option mapping (plans with the same key are the same)."""
    import hashlib
    import json

    doc = {n: plan.option_name(n) for n in sorted(plan.bits)}
    return hashlib.sha1(json.dumps(doc).encode()).hexdigest()[:16]


def _plan_from_choice(problem: Problem, choice, solver: str = "refine-local") -> BitPlan:
    from .solvers.base import make_plan

    return make_plan(problem, choice, solver=solver, status="measured")


def _restamp(plan: BitPlan, table: CostTable, problem: Problem) -> BitPlan:
    """A plan solved on a calibrated table, with its predicted totals recomputed on ``table``."""
    choice = _choice_of(problem, plan)
    plan.predicted = problem.totals(choice)
    plan.provenance["refine"] = "calibrate"
    return plan
