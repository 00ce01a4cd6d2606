"""Splits as plain data: items, the few-shot selection, base/novel classes, the one split builder
and split files. Pure functions of their arguments (no Lightning, no file system except the split
file functions), so that every rule here can be tested on lists.

A split is ``{"train": [Item, ...], "val": [...], "test": [...]}``; an `Item` is one image
``(relpath, label, classname)`` with ``relpath`` relative to the dataset's image folder. Multi-label
data (several findings per image) holds `MultiLabelItem` s ``(relpath, labels, findings, ignored)``
instead; a split holds one kind only (`split_task`).
"""
from __future__ import annotations

import json
import math
import posixpath
import random
import reprlib
from collections.abc import Callable, Mapping, Sequence
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

    @property
    def positives(self) -> tuple[int, ...]:
        """The labels this image is an example of: its one label."""
        return (self.label,)

    def entry(self) -> list:
        """The item in the split-file format: ``[relpath, label, classname]``."""
        return list(self)


class MultiLabelItem(NamedTuple):
    """One image of a multi-label split: its path, its findings (the positive labels, ascending,
    and their names in the same order; none for an image without findings) and the findings whose
    label is unknown and must be ignored (uncertain labels under CheXpert's ``ignore`` policy).
    Every other finding is negative."""

    relpath: str
    labels: tuple[int, ...]
    findings: tuple[str, ...]
    ignored: tuple[int, ...] = ()

    @property
    def positives(self) -> tuple[int, ...]:
        return self.labels

    @property
    def is_normal(self) -> bool:
        """No finding, and no finding left unknown: every label is a known negative."""
        return not self.labels and not self.ignored

    def entry(self) -> list:
        """The item in the split-file format: ``[relpath, [labels], [findings]]``, with a fourth
        list ``[ignored labels]`` only when there are some."""
        return [self.relpath, list(self.labels), list(self.findings)] + ([list(self.ignored)] if self.ignored else [])


AnyItem = Item | MultiLabelItem
Task = Literal["multiclass", "multilabel"]


def split_task(split: Mapping[str, Sequence[AnyItem]]) -> Task | None:
    """``multilabel`` when the split holds `MultiLabelItem` s, ``multiclass`` when it holds `Item` s,
    None when it is empty."""
    for name in SPLITS:
        for item in split.get(name, []):
            return "multilabel" if isinstance(item, MultiLabelItem) else "multiclass"
    return None


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


def sample_few_shot_multilabel(items: list[MultiLabelItem], num_shots: int,
                                rng: random.Random) -> list[MultiLabelItem]:
    """The multi-label selection: for each finding in label order, ``rng.sample`` K images that
    have it (positives) among those not drawn yet (all of them when fewer than K are left); then
    K normal images (`MultiLabelItem.is_normal`: no finding, none unknown) the same way. Candidates
    keep the split's order. An image drawn for one finding counts for the others it has, so a
    finding may end with more than K positives; the selection has at most (findings + 1) x K
    images. ``num_shots < 0``: every image."""
    if num_shots < 0:
        return list(items)
    free = list(range(len(items)))  # indices of the images not drawn yet, in the split's order
    selected: list[MultiLabelItem] = []
    groups: list[int | None] = sorted({label for item in items for label in item.labels})
    for label in [*groups, None]:  # None: the normal images
        group = [i for i in free if (label in items[i].labels if label is not None else items[i].is_normal)]
        drawn = rng.sample(group, num_shots) if len(group) >= num_shots else group
        selected += [items[i] for i in drawn]
        taken = set(drawn)
        free = [i for i in free if i not in taken]
    return selected


def select_few_shot(split: dict[str, list[Item]], num_shots: int, seed: int,
                    sample: Callable[[list, int, random.Random], list] = sample_few_shot) -> dict[str, list[Item]]:
    """The original protocol's selection from a full split: ``num_shots`` per class for train,
    then ``min(num_shots, 4)`` per class for val from the same random stream, test whole.
    ``sample`` is the per-split rule (`sample_few_shot_multilabel` for multi-label data).

    The stream is a private ``random.Random(seed)``: the same numbers the original draws after
    ``random.seed(seed)``, but nothing else the program does can shift them.
    """
    rng = random.Random(seed)
    train = sample(split["train"], num_shots, rng)
    val = sample(split["val"], min(num_shots, 4) if num_shots > 0 else -1, rng)
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


def build_multilabel_split(items: Sequence[MultiLabelItem], seed: int, p_train: float = P_TRAIN,
                           p_val: float = P_VAL) -> dict[str, list[MultiLabelItem]]:
    """The split of multi-label images that come without one (a multi-label CSV without a ``split``
    column): an image has several findings, so the images are split as ONE group, as `build_split`
    splits one class: shuffled (in the order given) by ``random.Random(seed)`` and cut into
    ``round(n * p_train)`` train, ``round(n * p_val)`` val and the rest test."""
    return build_split({0: items}, seed, p_train, p_val)


def patient_split(items: Sequence[AnyItem], patient_of: Callable[[AnyItem], str], fraction: float,
                  seed: int) -> tuple[list[AnyItem], list[AnyItem]]:
    """Split ``items`` by patient into (the rest, a held-out part), for a validation split carved from
    a training list: the patient ids (sorted as text) shuffled by ``random.Random(seed)``, the first
    ``round(fraction * patients)`` held out with all their images. Items keep their order."""
    patients = sorted({patient_of(item) for item in items})
    random.Random(seed).shuffle(patients)
    held = set(patients[:round(fraction * len(patients))])
    return ([item for item in items if patient_of(item) not in held],
            [item for item in items if patient_of(item) in held])


def path_key(relpath: str) -> str:
    """The form in which two spellings of one file compare equal (``a//b.png``, ``./a/b.png``,
    ``a\\b.png`` are ``a/b.png``): how duplicates are found."""
    return posixpath.normpath(relpath.replace("\\", "/"))


# ---------------------------------------------------------------------------------- split files
_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother, _short.maxlist = 2, 60, 60, 4


def _label_list(value: object, what: str) -> str | None:
    """The problem of a list of labels (integers, none repeated), or None."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return f"{what} must be a list of integers, got {_short.repr(value)}"
    if len(set(value)) != len(value):
        return f"{what} repeat a label: {_short.repr(value)}"
    return None


def _multilabel_entry(entry: list, where: str) -> MultiLabelItem | str:
    """``[relpath, [labels], [findings]]`` or ``[relpath, [labels], [findings], [ignored]]`` as an
    item (findings sorted by label), or the problem line."""
    relpath, labels, findings, *rest = entry
    ignored = rest[0] if rest else []
    if not isinstance(relpath, str) or not relpath:
        return f"{where}: relpath must be a non-empty string, got {_short.repr(relpath)}"
    problem = _label_list(labels, "labels") or _label_list(ignored, "ignored labels")
    if problem:
        return f"{where}: {problem}"
    if not (isinstance(findings, list) and all(isinstance(f, str) for f in findings)
            and len(findings) == len(labels)):
        return (f"{where}: findings must be a list of {len(labels)} name(s), one per label, got "
                f"{_short.repr(findings)}")
    if set(labels) & set(ignored):
        return f"{where}: label(s) {sorted(set(labels) & set(ignored))} are both positive and ignored"
    pairs = sorted(zip(labels, findings))
    return MultiLabelItem(relpath, tuple(l for l, _ in pairs), tuple(f for _, f in pairs), tuple(sorted(ignored)))


def _entry(entry: object, where: str) -> AnyItem | str:
    """One split-file entry as an item, or the problem line."""
    if isinstance(entry, (list, tuple)) and len(entry) in (3, 4) and isinstance(entry[1], list):
        return _multilabel_entry(list(entry), where)
    if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
        return (f"{where}: expected [relpath, label, classname] (multi-label: [relpath, [labels], [findings]]), "
                f"got {_short.repr(entry)}")
    relpath, label, classname = entry
    if not isinstance(relpath, str) or not relpath:
        return f"{where}: relpath must be a non-empty string, got {_short.repr(relpath)}"
    if not isinstance(label, int) or isinstance(label, bool):
        return f"{where}: label must be an integer, got {_short.repr(label)}"
    if not isinstance(classname, str):
        return f"{where}: class name must be a string, got {_short.repr(classname)}"
    return Item(relpath, label, classname)


def read_split_file(path: str | Path) -> dict[str, list[AnyItem]]:
    """Read a split file ``{"train"|"val"|"test": [[relpath, label, classname], ...]}``, or its
    multi-label form ``[relpath, [labels], [findings]]`` (a fourth list, the ignored labels, is
    optional); one file holds one form.

    Structural problems (missing splits, wrong types, an image listed twice in one split, both
    forms in one file) are all reported at once in a `DataError`; an unreadable file (not UTF-8,
    not JSON, nested too deeply) is a `DataError` naming it; a missing file a ``FileNotFoundError``.
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
    split: dict[str, list[AnyItem]] = {}
    first_of_kind: dict[type, str] = {}
    for name in SPLITS:
        entries = raw.get(name)
        if not isinstance(entries, list):
            problems.append(f"{path}: '{name}' is missing or not a list")
            continue
        items, seen = [], {}
        for k, entry in enumerate(entries):
            where = f"{path}: {name}[{k}]"
            item = _entry(entry, where)
            if isinstance(item, str):
                problems.append(item)
            elif path_key(item.relpath) in seen:
                first = seen[path_key(item.relpath)]
                problems.append(f"{where}: duplicate entry {item.relpath!r} (also {name}[{first}])")
            else:
                seen[path_key(item.relpath)] = k
                first_of_kind.setdefault(type(item), f"{name}[{k}]")
                items.append(item)
        split[name] = items
    if len(first_of_kind) > 1:
        problems.append(f"{path}: mixes single-label entries [relpath, label, classname] (first: "
                        f"{first_of_kind[Item]}) and multi-label entries [relpath, [labels], [findings]] (first: "
                        f"{first_of_kind[MultiLabelItem]}); a split file holds one kind")
    if problems:
        raise DataError(problems, f"bad split file {path}")
    return split


def split_entries(split: Mapping[str, Sequence[AnyItem]], splits: Sequence[str] = SPLITS) -> dict[str, list[list]]:
    """The ``splits`` of ``split`` in the split-file format (`Item.entry`, `MultiLabelItem.entry`)."""
    return {name: [item.entry() for item in split[name]] for name in splits}


def write_split_file(split: dict[str, list[AnyItem]], path: str | Path) -> Path:
    """Write ``split`` in the split-file format, atomically. Never replaces a file: an existing
    ``path`` (or one another process creates meanwhile) raises ``FileExistsError``."""
    text = json.dumps(split_entries(split), indent=4)
    return atomic_write(path, text, exclusive=True)
