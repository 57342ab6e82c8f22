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
from pathlib import Path

from ..errors import MpsearchError
from ..fileio import final_dir
from ..targets import get_target
from ._file import as_imatrix, Imatrix, NoTensors, read_imatrix
from ._compute import _experts, _in_features, _is_foreign, compute_imatrix, tensor_names
# the parts live in _file.py and _compute.py; every name stays importable from mpsearch.imatrix
from ._file import _ALIGN, _GGML_F32, _GGUF_MAGIC, _pad, _read_dat, _read_gguf, _Reader, _SCALAR  # noqa: F401
from ._file import _write_str, COUNT_SUFFIX, Entry, gguf_header, GgufHeader, KV_CHUNK_COUNT  # noqa: F401
from ._file import KV_CHUNK_SIZE, KV_DATASETS, MIN_ROWS, SUM_SUFFIX  # noqa: F401
from ._compute import _BLK, _Collector, _EXPERTS, _experts_module, _router, _tied  # noqa: F401


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
    from ..quant import rounding  # start-up: keeps this module free of torch

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
    from ..data import as_batches  # start-up: keeps this module free of torch
    from ..layers import discover_layers  # start-up: keeps this module free of torch

    imx = resolve_imatrix(imatrix, model, as_batches(calib), target, progress=progress)
    if imx is None:
        yield None
        return
    if imx.computed and out is not None:
        imx.path = final_dir(Path(out)).resolve() / FRONTIER_FILE
        imx.write_copy(Path(out) / FRONTIER_FILE)
    with rounding_context(imx, discover_layers(model, include_embedding=True)):
        yield imx
