"""Fixtures from llama.cpp's i-quant quantizers, for the bit-exactness tests of mpsearch/formats/ggml_iq.py.

Loads llama.cpp's ``libggml-base.so`` with ctypes (the loader of experiments/ggml_fixtures.py) and
quantizes float32 rows with ``ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix)`` --
the call llama-quantize makes for every tensor, ``imatrix`` being the tensor's per-column importance
(NULL without ``--imatrix``) -- then dequantizes the bytes with ggml's own ``to_float``. The rows:

- SmolLM2-135M ``down_proj`` rows (1536 columns) of blocks 0, 15 and 29, each with the importance
  llama-imatrix would give it: the mean squared input of that ``down_proj`` over 1,024 tokens of
  Shakespeare (``mpsearch.zoo``'s calibration split), computed here with forward hooks (not by
  llama-imatrix itself: the fixtures test the rounding given an importance, whatever its source);
- a 4096-column random-normal matrix whose importance is real too: the mean squared inputs of the
  ``down_proj`` of blocks 3, 9 and 21 put side by side (4,608 values, the first 4,096 kept);
- random Laplace rows and 20 adversarial rows of 256 (zeros, -0, constants, one outlier, tiny
  1e-6/1e-9/1e-20, large 1e3, sparse, one-signed, ties, ramp...), each under an importance with a
  heavy tail, some exact zeros and exact ties (``adversarial_imatrix``), and under all-ones.

Writes, under tests/fixtures/ggml_iq/:

- ``inputs.npz``: ``<case>`` (float32 ``[rows, cols]``) and ``<case>__imatrix`` (float32 ``[cols]``);
- ``<type>.npz``: ``<case>__q``/``<case>__y`` (ggml's bytes and dequantized values with the
  importance) and, for the types whose C quantizer has a no-imatrix path, ``<case>__q0`` (the bytes
  without; their values follow from ggml's dequantizer, which ``__y`` already pins down).

Usage::

    python experiments/ggml_iq_fixtures.py [--lib PATH/libggml-base.so] [--out tests/fixtures/ggml_iq]
    python experiments/ggml_iq_fixtures.py --check [--types iq4_xs,iq3_s] [--rows 16]  # every SmolLM2 matrix
    python experiments/ggml_iq_fixtures.py --speed [--shape 4096x4096] [--devices cpu,cuda] [--threads 1,2]
    python experiments/ggml_iq_fixtures.py --speed --devices cuda --no-ref  # on a GPU machine
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "ggml_iq"


def _base():
    spec = importlib.util.spec_from_file_location("ggml_fixtures", Path(__file__).with_name("ggml_fixtures.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


base = _base()
DEFAULT_LIB = base.DEFAULT_LIB

#: enum ggml_type value of every i-quant (ggml/include/ggml.h), in the order they were built
TYPES = {"iq4_xs": 23, "iq3_s": 21, "iq3_xxs": 18, "iq2_s": 22, "iq2_xs": 17, "iq2_xxs": 16,
         "iq1_m": 29, "iq1_s": 19}
#: types whose C quantizer asserts on a NULL imatrix (ggml-quants.c)
C_NEEDS_IMATRIX = ("iq2_xxs", "iq2_xs", "iq1_s")


class GgmlIq(base.Ggml):
    """libggml-base with the importance-matrix argument of ``ggml_quantize_chunk``."""

    def __init__(self, path: str, types=TYPES):
        super().__init__(path)
        self.codes = dict(types)  # the base class's row_size, quantize and dequantize look them up
        for name, code in self.codes.items():
            got = self.lib.ggml_type_name(code).decode()
            if got != name:
                raise SystemExit(f"{path}: type {code} is {got!r}, expected {name!r}")


def smollm2_importance(blocks=None, n_tokens: int = 1024) -> dict[str, np.ndarray]:
    """Mean squared input of SmolLM2's linear layers (what llama-imatrix accumulates per column),
    over ``n_tokens`` tokens of the zoo's Shakespeare calibration text: ``{weight name: [in]}``
    for every ``nn.Linear`` of the blocks (all blocks when ``blocks`` is None)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import torch

    from mpsearch import zoo

    model = zoo.smollm2().eval()
    tok = zoo.smollm2_tokenizer()
    ids = zoo.token_stream(tok, zoo.shakespeare_text("calib"), n_tokens)
    sums, counts, hooks = {}, {}, []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or ".layers." not in name:
            continue
        if blocks is not None and int(name.split(".layers.")[1].split(".")[0]) not in blocks:
            continue
        key = name + ".weight"
        sums[key] = torch.zeros(mod.in_features, dtype=torch.float64)
        counts[key] = 0

        def hook(_mod, args, key=key):
            a = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[key] += (a * a).sum(0)
            counts[key] += a.shape[0]
        hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for i in range(0, ids.numel(), 256):
            model(ids[i:i + 256][None])
    for h in hooks:
        h.remove()
    return {k: (sums[k] / counts[k]).float().numpy() for k in sums}


def adversarial_imatrix(n: int, rng) -> np.ndarray:
    """Heavy-tailed positive importance with exact zeros (dead columns) and runs of equal values."""
    w = np.exp(rng.standard_normal(n) * 1.5).astype(np.float32)
    w[rng.random(n) < 0.05] = 0.0
    w[rng.random(n) < 0.02] *= 1e3
    w[40:56] = 1.0
    return w


def cases(state, importance, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{case: (x [rows, cols], imatrix [cols])}``."""
    rng = np.random.default_rng(seed)
    out = {}
    down = lambda b: f"model.layers.{b}.mlp.down_proj.weight"  # noqa: E731
    for b in (0, 15, 29):
        out[f"smollm2_down_proj_{b}"] = (state[down(b)][:4].astype(np.float32), importance[down(b)])
    wide = np.concatenate([importance[down(3)], importance[down(9)], importance[down(21)]])[:4096]
    out["normal_4096"] = ((rng.standard_normal((4, 4096)) * 0.02).astype(np.float32), wide)
    lap = rng.laplace(0, 0.03, (4, 512)).astype(np.float32)
    out["laplace_512"] = (lap, adversarial_imatrix(512, rng))
    adv = base.synthetic_cases(seed)["adversarial_256"]
    out["adversarial_256"] = (adv, adversarial_imatrix(256, rng))
    out["adversarial_256_ones"] = (adv, np.ones(256, dtype=np.float32))
    return out


def build(ggml: GgmlIq, out: Path, types) -> None:
    state = base.smollm2_state()
    data = cases(state, smollm2_importance(blocks=(0, 3, 9, 15, 21, 29)))
    out.mkdir(parents=True, exist_ok=True)
    inputs = {}
    for case, (x, w) in data.items():
        inputs[case] = x
        inputs[f"{case}__imatrix"] = w
    tmp = out / "inputs.npz.tmp.npz"
    np.savez_compressed(tmp, **inputs)
    os.replace(tmp, out / "inputs.npz")
    total = (out / "inputs.npz").stat().st_size
    for name in types:
        arrays = {}
        for case, (x, w) in data.items():
            q = ggml.quantize(name, x, w)
            arrays[f"{case}__q"] = q
            arrays[f"{case}__y"] = ggml.dequantize(name, q, x.shape[1])
            if name not in C_NEEDS_IMATRIX:
                q0 = ggml.quantize(name, x)
                arrays[f"{case}__q0"] = q0
        path = out / f"{name}.npz"
        tmp = out / f"{name}.npz.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
        total += path.stat().st_size
        print(f"{name:8s} {len(data)} cases, {path.stat().st_size / 1e3:.0f} kB", flush=True)
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


def _pieces(w: np.ndarray, imatrix: np.ndarray | None):
    """A matrix and its importance as llama.cpp can take them: whole when 256 divides the row, else
    (576 columns) two column ranges [0, 512) and [64, 576), so every weight is quantized with its
    own column's importance."""
    cols = w.shape[1]
    if cols % 256 == 0:
        return [(w, imatrix)]
    n = cols // 256 * 256
    return [(np.ascontiguousarray(w[:, a:a + n]), None if imatrix is None else imatrix[a:a + n])
            for a in (0, cols - n)]


def check(ggml: GgmlIq, types, rows: int = 0) -> int:
    """Every SmolLM2 weight matrix, with its real importance (mean squared inputs over 1,024 tokens;
    the token embedding, which llama-imatrix does not see, gets ``adversarial_imatrix``) and, where
    llama.cpp can, without one, through llama.cpp and through mpsearch: differing values, bytes.
    ``rows``: that many evenly spaced rows of each matrix (0: all of them)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from mpsearch.formats import ggml_iq

    state = base.smollm2_state()
    importance = smollm2_importance()
    mats = {k: v for k, v in state.items() if v.ndim == 2}
    if rows:
        mats = {k: np.ascontiguousarray(v[np.linspace(0, v.shape[0] - 1, min(rows, v.shape[0])).astype(int)])
                for k, v in mats.items()}
    rng = np.random.default_rng(7)
    for k, v in mats.items():
        if k not in importance:
            importance[k] = adversarial_imatrix(v.shape[1], rng)
    failures = 0
    print("| type | importance | tensors | weights quantized | differing weights | differing bytes | torch s | ggml s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in types:
        fmt = ggml_iq.FORMATS[name]
        for with_w in (True, False):
            if not with_w and name in C_NEEDS_IMATRIX:
                continue
            n_t = n_w = bad_w = bad_b = 0
            t_torch = t_ggml = 0.0
            for key, w in mats.items():
                n_t += 1
                for piece, qw in _pieces(w, importance[key] if with_w else None):
                    t0 = time.perf_counter()
                    q = ggml.quantize(name, piece, qw)
                    y = ggml.dequantize(name, q, piece.shape[1])
                    t1 = time.perf_counter()
                    tw = None if qw is None else torch.from_numpy(qw)
                    b = fmt.to_bytes(torch.from_numpy(piece), tw).numpy()
                    t2 = time.perf_counter()
                    mine = fmt.dequantize(torch.from_numpy(b)).numpy()
                    t_ggml += t1 - t0
                    t_torch += t2 - t1
                    n_w += piece.size
                    bad_w += int((mine.view(np.uint32) != y.view(np.uint32)).sum())
                    bad_b += int((b != q).sum())
            failures += bad_w + bad_b
            print(f"| {name} | {'real' if with_w else 'none'} | {n_t} | {n_w} | {bad_w} | {bad_b} | "
                  f"{t_torch:.1f} | {t_ggml:.1f} |", flush=True)
    return 1 if failures else 0


def speed(ggml, types, shape=(4096, 4096), devices=("cpu",), threads=(1,)) -> None:
    """Seconds to quantize (``to_bytes``) one random-normal ``shape`` matrix under a heavy-tailed
    importance, per type: torch on each device (and CPU thread count) beside llama.cpp's C on one
    thread (``ggml`` may be None). Both sides build their grid tables first, outside the timing; an
    accelerator's time is the better of two runs, and its bytes are compared with the CPU's on the
    first 64 rows."""
    sys.path.insert(0, str(ROOT))
    import torch

    from mpsearch.formats import ggml_iq

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=gen) * 0.02
    imatrix = torch.exp(torch.randn(shape[1], generator=gen) * 1.5)
    cols = []
    for dev in devices:
        for t in (threads if dev == "cpu" else (None,)):
            cols.append((dev, t))
    head = " | ".join(f"torch {d}{'' if t is None else f' {t} thr'} s" for d, t in cols)
    gpu = [d for d in devices if d != "cpu"]
    extra = f" {gpu[0]} = cpu bytes |" if gpu else ""
    name0 = torch.cuda.get_device_name() if gpu and torch.cuda.is_available() else ""
    print(f"{shape[0]}x{shape[1]} float32, torch {torch.__version__} {name0}")
    print(f"| type | {head} | llama.cpp C 1 thr s | C = torch bytes |{extra}")
    print("|---|" + "---|" * len(cols) + "---|---|" + ("---|" if gpu else ""))
    for name in types:
        fmt = ggml_iq.FORMATS[name]
        cells, got, dev_bytes = [], None, None
        for dev, t in cols:
            if t is not None:
                torch.set_num_threads(t)
            x, iw = w.to(dev), imatrix.to(dev)
            fmt.to_bytes(x[:1], iw)  # warm-up (grid tables, kernels)
            best = float("inf")
            for _ in range(1 if dev == "cpu" else 2):
                if dev != "cpu":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = fmt.to_bytes(x, iw)
                if dev != "cpu":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            cells.append(f"{best:.2f}")
            if dev == "cpu":
                got = out.numpy()
            else:
                dev_bytes = out[:64].cpu().numpy()
            del out
        ref_t, same = "-", "-"
        if ggml is not None:
            ggml.quantize(name, w[:1].numpy(), imatrix.numpy())  # ggml_quantize_init: grid tables
            t0 = time.perf_counter()
            ref = ggml.quantize(name, w.numpy(), imatrix.numpy())
            ref_t = f"{time.perf_counter() - t0:.2f}"
            same = "-" if got is None else "yes" if np.array_equal(ref, got) else "NO"
        tail = ""
        if gpu:
            cpu64 = got[:64] if got is not None else fmt.to_bytes(w[:64], imatrix).numpy()
            tail = f" {'yes' if np.array_equal(cpu64, dev_bytes) else 'NO'} |"
        print(f"| {name} | " + " | ".join(cells) + f" | {ref_t} | {same} |{tail}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lib", default=os.environ.get("MPSEARCH_LIBGGML", DEFAULT_LIB),
                   help="path of libggml-base.so (default: $MPSEARCH_LIBGGML or the workspace build)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--types", default=",".join(TYPES), help="comma list of i-quant types")
    p.add_argument("--check", action="store_true",
                   help="compare mpsearch's torch quantizers with llama.cpp on all SmolLM2 tensors")
    p.add_argument("--rows", type=int, default=0,
                   help="--check: that many evenly spaced rows of each matrix (default: all)")
    p.add_argument("--speed", action="store_true", help="time one matrix per type (see --shape)")
    p.add_argument("--devices", default="cpu", help="devices for --speed, e.g. cpu,cuda")
    p.add_argument("--threads", default="1", help="CPU thread counts for --speed, e.g. 1,2")
    p.add_argument("--shape", default="4096x4096", help="matrix shape for --speed (OUTxIN)")
    p.add_argument("--no-ref", action="store_true", help="--speed without llama.cpp's library")
    args = p.parse_args(argv)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in TYPES]
    if unknown:
        print(f"unknown i-quant type(s) {unknown}; known: {', '.join(TYPES)}", file=sys.stderr)
        return 2
    have_lib = Path(args.lib).is_file()
    if args.speed:
        ggml = GgmlIq(args.lib) if have_lib and not args.no_ref else None
        speed(ggml, types, shape=tuple(int(v) for v in args.shape.split("x")),
              devices=tuple(args.devices.split(",")), threads=tuple(int(t) for t in args.threads.split(",")))
        return 0
    if not have_lib:
        print(f"{args.lib}: no such library; build llama.cpp or pass --lib", file=sys.stderr)
        return 2
    ggml = GgmlIq(args.lib)
    if args.check:
        return check(ggml, types, args.rows)
    build(ggml, args.out, types)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
