"""The ``dpt-bench`` command line."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from dpt_lightning.bench.folder import GRID_COPY, RESULTS, cell_dir, latest_run_folder, new_run_folder, read_result
from dpt_lightning.bench.grid import Grid, GridError, expand, load_grid

EXIT_FAILED, EXIT_USAGE, EXIT_BUSY, EXIT_INTERRUPTED = 1, 2, 3, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpt-bench",
        description="Run a benchmark grid of prompt-learning methods (see benchmarks/*.yaml) through the dpt "
                    "command and write results.csv, summary.md and plots into one run folder: here, in N worker "
                    "processes, or as a SLURM job array.")
    parser.add_argument("grid", nargs="?", help="grid YAML file (optional with --resume FOLDER: its grid.yaml)")
    where = parser.add_argument_group("run folder")
    where.add_argument("--out", help="run folder to write (default: <output>/<name>_<date>_<time>); an existing "
                                     "folder is continued")
    where.add_argument("--resume", nargs="?", const="latest", metavar="FOLDER",
                       help="continue a run folder: finished runs are skipped, failed and missing ones run (resuming "
                            "their own last checkpoint); without FOLDER the newest folder of this grid (also the "
                            "default without --new)")
    where.add_argument("--new", action="store_true",
                       help="start a new dated run folder even if this grid has one already")
    where.add_argument("--wait-lock", action="store_true",
                       help="if another dpt-bench process is using the run folder, wait for it (default: exit)")
    what = parser.add_argument_group("what to do")
    what.add_argument("--dry-run", action="store_true", help="list the runs (done, todo, running), run nothing")
    what.add_argument("--report", action="store_true", help="only (re)build results.csv, summary.md and the plots")
    what.add_argument("--collect", metavar="RUN_FOLDER",
                      help="build results.csv, summary.md and the plots of a run folder from its cells' result files "
                           "(safe to repeat, and while cells still run)")
    what.add_argument("--overwrite", action="store_true",
                      help="replace an existing summary.md and plots (default: write new dated files beside them)")
    what.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    what.add_argument("--clear-cache", action="store_true",
                      help="empty the image-feature store ($DPT_CACHE_DIR/features) that the runs share, and exit")
    local = parser.add_argument_group("this machine")
    local.add_argument("--workers", type=int, default=1, metavar="N",
                       help="run N cells at once, each in its own process with its own GPU (round-robin over the "
                            "visible GPUs) or its share of the CPU cores (default 1: one after another, in this "
                            "process)")
    slurm = parser.add_argument_group("job array (--launcher submitit)")
    slurm.add_argument("--launcher", choices=("local", "submitit"), default="local",
                       help="submitit: submit the unfinished cells as one job array and return (see --wait)")
    slurm.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                       help="where submitit runs the array: SLURM (default), or this machine (submitit's local "
                            "executor: all tasks at once, or at most --array-parallelism)")
    slurm.add_argument("--partition", help="SLURM partition")
    slurm.add_argument("--time", help="time limit of one task: minutes, HH:MM:SS or D-HH:MM:SS (required for "
                                      "SLURM; a task that reaches it is requeued and resumes its checkpoint)")
    slurm.add_argument("--gpus-per-task", type=int, help="GPUs per task (one cell)")
    slurm.add_argument("--cpus-per-task", type=int, help="CPU cores per task")
    slurm.add_argument("--mem-gb", type=float, help="memory per task, GB")
    slurm.add_argument("--array-parallelism", type=int, metavar="N", help="at most N tasks of the array at once")
    slurm.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="an extra #SBATCH flag, e.g. --sbatch account=myproject --sbatch qos=high (repeatable)")
    slurm.add_argument("--setup", action="append", default=[], metavar="COMMAND",
                       help="a shell line run before each task, e.g. --setup 'source ~/venv/bin/activate' (repeatable)")
    slurm.add_argument("--wait", action="store_true",
                       help="wait for the array, print each cell as it ends, then write the summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dpt-bench``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.getcwd() not in sys.path:  # user method modules in the working folder, as `dpt` finds them
        sys.path.insert(0, os.getcwd())
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.clear_cache:
        return _clear_cache()
    try:
        if args.collect:
            return _collect(Path(args.collect).expanduser(), args.overwrite)
        if args.workers < 1:
            raise GridError("--workers must be at least 1")
        folder, grid = _resolve(args)
        if args.dry_run:
            return _dry_run(folder, grid)
        if args.report:
            return _collect(folder, args.overwrite)
        return _run(args, folder, grid)
    except GridError as err:
        print(f"dpt-bench: {err}", file=sys.stderr)
        return EXIT_USAGE


def _clear_cache() -> int:
    import shutil

    from dpt_lightning.features import store_root, store_size

    root = store_root()
    size, shards = store_size(root)
    shutil.rmtree(root, ignore_errors=True)
    print(f"dpt-bench: removed the feature store {root} ({size / 2**20:.1f} MiB in {shards} shard(s))")
    return 0


def _report_store() -> None:
    from dpt_lightning.features import limit_bytes, store_root, store_size

    size, shards = store_size()
    if shards:
        try:
            bound = f"bounded at {limit_bytes() / 2**30:.1f} GiB (DPT_FEATURE_STORE_GB)"
        except ValueError as err:  # the runs warned and did not store; say it once more, without a traceback
            bound = f"not written by these runs: {err}"
        print(f"dpt-bench: feature store {store_root()}: {size / 2**20:.1f} MiB in {shards} shard(s), {bound}; "
              "empty it with dpt-bench --clear-cache")


def _collect(folder: Path, overwrite: bool) -> int:
    from dpt_lightning.bench.collect import collect

    written = collect(folder, overwrite=overwrite)
    for path in written:
        print(f"dpt-bench: wrote {path}")
    if not written:
        print(f"dpt-bench: {folder}: results.csv, summary.md and plots are up to date")
    return 0


def _dry_run(folder: Path, grid: Grid) -> int:
    from dpt_lightning.bench.folder import is_done
    from dpt_lightning.bench.lock import CellClaim

    for run in expand(grid):
        row = read_result(folder, run.run_id)
        if CellClaim(cell_dir(folder, run.run_id)).holder() is not None:
            state = "running"
        elif is_done(row, run):
            state = "done"
        else:
            state = "failed" if row is not None and row.get("fingerprint") == run.fingerprint() else "todo"
        print(f"{state:<8} {run.label()}")
    return 0


class _Terminated(KeyboardInterrupt):
    pass


def _on_sigterm(signum, frame):  # SIGTERM stops the grid as Ctrl+C does
    raise _Terminated()


def _run(args, folder: Path, grid: Grid) -> int:
    from dpt_lightning.bench.collect import collect
    from dpt_lightning.bench.local import pending, run_grid, write_grid_copy
    from dpt_lightning.bench.lock import FolderBusy, FolderLock

    try:
        lock = FolderLock(folder).acquire(wait=args.wait_lock)
    except FolderBusy as err:
        print(f"dpt-bench: {err}", file=sys.stderr)
        return EXIT_BUSY
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        write_grid_copy(grid, folder)
        if args.launcher == "submitit":
            return _submit(args, folder, grid, pending(grid, folder))
        print(f"dpt-bench: grid '{grid.name}' ({len(expand(grid))} runs) -> {folder}", flush=True)
        try:
            counts = run_grid(grid, folder, fail_fast=args.fail_fast, workers=args.workers)
        except KeyboardInterrupt:
            print(f"\ndpt-bench: interrupted; finished runs are kept in {folder / RESULTS}. Continue with: "
                  f"dpt-bench --resume {folder}", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"\ndpt-bench: {counts['executed']} run(s) executed, {counts['skipped']} skipped, "
              f"{counts['failed']} failed", flush=True)
        for path in collect(folder, overwrite=args.overwrite):
            print(f"dpt-bench: wrote {path}")
        _report_store()
        print(f"dpt-bench: results in {folder / RESULTS}; resume with: dpt-bench --resume {folder}")
        return EXIT_FAILED if counts["failed"] else 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        lock.release()


def _submit(args, folder: Path, grid: Grid, todo) -> int:
    from dpt_lightning.bench.collect import collect
    from dpt_lightning.bench.slurm import SlurmOptions, parse_sbatch, parse_time, submit, wait

    options = SlurmOptions(cluster=args.cluster, partition=args.partition,
                           time_min=parse_time(args.time) if args.time else None, gpus_per_task=args.gpus_per_task,
                           cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
                           array_parallelism=args.array_parallelism, sbatch=parse_sbatch(args.sbatch),
                           setup=list(args.setup))
    print(f"dpt-bench: grid '{grid.name}': {len(todo)} of {len(expand(grid))} runs to do -> {folder}", flush=True)
    submitted = submit(folder, grid, todo, options)
    if not args.wait:
        if submitted:
            print(f"dpt-bench: the last task to end writes {folder / RESULTS} and summary.md; to see the results "
                  f"so far: dpt-bench --collect {folder}")
        return 0
    try:
        counts = wait(folder, submitted)
    except KeyboardInterrupt:
        print(f"\ndpt-bench: stopped waiting; the job array goes on. Collect later: dpt-bench --collect {folder}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    for path in collect(folder, overwrite=args.overwrite):
        print(f"dpt-bench: wrote {path}")
    print(f"dpt-bench: {counts['executed']} run(s) ended, {counts['failed']} failed, {counts['missing']} without a "
          f"result; resubmit the unfinished ones with the same command")
    return EXIT_FAILED if counts["failed"] or counts["missing"] else 0


def _resolve(args) -> tuple[Path, Grid]:
    """The run folder and the grid from the command line (``--out`` / ``--resume`` / ``--new``)."""
    if sum(map(bool, (args.out, args.resume, args.new))) > 1:
        raise GridError("give at most one of --out, --resume and --new")
    if args.grid is None:
        if args.resume in (None, "latest"):
            raise GridError("give a grid file, or --resume FOLDER (or --collect FOLDER)")
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
