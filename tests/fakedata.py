"""Fake copies of the 11 benchmark datasets, in their REAL layout, for tests.

    <root>/<DIR>/<DIR>/<class_folder>/<image>    (tiny images, a few per class)
    <root>/<DIR>/split_<DIR>.json                 ({"train"|"val"|"test": [[relpath, label, classname], ...]})

Each fake copies what matters of the real one (studied on the real split files): class folders
named after the classes with ``_`` for spaces, file names in the dataset's style (``benign (1).png``,
``Cyst- (10).jpg``, ``..._Row_1_Col_451.tif``), its extensions (RETINA mixes jpg/png/jpeg), its
image kinds (16-bit and grayscale TIFFs, grayscale and RGBA PNGs), the order in which the classes
first appear in each split list (not label order for BTMRI, COVID_19, DermaMNIST, KneeXray,
RETINA) and DermaMNIST's interleaved lists. Class sizes differ so that some classes have fewer
items than the few-shot K and others more. OCTMNIST's real split is unknown: its fake spells one
class "normal OCT scan" (folder ``normal_OCT_scan``) to exercise case-insensitive matching.
"""
from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from dpt_lightning.data.facts import BENCHMARK_DATASETS

SPLITS = ("train", "val", "test")
#: Items per class and split (cycled over the labels): fewer and more than K in {1, 2, 4, 8, 16}.
DEFAULT_COUNTS = {"train": (18, 3, 9, 17, 5, 2, 11, 6), "val": (5, 2, 4, 6, 1, 3, 5, 2),
                  "test": (2, 1, 2, 1, 2, 2, 1, 2)}

Namer = Callable[[str, int, int, str], str]  # (class folder, label, index, split) -> file name without extension


def _first_word(folder: str, label: int, k: int, split: str) -> str:
    return f"{folder.split('_')[0]} ({k + 1})"  # BUSI: "benign (1)"


def _prefixed(prefixes: tuple[str, ...], pattern: str) -> Namer:
    return lambda folder, label, k, split: pattern.format(prefix=prefixes[label], k=k + 1)


@dataclass(frozen=True)
class FakeLayout:
    """What a fake dataset copies from the real one."""

    namer: Namer
    extensions: tuple[str, ...] = ("png",)  #: cycled over the images
    modes: tuple[str, ...] = ("RGB",)  #: PIL modes cycled over the images ("I;16" = 16-bit)
    orders: dict[str, tuple[int, ...]] = field(default_factory=dict)  #: first appearance per split
    interleave: bool = False  #: classes mixed within the lists (DermaMNIST)
    classnames: dict[int, str] = field(default_factory=dict)  #: spellings that differ from the facts


FAKE_LAYOUTS: dict[str, FakeLayout] = {
    "BTMRI": FakeLayout(lambda folder, label, k, split: f"image{k + 1:02d}", ("jpg",), ("RGB", "L"),
                        orders={s: (0, 1, 3, 2) for s in SPLITS}),
    "BUSI": FakeLayout(_first_word, ("png",), ("L", "RGB", "RGBA")),
    "CHMNIST": FakeLayout(lambda folder, label, k, split: f"{4096 + 37 * k:X}_CRC-Prim-HE-0{label + 1}_0{k % 9}"
                          f".tif_Row_{150 * k + 1}_Col_451", ("tif",), ("I;16", "L", "RGB")),
    "COVID_19": FakeLayout(_prefixed(("COVID", "Lung_Opacity", "Viral Pneumonia", "Normal"), "{prefix}-{k}"),
                           ("png",), ("L", "RGB"), orders={s: (0, 1, 3, 2) for s in SPLITS}),
    "CTKidney": FakeLayout(_prefixed(("Cyst", "Stone", "Tumor", "Normal"), "{prefix}- ({k})"), ("jpg",), ("RGB", "L")),
    "DermaMNIST": FakeLayout(lambda folder, label, k, split: f"{split}{k + 1}_{label}", ("png",), ("RGB", "RGBA"),
                             orders={"train": (5, 4, 2, 1, 6, 0, 3), "val": (5, 4, 2, 6, 1, 0, 3),
                                     "test": (5, 3, 4, 0, 2, 1, 6)}, interleave=True),
    "KneeXray": FakeLayout(lambda folder, label, k, split: f"9{label}{k:05d}{'LR'[k % 2]}", ("png",), ("L",),
                           orders={s: (1, 0, 2, 3, 4) for s in SPLITS}),
    "Kvasir": FakeLayout(lambda folder, label, k, split: str(uuid.UUID(int=random.Random(f"{folder}{k}")
                                                                       .getrandbits(128))), ("jpg",)),
    "LungColon": FakeLayout(_prefixed(("colonca", "colonn", "lungaca", "lungn", "lungscc"), "{prefix}{k}"), ("jpeg",)),
    "OCTMNIST": FakeLayout(lambda folder, label, k, split: f"{split}{k + 1}_{label}", ("png",), ("L",),
                           classnames={3: "normal OCT scan"}),
    "RETINA": FakeLayout(lambda folder, label, k, split: f"{1000 + k}_{('left', 'right')[k % 2]}",
                         ("jpg", "png", "jpeg"), ("RGB", "RGBA", "L"), orders={s: (2, 0, 1, 3) for s in SPLITS}),
}


def fake_image(mode: str, rng: random.Random) -> Image.Image:
    """A tiny non-square noise image of the given PIL mode (``I;16`` = 16-bit grayscale)."""
    size = (rng.randint(8, 14), rng.randint(8, 14))
    array = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    if mode == "I;16":
        return Image.fromarray(array[..., 0].astype(np.uint16) * 257)
    return Image.fromarray(array, "RGBA").convert(mode)


def _order_items(per_label: dict[int, list[list]], order: tuple[int, ...], interleave: bool,
                 rng: random.Random) -> list[list]:
    """Concatenate the classes in ``order``; or, interleaved, start with one item of each class
    in ``order`` (fixing the first appearance) and mix the rest."""
    if not interleave:
        return [item for label in order for item in per_label[label]]
    head = [per_label[label][0] for label in order if per_label[label]]
    rest = [item for label in order for item in per_label[label][1:]]
    rng.shuffle(rest)
    return head + rest


def fake_split(name: str, counts: dict[str, tuple[int, ...]] | None = None) -> dict[str, list[list]]:
    """The split file of a fake ``name``: ``counts[split][label % len]`` items per class."""
    facts, layout = BENCHMARK_DATASETS[name], FAKE_LAYOUTS[name]
    counts = counts or DEFAULT_COUNTS
    rng = random.Random(name)
    labels = tuple(range(len(facts.classnames)))
    names = [layout.classnames.get(label, facts.classnames[label]) for label in labels]
    split, index = {}, 0
    for part in SPLITS:
        per_label = {}
        for label in labels:
            folder, ext = names[label].replace(" ", "_"), layout.extensions
            n = counts[part][label % len(counts[part])]
            per_label[label] = [[f"{folder}/{layout.namer(folder, label, i, part)}.{ext[i % len(ext)]}",
                                 label, names[label]] for i in range(index, index + n)]
            index += n
        split[part] = _order_items(per_label, layout.orders.get(part, labels), layout.interleave, rng)
    return split


def write_fake_dataset(root: str | Path, name: str, counts: dict[str, tuple[int, ...]] | None = None,
                       split_file: bool = True) -> dict[str, list[list]]:
    """Write the images of a fake ``name`` under ``root`` in the real layout (and its split file,
    unless ``split_file`` is False); returns the split."""
    layout = FAKE_LAYOUTS[name]
    split = fake_split(name, counts)
    dataset_dir = Path(root) / name
    image_dir = dataset_dir / name
    rng = random.Random(f"images-{name}")
    for k, (relpath, _, _) in enumerate(item for part in SPLITS for item in split[part]):
        path = image_dir / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = layout.modes[k % len(layout.modes)]
        if path.suffix in (".jpg", ".jpeg") and mode not in ("RGB", "L"):
            mode = "RGB"  # JPEG holds neither alpha nor 16 bits
        fake_image(mode, rng).save(path)
    if split_file:
        (dataset_dir / f"split_{name}.json").write_text(json.dumps(split, indent=4))
    return split


def write_fake_benchmark(root: str | Path, names: list[str] | None = None) -> Path:
    """Fake copies of the benchmark datasets (default: all 11) under ``root``."""
    for name in names or BENCHMARK_DATASETS:
        write_fake_dataset(root, name)
    return Path(root)
