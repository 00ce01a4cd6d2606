"""Unpacking a dataset archive safely and installing it into the benchmark layout.

* `unpack_zip`: every member is checked before anything is written: no path that leaves the
  folder (absolute, ``..``, a drive), no links, no duplicates, no encryption, at most
  `MAX_MEMBERS` members and `MAX_UNPACKED_BYTES` in all, no member that inflates more than
  `MAX_RATIO` times (zip bombs), and room on the disk for all of it. While writing, ``zipfile``
  stops each member at the size its header announced and checks its CRC.
* `locate_dataset`: where in an unpacked archive the dataset's folder is (the folder that holds
  ``<DIR>/<class folders>`` and ``split_<DIR>.json``), whatever the archive's top level looks like.
* `install_dataset`: moves that folder to ``<root>/<DIR>`` with one rename. A dataset folder
  therefore exists only complete; a failed or interrupted unpack leaves its work folder in
  ``<root>/.dpt-data/`` (removed by the next run), never a half dataset.
* `prepare_dataset` / `install_archives`: the whole path from archives on disk to an installed
  dataset (``dpt-data prepare``, and the second half of ``dpt-data download``), one process at a
  time per dataset and root (`dataset_lock`).
"""
from __future__ import annotations

import contextlib
import errno
import shutil
import stat
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

from dpt_lightning.data.catalogue import CatalogueEntry

#: The hidden work folder ``dpt-data`` keeps inside the data root (partial downloads, unpacking).
WORK_FOLDER = ".dpt-data"
MAX_MEMBERS = 2_000_000
MAX_UNPACKED_BYTES = 256 * 2 ** 30
#: Deflate cannot compress more than about 1,000 to 1: a member claiming more is built to explode.
MAX_RATIO = 1100
#: Room left on the disk after unpacking.
DISK_MARGIN = 256 * 2 ** 20


class DatasetInstallError(RuntimeError):
    """A dataset that cannot be unpacked or installed, in one message naming the file and what to do."""


@contextlib.contextmanager
def dataset_lock(root: Path, entry: CatalogueEntry) -> Iterator[None]:
    """One ``dpt-data`` at a time per dataset and data root (an OS file lock, freed however the process ends)."""
    from filelock import FileLock, Timeout

    path = work_folder(root) / f"{entry.name}.lock"
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise DatasetInstallError(f"another dpt-data is working on {entry.name} in {root} (lock {path}): wait for "
                                  "it to finish") from None
    try:
        yield
    finally:
        lock.release()


def gib(n: int) -> str:
    """A size for people: GiB, MiB or bytes."""
    if n >= 2 ** 28:
        return f"{n / 2 ** 30:.2f} GiB"
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n} B"


def work_folder(root: Path) -> Path:
    folder = Path(root) / WORK_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk of ``folder`` (or of its nearest existing parent)."""
    folder = Path(folder).absolute()
    return shutil.disk_usage(next(p for p in [folder, *folder.parents] if p.exists())).free


def require_space(needed: int, folder: Path, what: str, fix: str) -> None:
    """A `DatasetInstallError` before anything is written when ``folder``'s disk cannot hold ``needed`` bytes."""
    free = free_bytes(folder)
    if needed + DISK_MARGIN > free:
        raise DatasetInstallError(f"{what} needs {gib(needed)} and the disk of {folder} has {gib(free)} free: "
                                  f"{fix}")


# ----------------------------------------------------------------------------------- unpacking
def member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why the member ``info`` must not be unpacked, or None."""
    name = info.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not name or "\0" in name:
        return "an empty or NUL-containing name"
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or PureWindowsPath(name).root:
        return "an absolute path"
    if ".." in parts:
        return "a path that leaves the archive's folder (..)"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    if info.flag_bits & 0x1:
        return "an encrypted member"
    if info.compress_size and info.file_size / info.compress_size > MAX_RATIO:
        return f"a compression ratio of {info.file_size // info.compress_size}:1 (a zip bomb?)"
    return None


def _archive_members(archive: zipfile.ZipFile, path: Path) -> list[zipfile.ZipInfo]:
    members = archive.infolist()
    if len(members) > MAX_MEMBERS:
        raise DatasetInstallError(f"{path} has {len(members)} members, more than the limit of {MAX_MEMBERS}: "
                                  "not a dataset archive this command unpacks")
    problems, seen = [], set()
    for info in members:
        problem = member_problem(info)
        key = info.filename.replace("\\", "/").rstrip("/")
        if problem is None and key in seen and not info.is_dir():
            problem = "a name that appears twice"
        seen.add(key)
        if problem:
            problems.append(f"{info.filename!r}: {problem}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DatasetInstallError(f"{path} is refused, nothing was unpacked: {shown}")
    total = sum(info.file_size for info in members)
    if total > MAX_UNPACKED_BYTES:
        raise DatasetInstallError(f"{path} would unpack to {gib(total)}, more than the limit of "
                                  f"{gib(MAX_UNPACKED_BYTES)}: not a dataset archive this command unpacks")
    return members


def _copy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> int:
    """Write one member (zipfile reads no more than its announced size); returns that size."""
    with archive.open(info) as source, open(target, "wb") as sink:
        shutil.copyfileobj(source, sink, 1 << 20)
    return info.file_size


def unpack_zip(path: Path, dest: Path, progress: bool = True) -> None:
    """Unpack the zip ``path`` into the new folder ``dest`` after checking every member (module doc);
    on any failure ``dest`` is removed again."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DatasetInstallError(f"{path} is not a readable zip archive ({err}): download it again") from None
    with archive:
        members = _archive_members(archive, path)
        total = sum(info.file_size for info in members)
        require_space(total, dest, f"unpacking {path.name}", "free some space and run the same command again")
        dest.mkdir(parents=True)
        try:
            _unpack_members(archive, members, dest, path, total, progress)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)  # never half an archive
            raise


def _unpack_members(archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], dest: Path, path: Path, total: int,
                    progress: bool) -> None:
    from huggingface_hub.utils import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc=f"unpacking {path.name}", disable=not progress) as bar:
        for info in members:
            target = dest.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                bar.update(_copy_member(archive, info, target))
            except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as err:
                raise DatasetInstallError(f"{path}: member {info.filename!r} cannot be read ({err}): the archive is "
                                          "damaged; download it again") from None


# ------------------------------------------------------------------------------------ the layout
def _class_folders_found(image_dir: Path, entry: CatalogueEntry) -> int:
    folders = {p.name.lower() for p in image_dir.iterdir() if p.is_dir()}
    return sum(name.replace(" ", "_").lower() in folders for name in entry.facts.classnames)


def locate_dataset(unpacked: Path, entry: CatalogueEntry, max_depth: int = 2) -> Path:
    """The folder of ``unpacked`` that holds ``<DIR>/`` with the class folders (and best also the
    split file): the dataset's folder, whatever the archive put above it."""
    name = entry.name
    found: list[tuple[int, int, int, Path]] = []  # (-has split, -class folders, depth, folder)
    level = [unpacked]
    for depth in range(max_depth + 1):
        for folder in level:
            image_dir = folder / name
            if image_dir.is_dir():
                classes = _class_folders_found(image_dir, entry)
                if classes:
                    found.append((-(folder / f"split_{name}.json").is_file(), -classes, depth, folder))
        if depth < max_depth:
            level = [p for folder in level for p in sorted(folder.iterdir()) if p.is_dir() and not p.is_symlink()]
    if not found:
        top = sorted(p.name + ("/" if p.is_dir() else "") for p in unpacked.iterdir())[:10]
        raise DatasetInstallError(f"the archive of {name} holds no {name}/<class folder>/ image folder (its top level: "
                                  f"{', '.join(top) or 'empty'}); expected {name}/{name}/<class>/... and "
                                  f"{name}/split_{name}.json")
    return min(found, key=lambda item: item[:3])[3]


def install_dataset(folder: Path, root: Path, entry: CatalogueEntry, replace: bool = False) -> Path:
    """Install the dataset found in ``folder`` (on the same disk): its image folder and split file,
    nothing else the archive held, go to ``<root>/<DIR>``, which appears in one rename. An existing
    ``<root>/<DIR>`` is an error unless ``replace``: then it is removed once the new copy is in place."""
    name, work = entry.name, work_folder(root)
    target, staged, old = Path(root) / name, work / f"{name}.install", work / f"{name}.replaced"
    if (target.exists() or target.is_symlink()) and not replace:
        raise DatasetInstallError(f"{target} exists: nothing was changed. To replace it: "
                                  f"{entry.fetch_command(root, replace=True)}")
    _remove(staged)
    _remove(old)
    try:
        staged.mkdir()
        (folder / name).rename(staged / name)
        if (folder / f"split_{name}.json").is_file():
            (folder / f"split_{name}.json").rename(staged / f"split_{name}.json")
        if target.exists() or target.is_symlink():
            target.rename(old)
        try:
            staged.rename(target)
        except OSError:
            if (old.exists() or old.is_symlink()) and not target.exists():
                old.rename(target)  # put the previous copy back
            raise
    finally:
        _remove(staged)
    _remove(old)
    return target


def _remove(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a folder, if it is there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def prepare_dataset(entry: CatalogueEntry, archives: Sequence[Path], root: Path, replace: bool = False,
                    progress: bool = True) -> Path:
    """Install ``archives`` (the dataset's zip, or the user's own archives of a licence-bound dataset,
    which the entry's preparer turns into the layout) as ``<root>/<DIR>``; returns that folder
    (`install_archives`, under the dataset's lock)."""
    with dataset_lock(root, entry):
        return install_archives(entry, archives, root, replace, progress)


def install_archives(entry: CatalogueEntry, archives: Sequence[Path], root: Path, replace: bool = False,
                     progress: bool = True) -> Path:
    """Unpack ``archives`` in ``<root>/.dpt-data/`` and install the result as ``<root>/<DIR>``
    (`install_dataset`). Nothing is left in ``root`` on failure. The caller holds `dataset_lock`."""
    root = Path(root)
    target = root / entry.name
    if (target.exists() or target.is_symlink()) and not replace:
        raise DatasetInstallError(f"{target} exists: nothing was changed. To replace it: "
                                  f"{entry.fetch_command(root, replace=True)}")
    for archive in archives:
        if not Path(archive).is_file():
            raise DatasetInstallError(f"archive {archive} not found (give the path of the downloaded file)")
    unpacked = work_folder(root) / f"{entry.name}.unpack"
    shutil.rmtree(unpacked, ignore_errors=True)  # left by an interrupted run
    try:
        if entry.preparer is not None:
            unpacked.mkdir()
            entry.preparer(list(map(Path, archives)), unpacked)
        elif len(archives) != 1:
            raise DatasetInstallError(f"{entry.name} comes as one archive, {entry.archive.filename}; got "
                                      f"{len(archives)}")
        else:
            unpack_zip(Path(archives[0]), unpacked, progress)
        return install_dataset(locate_dataset(unpacked, entry), root, entry, replace)
    except OSError as err:
        raise DatasetInstallError(os_error_message(err, f"unpacking {entry.name} into {root}")) from None
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)


def os_error_message(err: OSError, doing: str) -> str:
    """One line for a file-system error while ``doing`` something (a full disk says so)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (f"{doing}: the disk is full ({err.strerror}); nothing was installed. Free some space and run the "
                "same command again")
    where = f" {err.filename}" if err.filename else ""
    return f"{doing}:{where} {err.strerror or err}; nothing was installed"

