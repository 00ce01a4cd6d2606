"""The user's own data: an image-folder layout or a CSV file (single- or multi-label).

Both make their train/val/test split with THE split builder (`MedicalDataModule.make_split`,
50/20/30 per class with ``split_seed``; a multi-label CSV: 50/20/30 of all images) unless the CSV
has a ``split`` column; either way the class rule of `MedicalDataModule.setup` applies (every class
needs an image in every split the run uses).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from dpt_lightning.data.checks import is_utf8, not_utf8_problem, same_class_spellings
from dpt_lightning.data.datamodule import MedicalDataModule
from dpt_lightning.data.errors import DataError
from dpt_lightning.data.images import list_images
from dpt_lightning.data.multilabel import UncertainPolicy, label_csv_task, multilabel_items, read_multilabel_table
from dpt_lightning.data.splits import SPLITS, Item, MultiLabelItem, build_multilabel_split
from dpt_lightning.data.tables import Table, csv_records, raise_problems, read_csv_table


def _require_root(module: MedicalDataModule, what: str) -> Path:
    if module.root is None:
        raise ValueError(f"{type(module).__name__} needs data.root ({what})")
    return module.root


def folder_classname(folder: str) -> str:
    """The class name of a class folder: ``_`` read as a space (``normal_brain`` -> ``normal brain``)."""
    return folder.replace("_", " ")


class ImageFolderDataModule(MedicalDataModule):
    """``root/<class>/<image>``: one folder per class, sorted folder names give the labels.

    Folder names become class names with ``_`` read as a space (``normal_brain`` -> ``normal brain``);
    the images of each class (sorted by name) are split 50/20/30 into train/val/test with
    ``split_seed`` (or pass ``split_file``). Folder and file names must be UTF-8.
    """

    def __init__(self, root: str, split_seed: int = 1, **kwargs):
        super().__init__(root=root, **kwargs)
        self.split_seed = split_seed
        folder = _require_root(self, "the folder with one sub-folder per class")
        if not folder.is_dir():
            raise FileNotFoundError(f"data.root {folder} is not a folder")
        folders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        bad = [name for name in folders if not is_utf8(name)]
        if bad:  # the folder names are the class names the model is built for: refused at once
            raise DataError([not_utf8_problem(folder / name, kind="folder") for name in bad],
                            f"class folders of {folder}")
        if not folders:
            raise DataError([f"{folder}: no class sub-folders found (expected {folder}/<class>/<image>)"],
                            "empty image folder")
        same = same_class_spellings(folders, folder_classname)
        if same:  # 'circle/' and 'Circle/' (or 'normal_brain/' and 'normal brain/') are one class name
            raise DataError([f"{folder}: class folders {group} are one class for the model (class names that differ "
                             "only in case, or in '_' for a space); put each class's images in one folder"
                             for group in same], f"class folders of {folder}")
        self._folders = folders

    @property
    def all_classnames(self) -> list[str]:
        return [folder_classname(name) for name in self._folders]

    def read_split(self) -> dict[str, list[Item]]:
        self.split_source = f"50/20/30 split of {self.root} (split_seed={self.split_seed})"
        groups = {label: [Item(f"{folder}/{name}", label, classname) for name in list_images(self.root / folder)]
                  for label, (folder, classname) in enumerate(zip(self._folders, self.all_classnames))}
        where = {label: str(self.root / folder) for label, folder in enumerate(self._folders)}
        return self.make_split(groups, where, self.split_seed)


class CSVRow(NamedTuple):
    """One image of a label CSV: its line in the file, path, label (a class name), split or None."""

    line: int
    path: str
    label: str
    split: str | None


CSV_FORMAT = ("A label CSV is UTF-8 text with a header line naming the columns path,label (optionally split) and "
              "one row per image: the image's path relative to data.root (default: the CSV's folder), its class "
              "name, and train/val/test; quote values that contain commas.")


def read_label_csv(path: str | Path) -> tuple[list[CSVRow], bool]:
    """The rows of a label CSV and whether it has a ``split`` column.

    Every problem of the file is reported at once in a `DataError` naming the file and the lines:
    not UTF-8, empty, not CSV, missing columns, rows with the wrong number of fields or empty
    cells, split values other than train/val/test, an image listed twice (same path, in one
    split or across splits; ``./a.png`` and ``a.png`` are the same), and a label that lists
    several findings (``a|b``: multi-label data has a ``labels`` column). A missing file is a
    ``FileNotFoundError``.
    """
    return label_rows(path, read_csv_table(path, format_hint=CSV_FORMAT))


def label_rows(path: str | Path, table: Table) -> tuple[list[CSVRow], bool]:
    """The single-label rows of the CSV ``table`` read from ``path`` (see `read_label_csv`)."""
    records, has_split, problems = csv_records(path, table, ("path", "label"), CSV_FORMAT)
    rows = []
    for record in records:
        label = record.cells["label"].strip()
        if "|" in label:
            problems.append((record.line, f"{path}, line {record.line}: the label {label!r} lists several findings "
                                          "('|'); a 'label' column holds one class name per image: for multi-label "
                                          "data name the column 'labels' (README 'Multi-label and DICOM')"))
            continue
        rows.append(CSVRow(record.line, record.cells["path"], label, record.split))
    raise_problems(path, problems, CSV_FORMAT)
    return rows, has_split


class CSVDataModule(MedicalDataModule):
    """A CSV with columns ``path`` and ``label`` (a class name), optionally ``split``
    (train/val/test); see `read_label_csv`. Paths are relative to ``root`` (default: the CSV's folder).

    Class names are the sorted labels, or ``class_order`` (its order gives the labels; it may name
    classes the CSV lacks, which then fail the class rule in ``setup``). Without a ``split`` column
    each class is split 50/20/30 with ``split_seed``.

    (``class_order``, not ``classnames``: ``classnames`` is what the CLI links from the data into the
    model, and Lightning refuses a datamodule and a model whose hyperparameters share a name with
    different values.)

    **Multi-label** (``task`` becomes ``multilabel``, decided from the file and the settings by
    `multilabel.label_csv_task`): a ``labels`` column of ``|``-separated findings (``No Finding``
    for none), or one 0/1 column per finding named by ``findings`` (``-1`` uncertain, read by the
    policy ``uncertain``: ones, zeros or ignore); see `multilabel.read_multilabel_table`. The
    findings are ``findings`` (their order gives the labels) or the sorted names of the ``labels``
    column. Without a ``split`` column the images are split 50/20/30 as one group with
    ``split_seed`` (`splits.build_multilabel_split`). A ``label`` cell with ``|`` is an error that
    points here; settings of both kinds at once (``class_order`` with ``findings``) are one too.
    """

    def __init__(self, csv: str, root: str | None = None, class_order: list[str] | None = None,
                 split_seed: int = 1, findings: list[str] | None = None, uncertain: UncertainPolicy | None = None,
                 **kwargs):
        csv_path = Path(csv).expanduser()
        super().__init__(root=root if root is not None else str(csv_path.parent), **kwargs)
        self.csv = csv_path
        self.split_seed = split_seed
        table = read_csv_table(csv_path, format_hint=CSV_FORMAT)
        self.task = label_csv_task(csv_path, table, findings, uncertain, class_order)
        if self.multilabel:
            self.rows, self.has_split_column, self._classnames = read_multilabel_table(csv_path, table, findings,
                                                                                       uncertain)
            return
        self.rows, self.has_split_column = label_rows(csv_path, table)
        labels = {row.label for row in self.rows}
        names = sorted(labels) if class_order is None else [str(name).strip() for name in class_order]
        problems = []
        if class_order is not None:
            if not names or any(not name for name in names):
                problems.append(f"data.class_order {class_order!r}: give the class names, none empty")
            unknown = sorted(labels - set(names))
            if unknown:
                lines = {label: [r.line for r in self.rows if r.label == label][:5] for label in unknown}
                problems.append(f"{csv_path}: label(s) {unknown} (lines {lines}) are not in data.class_order {names}")
        same = same_class_spellings(names)
        if same:
            problems.append(f"{csv_path}: class names that differ only in case are one class for the model: {same}; "
                            "spell each class one way")
        if problems:
            raise DataError(problems, f"bad class names in {csv_path}")
        self._classnames = names

    @property
    def all_classnames(self) -> list[str]:
        return self._classnames

    def read_split(self) -> dict[str, list[Item]] | dict[str, list[MultiLabelItem]]:
        self.split_source = str(self.csv)
        if self.multilabel:
            items = multilabel_items(self.rows, self._classnames)
            if self.has_split_column:
                return {name: [item for row, item in zip(self.rows, items) if row.split == name] for name in SPLITS}
            self.split_source = f"{self.csv} (50/20/30 split of the images with split_seed={self.split_seed})"
            return build_multilabel_split(items, self.split_seed)
        label_of = {name: i for i, name in enumerate(self._classnames)}
        items = [(row, Item(row.path, label_of[row.label], row.label)) for row in self.rows]
        if self.has_split_column:
            return {name: [item for row, item in items if row.split == name] for name in SPLITS}
        groups: dict[int, list[Item]] = {label: [] for label in range(len(self._classnames))}
        for _, item in items:
            groups[item.label].append(item)
        where = {label: f"{self.csv} (rows of class {name!r})" for name, label in label_of.items()}
        return self.make_split(groups, where, self.split_seed)
