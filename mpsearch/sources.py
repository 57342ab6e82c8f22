"""Where a model spec's checkpoint is: the forms users have a model in.

- a local Hugging Face folder (``config.json`` and ``*.safetensors``, one file or shards with their
  ``model.safetensors.index.json``), or one of its files (``config.json``, ``*.safetensors``, the
  shard index): the folder;
- a Hugging Face id (``HuggingFaceTB/SmolLM2-135M``) found in the **local** Hugging Face cache
  (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), with
  ``huggingface_hub``'s own cache lookup and nothing downloaded; absent, one line names the cache;
- a GGUF file (``model.gguf``), dequantized by ``transformers`` (``gguf_file=``). Its header is read
  here (:func:`gguf_tensor_types`) to tell the **source-grid caveat**: weights stored in a quantized
  type (Q4_1, Q8_0...) already lie on that type's grid, so re-quantizing them to that format loses
  nothing and the format looks free (:class:`SourceGridWarning`).

Imports nothing of mpsearch but its errors, so the specs, the zoo and the CLI share it.
"""

from __future__ import annotations

import os
import re
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SpecError

#: ``owner/name`` as the Hugging Face Hub spells repository ids
HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
#: tensor types that hold unquantized values: dequantizing them changes nothing
FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


class SourceGridWarning(UserWarning):
    """The model's weights come from a quantized file: formats on the same grid look free."""


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint on disk: its ``folder``, the ``gguf_file`` in it (or ``None``), the Hugging Face
    ``hub_id`` it was found under (or ``None``), and for a GGUF the stored type of each 2-D weight."""

    folder: Path
    gguf_file: str | None = None
    hub_id: str | None = None
    weight_types: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.folder / self.gguf_file if self.gguf_file else self.folder

    def quantized_types(self) -> Counter:
        """Count of the quantized (non-float) types the GGUF stores its weight matrices in."""
        return Counter(t for t in self.weight_types.values() if t not in FLOAT_TYPES)

    def source_grid(self) -> dict | None:
        """``{"file", "types": {type: matrices}, "matrices"}`` when weight matrices are stored
        quantized (the caveat), else ``None``."""
        q = self.quantized_types()
        if not q:
            return None
        return {"file": str(self.path), "types": dict(q.most_common()), "matrices": len(self.weight_types)}


def hf_cache_dir() -> Path:
    """The local Hugging Face hub cache, read from the environment at call time."""
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(env[var]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "huggingface" / "hub"


def cached_snapshot(repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in the local cache (huggingface_hub's lookup, offline)."""
    cache = hf_cache_dir()
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SpecError(f"model {repo_id!r}: a Hugging Face id needs huggingface_hub: pip install 'mpsearch[hf]'") \
            from None
    try:
        return Path(snapshot_download(repo_id, cache_dir=str(cache), local_files_only=True))
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and friends: not cached
        raise SpecError(
            f"model {repo_id!r} is not a local path and not in the Hugging Face cache {str(cache)!r}; "
            f"download it once (hf download {repo_id}) or give its folder or a .gguf file"
        ) from None


def model_source(spec) -> ModelSource | None:
    """The checkpoint a spec names (see the module doc), or ``None`` for a spec that names none (a
    callable, a short name, an ``nn.Module``). A path-like spec that leads nowhere is refused."""
    if not isinstance(spec, (str, os.PathLike)):
        return None
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelSource(path)
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".gguf"):
            return ModelSource(path.parent, path.name, weight_types=_weight_types(path))
        if name.endswith((".safetensors", ".safetensors.index.json")) or name == "config.json":
            return ModelSource(path.parent)
        return None  # file.py:callable and data-like files are not checkpoints
    if text.lower().endswith(".gguf"):
        raise SpecError(f"model spec {text!r}: the GGUF file does not exist")
    if ":" in text:
        return None
    if HF_ID.match(text) and not text.startswith("."):
        folder = cached_snapshot(text)
        if not (folder / "config.json").is_file():
            ggufs = sorted(p.name for p in folder.glob("*.gguf"))
            if ggufs:
                raise SpecError(f"model {text!r}: the cached snapshot holds GGUF files and no config.json; "
                                f"give one of them: {str(folder / ggufs[0])!r}"
                                + (f" ({len(ggufs)} files)" if len(ggufs) > 1 else ""))
        return ModelSource(folder, hub_id=text)
    if "/" in text or text.startswith("."):
        raise SpecError(f"model spec {text!r}: no such directory or file; give a Hugging Face model folder, "
                        f"a .gguf file, a Hugging Face id in the local cache, 'package.module:callable' or "
                        f"'file.py:callable'")
    return None


def warn_source_grid(source: ModelSource) -> dict | None:
    """Warn (:class:`SourceGridWarning`) when a GGUF stores its weights quantized; return the note."""
    note = source.source_grid()
    if note is not None:
        warnings.warn(source_grid_message(note), SourceGridWarning, stacklevel=3)
    return note


def source_grid_message(note: dict) -> str:
    (first, n), *rest = note["types"].items()
    more = "".join(f", {m} as {t}" for t, m in rest)
    return (f"{Path(note['file']).name} stores {n} of its {note['matrices']} weight matrices as {first}{more}: "
            f"dequantized, they already lie on that grid, so re-quantizing to the same format loses almost nothing "
            f"and that format looks free in the table and the plans; plan from a 16-bit checkpoint (a safetensors "
            f"folder or an F16/BF16 GGUF) where you have one")


# ------------------------------------------------------------------------- GGUF header (fast)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, fh):
        self.fh = fh

    def read(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        data = self.fh.read(size)
        if len(data) < size:
            raise SpecError("the GGUF header ends early")
        return struct.unpack("<" + fmt, data)

    def string(self) -> bytes:
        (n,) = self.read("Q")
        if n > 1 << 30:
            raise SpecError("the GGUF header holds a string longer than 1 GiB")
        return self.fh.read(n)

    def skip_value(self, vtype: int) -> None:
        if vtype == _STRING:
            self.string()
        elif vtype == _ARRAY:
            etype, count = self.read("IQ")
            if etype in _SCALAR:
                self.fh.seek(struct.calcsize("<" + _SCALAR[etype]) * count, 1)
            else:
                for _ in range(count):
                    self.skip_value(etype)
        elif vtype in _SCALAR:
            self.read(_SCALAR[vtype])
        else:
            raise SpecError(f"unknown GGUF value type {vtype}")


def gguf_tensor_types(path) -> dict:
    """``{tensor name: (type name, shape)}`` from a GGUF file's header, without reading the data
    (the metadata's values are skipped, not parsed: fast on a 49k-token vocabulary)."""
    from gguf import GGMLQuantizationType

    path = Path(path)
    try:
        with open(path, "rb") as fh:
            cur = _Cursor(fh)
            if fh.read(4) != b"GGUF":
                raise SpecError(f"{str(path)!r} is not a GGUF file (no GGUF magic)")
            (version,) = cur.read("I")
            if version < 2:
                raise SpecError(f"{str(path)!r}: GGUF version {version} is not supported (2 or later)")
            n_tensors, n_kv = cur.read("QQ")
            for _ in range(n_kv):
                cur.string()
                (vtype,) = cur.read("I")
                cur.skip_value(vtype)
            out = {}
            for _ in range(n_tensors):
                name = cur.string().decode("utf-8", "replace")
                (n_dims,) = cur.read("I")
                dims = cur.read("Q" * n_dims)
                ttype, _offset = cur.read("IQ")
                try:
                    tname = GGMLQuantizationType(ttype).name
                except ValueError:
                    tname = f"type{ttype}"
                out[name] = (tname, tuple(reversed(dims)))
            return out
    except OSError as exc:
        raise SpecError(f"cannot read {str(path)!r}: {exc}") from None


def _weight_types(path: Path) -> dict:
    """The stored type of each weight matrix (2-D or more, not a norm or a bias) of a GGUF."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SpecError("loading a GGUF file needs the gguf package: pip install gguf") from None
    return {name: t for name, (t, shape) in gguf_tensor_types(path).items()
            if len(shape) >= 2 and name.endswith(".weight")}
