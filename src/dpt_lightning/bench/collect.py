"""``results.csv``, ``summary.md`` and the plots of a run folder, built from the cells' result files.

Run by the ``dpt-bench`` process when its cells end, by the last SLURM array task to finish, or by
hand: ``dpt-bench --collect RUN_FOLDER``. Collecting is idempotent: it reads only the cells'
``result.json`` files and rewrites nothing that would not change (a second collect writes no file).
A summary collected while cells still run or wait says so and is replaced by the next collect
(`report.write_report`). A result file that cannot be read is named (printed and listed in the
summary), never dropped silently; its cell runs again on ``--resume``. Two collectors never
interleave (a lock file, ``.collect.lock``).
"""
from __future__ import annotations

import sys
from pathlib import Path

from dpt_lightning.bench.folder import (GRID_COPY, RESULTS, cell_dir, read_result, results_csv_text,
                                        stored_results, write_if_changed)
from dpt_lightning.bench.grid import Grid, GridError, expand, load_grid
from dpt_lightning.bench.lock import CellClaim, SharedLock


def load_run_folder(folder: Path) -> Grid:
    folder = Path(folder)
    if not (folder / GRID_COPY).is_file():
        raise GridError(f"{folder} is not a dpt-bench run folder (no {GRID_COPY}); give the folder that "
                        "dpt-bench printed when it started")
    return load_grid(folder / GRID_COPY)


def _results(folder: Path, grid: Grid) -> tuple[list[dict], bool, list[str]]:
    ids = [run.run_id for run in expand(grid)]
    rows, unreadable = stored_results(folder, ids)
    written = write_if_changed(folder / RESULTS, results_csv_text(rows)) if rows else False
    wanted = set(ids)
    return [row for row in rows if row.get("run_id") in wanted], written, unreadable


def collect_results(folder: Path, grid: Grid | None = None) -> list[dict]:
    """Write ``results.csv`` from the cells' result files (if it changed); returns the rows of
    this grid's cells. Rows of cells no longer in the grid stay in the file, after the grid's."""
    folder = Path(folder)
    return _results(folder, grid or load_run_folder(folder))[0]


def collect(folder: Path, overwrite: bool = False, stream=None) -> list[Path]:
    """results.csv, summary.md and plots of a run folder; returns the files written. Result files
    that cannot be read are named on ``stream`` (default stderr) and in the summary."""
    from dpt_lightning.bench.report import write_report

    folder = Path(folder)
    grid = load_run_folder(folder)
    with SharedLock(folder):
        rows, written, unreadable = _results(folder, grid)
        if unreadable:
            print(f"dpt-bench: skipped {len(unreadable)} unreadable result file(s): " + "; ".join(unreadable)
                  + f". Their cells count as not run: run them again with dpt-bench --resume {folder}",
                  file=stream or sys.stderr, flush=True)
        report = write_report(grid, rows, folder, overwrite=overwrite, pending=len(unfinished(folder, grid)),
                              unreadable=unreadable)
        return ([folder / RESULTS] if written else []) + report


def unfinished(folder: Path, grid: Grid) -> list[str]:
    """The cells without a result (ok or failed) under their current fingerprint, or running."""
    out = []
    for run in expand(grid):
        row = read_result(folder, run.run_id)
        if row is None or row.get("fingerprint") != run.fingerprint() or \
                CellClaim(cell_dir(folder, run.run_id)).holder() is not None:
            out.append(run.run_id)
    return out


def collect_if_complete(folder: Path) -> list[Path] | None:
    """Collect when every cell of the grid has a result and none is running; None otherwise. The
    last array task to end calls it, so the summary appears without a waiting head process."""
    grid = load_run_folder(folder)
    return None if unfinished(Path(folder), grid) else collect(folder)
