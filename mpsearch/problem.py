"""The multiple-choice problem every solver works on, compiled from a CostTable and a Budget.

Tied layers (the table's ``group`` column and the budget's tie regexes) become one *item* whose
costs are the sums over its members, so that every solver honours ties by construction. Per-layer
bounds and pins become a mask of allowed options. The result is dense numpy arrays::

    damage[i, k]          summed damage of item i under option k (inf where not allowed)
    resources[c][i, k]    summed column c
    allowed[i, k]         option k allowed for item i
    caps[j]               upper bound of constraint j on column constraints[j].column
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .budget import Budget, matches
from .errors import BudgetError, close_matches, name_list
from .filesize import describe_value, file_constraints, file_model_of, padded_bits
from .table import CostTable
from .ties import connected_groups, groups_of, tie_groups


@dataclass
class Constraint:
    """One "sum of ``column`` <= ``cap``" constraint, with the user's own units for messages."""

    key: str  # as the user wrote it: avg_bits, size_mb, bops...
    column: str
    cap: float  # in column units
    unit_scale: float = 1.0  # user value = (column sum + offset) / unit_scale
    offset: float = 0.0  # what the consumer's file holds besides the planned layers (file budgets)
    unit: str = ""  # the user's unit (file budgets: B, MiB, GiB...)
    label: str = ""  # the budget as the user wrote it, where that is not a number (size=Q4_K_M)
    reference: float | None = None  # the named recipe's value (size=NAME)

    def to_user(self, column_sum: float) -> float:
        return (column_sum + self.offset) / self.unit_scale

    def describe(self, column_sum: float) -> str:
        """A column sum in the user's words (``3.41 GiB``, ``2.25``)."""
        if not self.unit:
            return f"{self.to_user(column_sum):.6g}"

        return describe_value(self.key, self.to_user(column_sum), self.unit, self.reference)


@dataclass
class Problem:
    items: list[list[str]]
    option_names: list[str]
    option_bits: np.ndarray
    allowed: np.ndarray
    damage: np.ndarray
    resources: dict[str, np.ndarray]
    constraints: list[Constraint]
    total_params: float | None = None
    table_metadata: dict = field(default_factory=dict)
    file: dict | None = None  # file budgets: the file model's offsets (see mpsearch.filesize)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_options(self) -> int:
        return len(self.option_names)

    @property
    def n_layers(self) -> int:
        return sum(len(i) for i in self.items)

    def caps(self) -> np.ndarray:
        return np.array([c.cap for c in self.constraints], dtype=float)

    def constraint_matrix(self) -> np.ndarray:
        """``[n_constraints, n_items, n_options]`` resource use (inf where not allowed)."""
        if not self.constraints:
            return np.zeros((0, self.n_items, self.n_options))
        mats = np.stack([self.resources[c.column] for c in self.constraints])
        return np.where(self.allowed[None], mats, np.inf)

    def totals(self, choice) -> dict[str, float]:
        """Column sums (and damage) of a choice vector (option index per item)."""
        idx = np.arange(self.n_items)
        choice = np.asarray(choice, dtype=int)
        out = {"damage": float(self.damage[idx, choice].sum())}
        for col, mat in self.resources.items():
            out[col] = float(mat[idx, choice].sum())
        if self.total_params and "size_bits" in out:
            out["avg_bits"] = out["size_bits"] / self.total_params
        if self.file and "size_bits" in out:  # the whole file as the consumer writes it
            f = self.file
            out["file_bytes"] = (out.get(f["column"], out["size_bits"]) + f["file_offset_bits"]) / 8.0
            out["bpw"] = (out["size_bits"] + f["tensor_offset_bits"]) / f["elements"]
        return out

    def usage(self, choice) -> np.ndarray:
        idx = np.arange(self.n_items)
        choice = np.asarray(choice, dtype=int)
        return np.array([self.resources[c.column][idx, choice].sum() for c in self.constraints])

    def is_feasible(self, choice, rtol: float = 1e-9) -> bool:
        choice = np.asarray(choice, dtype=int)
        if not self.allowed[np.arange(self.n_items), choice].all():
            return False
        caps = self.caps()
        return bool(np.all(self.usage(choice) <= caps + rtol * np.maximum(np.abs(caps), 1.0)))

    def min_usage(self) -> np.ndarray:
        """Smallest achievable sum of each constraint's column, each on its own."""
        cm = self.constraint_matrix()
        return cm.min(axis=2).sum(axis=1) if len(cm) else np.zeros(0)

    def infeasibility(self) -> str | None:
        """A message naming the smallest achievable value when no plan can meet a constraint."""
        mins = self.min_usage()
        msgs = []
        for c, m in zip(self.constraints, mins):
            if m > c.cap * (1 + 1e-9) + 1e-12:
                msgs.append(
                    f"budget {c.key}<={c.label or c.describe(c.cap)} cannot be met: the smallest achievable "
                    f"{c.key} is {c.describe(m)}"
                )
        return "; ".join(msgs) if msgs else None

    def uniform_choices(self) -> list[np.ndarray]:
        """One choice vector per option k: every item at option k, or at its nearest allowed option
        (by option index) where k is not allowed. The uniform plans solvers start from."""
        K = self.n_options
        out = []
        for k in range(K):
            near = np.abs(np.arange(K)[None, :] - k) + np.where(self.allowed, 0, 10 * K)
            out.append(np.argmin(near, axis=1))
        return out

    def decode(self, choice) -> dict[str, str]:
        """layer -> option name."""
        out = {}
        for members, k in zip(self.items, np.asarray(choice, dtype=int)):
            for layer in members:
                out[layer] = self.option_names[k]
        return out


def group_items(layers, group_of: dict) -> list[list[str]]:
    """Layers gathered into decision items: one per tie group (members in layer order), one per
    untied layer, in the order of first appearance."""
    return connected_groups(layers, groups_of(group_of))


def compile_problem(table: CostTable, budget: Budget | None = None) -> Problem:
    """Check ``budget`` against ``table`` and build the dense problem."""
    budget = budget or Budget()
    layers, options = table.layers, table.options
    bits_of = table.option_bits()
    option_bits = np.array([bits_of[o] for o in options], dtype=int)
    cols = ["damage"] + table.resource_columns
    layer_allowed, layer_vals = _layer_arrays(table, cols)
    layer_allowed &= _rule_mask(budget, layers, options, option_bits)
    file_cons, file_info = _file_budgets(table, budget, layer_allowed, layer_vals)
    extra = tie_groups(layers, ties=budget.ties) if budget.ties else {}
    # layers that share a table group or a tie-regex group end up in one item
    items = connected_groups(layers, groups_of(dict(table.groups)) + groups_of(extra))
    allowed, vals = _item_arrays(items, {n: i for i, n in enumerate(layers)}, layer_allowed, layer_vals)
    damage = np.where(allowed, vals.pop("damage"), np.inf)
    params = table.layer_params()
    total_params = float(sum(params.values())) if params else None
    return Problem(
        items=items,
        option_names=list(options),
        option_bits=option_bits,
        allowed=allowed,
        damage=damage,
        resources=vals,
        constraints=_constraints(budget, total_params, list(vals)) + file_cons,
        total_params=total_params,
        table_metadata=dict(table.metadata),
        file=file_info,
    )


def _file_budgets(table: CostTable, budget: Budget, layer_allowed, layer_vals: dict):
    """The ``size``/``file``/``bpw`` budgets as constraints (a ``file_bits`` column is added to
    ``layer_vals`` where padding makes a row's file bytes differ from its size), and the offsets
    that turn planned totals into whole-file ones."""
    if not budget.file:
        return [], None

    fm = file_model_of(table.metadata)
    layers = table.layers
    if set(layers) != set(fm.planned):
        extra = [n for n in layers if n not in fm.planned] or [n for n in fm.planned if n not in set(layers)]
        raise BudgetError(f"budgets size=, file= and bpw= need the table's layers to be those its file model was "
                          f"made for; {name_list(extra, 3)} differ. Re-estimate the table")
    n_tensors = np.array([[max(len(fm.planned[n]), 1)] for n in layers], dtype=float)
    padded = padded_bits(layer_vals["size_bits"], n_tensors, fm.alignment)
    if fm.row_extra:  # per-tensor header records that depend on the option (safetensors)
        padded = padded + 8.0 * np.array([[float(fm.row_extra.get(n, {}).get(o, 0)) for o in table.options]
                                          for n in layers])
    column = "size_bits"
    if not np.array_equal(padded[layer_allowed], layer_vals["size_bits"][layer_allowed]):
        column = "file_bits"
        layer_vals["file_bits"] = padded
    cons, base = file_constraints(budget.file, fm, column)
    b = fm.bases[base]
    info = {"consumer": fm.consumer, "base": base, "command": b.get("command", ""), "column": column,
            "elements": float(fm.elements),
            "file_offset_bits": 8.0 * (fm.header_bytes + b["padded_bytes"]),
            "tensor_offset_bits": 8.0 * b["tensor_bytes"]}
    return [Constraint(c.key, c.column, c.cap, c.unit_scale, c.offset, c.unit, c.label, c.reference)
            for c in cons], info


def _layer_arrays(table: CostTable, cols: list[str]):
    """Per layer x option: which options the table offers, and each column's values."""
    frame = table.frame
    li = frame["layer"].map({n: i for i, n in enumerate(table.layers)}).to_numpy()
    ki = frame["option"].map({o: k for k, o in enumerate(table.options)}).to_numpy()
    shape = (len(table.layers), len(table.options))
    offered = np.zeros(shape, dtype=bool)
    offered[li, ki] = True
    vals = {}
    for col in cols:
        m = np.zeros(shape)
        m[li, ki] = frame[col].to_numpy(dtype=float)
        vals[col] = m
    return offered, vals


def _rule_mask(budget: Budget, layers: list[str], options: list[str], option_bits: np.ndarray) -> np.ndarray:
    """Per layer x option: allowed by the budget's --min-bits, --max-bits and --pin rules."""
    for rule, name in ((budget.min_bits, "min_bits"), (budget.max_bits, "max_bits"), (budget.pins, "pin")):
        for pattern in rule:
            if not any(matches(pattern, n) for n in layers):
                raise BudgetError(
                    f"{name} rule {pattern!r} matches no layer of the table"
                    f"{close_matches(pattern, layers)}"
                )
    pins = {pattern: _pin_mask(pattern, pin, options, option_bits) for pattern, pin in budget.pins.items()}
    mask = np.ones((len(layers), len(options)), dtype=bool)
    for i, n in enumerate(layers):
        for pattern, b in budget.min_bits.items():
            if matches(pattern, n):
                mask[i] &= option_bits >= b
        for pattern, b in budget.max_bits.items():
            if matches(pattern, n):
                mask[i] &= option_bits <= b
        for pattern, pin in pins.items():
            if matches(pattern, n):
                mask[i] &= pin
    return mask


def _pin_mask(pattern: str, pin, options: list[str], option_bits: np.ndarray) -> np.ndarray:
    """The options a pin names: an option name, a bit-width, or ``keep``."""
    pin_s = str(pin).strip()
    if pin_s in options:
        mask = np.array([o == pin_s for o in options])
    elif pin_s.isdigit():
        mask = option_bits == int(pin_s)
    elif pin_s.lower() == "keep":
        mask = option_bits == 16
    else:
        raise BudgetError(f"pin {pattern}={pin}: the table has no option {pin!r}; options: {name_list(options)}")
    if not mask.any():
        raise BudgetError(
            f"pin {pattern}={pin}: the table has no option with that bit-width; options: {name_list(options)}"
        )
    return mask


def _item_arrays(items, layer_index: dict, layer_allowed: np.ndarray, layer_vals: dict):
    """Per item x option: allowed for every member, and each column summed over the members."""
    for i in np.flatnonzero(~layer_allowed.any(axis=1)):
        raise BudgetError(
            f"layer {list(layer_index)[i]!r}: the per-layer bounds and pins leave it no option; loosen "
            f"--min-bits/--max-bits/--pin"
        )
    N, K = len(items), layer_allowed.shape[1]
    allowed = np.ones((N, K), dtype=bool)
    vals = {col: np.zeros((N, K)) for col in layer_vals}
    for j, members in enumerate(items):
        idx = [layer_index[m] for m in members]
        allowed[j] = layer_allowed[idx].all(axis=0)
        if not allowed[j].any():
            raise BudgetError(
                f"tied layers {name_list(members)} have no option in common after bounds and pins; "
                f"give tied layers the same bounds"
            )
        for col in layer_vals:
            vals[col][j] = layer_vals[col][idx].sum(axis=0)
    return allowed, vals


def _constraints(budget: Budget, total_params: float | None, columns: list[str]) -> list[Constraint]:
    """The budget's "sum <= cap" constraints in column units."""
    constraints = []
    for key, value in budget.constraints.items():
        if key == "avg_bits":
            if not total_params:
                raise BudgetError(
                    "budget avg_bits needs a 'params' column in the table (weights per layer); "
                    "use size_bits or size_mb instead, or add the column"
                )
            constraints.append(Constraint(key, "size_bits", value * total_params, total_params))
        elif key == "size_mb":
            constraints.append(Constraint(key, "size_bits", value * 8e6, 8e6))
        elif key in columns:
            constraints.append(Constraint(key, key, value))
        else:
            valid = ["avg_bits", "size_mb", "size", "file", "bpw"] + columns
            raise BudgetError(
                f"budget key {key!r} is not a column of the table{close_matches(key, valid)}; "
                f"valid keys: {name_list(valid)}"
            )
    return constraints


# ------------------------------------------------ the greedy plan (solvers.greedy; sensitivity's stopping rule)
def hull_segments(cost: np.ndarray, damage: np.ndarray, start: np.ndarray):
    """Lower-convex-hull upgrades of every item from option ``start`` (vectorised over items).

    Gift wrapping: from the current vertex, the next one is the option with the largest damage saved
    per unit of cost (ties: the cheaper one). Returns arrays ``(item, from, to, ratio)``.
    """
    N, K = cost.shape
    idx = np.arange(N)
    cur = start.copy()
    items, frm, to, ratio = [], [], [], []
    active = np.ones(N, dtype=bool)
    for _ in range(K):
        dc = cost - cost[idx, cur][:, None]
        dd = damage[idx, cur][:, None] - damage
        ok = (dc > 0) & (dd > 0) & np.isfinite(damage) & active[:, None]
        r = np.where(ok, dd / np.where(ok, dc, 1.0), -np.inf)
        best = r.max(axis=1)
        has = np.isfinite(best)
        if not has.any():
            break
        # among options of the best ratio, the cheapest
        nxt = np.argmin(np.where(r >= best[:, None] * (1 - 1e-12), cost, np.inf), axis=1)
        items.append(idx[has])
        frm.append(cur[has])
        to.append(nxt[has])
        ratio.append(best[has])
        cur = np.where(has, nxt, cur)
        active &= has
    if not items:
        e = np.zeros(0, dtype=int)
        return e, e, e, np.zeros(0)
    return tuple(np.concatenate(a) for a in (items, frm, to, ratio))


def greedy_choice(problem: Problem, fill: bool = True) -> np.ndarray | None:
    """The greedy plan of ``problem`` (option index per item), or ``None`` when even the cheapest
    plan breaks a constraint. The start other solvers warm-start from (ilp, evolutionary, optuna).
    """
    damage = problem.damage
    N, K = damage.shape
    idx = np.arange(N)
    if not problem.constraints:
        return np.argmin(damage, axis=1)
    cm = problem.constraint_matrix()  # [C, N, K]
    caps = problem.caps()
    weights = 1.0 / np.maximum(np.abs(caps), 1e-300)
    cost = np.tensordot(weights, np.where(np.isfinite(cm), cm, 0.0), axes=1)
    cost = np.where(problem.allowed, cost, np.inf)
    start = argmin_lex(cost, damage)
    choice = start.copy()
    used = cm[:, idx, choice].sum(axis=1)
    if np.any(used > caps * (1 + 1e-12) + 1e-12):
        return None
    seg_i, seg_a, seg_b, seg_r = hull_segments(cost, damage, start)
    order = np.lexsort((seg_i, -seg_r))
    deltas = (cm[:, seg_i, seg_b] - cm[:, seg_i, seg_a]).T[order].tolist()
    tol = caps * 1e-12 + 1e-12
    room = (caps + tol - used).tolist()
    C = len(room)
    pick = choice.tolist()
    for i, a, b, delta in zip(seg_i[order].tolist(), seg_a[order].tolist(), seg_b[order].tolist(), deltas):
        if pick[i] == a and all(delta[c] <= room[c] for c in range(C)):
            for c in range(C):
                room[c] -= delta[c]
            pick[i] = b
    choice = np.array(pick)
    used = cm[:, idx, choice].sum(axis=1)
    if fill:
        finite = np.where(np.isfinite(damage), np.abs(damage), 0.0)
        thr = 1e-12 * float(finite.max())
        for _ in range(N * K):
            gain = damage[idx, choice][:, None] - damage  # [N, K]
            delta = cm - cm[:, idx, choice][:, :, None]  # [C, N, K]
            fits = np.all(used[:, None, None] + delta <= (caps + tol)[:, None, None], axis=0)
            gain = np.where(fits & problem.allowed & (gain > thr), gain, -np.inf)
            flat = int(np.argmax(gain))
            if not np.isfinite(gain.flat[flat]):
                break
            i, k = divmod(flat, K)
            used += delta[:, i, k]
            choice[i] = k
    return choice


def argmin_lex(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Per row, the index of the smallest ``primary``, ties broken by the smallest ``secondary``."""
    best = primary.min(axis=1, keepdims=True)
    sec = np.where(primary <= best, secondary, np.inf)
    return np.argmin(sec, axis=1)
