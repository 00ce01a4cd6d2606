"""Checking a copy of a benchmark dataset against the catalogue (``dpt-data check``).

`audit_dataset` looks at everything a run will read and at what the benchmark published: the
layout (``<root>/<DIR>/<DIR>/`` and ``<root>/<DIR>/split_<DIR>.json``), the split file (readable,
well formed), its train/val/test counts against the published ones, the class folders, every
listed image (present; with ``decode`` also decoded, as training would) and the labels and class
names (`checks.find_problems`, the checks ``setup`` runs). The `Audit` it returns is one report:
each problem in a line, then the one command that fixes them. A copy whose counts differ from the
published ones is usable (``ok``) but not the benchmark (not ``matches``): ``dpt-data check``
fails on it, ``dpt-data download`` only warns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dpt_lightning.data.catalogue import CatalogueEntry
from dpt_lightning.data.checks import find_problems
from dpt_lightning.data.errors import DataError
from dpt_lightning.data.images import list_images
from dpt_lightning.data.splits import SPLITS, read_split_file

#: Problems of one kind shown before "... and N more".
SHOWN = 5
_MISSING = ": file not found (listed in "


@dataclass
class Audit:
    entry: CatalogueEntry
    root: Path
    problems: list[str] = field(default_factory=list)  #: what breaks a run
    differences: list[str] = field(default_factory=list)  #: where the copy is not the published benchmark
    notes: list[str] = field(default_factory=list)
    counts: tuple[int, ...] | None = None
    fix: str | None = None

    @property
    def ok(self) -> bool:
        """Usable by a run."""
        return not self.problems

    @property
    def matches(self) -> bool:
        """Usable, and the published benchmark as far as the counts tell."""
        return self.ok and not self.differences

    @property
    def folder(self) -> Path:
        return self.root / self.entry.name

    def report(self) -> str:
        if self.matches:
            return f"{self.entry.name}: ok ({self.folder}): " + "; ".join(self.notes)
        count = len(self.problems)
        head = f"{count} problem{'s' * (count > 1)}" if count else "usable, but not the published benchmark"
        lines = [f"{self.entry.name}: {head} ({self.folder})"]
        lines += [f"  - {problem}" for problem in self.problems]
        lines += [f"  ! {difference}" for difference in self.differences]
        lines += [f"  . {note}" for note in self.notes]
        if self.fix:
            lines.append(f"  fix: {self.fix}")
        return "\n".join(lines)


def _summarise(problems: list[str]) -> list[str]:
    """Missing images in one line; the other problems, at most `SHOWN` of them."""
    missing = [p for p in problems if _MISSING in p]
    other = [p for p in problems if _MISSING not in p]
    lines = other[:SHOWN]
    if len(other) > SHOWN:
        lines.append(f"... and {len(other) - SHOWN} more problems of the split file or the images")
    if missing:
        lines.append(f"{len(missing)} listed image{'s' * (len(missing) > 1)} missing, e.g. "
                     f"{missing[0].split(_MISSING)[0]}")
    return lines


def _misplaced_hint(root: Path, entry: CatalogueEntry) -> str | None:
    """Why ``<root>/<DIR>`` is not there when the data probably is (a case or a level off)."""
    name = entry.name
    if root.name == name or (root / f"split_{name}.json").is_file():
        return f"--root looks like the {name} folder itself: give its parent, {root.parent}"
    if root.is_dir():
        for child in root.iterdir():
            if child.name.lower() == name.lower() and child.name != name:
                return f"found {child}: the folder must be named {name} exactly (rename it)"
    return None


def audit_dataset(entry: CatalogueEntry, root: str | Path, decode: bool = False) -> Audit:
    """Check ``<root>/<DIR>`` against the catalogue; see the module doc."""
    root = Path(root).expanduser()
    audit = Audit(entry, root)
    folder, name = audit.folder, entry.name
    image_dir, split_path = folder / name, folder / f"split_{name}.json"
    hint = None if image_dir.is_dir() else _misplaced_hint(root, entry)
    if hint is not None:
        audit.problems.append(f"{image_dir} not found: {hint}")
        audit.fix = f"dpt-data check {name} --root {root.parent}" if "--root" in hint else None
        return audit
    if not folder.is_dir():
        audit.problems.append(f"{folder} not found")
        audit.fix = entry.fetch_command(root)
        return audit
    audit.fix = entry.fetch_command(root, replace=True)
    if not image_dir.is_dir():
        audit.problems.append(f"image folder {image_dir} not found (expected {name}/{name}/<class folder>/<image>)")
    split = None
    if not split_path.is_file():
        audit.problems.append(f"split file {split_path} not found: runs would make a 50/20/30 split of their own, "
                              "not the benchmark's")
    else:
        try:
            split = read_split_file(split_path)
        except DataError as err:
            audit.problems += _summarise(err.problems)
    if split is not None:
        audit.counts = tuple(len(split[part]) for part in SPLITS)
        _compare_counts(audit)
    if image_dir.is_dir():
        _check_class_folders(audit, image_dir)
        if split is not None:
            mode = "full" if decode else "none"
            audit.problems += _summarise(find_problems(split, entry.facts.classnames, image_dir, str(split_path),
                                                       check_images=mode))
            listed = sum(audit.counts)
            audit.notes.append(f"{listed} images listed, all present" + (" and decoded" if decode else "")
                               if audit.ok else f"{listed} images listed")
    return audit


def _compare_counts(audit: Audit) -> None:
    counts, published = audit.counts, audit.entry.counts
    shown = "/".join(map(str, counts))
    if published is None:
        audit.notes.append(f"train/val/test {shown} (nothing published to compare with)")
        return
    wrong = [f"{part} {have}, published {want}" for part, have, want in zip(SPLITS, counts, published) if have != want]
    if wrong:
        audit.differences.append(f"the split file's counts differ from the published ones: {'; '.join(wrong)}")
    else:
        audit.notes.append(f"train/val/test {shown} as published")
    if audit.entry.counts_note:
        audit.notes.append(f"note: {audit.entry.counts_note}")


def _check_class_folders(audit: Audit, image_dir: Path) -> None:
    folders = {p.name.lower(): p for p in image_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    wanted = [classname.replace(" ", "_") for classname in audit.entry.facts.classnames]
    missing = [w for w in wanted if w.lower() not in folders]
    if missing:
        audit.problems.append(f"class folders missing in {image_dir}: {', '.join(missing)}")
    extra = sorted(p.name for key, p in folders.items() if key not in {w.lower() for w in wanted})
    if extra:
        audit.notes.append(f"folders that are no class of {audit.entry.name} (ignored): {', '.join(extra[:SHOWN])}")
    on_disk = sum(len(list_images(folders[w.lower()])) for w in wanted if w.lower() in folders)
    audit.notes.append(f"{len(wanted) - len(missing)} class folders, {on_disk} images in them")
