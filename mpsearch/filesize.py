"""The consumer's whole file: what budgets in the user's words measure.

A plan decides the planned layers; the file a consumer writes holds more: the token embedding,
the norms, the output layer, routers, as that consumer stores them, and a header. Budgets in the
user's words count the whole file:

- ``size=NAME``: the exact file of one of the consumer's recipes or uniform options for this
  model (``size=Q4_K_M``, ``size=q4_0`` for llama.cpp, ``size=w4a16-g32`` for vLLM). The plan
  keeps the recipe's unplanned tensors (for llama.cpp: the same base mix on the
  ``llama-quantize`` command line), so every byte of difference goes to the planned layers;
- ``file=3.2GiB``: the file in bytes (``B``, ``KB``/``MB``/``GB``/``TB`` = powers of 1000,
  ``KiB``/``MiB``/``GiB``/``TiB`` = powers of 1024; a bare number is bytes);
- ``bpw=4.5``: bits per weight of the whole model as llama.cpp reports it on loading
  (``file size = ... (4.50 BPW)``: every tensor's bytes x 8 / every tensor's elements; no header).

A :class:`FileModel` holds what these need, recorded by ``estimate`` in the table's metadata
(``metadata["file"]``) because a table alone does not know the tensors it does not plan; it is
built from a model or a GGUF by :mod:`mpsearch.filemodels`.

**llama.cpp** (GGUF as ``llama-quantize --tensor-type-file PLAN IN OUT BASE`` writes it,
``src/llama-quant.cpp``): the planned tensors at their planned types; every other tensor as
llama-quantize types it under the base mix (:func:`mpsearch.targets.llamacpp_mixes.mix_types`:
the mix decides ``token_embd`` and ``output``; norms, routers and 1-D tensors are copied from IN);
each tensor's data padded to the GGUF alignment (32); the header is IN's metadata (llama-quantize
copies every key and sets ``general.quantization_version`` and ``general.file_type``) plus one
tensor-info record per tensor, padded to the alignment. With the GGUF the plan will be quantized
from at hand (a model loaded from a GGUF, or :func:`mpsearch.filemodels.gguf_file_model`), every
figure is exact; from a torch model the tensors follow ``convert_hf_to_gguf.py`` (1-D tensors,
norms and routers f32, the rest f16) and the header's metadata is estimated (stated in
:attr:`FileModel.header_note`).
The default base is ``Q4_K_M`` (its rules give ``token_embd`` q4_K or q8_0 and ``output`` q6_K).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from .errors import BudgetError, close_matches, MpsearchError, name_list
from .targets.llamacpp_mixes import canonical_type

#: byte units a file budget may carry
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_UNIT_NAMES = {"b": "B", "kb": "KB", "mb": "MB", "gb": "GB", "tb": "TB", "kib": "KiB", "mib": "MiB",
               "gib": "GiB", "tib": "TiB"}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(text) -> tuple[float, str]:
    """``"3.2GiB"`` -> ``(3435973836.8, "GiB")``; a bare number is bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise BudgetError(f"--budget file={text}: write a size such as 3.2GiB, 900MB or 123456789 (bytes)")
    value, unit = float(m.group(1)), (m.group(2) or "B").lower()
    if unit not in UNITS:
        raise BudgetError(f"--budget file={text}: unknown unit {m.group(2)!r}{close_matches(unit, UNITS)}; "
                          f"use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")
    nbytes = value * UNITS[unit]
    if not math.isfinite(nbytes) or nbytes <= 0 or nbytes > 1e18:
        raise BudgetError(f"--budget file={text}: the size must be positive and at most 1 EB")
    return nbytes, _UNIT_NAMES[unit]


def format_bytes(nbytes: float, unit: str = "B") -> str:
    """``nbytes`` in ``unit`` as a user reads it: ``3.21 GiB``, ``93,510,208 B``."""
    scale = UNITS[unit.lower()]
    if scale == 1:
        return f"{nbytes:,.0f} B"
    return f"{nbytes / scale:.4g} {unit}"


def check_file_budget(key: str, value) -> str:
    """The text of a ``size``/``file``/``bpw`` budget, checked (one line on a bad one)."""
    text = str(value).strip() if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
    if not text:
        raise BudgetError(f"--budget {key}={value!r}: give a value, for example --budget "
                          f"{ {'size': 'size=Q4_K_M', 'file': 'file=3.2GiB', 'bpw': 'bpw=4.5'}.get(key, 'size=Q4_K_M')}")
    if key == "file":
        parse_bytes(text)
    elif key == "bpw":
        try:
            v = float(text)
        except ValueError:
            raise BudgetError(f"--budget bpw={text}: {text!r} is not a number (bits per weight, e.g. 4.5)") from None
        if not math.isfinite(v) or not 0 < v <= 64:
            raise BudgetError(f"--budget bpw={text}: bits per weight must be above 0 and at most 64")
    elif key == "size":
        if not re.fullmatch(r"[A-Za-z0-9_.:+-]{1,64}", text):
            raise BudgetError(f"--budget size={text}: name a recipe or option of the target, e.g. size=Q4_K_M "
                              f"or size=w4a16-g32 ('mpsearch targets T --model M' lists them with their sizes)")
    else:
        raise BudgetError(f"unknown file budget {key!r}; use size, file or bpw")
    return text


@dataclass
class FileModel:
    """What the consumer's file holds besides the planned layers, for one model and target.

    ``planned``: planned layer -> the consumer's tensor names it becomes (two for a fused
    ``gate_up_proj``). ``bases``: per base recipe (llama.cpp's ``--tensor-type-file`` runs over a
    base mix), the unplanned tensors' ``types`` (those the consumer converts; the others are
    copied), ``tensor_bytes`` (their bytes) and ``padded_bytes`` (padded to the alignment).
    ``recipes``: recipe -> ``base``, ``planned_bytes``, ``planned_padded`` (the planned tensors as
    that recipe stores them). ``elements``: every tensor's elements (llama.cpp's BPW denominator).
    """

    consumer: str
    source: str
    header_bytes: int
    header_measured: bool
    header_note: str
    alignment: int
    elements: int
    planned: dict = field(default_factory=dict)
    bases: dict = field(default_factory=dict)
    default_base: str = ""
    recipes: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    row_extra: dict = field(default_factory=dict)  # layer -> option -> header bytes of its tensors (safetensors)
    rows: dict = field(default_factory=dict)  # tensor -> its rows (ggml ne[1]; llama.cpp's CPU repacking reads it)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> FileModel:
        """A file model from a table's metadata, every field checked (a bad one: one line)."""
        def bad(what):
            raise BudgetError(f"the table's file model (metadata 'file') is malformed: {what}; re-estimate the table")

        def count(v, what):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(f"{what} must be a number >= 0, got {v!r}")
            return v

        if not isinstance(d, dict):
            bad(f"expected a JSON object, got {type(d).__name__}")
        missing = [k for k in ("consumer", "header_bytes", "alignment", "elements", "planned", "bases",
                               "default_base", "recipes") if k not in d]
        if missing:
            bad(f"no {', '.join(missing)}")
        count(d["header_bytes"], "header_bytes")
        if count(d["alignment"], "alignment") < 1 or count(d["elements"], "elements") <= 0:
            bad("alignment and elements must be positive")
        for key in ("planned", "bases", "recipes", "row_extra", "rows"):
            if not isinstance(d.get(key, {}), dict):
                bad(f"{key} must be an object")
        for lay, names in d["planned"].items():
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                bad(f"planned[{lay!r}] must be a list of tensor names")
        for name, b in d["bases"].items():
            if not isinstance(b, dict):
                bad(f"bases[{name!r}] must be an object")
            count(b.get("tensor_bytes"), f"bases[{name!r}].tensor_bytes")
            count(b.get("padded_bytes"), f"bases[{name!r}].padded_bytes")
        for name, r in d["recipes"].items():
            if not isinstance(r, dict) or not isinstance(r.get("base"), str) or r["base"] not in d["bases"]:
                bad(f"recipes[{name!r}] must name one of the bases")
            count(r.get("planned_bytes"), f"recipes[{name!r}].planned_bytes")
            count(r.get("planned_padded"), f"recipes[{name!r}].planned_padded")
        if not isinstance(d["default_base"], str) or d["default_base"] not in d["bases"]:
            bad("default_base must name one of the bases")
        for lay, opts in d.get("row_extra", {}).items():
            if not isinstance(opts, dict):
                bad(f"row_extra[{lay!r}] must be an object")
            for o, v in opts.items():
                count(v, f"row_extra[{lay!r}][{o!r}]")
        for name, n in d.get("rows", {}).items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                bad(f"rows[{name!r}] must be a whole number >= 1, got {n!r}")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    # ------------------------------------------------------------------ totals
    def file_bytes(self, planned_padded: float, base: str | None = None) -> float:
        """The file's bytes with the planned tensors taking ``planned_padded`` bytes (padded)."""
        b = self.bases[base or self.default_base]
        return self.header_bytes + b["padded_bytes"] + planned_padded

    def tensor_bytes(self, planned_bytes: float, base: str | None = None) -> float:
        """Every tensor's bytes (what llama.cpp's BPW counts)."""
        return self.bases[base or self.default_base]["tensor_bytes"] + planned_bytes

    def bpw(self, planned_bytes: float, base: str | None = None) -> float:
        return 8.0 * self.tensor_bytes(planned_bytes, base) / self.elements

    def recipe_file_bytes(self, name: str) -> int:
        r = self.recipes[name]
        return int(self.file_bytes(r["planned_padded"], r["base"]))

    def recipe_rows(self) -> list[dict]:
        """One row per recipe: name, base, file bytes, tensor bytes and BPW, smallest first."""
        rows = []
        for name, r in self.recipes.items():
            tb = self.tensor_bytes(r["planned_bytes"], r["base"])
            rows.append({"recipe": name, "base": r["base"], "file_bytes": self.recipe_file_bytes(name),
                         "tensor_bytes": int(tb), "bpw": 8.0 * tb / self.elements})
        return sorted(rows, key=lambda row: (row["file_bytes"], row["recipe"]))

    def find_recipe(self, name: str) -> str:
        """The recipe ``size=name`` means: a recipe's exact name, an option's uniform recipe
        (``q4_0`` -> ``pure-q4_0``, ``w4a16-g32`` -> ``uniform-w4a16-g32``), or a unique
        case-insensitive match (``q4_k_m`` -> ``Q4_K_M``)."""
        if name in self.recipes:
            return name
        for prefix in ("pure-", "uniform-"):
            if prefix + name in self.recipes:
                return prefix + name
        folded = [r for r in self.recipes if r.lower() == name.lower()
                  or r.lower() in (f"pure-{name.lower()}", f"uniform-{name.lower()}")]
        if len(folded) == 1:
            return folded[0]
        raise BudgetError(f"--budget size={name}: {self.consumer} has no recipe or uniform option {name!r} for "
                          f"this model{close_matches(name, self.recipes)}; its recipes: "
                          f"{name_list(self.recipes, 40)}")


# ----------------------------------------------------------------------------- budgets
@dataclass
class FileConstraint:
    """A file budget as a "sum of ``column`` <= ``cap``" over the planned layers: the user's value
    is ``(column sum + offset) / unit_scale``."""

    key: str
    column: str
    cap: float
    unit_scale: float
    offset: float
    unit: str
    label: str
    reference: float | None = None  # the named recipe's value (size=NAME), for the message


def file_model_of(metadata) -> FileModel:
    """The table's file model, or a one-line refusal saying how to get one."""
    fm = metadata.get("file") if isinstance(metadata, dict) else None
    if fm is None:
        target = metadata.get("target") if isinstance(metadata, dict) else None
        note = metadata.get("file_note") if isinstance(metadata, dict) else None
        why = (f"target {target!r} writes no consumer file" if target in (None, "mpsearch")
               else str(note) if note else "it was estimated without its model's file layout (an older table)")
        raise BudgetError(f"budgets size=, file= and bpw= count the consumer's whole file, but the table has no "
                          f"file model: {why}; estimate the table with --target llama.cpp or --target vllm "
                          f"(or use size_bits/avg_bits)")
    return FileModel.from_dict(fm)


def file_base(spec: dict, fm: FileModel) -> str:
    """The base recipe a plan under these file budgets is written with."""
    if "size" in spec:
        return fm.recipes[fm.find_recipe(spec["size"])]["base"]
    return fm.default_base


def file_constraints(spec: dict, fm: FileModel, padded_column: str) -> tuple[list[FileConstraint], str]:
    """``size``/``file``/``bpw`` budgets as constraints on the planned layers, and the base.

    ``padded_column``: the column holding each row's padded bytes x 8 (``size_bits`` itself where
    no tensor needs padding)."""
    base = file_base(spec, fm)
    b = fm.bases[base]
    fixed_file = fm.header_bytes + b["padded_bytes"]
    out = []
    for key, text in spec.items():
        if key == "bpw":
            value = float(text)
            out.append(FileConstraint("bpw", "size_bits", value * fm.elements - 8.0 * b["tensor_bytes"],
                                      fm.elements, 8.0 * b["tensor_bytes"], "", f"{value:g}"))
            continue
        if key == "size":
            name = fm.find_recipe(text)
            nbytes, unit, label = fm.recipe_file_bytes(name), "B", f"{name} ({fm.recipe_file_bytes(name):,} B)"
            ref = float(nbytes)
        else:
            nbytes, unit = parse_bytes(text)
            label, ref = text, None
        scale = UNITS[unit.lower()]
        out.append(FileConstraint(key, padded_column, 8.0 * (nbytes - fixed_file), 8.0 * scale,
                                  8.0 * fixed_file, unit, label, None if ref is None else ref / scale))
    return out, base


def describe_value(key: str, value: float, unit: str, reference: float | None = None) -> str:
    """A file budget's value as the user wrote its unit: ``3.41 GiB``, ``89,123,456 B (95.3% of
    the recipe)``, ``4.62`` bits per weight."""
    if key == "bpw":
        return f"{value:.4f}"
    text = format_bytes(value * UNITS[unit.lower()], unit)
    if reference:
        text += f" ({100.0 * value / reference:.2f}% of the named recipe)"
    return text


def padded_bits(size_bits, n_tensors, alignment: int):
    """Bits of a row's tensors once each is padded to ``alignment`` bytes (``n_tensors`` equal
    parts per row: two for a fused ``gate_up_proj``)."""
    import numpy as np

    size_bits = np.asarray(size_bits, dtype=float)
    n = np.asarray(n_tensors, dtype=float)
    per = np.ceil(size_bits / 8.0 / n)
    return np.ceil(per / alignment) * alignment * n * 8.0


# ----------------------------------------------------------------------------- llama.cpp
def _kv_bytes_u32(key: str) -> int:
    return 8 + len(key.encode()) + 4 + 4  # key string, value type, u32 value


#: GGUF value types (gguf.GGUFValueType) -> struct format of one scalar
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads a GGUF header from a file, a chunk at a time."""

    def __init__(self, fh):
        self.fh, self.buf, self.pos, self.consumed = fh, b"", 0, 0

    def take(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n:
            more = self.fh.read(max(1 << 20, n))
            if not more:
                raise EOFError("the file ends inside its GGUF header")
            self.buf = self.buf[self.pos:] + more
            self.pos = 0
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        self.consumed += n
        return out

    def scalar(self, fmt: str):
        import struct

        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar("<Q")).decode("utf-8", "replace")

    def value(self, vtype: int, keep: bool):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype in _SCALARS and not keep:  # skip fixed-size arrays whole
                import struct

                self.take(struct.calcsize(_SCALARS[etype]) * count)
                return None
            items = [self.value(etype, keep) for _ in range(count)]
            return items if keep else None
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.scalar(_SCALARS[vtype])


def read_gguf(path) -> dict:
    """What a GGUF file gives a file model, read from its header only: arch and hyper-parameters,
    every tensor ``(name, torch-order shape, ggml type)``, the alignment, the metadata bytes
    llama-quantize copies (magic, version, counts and key-value pairs; two keys it adds where
    missing) and every scalar key-value pair (``kv``)."""
    from gguf import GGMLQuantizationType

    try:
        with open(path, "rb") as fh:
            cur = _Cursor(fh)
            if cur.take(4) != b"GGUF":
                raise ValueError("not a GGUF file (no GGUF magic)")
            cur.scalar("<I")
            n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
            kv = {}
            for _ in range(n_kv):
                key = cur.string()
                vtype = cur.scalar("<I")
                val = cur.value(vtype, keep=vtype != _ARRAY or key.endswith(("head_count", "head_count_kv",
                                                                            "sliding_window_pattern")))
                kv[key] = val
            kv_bytes = cur.consumed
            tensors = []
            for _ in range(n_tensors):
                name = cur.string()
                ndim = cur.scalar("<I")
                dims = [cur.scalar("<Q") for _ in range(ndim)]
                ttype = cur.scalar("<I")
                cur.scalar("<Q")
                tensors.append((name, tuple(reversed(dims)), canonical_type(GGMLQuantizationType(ttype).name)))
    except (OSError, ValueError, EOFError, UnicodeDecodeError, MpsearchError) as exc:
        raise MpsearchError(f"{path}: cannot read it as a GGUF file ({exc})") from None
    arch = kv.get("general.architecture", "llama")

    def val(key, default=None):
        return kv.get(f"{arch}.{key}", default)

    def scalar(v):
        return int(max(v)) if isinstance(v, list) else int(v)

    for key in ("general.quantization_version", "general.file_type"):  # llama-quantize sets both
        if key not in kv:
            kv_bytes += _kv_bytes_u32(key)
    n_head = scalar(val("attention.head_count", 1))
    return {"arch": arch, "n_layer": int(val("block_count", 1)), "n_head": n_head,
            "n_head_kv": scalar(val("attention.head_count_kv", n_head)),
            "n_expert": int(val("expert_count", 0) or 0), "tensors": tensors,
            "alignment": int(kv.get("general.alignment", 32)), "kv_bytes": kv_bytes, "kv": kv}


def source_gguf(model):
    """The GGUF a transformers model was loaded from (``gguf_file=``), when it can be told: the
    one ``.gguf`` file of its folder, which holds no ``config.json``; else ``None``."""
    from pathlib import Path

    where = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not where:
        return None
    folder = Path(str(where))
    if folder.is_file() and folder.suffix == ".gguf":
        return folder
    if not folder.is_dir() or (folder / "config.json").exists():
        return None
    found = sorted(folder.glob("*.gguf"))
    return found[0] if len(found) == 1 else None


_F32_LEAVES = ("ffn_gate_inp", "ffn_gate_inp_shexp", "position_embd", "token_types")


def converted_tensors(model):
    """``(gguf name, torch shape, type)`` of every tensor ``convert_hf_to_gguf.py`` writes for a
    transformers model, and the arch hyper-parameters; ``None`` where a weight has no GGUF name."""
    import gguf

    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    model_type = str(getattr(cfg, "model_type", "llama")).replace("_", "").replace("-", "")
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == model_type), gguf.MODEL_ARCH.LLAMA)
    n_layer = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    table = gguf.get_tensor_name_map(arch, max(n_layer, 1))
    seen, out, unknown = set(), [], []
    for name, t in model.state_dict().items():
        key = t.data_ptr() if t.numel() else id(t)
        if key in seen:  # a tied weight is one tensor in GGUF
            continue
        seen.add(key)
        shape = tuple(int(d) for d in t.shape)
        base, _, leaf = name.rpartition(".")
        if leaf == "gate_up_proj" and len(shape) == 3:
            parts = [table.get_name(f"{base}.gate_proj"), table.get_name(f"{base}.up_proj")]
            half = (shape[0], shape[1] // 2, shape[2])
            if not all(parts):
                unknown.append(name)
                continue
            out += [(p + ".weight", half, "f16") for p in parts]
            continue
        g = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if g is None:
            unknown.append(name)
            continue
        if not g.endswith((".weight", ".bias")):
            g += ".weight"
        ndim = sum(d > 1 for d in shape) or 1
        f32 = ndim <= 1 or g.endswith("_norm.weight") or not g.endswith(".weight") or any(
            f".{leaf_}." in g or g.startswith(leaf_) for leaf_ in _F32_LEAVES)
        out.append((g, shape, "f32" if f32 else "f16"))
    n_head = int(getattr(cfg, "num_attention_heads", 1) or 1)
    hp = {"arch": gguf.MODEL_ARCH_NAMES[arch], "n_layer": max(n_layer, 1), "n_head": n_head,
          "n_head_kv": int(getattr(cfg, "num_key_value_heads", None) or n_head),
          "n_expert": int(getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or 0),
          "vocab": int(getattr(cfg, "vocab_size", 0) or 0)}
    return out, hp, unknown


def recipe_table(fm: FileModel) -> list[str]:
    """Lines that show every recipe's real file for the model (``mpsearch targets T --model M``)."""
    llama = fm.consumer == "llama.cpp"
    lines = [f"{'recipe':<20} {'file bytes':>15} {'MiB':>10} {'bits/weight':>11}" + ("  llama-quantize" if llama else "")]
    for row in fm.recipe_rows():
        base = fm.bases[row["base"]]["command"] if llama else ""
        lines.append(f"{row['recipe']:<20} {row['file_bytes']:>15,} {row['file_bytes'] / 2**20:>10.2f} "
                     f"{row['bpw']:>11.3f}" + (f"  {base}" if base else ""))
    lines.append(f"header: {fm.header_bytes:,} bytes ({fm.header_note})")
    lines.append(f"bits/weight: every tensor's bytes x 8 / {fm.elements:,} weights"
                 + (" (the BPW llama.cpp prints on loading)" if llama else ""))
    lines += fm.notes
    return lines
