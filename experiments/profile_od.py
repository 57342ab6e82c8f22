"""Where the default table's time goes on one GPU (issue 24, item 2): ``output-distance`` with the
``llm`` preset (11 options) on a random model of SmolLM2-135M's shape in bf16, random token ids
(timing does not depend on trained weights), windows of 512 tokens.

Three things per run, each appended to ``OUT/results.jsonl``:

* ``time``: the whole table at ``--calib-samples`` windows in batches of ``--batch-size`` (the CLI's GPU
  default is 128 windows in batches of 8), wall time, peak GPU memory, the estimator's own cost record,
  and the matrix-product FLOPs of the suffix passes against the card's bf16 peak (the achieved fraction);
* ``profile``: the same on ``--profile-samples`` windows under ``torch.profiler``: the top operators
  by GPU time and by CPU time (``OUT/profile_*.txt``) and the share of the wall time the GPU was busy;
* ``--variants``: the table again with other settings (``batch_size=32``, ``stack_options=4`` ...), so a
  setting's effect is measured on the same machine in the same call.

    python experiments/profile_od.py --out $OUT/prof                       # on the GPU
    python experiments/profile_od.py --out /tmp/prof --device cpu --shape tiny --calib-samples 8 \\
        --profile-samples 8                                                 # a check of the script
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


def flops(cfg, options: int, tokens: int) -> float:
    """Matrix-product FLOPs of the suffix passes (prefix cached): a layer in block b runs blocks b..L-1
    and the head once per option on every token; 7 planned layers per block, the head one more."""
    L, H, I, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hd = H // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    block = 2 * (2 * H * H + 2 * H * kv + 3 * H * I)
    head = 2 * H * V
    total = 0.0
    for b in range(L):
        total += 7 * options * tokens * ((L - b) * block + head)
    total += options * tokens * head  # lm_head itself
    return total


def run_table(model, batches, device, **settings):
    import mpsearch

    est = mpsearch.get_estimator("output-distance", options="llm", **settings)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    table = est.estimate(model, batches, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return table, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="smollm2-135m")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--profile-samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--peak-tflops", type=float, default=790.0, help="the card's bf16 matrix rate (measured)")
    p.add_argument("--variants", default="", help="';'-separated k=v,k=v settings (batch_size is the "
                                                   "script's, the rest the estimator's)")
    p.add_argument("--skip-time", action="store_true")
    args = p.parse_args(argv)
    from mpsearch import zoo

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = zoo.random_llama(args.shape, device=device, dtype=dtype)
    cfg = model.config
    g = torch.Generator().manual_seed(0)

    def make(n, bs):
        ids = torch.randint(0, cfg.vocab_size, (n, args.seq_len), generator=g)
        return [ids[i:i + bs].to(device) for i in range(0, n, bs)]

    args.out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def record(kind, seconds, table, n, settings):
        f = flops(cfg, len(table.options), n * args.seq_len)
        rec = {"kind": kind, "card": card, "shape": args.shape, "dtype": str(dtype), "windows": n,
               "seq_len": args.seq_len, "settings": settings, "seconds": round(seconds, 2),
               "peak_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
               "pflop": round(f / 1e15, 3),
               "fraction_of_peak": round(f / seconds / (args.peak_tflops * 1e12), 4),
               "cost": table.metadata.get("cost"), "torch": torch.__version__}
        with open(args.out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")
        print(json.dumps(rec, default=str), flush=True)

    # warm-up (kernels, allocator) on 8 windows
    run_table(model, make(8, 8), device)
    if not args.skip_time:
        table, s = run_table(model, make(args.calib_samples, args.batch_size), device)
        record("time", s, table, args.calib_samples, {"batch_size": args.batch_size})
    for spec in filter(None, args.variants.split(";")):
        kv = dict(x.split("=") for x in spec.split(","))
        bs = int(kv.pop("batch_size", args.batch_size))
        st = {k: (None if v == "none" else int(v) if v.lstrip("-").isdigit() else v) for k, v in kv.items()}
        table, s = run_table(model, make(args.calib_samples, bs), device, **st)
        record("variant", s, table, args.calib_samples, {"batch_size": bs, **st})

    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    batches = make(args.profile_samples, args.batch_size)
    with torch.profiler.profile(activities=acts) as prof:
        table, s = run_table(model, batches, device)
    record("profile", s, table, args.profile_samples, {"batch_size": args.batch_size, "profiled": True})
    ka = prof.key_averages()
    sort_gpu = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    (args.out / "profile_gpu.txt").write_text(ka.table(sort_by=sort_gpu, row_limit=40, max_name_column_width=70))
    (args.out / "profile_cpu.txt").write_text(ka.table(sort_by="self_cpu_time_total", row_limit=40,
                                                       max_name_column_width=70))
    if device.type == "cuda":
        busy = sum(e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA)
        print(json.dumps({"gpu_busy_s": round(busy / 1e6, 2), "wall_s": round(s, 2),
                          "busy_fraction": round(busy / 1e6 / s, 3)}), flush=True)
    print((args.out / "profile_gpu.txt").read_text()[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
