"""The DataModule base: splits, few-shot selection, base/novel subsets, loaders.

A subclass only says where its items come from (`read_split`) and what its classes are
(`all_classnames`); everything else lives here. A datamodule knows nothing about the model: the
trainer hands it the backbone's transforms (`use_transforms`) before the loaders are built, and
until then the reference BiomedCLIP transforms (224 px, CLIP mean/std) are used.
"""
from __future__ import annotations

import json
import math
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from dpt_lightning.data.images import check_image, load_rgb

SPLITS = ("train", "val", "test")
Subsample = Literal["all", "base", "new"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Item(NamedTuple):
    """One image of a split: path relative to the image folder, label, class name."""

    relpath: str
    label: int
    classname: str


class DataError(ValueError):
    """Problems with the user's data, every problem listed, each naming its file."""

    def __init__(self, problems: list[str], context: str = "data problems"):
        self.problems = list(problems)
        shown = "\n  - ".join(self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{context} ({len(self.problems)}):\n  - {shown}{more}")


def reference_transforms(image_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> tuple[Callable, Callable]:
    """The reference (Dassl) train and test transforms for BiomedCLIP."""
    bicubic = T.InterpolationMode.BICUBIC
    normalize = T.Normalize(mean, std)
    train = T.Compose([T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=bicubic),
                       T.ToTensor(), normalize])
    test = T.Compose([T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size),
                      T.ToTensor(), normalize])
    return train, test


def sample_few_shot(items: list[Item], num_shots: int, rng: random.Random) -> list[Item]:
    """The original (Dassl) per-class selection: groups in label first-appearance order,
    ``rng.sample(group, K)`` when the group has at least K items, else the whole group."""
    if num_shots < 0:
        return list(items)
    groups: dict[int, list[Item]] = {}
    for item in items:
        groups.setdefault(item.label, []).append(item)
    selected: list[Item] = []
    for group in groups.values():  # dicts keep first-appearance order
        selected.extend(rng.sample(group, num_shots) if len(group) >= num_shots else group)
    return selected


def classwise_split(groups: dict[int, list[Item]], rng: random.Random, p_train: float = 0.5,
                    p_val: float = 0.2) -> dict[str, list[Item]]:
    """Split each class's items (shuffled by ``rng``) into train/val/test fractions, as the
    original fallback does (rounded counts, the rest to test), classes in the order given."""
    split: dict[str, list[Item]] = {name: [] for name in SPLITS}
    for items in groups.values():
        items = list(items)
        rng.shuffle(items)
        n_train, n_val = round(len(items) * p_train), round(len(items) * p_val)
        split["train"] += items[:n_train]
        split["val"] += items[n_train:n_train + n_val]
        split["test"] += items[n_train + n_val:]
    return split


def base_novel_labels(num_classes: int, subsample: str) -> list[int]:
    """Labels of the base (first ceil(n/2)) or novel (the rest) classes; all labels for 'all'."""
    labels = list(range(num_classes))
    cut = math.ceil(num_classes / 2)
    return {"all": labels, "base": labels[:cut], "new": labels[cut:]}[subsample]


class ImageListDataset(Dataset):
    """Images of a list of items, returned as dicts with ``image``, ``label`` and ``path``."""

    def __init__(self, image_dir: Path, items: list[Item], transform: Callable):
        self.image_dir = Path(image_dir)
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        path = self.image_dir / item.relpath
        return {"image": self.transform(load_rgb(path)), "label": item.label, "path": str(path)}


class MedicalDataModule(LightningDataModule):
    """Base of every dataset: few-shot selection, base/novel subsets, checks and loaders.

    Args:
        root: folder that holds the data (its meaning is the subclass's).
        num_shots: images per class for training (``-1``: all); validation takes ``min(K, 4)``.
        seed: seed of the few-shot selection (an isolated random stream, as the original code).
        subsample: ``all`` classes, or the ``base`` / ``new`` half of the base-to-novel protocol.
        split_file: a split file to use instead of the dataset's own; to rerun exactly the images of
            an exported selection (`fewshot_split()`), pass it with ``num_shots: -1``.
        batch_size, test_batch_size, num_workers: loader settings (reference: 32/4 and 100).
        check_images: ``full`` decodes every image in ``setup`` (problems are reported before
            training, all at once), ``header`` only opens them, ``none`` only checks existence.
    """

    #: Dataset identity (benchmark subclasses set these; user data leaves them None).
    dataset_name: str | None = None
    template: str = "a photo of a {}."

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
    ):
        super().__init__()
        if num_shots == 0 or num_shots < -1:
            raise ValueError(f"data.num_shots must be a positive number of images per class or -1 (all), "
                             f"got {num_shots}")
        if subsample not in ("all", "base", "new"):
            raise ValueError(f"data.subsample must be 'all', 'base' or 'new', got {subsample!r}")
        for name, value in (("batch_size", batch_size), ("test_batch_size", test_batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be at least 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be 0 or more, got {num_workers}")
        self.save_hyperparameters()
        self.root = Path(root).expanduser() if root is not None else None
        self.num_shots = num_shots
        self.seed = seed
        self.subsample = subsample
        self.split_file = Path(split_file).expanduser() if split_file else None
        self.batch_size = batch_size
        self.test_batch_size = test_batch_size
        self.num_workers = num_workers
        self.check_images = check_images
        self.train_transform, self.test_transform = reference_transforms()
        self.splits: dict[str, list[Item]] | None = None

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

    def use_transforms(self, train: Callable, test: Callable) -> None:
        """Called by the trainer with the backbone's transforms before loaders are built."""
        self.train_transform, self.test_transform = train, test

    # ---------------------------------------------------------------- set-up
    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        split = read_split_file(self.split_file) if self.split_file else self.read_split()
        self.check_items(split)
        rng = random.Random(self.seed)  # isolated: nothing else the program does can shift it
        selected = {
            "train": sample_few_shot(split["train"], self.num_shots, rng),
            "val": sample_few_shot(split["val"], min(self.num_shots, 4) if self.num_shots > 0 else -1, rng),
            "test": list(split["test"]),
        }
        self.selection = selected
        self.splits = {name: self._subsample(items) for name, items in selected.items()}

    def _subsample(self, items: list[Item]) -> list[Item]:
        kept = self.kept_labels
        remap = {old: new for new, old in enumerate(kept)}
        return [Item(i.relpath, remap[i.label], i.classname) for i in items if i.label in remap]

    def check_items(self, split: dict[str, list[Item]]) -> None:
        """Every problem of the split at once: labels, class names, paths, unreadable images."""
        names = self.all_classnames
        problems = []
        root = self.image_dir.resolve()
        paths = {}
        for name in SPLITS:
            for item in split.get(name, []):
                if not (0 <= item.label < len(names)):
                    problems.append(f"{item.relpath} ({name}): label {item.label} is outside 0..{len(names) - 1}")
                elif item.classname.lower() != names[item.label].lower():
                    problems.append(f"{item.relpath} ({name}): class name {item.classname!r} does not match "
                                    f"label {item.label} ({names[item.label]!r})")
                path = (root / item.relpath).resolve()
                if root not in path.parents:
                    problems.append(f"{item.relpath} ({name}): path leaves the image folder {root}")
                    continue
                paths[path] = item
        if self.check_images != "none":
            decode = self.check_images == "full"
            with ThreadPoolExecutor(max_workers=8) as pool:
                found = pool.map(lambda p: check_image(p, decode=decode), list(paths))
                problems.extend(p for p in found if p)
        else:
            problems.extend(f"{p}: file not found" for p in paths if not p.is_file())
        if problems:
            raise DataError(problems, f"{type(self).__name__} at {self.root}: problems in the data")

    # --------------------------------------------------------------- exports
    def fewshot_split(self) -> dict[str, list[list]]:
        """The selection this run uses, in the split-file format (original labels and names)."""
        if self.splits is None:
            raise RuntimeError("call setup() before fewshot_split()")
        return {name: [list(i) for i in items] for name, items in self.selection.items()}

    def save_fewshot_split(self, path: str | Path) -> Path:
        """Write `fewshot_split()` as JSON; never replaces an existing file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x") as f:
            json.dump(self.fewshot_split(), f, indent=1)
        return path

    # --------------------------------------------------------------- loaders
    def _dataset(self, split: str, transform: Callable) -> ImageListDataset:
        if self.splits is None:
            self.setup()
        return ImageListDataset(self.image_dir, self.splits[split], transform)

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self._dataset(split, self.train_transform if train else self.test_transform)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.test_batch_size,
            shuffle=train,
            drop_last=train and len(dataset) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


def read_split_file(path: str | Path) -> dict[str, list[Item]]:
    """Read a split file ``{"train"|"val"|"test": [[relpath, label, classname], ...]}``.

    Structural problems (missing splits, wrong types, duplicates) are all reported at once.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"split file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError([f"{path}: not valid JSON ({err})"], "unreadable split file") from None
    problems = []
    if not isinstance(raw, dict):
        raise DataError([f"{path}: expected an object with 'train', 'val', 'test'"], "bad split file")
    split: dict[str, list[Item]] = {}
    for name in SPLITS:
        entries = raw.get(name)
        if not isinstance(entries, list):
            problems.append(f"{path}: '{name}' is missing or not a list")
            continue
        items, seen = [], set()
        for k, entry in enumerate(entries):
            where = f"{path}: {name}[{k}]"
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
                problems.append(f"{where}: expected [relpath, label, classname], got {entry!r:.80}")
                continue
            relpath, label, classname = entry
            if not isinstance(relpath, str) or not relpath:
                problems.append(f"{where}: relpath must be a non-empty string, got {relpath!r:.80}")
            elif not isinstance(label, int) or isinstance(label, bool):
                problems.append(f"{where}: label must be an integer, got {label!r:.80}")
            elif not isinstance(classname, str):
                problems.append(f"{where}: class name must be a string, got {classname!r:.80}")
            elif relpath in seen:
                problems.append(f"{where}: duplicate entry {relpath!r}")
            else:
                seen.add(relpath)
                items.append(Item(relpath, label, classname))
        split[name] = items
    if problems:
        raise DataError(problems, f"bad split file {path}")
    return split
