"""Fixtures of llama.cpp's KV cache bytes on its own K/V activations (SmolLM2).

1. ``llama-server -ctk f32 -ctv f32`` (CPU build, flash attention on) processes a Shakespeare
   passage; the slot is saved (``POST /slots/0?action=save``): the state file holds every layer's K
   and V rows as float32, exactly the values llama.cpp computed (K after RoPE, in its interleaved
   head layout).
2. For each cache type T the same server with ``-ctk T -ctv T`` saves the slot again. Layer 0's
   inputs do not depend on the cache type, so its saved K and V bytes are llama.cpp's stored form of
   the step-1 values; later layers read back quantized attention and differ.
3. llama.cpp's CPU ``from_float`` of T (``ggml_get_type_traits_cpu(T)->from_float`` from
   ``libggml-cpu.so`` through ctypes, the function ``ggml_set_rows`` calls) quantizes the step-1 rows
   of layers 0, 14 and 29, for a quantized T after the Walsh-Hadamard rotation llama.cpp applies
   first (``attn_rot_k``/``attn_rot_v``: chunks of 64 for SmolLM2's head size 64; redone here in
   numpy as ``ggml_compute_forward_fwht`` computes it); the script checks that layer 0 equals the
   server's own bytes, so both the rotation and ``from_float`` are llama.cpp's.

Writes ``tests/fixtures/llamacpp/kv_cache.npz`` (the first :data:`KEEP` cells: f32 rows of the
three layers, their bytes per type, and the server's own layer-0 bytes); the tests compare
:mod:`mpsearch.kvcache` with them.

    python experiments/kv_quant_fixtures.py      # ~1 min
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from deploy_fixtures import stop  # noqa: E402
from llamacpp_fixtures import LLAMA_CPP, llama_cpp_commit, smollm2_gguf  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "llamacpp" / "kv_cache.npz"
BIN = LLAMA_CPP / "build" / "bin"
TYPES = {"f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "iq4_nl": 20}
BLOCK = {"f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22),
         "q5_1": (32, 24), "iq4_nl": (32, 18), "f32": (1, 4)}
LAYERS = (0, 14, 29)
ROW = 192  # SmolLM2: 3 KV heads x 64
KEEP = 24  # cells kept in the fixture (all of them are checked here)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def saved_state(gguf: Path, prompt: str, type_k: str, type_v: str, work: Path) -> bytes:
    """The slot-0 state file llama-server writes after processing ``prompt``."""
    port = _free_port()
    cmd = [str(BIN / "llama-server"), "-m", str(gguf), "-c", "512", "-np", "1", "-fa", "on", "-ctk", type_k,
           "-ctv", type_v, "-t", "2", "--fit", "off", "--port", str(port), "--slot-save-path", str(work)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        for line in p.stdout:
            if "listening" in line:
                break
            if time.time() - t0 > 120:
                raise RuntimeError("llama-server did not start")
        _post(port, "/completion", {"prompt": prompt, "n_predict": 1, "cache_prompt": True, "temperature": 0})
        name = f"state-{type_k}-{type_v}.bin"
        _post(port, "/slots/0?action=save", {"filename": name})
        return (work / name).read_bytes()
    finally:
        stop(p)


def layer_rows(state: bytes, type_name: str, which: str, layer: int) -> np.ndarray:
    """Layer ``layer``'s K (``which='k'``) or V rows in a state file: found by their header (type,
    row size) as ``llama_kv_cache::state_write_data`` writes it (V not transposed: flash attention)."""
    block, size = BLOCK[type_name]
    row = ROW // block * size
    tid = 0 if type_name == "f32" else TYPES[type_name]
    marker = struct.pack("<iQ", tid, row)
    # the data section: v_trans (u32 0), n_layer (u32 30), then 30 K sections, then 30 V sections
    start = state.index(struct.pack("<II", 0, 30) + marker) + 8
    cells = (state.index(marker, start + 12) - start - 12) // row  # the cell count: the first section's length
    pos, sections = start, []
    for _ in range(60):
        t, r = struct.unpack_from("<iQ", state, pos)
        assert (t, r) == (tid, row), "unexpected section header"
        pos += 12
        sections.append(pos)
        pos += cells * r
    assert pos == len(state), "the state file has more than 30 K and 30 V sections"
    off = sections[layer if which == "k" else 30 + layer]
    return np.frombuffer(state[off:off + cells * row], dtype=np.uint8).reshape(cells, row)


def from_float(type_name: str, rows: np.ndarray) -> np.ndarray:
    """llama.cpp's CPU ``from_float`` of a type on float32 rows (what ``ggml_set_rows`` runs)."""
    base = ctypes.CDLL(str(BIN / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)  # noqa: F841
    cpu = ctypes.CDLL(str(BIN / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)

    class Traits(ctypes.Structure):
        _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                    ("nrows", ctypes.c_int64)]

    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(Traits)
    cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    cpu.ggml_cpu_init()
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(
        cpu.ggml_get_type_traits_cpu(TYPES[type_name]).contents.from_float)
    block, size = BLOCK[type_name]
    x = np.ascontiguousarray(rows, dtype=np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // block * size), dtype=np.uint8)
    for i in range(x.shape[0]):  # one row at a time, as set_rows converts each cell's row
        fn(x[i].ctypes.data, out[i].ctypes.data, x.shape[1])
    return out


def fwht64(rows: np.ndarray) -> np.ndarray:
    """``ggml_compute_forward_fwht`` on chunks of 64 float32 values: scale by 1/sqrtf(64), then the
    butterflies (u + v, u - v) with spans 1, 2, 4, 8, 16, 32, in C order, float32 throughout."""
    x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, 64) * np.float32(1.0 / 8.0)
    span = 1
    while span < 64:
        for i in range(0, 64, 2 * span):
            for j in range(span):
                u, v = x[:, i + j].copy(), x[:, i + span + j].copy()
                x[:, i + j], x[:, i + span + j] = u + v, u - v
        span *= 2
    return x.reshape(rows.shape)


def main() -> None:
    from mpsearch.zoo import shakespeare_text

    gguf = smollm2_gguf()
    prompt = shakespeare_text("eval", max_chars=1200)
    arrays = {}
    with tempfile.TemporaryDirectory() as tmpd:
        work = Path(tmpd)
        ref = saved_state(gguf, prompt, "f32", "f32", work)
        for li in LAYERS:
            arrays[f"k_f32_l{li}"] = layer_rows(ref, "f32", "k", li).view(np.float32)
            arrays[f"v_f32_l{li}"] = layer_rows(ref, "f32", "v", li).view(np.float32)
        for t in TYPES:
            state = saved_state(gguf, prompt, t, t, work)
            for which in ("k", "v"):
                served = layer_rows(state, t, which, 0)
                arrays[f"{which}_{t}_server_l0"] = served
                for li in LAYERS:
                    rows = arrays[f"{which}_f32_l{li}"]
                    if t not in ("f16", "bf16"):  # quantized: llama.cpp rotates first
                        rows = fwht64(rows)
                    arrays[f"{which}_{t}_l{li}"] = from_float(t, rows)
                same = np.array_equal(served, arrays[f"{which}_{t}_l0"])
                print(f"{t} {which}: server layer 0 == from_float: {same}", flush=True)
                if not same:
                    raise SystemExit(f"{t} {which}: llama-server's layer-0 bytes differ from from_float")
    cells = len(arrays["k_f32_l0"])
    arrays = {k: v[:KEEP] for k, v in arrays.items()}
    arrays["meta"] = np.frombuffer(json.dumps({"llama_cpp_commit": llama_cpp_commit(), "cells_checked": cells, "cells_kept": KEEP,
                                                "layers": LAYERS, "row": ROW, "head_dim": 64,
                                                "types": list(TYPES)}).encode(), dtype=np.uint8)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    tmp = FIXTURE.with_name("kv_cache.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, FIXTURE)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes; {cells} cells checked, {KEEP} kept)")


if __name__ == "__main__":
    main()
