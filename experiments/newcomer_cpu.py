"""The README's newcomer walkthrough, timed on the CPU as a new user runs it.

The commands are read from the README itself (the fenced blocks after the ``<!-- newcomer:NAME -->``
markers in "New here? SmolLM2 on a CPU"), so what is timed is what the README says, literally. Each
path runs in a fresh empty folder with fresh caches (``MPSEARCH_CACHE`` and
``MPSEARCH_ESTIMATOR_CACHE`` pointed into it: nothing cached from an earlier run), offline, with the
machine's threads (no ``nice``, no ``OMP_NUM_THREADS``). For every command it records the wall time
and the longest stretch with nothing written to the terminal (progress bars redraw with ``\\r``, so
each redraw counts as output): "progress throughout" means that stretch stays short.

    python experiments/newcomer_cpu.py run --paths llama.cpp vllm --repeats 2   # ~20 min on 2 cores
    python experiments/newcomer_cpu.py report                                   # -> newcomer_cpu.md

Results: ``experiments/newcomer_cpu/*.json`` (one per run) and ``experiments/newcomer_cpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "experiments" / "newcomer_cpu"
REPORT = ROOT / "experiments" / "newcomer_cpu.md"
PATHS = ("llama.cpp", "vllm")


def readme_commands(name: str, readme: Path = README) -> list[str]:
    """The shell commands of the README's fenced block after ``<!-- newcomer:NAME -->`` (comments
    and blank lines dropped, ``\\`` continuations joined)."""
    text = readme.read_text(encoding="utf-8")
    m = re.search(rf"<!-- newcomer:{re.escape(name)} -->\s*```bash\n(.*?)```", text, re.S)
    if not m:
        raise SystemExit(f"README.md has no block after <!-- newcomer:{name} -->")
    lines, cur = [], ""
    for raw in m.group(1).splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        if line.endswith("\\"):
            cur += line[:-1].strip() + " "
            continue
        lines.append((cur + line.strip()).strip())
        cur = ""
    return lines


def run_command(cmd: str, cwd: Path, env: dict, log=None) -> dict:
    """Run one command; wall time, exit code, the longest silence on stdout+stderr, the output."""
    t0 = time.monotonic()
    proc = subprocess.Popen(shlex.split(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    last, gaps, out = t0, [], bytearray()
    phases: dict[str, list[float]] = {}  # progress bar description -> [first seen, last seen] (s)
    fd = proc.stdout.fileno()
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        now = time.monotonic()
        gaps.append((now - last, len(out)))
        last = now
        out += chunk
        for seg in re.split(r"[\r\n]", chunk.decode("utf-8", "replace")):
            m = re.match(r"\s*([^|]{1,80}?):\s+\d+%\|", seg)
            if m:
                phases.setdefault(m.group(1).strip(), [round(now - t0, 1), 0.0])[1] = round(now - t0, 1)
        if log is not None:
            log.write(chunk)
            log.flush()
    rc = proc.wait()
    end = time.monotonic()
    gaps.append((end - last, len(out)))
    text = out.decode("utf-8", "replace")
    gap, at = max(gaps)
    # the text just before the longest silence: what the user was looking at
    before = text[:at].replace("\r", "\n").rstrip().splitlines()[-1:] or [""]
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return {"command": cmd, "rc": rc, "seconds": round(end - t0, 1), "longest_silence_s": round(gap, 1),
            "silent_after": before[0][-160:], "phases": phases, "output_tail": lines[-12:]}


def run_path(name: str, repeat: int) -> dict:
    commands = readme_commands(name)
    bindir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix=f"newcomer-{name}-") as tmp:
        work = Path(tmp)
        env = dict(os.environ)
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MPSEARCH_ESTIMATOR_CACHE", "MPSEARCH_CACHE"):
            env.pop(k, None)
        env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT),
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
                   MPSEARCH_CACHE=str(work / ".cache"), MPSEARCH_ESTIMATOR_CACHE=str(work / ".cache" / "est"))
        load0 = os.getloadavg()
        steps = []
        for cmd in commands:
            print(f"[{name} #{repeat}] $ {cmd}", flush=True)
            with open(Path(tempfile.gettempdir()) / f"newcomer-{name}.log", "ab") as log:
                step = run_command(cmd, work, env, log)
            print(f"    {step['seconds']} s, rc {step['rc']}, longest silence {step['longest_silence_s']} s",
                  flush=True)
            steps.append(step)
            if step["rc"]:
                print("\n".join(step["output_tail"]), file=sys.stderr)
                break
        files = {p.name: p.stat().st_size for p in work.iterdir() if p.is_file()}
        load1 = os.getloadavg()
    return {"path": name, "repeat": repeat, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in load1],
            "seconds": round(sum(s["seconds"] for s in steps), 1), "ok": all(s["rc"] == 0 for s in steps),
            "steps": steps, "files": files}


def cmd_run(args):
    RESULTS.mkdir(parents=True, exist_ok=True)
    for rep in range(1, args.repeats + 1):
        for name in args.paths:
            res = run_path(name, rep)
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            out = RESULTS / f"{name}-{stamp}.json"
            out.write_text(json.dumps(res, indent=1) + "\n")
            print(f"{name}: {res['seconds']} s, ok={res['ok']} -> {out.relative_to(ROOT)}", flush=True)


def cmd_report(args):
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    lines = ["# The README's newcomer walkthrough on the CPU",
             "",
             "Made by `python experiments/newcomer_cpu.py report` from `experiments/newcomer_cpu/*.json`",
             "(`python experiments/newcomer_cpu.py run --paths llama.cpp vllm --repeats 2`). Each run: the",
             "README's commands (the blocks after `<!-- newcomer:NAME -->`), taken from the README as they",
             "stand, in a fresh empty folder with empty caches, offline, all the machine's threads, not niced.",
             "\"Longest silence\" is the longest stretch with nothing written to the terminal (a progress",
             "bar's redraw counts).",
             ""]
    for name in PATHS:
        mine = [r for r in runs if r["path"] == name]
        if not mine:
            continue
        lines += [f"## {name}", "", "```bash", *readme_commands(name), "```", ""]
        lines += ["| run (UTC) | cores | load avg before / after (1 min) | " +
                  " | ".join(f"step {i + 1} s" for i in range(len(mine[-1]["steps"]))) +
                  " | total s | longest silence s | ok |",
                  "|---|---|---|" + "---|" * len(mine[-1]["steps"]) + "---|---|---|"]
        for r in mine:
            lines.append(f"| {r['date']} | {r['cpus']} | {r['loadavg_before'][0]} / {r['loadavg_after'][0]} | "
                         + " | ".join(str(s["seconds"]) for s in r["steps"])
                         + f" | {r['seconds']} | {max(s['longest_silence_s'] for s in r['steps'])} | "
                         f"{'yes' if r['ok'] else 'no'} |")
        ok = [r["seconds"] for r in mine if r["ok"]]
        if ok:
            lines += ["", f"Median of {len(ok)}: **{statistics.median(ok):.0f} s** "
                          f"({statistics.median(ok) / 60:.1f} min); the bar is 600 s."]
        last = mine[-1]
        phased = [r for r in mine if r["steps"][0].get("phases")]
        if phased:
            lines += ["", "Where the estimate's time goes (each progress bar: first and last redraw, seconds "
                          "from the command's start):", "",
                      "| run (UTC) | " + " | ".join(f"`{d}`" for d in phased[-1]["steps"][0]["phases"]) + " |",
                      "|---|" + "---|" * len(phased[-1]["steps"][0]["phases"])]
            for r in phased:
                ph = r["steps"][0]["phases"]
                lines.append(f"| {r['date']} | " + " | ".join(
                    f"{ph[d][0]}-{ph[d][1]}" if d in ph else "" for d in phased[-1]["steps"][0]["phases"]) + " |")
        worst = max(last["steps"], key=lambda s: s["longest_silence_s"])
        lines += ["", f"Longest silence of the last run: {worst['longest_silence_s']} s in "
                      f"`{worst['command']}`, after: `{worst['silent_after']}`",
                  "", "Files written: " + ", ".join(f"`{k}` ({v:,} B)" for k, v in sorted(last["files"].items())),
                  "", "The estimate's last lines (last run):", "", "```",
                  *last["steps"][0]["output_tail"], "```", ""]
    REPORT.write_text("\n".join(lines) + "\n")
    print(f"wrote {REPORT.relative_to(ROOT)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    r.add_argument("--repeats", type=int, default=1)
    r.set_defaults(func=cmd_run)
    sub.add_parser("report").set_defaults(func=cmd_report)
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
