"""The images of a split as a torch dataset, and the sampler that makes a resumed fit exact.

Both draw their randomness from seeds of (seed, epoch[, index]) only, never from a stream that
earlier epochs consumed: a fit resumed at epoch ``e`` sees exactly the batches and augmentations of
an uninterrupted fit, with any number of loader workers.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset, Sampler

from dpt_lightning.data.dicom import DicomWindow
from dpt_lightning.data.images import load_rgb
from dpt_lightning.data.splits import Item, MultiLabelItem


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


def is_random(transform: Callable) -> bool:
    """Does ``transform`` (or a step of a ``Compose``) draw random numbers (torchvision's ``Random*``)?"""
    if type(transform).__name__.startswith("Random"):
        return True
    return any(is_random(step) for step in getattr(transform, "transforms", []))


def view_group(transform: Callable, image_dir: Path, seed: int | None, dicom_window: DicomWindow = 0) -> str:
    """A short digest of what a view depends on besides its image: the transform (its ``repr``), the
    image folder, for seeded augmentation the seed, and how DICOM files are windowed (when not the
    default, so that the digests of data without DICOM settings stay as they were)."""
    text = f"{transform!r}\n{Path(image_dir).resolve()}\n{seed}"
    if dicom_window != 0:
        text += f"\ndicom_window={dicom_window!r}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: The value of ``batch["label"]`` for a finding whose label is unknown (multi-label data): a
#: trainer leaves it out of the loss and the metrics (torchmetrics' ``ignore_index=-1``).
IGNORE = -1.0


def multi_hot(item: MultiLabelItem, num_labels: int) -> torch.Tensor:
    """The (num_labels,) float32 label vector of a multi-label item: 1 for its findings, `IGNORE`
    (-1) for those whose label is unknown, 0 for the rest."""
    label = torch.zeros(num_labels, dtype=torch.float32)
    label[list(item.labels)] = 1.0
    label[list(item.ignored)] = IGNORE
    return label


class ImageListDataset(Dataset):
    """Images of a list of items, returned as dicts with ``image``, ``label``, ``path`` and ``view``.

    ``label`` is the item's int label; for multi-label items (``num_labels`` given) the float
    vector of `multi_hot`. DICOM files are read with ``dicom_window`` (`images.load_rgb`).

    A key ``(index, epoch)`` (from ``EpochShuffleSampler``) draws the random augmentation from a
    generator seeded by (seed, epoch, index), so it is reproducible and independent of workers.
    ``view`` names exactly what the image tensor is (`view_group`, epoch and index), for feature
    stores: ``"<group>:eval"`` for a deterministic transform, ``""`` for a random one drawn without
    a key (not reproducible).
    """

    def __init__(self, image_dir: Path, items: list[Item] | list[MultiLabelItem], transform: Callable, seed: int = 0,
                 num_labels: int | None = None, dicom_window: DicomWindow = 0):
        self.image_dir = Path(image_dir)
        self.items = items
        self.transform = transform
        self.seed = seed
        self.num_labels = num_labels
        self.dicom_window = dicom_window
        self.train_group = view_group(transform, self.image_dir, seed, dicom_window)
        self.eval_group = "" if is_random(transform) else view_group(transform, self.image_dir, None, dicom_window)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        item = self.items[index]
        path = self.image_dir / item.relpath
        image = load_rgb(path, self.dicom_window)
        if epoch is None:
            tensor = self.transform(image)
            view = f"{self.eval_group}:eval" if self.eval_group else ""
        else:
            # Seeds the CPU generator the transforms draw from, and only it: torch.manual_seed would
            # also queue a seed for every accelerator backend, 2 ms per view on a machine without one.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(_mix(self.seed, epoch, index))
                tensor = self.transform(image)
            view = f"{self.train_group}:{epoch}:{index}"
        label = item.label if self.num_labels is None else multi_hot(item, self.num_labels)
        return {"image": tensor, "label": label, "path": str(path), "view": view}
