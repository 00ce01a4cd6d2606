"""The run folder of a grid: where each cell's files and result live, and how folders are named.

::

    <output>/<grid name>_<YYYY-MM-DD_HH-MM-SS>/
        grid.yaml                  the grid as run (paths resolved)
        results.csv                one row per cell, built from the cells' result files (`collect`)
        summary.md, plots/         built from results.csv (`report`)
        runs/<run id>/result.json  the cell's row, written atomically when the cell ends
        runs/<run id>/cell.json    the fingerprint the cell's files belong to (resume check)
        runs/<run id>/lightning_logs/version_<n>/  the cell's log folder: config.yaml, checkpoints/last.ckpt
        runs/<run id>/.claim.<n>   held while a process runs the cell (`lock.CellClaim`)
        logs/                      one log per local worker process
        submitit/                  submitit's job files and task logs (--launcher submitit)
        .lock                      held by the dpt-bench process that runs or submits the grid

Concurrent cells never write one file: each writes only under its own ``runs/<run id>/``.
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import re
from pathlib import Path

from dpt_lightning.bench.grid import Grid, GridError, Run
from dpt_lightning.files import JSONFileError, atomic_write, read_json

RESULTS = "results.csv"
GRID_COPY = "grid.yaml"
RESULT = "result.json"
CELL = "cell.json"
STAMP = "%Y-%m-%d_%H-%M-%S"
STAMP_PATTERN = r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}"


def cell_dir(folder: Path, run_id: str) -> Path:
    return Path(folder) / "runs" / run_id


def load_result(path: Path) -> dict:
    """A cell's result file; `JSONFileError` naming it when it is not a readable row."""
    row = read_json(path, "result file")
    if not isinstance(row, dict):
        raise JSONFileError(f"{path}: not a result row (a JSON object), but {type(row).__name__}")
    return row


def read_result(folder: Path, run_id: str) -> dict | None:
    """The row a cell stored when it ended (None: it never ended, or the file is unreadable)."""
    try:
        return load_result(cell_dir(folder, run_id) / RESULT)
    except (OSError, JSONFileError):
        return None


def write_result(folder: Path, run_id: str, row: dict) -> Path:
    """Store a cell's row atomically (a reader sees the old file or the new one, never half)."""
    return atomic_write(cell_dir(folder, run_id) / RESULT, json.dumps(row, indent=1, default=str) + "\n")


def is_done(row: dict | None, run: Run, fingerprint: str | None = None) -> bool:
    """A finished cell: an ``ok`` result stored under the run's current fingerprint."""
    return (row is not None and row.get("status") == "ok"
            and row.get("fingerprint") == (fingerprint or run.fingerprint()))


def stored_results(folder: Path, run_ids: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """The rows of every cell with a result file: the grid's cells first, in ``run_ids`` order,
    then any others (cells of an earlier version of the grid) by name; and the result files that
    could not be read, each with the reason (``"<path>: <reason>"``)."""
    runs = Path(folder) / "runs"
    present = sorted(p.name for p in runs.iterdir() if (p / RESULT).is_file()) if runs.is_dir() else []
    order = [i for i in (run_ids or []) if i in set(present)]
    order += [i for i in present if i not in set(order)]
    rows, unreadable = [], []
    for run_id in order:
        try:
            rows.append(load_result(cell_dir(folder, run_id) / RESULT))
        except FileNotFoundError:  # moved aside meanwhile (a cell starting again)
            continue
        except (OSError, JSONFileError) as err:
            unreadable.append(str(err))
    return rows, unreadable


def read_results(folder: Path) -> list[dict]:
    """The rows of ``results.csv`` (strings, as written)."""
    path = Path(folder) / RESULTS
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def results_csv_text(rows: list[dict]) -> str:
    """``results.csv`` for ``rows``: columns in order of first appearance, missing cells empty."""
    import io

    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` atomically unless the file already holds exactly it; True if written."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    atomic_write(path, text)
    return True


# ----------------------------------------------------------------------- folder names
def new_run_folder(grid: Grid) -> Path:
    return Path(grid.output).expanduser() / f"{grid.name}_{dt.datetime.now().strftime(STAMP)}"


def is_run_folder_of(path: Path, grid_name: str) -> bool:
    """True for ``<grid name>_<date>_<time>`` exactly (grid ``demo`` is not ``demo_big_<date>``)."""
    return re.fullmatch(re.escape(grid_name) + "_" + STAMP_PATTERN, path.name) is not None


def latest_run_folder(grid: Grid) -> Path:
    """The newest run folder of this grid under its ``output`` (by the time in its name)."""
    root = Path(grid.output).expanduser()
    candidates = sorted((p for p in root.iterdir() if is_run_folder_of(p, grid.name) and (p / GRID_COPY).is_file()),
                        key=lambda p: p.name[len(grid.name) + 1:]) if root.is_dir() else []
    if not candidates:
        raise GridError(f"no earlier run folder of grid '{grid.name}' (named {grid.name}_<date>_<time>) under "
                        f"{root}; run without --resume, or give the folder: --resume FOLDER")
    return candidates[-1]
