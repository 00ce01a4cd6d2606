"""Wall time of a grid with ``dpt-bench --workers 1`` and ``--workers 2`` on this machine, in one
run, with a check that both give identical metrics (issue 16).

    python benchmarks/workers.py                          # the demo grid (benchmarks/demo.yaml)
    python benchmarks/workers.py --grid benchmarks/demo.yaml --workers 1 2 4

Each setting runs the whole grid into a fresh run folder (under ``--out``, default a temporary
folder), as a separate ``dpt-bench`` process, one after the other. The tiny-demo backbone is built
before the clock starts. Results: ``benchmarks/results/workers_<cpu|cuda>.md``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["acc", "macro_acc", "f1", "auroc"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def code_version() -> str:
    """The commit measured: this checkout's, or ``$DPT_SOURCE_COMMIT`` for an exported snapshot."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    dirty = ""
    if commit:
        status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30).stdout
        dirty = " (with uncommitted changes)" if status.strip() else ""
    return (commit + dirty) if commit else os.environ.get("DPT_SOURCE_COMMIT", "unknown")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default=str(ROOT / "benchmarks" / "demo.yaml"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=None, help="folder for the run folders (default: a temporary folder)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="dpt-workers-"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print("building the tiny-demo backbone (not timed) ...", flush=True)
    subprocess.run([sys.executable, "-c", "from dpt_lightning import BiomedCLIP; BiomedCLIP('tiny-demo')"],
                   check=True, env=env)
    timings, tables, loads = {}, {}, {}
    for workers in args.workers:
        folder = out / f"workers{workers}"
        command = [sys.executable, "-m", "dpt_lightning.bench", args.grid, "--out", str(folder),
                   "--workers", str(workers)]
        print(f"\n$ {' '.join(command)}", flush=True)
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        result = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        timings[workers] = time.perf_counter() - started
        loads[workers] = (load_before, os.getloadavg()[0])
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"dpt-bench --workers {workers} failed (exit {result.returncode})")
        tables[workers] = pd.read_csv(folder / "results.csv").set_index("run_id")
        print(f"--workers {workers}: {timings[workers]:.1f} s, {len(tables[workers])} runs", flush=True)
    first = args.workers[0]
    reference = tables[first]
    identical = {}
    for workers, table in tables.items():
        same_rows = sorted(table.index) == sorted(reference.index)
        identical[workers] = same_rows and table.loc[reference.index, METRICS].equals(reference[METRICS])
    device = "cuda" if reference["device"].astype(str).str.startswith("cuda").any() else "cpu"
    lines = [
        f"# `dpt-bench --workers`: wall time of `{Path(args.grid).relative_to(ROOT) if Path(args.grid).is_relative_to(ROOT) else args.grid}`",
        "",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs usable: {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}; "
        f"device: {device}; Python {platform.python_version()}",
        f"- command: `python benchmarks/workers.py {' '.join(sys.argv[1:])}`; code: {code_version()}",
        f"- runs per grid: {len(reference)}; every setting starts from an empty run folder; wall time of the whole "
        "`dpt-bench` process (start-up, every cell, results.csv, summary and plot)",
        "",
        "| workers | wall time (s) | speed-up vs 1st | sum of cell times (s) | torch threads per cell | load avg before → after | metrics identical to 1st |",
        "|---|---|---|---|---|---|---|",
    ]
    for workers in args.workers:
        table = tables[workers]
        lines.append(f"| {workers} | {timings[workers]:.1f} | {timings[first] / timings[workers]:.2f}x | "
                     f"{table['total_seconds'].sum():.1f} | {', '.join(map(str, sorted(set(table['torch_threads']))))} | "
                     f"{loads[workers][0]:.2f} → {loads[workers][1]:.2f} | {'yes' if identical[workers] else 'NO'} |")
    lines += ["", f"Metrics compared: {', '.join(METRICS)} of every run, exactly (no tolerance).",
              "The machine may be shared: the load average shows other work running at the same time."]
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    target = results / f"workers_{device}.md"
    target.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(f"\nwrote {target}")
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
