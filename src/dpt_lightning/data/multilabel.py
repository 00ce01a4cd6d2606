"""Multi-label tables: several findings per image, read from a CSV.

Two forms of a label CSV (`read_multilabel_table`), each with ``path`` and optionally ``split``:

* a ``labels`` column: the image's findings separated by ``|`` (``Effusion|Mass``), or
  ``No Finding`` for an image without any (ChestX-ray14's convention); an empty cell is an error;
* one column per finding (named by ``data.findings``) holding ``1`` (present), ``0`` (absent) or
  ``-1`` (uncertain, allowed only with an uncertainty policy ``data.uncertain``: ``ones`` reads it
  as present, ``zeros`` as absent, ``ignore`` leaves the finding out of the loss and the metrics
  for that image); an empty cell is an error (CheXpert reads it as 0: `finding_values`).

Every problem names the file and the line. `label_csv_task` decides which kind a user's CSV is
(and refuses settings of both kinds at once); `multilabel_items` turns rows into split items.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

from dpt_lightning.data.errors import DataError
from dpt_lightning.data.splits import MultiLabelItem, Task
from dpt_lightning.data.tables import Table, csv_records, header_problem, raise_problems

#: The label of an image without findings in a ``labels`` column (any case).
NO_FINDING = "No Finding"
#: What an uncertain (-1) label becomes: present, absent, or left out of the loss and metrics.
UncertainPolicy = Literal["ones", "zeros", "ignore"]
UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")
#: Cell values of a per-finding column.
_VALUES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1}

MULTILABEL_CSV_FORMAT = (
    "A multi-label CSV is UTF-8 text with a header line naming the columns path and labels (optionally split): "
    "the image's findings separated by '|' (e.g. Effusion|Mass), or 'No Finding' for an image without any; or, "
    "instead of labels, one column per finding named in data.findings holding 1 (present), 0 (absent) or -1 "
    "(uncertain, with data.uncertain: ones, zeros or ignore).")


class MultiLabelRow(NamedTuple):
    """One image of a multi-label table: its line, path, its findings, the findings whose label is
    unknown (uncertain, policy ``ignore``), and its split or None."""

    line: int
    path: str
    findings: tuple[str, ...]
    ignored: tuple[str, ...]
    split: str | None


def label_set(cell: str) -> tuple[tuple[str, ...], str | None]:
    """The findings of a ``|``-separated cell (``No Finding``: none), or a problem: an empty name,
    ``No Finding`` together with findings, a finding named twice."""
    names = tuple(part.strip() for part in cell.split("|"))
    if any(not name for name in names):
        return (), f"an empty finding name in {cell.strip()!r}"
    if any(name.lower() == NO_FINDING.lower() for name in names):
        return ((), None) if len(names) == 1 else ((), f"{NO_FINDING!r} together with findings in {cell.strip()!r}")
    if len(set(names)) != len(names):
        return (), f"a finding named twice in {cell.strip()!r}"
    return names, None


def finding_value(cell: str, column: str, uncertain: UncertainPolicy | None, blank: int | None = None,
                  ) -> tuple[int | None, str | None]:
    """A per-finding cell as 1 (present), 0 (absent) or -1 (ignored), after the ``uncertain`` policy
    for ``-1``; an empty cell is ``blank`` (None: a problem). Or (None, the problem)."""
    text = cell.strip()
    if not text:
        return (blank, None) if blank is not None else (None, f"empty {column!r} (write 1, 0 or -1)")
    value = _VALUES.get(text)
    if value is None:
        return None, f"{column!r} is {text!r}; write 1 (present), 0 (absent) or -1 (uncertain)"
    if value == -1:
        if uncertain is None:
            return None, (f"{column!r} is {text!r} (uncertain); choose what it means with data.uncertain: "
                          "ones, zeros or ignore")
        return {"ones": 1, "zeros": 0, "ignore": -1}[uncertain], None
    return value, None


def finding_values(cells: dict[str, str], columns: Sequence[str], names: Sequence[str],
                   uncertain: UncertainPolicy | None, blank: int | None = None,
                   ) -> tuple[tuple[str, ...], tuple[str, ...], list[str]]:
    """The findings present and ignored of one row of per-finding ``columns`` (keys of ``cells``)
    named ``names``, and the problems of its cells (`finding_value`)."""
    present, ignored, problems = [], [], []
    for column, name in zip(columns, names):
        value, problem = finding_value(cells[column], name, uncertain, blank)
        if problem:
            problems.append(problem)
        elif value == 1:
            present.append(name)
        elif value == -1:
            ignored.append(name)
    return tuple(present), tuple(ignored), problems


def check_policy(uncertain: str | None, setting: str = "data.uncertain") -> None:
    if uncertain is not None and uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"{setting} must be one of {list(UNCERTAIN_POLICIES)}, got {uncertain!r}")


def check_findings(findings: Sequence[str] | None, setting: str = "data.findings") -> list[str] | None:
    """The names of ``findings`` (stripped), or None; empty names, none at all, a name given twice
    (in any case) are a ``ValueError`` naming ``setting``."""
    if findings is None:
        return None
    names = [str(name).strip() for name in findings]
    folded = [name.lower() for name in names]
    if not names or any(not name for name in names) or len(set(folded)) != len(folded):
        raise ValueError(f"{setting} {list(findings)!r}: give the finding names, none empty, none twice")
    return names


def label_csv_task(path: Path, table: Table, findings: Sequence[str] | None, uncertain: str | None,
                   class_order: Sequence[str] | None) -> Task:
    """Which kind of label CSV ``table`` is: ``multilabel`` with a ``labels`` column or with
    ``findings`` (per-finding columns), ``multiclass`` with a ``label`` column. Settings of both
    kinds, or both columns, are one error naming the file."""
    line, header = table[0]
    columns = {name.strip().lower() for name in header}
    if {"label", "labels"} <= columns:
        raise DataError([f"{path}, line {line}: the header {header} has both 'label' (one class per image) and "
                         "'labels' (several findings per image); keep the one that fits your data"], "bad CSV")
    multilabel = "labels" in columns or ("label" not in columns and findings is not None)
    mixed = []
    if multilabel and class_order is not None:
        mixed.append("data.class_order orders the classes of single-label data; name the findings of multi-label "
                     "data (and their order) with data.findings")
    if not multilabel and (findings is not None or uncertain is not None):
        given = " and ".join(name for name, value in (("data.findings", findings), ("data.uncertain", uncertain))
                             if value is not None)
        mixed.append(f"{given} are multi-label settings, but {path} has a single-label 'label' column; for "
                     "multi-label data name the column 'labels' ('|'-separated findings) or give one 0/1 column per "
                     "finding without a 'label' column")
    if mixed:
        raise DataError(mixed, f"single- and multi-label settings mixed for {path}")
    return "multilabel" if multilabel else "multiclass"


def read_multilabel_table(path: Path, table: Table, findings: Sequence[str] | None = None,
                          uncertain: UncertainPolicy | None = None) -> tuple[list[MultiLabelRow], bool, list[str]]:
    """The rows of a multi-label CSV ``table`` (see the module), whether it has a ``split`` column,
    and the finding names in label order: ``findings`` when given, else the sorted names the
    ``labels`` column uses. Every problem is reported at once, with its line: those of
    `tables.csv_records`, unknown findings, bad cells, findings that differ only in case."""
    check_policy(uncertain)
    names = check_findings(findings)
    columns = {name.strip().lower() for name in table[0][1]}
    if "labels" not in columns:
        if names is None:
            problem = header_problem(path, table, ("path", "labels"))
            raise DataError([problem or f"{path}: no 'labels' column"], "bad CSV", MULTILABEL_CSV_FORMAT)
        return (*read_finding_columns(path, table, names, uncertain), names)
    records, has_split, problems = csv_records(path, table, ("path", "labels"), MULTILABEL_CSV_FORMAT)
    rows = []
    for record in records:
        found, problem = label_set(record.cells["labels"])
        unknown = [name for name in found if names is not None and name not in names]
        if problem or unknown:
            problems.append((record.line, f"{path}, line {record.line}: " + (problem or (
                f"finding(s) {unknown} are not in data.findings {names}"))))
            continue
        rows.append(MultiLabelRow(record.line, record.cells["path"], found, (), record.split))
    if names is None:
        names = sorted({name for row in rows for name in row.findings})
        folded: dict[str, list[str]] = {}
        for name in names:
            folded.setdefault(name.lower(), []).append(name)
        same = [spellings for spellings in folded.values() if len(spellings) > 1]
        if same:
            problems.append((0, f"{path}: finding names that differ only in case are one finding for the model: "
                                f"{same}; spell each finding one way"))
    raise_problems(path, problems, MULTILABEL_CSV_FORMAT)
    if not names:
        raise DataError([f"{path}: no image has a finding (every row is {NO_FINDING!r}); a model needs findings "
                         "to learn"], f"bad CSV {path}", MULTILABEL_CSV_FORMAT)
    return rows, has_split, names


def read_finding_columns(path: Path, table: Table, names: Sequence[str], uncertain: UncertainPolicy | None,
                         blank: int | None = None, format_hint: str | None = MULTILABEL_CSV_FORMAT,
                         ) -> tuple[list[MultiLabelRow], bool]:
    """The rows of a table with a ``path`` column and one column per finding (``names``, matched
    without regard to case; `finding_value` reads the cells, an empty one as ``blank``), and whether
    it has a ``split`` column. Every problem at once, with its line."""
    columns = [name.lower() for name in names]
    nonempty = ("path",) if blank is not None else None
    records, has_split, problems = csv_records(path, table, ("path", *columns), format_hint, nonempty)
    rows = []
    for record in records:
        found, ignored, cell_problems = finding_values(record.cells, columns, names, uncertain, blank)
        problems += [(record.line, f"{path}, line {record.line}: {problem}") for problem in cell_problems]
        if not cell_problems:
            rows.append(MultiLabelRow(record.line, record.cells["path"], found, ignored, record.split))
    raise_problems(path, problems, format_hint)
    return rows, has_split


def multilabel_item(relpath: str, found: Sequence[str], ignored: Sequence[str], label_of: dict[str, int],
                    classnames: Sequence[str]) -> MultiLabelItem:
    """The split item of an image whose findings ``found`` and ``ignored`` are names (keys of ``label_of``)."""
    labels = sorted(label_of[name] for name in found)
    return MultiLabelItem(relpath, tuple(labels), tuple(classnames[label] for label in labels),
                          tuple(sorted(label_of[name] for name in ignored)))


def multilabel_items(rows: Sequence[MultiLabelRow], findings: Sequence[str]) -> list[MultiLabelItem]:
    """The split items of ``rows`` (finding names -> their labels in ``findings``' order)."""
    label_of = {name: label for label, name in enumerate(findings)}
    return [multilabel_item(row.path, row.findings, row.ignored, label_of, findings) for row in rows]


__all__ = ["MULTILABEL_CSV_FORMAT", "NO_FINDING", "MultiLabelRow", "UncertainPolicy", "finding_value",
           "finding_values", "label_csv_task", "label_set", "multilabel_item", "multilabel_items",
           "read_finding_columns", "read_multilabel_table"]
