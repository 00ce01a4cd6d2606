"""``dpt-bench GRID.yaml``: every method side by side over datasets, shots and seeds.

A grid (`bench_grid`: its keys, checks and expansion) expands into runs; each run goes through the
``dpt`` command's own code (`bench_run`); every finished run is a row of ``results.csv`` in one run
folder, and ``summary.md`` and the plots are made from those rows (`bench_report`). Rerunning the
same grid into the same folder skips the finished runs and redoes failed or missing ones.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

from dpt_lightning.bench_grid import Grid, GridError, Run, expand, load_grid

__all__ = ["Grid", "GridError", "Run", "expand", "load_grid", "main", "read_results", "run_grid"]

RESULTS = "results.csv"
GRID_COPY = "grid.yaml"


# ----------------------------------------------------------------------- results.csv
def read_results(folder: Path) -> list[dict]:
    path = folder / RESULTS
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_results(folder: Path, rows: list[dict]) -> None:
    """Write all rows atomically (a kill mid-write leaves the previous file)."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".csv", dir=folder)
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, folder / RESULTS)


def is_done(row: dict | None, run: Run) -> bool:
    return row is not None and row.get("status") == "ok" and row.get("fingerprint") == run.fingerprint()


# ------------------------------------------------------------------------- progress
class GridProgress:
    """A one-line progress bar over the grid, printed before each run (Lightning draws its own
    bar inside the run, so the grid's bar is a plain line that never fights with it)."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total, self.width, self.done = total, width, 0
        self.stream = stream or sys.stdout
        self.started = time.perf_counter()

    def _bar(self) -> str:
        filled = round(self.width * self.done / max(self.total, 1))
        return "[" + "#" * filled + "-" * (self.width - filled) + "]"

    def start(self, run: Run) -> None:
        elapsed = time.perf_counter() - self.started
        eta = f", about {_clock(elapsed / self.done * (self.total - self.done))} left" if self.done else ""
        print(f"\ndpt-bench {self._bar()} {self.done}/{self.total} ({_clock(elapsed)} elapsed{eta})\n"
              f"  run {self.done + 1}/{self.total}: {run.label()}", file=self.stream, flush=True)

    def finish(self, run: Run, row: dict) -> None:
        self.done += 1
        result = f"acc {100 * float(row['acc']):.2f}%" if row.get("acc") not in (None, "") else ""
        if row.get("novel_acc") not in (None, ""):
            result += f", novel {100 * float(row['novel_acc']):.2f}%"
        status = result if row["status"] == "ok" else f"FAILED: {row['error'][:300]}"
        print(f"  done {run.run_id} in {_clock(row.get('total_seconds', 0))}: {status}", file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(float(seconds)))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------------------- the loop
def run_grid(grid: Grid, folder: Path, executor=None, fail_fast: bool = False, stream=None) -> dict:
    """Execute every run of ``grid`` not yet finished in ``folder``; returns counts.

    ``executor(stages, run_dir) -> row fields`` defaults to `bench_run.execute` (the dpt code);
    tests pass their own. Rows are written to results.csv after every run.
    """
    from dpt_lightning import bench_run

    executor = executor or bench_run.execute
    folder.mkdir(parents=True, exist_ok=True)
    (folder / GRID_COPY).write_text(grid.to_yaml())
    rows = read_results(folder)
    by_id = {row["run_id"]: i for i, row in enumerate(rows)}
    runs = expand(grid)
    todo = [run for run in runs if not is_done(rows[by_id[run.run_id]] if run.run_id in by_id else None, run)]
    counts = {"runs": len(runs), "skipped": len(runs) - len(todo), "executed": 0, "failed": 0}
    out = stream or sys.stdout
    if counts["skipped"]:
        print(f"dpt-bench: {counts['skipped']} of {len(runs)} runs already finished in {folder}; "
              f"{len(todo)} to run", file=out, flush=True)
    progress = GridProgress(len(todo), out)
    machine = bench_run.environment()
    for run in todo:
        progress.start(run)
        run_dir = folder / "runs" / run.run_id
        started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        fields = executor(run.stages(run_dir), run_dir)
        row = {**run.settings(), "status": fields.get("status", "failed"), "error": fields.get("error", ""),
               **{k: v for k, v in fields.items() if k not in ("status", "error")},
               "started": started, **machine, "fingerprint": run.fingerprint()}
        if run.run_id in by_id:
            rows[by_id[run.run_id]] = row
        else:
            by_id[run.run_id] = len(rows)
            rows.append(row)
        write_results(folder, rows)
        counts["executed"] += 1
        counts["failed"] += row["status"] != "ok"
        progress.finish(run, row)
        if fail_fast and row["status"] != "ok":
            break
    return counts


def grid_rows(grid: Grid, folder: Path) -> list[dict]:
    """The results.csv rows of this grid's runs (rows of runs no longer in the grid are kept in
    the file but left out of the summary)."""
    ids = {run.run_id for run in expand(grid)}
    return [row for row in read_results(folder) if row.get("run_id") in ids]


def new_run_folder(grid: Grid) -> Path:
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Path(grid.output).expanduser() / f"{grid.name}_{stamp}"


def latest_run_folder(grid: Grid) -> Path:
    root = Path(grid.output).expanduser()
    candidates = sorted(p for p in root.glob(f"{grid.name}_*") if (p / GRID_COPY).is_file()) if root.is_dir() else []
    if not candidates:
        raise GridError(f"no earlier run folder of grid '{grid.name}' under {root}; run without --resume, "
                        "or give the folder: --resume FOLDER")
    return candidates[-1]


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpt-bench",
        description="Run a benchmark grid of prompt-learning methods (see benchmarks/*.yaml) through the dpt "
                    "command and write results.csv, summary.md and plots into one run folder.")
    parser.add_argument("grid", nargs="?", help="grid YAML file (optional with --resume FOLDER: its grid.yaml)")
    parser.add_argument("--out", help="run folder to write (default: <output>/<name>_<date>_<time>); an existing "
                                      "folder is resumed")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="FOLDER",
                        help="continue a run folder: finished runs are skipped, failed and missing ones run; "
                             "without FOLDER the newest folder of this grid (also the default without --new)")
    parser.add_argument("--new", action="store_true",
                        help="start a new dated run folder even if this grid has one already (default: continue "
                             "the newest one, skipping its finished runs)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs (and which are finished), run nothing")
    parser.add_argument("--report", action="store_true", help="only (re)write summary.md and the plots")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing summary.md and plots (default: write new dated files beside them)")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dpt-bench``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        folder, grid = _resolve(args)
    except GridError as err:
        print(f"dpt-bench: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        rows = {row["run_id"]: row for row in read_results(folder)} if folder.is_dir() else {}
        for run in expand(grid):
            print(f"{'done' if is_done(rows.get(run.run_id), run) else 'todo'}  {run.label()}")
        return 0
    counts = {"failed": 0}
    if not args.report:
        print(f"dpt-bench: grid '{grid.name}' ({len(expand(grid))} runs) -> {folder}", flush=True)
        try:
            counts = run_grid(grid, folder, fail_fast=args.fail_fast)
        except KeyboardInterrupt:
            print(f"\ndpt-bench: interrupted; finished runs are kept in {folder / RESULTS}. Continue with: "
                  f"dpt-bench --resume {folder}", file=sys.stderr)
            return 130
        print(f"\ndpt-bench: {counts['executed']} run(s) executed, {counts['skipped']} skipped, "
              f"{counts['failed']} failed", flush=True)
    from dpt_lightning.bench_report import write_report

    written = write_report(grid, grid_rows(grid, folder), folder, overwrite=args.overwrite)
    for path in written:
        print(f"dpt-bench: wrote {path}")
    print(f"dpt-bench: results in {folder / RESULTS}; resume with: dpt-bench --resume {folder}")
    return 1 if counts["failed"] else 0


def _resolve(args) -> tuple[Path, Grid]:
    """The run folder and the grid from the command line (``--out`` / ``--resume``)."""
    if sum(map(bool, (args.out, args.resume, args.new))) > 1:
        raise GridError("give at most one of --out, --resume and --new")
    if args.grid is None:
        if args.resume in (None, "latest"):
            raise GridError("give a grid file, or --resume FOLDER")
        folder = Path(args.resume).expanduser()
        if not (folder / GRID_COPY).is_file():
            raise GridError(f"{folder} is not a dpt-bench run folder (no {GRID_COPY})")
        return folder, load_grid(folder / GRID_COPY)
    grid = load_grid(args.grid)
    if args.resume == "latest":
        return latest_run_folder(grid), grid
    if args.resume:
        return Path(args.resume).expanduser(), grid
    if args.out:
        return Path(args.out).expanduser(), grid
    if args.report:
        return latest_run_folder(grid), grid
    if not args.new:  # a rerun of the same grid continues where the last one stopped
        try:
            folder = latest_run_folder(grid)
        except GridError:
            pass
        else:
            print(f"dpt-bench: continuing {folder} (finished runs are skipped; --new starts a new folder)")
            return folder, grid
    return new_run_folder(grid), grid


if __name__ == "__main__":
    sys.exit(main())
