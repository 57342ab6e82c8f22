"""Toy third-party solvers, registered by the tests through mpsearch.registry.register, to show that
the shipped conformance suite runs on plugins and catches broken ones."""

import numpy as np

from mpsearch.solvers.base import Solution, Solver
from mpsearch.solvers.greedy import greedy_choice


class ToyGreedy(Solver):
    """A correct heuristic: the greedy plan."""

    name = "toy-greedy"

    def _solve(self, problem):
        choice = greedy_choice(problem)
        return Solution(None, "infeasible", "no plan") if choice is None else Solution(choice, "feasible")


class IgnoresTheBudget(Solver):
    """Broken: the least damage everywhere, whatever the budget."""

    name = "toy-broken"

    def _solve(self, problem):
        return Solution(np.argmin(problem.damage, axis=1), "feasible")


class ClaimsExactness(ToyGreedy):
    """Broken: declares itself exact but is the greedy heuristic."""

    name = "toy-false-exact"
    exact = True

    def _solve(self, problem):
        sol = super()._solve(problem)
        return Solution(sol.choice, "optimal" if sol.choice is not None else sol.status, sol.message)


class IgnoresItsSeed(ToyGreedy):
    """Broken: takes a seed and ignores it."""

    name = "toy-seedless"

    def __init__(self, *, seed: int = 0):
        self.seed = seed


class ToyWeightError(__import__("mpsearch.sensitivity.base", fromlist=["Estimator"]).Estimator):
    """A toy estimator: damage = sum of squared rounding errors (what weight-error computes)."""

    name = "toy-weight-error"

    def _damage(self, model, ctx):
        from mpsearch.sensitivity.base import weight_errors

        return weight_errors(model, ctx)


class ToyInverted(ToyWeightError):
    """Broken: damage inverted per layer (keep costs the most)."""

    name = "toy-inverted"

    def _damage(self, model, ctx):
        d = super()._damage(model, ctx)
        return d.max(axis=1, keepdims=True) - d


# ------------------------------------------------------------------------------------------------
# a consumer format plugin: one declaration plus its fake quantizer (mpsearch.testing.consumers)
# ------------------------------------------------------------------------------------------------

from mpsearch.formats import Format  # noqa: E402


class ToyInt4(Format):
    """A toy consumer's format: 4-bit codes in groups of 64 with one float32 scale per group, the
    group's signed largest weight over -8 (as llama.cpp's q4_0), so the largest weight maps to -8
    exactly and a second pass finds the same scale."""

    name = "toy-int4-g64"
    bits = 4
    consumer = "toy"
    level_group = 64
    idempotent = True
    description = "toy 4-bit, groups of 64, float32 scales"

    def size_bits(self, out_channels, in_features):
        return out_channels * -(-in_features // 64) * (64 * 4 + 32)

    def check_shape(self, out_channels, in_features):
        return None if in_features % 64 == 0 else f"toy needs in_features divisible by 64 (got {in_features})"

    def _scale(self, x):
        import torch

        mx = x.gather(-1, x.abs().argmax(-1, keepdim=True))
        return mx / -8.0, torch.zeros_like(mx)

    def quantize(self, matrix):
        import torch

        out, cols = matrix.shape
        x = matrix.reshape(out, cols // 64, 64)
        d, zero = self._scale(x)
        inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, 1.0), zero)
        q = torch.clamp(torch.round(x * inv), -8, 7)
        return (q * d).reshape(out, cols)


class ToyNominalBitsPerWeight(ToyInt4):
    """Broken: reports the nominal 4 bits per weight although the scales take 0.5 more."""

    def bits_per_weight(self, in_features=None):
        return 4.0


class ToyFiveBitLevels(ToyInt4):
    """Broken: a 4-bit format whose codes span 5 bits (32 levels per group)."""

    def quantize(self, matrix):
        import torch

        out, cols = matrix.shape
        x = matrix.reshape(out, cols // 64, 64)
        d = x.abs().amax(-1, keepdim=True) / 15.0
        q = torch.clamp(torch.round(x / torch.where(d > 0, d, 1.0)), -16, 15)
        return (q * d).reshape(out, cols)


class ToyFalselyIdempotent(ToyInt4):
    """Broken: declares idempotent, but its scale max|w| / 7.5 moves on a second pass (the largest
    weight rounds to 8 and is clamped to 7)."""

    def _scale(self, x):
        import torch

        d = x.abs().amax(-1, keepdim=True) / 7.5
        return d, torch.zeros_like(d)


class ToyNoShapeRule(ToyInt4):
    """Broken: accepts every shape, but its quantizer needs whole groups of 64."""

    def check_shape(self, out_channels, in_features):
        return None


class ToyTensorScale(ToyInt4):
    """Broken: one scale for the whole matrix while declaring rows_independent (the default)."""

    def _scale(self, x):
        import torch

        flat = x.reshape(-1)
        mx = flat[flat.abs().argmax()].reshape(1, 1, 1).expand(x.shape[0], x.shape[1], 1)
        return mx / -8.0, torch.zeros_like(mx)


# ------------------------------------------------------------------------------------------------
# broken targets (mpsearch.testing.consumers.check_target)
# ------------------------------------------------------------------------------------------------

from mpsearch.targets import Target  # noqa: E402


class ToyTarget(Target):
    """A target of three llama.cpp types (no exporter)."""

    name = "toy-target"
    consumer = "toy"
    options = ("q4_K", "q8_0", "keep")
    default_options = ("q4_K", "q8_0")


class ToyTargetIgnoresShapes(ToyTarget):
    """Broken: offers every option to every layer, q4_K on rows that are not a multiple of 256."""

    def option_reason(self, layer, option):
        return None


class ToyTargetRecipeOutsideOptions(ToyTarget):
    """Broken: its recipe uses q6_K, which it does not list."""

    def recipes(self, layers, imatrix=False):
        return {"uniform-q6_K": {lay.name: "q6_K" for lay in layers}}
