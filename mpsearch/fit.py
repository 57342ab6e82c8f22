"""``--fit``: the best plan for a machine, its KV cache type and its placement, and the commands.

``--fit gpu=24GiB,ctx=32768``, ``--fit gpu=16GiB,ram=64GiB,ctx=8192,parallel=2``, ``--fit ram=16GiB,ctx=4096``
(a CPU-only machine). Keys: ``gpu``, ``ram`` (sizes with units, as ``--budget file=``), ``ctx`` (tokens
per sequence), ``parallel`` (slots), ``kv`` (``auto``: chosen jointly with the weights when the table
holds measured KV damage, else f16; or ``q8_0``, or ``q8_0/f16`` for K/V), ``placement`` (``auto``,
``gpu``, ``experts-cpu``, ``cpu``, ``ngl=N``), ``gpu_bw``/``ram_bw`` (GB/s, for the throughput
estimate; defaults 1000 and 50), ``min_tps`` (a floor on the estimated tokens per second), and
``reserve`` (bytes kept free on the GPU for what llama.cpp's buffer lines do not show, e.g. the
CUDA context; default 0), and ``cpu`` (``avx512``, ``avx2`` or ``none``: which weights the CPU
backend repacks into a second copy in RAM, :data:`mpsearch.deploy.REPACK`; default ``avx512``, the
larger x86 list; ``none`` with llama-server's ``--no-repack``).

The solve: for each placement and each KV type pair, the weights are planned with an exact solver
under the GPU and RAM that remain once the unplanned tensors, the KV cache, the compute and output
buffers are counted (:mod:`mpsearch.deploy`); the least total damage (weights + KV, both in the
table's units) wins. ``placement=auto`` keeps everything on the GPU when a plan fits there; a MoE
model may also put its routed experts in RAM (the usual layout), and a dense model is split with
``-ngl`` only when it cannot fit whole, with as many layers on the GPU as fit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from .budget import Budget
from .deploy import (ArchInfo, EXPERTS_ON_CPU, kv_cache_bytes, Memory, memory, Placement, REPACK, repacked,
                     Serving, tokens_per_second)
from .errors import close_matches, MpsearchError
from .filesize import file_model_of, padded_bits, UNITS
from .kvcache import KV_CACHE_TYPES
from .registry import get_solver

_KEYS = ("gpu", "ram", "ctx", "parallel", "kv", "placement", "gpu_bw", "ram_bw", "min_tps", "reserve", "ubatch", "cpu")
GiB = 2**30


def _size(key: str, text: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = (m.group(2) or "B").lower() if m else ""
    if not m or unit not in UNITS:
        raise MpsearchError(f"--fit {key}={text}: write a size such as 24GiB, 16GB or 1500MiB")
    value = float(m.group(1)) * UNITS[unit]
    if not 0 < value < 1e18:
        raise MpsearchError(f"--fit {key}={text}: the size must be positive")
    return value


@dataclass
class FitSpec:
    """A machine and a context, as ``--fit`` spells them."""

    gpu: float | None = None
    ram: float | None = None
    ctx: int = 4096
    parallel: int = 1
    kv: str = "auto"
    placement: str = "auto"
    gpu_bw: float = 1000e9
    ram_bw: float = 50e9
    min_tps: float | None = None
    reserve: float = 0.0
    ubatch: int = 512
    cpu: str = "avx512"
    text: str = ""

    @classmethod
    def parse(cls, text) -> FitSpec:
        if not isinstance(text, str) or not text.strip():
            raise MpsearchError("--fit: give the machine, e.g. --fit gpu=24GiB,ctx=32768")
        out = cls(text=text.strip())
        seen = set()
        for item in text.split(","):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise MpsearchError(f"--fit {text}: write KEY=VALUE pairs separated by commas, e.g. "
                                    f"gpu=16GiB,ram=64GiB,ctx=8192,parallel=2")
            if key not in _KEYS:
                raise MpsearchError(f"--fit: unknown key {key!r}{close_matches(key, _KEYS)}; keys: {', '.join(_KEYS)}")
            if key in seen:
                raise MpsearchError(f"--fit: {key} is given twice")
            seen.add(key)
            if key in ("gpu", "ram", "reserve"):
                setattr(out, key, _size(key, value))
            elif key in ("ctx", "parallel", "ubatch"):
                try:
                    v = int(value)
                except ValueError:
                    raise MpsearchError(f"--fit {key}={value}: give a whole number") from None
                if not 1 <= v <= 2**24:
                    raise MpsearchError(f"--fit {key}={value}: must be from 1 to {2**24}")
                setattr(out, key, v)
            elif key in ("gpu_bw", "ram_bw", "min_tps"):
                try:
                    v = float(value)
                except ValueError:
                    raise MpsearchError(f"--fit {key}={value}: give a number") from None
                if not (math.isfinite(v) and v > 0):
                    raise MpsearchError(f"--fit {key}={value}: must be a positive number")
                setattr(out, key, v * 1e9 if key.endswith("_bw") else v)
            elif key == "kv":
                kinds = value.split("/")

                if value != "auto" and (len(kinds) > 2 or any(k not in KV_CACHE_TYPES for k in kinds)):
                    raise MpsearchError(f"--fit kv={value}: use auto, a llama.cpp cache type "
                                        f"({', '.join(KV_CACHE_TYPES)}) or K/V such as q8_0/f16")
                out.kv = value
            elif key == "cpu":
                if value not in REPACK:
                    raise MpsearchError(f"--fit cpu={value}: use {', '.join(REPACK)} (which weights llama.cpp's "
                                        f"CPU backend repacks)")
                out.cpu = value
            elif key == "placement":
                if value not in ("auto", "gpu", "experts-cpu", "cpu") and not re.fullmatch(r"ngl=\d+", value):
                    raise MpsearchError(f"--fit placement={value}: use auto, gpu, experts-cpu, cpu or ngl=N")
                out.placement = value
        if out.gpu is None and out.ram is None:
            raise MpsearchError("--fit: give the machine's memory: gpu=SIZE and/or ram=SIZE")
        if out.gpu is None and out.placement not in ("auto", "cpu"):
            raise MpsearchError(f"--fit placement={out.placement} needs gpu=SIZE")
        return out


@dataclass
class FitResult:
    """The chosen plan with its serving settings, placement, memory and estimates."""

    status: str
    plan: object = None
    serving: Serving | None = None
    placement: Placement | None = None
    memory: Memory | None = None
    damage: float = math.inf
    weight_damage: float = math.inf
    kv_damage: float = 0.0
    tps: float = 0.0
    base: str = ""
    base_command: str = ""
    max_ctx: int = 0
    alternatives: list = field(default_factory=list)
    message: str = ""
    notes: list = field(default_factory=list)
    tensor_bytes: dict = field(default_factory=dict)  # GGUF tensor -> bytes at its planned or base type
    tensor_types: dict = field(default_factory=dict)  # GGUF tensor -> ggml type
    rows: dict = field(default_factory=dict)  # GGUF tensor -> rows (for llama.cpp's CPU repacking)
    arch: ArchInfo | None = None
    repack: str = "avx512"

    # ------------------------------------------------------------------ output
    def commands(self, types_file: str = "plan.types.txt", src: str = "MODEL-f16.gguf",
                 out: str = "MODEL-fit.gguf") -> list[str]:
        s, p = self.serving, self.placement
        quant = f"llama-quantize --tensor-type-file {types_file} {src} {out} {self.base_command}"
        flags = ["-c", str(s.n_ctx), "-np", str(s.parallel), "-fa", "on", "-ctk", s.type_k, "-ctv", s.type_v]
        flags += p.flags() if p is not None else ["-ngl", "0"]
        flags += ["--fit", "off"] + (["--no-repack"] if self.repack == "none" else [])
        return [quant, "llama-server -m " + out + " " + " ".join(_quote(f) for f in flags)]

    def summary(self, spec: FitSpec) -> list[str]:
        m, s = self.memory, self.serving
        lines = [f"fits: {spec.text}  (ctx {s.ctx} x {s.parallel} slot(s), KV {s.type_k}/{s.type_v}, "
                 f"{self.placement.label if self.placement else 'CPU only'})"]
        for where, parts, cap in (("GPU", m.gpu, spec.gpu), ("RAM", m.ram, spec.ram)):
            if not parts and cap is None:
                continue
            total = sum(parts.values())
            bits = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in parts.items())
            lines.append(f"  {where}: {total / 2**20:.2f} MiB" + (f" of {cap / 2**20:.2f}" if cap else "") +
                         f" ({bits} MiB)")
        lines.append(f"  predicted damage: {self.damage:.6g} (weights {self.weight_damage:.6g} + KV cache "
                     f"{self.kv_damage:.6g}; the table's units), measured: run the commands and "
                     f"llama-perplexity --kl-divergence")
        lines.append(f"  estimated decode speed: {self.tps:.1f} tokens/s per sequence (a bandwidth estimate: "
                     f"GPU {spec.gpu_bw / 1e9:g} GB/s, RAM {spec.ram_bw / 1e9:g} GB/s)")
        lines.append(f"  the largest context this plan still fits: {self.max_ctx} tokens per slot")
        for alt in self.alternatives[:3]:
            lines.append(f"  also feasible: {alt}")
        lines += [f"  note: {n}" for n in self.notes]
        return lines


def _human(n: float) -> str:
    """Bytes as a --fit size, rounded up (``24.31GiB``, ``17.6MiB``)."""
    if n >= GiB:
        return f"{math.ceil(n / GiB * 100) / 100:.2f}GiB"
    return f"{math.ceil(n / 2**20 * 10) / 10:.1f}MiB"


def _quote(arg: str) -> str:
    return f"'{arg}'" if re.search(r"[^\w./=:,-]", arg) else arg


# ----------------------------------------------------------------------------- the solve
def _kv_pairs(spec: FitSpec, kv_damage: dict | None) -> list[tuple[str, str]]:
    if spec.kv != "auto":
        k, _, v = spec.kv.partition("/")
        return [(k, v or k)]
    if not kv_damage:
        return [("f16", "f16")]
    ks = [t for t in kv_damage.get("k", {}) if t != "f32"]
    vs = [t for t in kv_damage.get("v", {}) if t != "f32"]
    return [(k, v) for k in ks for v in vs] or [("f16", "f16")]


def _placements(spec: FitSpec, arch: ArchInfo) -> list[Placement]:
    full = arch.n_layer + 1
    if spec.gpu is None or spec.placement == "cpu":
        return [None]
    if spec.placement == "gpu":
        return [Placement(full, label="all layers on the GPU")]
    if spec.placement == "experts-cpu":
        return [Placement(full, EXPERTS_ON_CPU, label="routed experts in RAM, the rest on the GPU")]
    if spec.placement.startswith("ngl="):
        n = int(spec.placement[4:])
        return [Placement(n, label=f"{min(n, full)} of {full} layers on the GPU")]
    out = [Placement(full, label="all layers on the GPU")]
    if arch.n_expert and spec.ram is not None:
        out.append(Placement(full, EXPERTS_ON_CPU, label="routed experts in RAM, the rest on the GPU"))
    if spec.ram is not None:  # split only when needed: these are tried in order, most on the GPU first
        out += [Placement(n, label=f"{n} of {full} layers on the GPU") for n in range(full - 1, -1, -1)]
    return out


class _Problem:
    """The table with per-row GPU/RAM bytes for one placement, and the fixed memory of everything else."""

    def __init__(self, table, fm, arch: ArchInfo, base: str):
        self.table, self.fm, self.arch, self.base = table, fm, arch, base
        b = fm.bases[base]
        if "tensors" not in b:
            raise MpsearchError("the table's file model predates --fit (no per-tensor bytes); re-estimate the table")
        self.unplanned = {n: int(v) for n, v in b["tensors"].items()}
        self.types = dict(b.get("tensor_types", {}))
        self.rows = {n: int(v) for n, v in fm.rows.items()}
        self.notes = [] if self.rows else [
            "the table's file model has no tensor rows (an older table): the weights llama.cpp's CPU backend "
            "repacks into a second copy are not counted; re-estimate the table to count them"]
        frame = table.frame
        ntens = frame["layer"].map(lambda n: max(len(fm.planned.get(n, [])), 1)).to_numpy()
        self.padded = padded_bits(frame["size_bits"].to_numpy(), ntens, 32)  # the CPU buffer's alignment
        self.tensor_of = {lay: names for lay, names in fm.planned.items()}
        self.tied = "output.weight" not in self.unplanned and not any(
            "output.weight" in names for names in fm.planned.values())

    def solve(self, solver, spec: FitSpec, serving: Serving, placement: Placement | None):
        arch = self.arch
        fixed = memory(arch, self.unplanned, serving, placement, tied=self.tied, tensor_types=self.types,
                       rows=self.rows, repack=spec.cpu)
        frame = self.table.frame
        gpu_row = np.zeros(len(frame))
        if placement is not None and placement.ngl > 0:
            on = frame["layer"].map(lambda n: placement.on_gpu(self.tensor_of.get(n, [n])[0], arch.n_layer)).to_numpy()
            gpu_row = np.where(on, self.padded, 0.0)
        ram_row = (self.padded - gpu_row) * self.copies(spec.cpu)  # a CPU-resident repacked tensor: two copies
        frame = frame.assign(fit_gpu_bits=gpu_row, fit_ram_bits=ram_row)
        caps = {}
        if spec.gpu is not None:
            caps["fit_gpu_bits"] = 8.0 * (spec.gpu - spec.reserve - fixed.gpu_total)
        if spec.ram is not None:
            caps["fit_ram_bits"] = 8.0 * (spec.ram - fixed.ram_total)
        if any(c < 0 for c in caps.values()):
            return None, fixed
        t = self.table.with_frame(frame)
        res = solver.solve(t, Budget(constraints=caps))
        return res.plan, fixed

    def copies(self, cpu: str) -> np.ndarray:
        """Per row: 2 where the CPU backend would hold the row's tensors twice (repacked), else 1."""
        frame = self.table.frame
        return np.array([2.0 if repacked(self.tensor_of.get(lay, [lay])[0], opt,
                                         self.rows.get(self.tensor_of.get(lay, [lay])[0]), cpu) else 1.0
                         for lay, opt in zip(frame["layer"], frame["option"])])

    def tensor_types(self, plan) -> dict:
        out = dict(self.types)
        for lay in plan.layers:
            for n in self.tensor_of.get(lay, [lay]):
                out[n] = plan.options[lay]["name"]
        return out

    def tensor_bytes(self, plan) -> dict:
        """GGUF tensor -> bytes for the planned tensors at their options plus the unplanned ones."""
        frame = self.table.frame.set_index(["layer", "option"])
        out = dict(self.unplanned)
        for lay in plan.layers:
            names = self.tensor_of.get(lay, [lay])
            bits = float(frame.loc[(lay, plan.options[lay]["name"]), "size_bits"])
            for n in names:
                out[n] = int(bits / 8 / len(names))
        return out


def solve_fit(table, spec: FitSpec, solver=None) -> FitResult:
    """The least-damage plan, KV cache type pair and placement that fit ``spec`` (see the module)."""
    if isinstance(spec, str):
        spec = FitSpec.parse(spec)
    fm = file_model_of(table.metadata)
    if fm.consumer != "llama.cpp":
        raise MpsearchError(f"--fit plans for llama.cpp (the table is for {fm.consumer}); estimate with "
                            f"--target llama.cpp")
    if "deploy" not in table.metadata:
        raise MpsearchError("--fit needs the model's shape in the table (metadata 'deploy'): re-estimate it with "
                            f"--target llama.cpp ({table.metadata.get('deploy_note', 'an older table')})")
    arch = ArchInfo.from_dict(table.metadata["deploy"])
    kv_damage = table.metadata.get("kv_damage")
    solver = get_solver(solver or "ilp") if not hasattr(solver, "solve") else solver
    prob = _Problem(table, fm, arch, fm.default_base)
    notes = list(prob.notes)
    if spec.kv == "auto" and not kv_damage:
        notes.append("KV cache f16: the table has no measured KV damage (estimate with --kv-types to choose it)")
    candidates = []
    placements = _placements(spec, arch)
    whole = [p for p in placements if p is None or p.cpu_regex or p.ngl >= arch.n_layer + 1]
    splits = [p for p in placements if p not in whole]
    for group in [whole] + [[p] for p in splits]:  # split with -ngl only when nothing fits whole
        for placement in group:
            for tk, tv in _kv_pairs(spec, kv_damage):
                serving = Serving(ctx=spec.ctx, parallel=spec.parallel, type_k=tk, type_v=tv, n_ubatch=spec.ubatch)
                plan, _fixed = prob.solve(solver, spec, serving, placement)
                if plan is None:
                    continue
                tb = prob.tensor_bytes(plan)
                mem = memory(arch, tb, serving, placement, tied=prob.tied, tensor_types=prob.tensor_types(plan),
                             rows=prob.rows, repack=spec.cpu)
                kd = kv_damage or {}
                kvd = kd.get("k", {}).get(tk, 0.0) + kd.get("v", {}).get(tv, 0.0)
                tps = tokens_per_second(arch, tb, serving, placement, spec.gpu_bw, spec.ram_bw)
                if spec.min_tps is not None and tps < spec.min_tps:
                    continue
                candidates.append((plan.predicted["damage"] + kvd, -tps, len(candidates), plan, serving, placement,
                                   mem, kvd, tps, tb))
        if candidates:
            break
    if not candidates:
        return _infeasible(prob, spec, arch, kv_damage, notes)
    candidates.sort(key=lambda c: (c[0], c[1], c[2]))
    damage, _, _, plan, serving, placement, mem, kvd, tps, tb = candidates[0]
    alts = []
    for c in candidates[1:]:
        if len(alts) >= 3:
            break
        label = f"KV {c[4].type_k}/{c[4].type_v}, {c[5].label if c[5] else 'CPU only'}: damage {c[0]:.6g}, {c[8]:.1f} tok/s"
        if label not in alts:
            alts.append(label)
    if mem.ram.get("repacked"):
        notes.append(f"{mem.ram['repacked'] / 2**20:.2f} MiB of CPU-resident weights ({', '.join(_repacked_types(prob, plan, spec))}) "
                     f"are counted twice, as llama.cpp's CPU_Mapped and CPU_REPACK buffer lines report them (cpu={spec.cpu}); "
                     f"the mapped copy is file cache the OS may reclaim, so this is an upper bound; cpu=none "
                     f"(llama-server --no-repack) holds them once")
    res = FitResult(status="feasible", plan=plan, serving=serving, placement=placement, memory=mem, damage=damage,
                    weight_damage=plan.predicted["damage"], kv_damage=kvd, tps=tps, base=prob.base,
                    base_command=fm.bases[prob.base]["command"], alternatives=alts, notes=notes + mem.notes,
                    tensor_bytes=tb, tensor_types=prob.tensor_types(plan), rows=prob.rows, arch=arch,
                    repack=spec.cpu)
    res.max_ctx = _largest_ctx(arch, tb, serving, placement, spec, prob.tied,
                               dict(tensor_types=res.tensor_types, rows=prob.rows, repack=spec.cpu))
    plan.provenance["fit"] = {"spec": spec.text, "ctx": serving.ctx, "parallel": serving.parallel,
                              "type_k": serving.type_k, "type_v": serving.type_v, "cpu": spec.cpu,
                              "placement": placement.flags() if placement else ["-ngl", "0"],
                              "gpu_bytes": mem.gpu_total, "ram_bytes": mem.ram_total,
                              "memory": {"gpu": mem.gpu, "ram": mem.ram}, "kv_damage": kvd, "tps_estimate": tps}
    plan.provenance["file"] = {"consumer": "llama.cpp", "base": prob.base, "command": res.base_command}
    return res


def _repacked_types(prob: _Problem, plan, spec: FitSpec) -> list[str]:
    types = prob.tensor_types(plan)
    return sorted({t for n, t in types.items() if repacked(n, t, prob.rows.get(n), spec.cpu)})


def _fits(arch, tb, serving, placement, spec, tied, kw=None) -> bool:
    m = memory(arch, tb, serving, placement, tied=tied, **(kw or {}))
    ok = spec.gpu is None or m.gpu_total <= spec.gpu - spec.reserve
    return ok and (spec.ram is None or m.ram_total <= spec.ram)


def _largest_ctx(arch, tb, serving, placement, spec, tied, kw=None) -> int:
    """The largest context per slot (a multiple of 256) at which these weights still fit."""
    import dataclasses

    lo, hi = serving.ctx, max(serving.ctx, 256)
    while hi < 2**24 and _fits(arch, tb, dataclasses.replace(serving, ctx=hi * 2), placement, spec, tied, kw):
        hi *= 2
    hi = min(hi * 2, 2**24)
    lo = serving.ctx
    while hi - lo > 256:
        mid = (lo + hi) // 2 // 256 * 256
        if mid <= lo:
            break
        if _fits(arch, tb, dataclasses.replace(serving, ctx=mid), placement, spec, tied, kw):
            lo = mid
        else:
            hi = mid
    return lo


def _infeasible(prob: _Problem, spec: FitSpec, arch: ArchInfo, kv_damage, notes) -> FitResult:
    """No plan fits: the smallest machine for the request, the largest context for the machine."""
    import dataclasses

    frame = prob.table.frame
    copies = prob.copies(spec.cpu)

    def smallest(placement):
        """Every layer at the option that costs the least on the device it lives on (a CPU-resident
        repacked tensor costs two copies), as tensor bytes, types and memory() keywords."""
        on = np.zeros(len(frame), bool)
        if placement is not None and placement.ngl > 0:
            on = frame["layer"].map(lambda n: placement.on_gpu(prob.tensor_of.get(n, [n])[0], arch.n_layer)).to_numpy()
        cost = np.where(on, prob.padded, prob.padded * copies)
        rows = frame.loc[frame.assign(_cost=cost).groupby("layer")["_cost"].idxmin()]
        tb, types = dict(prob.unplanned), dict(prob.types)
        for _, row in rows.iterrows():
            names = prob.tensor_of.get(row["layer"], [row["layer"]])
            for n in names:
                tb[n] = int(row["size_bits"] / 8 / len(names))
                types[n] = row["option"]
        return tb, dict(tensor_types=types, rows=prob.rows, repack=spec.cpu)

    def kv_total(pair):
        return sum(r["k"] + r["v"] for r in kv_cache_bytes(arch, Serving(ctx=spec.ctx, type_k=pair[0], type_v=pair[1])))

    cheap = min(_kv_pairs(spec, kv_damage), key=kv_total)
    serving = Serving(ctx=spec.ctx, parallel=spec.parallel, type_k=cheap[0], type_v=cheap[1], n_ubatch=spec.ubatch)
    needs = []
    for placement in _placements(spec, arch):
        tb, kw = smallest(placement)
        m = memory(arch, tb, serving, placement, tied=prob.tied, **kw)
        needs.append((m.gpu_total + (spec.reserve if m.gpu_total else 0), m.ram_total, placement))
    if spec.gpu is not None:
        g, r, p = min(needs, key=lambda x: (x[0] if spec.ram is None or x[1] <= spec.ram else math.inf, x[1]))
        if spec.ram is not None and r > spec.ram:
            g, r, p = min(needs, key=lambda x: (max(x[0] - (spec.gpu or 0), 0) + max(x[1] - spec.ram, 0)))
        machine = f"gpu={_human(g)}" + (f",ram={_human(r)}" if spec.ram is not None or r > 0 else "")
    else:
        r = min(x[1] for x in needs)
        machine = f"ram={_human(r)}"
    best_ctx = 0
    for placement in _placements(spec, arch):
        tb, kw = smallest(placement)
        lo = 0
        for ctx in (256 * 2**i for i in range(0, 17)):
            if _fits(arch, tb, dataclasses.replace(serving, ctx=ctx), placement, spec, prob.tied, kw):
                lo = ctx
            else:
                break
        if lo:
            hi = lo * 2
            while hi - lo > 256:
                mid = (lo + hi) // 2 // 256 * 256
                if _fits(arch, tb, dataclasses.replace(serving, ctx=mid), placement, spec, prob.tied, kw):
                    lo = mid
                else:
                    hi = mid
        best_ctx = max(best_ctx, lo)
    ctx_text = (f"the largest context that fits this machine is {best_ctx} tokens per slot (KV {cheap[0]}/{cheap[1]}, "
                f"every layer at its smallest option)" if best_ctx else
                "no context fits this machine even with every layer at its smallest option")
    msg = (f"--fit {spec.text} cannot be met: the smallest machine for ctx={spec.ctx} x {spec.parallel} "
           f"(KV {cheap[0]}/{cheap[1]}, every layer at its smallest option) is {machine}; {ctx_text}")
    return FitResult(status="infeasible", message=msg, max_ctx=best_ctx, notes=notes)
