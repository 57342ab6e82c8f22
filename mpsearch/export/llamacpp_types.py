"""llama.cpp: a ``--tensor-type-file`` for ``llama-quantize``, with GGUF tensor names.

``llama-quantize`` (``tools/quantize/quantize.cpp``) reads the file as whitespace-separated
``PATTERN=TYPE`` tokens (no comments), lower-cases the pattern, and gives each tensor the type of
the first pattern that ``std::regex_search``-es its name (``src/llama-quant.cpp``). One anchored
line is written per layer, e.g. ``^blk\\.0\\.attn_q\\.weight$=q4_K``.

Hugging Face module names map to GGUF tensor names as gguf-py's ``TensorNameMap`` does for the
Llama family (Llama, Mistral, Qwen2/3 share it): ``model.layers.N.self_attn.{q,k,v,o}_proj`` ->
``blk.N.attn_{q,k,v,output}``, ``model.layers.N.mlp.{gate,up,down}_proj`` ->
``blk.N.ffn_{gate,up,down}``, ``model.embed_tokens`` -> ``token_embd``, ``lm_head`` -> ``output``.
``arch="<gguf MODEL_ARCH name>"`` uses gguf-py's own map instead (needs ``pip install gguf``).

Bit-width -> GGML type (K-quants: super-blocks of 256 weights with their own sub-block scales, so a
plan's group size and symmetry are not carried; ``keep`` -> ``keep_type``, f16 by default):

| bits | 2     | 3     | 4     | 5     | 6     | 8     | 16 (keep)        |
|------|-------|-------|-------|-------|-------|-------|------------------|
| type | q2_K  | q3_K  | q4_K  | q5_K  | q6_K  | q8_0  | f16 / bf16 / f32 |

1 and 7 bits have no such type and are refused. A plan made for ``--target llama.cpp`` names GGML
types itself (``q5_0``, ``q4_K``...): each is written as it is, so the file is exactly the plan. Such
plans give every tensor a legal type, so ``llama-quantize`` applies no fallback. ``embed_type``
(``--opt embed_type=q8_0``) adds a line for ``token_embd`` when the plan does not name it. The importer maps every GGML type back to its
nominal bits (q4_0, q4_1, iq4_xs... -> 4; f16, bf16, f32 -> keep), so a round trip keeps the bits.
llama.cpp keeps Llama's q/k/v and gate/up as separate tensors, so fused siblings may differ.
"""

from __future__ import annotations

import re

from ..errors import close_matches, name_list
from ..formats import format_names, get_format
from ..options import KEEP, Option
from ..plan import BitPlan
from ._base import Exporter, ExportError, format_name, plan_from_options, refuse

TYPES = {2: "q2_K", 3: "q3_K", 4: "q4_K", 5: "q5_K", 6: "q6_K", 8: "q8_0"}
KEEP_TYPES = ("f16", "bf16", "f32")

#: GGML types that mpsearch has no format for (lower case) -> nominal bits, for the importer; the
#: types it has (:mod:`mpsearch.formats.ggml`, ``ggml_iq``) take their bits from their declarations
OTHER_TYPE_BITS = {"f32": 16, "f16": 16, "bf16": 16, "q8_1": 8, "q8_k": 8, "mxfp4": 4, "tq2_0": 2,
                   "tq1_0": 1, "q1_0": 1}


def type_bits() -> dict[str, int]:
    """GGML type name (lower case) -> nominal bits: the llama.cpp formats' own, and
    :data:`OTHER_TYPE_BITS`."""
    declared = {n.lower(): get_format(n).bits for n in format_names() if get_format(n).consumer == "llama.cpp"}
    return {**OTHER_TYPE_BITS, **declared}


def __getattr__(name: str):
    if name == "TYPE_BITS":  # the table this module once spelled out
        return type_bits()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}
_TOP = {"embed_tokens": "token_embd", "lm_head": "output"}
_HF_BLOCK = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
#: mixture-of-experts blocks, as gguf-py's TensorNameMap names them for the Llama-family MoE archs
#: (qwen2moe, qwen3moe, olmoe, mixtral = llama, deepseek2, glm4moe, llama4, gpt-oss): all experts of
#: a projection are one stacked tensor (``ffn_*_exps``), shared experts ``ffn_*_shexp``; a fused
#: ``gate_up_proj`` is the two tensors ``ffn_gate_exps`` and ``ffn_up_exps``
_MOE_BLOCK = re.compile(r"^(?:mlp|feed_forward|block_sparse_moe)\.(?:"
                        r"experts\.(?P<stacked>gate_up_proj|gate_proj|up_proj|down_proj)"
                        r"|experts\.\d+\.(?P<each>gate_proj|up_proj|down_proj|w1|w2|w3)"
                        r"|shared_experts?\.(?P<shared>gate_proj|up_proj|down_proj))$")
_EXPS = {"gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"), "gate_proj": ("ffn_gate_exps",),
         "up_proj": ("ffn_up_exps",), "down_proj": ("ffn_down_exps",), "w1": ("ffn_gate_exps",),
         "w3": ("ffn_up_exps",), "w2": ("ffn_down_exps",)}
_ROUTER = re.compile(r"^(?:model\.)?layers\.\d+\.(?:mlp|feed_forward|block_sparse_moe)\.(?:gate|router|shared_expert_gate)$")


def llama_gguf_names(hf_name: str) -> tuple[str, ...]:
    """GGUF tensor base names of a Llama-family module or stacked expert tensor (``()`` if none):
    one, or two for a fused ``gate_up_proj`` (``blk.N.ffn_gate_exps``, ``blk.N.ffn_up_exps``)."""
    m = _HF_BLOCK.match(hf_name)
    if m:
        leaf = _BLOCK.get(m[2])
        if leaf:
            return (f"blk.{m[1]}.{leaf}",)
        moe = _MOE_BLOCK.match(m[2])
        if moe is None:
            return ()
        if moe["shared"]:
            return (f"blk.{m[1]}.ffn_{moe['shared'].removesuffix('_proj')}_shexp",)
        return tuple(f"blk.{m[1]}.{t}" for t in _EXPS[moe["stacked"] or moe["each"]])
    top = _TOP.get(hf_name.removeprefix("model."))
    return (top,) if top else ()


def llama_gguf_name(hf_name: str) -> str | None:
    """GGUF tensor base name of a Llama-family module (``None`` if it has none; the first of a
    fused expert tensor's two)."""
    names = llama_gguf_names(hf_name)
    return names[0] if names else None


def _llama_hf_name(gguf_name: str) -> str | None:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", gguf_name)
    inverse = {v: k for k, v in _BLOCK.items()}
    if m:
        return f"model.layers.{m[1]}.{inverse[m[2]]}" if m[2] in inverse else None
    return {"token_embd": "model.embed_tokens", "output": "lm_head"}.get(gguf_name)


class LlamaCppExporter(Exporter):
    """llama.cpp ``--tensor-type-file`` (``pattern=type`` per tensor)."""

    name = "llama.cpp"
    suffix = ".txt"
    can_import = True
    consumers = ("llama.cpp",)
    stacked_experts = None  # blk.N.ffn_{gate,up,down}_exps

    def __init__(self, arch: str = "llama", keep_type: str = "f16", embed_type: str | None = None):
        self.arch = arch
        self.keep_type = keep_type
        self.embed_type = embed_type

    # -------------------------------------------------------------- names
    def _namer(self, names: list[str]):
        if str(self.arch).lower() == "llama":
            return llama_gguf_names
        try:
            import gguf
        except ImportError:
            raise ExportError(f"llama.cpp: arch={self.arch!r} needs gguf-py's name map: pip install gguf "
                              f"(or use the built-in arch='llama' map)") from None
        arch = getattr(gguf.MODEL_ARCH, str(self.arch).upper(), None)
        if arch is None:
            known = [a.name.lower() for a in gguf.MODEL_ARCH]
            raise ExportError(f"llama.cpp: unknown GGUF arch {self.arch!r}{close_matches(str(self.arch).lower(), known)}")
        blocks = [int(m[1]) for n in names if (m := re.search(r"\.(\d+)\.", n))]
        table = gguf.get_tensor_name_map(arch, max(blocks, default=0) + 1)

        def names_of(hf_name: str) -> tuple[str, ...]:
            base, _, leaf = hf_name.rpartition(".")
            if leaf == "gate_up_proj":  # one stacked tensor in transformers, two in GGUF
                parts = (table.get_name(f"{base}.gate_proj"), table.get_name(f"{base}.up_proj"))
                return parts if all(parts) else ()
            g = table.get_name(hf_name)
            return (g,) if g else ()

        return names_of

    def _names(self, plan_layers: list[str]) -> dict[str, tuple[str, ...]]:
        namer = self._namer(plan_layers)
        out, missing = {}, []
        routers = [lay for lay in plan_layers if _ROUTER.match(lay)]
        if routers:
            raise ExportError(f"llama.cpp: {routers[0]!r} is a router (ffn_gate_inp), which llama.cpp keeps in "
                              f"F32 and llama-quantize never quantizes; leave it out of the plan")
        for lay in plan_layers:
            if "[" in lay:
                raise ExportError(f"llama.cpp: {lay!r} is one expert of a stacked tensor; GGUF stores all "
                                  f"experts of a projection as one tensor with one type (plan per tensor: "
                                  f"--target llama.cpp)")
            g = namer(lay)
            if g:
                out[lay] = g
            else:
                missing.append(lay)
        if missing:
            raise ExportError(
                f"llama.cpp: no GGUF tensor name for {name_list(missing, limit=4)} (arch {self.arch!r}); "
                f"the built-in map covers Llama-family names (model.layers.N.self_attn.q_proj ...); "
                f"pass arch=<gguf arch> (--opt arch=qwen2) for another family"
            )
        return out

    # -------------------------------------------------------------- export
    def check(self, plan: BitPlan) -> None:
        if self.keep_type not in KEEP_TYPES:
            raise ExportError(f"llama.cpp: keep_type must be one of {', '.join(KEEP_TYPES)}, got {self.keep_type!r}")
        known = type_bits()
        if self.embed_type is not None and str(self.embed_type).lower() not in known:
            raise ExportError(f"llama.cpp: embed_type {self.embed_type!r} is not a GGML type; known: "
                              f"{', '.join(sorted(known))}")
        refuse(plan, self.name, lambda o: o.is_keep or _ggml_type(o) is not None or (o.fmt is None and o.bits in TYPES),
               "GGUF has types for 2, 3, 4, 5, 6 and 8 bits (q2_K..q6_K, q8_0), 16 (keep), and the "
               "GGML types of --target llama.cpp")

    def build(self, plan: BitPlan) -> dict:
        names = self._names(plan.layers)
        doc, source = {}, {}
        for lay in plan.layers:
            opt = plan.option(lay)
            qtype = self.keep_type if opt.is_keep else (_ggml_type(opt) or TYPES[opt.bits])
            for g in names[lay]:
                key = f"^{re.escape(g + '.weight')}$"
                if key in doc and doc[key] != qtype:  # one GGUF tensor from several HF layers (per-expert Linears)
                    raise ExportError(
                        f"llama.cpp: {source[key]!r} ({doc[key]}) and {lay!r} ({qtype}) are one GGUF tensor "
                        f"{g!r} (all experts of a projection are stored together), so they need one type; "
                        f"solve with --target llama.cpp (it ties them)")
                doc[key], source[key] = qtype, lay
        if self.embed_type is not None and "token_embd" not in {g for gs in names.values() for g in gs}:
            doc[r"^token_embd\.weight$"] = str(self.embed_type)
        return doc

    def dumps(self, doc) -> str:
        return "".join(f"{pattern}={qtype}\n" for pattern, qtype in doc.items())

    # -------------------------------------------------------------- import
    def loads(self, text: str, source: str) -> dict:
        doc = {}
        for token in text.split():
            pattern, sep, qtype = token.partition("=")
            if not sep or not pattern or not qtype:
                raise ExportError(f"{source}: {token!r} is not PATTERN=TYPE (llama-quantize --tensor-type-file form)")
            doc.setdefault(pattern.lower(), qtype)
        if not doc:
            raise ExportError(f"{source}: the tensor-type file is empty")
        return doc

    def read(self, doc, layers, source) -> BitPlan:
        if isinstance(doc, str):
            doc = self.loads(doc, source)
        if not isinstance(doc, dict):
            raise ExportError(f"{source}: expected a mapping of tensor pattern -> GGML type")
        rules, known = [], type_bits()
        for pattern, qtype in doc.items():
            bits = known.get(str(qtype).lower())
            if bits is None:
                raise ExportError(f"{source}: unknown GGML type {qtype!r} for {pattern!r}; known: "
                                  f"{', '.join(sorted(known))}")
            try:
                rules.append((re.compile(pattern), KEEP if bits == 16 else _import_option(qtype, bits)))
            except re.error as exc:
                raise ExportError(f"{source}: pattern {pattern!r} is not a regex: {exc}") from None
        if layers is not None:
            options = {}
            wanted = [n for n in layers if not _ROUTER.match(n) and "[" not in n]  # routers stay F32
            for lay, gs in self._names(wanted).items():
                hits = [next((opt for rx, opt in rules if rx.search(g + ".weight")), None) for g in gs]
                if len({None if h is None else h.name for h in hits}) > 1:
                    raise ExportError(f"{source}: {lay!r} is one decision (the GGUF tensors {', '.join(gs)}), "
                                      f"but the file gives them different types")
                if hits and hits[0] is not None:
                    options[lay] = hits[0]
            if not options:
                raise ExportError(f"{source}: no pattern matches any of the given layers' GGUF tensors")
            return plan_from_options(options, self.name, source)
        if str(self.arch).lower() != "llama":
            raise ExportError(f"{source}: importing arch {self.arch!r} needs the layer names (layers=..., --layers)")
        options = {}
        for rx, opt in rules:
            tensor = _exact_tensor(rx.pattern)
            hf = _llama_hf_name(tensor.removesuffix(".weight")) if tensor else None
            if hf is None:
                raise ExportError(
                    f"{source}: pattern {rx.pattern!r} is not one Llama tensor name; pass the model's "
                    f"layer names (layers=..., --layers/--model) to resolve patterns"
                )
            options.setdefault(hf, opt)
        return plan_from_options(options, self.name, source)


def _import_option(qtype: str, bits: int) -> Option:
    """The llama.cpp target's option for a GGML type where mpsearch has its format, else intB."""
    fmt = get_format(qtype)
    if fmt is not None and fmt.consumer == "llama.cpp":
        return Option(bits=fmt.bits, fmt=fmt.name)
    return Option(bits)


def _ggml_type(option: Option) -> str | None:
    """The GGML type an option of the llama.cpp target names (``None`` for other options)."""
    return format_name(option, "llama.cpp")


def _exact_tensor(pattern: str) -> str | None:
    """``^blk\\.0\\.attn_q\\.weight$`` -> ``blk.0.attn_q.weight``; None if it is a real regex."""
    body = pattern.removeprefix("^").removesuffix("$")
    plain = body.replace(r"\.", ".")
    return plain if re.fullmatch(r"[a-z0-9_.]+", plain) and "." not in body.replace(r"\.", "") else None


def quantize_command(plan: BitPlan, tensor_types, *, imatrix=None, base: str = "Q8_0", **opts) -> str:
    """The ``llama-quantize`` command that writes ``plan``'s GGUF from the tensor-type file
    ``tensor_types`` (what ``export --to llama.cpp`` wrote), with ``--imatrix`` when the plan's
    table was estimated with one. The base type is a quantized one (llama-quantize ignores
    ``--tensor-type`` overrides on a float base); the token embedding's type, where the plan
    names it, goes to ``--token-embedding-type`` too. ``model-f16.gguf`` is the model converted
    by ``convert_hf_to_gguf.py`` (add ``--allow-requantize`` for an already quantized input)."""
    import shlex

    doc = LlamaCppExporter(**opts).build(plan)
    tok = doc.get(r"^token_embd\.weight$")
    parts = ["llama-quantize"]
    if imatrix is not None:
        parts += ["--imatrix", shlex.quote(str(imatrix))]
    parts += ["--tensor-type-file", shlex.quote(str(tensor_types))]
    if tok:
        parts += ["--token-embedding-type", tok]
    return " ".join(parts + ["model-f16.gguf", "model-mixed.gguf", base])
