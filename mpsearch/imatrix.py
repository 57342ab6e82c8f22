"""llama.cpp's importance matrix (imatrix): computed as ``llama-imatrix`` does, read and written.

``llama-imatrix`` (tools/imatrix/imatrix.cpp) runs the model over calibration text and, for every
matrix multiplication whose weight is a transformer-block tensor (``blk.*``; ``output.weight`` too
with ``--process-output``), adds the square of each input column over the tokens: per tensor a
vector ``in_sum2[col] = sum_t x[t, col]**2`` and a token count. A stacked-experts tensor
(``ffn_*_exps``, ``GGML_OP_MUL_MAT_ID``) gets one vector and one count per expert, over the tokens
routed to that expert (and the MoE router ``ffn_gate_inp`` its own entry). ``llama-quantize --imatrix`` (tools/quantize/quantize.cpp) passes
``in_sum2 / count`` (per expert; 1 for an expert no token reached) to ``ggml_quantize_chunk`` as the
tensor's per-column importance: :meth:`Imatrix.weights`. Tensors without an entry (the token
embedding, a tied output) are quantized without one.

:func:`compute_imatrix` does this with forward hooks on the model's layers: every token of the
calibration batches (padding left out) adds its squared input, accumulated in float64; a forward
pass with fewer than 16 tokens is skipped, as llama-imatrix skips batches of fewer than 16 rows.
llama-imatrix feeds its text as chunks of ``-c`` tokens, each from a fresh context; the same
chunks as ``[1, c]`` batches give the same statistic up to the two runtimes' float arithmetic
(experiments/imatrix_check.md measures it).

Files: the GGUF format of current llama.cpp (``general.type = imatrix``, ``imatrix.datasets``,
``imatrix.chunk_count``, ``imatrix.chunk_size``, and per tensor ``NAME.in_sum2`` ``[n_mat, cols]``
and ``NAME.counts`` ``[n_mat, 1]``, float32, names sorted), written byte for byte as
``llama-imatrix`` writes it, and the legacy ``.dat`` (per tensor ``(in_sum2/count) * ncall`` and
``ncall``), read as ``common_imatrix_load`` reads it. No package is needed for either.

Names: entries are GGUF tensor names (``blk.0.attn_q.weight``); :func:`tensor_names` maps mpsearch
layer names to them with the llama.cpp exporter's map (``arch="llama"`` built in, gguf-py's for
others) and stacked experts (``...layers.N.mlp.experts.gate_up_proj`` -> ``blk.N.ffn_gate_exps``
and ``blk.N.ffn_up_exps``, the two tensors llama.cpp's converter writes; ``...experts.down_proj``
-> ``blk.N.ffn_down_exps``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import MpsearchError
from .export.llamacpp_types import LlamaCppExporter
from .fileio import final_dir
from .targets import get_target

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


# ---------------------------------------------------------------------------------------- names
_EXPERTS = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(?:mlp|block_sparse_moe|feed_forward)\.experts\."
                      r"(gate_up_proj|down_proj)$")


def tensor_names(layers, arch: str = "llama") -> dict[str, list[str]]:
    """mpsearch layer name -> the GGUF tensor names (``.weight`` included) llama.cpp stores it as;
    layers without one are left out. Stacked experts' ``gate_up_proj`` is two GGUF tensors (the
    exporter's own name map decides, :meth:`LlamaCppExporter._namer`)."""
    names = [str(n) for n in layers]
    namer = LlamaCppExporter(arch=arch)._namer(names)
    return {n: [g + ".weight" for g in gs] for n in names if (gs := namer(n))}


# ---------------------------------------------------------------------------------------- compute
def _experts_module(module) -> bool:
    """transformers' stacked-experts modules (Mixtral, Qwen3-MoE ...): 3-D ``gate_up_proj`` and
    ``down_proj`` parameters, called as ``experts(hidden_states, top_k_index, top_k_weights)``."""
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (getattr(gu, "ndim", 0) == 3 and getattr(dn, "ndim", 0) == 3 and hasattr(module, "act_fn"))


class _Collector:
    """Accumulates ``sum x**2`` per column (float64) and token counts per GGUF tensor."""

    def __init__(self):
        self.sums: dict[str, object] = {}
        self.counts: dict[str, object] = {}
        self.mask = None  # bool [tokens] of the current batch (False: padding)

    def rows(self, x):
        x = x.detach().reshape(-1, x.shape[-1])
        if self.mask is not None and self.mask.numel() == x.shape[0]:
            x = x[self.mask.to(x.device)]
        return x

    def add(self, names, x, expert=None, n_mat=1):
        import torch

        sq = x.double().pow(2).sum(0)
        for name in names:
            if name not in self.sums:
                self.sums[name] = torch.zeros(n_mat, x.shape[-1], dtype=torch.float64, device=x.device)
                self.counts[name] = torch.zeros(n_mat, dtype=torch.int64, device=x.device)
            j = 0 if expert is None else expert
            self.sums[name][j] += sq
            self.counts[name][j] += x.shape[0]

    def linear_hook(self, names):
        def hook(_module, args, _out):
            x = self.rows(args[0])
            if x.shape[0] >= MIN_ROWS:
                self.add(names, x)
        return hook

    def experts_hook(self, up_names, down_names):
        import torch

        def hook(module, args, _out):
            hidden, top_k_index = args[0], args[1]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            idx = top_k_index.reshape(hidden.shape[0], -1)
            if self.mask is not None and self.mask.numel() == hidden.shape[0]:
                keep = self.mask.to(hidden.device)
                hidden, idx = hidden[keep], idx[keep]
            n_exp = module.gate_up_proj.shape[0]
            with torch.no_grad():
                for e in range(n_exp):
                    rows = (idx == e).any(dim=1)
                    if not bool(rows.any()):
                        self.add(up_names, hidden[:0], e, n_exp)
                        self.add(down_names, hidden.new_zeros(0, module.down_proj.shape[-1]), e, n_exp)
                        continue
                    x = hidden[rows]
                    self.add(up_names, x, e, n_exp)
                    gate, up = torch.nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
                    self.add(down_names, module.act_fn(gate) * up, e, n_exp)
        return hook


def compute_imatrix(model, data, *, layers=None, arch: str = "llama", process_output: bool = False,
                    chunk_size: int = 0, dataset: str = "", progress: bool = True) -> Imatrix:
    """The importance matrix of ``model`` on calibration ``data`` (batches, as the estimators take
    them), as llama-imatrix computes it (module doc): entries for the ``blk.*`` tensors of
    ``layers`` (default: the model's quantizable layers), plus ``output.weight`` with
    ``process_output`` when the output layer is a tensor of its own. ``chunk_size``/``dataset``:
    the metadata written to the file (the tokens per window, the text's name)."""
    import torch

    from .data import as_batches, move_batch, run_model  # start-up: keeps this module free of torch
    from .layers import discover_layers, get_module  # start-up: keeps this module free of torch
    from tqdm.auto import tqdm

    batches = as_batches(data)
    if not batches:
        raise MpsearchError("computing an imatrix needs calibration data (the activations of each layer)")
    if layers is None:
        layers = discover_layers(model, include_embedding=False)
    layer_names = [getattr(lay, "name", lay) for lay in layers]
    for path, module in model.named_modules():  # stacked experts, whether or not they are planned
        if _experts_module(module):
            layer_names += [f"{path}.{p}" for p in ("gate_up_proj", "down_proj") if f"{path}.{p}" not in layer_names]
    names = tensor_names(layer_names, arch)
    col = _Collector()
    handles = []
    hooked = {}
    for lay, gnames in names.items():
        wanted = [g for g in gnames if g.startswith("blk.") or (process_output and g == "output.weight")]
        if not wanted:
            continue
        m = _EXPERTS.match(lay)
        if m:
            parent = get_module(model, lay.rsplit(".", 1)[0])
            key = id(parent)
            if key in hooked:
                hooked[key][1 if m[2] == "gate_up_proj" else 2].extend(wanted)
                continue
            hooked[key] = [parent, [], []]
            hooked[key][1 if m[2] == "gate_up_proj" else 2].extend(wanted)
            continue
        module = get_module(model, lay)
        if process_output and wanted == ["output.weight"] and _tied(model, module):
            continue  # llama.cpp multiplies by token_embd: no output.weight tensor
        handles.append(module.register_forward_hook(col.linear_hook(wanted)))
    for parent, up, down in hooked.values():
        if not _experts_module(parent):
            raise MpsearchError(f"computing an imatrix: {type(parent).__name__} is not a stacked-experts "
                                f"module mpsearch can follow (3-D gate_up_proj/down_proj, top-k routing)")
        handles.append(parent.register_forward_hook(col.experts_hook(up, down)))
        router = _router(model, parent, up or down)
        if router is not None:  # llama-imatrix collects the router's matmul (ffn_gate_inp) too
            handles.append(router[0].register_forward_hook(col.linear_hook([router[1]])))
    if not handles:
        raise NoTensors(f"computing an imatrix: none of the model's layers has a llama.cpp blk.* tensor name "
                        f"(arch={arch!r}); llama-imatrix collects only those")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="imatrix", disable=not progress, leave=False):
                b = move_batch(batch, device)
                mask = b.get("attention_mask") if isinstance(b, dict) else None
                col.mask = mask.reshape(-1).bool() if torch.is_tensor(mask) else None
                run_model(model, b)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    entries = {n: Entry(col.sums[n].float().cpu().numpy(), col.counts[n].cpu().numpy())
               for n in sorted(col.sums)}
    if not entries:
        raise MpsearchError(f"computing an imatrix: no forward pass had {MIN_ROWS} tokens or more "
                            f"(llama-imatrix skips smaller batches); give longer calibration windows")
    tokens = max(int(e.counts.max()) for e in entries.values())
    if not chunk_size:  # the tokens per window of the batches (llama-imatrix's -c)
        ids = batches[0].get("input_ids") if isinstance(batches[0], dict) else batches[0]
        chunk_size = int(ids.shape[-1]) if torch.is_tensor(ids) and ids.ndim >= 1 else 0
    chunks = tokens // chunk_size if chunk_size else 0
    return Imatrix(entries, datasets=[dataset] if dataset else [], chunk_count=chunks, chunk_size=chunk_size,
                   computed=True)


def _router(model, experts, gguf_names):
    """The router beside a stacked-experts module (``<block>.gate`` with a 2-D weight, as in
    Mixtral and Qwen3-MoE) and its GGUF name ``blk.N.ffn_gate_inp.weight``; ``None`` if absent."""
    path = next((p for p, m in model.named_modules() if m is experts), None)
    if path is None or not gguf_names or "." not in path:
        return None
    parent = model.get_submodule(path.rsplit(".", 1)[0])
    gate = getattr(parent, "gate", None)
    m = _BLK.match(gguf_names[0])
    if gate is None or getattr(getattr(gate, "weight", None), "ndim", 0) != 2 or not m:
        return None
    return gate, f"blk.{m[1]}.ffn_gate_inp.weight"


def _experts(layer) -> int:
    """The expert count of a stacked-experts layer (its weight ``[experts, out, in]``), else 0."""
    shape = tuple(getattr(layer, "shape", ()) or ())
    n = getattr(layer, "experts", None) or (getattr(layer, "extra", None) or {}).get("experts")
    return int(n) if n else (int(shape[0]) if len(shape) == 3 else 0)


def _in_features(layer) -> int:
    shape = tuple(getattr(layer, "shape", ()) or ())
    return int(shape[-1]) if len(shape) == 3 else int(layer.in_features)


_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def _is_foreign(name: str, owner: dict) -> bool:
    """Whether an imatrix entry the layers do not use names a tensor this model cannot have: a block
    past the model's last, or a kind of tensor the model's blocks have but not in that block.
    Entries of tensors mpsearch does not plan (an MoE router ``ffn_gate_inp``, ``output`` of
    ``--process-output``) are not foreign: llama-quantize does not use them either."""
    m = _BLK.match(name)
    if not m:
        return False
    blocks = {int(b[1]) for g in owner if (b := _BLK.match(g))}
    kinds = {b[2] for g in owner if (b := _BLK.match(g))}
    return int(m[1]) > max(blocks, default=-1) or m[2] in kinds


def _tied(model, module) -> bool:
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return emb is not None and getattr(module, "weight", None) is getattr(emb, "weight", None)


# ---------------------------------------------------------------------------------------- use
def layer_weights(imatrix: Imatrix, layers, *, arch: str = "llama", source: str | None = None) -> dict:
    """``{layer name: [weights per GGUF tensor]}`` for the layers the imatrix has entries for: each
    a float32 torch tensor ``[cols]`` (``[experts, cols]`` for stacked experts), or ``None`` for a
    tensor without an entry. ``layers``: :class:`~mpsearch.layers.Layer` objects (their shapes are
    checked). Refuses, in one line, a file that does not match them (an entry for a tensor the
    model lacks, or of another column or expert count)."""
    import torch

    source = source or str(imatrix.path or "the imatrix")
    shapes = {lay.name: lay for lay in layers}
    names = tensor_names(list(shapes), arch)
    owner = {g: lay for lay, gs in names.items() for g in gs}
    unknown = [n for n in imatrix.names if n not in owner and _is_foreign(n, owner)]
    if unknown:
        known = sorted(owner)
        hint = f" (the model's: {known[0]} .. {known[-1]}, {len(known)} tensors)" if known else ""
        raise MpsearchError(f"{source} does not match the model: it has tensor {unknown[0]!r}"
                            f"{f' and {len(unknown) - 1} more' if len(unknown) > 1 else ''} that the model "
                            f"lacks{hint}; was it made for another model?")
    out = {}
    for lay, gs in names.items():
        if not any(g in imatrix for g in gs):
            continue
        L = shapes[lay]
        experts = _experts(L)
        parts = []
        for g in gs:
            if g not in imatrix:
                parts.append(None)
                continue
            e = imatrix.entries[g]
            want_mat = max(1, experts)
            cols = _in_features(L)
            # llama-quantize compares the sizes (a legacy file holds the experts as one flat vector)
            if e.sums.size != want_mat * cols or (e.n_mat > 1 and e.n_mat != want_mat):
                raise MpsearchError(
                    f"{source} does not match the model: {g!r} has {e.n_mat} x {e.cols} values (experts x "
                    f"columns), the model's layer {lay!r} has {want_mat} x {cols}; was it made "
                    f"for another model?")
            w = torch.from_numpy(imatrix.weights(g).reshape(want_mat, cols))
            parts.append(w if experts else w[0])
        out[lay] = parts
    if not out:
        raise MpsearchError(f"{source} does not match the model: none of its {len(imatrix)} tensors is one "
                            f"of the model's layers (arch {arch!r})")
    return out


def quantize_with(matrix, option, parts):
    """``matrix`` (``[out, in]`` or ``[experts, out, in]``) quantized as GGML ``option`` with the
    importance ``parts`` (one per GGUF tensor the layer is stored as, its rows split evenly among
    them; ``None``: that tensor is quantized without an imatrix). ``None`` for other formats."""
    import torch

    fmt = option.format if option.fmt is not None else None
    if fmt is None or getattr(fmt, "consumer", "") != "llama.cpp":
        return None
    x = matrix.detach().float()
    experts_dim = x.ndim == 3
    rows = x.shape[-2]
    k = len(parts)
    if rows % k:
        raise MpsearchError(f"{option.name}: {rows} rows do not split into {k} GGUF tensors")
    pieces = []
    for i, w in enumerate(parts):
        piece = x[..., i * rows // k:(i + 1) * rows // k, :]
        if w is not None and not experts_dim and w.ndim == 2:  # experts flattened to [E*out, in]
            piece3 = piece.reshape(w.shape[0], -1, piece.shape[-1])
            pieces.append(fmt.quantize(piece3, w.to(x.device)).reshape(piece.shape))
            continue
        pieces.append(fmt.quantize(piece, None if w is None else w.to(x.device)))
    return torch.cat(pieces, dim=-2) if k > 1 else pieces[0]


@contextlib.contextmanager
def imatrix_rounding(weights: dict):
    """Within the block, :func:`mpsearch.quant.quantize_weight` of a layer in ``weights`` (from
    :func:`layer_weights`) at a llama.cpp type rounds as ``llama-quantize --imatrix`` does; other
    layers and formats as before (the token embedding has no entry: llama-quantize gives it none)."""
    from .quant import rounding  # start-up: keeps this module free of torch

    def rounder(matrix, option, name):
        parts = weights.get(name)
        if parts is None:
            return None
        return quantize_with(matrix, option, parts)

    rounder.stacked = True  # experts as [experts, out, in], each with its own importance
    with rounding(rounder):
        yield


# ---------------------------------------------------------------------------------------- runs
#: the ``imatrix=`` value that computes one from the calibration data for the llama.cpp target
AUTO = "auto"


def uses_imatrix(target) -> bool:
    """Whether ``target``'s consumer quantizes with an importance matrix (llama.cpp)."""
    return get_target(target).name == "llama.cpp"


def _is_off(imatrix) -> bool:
    return imatrix is None or imatrix is False or (isinstance(imatrix, str) and imatrix.lower() in ("none", "off", "rtn"))


def imatrix_expected(imatrix, target, batches) -> bool:
    """Whether :func:`resolve_imatrix` will give an imatrix for these arguments (before computing it:
    the option set, i-quants included, is checked first)."""
    if _is_off(imatrix):
        return False
    if isinstance(imatrix, str) and imatrix == AUTO:
        return uses_imatrix(target) and bool(batches)
    return True


def resolve_imatrix(imatrix, model, batches, target, *, progress: bool = True) -> Imatrix | None:
    """The imatrix a run quantizes with. ``imatrix``: ``"auto"`` (the default of the estimators
    and the frontier) computes it from the calibration ``batches`` for the llama.cpp target, as
    publishers run ``llama-imatrix`` on their calibration text (none without batches or for other
    targets); ``None``/``False``/``"none"``: round without one (llama-quantize without
    ``--imatrix``); an :class:`Imatrix` or a file path: that one (refused for other targets)."""
    if _is_off(imatrix):
        return None
    if isinstance(imatrix, str) and imatrix == AUTO:
        if not uses_imatrix(target) or not batches:
            return None
        try:
            return compute_imatrix(model, batches, progress=progress)
        except NoTensors as exc:  # a family whose names mpsearch cannot map: said, not silent
            import warnings

            warnings.warn(f"{exc}: rounding llama.cpp's types without an imatrix", stacklevel=2)
            return None
    if not uses_imatrix(target):
        raise MpsearchError(f"an imatrix is llama.cpp's (--target llama.cpp); target {get_target(target).name!r} "
                            f"does not quantize with one: leave --imatrix out")
    return as_imatrix(imatrix)


def plan_rounding(plan) -> tuple[str, dict | None]:
    """``(rounding, imatrix description)`` of the table a plan was solved from (``rtn`` when the
    table recorded none)."""
    table = (getattr(plan, "provenance", None) or {}).get("table") or {}
    rounding = table.get("rounding") or table.get("quantizer") or "rtn"
    return rounding, table.get("imatrix") if rounding == "imatrix" else None


def imatrix_for_plan(plan, imatrix=None, *, strict: bool) -> tuple[Imatrix | None, str | None]:
    """The imatrix to quantize ``plan`` with and a one-line note, checked against the rounding its
    table was estimated with: the plan's own imatrix file when none is given (if it is still there,
    unchanged). A mismatch (another imatrix, an imatrix for a round-to-nearest table, none for an
    imatrix table) raises when ``strict`` (export), else is the note (apply, validate)."""
    rounding, info = plan_rounding(plan)
    given = as_imatrix(imatrix)

    def fail(msg):
        if strict:
            raise MpsearchError(msg)
        return msg

    if rounding == "imatrix":
        sha = str((info or {}).get("sha256") or "")
        if given is None:
            f = (info or {}).get("file")
            if f and Path(f).is_file():
                found = read_imatrix(f)
                if found.sha256 == sha:
                    return found, f"quantizing with the plan's imatrix {f}"
            return None, fail(f"the plan was estimated with imatrix rounding (imatrix sha256 {sha[:12]}"
                              f"{', file ' + f if f else ''}, not found unchanged): pass it with --imatrix FILE")
        if given.sha256 != sha:
            return given, fail(f"--imatrix {given.path} (sha256 {given.sha256[:12]}) is not the imatrix the plan "
                               f"was estimated with ({sha[:12]}): pass that one, or re-estimate with this one")
        return given, None
    if given is not None:
        return given, fail(f"the plan's table was estimated without an imatrix (rounding {rounding}), and "
                           f"llama-quantize --imatrix rounds differently: re-estimate with --imatrix "
                           f"{given.path}, or leave --imatrix out")
    return None, None


def rounding_context(imatrix: Imatrix | None, layers, *, arch: str = "llama"):
    """:func:`imatrix_rounding` for ``layers`` (checked against the imatrix), or a no-op."""
    if imatrix is None:
        return contextlib.nullcontext()
    return imatrix_rounding(layer_weights(imatrix, layers, arch=arch))


#: the file name of a computed imatrix in a frontier's output folder
FRONTIER_FILE = "imatrix.gguf"


def check_setting(imatrix, target):
    """An ``imatrix`` setting checked before any work: ``"auto"``; ``None`` (``False``, ``"none"``);
    an :class:`Imatrix`; or a file, read here (a bad one refused in one line). A given imatrix needs
    the llama.cpp target."""
    if _is_off(imatrix):
        return None
    if isinstance(imatrix, str) and imatrix == AUTO:
        return AUTO
    if not uses_imatrix(target):
        raise MpsearchError(f"an imatrix is llama.cpp's (--target llama.cpp); target {get_target(target).name!r} "
                            f"does not quantize with one: leave --imatrix out")
    return as_imatrix(imatrix)


@contextlib.contextmanager
def run_rounding(imatrix, model, calib, target, *, out=None, progress: bool = True):
    """The imatrix a measured run (:func:`mpsearch.measured.measured_frontier`) quantizes with
    (:func:`resolve_imatrix`), yielded, and the block run inside its rounding: the table, the
    measured plans and the consumer's own recipes are all rounded as llama-quantize will round
    them. A computed imatrix is written to ``out/imatrix.gguf`` and recorded under the folder's
    final name (``out`` may be the folder being built)."""
    from .data import as_batches  # start-up: keeps this module free of torch
    from .layers import discover_layers  # start-up: keeps this module free of torch

    imx = resolve_imatrix(imatrix, model, as_batches(calib), target, progress=progress)
    if imx is None:
        yield None
        return
    if imx.computed and out is not None:
        imx.path = final_dir(Path(out)).resolve() / FRONTIER_FILE
        imx.write_copy(Path(out) / FRONTIER_FILE)
    with rounding_context(imx, discover_layers(model, include_embedding=True)):
        yield imx
