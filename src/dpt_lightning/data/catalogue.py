"""Where each benchmark dataset comes from, and what a complete copy holds: the catalogue that
``dpt-data`` lists, downloads, prepares and checks against.

Two kinds of source:

* `HubArchive`: one zip in a Hugging Face repository that unpacks into the benchmark layout (the
  11 datasets of the BiomedCoOp benchmark, `BENCHMARK_REPO`, one ``<DIR>.zip`` each). ``dpt-data
  download`` fetches it; ``dpt-data prepare --archive`` unpacks a copy the user got another way.
* no archive, a ``preparer``: a dataset whose licence or account terms forbid redistribution
  (ChestX-ray14, CheXpert). The user downloads its archives from the owner; ``dpt-data prepare``
  runs the entry's preparer, a function ``(archives, folder)`` that writes the benchmark layout of
  the dataset into ``folder`` from them. Adding such a dataset is one `CatalogueEntry` with its
  ``access`` text and preparer.

``counts`` are the train/val/test sizes of the published split file: what ``dpt-data check``
compares a copy with. They were read from the benchmark's split files (which the reference
README's table repeats, except DermaMNIST, see its ``counts_note``). The licence notes summarise
the original collections' terms as far as they were recorded; the source page is authoritative.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dpt_lightning.data.facts import BENCHMARK_DATASETS, DatasetFacts

#: The Hugging Face dataset repository of the benchmark's archives (the reference README's "Datasets").
BENCHMARK_REPO = "TahaKoleilat/BiomedCoOp"

#: ``preparer(archives, folder)``: write ``folder/<DIR>/<class>/<image>`` and ``folder/split_<DIR>.json``
#: from the user's own downloaded archives.
Preparer = Callable[[Sequence[Path], Path], None]


@dataclass(frozen=True)
class HubArchive:
    """A zip in a Hugging Face repository that unpacks into a dataset's layout."""

    repo: str
    filename: str
    repo_type: str = "dataset"
    revision: str = "main"

    @property
    def page(self) -> str:
        """The archive's address on the public hub, for a download by hand."""
        kind = "datasets/" if self.repo_type == "dataset" else ""
        return f"https://huggingface.co/{kind}{self.repo}/resolve/{self.revision}/{self.filename}"


@dataclass(frozen=True)
class CatalogueEntry:
    name: str  #: the benchmark's folder name (DIR)
    origin: str  #: the original collection the images come from
    origin_url: str
    licence: str  #: a summary of the original collection's terms (the source page is authoritative)
    counts: tuple[int, int, int] | None  #: train/val/test of the published split file
    counts_note: str = ""
    archive: HubArchive | None = None  #: None: the user's own archives, through ``preparer``
    preparer: Preparer | None = None
    access: str = ""  #: how to obtain the archives when they cannot be downloaded for the user

    @property
    def facts(self) -> DatasetFacts:
        return BENCHMARK_DATASETS[self.name]

    @property
    def images(self) -> int | None:
        return sum(self.counts) if self.counts else None

    @property
    def downloadable(self) -> bool:
        return self.archive is not None

    def fetch_command(self, root: str | Path, replace: bool = False) -> str:
        """The command that (re)creates this dataset under ``root``."""
        again = " --replace" if replace else ""
        if self.downloadable:
            return f"dpt-data download {self.name} --root {root}{again}"
        return f"dpt-data prepare {self.name} --root {root} --archive <your downloaded archives>{again}"


def _benchmark(name: str, origin: str, url: str, licence: str, counts: tuple[int, int, int] | None,
               counts_note: str = "") -> CatalogueEntry:
    return CatalogueEntry(name, origin, url, licence, counts, counts_note, HubArchive(BENCHMARK_REPO, f"{name}.zip"))


_UNRECORDED = "not recorded here: see the source page"
CATALOGUE: dict[str, CatalogueEntry] = {entry.name: entry for entry in [
    _benchmark("BTMRI", "Brain Tumor MRI Dataset (M. Nickparvar, Kaggle)",
               "https://www.kaggle.com/datasets/masoudnickparvar/brain-tumor-mri-dataset", _UNRECORDED,
               (2854, 1141, 1717)),
    _benchmark("BUSI", "Breast Ultrasound Images (Al-Dhabyani et al. 2020)",
               "https://www.kaggle.com/datasets/aryashah2k/breast-ultrasound-images-dataset", _UNRECORDED,
               (389, 155, 236)),
    _benchmark("CHMNIST", "Colorectal histology (Kather et al. 2016)",
               "https://www.kaggle.com/datasets/kmader/colorectal-histology-mnist",
               "CC BY 4.0 (Kather et al. 2016, Zenodo)", (2496, 1000, 1504)),
    _benchmark("COVID_19", "COVID-QU-Ex / COVID-19 Radiography Database (Kaggle)",
               "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database", _UNRECORDED,
               (10582, 4232, 6351)),
    _benchmark("CTKidney", "CT Kidney Dataset: Normal-Cyst-Tumor and Stone (Kaggle)",
               "https://www.kaggle.com/datasets/nazmul0087/ct-kidney-dataset-normal-cyst-tumor-and-stone",
               _UNRECORDED, (6221, 2487, 3738)),
    _benchmark("DermaMNIST", "DermaMNIST (MedMNIST v2, from HAM10000)", "https://medmnist.com/",
               "CC BY-NC 4.0 (MedMNIST's DermaMNIST): non-commercial use", (7006, 1003, 2005),
               "the reference README says 7007 training images; its split file holds 7006"),
    _benchmark("KneeXray", "Knee Osteoarthritis Dataset with Severity Grading (Kaggle)",
               "https://www.kaggle.com/datasets/shashwatwork/knee-osteoarthritis-dataset-with-severity",
               _UNRECORDED, (5778, 826, 1656)),
    _benchmark("Kvasir", "Kvasir v2 (Pogorelov et al. 2017)",
               "https://www.kaggle.com/datasets/abdallahwagih/kvasir-dataset-for-classification-and-segmentation",
               "research and education use; cite Pogorelov et al. 2017", (2000, 800, 1200)),
    _benchmark("LungColon", "LC25000 (Borkowski et al. 2019)",
               "https://www.kaggle.com/datasets/andrewmvd/lung-and-colon-cancer-histopathological-images",
               _UNRECORDED, (12500, 5000, 7500)),
    _benchmark("OCTMNIST", "OCTMNIST (MedMNIST v2, from Kermany et al. 2018)", "https://medmnist.com/",
               "CC BY 4.0 (MedMNIST's OCTMNIST)", (97477, 10832, 1000),
               "from the reference README's table; no split file was at hand to confirm them"),
    _benchmark("RETINA", "Eye Diseases Classification (Kaggle)",
               "https://www.kaggle.com/datasets/gunavenkatdoddi/eye-diseases-classification", _UNRECORDED,
               (2108, 841, 1268)),
]}


def catalogue_entry(name: str) -> CatalogueEntry:
    """The entry of a dataset by its folder name (case-insensitive); a `KeyError` naming the known ones."""
    for entry in CATALOGUE.values():
        if entry.name.lower() == name.lower():
            return entry
    raise KeyError(f"unknown dataset {name!r}; known: {', '.join(CATALOGUE)} (dpt-data list)")


def catalogue_entries(names: Sequence[str]) -> list[CatalogueEntry]:
    """The entries of ``names`` in order, ``all`` meaning every dataset; duplicates dropped."""
    if any(name.lower() == "all" for name in names):
        return list(CATALOGUE.values())
    entries = []
    for name in names:
        entry = catalogue_entry(name)
        if entry not in entries:
            entries.append(entry)
    return entries
