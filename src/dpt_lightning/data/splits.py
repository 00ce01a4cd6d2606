"""Splits as plain data: items, the few-shot selection, base/novel classes, the one split builder
and split files. Pure functions of their arguments (no Lightning, no file system except the split
file functions), so that every rule here can be tested on lists.

A split is ``{"train": [Item, ...], "val": [...], "test": [...]}``; an `Item` is one image
``(relpath, label, classname)`` with ``relpath`` relative to the dataset's image folder.
"""
from __future__ import annotations

import json
import math
import posixpath
import random
import reprlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

from dpt_lightning.data.errors import DataError
from dpt_lightning.files import JSONFileError, atomic_write, read_json

SPLITS = ("train", "val", "test")
Subsample = Literal["all", "base", "new"]
Split = dict[str, list["Item"]]
#: Fractions of the class-wise split (the original fallback's 50/20/30).
P_TRAIN, P_VAL = 0.5, 0.2


class Item(NamedTuple):
    """One image of a split: path relative to the image folder, label, class name."""

    relpath: str
    label: int
    classname: str


# ---------------------------------------------------------------------------- few-shot selection
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


def base_novel_labels(num_classes: int, subsample: str) -> list[int]:
    """Labels of the base (first ceil(n/2)) or novel (the rest) classes; all labels for 'all'."""
    labels = list(range(num_classes))
    cut = math.ceil(num_classes / 2)
    return {"all": labels, "base": labels[:cut], "new": labels[cut:]}[subsample]


# ------------------------------------------------------------------------------ the split builder
def split_counts(n: int, p_train: float = P_TRAIN, p_val: float = P_VAL) -> tuple[int, int, int]:
    """Train/val/test sizes of one class of ``n`` items: rounded fractions, the rest to test.

    Python's ``round`` rounds halves to even, as the original does: 3 items give (2, 1, 0).
    """
    n_train, n_val = round(n * p_train), round(n * p_val)
    return n_train, n_val, n - n_train - n_val


def enough_for_every_split(p_train: float = P_TRAIN, p_val: float = P_VAL, needed=SPLITS, limit: int = 1000) -> int:
    """The smallest ``m`` such that every class of ``m`` or more items gives each ``needed`` split
    at least one item (4 for 50/20/30; the sizes are not monotonic: 2 items give train and test
    one each, 3 give test none)."""
    ok = [all(count > 0 for name, count in zip(SPLITS, split_counts(n, p_train, p_val)) if name in needed)
          for n in range(limit + 1)]
    m = limit + 1
    while m > 0 and ok[m - 1]:
        m -= 1
    return m


def build_split(groups: Mapping[int, Sequence[Item]], seed: int, p_train: float = P_TRAIN,
                p_val: float = P_VAL) -> dict[str, list[Item]]:
    """THE class-wise split (the original fallback, Dassl's ``read_and_split_data``), used for the
    benchmark layout without a split file, the image folder and a CSV without a split column.

    Classes in ascending label order; each class's items (in the order given) are shuffled by ONE
    stream ``random.Random(seed)`` and cut into ``round(n * p_train)`` train, ``round(n * p_val)``
    val and the rest test. A class may end with an empty split (3 items: 2/1/0): whether that is
    allowed depends on what the run uses, and is judged by `dpt_lightning.data.checks.coverage_problems`.
    """
    rng = random.Random(seed)
    split: dict[str, list[Item]] = {name: [] for name in SPLITS}
    for label in sorted(groups):
        items = list(groups[label])
        rng.shuffle(items)
        n_train, n_val, _ = split_counts(len(items), p_train, p_val)
        split["train"] += items[:n_train]
        split["val"] += items[n_train:n_train + n_val]
        split["test"] += items[n_train + n_val:]
    return split


def path_key(relpath: str) -> str:
    """The form in which two spellings of one file compare equal (``a//b.png``, ``./a/b.png``,
    ``a\\b.png`` are ``a/b.png``): how duplicates are found."""
    return posixpath.normpath(relpath.replace("\\", "/"))


# ---------------------------------------------------------------------------------- split files
_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother, _short.maxlist = 2, 60, 60, 4


def read_split_file(path: str | Path) -> dict[str, list[Item]]:
    """Read a split file ``{"train"|"val"|"test": [[relpath, label, classname], ...]}``.

    Structural problems (missing splits, wrong types, an image listed twice in one split) are all
    reported at once in a `DataError`; an unreadable file (not UTF-8, not JSON, nested too deeply)
    is a `DataError` naming it; a missing file a ``FileNotFoundError``.
    """
    path = Path(path)
    try:
        raw = read_json(path, "split file")
    except JSONFileError as err:
        raise DataError([str(err)], "unreadable split file") from None
    if not isinstance(raw, dict):
        raise DataError([f"{path}: expected an object with 'train', 'val', 'test', got {type(raw).__name__}"],
                        "bad split file")
    problems = []
    split: dict[str, list[Item]] = {}
    for name in SPLITS:
        entries = raw.get(name)
        if not isinstance(entries, list):
            problems.append(f"{path}: '{name}' is missing or not a list")
            continue
        items, seen = [], {}
        for k, entry in enumerate(entries):
            where = f"{path}: {name}[{k}]"
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
                problems.append(f"{where}: expected [relpath, label, classname], got {_short.repr(entry)}")
                continue
            relpath, label, classname = entry
            if not isinstance(relpath, str) or not relpath:
                problems.append(f"{where}: relpath must be a non-empty string, got {_short.repr(relpath)}")
            elif not isinstance(label, int) or isinstance(label, bool):
                problems.append(f"{where}: label must be an integer, got {_short.repr(label)}")
            elif not isinstance(classname, str):
                problems.append(f"{where}: class name must be a string, got {_short.repr(classname)}")
            elif path_key(relpath) in seen:
                problems.append(f"{where}: duplicate entry {relpath!r} (also {name}[{seen[path_key(relpath)]}])")
            else:
                seen[path_key(relpath)] = k
                items.append(Item(relpath, label, classname))
        split[name] = items
    if problems:
        raise DataError(problems, f"bad split file {path}")
    return split


def write_split_file(split: dict[str, list[Item]], path: str | Path) -> Path:
    """Write ``split`` in the split-file format, atomically. Never replaces a file: an existing
    ``path`` (or one another process creates meanwhile) raises ``FileExistsError``."""
    text = json.dumps({name: [list(item) for item in split[name]] for name in SPLITS}, indent=4)
    return atomic_write(path, text, exclusive=True)
