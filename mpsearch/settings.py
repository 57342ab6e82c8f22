"""Settings declared as data and checked before any work: the one machinery for every part.

A class declares its settings once, scikit-learn style: the keyword parameters of its ``__init__``
with type annotations and defaults (:func:`settings_of`; a dataclass's fields are exactly that),
and, where a type is not enough, the accepted values in a ``_parameter_constraints`` class
attribute (setting -> list of constraints, any one of which accepts a value)::

    _parameter_constraints = {"chunk_size": [Interval(int, 1, None)],
                              "per_sample": [Choices("auto", "vmap", "loop")],
                              "time_limit": [Interval(float, 0, None, closed="neither"), None]}

A constraint is an :class:`Interval`, a :class:`Choices`, ``None`` (the value ``None``),
``callable`` (any callable) or a class (an instance of it). :func:`check_params` (estimators,
solvers: called by :func:`mpsearch.registry.get_solver` and ``get_estimator``) and
:class:`Settings` (the frozen settings objects of the measured path) apply the same two checks:
the type, with CLI-friendly conversions (``"3"`` is not an int, ``3`` is a float, ``"true"`` a
bool), then the constraints. Refusals are :class:`~mpsearch.errors.SettingsError` naming the
setting, what it must be and what it got.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import types
import typing
from dataclasses import dataclass

from .errors import SettingsError, close_matches


# ----------------------------------------------------------------------------- constraints
class Interval:
    """Numbers of ``kind`` (``int`` or ``float``; a float interval accepts ints) between ``low``
    and ``high`` (``None``: unbounded); ``closed`` says which ends belong to it: ``"both"``,
    ``"left"``, ``"right"`` or ``"neither"``."""

    def __init__(self, kind: type, low=None, high=None, *, closed: str = "both"):
        self.kind, self.low, self.high, self.closed = kind, low, high, closed

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.kind is int and not float(value).is_integer():
            return False
        if not math.isfinite(float(value)):
            return False
        if self.low is not None and (value < self.low or (value == self.low and self.closed in ("right", "neither"))):
            return False
        return not (self.high is not None and (value > self.high or (value == self.high
                                                                       and self.closed in ("left", "neither"))))

    def __str__(self) -> str:
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>=' if self.closed in ('both', 'left') else '>'} {self.low}")
        if self.high is not None:
            bounds.append(f"{'<=' if self.closed in ('both', 'right') else '<'} {self.high}")
        return ("an integer " if self.kind is int else "a number ") + " and ".join(bounds)

    def bad_value(self):
        """A value of the right type outside the interval (for conformance tests)."""
        if self.low is not None:
            return self.kind(self.low) - 1
        return self.kind(self.high) + 1 if self.high is not None else None


class Choices:
    """One of the given values."""

    def __init__(self, *values):
        self.values = tuple(values)

    def accepts(self, value) -> bool:
        try:
            return value in self.values
        except TypeError:  # an unhashable or incomparable value
            return False

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)

    def bad_value(self):
        return "not-" + "-".join(str(v) for v in self.values)


def _accepts(constraint, value) -> bool:
    if constraint is None:
        return value is None
    if constraint is callable:
        return callable(value)
    if isinstance(constraint, type):
        return isinstance(value, constraint)
    return constraint.accepts(value)


def _describe(constraint) -> str:
    if constraint is None:
        return "None"
    if constraint is callable:
        return "a callable"
    if isinstance(constraint, type):
        return f"a {constraint.__name__}"
    return str(constraint)


def describe_constraints(constraints) -> str:
    """``"an integer >= 1 or None"``: what a list of constraints accepts, in words."""
    return " or ".join(_describe(c) for c in constraints)


def satisfies(value, constraints) -> bool:
    return any(_accepts(c, value) for c in constraints)


# -------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """One setting of an estimator, solver or settings object: its name, declared type, default
    and value constraints (``_parameter_constraints``)."""

    name: str
    type: object = None  # the annotation (``int``, ``float | None``...); None: any value
    default: object = inspect.Parameter.empty
    constraints: tuple = ()
    note: str = ""  # what the default means where its value does not say (``None``: ...)

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @property
    def type_name(self) -> str:
        return describe_constraints(self.constraints) if self.constraints else _type_name(self.type)

    def describe(self) -> str:
        default = "(required)" if self.required else f"= {self.default!r}"
        return f"{self.name}: {_type_name(self.type)} {default}" + (f"  ({self.note})" if self.note else "")


def settings_of(cls) -> list[Setting]:
    """The settings a class declares: the keyword parameters of its ``__init__``, with their type
    annotations, defaults, ``_parameter_constraints`` and ``_setting_notes`` (the one declaration,
    scikit-learn style; ``get_params`` reads the same)."""
    sig = inspect.signature(cls.__init__)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not evaluate: leave those settings untyped
        hints = {}
    constraints = getattr(cls, "_parameter_constraints", {}) or {}
    notes = getattr(cls, "_setting_notes", {}) or {}
    out = []
    for name, p in sig.parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = p.default
        if dataclasses.is_dataclass(cls) and default is inspect.Parameter.empty:
            fld = cls.__dataclass_fields__.get(name)
            if fld is not None and fld.default_factory is not dataclasses.MISSING:
                default = fld.default_factory()
        out.append(Setting(name, hints.get(name), default, tuple(constraints.get(name, ())), notes.get(name, "")))
    return out


def check_value(setting: Setting, value, label: str):
    """``value`` converted to ``setting``'s type, or a :class:`SettingsError` naming ``label``."""
    ok, converted = _conform(value, setting.type)
    if ok and setting.constraints and not satisfies(converted, setting.constraints):
        ok = False
    if not ok:
        exc = SettingsError(f"{label} must be {setting.type_name}, got {value!r} ({type(value).__name__})"
                            + ("" if setting.required else f"; default {setting.default!r}"))
        note = f" ({setting.note})" if setting.note else ""
        exc.setting, exc.detail = setting.name, f"must be {setting.type_name}{note}, got {value!r}"
        raise exc
    return converted


def check_params(cls, params: dict, owner: str) -> dict:
    """Refuse settings ``cls`` does not declare (with close matches), values of the wrong type and
    values outside the declared constraints, before any work; ``owner`` names it in messages
    (``"solver 'ilp'"``).

    Returns the params with CLI-friendly conversions applied (``3`` for a float setting becomes
    ``3.0``, ``"true"`` for a bool ``True``). Raises :class:`SettingsError`.
    """
    declared = {s.name: s for s in settings_of(cls)}
    out = {}
    for key, value in params.items():
        if key not in declared:
            raise SettingsError(
                f"{owner} has no setting {key!r}{close_matches(str(key), declared)}; "
                f"its settings: {', '.join(declared) or 'none'} (see 'mpsearch list')"
            )
        out[key] = check_value(declared[key], value, f"{owner}: setting {key!r}")
    missing = [s.name for s in declared.values() if s.required and s.name not in out]
    if missing:
        raise SettingsError(f"{owner} needs the setting(s) {', '.join(missing)}")
    return out


class Settings:
    """Base of the frozen settings dataclasses: every field typed, its constraints declared in
    ``_parameter_constraints``, all checked (and converted) when the object is made; a cross-field
    rule goes in :meth:`_check`. Subclass with ``@dataclass(frozen=True)``."""

    _parameter_constraints: typing.ClassVar[dict] = {}
    _setting_notes: typing.ClassVar[dict] = {}
    _label: typing.ClassVar[str] = ""  # how messages name these settings ("refine": "refine rounds must be ...")

    def __post_init__(self):
        for s in settings_of(type(self)):
            label = f"{self._label} {s.name}" if self._label else s.name
            try:
                value = check_value(s, getattr(self, s.name), label)
            except SettingsError as exc:
                exc.owner = type(self)  # a refusal of this object's own field (not of a part it checks)
                raise
            object.__setattr__(self, s.name, value)
        self._check()

    def _check(self) -> None:
        """Rules between fields (raise :class:`SettingsError`)."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, *, what: str | None = None):
        """The settings from ``values``; an unknown key is refused with close matches."""
        names = cls.field_names()
        unknown = [k for k in values if k not in names]
        if unknown:
            raise SettingsError(f"{what or cls.__name__}: unknown setting {unknown[0]!r}"
                                f"{close_matches(str(unknown[0]), names)}; its settings: {', '.join(names)}")
        return cls(**values)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# ---------------------------------------------------------------------------------- types
def _type_name(hint) -> str:
    if hint is None:
        return "any"
    if hint is type(None):
        return "None"
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(hint) is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def _conform(value, hint):
    """(ok, value converted) for ``value`` against a type annotation."""
    if hint is None or hint is typing.Any:
        return True, value
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            ok, v = _conform(value, arm)
            if ok:
                return True, v
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        if isinstance(value, bool):
            return True, value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return True, value.lower() in ("true", "yes")
        return False, value
    if hint is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, numbers.Integral):
            return True, int(value)
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return True, int(value)
        return False, value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False, value
        return True, float(value)
    if hint is str:
        return isinstance(value, str), value
    if typing.get_origin(hint) is tuple:
        return _conform_tuple(value, typing.get_args(hint))
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value  # Callable, other generics: not checked here


def _conform_tuple(value, args):
    """``tuple[int, ...]``: a list or tuple of such items (converted to a tuple)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        return False, value
    item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
    if item is None:
        return True, tuple(value)
    out = []
    for v in value:
        ok, c = _conform(v, item)
        if not ok:
            return False, value
        out.append(c)
    return True, tuple(out)
