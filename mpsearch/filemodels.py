"""File models of a model for a target, and file budgets as a frontier's targets.

The side of :mod:`mpsearch.filesize` that needs the targets, the layer discovery, the solvers'
problem and :mod:`mpsearch.deploy` (kept apart so that :mod:`mpsearch.budget` and
:mod:`mpsearch.problem` can use :mod:`mpsearch.filesize` without an import cycle).
"""

from __future__ import annotations

import math
import re

from .budget import Budget
from .deploy import ArchInfo
from .errors import BudgetError, MpsearchError, name_list
from .export import llamacpp_types as lt
from .filesize import converted_tensors, FileModel, read_gguf, source_gguf
from .filesize_ct import compressed_tensors_file_model
from .targets import get_target
from .targets.llamacpp import LLAMACPP
from .targets.llamacpp_mixes import (allows_quantization, FTYPE_DEFAULT_TYPE, mix_types, RECIPE_FTYPES,
                                     type_nbytes)

#: the base mix of a plan's llama-quantize command when the budget names none
DEFAULT_LLAMACPP_BASE = "Q4_K_M"
#: bytes of GGUF metadata per vocabulary entry (tokens, token types and BPE merges), measured on
#: SmolLM2-135M's GGUF (1,767,810 of its 1,785,664 header bytes for 49,152 entries): the estimate
#: used when no GGUF is at hand
HEADER_BYTES_PER_TOKEN = 36.0


def _pad(n: int, align: int) -> int:
    return -(-int(n) // align) * align


def _tensor_info_bytes(name: str, ndim: int) -> int:
    # gguf_tensor_info: name (u64 length + bytes), n_dims (u32), ne (u64 each), type (u32), offset (u64)
    return 8 + len(name.encode()) + 4 + 8 * ndim + 4 + 8


def _gguf_names_of_layer(name: str) -> tuple[str, ...]:
    """GGUF tensor names of a planned Llama-family layer (``()`` if it has none)."""
    many = getattr(lt, "llama_gguf_names", None)
    names = many(name) if many is not None else ((lt.llama_gguf_name(name),) if lt.llama_gguf_name(name) else ())
    return tuple(n + ".weight" for n in names)


def _ftype_of_type(type_name: str) -> str | None:
    """The llama-quantize ftype whose default type is ``type_name`` (``q4_K`` -> ``Q4_K_M``)."""
    preferred = {"q2_K": "Q2_K", "q3_K": "Q3_K_M", "q4_K": "Q4_K_M", "q5_K": "Q5_K_M", "iq3_s": "IQ3_S",
                 "iq2_xs": "IQ2_XS"}
    if type_name in preferred:
        return preferred[type_name]
    hits = [f for f, t in FTYPE_DEFAULT_TYPE.items() if t == type_name]
    return hits[0] if hits else None


def llamacpp_file_model(tensors, hparams: dict, planned: dict, *, header_kv_bytes: int, header_measured: bool,
                        header_note: str, alignment: int = 32, source: str = "") -> FileModel:
    """The GGUF file model from the full tensor list.

    ``tensors``: ``(gguf name, torch-order shape, ggml type in IN)`` for every tensor of the GGUF
    the plan will be quantized from; ``hparams``: ``arch``, ``n_layer``, ``n_head``, ``n_head_kv``,
    ``n_expert``; ``planned``: planned layer -> its GGUF tensor names; ``header_kv_bytes``: IN's
    metadata as llama-quantize writes it (magic, counts, key-value pairs).
    """
    shapes = {n: tuple(s) for n, s, _ in tensors}
    src = {n: t for n, _, t in tensors}
    planned_tensors = [t for names in planned.values() for t in names]
    missing = [t for t in planned_tensors if t not in shapes]
    if missing:
        raise MpsearchError(f"planned tensor(s) {name_list(missing, 4)} are not in the GGUF "
                            f"({name_list(list(shapes)[:4], 4)} ...); is it this model's GGUF?")
    planned_set = set(planned_tensors)
    header = _pad(header_kv_bytes + sum(_tensor_info_bytes(n, len(s)) for n, s in shapes.items()), alignment)
    elements = sum(math.prod(s) for s in shapes.values())
    kw = dict(arch=hparams["arch"], n_layer=hparams["n_layer"], n_head=hparams["n_head"],
              n_head_kv=hparams["n_head_kv"], n_expert=hparams.get("n_expert", 0))
    tensor_list = list(shapes.items())
    manual = [(f"^{re.escape(t)}$", "q8_0") for t in planned_tensors]  # any type: overrides skip the mix

    def fixed_part(ftype: str, pure: bool) -> dict:
        types = mix_types(ftype, tensor_list, tensor_types=manual, pure=pure, **kw)
        tb = pb = 0
        converted, each, kinds = {}, {}, {}
        for name in shapes:
            if name in planned_set:
                continue
            t = types.get(name, src[name])
            if name in types and t != src[name]:
                converted[name] = t
            n = type_nbytes(t, shapes[name])
            each[name] = n
            kinds[name] = t
            tb += n
            pb += _pad(n, alignment)
        return {"command": ("--pure " if pure else "") + ftype, "tensor_bytes": tb, "padded_bytes": pb,
                "types": converted, "tensors": each, "tensor_types": kinds}

    bases, recipes = {}, {}

    def add_recipe(name: str, ftype: str, pure: bool):
        base = ("pure-" if pure else "") + ftype
        if base not in bases:
            bases[base] = fixed_part(ftype, pure)
        types = mix_types(ftype, tensor_list, pure=pure, **kw)
        pb = pp = 0
        for names in planned.values():
            for t in names:
                n = type_nbytes(types.get(t, src[t]), shapes[t])
                pb += n
                pp += _pad(n, alignment)
        recipes[name] = {"base": base, "planned_bytes": pb, "planned_padded": pp}

    for ftype in dict.fromkeys((DEFAULT_LLAMACPP_BASE, *RECIPE_FTYPES)):
        add_recipe(ftype, ftype, False)

    for t in LLAMACPP.options:
        ftype = _ftype_of_type(t)
        if ftype is not None and FTYPE_DEFAULT_TYPE.get(ftype) == t:
            add_recipe(f"pure-{t}", ftype, True)
    notes = []
    skipped = [n for n, s in shapes.items() if n not in planned_set
               and allows_quantization(n, s, arch=kw["arch"]) and n not in ("token_embd.weight", "output.weight")]
    if skipped:
        notes.append(f"{len(skipped)} quantizable tensor(s) not planned ({name_list(skipped, 3)}): typed by the "
                     f"base mix's rules")
    return FileModel(consumer="llama.cpp", source=source, header_bytes=header, header_measured=header_measured,
                     header_note=header_note, alignment=alignment, elements=int(elements),
                     planned={k: list(v) for k, v in planned.items()}, bases=bases,
                     default_base=DEFAULT_LLAMACPP_BASE, recipes=recipes, notes=notes,
                     rows={n: int(s[-2]) if len(s) > 1 else 1 for n, s in shapes.items()})


def gguf_file_model(path, layers, *, planned_names=None) -> FileModel:
    """The exact GGUF file model of ``layers`` (planned layer names) quantized from the GGUF
    ``path`` by ``llama-quantize --tensor-type-file``."""
    from pathlib import Path

    info = read_gguf(path)
    planned = {}
    for lay in layers:
        names = (planned_names or _gguf_names_of_layer)(lay)
        if not names:
            raise MpsearchError(f"layer {lay!r} has no GGUF tensor name; the file model covers Llama-family "
                                f"names (model.layers.N.self_attn.q_proj ...)")
        planned[lay] = list(names)
    return llamacpp_file_model(
        info["tensors"], info, planned, header_kv_bytes=info["kv_bytes"], header_measured=True,
        header_note=f"measured: the metadata of {Path(path).name}, which llama-quantize copies",
        alignment=info["alignment"], source=str(Path(path).name))


def torch_llamacpp_file_model(model, layers) -> FileModel:
    """The GGUF file model of a torch (transformers) model: from its GGUF when it was loaded from
    one (exact), else as ``convert_hf_to_gguf.py --outtype f16`` would write it (header estimated)."""
    path = source_gguf(model)
    if path is not None:
        return gguf_file_model(path, layers)
    got = converted_tensors(model)
    if got is None:
        raise MpsearchError("the model has no transformers config, so its GGUF tensors cannot be named")
    tensors, hp, unknown = got
    if unknown:
        raise MpsearchError(f"no GGUF name for {name_list(unknown, 3)}; the file model needs every weight's name")
    planned = {}
    for lay in layers:
        names = _gguf_names_of_layer(lay)
        if not names:
            raise MpsearchError(f"layer {lay!r} has no GGUF tensor name")
        planned[lay] = list(names)
    kv = 4 + 8 + 8 + 8 + int(HEADER_BYTES_PER_TOKEN * hp["vocab"]) + 4096
    return llamacpp_file_model(
        tensors, hp, planned, header_kv_bytes=kv, header_measured=False,
        header_note=(f"estimated: {HEADER_BYTES_PER_TOKEN:g} bytes of metadata per vocabulary entry "
                     f"({hp['vocab']:,}) plus 4 KiB, from SmolLM2's GGUF; the tensor infos are exact; exact when "
                     f"the model is loaded from its GGUF"),
        source="convert_hf_to_gguf.py --outtype f16 (as it would write this model)")


def file_budget_targets(table, key: str, budget) -> dict:
    """The file budgets of ``budget`` as values of the swept ``key`` (a frontier's targets:
    ``{"size=Q4_K_M": 4.83}`` for ``key=avg_bits``). Where a row's file bytes exceed its size
    (alignment padding, safetensors header records), the largest such excess of each layer is
    set aside first, so a plan at the target fits the budget."""
    import numpy as np

    from .problem import compile_problem  # start-up: keeps this module free of pandas/numpy

    probe = compile_problem(table, Budget(constraints={key: 1e300}))
    kcon = next(c for c in probe.constraints if c.key == key)
    if kcon.column != "size_bits":
        raise BudgetError(f"budgets size=, file= and bpw= on the model path are targets of a size key: sweep "
                          f"--key avg_bits or size_bits, not {key!r}")
    out = {}
    for k, v in budget.file.items():
        problem = compile_problem(table, Budget(file={k: v}))
        con = problem.constraints[-1]
        cap = con.cap
        if con.column != "size_bits":
            excess = np.where(problem.allowed, problem.resources[con.column] - problem.resources["size_bits"], 0.0)
            cap -= float(excess.max(axis=1).sum())
        out[f"{k}={v}"] = kcon.to_user(cap)
    return out


def file_model(model, layers, target) -> FileModel | None:
    """The file model of ``layers`` (planned layer names) of ``model`` for ``target``, or ``None``
    for a target that writes no consumer file."""
    name = get_target(target).name
    if name == "llama.cpp":
        return torch_llamacpp_file_model(model, layers)
    if name == "vllm":
        return compressed_tensors_file_model(model, layers)
    return None


def model_file_model(model, target) -> FileModel:
    """The file model of every layer ``target`` plans in ``model`` (as ``estimate`` plans them)."""
    from .layers import discover_layers  # start-up: keeps this module free of torch/numpy

    t = get_target(target)
    layers = [lay.name for lay in discover_layers(model) if t.plans_layer(lay, model)]
    fm = file_model(model, layers, t)
    if fm is None:
        raise MpsearchError(f"target {t.name!r} writes no consumer file of its own; file sizes exist for "
                            f"llama.cpp and vllm")
    return fm


def record_file_model(metadata: dict, model, layers, target) -> None:
    """Store the file model in a table's ``metadata["file"]`` (or say in ``metadata["file_note"]``
    why there is none)."""
    try:
        fm = file_model(model, layers, target)
    except (MpsearchError, ImportError) as exc:
        metadata["file_note"] = f"no file model ({exc})"
        return
    if fm is not None:
        metadata["file"] = fm.to_dict()
        if fm.consumer == "llama.cpp":  # what --fit needs: the model's attention and FFN shape
            try:
                metadata["deploy"] = arch_info(model).to_dict()
            except (MpsearchError, ImportError, AttributeError, TypeError, ValueError) as exc:
                metadata["deploy_note"] = f"no deployment shape ({exc})"


def arch_info(model):
    """llama.cpp's view of the model's shape (:class:`mpsearch.deploy.ArchInfo`): from the GGUF it
    was loaded from, else from its transformers config."""
    path = source_gguf(model)
    if path is not None:
        return ArchInfo.from_gguf(read_gguf(path))
    got = converted_tensors(model)
    if got is None:
        raise MpsearchError("the model has no transformers config")
    return ArchInfo.from_config(model.config, got[1]["arch"])
