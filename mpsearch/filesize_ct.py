"""The vLLM target's file: a compressed-tensors checkpoint as llm-compressor saves it.

``model.save_pretrained(..., save_compressed=True)`` writes one safetensors file (one shard: the
models mpsearch plans here are far below transformers' shard size) holding:

- each planned layer's compressed tensors (``compressed_tensors/compressors``):
  ``pack-quantized`` (``w4a16-*``, ``w8a16``): ``weight_packed`` I32 ``[out, ceil(in*b/32)]``,
  ``weight_scale`` (model dtype) ``[out, groups]``, ``weight_shape`` I64 ``[2]`` and, asymmetric,
  ``weight_zero_point`` I32 ``[ceil(out*b/32), groups]``; ``int-quantized`` (``w8a8-int8``):
  ``weight`` I8 and ``weight_scale [out, 1]``; ``w8a8-fp8``: ``weight`` F8_E4M3 and
  ``weight_scale [out, 1]``; ``nvfp4``: ``weight_packed`` U8 ``[out, in/2]``, ``weight_scale``
  F8_E4M3 ``[out, in/16]``, ``weight_global_scale`` and ``input_global_scale`` F32 ``[1]``;
  ``mxfp4``: ``weight_packed`` U8 and ``weight_scale`` U8 ``[out, in/32]``;
- every other tensor at the model's dtype (embeddings, norms, biases, the ignored ``lm_head``; a
  tied ``lm_head`` is not saved);
- the safetensors header: 8 bytes of length, then compact JSON (``__metadata__`` first, then the
  tensors in data order: by dtype, widest first, then by name), padded with spaces to 8 bytes.

Recipe sizes are exact (the whole layout is computed); a mixed plan's header is counted per row
with each offset at the file's digit count, an upper bound within a few bytes per tensor.
"""

from __future__ import annotations

import json

from .errors import MpsearchError, name_list
from .filesize import FileModel
from .formats import get_format
from .targets import get_target

#: safetensors' dtype order (its Rust ``Dtype`` enum); the data is sorted by dtype, descending
_DTYPE_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16",
                "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
_TORCH_DTYPES = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32",
                 "bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def option_tensors(option: str, out: int, inp: int, dtype: str = "BF16") -> list[tuple[str, str, tuple]]:
    """``(suffix, safetensors dtype, shape)`` of the tensors a layer of ``out`` x ``inp`` weights
    becomes under a vLLM option (``keep``: the weight at ``dtype``): the format's own declaration,
    :meth:`checkpoint_tensors` (:mod:`mpsearch.formats.intq`, :mod:`mpsearch.formats.fp`)."""
    if option == "keep":
        return [("weight", dtype, (out, inp))]
    fmt = get_format(option)
    if fmt is None or fmt.consumer != "compressed-tensors":
        raise MpsearchError(f"option {option!r} is not a compressed-tensors format")
    if not callable(getattr(fmt, "checkpoint_tensors", None)):
        raise MpsearchError(f"no compressed-tensors layout known for option {option!r}: its format declares "
                            f"no checkpoint_tensors(out_channels, in_features, dtype)")
    return fmt.checkpoint_tensors(out, inp, dtype)


def _nbytes(dtype: str, shape) -> int:
    n = _DTYPE_BYTES[dtype]
    for d in shape:
        n *= int(d)
    return n


def _entry(name: str, dtype: str, shape, start: int, end: int) -> str:
    return json.dumps({name: {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}},
                      separators=(",", ":"))[1:-1]


def safetensors_size(entries) -> tuple[int, int]:
    """``(header bytes incl. the 8-byte length, file bytes)`` of a safetensors file holding
    ``entries`` (``(name, dtype, shape)``) with ``{"format": "pt"}`` metadata, laid out as the
    safetensors library writes it."""
    order = sorted(entries, key=lambda e: (-_DTYPE_ORDER.index(e[1]), e[0]))
    parts, offset = ['"__metadata__":{"format":"pt"}'], 0
    for name, dtype, shape in order:
        n = _nbytes(dtype, shape)
        parts.append(_entry(name, dtype, shape, offset, offset + n))
        offset += n
    header = len(("{" + ",".join(parts) + "}").encode())
    header = -(-header // 8) * 8
    return 8 + header, 8 + header + offset


def _saved_dtype(model) -> tuple[str, str]:
    """The dtype llm-compressor will save the unplanned tensors in, and where that comes from."""
    cfg = getattr(model, "config", None)
    dt = getattr(cfg, "dtype", None) if hasattr(cfg, "dtype") else getattr(cfg, "torch_dtype", None)
    got = _TORCH_DTYPES.get(str(dt))
    if got in ("BF16", "F16"):
        return got, "the checkpoint's dtype"
    return "BF16", f"assumed: the checkpoint says {dt}; llm-compressor saves the dtype the model is loaded in"


def compressed_tensors_file_model(model, layers) -> FileModel:
    """The vLLM file model of ``layers`` (planned layer names) of ``model``."""
    options = [o for o in get_target("vllm").options]
    dtype, dtype_note = _saved_dtype(model)
    state = model.state_dict()
    seen, unplanned, elements = set(), [], 0
    shapes = {}
    for name, t in state.items():
        key = t.data_ptr() if t.numel() else id(t)
        if key in seen:  # tied: saved once
            continue
        seen.add(key)
        elements += t.numel()
        mod, _, leaf = name.rpartition(".")
        if mod in layers and leaf == "weight":
            shapes[mod] = tuple(int(d) for d in t.shape)
            continue
        unplanned.append((name, dtype, tuple(int(d) for d in t.shape)))
    missing = [lay for lay in layers if lay not in shapes]
    if missing:
        raise MpsearchError(f"planned layer(s) {name_list(missing, 3)} have no weight in the state dict")
    rows = {}
    for lay in layers:
        out, inp = shapes[lay][0], int(max(1, _prod(shapes[lay][1:])))
        rows[lay] = {}
        for opt in options:  # a format that declares no layout is refused (the table notes why)
            rows[lay][opt] = option_tensors(opt, out, inp, dtype)
    fixed_bytes = sum(_nbytes(d, s) for _, d, s in unplanned)
    recipes = {}
    for opt in options:
        if not all(opt in rows[lay] for lay in layers):
            continue
        entries = list(unplanned) + [(f"{lay}.{suf}", d, s) for lay in layers for suf, d, s in rows[lay][opt]]
        header, total = safetensors_size(entries)
        planned_bytes = sum(_nbytes(d, s) for lay in layers for _, d, s in rows[lay][opt])
        recipes[f"uniform-{opt}"] = {"base": "default", "planned_bytes": planned_bytes,
                                     "planned_padded": total - header - fixed_bytes, "file_bytes": total,
                                     "header_bytes": header}
    # the header: the unplanned entries (exact) + a per-row share for each planned layer's entries
    digits = len(str(max([r["file_bytes"] for r in recipes.values()] or [fixed_bytes])))
    unplanned_header, _ = safetensors_size(unplanned)
    row_extra = {lay: {opt: sum(len(_entry(f"{lay}.{suf}", d, s, 10 ** (digits - 1), 10 ** (digits - 1)).encode())
                                + 1 for suf, d, s in ts) for opt, ts in rows[lay].items()} for lay in layers}
    header = unplanned_header + 7  # the padding to 8 bytes, at most 7
    fm = FileModel(
        consumer="vllm", source=f"compressed-tensors safetensors, unplanned tensors in {dtype}",
        header_bytes=header, header_measured=False,
        header_note=("computed: the safetensors JSON header (exact for the recipes; a mixed plan's counts each offset "
                     f"at {digits} digits and 7 bytes of padding, an upper bound)"),
        alignment=1, elements=int(elements), planned={lay: [f"{lay}.weight"] for lay in layers},
        bases={"default": {"command": "", "tensor_bytes": fixed_bytes, "padded_bytes": fixed_bytes,
                           "types": {}}},
        default_base="default", recipes={}, notes=[f"unplanned tensors stored as {dtype} ({dtype_note})"],
        row_extra=row_extra)
    for name, r in recipes.items():  # planned_padded: the planned tensors + their header share, exact totals
        fm.recipes[name] = {"base": "default", "planned_bytes": r["planned_bytes"],
                            "planned_padded": r["file_bytes"] - header - fixed_bytes}
    return fm


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
