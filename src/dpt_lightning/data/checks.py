"""Checks of a split against its dataset, all problems at once, each naming its file.

`find_problems` judges what holds for any use of the data (labels and class names agree, paths
stay inside the image folder, file names are UTF-8, each image in one split, files exist and
decode). `coverage_problems` is the ONE rule on class sizes, for every source of a split (split
file, benchmark fallback, image folder, CSV with or without a split column):

    every class a run uses needs at least one image in every split the run uses,

with "the splits a run uses" given by `needed_splits` for each Lightning stage; for multi-label
data `finding_coverage_problems` is its form (every finding needs a positive image in every split
the run uses). `single_class_problem` refuses training on one class.
"""
from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PureWindowsPath

from dpt_lightning.data.dicom import DicomWindow
from dpt_lightning.data.images import check_image
from dpt_lightning.data.splits import (P_TRAIN, P_VAL, SPLITS, AnyItem, Item, MultiLabelItem,
                                       enough_for_every_split, path_key)

#: How the splits are named in sentences.
SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test"}


def escapes_folder(relpath: str) -> bool:
    """Is ``relpath`` absolute, or does it climb out of the folder it is relative to?

    Judged on the text alone, so symbolic links inside the data folder stay allowed."""
    text = relpath.replace("\\", "/")
    if text.startswith("/") or PureWindowsPath(relpath).drive:
        return True
    normal = posixpath.normpath(text)
    return normal == ".." or normal.startswith("../")


def same_class_spellings(names: Sequence[str], spelled=lambda name: name) -> list[list[str]]:
    """Groups of names that are one class for the model: equal once lower-cased, as the model's
    class name ``spelled(name)`` (an image folder reads ``_`` as a space). The rule of every
    source of class names (CSV labels, class folders): spell each class one way."""
    folded: dict[str, list[str]] = {}
    for name in names:
        folded.setdefault(spelled(name).lower(), []).append(name)
    return [spellings for spellings in folded.values() if len(spellings) > 1]


def is_utf8(name: str) -> bool:
    """Can ``name`` be written as UTF-8? Not when it came from a file name whose bytes are not
    UTF-8 (Python then holds the bad bytes as lone surrogates, ``'caf\\udce9.png'``)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def show_path(path: str | Path) -> str:
    """A path as the user can recognise it even when its name is not UTF-8: the raw bytes
    (``b'/data/caf\\xe9.png'``), else the path itself."""
    text = str(path)
    if is_utf8(text):
        return text
    try:
        return repr(os.fsencode(text))
    except UnicodeEncodeError:  # lone surrogates that are no escaped bytes (from a JSON "\\ud800")
        return ascii(text)


def not_utf8_problem(path: str | Path, where: str = "", kind: str = "file") -> str:
    """The problem line of a file (or folder: ``kind``) whose name is not UTF-8: named, and what to do."""
    listed = f" (listed in {where})" if where else ""
    return (f"{show_path(path)}: the {kind} name is not valid UTF-8{listed}; rename it to a UTF-8 name "
            f"(e.g. `convmv -f latin1 -t utf8 --notest <{kind}>`)")


def label_problems(item: AnyItem, classnames: Sequence[str], where: str) -> list[str]:
    """The problems of an item's labels: a label outside ``classnames``, or a name (class name,
    finding) that disagrees with its label (compared without regard to case)."""
    if isinstance(item, MultiLabelItem):
        named, unnamed, word = zip(item.labels, item.findings), item.ignored, "finding"
    else:
        named, unnamed, word = [(item.label, item.classname)], (), "class name"
    problems = []
    for label, name in [*named, *((label, None) for label in unnamed)]:
        if not 0 <= label < len(classnames):
            problems.append(f"{where}: label {label} is not a label of this dataset (0..{len(classnames) - 1})")
        elif name is not None and name.lower() != classnames[label].lower():
            problems.append(f"{where}: {word} {name!r} does not match label {label}, which is {classnames[label]!r}")
    return problems


def find_problems(split: Mapping[str, Sequence[Item]], classnames: Sequence[str], image_dir: Path,
                  source: str = "split", used: Sequence[Item] | None = None,
                  check_images: str = "full", dicom_window: DicomWindow = 0) -> list[str]:
    """Every problem of ``split`` that makes it unusable for any run, each naming its file: a
    label outside ``classnames``, a class name that disagrees with its label, a path that leaves
    ``image_dir``, a file name that is not UTF-8, an image in two splits, a listed file that is
    missing; and the images of ``used`` (default: all) that cannot be read (``check_images``:
    ``full`` decode, with ``dicom_window`` for DICOM files; ``header`` only, ``none``)."""
    problems: list[str] = []
    first_split: dict[str, str] = {}
    for name in SPLITS:
        for k, item in enumerate(split.get(name, [])):
            where = f"{source}: {name}[{k}] {item.relpath!r}"
            problems += label_problems(item, classnames, where)
            if escapes_folder(item.relpath):
                problems.append(f"{where}: the path leaves the image folder {image_dir}")
                continue
            if not is_utf8(item.relpath):
                problems.append(not_utf8_problem(image_dir / item.relpath, where))
                continue
            key = path_key(item.relpath)
            if first_split.setdefault(key, name) != name:
                problems.append(f"{where}: also listed in {first_split[key]!r} "
                                "(an image may belong to one split only)")
            if not (image_dir / item.relpath).is_file():
                problems.append(f"{image_dir / item.relpath}: file not found (listed in {where})")
    if check_images != "none":
        items = used if used is not None else [i for n in SPLITS for i in split.get(n, [])]
        paths = {image_dir / i.relpath for i in items if not escapes_folder(i.relpath) and is_utf8(i.relpath)}
        paths = sorted(p for p in paths if p.is_file())  # missing files are reported above
        decode = check_images == "full"
        with ThreadPoolExecutor(max_workers=8) as pool:
            problems.extend(p for p in pool.map(lambda p: check_image(p, decode, dicom_window), paths) if p)
    return problems


# --------------------------------------------------------------------------------- the class rule
def needed_splits(stage: str | None, validation: bool = True) -> tuple[str, ...]:
    """The splits in which every class must have an image, for a Lightning setup ``stage``:

    * ``fit``: train, and test (``dpt fit`` tests the last epoch after training, and a class found
      missing then would waste the training); val only when validation runs (the reference
      configs turn it off with ``trainer.limit_val_batches: 0``; then val may lack a class).
    * ``validate``: val. ``test``: test.
    * ``predict``: none (predictions need no class to be present; only the test split must not
      be empty, see `MedicalDataModule`).
    * ``None`` (set up by hand, every loader may be asked for): train, val and test.
    """
    if stage is None:
        return SPLITS
    return {"fit": ("train", "val", "test") if validation else ("train", "test"), "validate": ("val",),
            "test": ("test",), "predict": ()}.get(stage, SPLITS)


def _join(words: Sequence[str]) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _join_or(words: Sequence[str]) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def positive_counts(split: Mapping[str, Sequence[AnyItem]], labels: Sequence[int]) -> dict[int, dict[str, int]]:
    """label -> split -> the number of images of that label (for multi-label data: the images that
    have that finding, its positives)."""
    counts = {label: dict.fromkeys(SPLITS, 0) for label in labels}
    for name in SPLITS:
        for item in split.get(name, []):
            for label in item.positives:
                if label in counts:
                    counts[label][name] += 1
    return counts


def shortfalls(split: Mapping[str, Sequence[AnyItem]], labels: Sequence[int],
               needed: Sequence[str]) -> list[tuple[int, list[str], dict[str, int]]]:
    """(label, the ``needed`` splits without an image of it, its `positive_counts`) of each label
    of ``labels`` that lacks one, in label order."""
    counts = positive_counts(split, labels)
    return [(label, missing, counts[label]) for label in labels
            if (missing := [name for name in needed if counts[label][name] == 0])]


def coverage_problems(split: Mapping[str, Sequence[Item]], classnames: Sequence[str], labels: Sequence[int],
                      needed: Sequence[str], source: str, built: Mapping[int, str] | None = None,
                      built_how: str = "") -> tuple[list[str], str | None]:
    """The class rule: each class of ``labels`` needs at least one image in each ``needed`` split.

    Returns one problem line per offending class, and the advice (counts and what to do) for the
    error, or ``([], None)``. ``built`` maps the labels of a split made by `build_split` to where
    each class's images are (a folder, the CSV's rows of the class); the line then gives the
    number of images and what the split made of them (``built_how`` names the split, e.g.
    "50/20/30 split with split_seed=1").
    """
    if not needed:
        return [], None
    problems, offenders = [], []
    for label, missing, c in shortfalls(split, labels, needed):
        name = classnames[label]
        offenders.append(f"{name!r} {c['train']}/{c['val']}/{c['test']}")
        if built is not None and label in built:
            n = sum(c.values())
            gets = "gets one" if len(needed) == 1 else "each get one"
            problems.append(f"{built[label]}: {n} image(s) cannot be split so that {_join(needed)} {gets} "
                            f"(class {name!r}: the {built_how or 'split'} gives train {c['train']}, val {c['val']}, "
                            f"test {c['test']})")
        else:
            problems.append(f"{source}: class {label} {name!r} has no {_join_or([SPLIT_WORDS[m] for m in missing])} "
                            "images")
    if not problems:
        return [], None
    enough = enough_for_every_split(P_TRAIN, P_VAL, needed)
    add = (f"add images to these classes ({enough} or more per class always give each of these splits one)"
           if built else "add images of these classes to the splits that lack them")
    hint = (f"Every class needs at least one image in each split this run uses (here: {_join(needed)}). "
            "Images per class (train/val/test): " + ", ".join(offenders) + ". "
            f"To fix: {add}, give the split yourself (data.split_file, or a 'split' column in a CSV), or leave "
            "these classes out of the data.")
    return problems, hint


def finding_coverage_problems(split: Mapping[str, Sequence[MultiLabelItem]], findings: Sequence[str],
                              labels: Sequence[int], needed: Sequence[str],
                              source: str) -> tuple[list[str], str | None]:
    """The class rule of multi-label data: each finding of ``labels`` needs at least one positive
    image (one that has it) in each ``needed`` split. One problem line per offending finding, and
    the advice with the positives per split, or ``([], None)``."""
    if not needed:
        return [], None
    problems, offenders = [], []
    for label, missing, c in shortfalls(split, labels, needed):
        offenders.append(f"{findings[label]!r} {c['train']}/{c['val']}/{c['test']}")
        problems.append(f"{source}: finding {label} {findings[label]!r} has no positive "
                        f"{_join_or([SPLIT_WORDS[m] for m in missing])} images")
    if not problems:
        return [], None
    hint = (f"Every finding needs at least one image that has it in each split this run uses (here: "
            f"{_join(needed)}). Positive images per finding (train/val/test): " + ", ".join(offenders) + ". "
            "To fix: add images with these findings, give the split yourself (data.split_file, or a 'split' "
            "column in a CSV), or leave these findings out (data.findings).")
    return problems, hint


def single_class_problem(classnames: Sequence[str], source: str) -> str | None:
    """Training on one class learns nothing (every prediction is that class): the problem line,
    or None for two classes or more."""
    if len(classnames) >= 2:
        return None
    shown = f"one class, {classnames[0]!r}" if classnames else "no class"
    return (f"{source}: training needs at least two classes; this data has {shown}. Add a class, or use "
            "this data only to test or predict with a model trained elsewhere (as the one-class novel half "
            "of BUSI's base-to-novel split is only tested)")


__all__ = ["coverage_problems", "escapes_folder", "find_problems", "finding_coverage_problems", "is_utf8",
           "label_problems", "needed_splits", "not_utf8_problem", "positive_counts", "show_path",
           "single_class_problem"]
