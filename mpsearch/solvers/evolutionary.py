"""Evolutionary: a vectorised NSGA-II-style population search over per-item options.

A genome is one option index per item (only allowed options are ever drawn). The whole population is
evaluated at once with numpy gathers: damage (or a user's measured objective), resource use and the
constraint violation Σ_c max(0, use_c / cap_c − 1). Survival is NSGA-II's: constrained domination
(a feasible plan beats an infeasible one; infeasible plans compare by violation), non-dominated
sorting, crowding distance, binary tournaments; offspring come from uniform crossover and per-gene
mutation to a random allowed option. Duplicate genomes are pushed to the back to keep diversity.

``_solve`` minimises damage under the budget (one objective, constraints by domination);
:meth:`EvolutionarySolver.frontier` minimises (damage, use of one column) together and returns the
non-dominated plans found. With ``objective`` (a callable taking a :class:`~mpsearch.BitPlan` and
returning a loss, e.g. measured on a model), that loss replaces the table's damage; evaluations are
cached per genome. Seeded: the same seed gives the same result.
"""

from __future__ import annotations

import numpy as np

from ..errors import MpsearchError
from ..pareto import best_under
from ..problem import Problem
from .base import make_plan, Solution, Solver
from .greedy import greedy_choice


class EvolutionarySolver(Solver):
    """NSGA-II over the cost table (or over a measured objective).

    Parameters
    ----------
    population, generations:
        Population size and number of generations (work: population x generations evaluations).
    mutation:
        Per-gene mutation probability (``None``: 1 / number of items, at least 0.02).
    seed:
        Random seed.
    warm_start:
        Put the greedy plan and the uniform plans into the first population.
    objective:
        Optional callable ``objective(plan: BitPlan) -> float`` (lower is better) used instead of the
        table's damage: the measured-quality mode.
    """

    name = "evolutionary"
    whole_frontier = True

    def __init__(self, *, population: int = 64, generations: int = 150, mutation: float | None = None,
                 seed: int = 0, warm_start: bool = True, objective=None):
        self.population = population
        self.generations = generations
        self.mutation = mutation
        self.seed = seed
        self.warm_start = warm_start
        self.objective = objective

    # ----------------------------------------------------------------- public
    def _solve(self, problem: Problem) -> Solution:
        G, F, V = self._evolve(problem, column=None)
        feas = V <= 0
        if not feas.any():
            return Solution(None, "infeasible", "the search found no plan that meets the budget")
        j = np.flatnonzero(feas)[np.argmin(F[feas, 0])]
        stats = {"evaluations": self._evals}
        if self.objective is not None:
            stats["objective"] = float(F[j, 0])
        return Solution(G[j], "feasible", stats=stats)

    def frontier(self, problem: Problem, column: str | None = None, budgets=None) -> dict:
        """Non-dominated (cost, damage, choice) points found by minimising both together
        (with ``budgets``: the best of them under each budget)."""
        if column is None:
            cols = {c.column for c in problem.constraints}
            if len(cols) != 1:
                raise MpsearchError("evolutionary frontier: name the resource column (one constraint or column=...)")
            column = cols.pop()
        G, F, V = self._evolve(problem, column=column)
        keep = _first_front(F, V) & (V <= 0)
        G, F = G[keep], F[keep]
        order = np.lexsort((F[:, 0], F[:, 1]))
        G, F = G[order], F[order]
        _, uniq = np.unique(F[:, 1], return_index=True)
        idx = np.arange(problem.n_items)
        dmg = problem.damage[idx, G[uniq]].sum(axis=1)
        sel = np.arange(len(uniq)) if budgets is None else best_under(F[uniq, 1], dmg, budgets)
        uniq = uniq[sel]
        return {"choices": G[uniq], "cost": F[uniq, 1], "damage": dmg[sel], "objective": F[uniq, 0],
                "status": np.full(len(uniq), "feasible"), "stats": {"evaluations": self._evals}}

    # ----------------------------------------------------------------- engine
    def _check(self, problem):
        if not isinstance(self.population, int) or self.population < 4:
            raise MpsearchError(f"evolutionary: population must be an integer >= 4, got {self.population!r}")
        if not isinstance(self.generations, int) or self.generations < 1:
            raise MpsearchError(f"evolutionary: generations must be a positive integer, got {self.generations!r}")
        if self.mutation is not None and not 0 < self.mutation <= 1:
            raise MpsearchError(f"evolutionary: mutation must be in (0, 1], got {self.mutation!r}")
        if self.objective is not None and not callable(self.objective):
            raise MpsearchError("evolutionary: objective must be a callable taking a BitPlan and returning a float")

    def _evolve(self, problem: Problem, column: str | None):
        self._check(problem)
        rng = np.random.default_rng(self.seed)
        N = problem.damage.shape[0]
        allowed = problem.allowed
        counts = allowed.sum(axis=1)
        alist = np.argsort(~allowed, axis=1, kind="stable")  # allowed options first, per item
        idx = np.arange(N)
        cm = problem.constraint_matrix()
        caps = problem.caps()
        cm = np.where(np.isfinite(cm), cm, 0.0)
        scale = np.maximum(np.abs(caps), 1e-300)
        pm = self.mutation or max(1.0 / N, 0.02)
        cache: dict[bytes, float] = {}
        self._evals = 0

        def evaluate(G):
            if self.objective is None:
                f0 = problem.damage[idx, G].sum(axis=1)
            else:
                f0 = np.empty(len(G))
                for j, g in enumerate(G):
                    key = g.astype(np.int16).tobytes()
                    if key not in cache:
                        cache[key] = float(self.objective(make_plan(problem, g, solver=self)))
                    f0[j] = cache[key]
            self._evals += len(G)
            use = cm[:, idx[None, :], G].sum(axis=2).T if len(cm) else np.zeros((len(G), 0))  # [P, C]
            V = np.maximum(use / scale - caps / scale, 0).sum(axis=1) if len(cm) else np.zeros(len(G))
            if column is None:
                return f0[:, None], V
            cost = problem.resources[column][idx, G].sum(axis=1)
            return np.column_stack([f0, cost]), V

        def random_genes(shape):
            r = (rng.random(shape) * counts[None, :]).astype(int)
            return alist[idx[None, :], r]

        P = self.population
        hash_w = np.random.default_rng(12345).random(N)  # genome fingerprints for de-duplication
        G = random_genes((P, N))
        seeds = []
        if self.warm_start:
            cost0 = np.where(allowed, cm.sum(axis=0) if len(cm) else problem.damage * 0, np.inf)
            seeds.append(np.argmin(np.where(allowed, cost0, np.inf), axis=1))  # the cheapest plan
            seeds.extend(problem.uniform_choices())  # uniform plans (nearest allowed option)
            if len(cm):
                g = greedy_choice(problem)
                if g is not None:
                    seeds.append(np.asarray(g))
        for j, s in enumerate(seeds[:P]):
            G[j] = s
        F, V = evaluate(G)
        for _ in range(self.generations):
            rank, crowd = _rank_crowding(F, V)
            a, b = rng.integers(0, P, (2, P))
            better = (rank[a] < rank[b]) | ((rank[a] == rank[b]) & (crowd[a] >= crowd[b]))
            parents = np.where(better, a, b)
            mates = parents[rng.permutation(P)]
            mask = rng.random((P, N)) < 0.5
            child = np.where(mask, G[parents], G[mates])
            mut = rng.random((P, N)) < pm
            child = np.where(mut, random_genes((P, N)), child)
            Fc, Vc = evaluate(child)
            GG, FF, VV = np.vstack([G, child]), np.vstack([F, Fc]), np.concatenate([V, Vc])
            rank, crowd = _rank_crowding(FF, VV)
            _, first = np.unique(GG @ hash_w, return_index=True)
            dup = np.ones(len(GG), dtype=bool)
            dup[first] = False
            order = np.lexsort((-crowd, rank, dup))[:P]
            G, F, V = GG[order], FF[order], VV[order]
        return G, F, V


def _dominates(F, V):
    """[n, n] constrained domination: d[i, j] when i dominates j."""
    feas = V <= 0
    le = np.all(F[:, None, :] <= F[None, :, :], axis=2)
    lt = np.any(F[:, None, :] < F[None, :, :], axis=2)
    pareto = le & lt & feas[:, None] & feas[None, :]
    by_feas = feas[:, None] & ~feas[None, :]
    by_viol = ~feas[:, None] & ~feas[None, :] & (V[:, None] < V[None, :])
    return pareto | by_feas | by_viol


def _first_front(F, V):
    return ~_dominates(F, V).any(axis=0)


def _rank_crowding(F, V):
    """Non-dominated rank (0 = best) and crowding distance of each individual."""
    n = len(F)
    if F.shape[1] == 1:  # one objective: rank by (violation, value); no crowding needed
        order = np.lexsort((F[:, 0], V))
        rank = np.empty(n, dtype=int)
        rank[order] = np.arange(n)
        return rank, np.zeros(n)
    dom = _dominates(F, V)
    count = dom.sum(axis=0)
    rank = np.full(n, -1)
    r = 0
    current = np.flatnonzero(count == 0)
    while len(current):
        rank[current] = r
        count = count - dom[current].sum(axis=0)
        count[rank >= 0] = -1
        current = np.flatnonzero(count == 0)
        r += 1
    rank[rank < 0] = r
    crowd = np.zeros(n)
    for fr in range(r + 1):
        members = np.flatnonzero(rank == fr)
        if len(members) <= 2:
            crowd[members] = np.inf
            continue
        for m in range(F.shape[1]):
            f = F[members, m]
            o = np.argsort(f, kind="stable")
            span = f[o[-1]] - f[o[0]]
            crowd[members[o[0]]] = crowd[members[o[-1]]] = np.inf
            if span > 0:
                crowd[members[o[1:-1]]] += (f[o[2:]] - f[o[:-2]]) / span
    return rank, crowd
