"""llama.cpp's rounding in torch (mpsearch.formats.ggml), before and after the rewrite of its searches
(issues 23, 28): each default type's rounding of one SmolLM2 block, with and without importance
weights, the old and the new implementation side by side in one process, on one thread.

The old implementation is the four modules of ``mpsearch/formats`` that hold the searches
(``_ggml_arith``, ``_ggml_kquants``, ``_ggml_legacy``, ``_ggml_imatrix``) at commit ``--old``, read
with ``git show`` into a temporary package; ``mpsearch.formats.ggml`` runs either one by swapping its
kernel tables (the chunking around them is the same code). Each (type, rounding) is timed old, new,
old, new ... ``--reps`` times each on the same random weights of the block's shapes (the searches do a
fixed amount of work per block); the table gives the medians of the CPU time of this one-threaded
process (less sensitive than the wall time to other jobs on a shared machine; the JSON has both),
their ratio, and whether the bytes of the two are identical (``to_bytes``, every matrix).

Where llama.cpp's libggml-base is built (``MPSEARCH_LIBGGML``, default: the path the tests use), the
new bytes are also compared with ``ggml_quantize_chunk``'s on the same matrices and importance vector
(a large random input: 3.5M weights per type; column "llama.cpp").

    OMP_NUM_THREADS=1 python experiments/imatrix_speed.py              # ~2 min on an idle core
    OMP_NUM_THREADS=1 python experiments/imatrix_speed.py --types q5_1 q4_K --reps 3

Results: ``experiments/imatrix_speed.json`` and ``experiments/imatrix_speed.md``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = ROOT / "experiments" / "imatrix_speed.json"
OUT_MD = ROOT / "experiments" / "imatrix_speed.md"
#: the last commit before the rewrite
OLD = "0368585"
MODULES = ("_ggml_arith", "_ggml_kquants", "_ggml_legacy", "_ggml_imatrix")
#: one SmolLM2-135M block: q, k, v, o, gate, up, down as [out, in]
SMOLLM2_BLOCK = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
TYPES = ("q2_K", "q3_K", "q4_0", "q4_1", "q4_K", "iq4_nl", "q5_0", "q5_1", "q5_K", "q6_K")


def old_package(ref: str, tmp: Path):
    """The search modules at commit ``ref`` as the package ``mpsearch_old_ggml`` (under ``tmp``)."""
    pkg = tmp / "mpsearch_old_ggml"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for m in MODULES:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:mpsearch/formats/{m}.py"],
                             check=True, capture_output=True, text=True).stdout
        (pkg / f"{m}.py").write_text(src)
    sys.path.insert(0, str(tmp))
    return {m: importlib.import_module(f"mpsearch_old_ggml.{m}") for m in MODULES}


def kernel_tables(mods):
    """``mpsearch.formats.ggml``'s two kernel tables (quantize functions only) built on ``mods``."""
    im, kq, lg = mods["_ggml_imatrix"], mods["_ggml_kquants"], mods["_ggml_legacy"]
    imatrix = {
        "q4_0": lambda x, qw, s2: im._q32_im(x, qw, s2, 8),
        "q5_0": lambda x, qw, s2: im._q32_im(x, qw, s2, 16),
        "q4_1": lambda x, qw, s2: im._q32_asym_im(x, qw, s2, 15),
        "q5_1": lambda x, qw, s2: im._q32_asym_im(x, qw, s2, 31),
        "iq4_nl": im._iq4_nl_im, "q2_K": im._q2_K_im, "q3_K": im._q3_K_im,
        "q4_K": lambda x, qw, _s2: im._qkx_K_im(x, qw, 15),
        "q5_K": lambda x, qw, _s2: im._qkx_K_im(x, qw, 31),
        "q6_K": lambda x, qw, _s2: kq._q6_K(x, qw),
    }
    rtn = {"q2_K": kq._q2_K, "q3_K": kq._q3_K, "q4_K": kq._q4_K, "q5_K": kq._q5_K, "q6_K": kq._q6_K,
           "iq4_nl": lg._iq4_nl, "q4_0": lg._q4_0, "q4_1": lg._q4_1, "q5_0": lg._q5_0, "q5_1": lg._q5_1}
    return imatrix, rtn


def run_with(tables, name, mats, imatrix: bool):
    """``to_bytes`` of every matrix with the kernels of ``tables`` in ``mpsearch.formats.ggml``:
    (CPU seconds of this one-threaded process, wall seconds, the bytes)."""
    from mpsearch.formats import ggml

    im, rtn = tables
    saved = ggml._IMATRIX_KERNELS[name], ggml._KERNELS[name]
    ggml._IMATRIX_KERNELS[name] = im[name]
    ggml._KERNELS[name] = (rtn[name], *saved[1][1:])
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        out = [ggml.to_bytes(name, w, imp if imatrix else None) for w, imp in mats]
        return time.process_time() - c0, time.perf_counter() - t0, out
    finally:
        ggml._IMATRIX_KERNELS[name], ggml._KERNELS[name] = saved


def libggml():
    """experiments/ggml_fixtures.py's binding of libggml-base, or None where it is not built."""
    import importlib.util

    path = os.environ.get("MPSEARCH_LIBGGML",
                          "/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/libggml-base.so")
    if not Path(path).is_file():
        return None
    spec = importlib.util.spec_from_file_location("ggml_fixtures", ROOT / "experiments" / "ggml_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Ggml(path)


def main(argv=None):
    import torch

    from mpsearch.formats import get_format
    from mpsearch.formats import _ggml_arith, _ggml_imatrix, _ggml_kquants, _ggml_legacy

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default=OLD, help="the commit of the old implementation (default: %(default)s)")
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    ap.add_argument("--reps", type=int, default=3, help="runs of each implementation, alternating")
    ap.add_argument("--no-report", action="store_true", help="print only (no json/md written)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the md from the json (no timing)")
    args = ap.parse_args(argv)
    if args.report_only:
        data = json.loads(OUT_JSON.read_text())
        OUT_MD.write_text(report({k: v for k, v in data.items() if k != "rows"}, data["rows"]))
        return

    new = kernel_tables({"_ggml_arith": _ggml_arith, "_ggml_kquants": _ggml_kquants,
                         "_ggml_legacy": _ggml_legacy, "_ggml_imatrix": _ggml_imatrix})
    with tempfile.TemporaryDirectory() as tmp:
        old = kernel_tables(old_package(args.old, Path(tmp)))
    lib = libggml()
    rows = []
    for name in args.types:
        torch.manual_seed(0)
        shapes = [s for s in SMOLLM2_BLOCK if not get_format(name).check_shape(*s)]
        mats = [(torch.randn(o, i) * 0.02, torch.rand(i) + 0.1) for o, i in shapes]
        for imatrix in (False, True):
            cpu, wall = {"old": [], "new": []}, {"old": [], "new": []}
            same = True
            for _ in range(args.reps):
                out = {}
                for which, tables in (("old", old), ("new", new)):
                    c, t, out[which] = run_with(tables, name, mats, imatrix)
                    cpu[which].append(c)
                    wall[which].append(t)
                same = same and all(torch.equal(a, b) for a, b in zip(out["old"], out["new"]))
            llama = None
            if lib is not None:
                llama = all(torch.equal(got, torch.from_numpy(lib.quantize(name, w.numpy(), imp.numpy() if imatrix
                                                                           else None)))
                            for got, (w, imp) in zip(out["new"], mats))
            med = {k: statistics.median(v) for k, v in cpu.items()}
            rows.append({"type": name, "imatrix": imatrix, "matrices": len(mats), "old_s": round(med["old"], 3),
                         "new_s": round(med["new"], 3), "ratio": round(med["old"] / med["new"], 2),
                         "identical": same, "llama_cpp": llama, "cpu_old": [round(t, 3) for t in cpu["old"]],
                         "cpu_new": [round(t, 3) for t in cpu["new"]], "wall_old": [round(t, 3) for t in wall["old"]],
                         "wall_new": [round(t, 3) for t in wall["new"]]})
            print(rows[-1], flush=True)
    if args.no_report:
        return
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "old": args.old,
            "threads": torch.get_num_threads(), "loadavg": [round(x, 2) for x in os.getloadavg()],
            "cpu": _cpu(), "reps": args.reps, "libggml": lib is not None}
    OUT_JSON.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    OUT_MD.write_text(report(meta, rows))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _yes(v) -> str:
    return "not checked" if v is None else "yes" if v else "**NO**"


def report(meta, rows) -> str:
    lines = ["# llama.cpp's rounding in torch: the old and the new searches, side by side", "",
             f"`OMP_NUM_THREADS=1 python experiments/imatrix_speed.py` ({meta['date']}, {meta['threads']} "
             f"thread, {meta['cpu']}, load average {meta['loadavg'][0]} at the end; old = commit "
             f"{meta['old']}): each type's rounding of one SmolLM2-135M block (its matrices that the type "
             f"takes; random weights of their shapes, a random positive importance vector), median of "
             f"{meta['reps']} alternating runs of each implementation, CPU seconds of the one-threaded process "
             f"(the wall times are in imatrix_speed.json). \"identical\": the bytes of every matrix are the same "
             f"in every run; \"llama.cpp\": the new bytes equal libggml-base's ggml_quantize_chunk on the same "
             f"matrices and importance vector" + ("" if meta["libggml"] else " (not built here: not checked)") + ".",
             "", "| type | importance matrix | old s/block | new s/block | old/new | identical | llama.cpp |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['type']} | {'yes' if r['imatrix'] else 'no'} | {r['old_s']:.3f} | {r['new_s']:.3f} "
                     f"| {r['ratio']:.2f} | {_yes(r['identical'])} | {_yes(r['llama_cpp'])} |")
    for imatrix in (False, True):
        sel = [r for r in rows if r["imatrix"] == imatrix]
        if sel:
            o, n = sum(r["old_s"] for r in sel), sum(r["new_s"] for r in sel)
            lines.append(f"| all | {'yes' if imatrix else 'no'} | {o:.2f} | {n:.2f} | {o / n:.2f} | "
                         f"{_yes(all(r['identical'] for r in sel))} | "
                         f"{_yes(None if not meta['libggml'] else all(r['llama_cpp'] for r in sel))} |")
    lines += ["", "x30 for SmolLM2's 30 blocks (what `mpsearch estimate --target llama.cpp` rounds, each "
              "default type once per matrix).", ""] + NOTES.strip("\n").splitlines()
    return "\n".join(lines) + "\n"


NOTES = """
## What changed, and what bounds it

The same float32 operations in the same order as ggml-quants.c (the bytes above, and the fixture and
libggml tests of tests/test_formats_ggml.py), done with fewer torch calls and fewer fresh temporaries:

- C's sequential sums (`float s = 0; for (i...) s += t[i];`) are one `index_add_` of every term row
  into one row on the CPU (it adds the rows one after another in index order; a loop of 16-32 Python
  calls before). `tests/test_formats_ggml.py::test_seqsum_adds_in_c_order_bit_for_bit` checks it
  against a loop of float32 additions on sums whose value depends on the order. On a GPU it adds
  with atomics in no set order, so the loop stays there.
- The searches run over passes of 2**18 weights into buffers allocated once per pass: fresh
  temporaries of a few MB were returned to the system and faulted in again page by page (the old
  q5_1 search: ~40,000 page faults per 576x1536 matrix, the new one a few thousand). 2**16 and
  2**20 weights per pass were slower (Python overhead per call, cache).
- make_qx_quants (q4_0, q5_0, q3_K, q6_K) and iq4_nl's scale search: their 19 and 16 candidate
  scales depend on the block's max only, so all candidates' sums are computed at once (a candidate
  axis), then compared in C's order; the winner's levels are computed again from its inverse scale
  instead of a masked copy of the levels per candidate.
- make_qkx2/make_qkx3 (q2_K, q4_K, q5_K, q4_1 and q5_1 with an imatrix): each candidate's levels
  depend on the min the candidates before it chose, so the 16-37 candidates stay one after another;
  per candidate the winner's inverse scale and min are kept (not its levels), the three level sums
  are one `index_add_`, and the search state is selected with bit operations (torch.where costs
  about four element-wise products on the CPU).

What is left per candidate of make_qkx3 (the q4_1/q5_1 searches, still the largest share): 12
element-wise passes over the block's values, two sums and ~25 small per-block operations, all in
eager torch. Fusing them needs a compiled kernel; torch's own fused `addcmul` is not `a + b * c` on
AVX2/AVX512 CPUs (it rounds once, as a fused multiply-add), so it cannot stand in for C's
`sum += w * l` here. Runs of this script on the shared 2-core machine (load average 4-6) gave 1.85x
to 2.4x for the whole imatrix total, q4_1 and q5_1 1.7x to 2.5x: the table is one of them.
"""


if __name__ == "__main__":
    main()
