"""Which load-balancing loss keeps every expert of every layer in use? (for experiments/train_moe.py)

transformers' ``load_balancing_loss_func`` pools the routing of all layers before it balances
(``experts * sum_e f_e * P_e`` over every layer's tokens at once), so a layer may send its tokens
to a few experts as long as other layers use the others. ``train_moe.balance_loss`` is the Switch
Transformer loss of each layer, averaged over layers. This trains the same small Qwen3-MoE with
each (and with none) on CPU and reports each layer's share of routed top-k slots per expert on
the evaluation plays.

To run on 2 CPU cores, the model is small (hidden 128, 4 layers x 16 experts of width 128,
top-2) and the vocabulary is cut to the 2,047 most frequent SmolLM2 tokens of the training text
plus one "other" token (the LM head of 49,152 would dominate the time); training: 300 steps of
16 x 128 tokens from the first 300,000 characters of the calibration plays, AdamW lr 2e-3 with
warm-up and cosine decay, seed 0 (train_moe.py's recipe at a smaller size).

    python experiments/moe_balance.py run layer 0.01      # one run: loss kind, coefficient
    python experiments/moe_balance.py all                 # the runs of experiments/moe_balance.md
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import train_moe as tm  # noqa: E402

RESULTS = ROOT / "experiments" / "moe_balance.json"
RUNS = (("layer", 0.01), ("pooled", 0.01), ("layer", 0.02), ("layer", 0.05), ("layer", 0.0))
CFG = dict(hidden=128, n_layer=4, n_head=2, n_head_kv=1, head_dim=64, n_expert=16, top_k=2,
           moe_ff=128, seq_len=128)
VOCAB, STEPS, BATCH, LR = 2048, 300, 16, 2e-3


def data():
    import torch

    tok = tm.tokenizer()
    d = tm.token_data(tok, val_frac=0.1, max_chars=300_000, eval_tokens=8192)
    cnt = torch.bincount(d["train"], minlength=len(tok))
    top = cnt.argsort(descending=True)[: VOCAB - 1]
    remap = torch.full((len(tok),), VOCAB - 1, dtype=torch.long)
    remap[top] = torch.arange(VOCAB - 1)
    return tok, remap[d["train"]], remap[d["eval"]]


def run(kind: str, coef: float, prepared=None) -> dict:
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    tok, train, ev = prepared or data()
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tm.build_config(dict(CFG, aux_coef=coef), VOCAB, tok))
    m.set_experts_implementation("eager")
    m.train()
    opt = torch.optim.AdamW([{"params": [p for p in m.parameters() if p.ndim >= 2],
                              "weight_decay": 0.1},
                             {"params": [p for p in m.parameters() if p.ndim < 2],
                              "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95))
    warm = STEPS // 10
    t0 = time.time()
    for s in range(STEPS):
        lr = (LR * (s + 1) / warm if s < warm else
              LR * (0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / (STEPS - warm)))))
        for g in opt.param_groups:
            g["lr"] = lr
        x = tm.batch_at(train, s, seed=0, batch=BATCH, seq_len=CFG["seq_len"])
        out = m(input_ids=x, output_router_logits=True, use_cache=False)
        ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB),
                                               x[:, 1:].reshape(-1))
        aux = tm.balance_loss(out.router_logits, CFG["top_k"]) if kind == "layer" else out.aux_loss
        opt.zero_grad()
        (ce + coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
    r = tm.evaluate(m, ev, seq_len=CFG["seq_len"], batch=BATCH, device="cpu",
                    autocast=contextlib.nullcontext, route=True)
    shares = [[c / sum(row) for c in row] for row in r["expert_slots"]]
    flat = [x for row in shares for x in row]
    uniform = 1 / CFG["n_expert"]
    return {"loss": kind, "coef": coef, "steps": STEPS, "eval_loss": r["loss"],
            "share_min": min(flat), "share_max": max(flat),
            "experts_below_quarter_uniform": sum(x < uniform / 4 for x in flat),
            "experts": len(flat), "shares": shares, "seconds": round(time.time() - t0)}


def markdown(results: list[dict]) -> str:
    lines = ["| balancing loss | coefficient | eval loss (2,048-token vocabulary) | min share | "
             "max share | experts under 1/4 of uniform (of 64) |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        name = {"layer": "per layer (train_moe.balance_loss)",
                "pooled": "pooled over layers (transformers)"}[r["loss"]]
        if r["coef"] == 0:
            name = "none"
        lines.append(f"| {name} | {r['coef']} | {r['eval_loss']:.4f} | {r['share_min']:.4f} | "
                     f"{r['share_max']:.4f} | {r['experts_below_quarter_uniform']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        print(json.dumps(run(argv[1], float(argv[2]))))
        return
    prepared = data()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    done = {(r["loss"], r["coef"]) for r in results}
    for kind, coef in RUNS:
        if (kind, coef) in done:
            continue
        results.append(run(kind, coef, prepared))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "shares"}), flush=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
