"""The multi-label chest X-ray datasets, read from the files their publishers ship: NIH ChestX-ray14
and Stanford CheXpert (several findings per image; ``task = "multilabel"``).

Both carve a validation split from their training list **by patient** (`splits.patient_split`: the
patient ids, sorted as text, shuffled by ``random.Random(split_seed)``, ``round(val_fraction x
patients)`` held out with all their images; default 10 %), and test on the official test list. The
few-shot selection (`splits.sample_few_shot_multilabel`), the checks and the loaders are
`MedicalDataModule`'s.
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from dpt_lightning.data.datamodule import MedicalDataModule
from dpt_lightning.data.errors import DataError
from dpt_lightning.data.facts import MULTILABEL_DATASETS, DatasetFacts
from dpt_lightning.data.images import IMAGE_EXTENSIONS
from dpt_lightning.data.multilabel import (NO_FINDING, UncertainPolicy, check_findings, check_policy, label_set,
                                           multilabel_item, multilabel_items, read_finding_columns)
from dpt_lightning.data.splits import MultiLabelItem, patient_split
from dpt_lightning.data.tables import Table, read_csv_table

#: ChestX-ray14's findings as ``Data_Entry_2017.csv`` spells them, in the official label order.
CHESTXRAY14_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                      "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
                      "Hernia")
#: CheXpert's 14 observation columns, in the order of its CSV files.
CHEXPERT_OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                         "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                         "Pleural Other", "Fracture", "Support Devices")
#: CheXpert's five competition findings (the default of `CheXpertDataModule`).
CHEXPERT_COMPETITION = MULTILABEL_DATASETS["CheXpert"].classnames


class ChestXrayDataModule(MedicalDataModule):
    """Base of the chest X-ray datasets: multi-label, facts from `facts.MULTILABEL_DATASETS`, a
    patient-wise validation split of ``val_fraction`` with ``split_seed``."""

    task = "multilabel"
    facts: DatasetFacts

    def __init__(self, root: str, val_fraction: float = 0.1, split_seed: int = 1, **kwargs):
        if not root:
            raise ValueError(f"{type(self).__name__} needs data.root: the folder of the dataset's files")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"data.val_fraction must be at least 0 and below 1, got {val_fraction}")
        super().__init__(root=root, **kwargs)
        self.val_fraction = val_fraction
        self.split_seed = split_seed

    def __init_subclass__(cls, dataset: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if dataset is not None:
            cls.facts = MULTILABEL_DATASETS[dataset]
            cls.dataset_name, cls.template = cls.facts.name, cls.facts.template

    @property
    def all_classnames(self) -> list[str]:
        return list(self.facts.classnames)

    def carve_validation(self, items: list[MultiLabelItem], patient: dict[str, str]) -> tuple[list, list]:
        """(train, val) of the training list ``items``: a patient-wise split (``patient``: relpath -> id)."""
        self.split_built_how = (f"patient-wise validation split ({self.val_fraction:g} of the patients, "
                                f"split_seed={self.split_seed})")
        return patient_split(items, lambda item: patient[item.relpath], self.val_fraction, self.split_seed)


# ------------------------------------------------------------------------------------------ ChestX-ray14
def read_data_entry(path: Path) -> dict[str, tuple[int, tuple[str, ...], str]]:
    """``Data_Entry_2017.csv``: image name -> (line, its findings as the file spells them, patient id).

    Only the columns ``Image Index``, ``Finding Labels`` and ``Patient ID`` are read (by name; the
    official file's header has one more field than its rows). Every problem at once, with its line:
    a missing column, a row too short, an empty cell (an image without findings says ``No Finding``),
    an unknown finding, an image listed twice."""
    table = read_csv_table(path, "ChestX-ray14's label file")
    (header_line, header), body = table[0], table[1:]
    names = [name.strip() for name in header]
    needed = ("Image Index", "Finding Labels", "Patient ID")
    missing = [name for name in needed if name not in names]
    if missing:
        raise DataError([f"{path}, line {header_line}: the header lacks the column(s) {missing}; ChestX-ray14's "
                         f"Data_Entry_2017.csv has {list(needed)} among others"], "bad ChestX-ray14 label file")
    column = {name: names.index(name) for name in needed}
    entries: dict[str, tuple[int, tuple[str, ...], str]] = {}
    problems = []
    for line, cells in body:
        where = f"{path}, line {line}"
        if len(cells) <= max(column.values()):
            problems.append(f"{where}: {len(cells)} fields; the columns {list(needed)} are fields "
                            f"{[i + 1 for i in column.values()]}")
            continue
        image, labels, patient = (cells[column[name]].strip() for name in needed)
        empty = [name for name, value in zip(needed, (image, labels, patient)) if not value]
        if empty:
            advice = f" (an image without findings says {NO_FINDING!r})" if "Finding Labels" in empty else ""
            problems.append(f"{where}: empty {' and '.join(empty)}{advice}")
            continue
        found, problem = label_set(labels)
        unknown = [name for name in found if name not in CHESTXRAY14_LABELS]
        if problem or unknown:
            problems.append(f"{where}: " + (problem or f"unknown finding(s) {unknown}; ChestX-ray14's findings are "
                                                       f"{list(CHESTXRAY14_LABELS)} and {NO_FINDING!r}"))
        elif image in entries:
            problems.append(f"{where}: the image {image!r} is listed again (first on line {entries[image][0]})")
        else:
            entries[image] = (line, found, patient)
    if not body:
        problems.append(f"{path}: no rows after the header")
    if problems:
        raise DataError(problems, f"bad ChestX-ray14 label file {path}")
    return entries


def read_image_list(path: Path) -> list[tuple[int, str]]:
    """The (line, image name) of a list file (``train_val_list.txt``, ``test_list.txt``); blank lines skipped."""
    if not path.is_file():
        raise DataError([f"{path}: not found; ChestX-ray14's official split lists train_val_list.txt and "
                         "test_list.txt belong next to Data_Entry_2017.csv"], "missing ChestX-ray14 split list")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as err:
        raise DataError([f"{path}: cannot read ({err})"], "bad ChestX-ray14 split list") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def image_index(root: Path) -> dict[str, str]:
    """Image name -> its path relative to ``root``, for the images in ``root/images*/`` and
    ``root/images*/images/`` (the first place in sorted order wins)."""
    index: dict[str, str] = {}
    folders = sorted(entry.name for entry in os.scandir(root)
                     if entry.is_dir() and entry.name.lower().startswith("images"))
    for folder in folders:
        for relative in (folder, f"{folder}/images"):
            if not (root / relative).is_dir():
                continue
            for entry in sorted(os.scandir(root / relative), key=lambda e: e.name):
                if entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                    index.setdefault(entry.name, f"{relative}/{entry.name}")
    return index


class ChestXray14DataModule(ChestXrayDataModule, dataset="ChestXray14"):
    """NIH ChestX-ray14 (112,120 frontal chest X-rays, 14 findings), from its official files::

        <root>/Data_Entry_2017.csv            (or Data_Entry_2017_v2020.csv; columns Image Index,
                                              Finding Labels ('|'-separated, 'No Finding'), Patient ID)
        <root>/train_val_list.txt, <root>/test_list.txt
        <root>/images_001/images/<name>.png   (... images_012/images/: the archive's folders, as Kaggle ships them)
        <root>/images/<name>.png              (or the NIH images_*.tar.gz all unpacked into one folder)

    The findings in the official order (class names with ``_`` read as a space: "Pleural
    Thickening"); ``No Finding`` is no class: such an image has every finding negative. Train and
    val come from ``train_val_list.txt`` (val: ``val_fraction`` of its patients, see the module),
    test is ``test_list.txt``, whole.
    """

    LABEL_FILES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")

    def __init__(self, root: str, val_fraction: float = 0.1, split_seed: int = 1, **kwargs):
        super().__init__(root=root, val_fraction=val_fraction, split_seed=split_seed, **kwargs)
        found = [self.root / name for name in self.LABEL_FILES if (self.root / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{self.root}: no {' or '.join(self.LABEL_FILES)}; data.root is the folder that "
                                    "holds ChestX-ray14's label file, split lists and images_*/ folders")
        self.label_file = found[0]

    def read_split(self) -> dict[str, list[MultiLabelItem]]:
        entries = read_data_entry(self.label_file)
        self.split_source = f"ChestX-ray14 split ({self.label_file.name}, train_val_list.txt, test_list.txt)"
        lists = {name: read_image_list(self.root / f"{name}_list.txt") for name in ("train_val", "test")}
        index = image_index(self.root)
        label_of = {name: label for label, name in enumerate(CHESTXRAY14_LABELS)}
        problems, missing, listed = [], [], {}
        items: dict[str, list[MultiLabelItem]] = {"train_val": [], "test": []}
        patient: dict[str, str] = {}
        for name, lines in lists.items():
            for line, image in lines:
                where = f"{self.root / f'{name}_list.txt'}, line {line}"
                if image not in entries:
                    problems.append(f"{where}: {image!r} is not in {self.label_file.name}")
                elif image in listed:
                    problems.append(f"{where}: {image!r} is listed again (first in {listed[image]})")
                elif image not in index:
                    missing.append(image)
                else:
                    listed[image] = where
                    _, found, patient_id = entries[image]
                    items[name].append(multilabel_item(index[image], found, (), label_of, self.all_classnames))
                    patient[index[image]] = patient_id
        if missing:
            problems.append(f"{self.root}: {len(missing)} listed image(s) are in no images*/ folder, e.g. "
                            f"{missing[:5]}; expected {self.root}/images_001/images/<name>.png ... or "
                            f"{self.root}/images/<name>.png (unpack every images_*.tar.gz)")
        if problems:
            raise DataError(problems, f"ChestX-ray14 in {self.root}")
        train, val = self.carve_validation(items["train_val"], patient)
        return {"train": train, "val": val, "test": items["test"]}


# ---------------------------------------------------------------------------------------------- CheXpert
#: The folder names of CheXpert's archives, which also start every ``Path`` of its CSV files.
CHEXPERT_FOLDERS = ("CheXpert-v1.0-small", "CheXpert-v1.0")


def chexpert_folder(root: Path) -> Path:
    """The folder holding CheXpert's ``train.csv``: ``root`` itself or ``root/CheXpert-v1.0(-small)``."""
    for folder in (root, *(root / name for name in CHEXPERT_FOLDERS)):
        if (folder / "train.csv").is_file():
            return folder
    raise FileNotFoundError(f"{root}: no CheXpert train.csv here nor in {root}/{CHEXPERT_FOLDERS[0]}/ or "
                            f"{root}/{CHEXPERT_FOLDERS[1]}/; data.root is the unpacked CheXpert folder or its parent")


def frontal_rows(path: Path, table: Table) -> Table:
    """The header and the rows of a CheXpert table whose ``Frontal/Lateral`` is ``Frontal``."""
    (line, header), body = table[0], table[1:]
    columns = [name.strip().lower() for name in header]
    if "frontal/lateral" not in columns:
        raise DataError([f"{path}, line {line}: no 'Frontal/Lateral' column, which data.frontal_only needs"],
                        "bad CheXpert file")
    at = columns.index("frontal/lateral")
    return [table[0], *((n, cells) for n, cells in body
                        if len(cells) <= at or cells[at].strip().lower() == "frontal")]


def chexpert_relpath(path: str) -> str:
    """A ``Path`` cell relative to the CheXpert folder (its first part, the archive's folder name, dropped)."""
    parts = PurePosixPath(path.strip().replace("\\", "/")).parts
    return str(PurePosixPath(*parts[1:])) if len(parts) > 1 and parts[0].lower().startswith("chexpert-v1.0") else \
        str(PurePosixPath(*parts))


class CheXpertDataModule(ChestXrayDataModule, dataset="CheXpert"):
    """Stanford CheXpert (v1.0 or v1.0-small), from its ``train.csv`` and ``valid.csv``::

        <root>/train.csv, <root>/valid.csv    (root: CheXpert-v1.0-small/ itself, or the folder holding it)
        <root>/train/patient00001/study1/view1_frontal.jpg, <root>/valid/...

    Columns ``Path`` (``CheXpert-v1.0-small/train/patientNNNNN/...``), Sex, Age, ``Frontal/Lateral``,
    AP/PA and the 14 observations, each ``1.0`` (positive), ``0.0`` (negative), ``-1.0`` (uncertain)
    or blank (not mentioned: read as negative).

    Args:
        findings: the observation columns to learn, in label order (default: the 5 competition
            findings, Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion).
        uncertain: what ``-1.0`` means: ``ones`` (positive, U-Ones), ``zeros`` (negative, U-Zeros)
            or ``ignore`` (default, U-Ignore: the finding is left out of the loss and the metrics
            of that image: ``batch["label"]`` holds -1 there).
        frontal_only: keep only the frontal views (``Frontal/Lateral`` is ``Frontal``).
        val_fraction, split_seed: the patient-wise validation split carved from ``train.csv``
            (patient id from ``patientNNNNN`` in the path); ``valid.csv`` is the test split.
    """

    def __init__(self, root: str, findings: list[str] | None = None, uncertain: UncertainPolicy = "ignore",
                 frontal_only: bool = False, val_fraction: float = 0.1, split_seed: int = 1, **kwargs):
        super().__init__(root=root, val_fraction=val_fraction, split_seed=split_seed, **kwargs)
        check_policy(uncertain)
        names = check_findings(findings) or list(CHEXPERT_COMPETITION)
        known = {name.lower(): name for name in CHEXPERT_OBSERVATIONS}
        unknown = [name for name in names if name.lower() not in known]
        if unknown:
            raise ValueError(f"data.findings: {unknown} are not CheXpert observations; choose from "
                             f"{list(CHEXPERT_OBSERVATIONS)}")
        self.findings = [known[name.lower()] for name in names]
        self.uncertain = uncertain
        self.frontal_only = frontal_only
        self.folder = chexpert_folder(self.root)

    @property
    def all_classnames(self) -> list[str]:
        return list(self.findings)

    @property
    def image_dir(self) -> Path:
        return self.folder

    def read_table(self, name: str) -> tuple[list[MultiLabelItem], dict[str, str]]:
        """The items of ``train.csv`` or ``valid.csv`` and each one's patient id."""
        path = self.folder / name
        table = read_csv_table(path, f"CheXpert's {name}")
        if self.frontal_only:
            table = frontal_rows(path, table)
        rows, _ = read_finding_columns(path, table, self.findings, self.uncertain, blank=0, format_hint=None)
        patient, problems = {}, []
        for row in rows:
            match = re.search(r"patient\d+", row.path)
            if match is None:
                problems.append(f"{path}, line {row.line}: no patient id (patientNNNNN) in the path {row.path!r}")
            patient[chexpert_relpath(row.path)] = match.group(0) if match else ""
        if problems:
            raise DataError(problems, f"bad CheXpert file {path}")
        relpaths = [row._replace(path=chexpert_relpath(row.path)) for row in rows]
        return multilabel_items(relpaths, self.findings), patient

    def read_split(self) -> dict[str, list[MultiLabelItem]]:
        train_val, patient = self.read_table("train.csv")
        self.split_source = f"CheXpert split ({self.folder}/train.csv, valid.csv)"
        test, _ = self.read_table("valid.csv")
        train, val = self.carve_validation(train_val, patient)
        return {"train": train, "val": val, "test": test}


__all__ = ["CHESTXRAY14_LABELS", "CHEXPERT_COMPETITION", "CHEXPERT_OBSERVATIONS", "CheXpertDataModule",
           "ChestXray14DataModule", "ChestXrayDataModule", "chexpert_folder", "image_index", "read_data_entry"]
