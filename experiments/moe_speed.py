"""The default sensitivity table of a Qwen3-30B-A3B-shaped MoE on one GPU: time and peak memory
(issue 22: "under 10 minutes on one H100 or H200").

The model is ``Qwen3MoeForCausalLM`` of Qwen3-30B-A3B's shape (48 layers, hidden 2048, 32 query and 4
key/value heads of 128, 128 experts of intermediate 768, top-8, vocabulary 151,936: 30.5 B weights,
61 GB in bf16), random-initialised directly on the GPU in bf16 (no hub; timing does not depend on
trained weights). Calibration: random token ids (``--calib-samples`` windows of ``--seq-len``).
The table is the default recipe's: ``output-distance`` with the ``llm`` option preset (11 options),
round to nearest, on the ``mpsearch`` target (one decision per stacked expert tensor).

Before running, the script prints the work it will do (suffix passes, the FLOPs of their matrix
products, the expert weights each pass streams), so a slow run can be read against the model.

  # on one GPU (H100: add --stack-options 3 so that the stacked logits fit beside the 61 GB model)
  python experiments/moe_speed.py --out experiments/moe_speed_results
  # the same code on a CPU at a tiny shape (a test of the script; seconds)
  python experiments/moe_speed.py --tiny --device cpu --dtype float32 --out /tmp/moe_speed

Each run appends one JSON record to ``OUT/results.jsonl`` and prints it; ``--markdown`` prints the
records as a table for experiments/moe_speed.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Qwen3-30B-A3B (config.json of Qwen/Qwen3-30B-A3B), and a tiny shape for testing the script
SHAPES = {
    "qwen3-30b-a3b": dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                          intermediate_size=6144, vocab_size=151936, max_position_embeddings=4096,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, intermediate_size=96,
                 vocab_size=512, max_position_embeddings=256, norm_topk_prob=True, decoder_sparse_step=1,
                 mlp_only_layers=[]),
}


def build(shape: str, device, dtype, seed: int = 0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**SHAPES[shape])
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3MoeForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval(), cfg


def work(cfg, layers, n_options: int, tokens: int, batches: int, stack: int | None) -> dict:
    """The suffix passes and matrix-product FLOPs of the output-distance table (prefix cached: a
    layer of block b runs blocks b..L-1 and the head; dense layers stack their options along the
    batch, ``stack`` at a time; a stacked expert tensor takes one pass per option)."""
    L, H, E, k = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attn = H * q + 2 * H * kv + q * H
    moe = k * 3 * H * cfg.moe_intermediate_size + E * H
    block = 2 * (attn + moe)  # FLOPs per token, matrix products with weights
    head = 2 * H * cfg.vocab_size
    passes = token_evals = flops = stream = 0
    expert_bytes_block = E * 3 * H * cfg.moe_intermediate_size * 2
    for lay in layers:
        b = int(lay.name.split("layers.")[1].split(".")[0]) if "layers." in lay.name else L
        suffix = (L - b) * block + head
        if lay.kind in ("expert", "expert_t"):
            n_pass = n_options * batches
        else:
            n_pass = -(-n_options // (stack or n_options)) * batches
        passes += n_pass
        token_evals += n_options * tokens
        flops += n_options * tokens * suffix
        stream += n_pass * (L - b) * expert_bytes_block  # every pass reads its suffix's experts
    return {"suffix_passes": passes, "token_evaluations": token_evals, "pflop": round(flops / 1e15, 2),
            "expert_weights_streamed_tb": round(stream / 1e12, 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    p.add_argument("--tiny", action="store_true", help="the tiny shape (a CPU test of the script)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--calib-samples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="windows per calibration batch")
    p.add_argument("--options", default="llm", help="option list or preset (default: the llm preset, 11 options)")
    p.add_argument("--estimator", default="output-distance")
    p.add_argument("--stack-options", type=int, default=None, help="output-distance stack_options")
    p.add_argument("--micro-batch", type=int, default=None, help="output-distance micro_batch")
    p.add_argument("--max-cache-mb", type=float, default=None)
    p.add_argument("--dry-run", action="store_true", help="print the work only")
    p.add_argument("--out", default="experiments/moe_speed_results")
    p.add_argument("--markdown", action="store_true", help="print OUT/results.jsonl as a markdown table")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.markdown:
        return print_markdown(out)
    shape = "tiny" if args.tiny else args.shape
    import mpsearch
    from mpsearch.layers import discover_layers
    from mpsearch.options import parse_options

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    model, cfg = build(shape, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, cfg.vocab_size, (args.calib_samples, args.seq_len), generator=g)
    batches = [windows[i:i + args.batch_size].to(device) for i in range(0, args.calib_samples, args.batch_size)]
    layers = discover_layers(model)
    planned = [lay for lay in layers if lay.role != "router"]
    n_opt = len(parse_options(args.options))
    parts = (args.micro_batch and -(-args.batch_size // args.micro_batch)) or 1
    expected = work(cfg, planned, n_opt, args.calib_samples * args.seq_len, len(batches) * parts, args.stack_options)
    print(json.dumps({"shape": shape, "params_b": round(n_params / 1e9, 3), "layers": len(planned),
                      "options": n_opt, "expected": expected}), flush=True)
    if args.dry_run:
        return 0
    settings = {k: v for k, v in (("stack_options", args.stack_options), ("micro_batch", args.micro_batch),
                                  ("max_cache_mb", args.max_cache_mb)) if v is not None}
    est = mpsearch.get_estimator(args.estimator, options=args.options, **settings)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    table = est.estimate(model, batches, progress=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    rec = {
        "shape": shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "params_b": round(n_params / 1e9, 3), "build_s": round(build_s, 1),
        "estimator": args.estimator, "options": n_opt, "settings": settings,
        "calib_tokens": args.calib_samples * args.seq_len, "batch_size": args.batch_size,
        "layers": len(table.layers), "seconds": round(seconds, 1),
        "peak_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "expected": expected, "cost": table.metadata.get("cost"),
        "coverage": {k: table.metadata["coverage"][k] for k in ("share", "target_share")},
        "experts_with_fallback": sum(len(v) for v in table.metadata.get("moe", {}).get("fallback", {}).values()),
        "torch": torch.__version__, "mpsearch": mpsearch.__version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a") as fh:
        fh.write(json.dumps(rec, default=str) + "\n")
    print(json.dumps(rec, default=str), flush=True)
    return 0


def print_markdown(out: Path) -> int:
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    print("| shape | device | options | calib tokens | settings | suffix passes | PFLOP | seconds | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in recs:
        print(f"| {r['shape']} | {r['device']} | {r['options']} | {r['calib_tokens']:,} | {r['settings'] or '-'} | "
              f"{r['cost'].get('suffix_passes')} | {r['expected']['pflop']} | {r['seconds']} | {r['peak_gb']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
