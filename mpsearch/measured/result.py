"""What the measured path returns and raises: :class:`FrontierRun`, the warnings it gives and
:class:`InfeasibleBudget`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import MpsearchError
from ..plan import BitPlan
from ..table import CostTable


class ProxyWarning(UserWarning):
    """The predicted damage ranks the validated plans poorly against their measured quality."""


class UniformWarning(UserWarning):
    """A measured mixed-precision plan lost to a measured uniform plan of equal or smaller size."""


class InfeasibleBudget(MpsearchError):
    """A requested budget admits no plan (the CLI exits with code 3)."""


@dataclass
class FrontierRun:
    """What :func:`~mpsearch.measured.measured_frontier` returns: plain frames plus the table and plans."""

    table: CostTable
    frontier: pd.DataFrame  # one row per frontier point, predicted + measured where validated
    uniform: pd.DataFrame  # one row per uniform option, measured
    baseline: float  # the metric on the full-precision model
    metric: str
    metric_label: str
    higher_is_better: bool
    proxy: dict
    plans: dict[int, BitPlan] = field(default_factory=dict)  # frontier point -> plan
    recommended: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per target budget
    refinement: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per round x target
    refined: dict[str, BitPlan] = field(default_factory=dict)  # "refined-N" -> plan
    refined_frame: pd.DataFrame = field(default_factory=pd.DataFrame)  # refined plans, measured
    results: dict = field(default_factory=dict)  # target label -> SolveResult at that budget
    uniform_check: dict = field(default_factory=dict)  # counts of mixed plans beating / losing to uniform
    key: str = "avg_bits"
    out: Path | None = None
    files: dict[str, str] = field(default_factory=dict)
    #: every value of the metric on the full-precision model (a multi-value metric's perplexity, top-1...)
    baseline_values: dict = field(default_factory=dict)
    #: the plan of every ``uniform`` row: uniform options and consumer recipes (``Q4_K_M``...)
    baselines: dict[str, BitPlan] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """Frontier and uniform rows in one frame, with a ``kind`` column (``frontier``, ``uniform``,
        ``recipe``: a consumer's mix)."""
        f = self.frontier.assign(kind="frontier")
        u = self.uniform if "kind" in self.uniform else self.uniform.assign(kind="uniform")
        return pd.concat([f, u], ignore_index=True, sort=False)

    def validated(self) -> pd.DataFrame:
        return self.frontier[self.frontier["validated"]]

    def plan_of(self, ref: str) -> BitPlan:
        """The plan a ``recommended`` row names: ``point-N``, ``uniform-OPTION``, ``refined-N`` or a
        consumer recipe's name (``Q4_K_M``, ``pure-q4_K``)."""
        kind, _, name = ref.partition("-")
        if kind == "point":
            return self.plans[int(name)]
        if ref in self.baselines:
            return self.baselines[ref]
        if kind == "uniform" and name in self.table.options:
            return BitPlan.uniform(self.table.layers, name)
        return self.refined[ref]


@dataclass
class Session:
    """What the steps of one measured run share (internal): the model and its fitted metric with
    the full-precision value, the table, solver, swept key and the budget without it, the
    measurement cache, and how to measure (``workers``, ``progress``)."""

    model: object
    metric: object
    baseline: float
    table: CostTable
    solver: object
    key: str
    base: object  # the Budget without the swept key
    cache: object  # a MeasureCache
    progress: bool = True
    workers: int = 1
    baseline_values: dict = field(default_factory=dict)  # every value of a multi-value metric at full precision


@dataclass
class Measured:
    """The plans measured in one run (internal): the frontier frame and its plans in row order, the
    uniform plans and recipes (option -> (plan, use of the key)) and their frame, the raw
    measurements by ``("point", row)`` / ``("uniform", option)``, and the refined plans."""

    front: pd.DataFrame
    plans: list
    uniform: dict
    uframe: pd.DataFrame = field(default_factory=pd.DataFrame)
    by_plan: dict = field(default_factory=dict)
    refined: dict = field(default_factory=dict)
    rframe: pd.DataFrame = field(default_factory=pd.DataFrame)
