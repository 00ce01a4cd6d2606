"""The 11 biomedical benchmark datasets (BiomedCoOp benchmark, as used by Biomed-DPT).

Each dataset is read from the layout the benchmark ships, under one folder ``root``::

    <root>/<DIR>/<DIR>/<class_folder>/<image>    # images
    <root>/<DIR>/split_<DIR>.json                 # {"train"|"val"|"test": [[relpath, label, classname], ...]}

so that a user who already has the data gets exactly the images, labels and few-shot subsets of
the original code. The facts of each dataset (folder name, class names in label order, modality,
organ, clinical template) come from `dpt_lightning.data.facts`; a datamodule here only names its
dataset. The few-shot selection, base/novel subsets, checks and loaders are `MedicalDataModule`'s.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dpt_lightning.data.checks import coverage_problems
from dpt_lightning.data.datamodule import MedicalDataModule
from dpt_lightning.data.errors import DataError
from dpt_lightning.data.facts import DatasetFacts, dataset_facts
from dpt_lightning.data.images import list_images
from dpt_lightning.data.splits import SPLITS, Item, read_split_file, write_split_file


class BenchmarkDataModule(MedicalDataModule):
    """Base of the benchmark datasets: reads ``<root>/<DIR>/split_<DIR>.json`` and the images of
    ``<root>/<DIR>/<DIR>``.

    A subclass names its dataset once, ``class BTMRIDataModule(BenchmarkDataModule, dataset="BTMRI")``;
    ``dataset_name`` (the DIR) and ``template`` (the clinical template) follow from the facts.

    Args:
        root: the folder that holds ``<DIR>/`` (not ``<DIR>/`` itself).
        split_seed: seed of the fallback split, made only when the split file is missing:
            each class folder (``normal_brain`` for "normal brain") shuffled and cut 50/20/30
            as the original code does. A fixed seed, apart from ``seed``, so that every
            few-shot seed sees the same train/val/test.
        save_split: write that fallback split to ``<root>/<DIR>/split_<DIR>.json`` so that later
            runs (and other tools) read it; an existing file is never replaced.
        **kwargs: the `MedicalDataModule` settings (``num_shots``, ``seed``, ``subsample``,
            ``split_file``, ``batch_size``, ``test_batch_size``, ``num_workers``, ``check_images``).
    """

    facts: ClassVar[DatasetFacts]

    def __init_subclass__(cls, dataset: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if dataset is not None:
            cls.facts = dataset_facts(dataset)
            cls.dataset_name = cls.facts.name
            cls.template = cls.facts.template

    def __init__(self, root: str, split_seed: int = 1, save_split: bool = False, **kwargs):
        if not hasattr(type(self), "facts"):
            raise TypeError(f"{type(self).__name__} names no dataset: subclass BenchmarkDataModule with "
                            "dataset=<DIR>, e.g. class MyData(BenchmarkDataModule, dataset='BTMRI')")
        if not root:
            raise ValueError(f"{type(self).__name__} needs data.root: the folder that holds {self.facts.name}/")
        super().__init__(root=root, **kwargs)
        self.split_seed = split_seed
        self.save_split = save_split

    # ---------------------------------------------------------------- facts
    @property
    def all_classnames(self) -> list[str]:
        return list(self.facts.classnames)

    @property
    def modality(self) -> str:
        return self.facts.modality

    @property
    def organ(self) -> str:
        return self.facts.organ

    @property
    def dataset_dir(self) -> Path:
        """``<root>/<DIR>``: holds the split file and the image folder."""
        return self.root / self.facts.name

    @property
    def image_dir(self) -> Path:
        return self.dataset_dir / self.facts.name

    @property
    def split_path(self) -> Path:
        return self.dataset_dir / f"split_{self.facts.name}.json"

    # ------------------------------------------------------------- reading
    def read_split(self) -> dict[str, list[Item]]:
        """The dataset's split file, or, when it is missing, the fallback split of the class folders:
        each folder's images (sorted by name; the original takes the file system's order, which
        differs between machines) shuffled with ``split_seed`` and cut 50/20/30 (`make_split`)."""
        self._check_layout()
        if self.split_path.is_file():
            self.split_source = str(self.split_path)
            return read_split_file(self.split_path)
        self.split_source = f"fallback split of {self.image_dir} (split_seed={self.split_seed})"
        folders = self.class_folders()
        groups = {label: [Item(f"{folder}/{name}", label, classname) for name in list_images(self.image_dir / folder)]
                  for label, (folder, classname) in enumerate(folders)}
        split = self.make_split(groups, {label: str(self.image_dir / folder) for label, (folder, _) in
                                         enumerate(folders)}, self.split_seed)
        if self.save_split:
            self._save_fallback_split(split)
        else:
            rank_zero_warn(f"{self.facts.name}: {self.split_path} not found; using a class-wise 50/20/30 split "
                           f"with split_seed={self.split_seed}. Pass --data.save_split true to keep it there.")
        return split

    def _save_fallback_split(self, split: dict[str, list[Item]]) -> None:
        """Write the fallback split as the dataset's split file, which every later run reads: only
        if every class has an image in train, val and test; an existing file is never replaced."""
        labels = range(len(self.all_classnames))
        if coverage_problems(split, self.all_classnames, labels, SPLITS, self.split_source)[0]:
            rank_zero_warn(f"{self.facts.name}: the fallback split leaves a class without train, val or test "
                           f"images; not written to {self.split_path}")
            return
        try:
            write_split_file(split, self.split_path)
            rank_zero_info(f"{self.facts.name}: no split file; wrote the fallback split to {self.split_path}")
        except FileExistsError:  # written meanwhile (another process): never replaced
            pass
        except OSError as err:
            rank_zero_warn(f"{self.facts.name}: could not write the fallback split to {self.split_path} "
                           f"({err}); this run uses it anyway")

    def class_folders(self) -> list[tuple[str, str]]:
        """(folder, class name) in label order. The benchmark names each class folder after its
        class with ``_`` for spaces (``normal_brain``); the match ignores case."""
        found = {p.name.lower(): p.name for p in self.image_dir.iterdir() if p.is_dir()}
        wanted = [name.replace(" ", "_") for name in self.all_classnames]
        missing = [self.image_dir / w for w in wanted if w.lower() not in found]
        if missing:
            raise DataError([f"{path}: class folder not found" for path in missing] +
                            [f"folders found in {self.image_dir}: {sorted(found.values())}"],
                            f"{self.facts.name}: no split file at {self.split_path} and the class folders "
                            "needed to make one are missing")
        return [(found[w.lower()], name) for w, name in zip(wanted, self.all_classnames)]

    def _check_layout(self) -> None:
        """A clear error, with the likely fix, when ``root`` does not hold the benchmark layout."""
        name = self.facts.name
        if self.image_dir.is_dir():
            return
        layout = f"<root>/{name}/{name}/<class folder>/<image> and <root>/{name}/split_{name}.json"
        hint = ""
        if self.root.name.lower() == name.lower() or (self.root / f"split_{name}.json").is_file():
            hint = f" data.root looks like the {name} folder itself: pass its parent, {self.root.parent}."
        raise FileNotFoundError(f"{type(self).__name__}: image folder {self.image_dir} not found; data.root "
                                f"({self.root}) must hold the benchmark layout {layout}.{hint}")


class BTMRIDataModule(BenchmarkDataModule, dataset="BTMRI"):
    """Brain tumour MRI (BTMRI), jpg images."""


class BUSIDataModule(BenchmarkDataModule, dataset="BUSI"):
    """Breast ultrasound (BUSI), png images. Its novel set is the single class "normal scan"."""


class CHMNISTDataModule(BenchmarkDataModule, dataset="CHMNIST"):
    """Colorectal histopathology (CHMNIST, Kather 2016), tif images."""


class COVID19DataModule(BenchmarkDataModule, dataset="COVID_19"):
    """Chest X-ray (COVID-QU-Ex, folder COVID_19), png images."""


class CTKidneyDataModule(BenchmarkDataModule, dataset="CTKidney"):
    """Kidney CT (CTKidney), jpg images."""


class DermaMNISTDataModule(BenchmarkDataModule, dataset="DermaMNIST"):
    """Dermatoscopy (DermaMNIST / HAM10000), png images."""


class KneeXrayDataModule(BenchmarkDataModule, dataset="KneeXray"):
    """Knee X-ray osteoarthritis grades (KneeXray), png images."""


class KvasirDataModule(BenchmarkDataModule, dataset="Kvasir"):
    """Colon endoscopy (Kvasir), jpg images."""


class LungColonDataModule(BenchmarkDataModule, dataset="LungColon"):
    """Lung and colon histopathology (LC25000, folder LungColon), jpeg images."""


class OCTMNISTDataModule(BenchmarkDataModule, dataset="OCTMNIST"):
    """Retinal OCT (OCTMNIST), png images."""


class RETINADataModule(BenchmarkDataModule, dataset="RETINA"):
    """Fundus photographs (RETINA), mixed jpg/png/jpeg images."""


BENCHMARK_DATAMODULES: dict[str, type[BenchmarkDataModule]] = {
    cls.dataset_name: cls for cls in BenchmarkDataModule.__subclasses__() if hasattr(cls, "facts")
}


def benchmark_datamodule(name: str) -> type[BenchmarkDataModule]:
    """The datamodule class of a benchmark dataset by its folder name (case-insensitive)."""
    return BENCHMARK_DATAMODULES[dataset_facts(name).name]
