"""CostTable: per-layer x per-option damage and resource costs.

The file contract (CSV, long form, one row per layer x option):

=============  ========  =========================================================================
column         required  meaning
=============  ========  =========================================================================
``layer``      yes       fully-qualified module name
``bits``       yes       weight bit-width of the option (16 = keep)
``damage``     yes       estimated quality loss if only this layer takes this option (>= 0)
``size_bits``  yes       storage of the layer's weight under this option, scales included
``option``     no        option name when several options share a bit-width (default ``intB``/``keep``),
                         or a consumer format (``q4_K``, ``w4a16-g128``: see mpsearch.formats)
``params``     no        weight elements of the layer (needed for ``avg_bits`` budgets)
``group``      no        rows whose layers share a group value must take the same option
``routed_tokens`` no     mixture-of-experts models: the calibration tokens that reached the
                         layer's weight (the fewest of its experts; not a budget column)
any other      no        numeric cost columns (``bops``, ``latency``...), usable in budgets
=============  ========  =========================================================================

A layer lists the options legal for it (a consumer target gives layers of different shapes different
options): every layer offers at least one option, and tied layers (one ``group``) offer the same ones.
``complete=True`` asks for the old rule (every layer the same options). Columns whose names start
with ``damage`` (such as ``damage_std``) describe the estimate and are not budget columns.

The CSV is plain (``pandas.read_csv("table.csv")`` reads it with no options); the metadata (estimator
and its settings, model fingerprint, data, cost) lives in a sidecar JSON file beside it,
``table.csv.meta.json``: ``{"format": "mpsearch.table", "version": 2, "metadata": {...}}``. Version 1
files, whose first line is ``# mpsearch.table {json}``, still load. Column totals must stay finite: a
numeric column whose sum over the table exceeds ``MAX_TOTAL`` is refused (rescale it).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import close_matches, MpsearchError, name_list, TableError
from .fileio import atomic_files, atomic_write_text
from .options import KEEP_BITS, option_sort_key, parse_option

FORMAT = "mpsearch.table"
#: version 2: plain CSV with the metadata in a sidecar ``NAME.meta.json`` (version 1: a first-line
#: ``# mpsearch.table {json}`` comment); both are read
VERSION = 2
READ_VERSIONS = (1, 2)
SIDECAR_SUFFIX = ".meta.json"
#: the largest sum of a numeric column over a table's rows: totals stay far from float overflow even
#: in the solvers' intermediate products (squares, 2^(2b) scalings)
MAX_TOTAL = 1e100
REQUIRED = ("layer", "bits", "damage", "size_bits")
_NON_RESOURCE = {"layer", "option", "bits", "group", "routed_tokens"}


def default_option_name(bits: int) -> str:
    return "keep" if int(bits) == KEEP_BITS else f"int{int(bits)}"


def _option_order(name: str) -> tuple:
    try:
        return (0, option_sort_key(parse_option(name)), name)
    except ValueError:
        return (1, (), name)


class CostTable:
    """A validated cost table with its metadata.

    Build one from a DataFrame (``CostTable(frame, metadata)``), a CSV or JSON file
    (:meth:`read`), or let an estimator make it. ``to_frame()`` returns a copy for pandas work.
    """

    #: the :class:`~mpsearch.imatrix.Imatrix` an estimate rounded with (not part of the file; None when read)
    imatrix = None

    def __init__(self, frame: pd.DataFrame, metadata: dict | None = None, *, complete: bool = False):
        self.metadata = dict(metadata or {})
        self._frame = _validated(frame, complete=complete)
        self.layers: list[str] = list(dict.fromkeys(self._frame["layer"]))
        self.options: list[str] = sorted(set(self._frame["option"]), key=_option_order)

    # ----------------------------------------------------------------- views
    def to_frame(self) -> pd.DataFrame:
        return self._frame.copy()

    @property
    def frame(self) -> pd.DataFrame:
        """The rows (read-only by convention; use :meth:`to_frame` for a copy to modify)."""
        return self._frame

    def __len__(self) -> int:
        return len(self._frame)

    def __repr__(self) -> str:
        est = self.metadata.get("estimator", "?")
        return (
            f"CostTable({len(self.layers)} layers x {len(self.options)} options, "
            f"estimator={est!r}, columns={self.resource_columns})"
        )

    @property
    def resource_columns(self) -> list[str]:
        """Numeric cost columns usable in a budget (``size_bits``, ``params``, ``bops``...)."""
        return [
            c
            for c in self._frame.columns
            if c not in _NON_RESOURCE and not c.startswith("damage")
        ]

    @property
    def groups(self) -> dict[str, str]:
        """layer -> group id for grouped layers."""
        if "group" not in self._frame:
            return {}
        g = self._frame.drop_duplicates("layer").set_index("layer")["group"]
        return {k: v for k, v in g.items() if isinstance(v, str) and v}

    def pivot(self, column: str = "damage") -> pd.DataFrame:
        """A layers x options DataFrame of one column (NaN where a layer lacks an option)."""
        if column not in self._frame:
            raise TableError(
                f"the table has no column {column!r}{close_matches(column, self._frame.columns)}; "
                f"columns: {name_list(self._frame.columns)}"
            )
        p = self._frame.pivot(index="layer", columns="option", values=column)
        return p.reindex(index=self.layers, columns=self.options)

    def option_bits(self) -> dict[str, int]:
        return dict(zip(self._frame["option"], self._frame["bits"].astype(int)))

    def layer_params(self) -> dict[str, float] | None:
        if "params" not in self._frame:
            return None
        return self._frame.drop_duplicates("layer").set_index("layer")["params"].to_dict()

    # ----------------------------------------------------------------- I/O
    @classmethod
    def read(cls, path: str | os.PathLike, *, complete: bool = False) -> CostTable:
        """Read a table from ``.csv`` (metadata from the sidecar or a version-1 first line) or ``.json``."""
        path = Path(path)
        if not path.is_file():
            raise TableError(f"cost table {str(path)!r} does not exist")
        try:
            if path.suffix.lower() == ".json":
                doc = json.loads(path.read_text(encoding="utf-8-sig"))
                if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                    raise TableError(
                        f"{path}: not an mpsearch table (expected a JSON object with "
                        f"\"format\": \"{FORMAT}\")"
                    )
                _check_version(doc.get("version"), path)
                rows = doc.get("rows", [])
                if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                    raise TableError(f"{path}: 'rows' must be a list of objects (one per layer x option)")
                return cls(pd.DataFrame(rows), _metadata_of(doc, path), complete=complete)
            with path.open(encoding="utf-8-sig") as fh:
                first = fh.readline()
            metadata = {}
            skip = 0
            if first.startswith("#"):  # version 1: the metadata on the first line
                skip = 1
                head = first[1:].strip()
                if head.startswith(FORMAT):
                    try:
                        doc = json.loads(head[len(FORMAT):].strip() or "{}")
                    except json.JSONDecodeError as exc:
                        raise TableError(f"{path}: the '# {FORMAT}' line is not valid JSON ({exc})") from None
                    metadata = _metadata_of(doc, path, where=f"the '# {FORMAT}' line")
            sidecar = sidecar_path(path)
            if sidecar.is_file():
                metadata = read_sidecar(sidecar)
            frame = pd.read_csv(path, skiprows=skip, encoding="utf-8-sig")
        except TableError:
            raise
        except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError,
                OSError) as exc:
            raise TableError(f"{path}: cannot be read as a cost table: {_one_line(exc)}") from None
        return cls(frame, metadata, complete=complete)

    def write(self, path: str | os.PathLike) -> Path:
        """Write to ``.json``, or to a plain ``.csv`` plus its ``.meta.json`` sidecar, atomically."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            doc = {
                "format": FORMAT,
                "version": VERSION,
                "metadata": self.metadata,
                "rows": json.loads(self._frame.to_json(orient="records")),
            }
            atomic_write_text(path, json.dumps(doc, indent=1, default=_json_default))
            return path

        meta = {"format": FORMAT, "version": VERSION, "table": path.name, "metadata": self.metadata}
        # both or neither; the sidecar first: a reader that finds the new CSV finds its metadata
        with atomic_files(sidecar_path(path), path) as (side, csv):
            Path(side).write_text(json.dumps(meta, indent=1, default=_json_default) + "\n", encoding="utf-8")
            self._frame.to_csv(csv, index=False)
        return path

    to_csv = write

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, metadata: dict | None = None, **kw) -> CostTable:
        return cls(frame, metadata, **kw)

    def with_frame(self, frame: pd.DataFrame, **metadata) -> CostTable:
        """A new table with other rows and this table's metadata updated by ``metadata``."""
        return CostTable(frame, {**self.metadata, **metadata})


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def _check_version(version, path) -> None:
    if version is not None and (isinstance(version, bool) or version not in READ_VERSIONS):
        raise TableError(
            f"{path}: cost table version {version!r} is not supported (this mpsearch reads "
            f"versions {', '.join(map(str, READ_VERSIONS))}); upgrade mpsearch or re-create the table"
        )


def _metadata_of(doc, path, where: str = "the table") -> dict:
    """The ``metadata`` object of a table document (or ``{}``), its shape checked."""
    if not isinstance(doc, dict):
        raise TableError(f"{path}: {where} must hold a JSON object, got {type(doc).__name__}")
    _check_version(doc.get("version"), path)
    meta = doc.get("metadata")
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise TableError(f"{path}: {where}: 'metadata' must be a JSON object, got {type(meta).__name__}")
    return meta


def sidecar_path(path) -> Path:
    """Where the metadata of the CSV table ``path`` lives: ``table.csv`` -> ``table.csv.meta.json``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def read_sidecar(path) -> dict:
    """The metadata of a sidecar file (checked: a JSON object of this format and a known version)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TableError(f"{path}: the table's metadata file is not valid JSON ({_one_line(exc)}); "
                         f"fix or delete it") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise TableError(f"{path}: not an mpsearch table metadata file (expected a JSON object with "
                         f"\"format\": \"{FORMAT}\"); fix or delete it")
    return _metadata_of(doc, path, where="the metadata file")


def _one_line(exc) -> str:
    return " ".join(str(exc).split())


def _numeric(column: pd.Series) -> pd.Series:
    """A column as floats, NaN where a cell is not a number (booleans and objects included)."""
    def one(v):
        if isinstance(v, bool) or isinstance(v, (list, dict, set, tuple)):
            return np.nan
        return v

    try:
        out = pd.to_numeric(column.map(one), errors="coerce")
        return out if out.dtype.kind in "iuf" else out.astype(float)
    except (TypeError, ValueError, OverflowError):
        return pd.Series(np.nan, index=column.index)


def _py(value):
    """A cell as a plain Python value (``4``, not ``np.int64(4)``) for messages."""
    return value.item() if isinstance(value, np.generic) else value


def _row(frame: pd.DataFrame, i) -> str:
    r = frame.loc[i]
    return f"row {int(i) + 1} (layer {_py(r['layer'])!r}, bits {_py(r['bits'])!r})"


def _check_option_names(df: pd.DataFrame, rows) -> None:
    """The names in the ``option`` column follow the one option grammar (:func:`mpsearch.options.parse_option`:
    ``keep``, ``intB[-gG][-asym]``, a consumer format such as ``q4_K``) and mean the row's bits."""
    firsts = df.loc[rows].drop_duplicates(["option", "bits"])
    for i, r in firsts.iterrows():
        name = r["option"]
        try:
            opt = parse_option(name)
        except MpsearchError as exc:
            detail = str(exc) if repr(str(name).strip().lower()) in str(exc) else f"option {name!r}: {exc}"
            raise TableError(f"{_row(df, i)}: {detail}") from None
        if opt.bits != int(r["bits"]):
            raise TableError(f"{_row(df, i)}: option {name!r} means {opt.bits} bits, not {int(r['bits'])}; fix the "
                             f"name or the bits")


def _validated(frame: pd.DataFrame, *, complete: bool) -> pd.DataFrame:
    df = _columns_checked(frame)
    _check_numbers(df)
    _check_options(df)
    _check_layers(df, complete)
    return df


def _columns_checked(frame) -> pd.DataFrame:
    """A copy of ``frame`` with the required columns, once each, text columns holding text."""
    if not isinstance(frame, pd.DataFrame):
        raise TableError(f"a cost table is built from a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise TableError(
            f"the cost table lacks the required column(s) {name_list(missing)}; required: "
            f"{', '.join(REQUIRED)}; found: {name_list(frame.columns)}"
        )
    if frame.empty:
        raise TableError("the cost table has no rows")
    df = frame.reset_index(drop=True).copy()
    df.columns = [str(c) for c in df.columns]
    if df.columns.duplicated().any():
        raise TableError(f"the cost table has the column {df.columns[df.columns.duplicated()][0]!r} twice")
    for col in ("layer", "option", "group"):  # text columns: cells that are lists or objects are refused
        if col in df.columns:
            odd = df.index[df[col].map(lambda v: isinstance(v, (list, dict, set, tuple)))]
            if len(odd):
                raise TableError(f"row {int(odd[0]) + 1}: column {col!r} must hold text, got {df.loc[odd[0], col]!r}")
    return df


def _check_numbers(df: pd.DataFrame) -> None:
    """Layer names, integer bits and finite numbers (converted in place); damage and size >= 0."""
    # layer names
    bad = df.index[df["layer"].isna() | (df["layer"].astype(str).str.strip() == "")]
    if len(bad):
        raise TableError(f"row {int(bad[0]) + 1}: the 'layer' column is empty")
    df["layer"] = df["layer"].astype(str)
    # bits
    bits = _numeric(df["bits"])
    bad = df.index[bits.isna() | (bits != bits.round()) | (bits < 1) | (bits > 32)]
    if len(bad):
        raise TableError(
            f"{_row(df, bad[0])}: 'bits' must be an integer from 1 to 32, got {_py(df.loc[bad[0], 'bits'])!r}"
        )
    df["bits"] = bits.astype(int)
    # numeric columns
    numeric = [c for c in df.columns if c not in ("layer", "option", "group")]
    for col in numeric:
        values = _numeric(df[col])
        bad = df.index[values.isna() | ~np.isfinite(values.fillna(0).to_numpy(dtype=float))]
        if len(bad):
            raise TableError(
                f"{_row(df, bad[0])}: column {col!r} must hold finite numbers, "
                f"got {_py(df.loc[bad[0], col])!r}"
            )
        with np.errstate(over="ignore", invalid="ignore"):
            total = float(np.abs(values.to_numpy(dtype=float)).sum())
        if not total <= MAX_TOTAL:
            raise TableError(
                f"column {col!r} sums to more than {MAX_TOTAL:g} over the table's rows, so plan totals "
                f"would overflow; rescale it (smaller units) so that its values stay below "
                f"{MAX_TOTAL / len(df):.3g} per row"
            )
        df[col] = values
    for col in ("damage", "size_bits"):
        bad = df.index[df[col] < 0]
        if len(bad):
            raise TableError(
                f"{_row(df, bad[0])}: {col!r} must be >= 0, got {_py(df.loc[bad[0], col])!r}"
            )


def _check_options(df: pd.DataFrame) -> None:
    """Option names (the bits' default names where none is given, in place); one row per layer x option."""
    # option names
    default = df["bits"].map(default_option_name)
    if "option" in df.columns:
        opt = df["option"]
        given = opt.notna() & (opt.astype(str).str.strip() != "")
        df["option"] = opt.where(given, default).astype(str)
        _check_option_names(df, df.index[given])
    else:
        df.insert(1, "option", default)
    # duplicates
    dup = df.index[df.duplicated(["layer", "option"], keep="first")]
    if len(dup):
        r = df.loc[dup[0]]
        raise TableError(
            f"row {int(dup[0]) + 1}: layer {r['layer']!r} has option {r['option']!r} twice; "
            f"give each layer x option one row (use the 'option' column to tell formats apart)"
        )


def _check_layers(df: pd.DataFrame, complete: bool) -> None:
    """Per layer: the same options everywhere (``complete``), constant params and group, and tied
    layers offering the same options (``group`` normalised in place)."""
    # per-layer option sets
    opts_by_layer = df.groupby("layer", sort=False)["option"].apply(frozenset)
    if complete:
        every = frozenset(df["option"])
        for layer, opts in opts_by_layer.items():
            if opts != every:
                lacking = sorted(every - opts, key=_option_order)
                raise TableError(
                    f"layer {layer!r} lacks option(s) {name_list(lacking)} that other layers "
                    f"offer; give every layer the same options (or restrict with budget bounds)"
                )
    # per-layer constants
    for col in ("params", "group"):
        if col in df.columns:
            n = df.groupby("layer", sort=False)[col].nunique(dropna=False)
            if (n > 1).any():
                layer = n.index[n > 1][0]
                raise TableError(f"layer {layer!r} has different {col!r} values in different rows")
    if "group" in df.columns:
        df["group"] = df["group"].where(df["group"].notna(), None)
        df["group"] = df["group"].map(lambda g: None if g is None or (isinstance(g, float) and math.isnan(g)) else str(g))
        layer_group = df.drop_duplicates("layer").set_index("layer")["group"]
        for gid, members in layer_group.dropna().groupby(layer_group.dropna()):
            sets = {m: opts_by_layer[m] for m in members.index}
            first = next(iter(sets))
            for m, s in sets.items():
                if s != sets[first]:
                    raise TableError(
                        f"group {gid!r}: layers {first!r} and {m!r} offer different options "
                        f"({name_list(sorted(sets[first], key=_option_order))} vs "
                        f"{name_list(sorted(s, key=_option_order))}); tied layers must share options"
                    )
