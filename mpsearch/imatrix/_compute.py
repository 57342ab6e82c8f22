"""Computing an importance matrix as ``llama-imatrix`` does (:func:`compute_imatrix`), and the
GGUF tensor names its entries carry (see :mod:`mpsearch.imatrix`).
"""

from __future__ import annotations

import re

from ..errors import MpsearchError
from ..export.llamacpp_types import LlamaCppExporter
from ._file import Entry, Imatrix, MIN_ROWS, NoTensors

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

    from ..data import as_batches, move_batch, run_model  # start-up: keeps this module free of torch
    from ..layers import discover_layers  # start-up: keeps this module free of torch
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
    col = _Collector()
    handles = _hook_layers(model, tensor_names(layer_names, arch), col, process_output, arch)
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


def _hook_layers(model, names: dict, col: _Collector, process_output: bool, arch: str) -> list:
    """Forward hooks that add each wanted tensor's squared inputs to ``col`` (stacked experts: one
    hook on their module, and one on their router); the handles, to remove after the passes."""
    from ..layers import get_module  # start-up: keeps this module free of torch

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
    return handles


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
