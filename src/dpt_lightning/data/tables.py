"""CSV tables of the user's data, read as text: every problem of a file is one `DataError` that
names the file and the line, never a parser's traceback.

`read_csv_table` reads any CSV (the user's label CSV, ChestX-ray14's ``Data_Entry_2017.csv``,
CheXpert's ``train.csv``); `csv_records` checks the rows of a user's label table (columns, field
counts, empty cells, the ``split`` column, an image listed twice) for the single-label and the
multi-label readers alike.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from dpt_lightning.data.errors import DataError
from dpt_lightning.data.splits import SPLITS, path_key

#: (line, cells) of the non-blank rows of a CSV file, the header first.
Table = list[tuple[int, list[str]]]


def read_csv_table(path: str | Path, setting: str = "data.csv", format_hint: str | None = None) -> Table:
    """The non-blank rows of the CSV file ``path`` with their line numbers, the header first.

    Not UTF-8 (a UTF-8 BOM is fine), unreadable, empty or not CSV: a `DataError` naming the file
    (and the line) with ``format_hint``; a folder too; a missing file a ``FileNotFoundError``
    naming ``setting``. Spaces after commas are skipped; quoted values may hold commas.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{setting} {path} does not exist")
    if path.is_dir():
        raise DataError([f"{path}: is a folder, not a CSV file"], f"bad {setting}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError([f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8 "
                         "(e.g. `iconv -f latin1 -t utf-8`, or a spreadsheet's 'CSV UTF-8')"], "bad CSV") from None
    except OSError as err:
        raise DataError([f"{path}: cannot read ({err.strerror or err})"], "bad CSV") from None
    if not text.strip():
        raise DataError([f"{path}: the file is empty"], "bad CSV", format_hint)
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True, strict=True)
    try:
        table = [(reader.line_num, row) for row in reader]
    except csv.Error as err:
        raise DataError([f"{path}, line {reader.line_num}: not readable as CSV ({err})"], "bad CSV",
                        format_hint) from None
    table = [(line, row) for line, row in table if any(cell.strip() for cell in row)]  # blank lines
    if not table:
        raise DataError([f"{path}: the file has no header and no rows"], "bad CSV", format_hint)
    return table


def header_problem(path: Path, table: Table, required: Sequence[str]) -> str | None:
    """The problem of a user table's header (lower-cased names): a ``required`` column missing, or
    a column repeated; None when it is fine."""
    line, header = table[0]
    columns = [name.strip().lower() for name in header]
    missing = [name for name in required if name not in columns]
    repeated = sorted({name for name in columns if columns.count(name) > 1 and name})
    if not (missing or repeated):
        return None
    return (f"{path}, line {line}: the header {header} " +
            (f"lacks the column(s) {missing}" if missing else f"repeats the column(s) {repeated}"))


class Record(NamedTuple):
    """One row of a user's label table: its line, ``{column (lower case): cell}``, split or None."""

    line: int
    cells: dict[str, str]
    split: str | None


def csv_records(path: str | Path, table: Table, required: Sequence[str], format_hint: str | None = None,
                nonempty: Sequence[str] | None = None) -> tuple[list[Record], bool, list[tuple[int, str]]]:
    """The rows of a user's label table (``path`` column first in ``required``), whether it has a
    ``split`` column, and the problems found as ``(line, text)``: a header that lacks a ``required``
    column or repeats one is raised at once; then every row with the wrong number of fields, an
    empty ``nonempty`` (default: ``required``) or ``split`` cell, a split other than train/val/test,
    or an image listed again (``./a.png`` is ``a.png``) is a problem and left out; no rows at all is
    one too."""
    path = Path(path)
    problem = header_problem(path, table, required)
    if problem:
        raise DataError([problem], "bad CSV", format_hint)
    (_, header), body = table[0], table[1:]
    columns = [name.strip().lower() for name in header]
    has_split = "split" in columns
    records: list[Record] = []
    problems: list[tuple[int, str]] = []
    first_line: dict[str, int] = {}
    for line, cells in body:
        if len(cells) != len(columns):
            problems.append((line, f"{path}, line {line}: {len(cells)} fields, the header has {len(columns)}"))
            continue
        row = dict(zip(columns, cells))
        empty = [name for name in (*(required if nonempty is None else nonempty), "split")
                 if name in row and not row[name].strip()]
        if empty:
            problems.append((line, f"{path}, line {line}: empty {' and '.join(dict.fromkeys(empty))}"))
            continue
        split = row["split"].strip().lower() if has_split else None
        if has_split and split not in SPLITS:
            problems.append((line, f"{path}, line {line}: split {row['split']!r} is not train, val or test"))
            continue
        key = path_key(row[required[0]])
        if key in first_line:
            problems.append((line, f"{path}, line {line}: the image {row[required[0]]!r} is listed again (first on "
                                   f"line {first_line[key]}); an image may be listed once"))
            continue
        first_line[key] = line
        records.append(Record(line, row, split))
    if not body:
        problems.append((0, f"{path}: no rows after the header"))
    return records, has_split, problems


def raise_problems(path: str | Path, problems: list[tuple[int, str]], format_hint: str | None = None) -> None:
    """Raise the ``(line, text)`` problems of the file ``path``, in line order, as one `DataError`."""
    if problems:
        raise DataError([text for _, text in sorted(problems, key=lambda p: p[0])], f"bad CSV {path}", format_hint)


__all__ = ["Record", "Table", "csv_records", "header_problem", "raise_problems", "read_csv_table"]
