"""The importance matrix itself (:class:`Imatrix`) and its files: llama.cpp's GGUF imatrix and the
legacy ``.dat``, read and written (see :mod:`mpsearch.imatrix`).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import MpsearchError

#: llama-imatrix's metadata keys (common/imatrix-loader.h)
KV_DATASETS = "imatrix.datasets"
KV_CHUNK_COUNT = "imatrix.chunk_count"
KV_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
#: llama-imatrix ignores matrix multiplications of fewer token rows than this
MIN_ROWS = 16

_GGUF_MAGIC = b"GGUF"
_ALIGN = 32
#: GGUF metadata value types (the GGUF file format): struct code per scalar type
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_GGML_F32 = 0


class NoTensors(MpsearchError):
    """None of a model's layers maps to a llama.cpp ``blk.*`` tensor."""


@dataclass
class Entry:
    """One tensor's statistics: ``sums`` float32 ``[n_mat, cols]`` (sum of squared inputs per
    column, per expert) and ``counts`` int64 ``[n_mat]`` (tokens per expert)."""

    sums: np.ndarray
    counts: np.ndarray

    @property
    def n_mat(self) -> int:
        return int(self.sums.shape[0])

    @property
    def cols(self) -> int:
        return int(self.sums.shape[1])


class Imatrix:
    """An importance matrix: GGUF tensor name -> :class:`Entry`, with llama-imatrix's metadata.

    ``legacy``: read from a ``.dat`` file, whose ``sums`` hold ``(in_sum2 / count) * ncall`` and
    ``counts`` ``[ncall]`` (``llama-quantize`` divides by ``ncall``). ``path``/``sha256``: the file
    it was read from or last written to (``sha256`` of its bytes; for one never written, of the
    GGUF bytes :meth:`to_bytes` gives)."""

    def __init__(self, entries: dict, *, datasets=(), chunk_count: int = 0, chunk_size: int = 0,
                 legacy: bool = False, path=None, sha256: str | None = None, computed: bool = False):
        self.entries = {name: Entry(np.asarray(e.sums, dtype=np.float32).reshape(len(e.counts), -1),
                                    np.asarray(e.counts, dtype=np.int64).reshape(-1))
                        for name, e in entries.items()}
        self.datasets = list(datasets)
        self.chunk_count = int(chunk_count)
        self.chunk_size = int(chunk_size)
        self.legacy = bool(legacy)
        self.path = None if path is None else Path(path)
        self._sha256 = sha256
        self.computed = bool(computed)  # made by compute_imatrix (not read from a file)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name) -> bool:
        return name in self.entries

    def __repr__(self) -> str:
        where = f" from {self.path}" if self.path else ""
        return f"<imatrix {self.sha256[:16]}{where}: {len(self)} tensors, {self.tokens} tokens>"

    @property
    def names(self) -> list[str]:
        return sorted(self.entries)

    @property
    def tokens(self) -> int:
        """The largest token count of any entry (legacy files: ``ncall * chunk_size`` unknown: 0)."""
        if self.legacy or not self.entries:
            return 0
        return int(max(int(e.counts.max()) for e in self.entries.values()))

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.to_bytes()).hexdigest()
        return self._sha256

    def weights(self, name: str) -> np.ndarray:
        """The importance llama-quantize passes for tensor ``name``: float32 ``[n_mat, cols]``,
        ``in_sum2 / count`` per expert (1 where an expert saw no token); legacy: ``sums / ncall``
        (the sums themselves when ``ncall`` is 0)."""
        e = self.entries[name]
        if self.legacy:
            ncall = int(e.counts[0]) if e.counts.size else 0
            return e.sums / np.float32(ncall) if ncall > 0 else e.sums.copy()
        out = np.ones_like(e.sums)
        for j, c in enumerate(e.counts.tolist()):
            if float(np.float32(c)) > 0:
                out[j] = e.sums[j] / np.float32(c)
        return out

    def describe(self) -> dict:
        """What a table or plan records about this imatrix."""
        return {"sha256": self.sha256, "file": str(Path(self.path).resolve()) if self.path else None,
                "source": "computed by mpsearch" if self.computed else "file",
                "format": "dat" if self.legacy else "gguf", "tensors": len(self), "tokens": self.tokens,
                "chunks": self.chunk_count, "chunk_size": self.chunk_size, "datasets": list(self.datasets)}

    # ------------------------------------------------------------------ GGUF
    def to_bytes(self) -> bytes:
        """The GGUF file llama-imatrix would write for these statistics (same bytes: keys, sorted
        tensors, 32-byte alignment). A legacy imatrix keeps its ``(in_sum2/count) * ncall`` sums
        with ``ncall`` as the count: the importance llama-quantize derives stays the same."""
        entries = self.entries
        buf = io.BytesIO()
        names = sorted(entries)
        tensors = []
        for name in names:
            e = entries[name]
            tensors.append((name + SUM_SUFFIX, (e.cols, e.n_mat), e.sums.astype("<f4").tobytes()))
            tensors.append((name + COUNT_SUFFIX, (1, e.n_mat), e.counts.astype("<f4").tobytes()))
        kvs = [("general.type", _STRING, "imatrix"), (KV_DATASETS, _ARRAY, list(self.datasets)),
               (KV_CHUNK_COUNT, _UINT32, self.chunk_count), (KV_CHUNK_SIZE, _UINT32, self.chunk_size)]
        buf.write(_GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
        for key, vtype, value in kvs:
            _write_str(buf, key)
            buf.write(struct.pack("<I", vtype))
            if vtype == _STRING:
                _write_str(buf, value)
            elif vtype == _ARRAY:
                buf.write(struct.pack("<IQ", _STRING, len(value)))
                for v in value:
                    _write_str(buf, v)
            else:
                buf.write(struct.pack("<I", value))
        offset = 0
        for name, ne, data in tensors:
            n_dims = 2 if ne[1] > 1 else 1  # ggml_n_dims: trailing dimensions of 1 are not written
            _write_str(buf, name)
            buf.write(struct.pack("<I", n_dims) + struct.pack(f"<{n_dims}Q", *ne[:n_dims]))
            buf.write(struct.pack("<IQ", _GGML_F32, offset))
            offset += _pad(len(data))
        buf.write(b"\0" * (_pad(buf.tell()) - buf.tell()))
        for _name, _ne, data in tensors:
            buf.write(data + b"\0" * (_pad(len(data)) - len(data)))
        return buf.getvalue()

    def write_copy(self, path) -> Path:
        """Write the GGUF file to ``path`` (whole or not at all) without making it this imatrix's file."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_bytes())
        os.replace(tmp, path)
        return path

    def write(self, path) -> Path:
        """Write the GGUF imatrix file (whole or not at all); returns its path."""
        path = Path(path)
        data = self.to_bytes()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self.path = path
        self._sha256 = hashlib.sha256(data).hexdigest()
        return path


# ---------------------------------------------------------------------------------------- files
def _pad(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _write_str(buf, s: str) -> None:
    b = str(s).encode()
    buf.write(struct.pack("<Q", len(b)) + b)


class _Reader:
    def __init__(self, data: bytes, source: str):
        self.data, self.pos, self.source = data, 0, source

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise MpsearchError(f"{self.source}: the imatrix file ends early (truncated or not an imatrix)")
        out = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return out if len(out) > 1 else out[0]

    def bytes(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise MpsearchError(f"{self.source}: the imatrix file ends early (truncated or not an imatrix)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def string(self, wide: bool = True) -> str:
        n = self.take("Q" if wide else "i")
        return self.bytes(n).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.take("I"), self.take("Q")
            return [self.value(etype) for _ in range(n)]
        raise MpsearchError(f"{self.source}: unknown GGUF value type {vtype} (not a GGUF imatrix?)")


def read_imatrix(path) -> Imatrix:
    """Read an imatrix file: llama.cpp's GGUF format or the legacy ``.dat`` (as ``llama-quantize``
    tells them apart: a GGUF header, else the legacy layout). Refuses a file that is neither."""
    p = Path(path)
    if not p.is_file():
        raise MpsearchError(f"imatrix file {str(path)!r} does not exist")
    data = p.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if data[:4] == _GGUF_MAGIC:
        return _read_gguf(data, str(path), p, sha)
    return _read_dat(data, str(path), p, sha)


class GgufHeader(NamedTuple):
    """A GGUF file's metadata: key -> value, ``[(tensor name, ne, ggml type, offset)]`` (``ne`` in
    ggml's order, the row length first), the data section's offset, and where the metadata ends
    (before the padding to the alignment)."""

    kv: dict
    tensors: list
    data_start: int
    end: int


def gguf_header(data: bytes, source: str = "GGUF file") -> GgufHeader:
    """The metadata of a GGUF file's bytes (:class:`GgufHeader`)."""
    r = _Reader(data, source)
    if r.take("4s") != _GGUF_MAGIC:
        raise MpsearchError(f"{source}: not a GGUF file")
    version, n_tensors, n_kv = r.take("IQQ")
    if version < 2:
        raise MpsearchError(f"{source}: GGUF version {version} is not supported (llama.cpp writes 3)")
    kv = {}
    for _ in range(n_kv):
        key = r.string()
        kv[key] = r.value(r.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.take("I")
        ne = [r.take("Q") for _ in range(n_dims)]
        ttype, offset = r.take("IQ")
        infos.append((name, ne, ttype, offset))
    align = int(kv.get("general.alignment", _ALIGN))
    return GgufHeader(kv, infos, (r.pos + align - 1) // align * align, r.pos)


def _read_gguf(data: bytes, source: str, path, sha) -> Imatrix:
    kv, infos, start, _ = gguf_header(data, source)
    sums, counts = {}, {}
    for name, ne, ttype, offset in infos:
        for suffix, into in ((SUM_SUFFIX, sums), (COUNT_SUFFIX, counts)):
            if name.endswith(suffix):
                base = name[:-len(suffix)]
                if ttype != _GGML_F32:
                    raise MpsearchError(f"{source}: {name} is not F32 (llama.cpp's imatrix tensors are)")
                n = int(np.prod(ne)) if ne else 1
                lo = start + offset
                if n <= 0:
                    raise MpsearchError(f"{source}: tensor {name} is empty (a broken imatrix file)")
                if lo < 0 or lo + 4 * n > len(data):
                    raise MpsearchError(f"{source}: tensor {name} lies past the end of the file (truncated?)")
                into[base] = (np.frombuffer(data, dtype="<f4", count=n, offset=lo).astype(np.float32), ne)
    if not sums and not counts:
        raise MpsearchError(f"{source}: a GGUF file with no imatrix tensors (*.in_sum2, *.counts); is it a model?")
    entries = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise MpsearchError(f"{source}: tensor {name!r} has {'sums' if name in sums else 'counts'} "
                                f"but no {'counts' if name in sums else 'sums'} (a broken imatrix file)")
        s, c = sums[name][0], counts[name][0]
        if c.size == 0 or s.size % c.size:
            raise MpsearchError(f"{source}: {name!r} has {s.size} sums for {c.size} counts (a broken imatrix file)")
        entries[name] = Entry(s.reshape(c.size, -1), np.rint(c).astype(np.int64))  # std::lround
    meta = (KV_DATASETS in kv and KV_CHUNK_COUNT in kv and KV_CHUNK_SIZE in kv)
    if not meta:
        raise MpsearchError(f"{source}: the GGUF imatrix has no {KV_DATASETS}/{KV_CHUNK_COUNT}/{KV_CHUNK_SIZE} "
                            f"metadata (llama-quantize refuses it too)")
    datasets = kv[KV_DATASETS] if isinstance(kv[KV_DATASETS], list) else [kv[KV_DATASETS]]
    return Imatrix(entries, datasets=[str(d) for d in datasets], chunk_count=int(kv[KV_CHUNK_COUNT]),
                   chunk_size=int(kv[KV_CHUNK_SIZE]), path=path, sha256=sha)


def _read_dat(data: bytes, source: str, path, sha) -> Imatrix:
    r = _Reader(data, source)
    not_imatrix = (f"{source}: neither a GGUF imatrix nor a legacy .dat imatrix (llama-imatrix "
                   f"--output-format gguf|dat writes those)")
    if len(data) < 4:
        raise MpsearchError(not_imatrix)
    n_entries = r.take("i")
    if n_entries < 1:
        raise MpsearchError(not_imatrix)
    entries = {}
    try:
        for _ in range(n_entries):
            n = r.take("i")
            if n < 0 or n > 4096:
                raise MpsearchError(not_imatrix)
            name = r.bytes(n).split(b"\0")[0].decode("utf-8", errors="replace")
            ncall, nval = r.take("ii")
            if nval < 1:
                raise MpsearchError(not_imatrix)
            vals = np.frombuffer(r.bytes(4 * nval), dtype="<f4").astype(np.float32)
            entries[name] = Entry(vals.reshape(1, -1), np.array([ncall], dtype=np.int64))
    except MpsearchError as exc:
        raise MpsearchError(not_imatrix) from exc
    chunks, datasets = 0, []
    if r.pos + 4 <= len(data):  # the trailer (chunk count, dataset name) is optional
        chunks = r.take("i")
        if r.pos + 4 <= len(data):
            n = r.take("i")
            if 0 < n <= len(data) - r.pos:
                datasets.append(r.bytes(n).decode("utf-8", errors="replace"))
    return Imatrix(entries, datasets=datasets, chunk_count=chunks, chunk_size=0, legacy=True, path=path,
                   sha256=sha)


def as_imatrix(imatrix) -> Imatrix | None:
    """An :class:`Imatrix` from an Imatrix, a path, or ``None``."""
    if imatrix is None or isinstance(imatrix, Imatrix):
        return imatrix
    return read_imatrix(imatrix)
