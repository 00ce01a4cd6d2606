"""`MedicalDataModule`: the base of every DataModule (few-shot selection, base/novel subsets,
checks, loaders).

A subclass only says where its items come from (`read_split`) and what its classes are
(`all_classnames`); everything else lives here. A multi-label dataset (several findings per image)
says ``task = "multilabel"`` and gives `MultiLabelItem` s; the rest follows from ``task``. A
datamodule knows nothing about the model: the trainer's model hands it the backbone's transforms
(`use_transforms`) and its reference loader's last-batch rule (`use_batch_rule`) before the loaders
are built; until then the reference BiomedCLIP transforms (224 px, CLIP mean/std) and Dassl's rule
are used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from dpt_lightning.data import checks
from dpt_lightning.data.dataset import EpochShuffleSampler, ImageListDataset
from dpt_lightning.data.dicom import DicomWindow, check_dicom_window
from dpt_lightning.data.errors import DataError
from dpt_lightning.data.splits import (AnyItem, Item, MultiLabelItem, Subsample, Task, base_novel_labels, build_split,
                                       read_split_file, sample_few_shot, sample_few_shot_multilabel, select_few_shot,
                                       split_entries, split_task, write_split_file)
from dpt_lightning.recipe import reference_transforms


class MedicalDataModule(LightningDataModule):
    """Base of every dataset: few-shot selection, base/novel subsets, checks and loaders.

    Args:
        root: folder that holds the data (its meaning is the subclass's).
        num_shots: images per class for training (``-1``: all); validation takes ``min(K, 4)``.
        seed: the run's seed: the training views' augmentation and order (and, through the CLI,
            ``seed_everything``), and the few-shot selection unless ``selection_seed`` is given.
        selection_seed: seed of the few-shot selection alone (an isolated random stream, as the
            original code); ``None`` = ``seed``. The BiomedCoOp code's adapter baselines select with
            seed 1 whatever their training seed (``selection_seed: 1``).
        subsample: ``all`` classes, or the ``base`` / ``new`` half of the base-to-novel protocol.
        split_file: a split file to use instead of the dataset's own; to rerun exactly the images of
            an exported selection (`fewshot_split()`), pass it with ``num_shots: -1``.
        batch_size, test_batch_size, num_workers: loader settings (reference: 32/4 and 100).
        check_images: ``full`` decodes every image the run uses in ``setup`` (problems are
            reported before training, all at once), ``header`` only opens them, ``none`` skips
            both; every file the split lists must exist in any case.
        dicom_window: how DICOM files are windowed (`dicom.DicomWindow`): ``0`` (the file's first
            window or VOI LUT), another index, ``[center, width]`` for every file, or ``minmax``.

    ``setup(stage)`` reports every problem of the data at once, in one `DataError`, before any
    training: the split's own problems (`checks.find_problems`), and the class rule for the
    stage: every class used needs at least one image in every split the stage uses
    (`checks.needed_splits`: ``fit`` train and test, and val when validation runs; ``validate``
    val; ``test`` test; ``predict`` only a non-empty test split). ``fit`` also needs two classes
    or more; one class may be tested and predicted.

    Multi-label data (``task == "multilabel"``): items are `MultiLabelItem` s, ``batch["label"]``
    is a float (C,) vector (1 finding present, 0 absent, -1 unknown: `dataset.multi_hot`), the
    few-shot rule is `splits.sample_few_shot_multilabel`, and the class rule asks every finding
    for a positive image in each split the stage uses (`checks.finding_coverage_problems`); one
    finding may be trained. ``subsample`` base/new keeps every image and only the base/new findings.
    """

    #: ``multiclass`` (one label per image) or ``multilabel`` (a set of findings per image).
    task: Task = "multiclass"

    #: Dataset identity (benchmark subclasses set these; user data leaves them None).
    dataset_name: str | None = None
    template: str = "a photo of a {}."
    #: Where the split came from, for error messages (``read_split`` may set it).
    split_source: str | None = None
    #: When the split was made by `make_split`: label -> where that class's images are, and how
    #: the split was made (for the class rule's messages); None for a given split.
    split_built_from: dict[int, str] | None = None
    split_built_how: str = ""

    def __init__(
        self,
        root: str | None = None,
        num_shots: int = -1,
        seed: int = 1,
        subsample: Subsample = "all",
        split_file: str | None = None,
        batch_size: int = 32,
        test_batch_size: int = 100,
        num_workers: int = 2,
        check_images: Literal["full", "header", "none"] = "full",
        dicom_window: DicomWindow = 0,
        selection_seed: int | None = None,
    ):
        super().__init__()
        if num_shots == 0 or num_shots < -1:
            raise ValueError(f"data.num_shots must be a positive number of images per class or -1 (all), "
                             f"got {num_shots}")
        if not 0 <= seed < 2**32:
            raise ValueError(f"data.seed {seed} is not a seed: give a number from 0 to {2**32 - 1}")
        if subsample not in ("all", "base", "new"):
            raise ValueError(f"data.subsample must be 'all', 'base' or 'new', got {subsample!r}")
        for name, value in (("batch_size", batch_size), ("test_batch_size", test_batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be at least 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be 0 or more, got {num_workers}")
        selection_seed = seed if selection_seed is None else selection_seed  # the hyper-parameters record it
        self.save_hyperparameters()
        self.selection_seed = selection_seed
        self.root = Path(root).expanduser() if root is not None else None
        self.num_shots = num_shots
        self.seed = seed
        self.subsample = subsample
        self.split_file = Path(split_file).expanduser() if split_file else None
        self.batch_size = batch_size
        self.test_batch_size = test_batch_size
        self.num_workers = num_workers
        self.check_images = check_images
        self.dicom_window = check_dicom_window(dicom_window)
        self.train_transform, self.test_transform = reference_transforms()
        self.drop_last_batch = True  #: Dassl's rule until the model says otherwise (`use_batch_rule`)
        self.full_split: dict[str, list[Item]] | None = None  #: the split as read, before selection
        self.selection: dict[str, list[Item]] | None = None  #: few-shot selection, all classes
        self.splits: dict[str, list[Item]] | None = None  #: what the loaders use (subset, remapped)

    # ----------------------------------------------------------- subclass API
    @property
    def all_classnames(self) -> list[str]:
        """Every class name of the dataset in label order."""
        raise NotImplementedError

    @property
    def image_dir(self) -> Path:
        """The folder the split's relative paths start from."""
        return self.root

    def read_split(self) -> dict[str, list[Item]]:
        """The full train/val/test split of the dataset (before few-shot selection)."""
        raise NotImplementedError

    def make_split(self, groups: dict[int, list[Item]], where: dict[int, str], split_seed: int) -> dict[str, list[Item]]:
        """The class-wise 50/20/30 split of ``groups`` (label -> items), made by THE split builder
        (`splits.build_split`) with ``split_seed``, for a subclass's `read_split`. ``where`` names
        each class's images (its folder, or the CSV rows of the class) for the class rule's errors."""
        self.split_built_from = dict(where)
        self.split_built_how = f"50/20/30 split with split_seed={split_seed}"
        return build_split(groups, split_seed)

    # ------------------------------------------------------------ public facts
    @property
    def kept_labels(self) -> list[int]:
        return base_novel_labels(len(self.all_classnames), self.subsample)

    @property
    def classnames(self) -> list[str]:
        """Class names the model sees, in (remapped) label order."""
        return [self.all_classnames[i] for i in self.kept_labels]

    @property
    def protocol(self) -> str:
        return "fewshot" if self.subsample == "all" else "base2novel"

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    def use_transforms(self, train: Callable, test: Callable) -> None:
        """Called by the trainer with the backbone's transforms before loaders are built."""
        self.train_transform, self.test_transform = train, test

    def use_batch_rule(self, drop_last: bool) -> None:
        """Called by the trainer's model before loaders are built: does the training loader drop an
        epoch's last partial batch (Dassl's rule, when there is a full batch at all) or keep it?"""
        self.drop_last_batch = drop_last

    # ---------------------------------------------------------------- set-up
    def setup(self, stage: str | None = None) -> None:
        """Read the split, select the few-shot subset (before the base/novel subsampling, as the
        original), keep the subset's classes, and check everything: all problems of the data are
        reported here at once, before any training starts. The split is read once; the class rule
        is checked again for each new stage. After an error nothing is set up."""
        first = self.splits is None
        if first:
            if self.split_file:
                split = read_split_file(self.split_file)
                self.split_source, self.split_built_from = str(self.split_file), None
                self._check_task(split)
            else:
                split = self.read_split()
            sample = sample_few_shot_multilabel if self.multilabel else sample_few_shot
            selection = select_few_shot(split, self.num_shots, self.selection_seed, sample)
            splits = {name: self._subsample(items) for name, items in selection.items()}
            problems = self.find_problems(split, used=[item for items in splits.values() for item in items])
        else:
            split, problems = self.full_split, []
        stage_problems, hint = self.stage_problems(split, stage)
        problems += stage_problems
        if problems:
            raise DataError(problems, f"{type(self).__name__}: problems in the data of {self.image_dir}", hint)
        if first:
            self.full_split, self.selection, self.splits = split, selection, splits

    def _check_task(self, split: dict[str, list[AnyItem]]) -> None:
        """A split file of the other kind (multi-label entries for single-label data, or the reverse)
        is an error naming the file."""
        kind = split_task(split)
        if kind is not None and kind != self.task:
            forms = {"multiclass": "single-label entries [relpath, label, classname]",
                     "multilabel": "multi-label entries [relpath, [labels], [findings]]"}
            raise DataError([f"{self.split_file}: holds {forms[kind]}, but {type(self).__name__} is "
                             f"{self.task} data, which needs {forms[self.task]}"], "split file of the wrong kind",
                            "Give a split file written for this kind of data (a fewshot_split.json of a run on it).")

    def _subsample(self, items: list[AnyItem]) -> list[AnyItem]:
        kept = self.kept_labels
        remap = {old: new for new, old in enumerate(kept)}
        if self.multilabel:  # every image stays; only the kept findings, renumbered
            return [MultiLabelItem(i.relpath, tuple(remap[l] for l in i.labels if l in remap),
                                   tuple(f for l, f in zip(i.labels, i.findings) if l in remap),
                                   tuple(remap[l] for l in i.ignored if l in remap)) for i in items]
        return [Item(i.relpath, remap[i.label], i.classname) for i in items if i.label in remap]

    def find_problems(self, split: dict[str, list[Item]], used: list[Item] | None = None) -> list[str]:
        """Every problem of ``split`` for any use (`checks.find_problems`), and of the images of
        ``used`` (default: all) that cannot be read. A subclass may add its own."""
        return checks.find_problems(split, self.all_classnames, self.image_dir, self.split_source or "split",
                                    used, self.check_images, self.dicom_window)

    def validation_runs(self) -> bool:
        """Will the trainer run validation? Not when ``trainer.limit_val_batches`` is 0 (the
        reference configs); assumed when there is no trainer."""
        trainer = self.trainer
        return trainer is None or getattr(trainer, "limit_val_batches", 1) != 0

    def stage_problems(self, split: dict[str, list[Item]], stage: str | None) -> tuple[list[str], str | None]:
        """The problems of ``split`` for ``stage`` (see the class docstring), and advice or None."""
        source = self.split_source or "split"
        needed = checks.needed_splits(stage, self.validation_runs())
        if self.multilabel:  # one finding is a yes/no question worth training; predict needs any image
            problems, hint = checks.finding_coverage_problems(split, self.all_classnames, self.kept_labels, needed,
                                                              source)
            if stage == "predict" and not split.get("test"):
                problems.append(f"{source}: the test split is empty; predict reads the test split")
            return problems, hint
        problems, hint = checks.coverage_problems(split, self.all_classnames, self.kept_labels, needed, source,
                                                  self.split_built_from, self.split_built_how)
        if stage == "fit" and (single := checks.single_class_problem(self.classnames, source)):
            problems.append(single)
        kept = set(self.kept_labels)
        if stage == "predict" and not any(item.label in kept for item in split.get("test", [])):
            problems.append(f"{source}: the test split has no images of the classes used; predict reads the "
                            "test split")
        return problems, hint

    # --------------------------------------------------------------- exports
    def fewshot_split(self, splits: tuple[str, ...] | None = None) -> dict[str, list[list]]:
        """The selection this run uses, in the split-file format (original labels and names; for
        multi-label data ``[relpath, [labels], [findings]]``, see `splits.read_split_file`);
        ``splits`` keeps only those splits (those the selection has)."""
        if self.splits is None:
            raise RuntimeError("call setup() before fewshot_split()")
        return split_entries(self.selection, [name for name in self.selection if splits is None or name in splits])

    def save_fewshot_split(self, path: str | Path) -> Path:
        """Write `fewshot_split()` as a split file; never replaces an existing file. Pass it back
        as ``split_file`` with ``num_shots: -1`` to rerun on exactly these images."""
        if self.splits is None:
            raise RuntimeError("call setup() before save_fewshot_split()")
        return write_split_file(self.selection, path)

    # --------------------------------------------------------------- loaders
    def _dataset(self, split: str, transform: Callable) -> ImageListDataset:
        if self.splits is None:
            self.setup()
        return ImageListDataset(self.image_dir, self.splits[split], transform, seed=self.seed,
                                num_labels=self.num_classes if self.multilabel else None,
                                dicom_window=self.dicom_window)

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self._dataset(split, self.train_transform if train else self.test_transform)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.test_batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if train else None,
            drop_last=train and self.drop_last_batch and len(dataset) >= self.batch_size,  # Dassl's rule by default
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
