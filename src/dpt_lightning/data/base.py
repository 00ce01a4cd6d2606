"""The DataModule base: splits, few-shot selection, base/novel subsets, loaders.

A subclass only says where its items come from (`read_split`) and what its classes are
(`all_classnames`); everything else lives here. A datamodule knows nothing about the model: the
trainer hands it the backbone's transforms (`use_transforms`) before the loaders are built, and
until then the reference BiomedCLIP transforms (224 px, CLIP mean/std) are used.
"""
from __future__ import annotations

import json
import math
import posixpath
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PureWindowsPath
from typing import Callable, Literal, NamedTuple

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from dpt_lightning.data.images import check_image, list_images, load_rgb

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


def select_few_shot(split: dict[str, list[Item]], num_shots: int, seed: int) -> dict[str, list[Item]]:
    """The original protocol's selection from a full split: ``num_shots`` per class for train,
    then ``min(num_shots, 4)`` per class for val from the same random stream, test whole.

    The stream is a private ``random.Random(seed)``: the same numbers the original draws after
    ``random.seed(seed)``, but nothing else the program does can shift them.
    """
    rng = random.Random(seed)
    train = sample_few_shot(split["train"], num_shots, rng)
    val = sample_few_shot(split["val"], min(num_shots, 4) if num_shots > 0 else -1, rng)
    return {"train": train, "val": val, "test": list(split["test"])}


def split_counts(n: int, p_train: float = 0.5, p_val: float = 0.2) -> tuple[int, int, int]:
    """Train/val/test sizes of one class of ``n`` items: rounded fractions, the rest to test."""
    n_train, n_val = round(n * p_train), round(n * p_val)
    return n_train, n_val, n - n_train - n_val


def classwise_split(groups: dict[int, list[Item]], rng: random.Random, p_train: float = 0.5,
                    p_val: float = 0.2) -> dict[str, list[Item]]:
    """Split each class's items (shuffled by ``rng``) into train/val/test fractions, as the
    original fallback does (rounded counts, the rest to test), classes in the order given."""
    split: dict[str, list[Item]] = {name: [] for name in SPLITS}
    for items in groups.values():
        items = list(items)
        rng.shuffle(items)
        n_train, n_val, _ = split_counts(len(items), p_train, p_val)
        split["train"] += items[:n_train]
        split["val"] += items[n_train:n_train + n_val]
        split["test"] += items[n_train + n_val:]
    return split


def split_class_folders(image_dir: Path, class_folders: list[tuple[str, str]], rng: random.Random,
                        p_train: float = 0.5, p_val: float = 0.2) -> dict[str, list[Item]]:
    """The fallback split of the original code (Dassl's ``read_and_split_data``): label ``i`` is
    the images of ``image_dir / class_folders[i][0]`` named ``class_folders[i][1]``; each class,
    in label order, is shuffled by ``rng`` and cut 50/20/30.

    Unlike the original, files are listed in sorted order (the original takes the file system's
    order, which differs between machines) and only image files are taken. Every class must
    give each split at least one image; all offending folders are reported at once.
    """
    groups, problems = {}, []
    for label, (folder, classname) in enumerate(class_folders):
        names = list_images(image_dir / folder)
        if min(split_counts(len(names), p_train, p_val)) < 1:
            problems.append(f"{image_dir / folder}: {len(names)} image(s) cannot be split into train, val "
                            f"and test ({p_train:.0%}/{p_val:.0%}/{1 - p_train - p_val:.0%}); add images")
        groups[label] = [Item(f"{folder}/{name}", label, classname) for name in names]
    if problems:
        raise DataError(problems, f"cannot make a split of {image_dir}")
    return classwise_split(groups, rng, p_train, p_val)


def write_split_file(split: dict[str, list[Item]], path: str | Path) -> Path:
    """Write ``split`` in the split-file format. Never replaces a file: an existing ``path``
    raises ``FileExistsError``."""
    path = Path(path)
    text = json.dumps({name: [list(item) for item in split[name]] for name in SPLITS}, indent=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x") as f:
        f.write(text)
    return path


def escapes_folder(relpath: str) -> bool:
    """Is ``relpath`` absolute, or does it climb out of the folder it is relative to?

    Judged on the text alone, so symbolic links inside the data folder stay allowed."""
    text = relpath.replace("\\", "/")
    if text.startswith("/") or PureWindowsPath(relpath).drive:
        return True
    normal = posixpath.normpath(text)
    return normal == ".." or normal.startswith("../")


def base_novel_labels(num_classes: int, subsample: str) -> list[int]:
    """Labels of the base (first ceil(n/2)) or novel (the rest) classes; all labels for 'all'."""
    labels = list(range(num_classes))
    cut = math.ceil(num_classes / 2)
    return {"all": labels, "base": labels[:cut], "new": labels[cut:]}[subsample]


def _mix(*numbers: int) -> int:
    """A 63-bit seed from several integers (distinct inputs give distinct streams in practice)."""
    value = 0
    for n in numbers:
        value = (value * 1_000_003 + int(n)) % (2**63 - 1)
    return value


class EpochShuffleSampler(Sampler):
    """A random order that depends only on (seed, epoch), yielding ``(index, epoch)`` keys.

    Lightning calls ``set_epoch`` before each epoch. Because the order and the key do not depend on
    anything that happened before, a fit resumed at epoch ``e`` sees exactly the batches and (via
    ``ImageListDataset``) the augmentations that an uninterrupted fit sees, with any number of
    loader workers.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        epoch = self.epoch
        return iter([(i, epoch) for i in torch.randperm(self.size, generator=generator).tolist()])


class ImageListDataset(Dataset):
    """Images of a list of items, returned as dicts with ``image``, ``label`` and ``path``.

    A key ``(index, epoch)`` (from ``EpochShuffleSampler``) draws the random augmentation from a
    generator seeded by (seed, epoch, index), so it is reproducible and independent of workers.
    """

    def __init__(self, image_dir: Path, items: list[Item], transform: Callable, seed: int = 0):
        self.image_dir = Path(image_dir)
        self.items = items
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        item = self.items[index]
        path = self.image_dir / item.relpath
        image = load_rgb(path)
        if epoch is None:
            tensor = self.transform(image)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix(self.seed, epoch, index))
                tensor = self.transform(image)
        return {"image": tensor, "label": item.label, "path": str(path)}


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
        check_images: ``full`` decodes every image the run uses in ``setup`` (problems are
            reported before training, all at once), ``header`` only opens them, ``none`` skips
            both; every file the split lists must exist in any case.
    """

    #: Dataset identity (benchmark subclasses set these; user data leaves them None).
    dataset_name: str | None = None
    template: str = "a photo of a {}."
    #: Where the split came from, for error messages (``read_split`` may set it).
    split_source: str | None = None

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
        """Read the split, select the few-shot subset (before the base/novel subsampling, as the
        original), keep the subset's classes, and check everything: all problems of the data are
        reported here at once, before any training starts."""
        if self.splits is not None:
            return
        if self.split_file:
            split = read_split_file(self.split_file)
            self.split_source = str(self.split_file)
        else:
            split = self.read_split()
        selection = select_few_shot(split, self.num_shots, self.seed)
        splits = {name: self._subsample(items) for name, items in selection.items()}
        self.check_items(split, used=[item for items in splits.values() for item in items])
        self.selection, self.splits = selection, splits

    def _subsample(self, items: list[Item]) -> list[Item]:
        kept = self.kept_labels
        remap = {old: new for new, old in enumerate(kept)}
        return [Item(i.relpath, remap[i.label], i.classname) for i in items if i.label in remap]

    def check_items(self, split: dict[str, list[Item]], used: list[Item] | None = None) -> None:
        """Raise a `DataError` listing every problem of ``split`` at once (see `find_problems`)."""
        problems = self.find_problems(split, used)
        if problems:
            raise DataError(problems, f"{type(self).__name__}: problems in the data of {self.image_dir}")

    def find_problems(self, split: dict[str, list[Item]], used: list[Item] | None = None) -> list[str]:
        """Every problem of ``split``, each naming its file: a label outside the class list, a
        class name that disagrees with its label, a path that leaves the image folder, an image in
        two splits, a class without training images, a listed file that is missing; and the images
        of ``used`` (default: all) that cannot be read (``check_images``: full decode or header)."""
        names = [name.lower() for name in self.all_classnames]
        source = self.split_source or "split"
        image_dir = self.image_dir
        problems: list[str] = []
        first_split: dict[str, str] = {}
        for name in SPLITS:
            for k, item in enumerate(split.get(name, [])):
                where = f"{source}: {name}[{k}] {item.relpath!r}"
                if not 0 <= item.label < len(names):
                    problems.append(f"{where}: label {item.label} is not a label of this dataset (0..{len(names) - 1})")
                elif item.classname.lower() != names[item.label]:
                    problems.append(f"{where}: class name {item.classname!r} does not match label {item.label}, "
                                    f"which is {self.all_classnames[item.label]!r}")
                if escapes_folder(item.relpath):
                    problems.append(f"{where}: the path leaves the image folder {image_dir}")
                    continue
                if first_split.setdefault(item.relpath, name) != name:
                    problems.append(f"{where}: also listed in {first_split[item.relpath]!r} "
                                    "(an image may belong to one split only)")
                if not (image_dir / item.relpath).is_file():
                    problems.append(f"{image_dir / item.relpath}: file not found (listed in {where})")
        in_train = {item.label for item in split.get("train", [])}
        problems.extend(f"{source}: class {label} {self.all_classnames[label]!r} has no training images"
                        for label in range(len(names)) if label not in in_train)
        if self.check_images != "none":
            paths = {image_dir / item.relpath for item in (used if used is not None else
                                                           [i for n in SPLITS for i in split.get(n, [])])
                     if not escapes_folder(item.relpath)}
            paths = sorted(p for p in paths if p.is_file())  # missing files are reported above
            decode = self.check_images == "full"
            with ThreadPoolExecutor(max_workers=8) as pool:
                problems.extend(p for p in pool.map(lambda p: check_image(p, decode=decode), paths) if p)
        return problems

    # --------------------------------------------------------------- exports
    def fewshot_split(self, splits: tuple[str, ...] | None = None) -> dict[str, list[list]]:
        """The selection this run uses, in the split-file format (original labels and names);
        ``splits`` keeps only those splits (those the selection has)."""
        if self.splits is None:
            raise RuntimeError("call setup() before fewshot_split()")
        return {name: [list(i) for i in items] for name, items in self.selection.items()
                if splits is None or name in splits}

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
        return ImageListDataset(self.image_dir, self.splits[split], transform, seed=self.seed)

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self._dataset(split, self.train_transform if train else self.test_transform)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.test_batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if train else None,
            drop_last=train and len(dataset) >= self.batch_size,  # as the reference (Dassl) loader
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
