"""The user's own data: an image-folder layout or a CSV file."""
from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from dpt_lightning.data.base import SPLITS, DataError, Item, MedicalDataModule, classwise_split
from dpt_lightning.data.images import IMAGE_EXTENSIONS


def _require_root(module: MedicalDataModule, what: str) -> Path:
    if module.root is None:
        raise ValueError(f"{type(module).__name__} needs data.root ({what})")
    return module.root


class ImageFolderDataModule(MedicalDataModule):
    """``root/<class>/<image>``: one folder per class, sorted folder names give the labels.

    Folder names become class names with ``_`` read as a space (``normal_brain`` -> ``normal brain``);
    the images of each class are split 50/20/30 into train/val/test with ``split_seed``.
    """

    def __init__(self, root: str, split_seed: int = 1, **kwargs):
        super().__init__(root=root, **kwargs)
        self.split_seed = split_seed
        folder = _require_root(self, "the folder with one sub-folder per class")
        if not folder.is_dir():
            raise FileNotFoundError(f"data.root {folder} is not a folder")
        self._folders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(self._folders) < 1:
            raise DataError([f"{folder}: no class sub-folders found"], "empty image folder")

    @property
    def all_classnames(self) -> list[str]:
        return [name.replace("_", " ") for name in self._folders]

    def read_split(self) -> dict[str, list[Item]]:
        groups, problems = {}, []
        for label, (folder, name) in enumerate(zip(self._folders, self.all_classnames)):
            files = sorted(p.name for p in (self.root / folder).iterdir()
                           if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
            if len(files) < 3:
                problems.append(f"{self.root / folder}: {len(files)} images; each class needs at least 3 "
                                "(train, val, test)")
            groups[label] = [Item(f"{folder}/{f}", label, name) for f in files]
        if problems:
            raise DataError(problems, "too few images")
        return classwise_split(groups, random.Random(self.split_seed))


class CSVDataModule(MedicalDataModule):
    """A CSV with columns ``path`` and ``label`` (a class name), optionally ``split``
    (train/val/test). Paths are relative to ``root`` (default: the CSV's folder).

    Class names are ``classnames`` if given (their order gives the labels), else the sorted labels.
    Without a ``split`` column each class is split 50/20/30 with ``split_seed``.
    """

    def __init__(self, csv: str, root: str | None = None, classnames: list[str] | None = None,
                 split_seed: int = 1, **kwargs):
        csv_path = Path(csv).expanduser()
        super().__init__(root=root if root is not None else str(csv_path.parent), **kwargs)
        self.csv = csv_path
        self.split_seed = split_seed
        if not csv_path.is_file():
            raise FileNotFoundError(f"data.csv {csv_path} does not exist")
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
        missing = {"path", "label"} - set(table.columns)
        if missing:
            raise DataError([f"{csv_path}: missing column(s) {sorted(missing)}; found {list(table.columns)}"],
                            "bad CSV")
        self.table = table
        names = sorted(set(table["label"])) if classnames is None else list(classnames)
        unknown = sorted(set(table["label"]) - set(names))
        if unknown:
            raise DataError([f"{csv_path}: labels {unknown} are not in data.classnames {names}"], "bad CSV")
        self._classnames = names

    @property
    def all_classnames(self) -> list[str]:
        return self._classnames

    def read_split(self) -> dict[str, list[Item]]:
        label_of = {name: i for i, name in enumerate(self._classnames)}
        items = [Item(row.path, label_of[row.label], row.label) for row in self.table.itertuples()]
        if "split" not in self.table.columns:
            groups: dict[int, list[Item]] = {}
            for item in items:
                groups.setdefault(item.label, []).append(item)
            return classwise_split(dict(sorted(groups.items())), random.Random(self.split_seed))
        bad = sorted(set(self.table["split"]) - set(SPLITS))
        if bad:
            raise DataError([f"{self.csv}: split values {bad} are not train/val/test"], "bad CSV")
        return {name: [i for i, s in zip(items, self.table["split"]) if s == name] for name in SPLITS}
