"""Writing files safely: the one home of atomic writes, built-in-temp-then-rename folders, the
cache folder and file modes.

* `atomic_write`: a file is written to a temporary name in its own folder, flushed to disk and
  renamed over the target, so a reader (or a kill at any moment) sees the old file or the new one,
  never half of one. ``exclusive=True`` never replaces an existing file.
* `atomic_directory`: a folder is built under a temporary name and renamed into place once it is
  complete; when another process finished the same folder first, its copy is kept.
* `sha256_file`: the SHA-256 of a file (downloads are checked against the digest the hub publishes).
* `read_json`: a JSON file whose every failure (missing, a folder, not UTF-8, invalid, nested too
  deeply for the parser) is one error naming the file; `read_yaml` the same for a YAML file of
  settings, with the line.
* Files get the user's normal mode (``0o666`` minus the umask), not the ``0o600`` of a temporary
  file, so that others in a shared group can read checkpoints and results as they can any file the
  user writes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import yaml

__all__ = ["JSONFileError", "YAMLFileError", "atomic_directory", "atomic_write", "cache_root", "default_file_mode",
           "is_sha256", "read_json", "read_yaml", "sha256_file"]


def cache_root() -> Path:
    """Where generated models, demo data and feature caches live: ``$DPT_CACHE_DIR``, default
    ``~/.cache/dpt_lightning``."""
    return Path(os.environ.get("DPT_CACHE_DIR", Path.home() / ".cache" / "dpt_lightning")).expanduser()


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: ``0o666`` minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, data: bytes | str | Callable[[BinaryIO], object], *,
                 exclusive: bool = False, encoding: str = "utf-8") -> Path:
    """Write ``data`` (bytes, text, or a function that writes into a binary file object) to
    ``path`` atomically; returns ``path``.

    With ``exclusive`` an existing ``path`` is never replaced: ``FileExistsError`` before anything
    is written, and also when another process created the file meanwhile.
    """
    path = Path(path)
    if exclusive and path.exists():
        raise FileExistsError(f"{path} exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode(encoding) if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        if exclusive:
            _link_exclusive(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _link_exclusive(tmp: str, path: Path) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist (a hard link fails if it does)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists") from None
    except OSError:  # a file system without hard links: check, then rename
        if path.exists():
            raise FileExistsError(f"{path} exists") from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``target``, then rename it to ``target``.

    Yields the temporary folder to fill. If the body raises, the temporary folder is removed and
    ``target`` is untouched. If ``target`` exists by the time the body finishes (another process
    built it concurrently), the finished copy there is kept and this one is discarded.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_sha256(text: str) -> bool:
    """Is ``text`` a SHA-256 in hexadecimal (as the ETag the hub gives a large file is)?"""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """The SHA-256 of the file ``path``, as 64 hexadecimal digits (read in chunks: any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _read_text(path: Path, what: str, kind: str, error: type[ValueError]) -> str:
    """The UTF-8 text of ``path`` (a ``what`` in ``kind`` format, for messages); a missing file is
    a ``FileNotFoundError``, a folder, an unreadable file or bytes that are not UTF-8 an ``error``
    naming the file (and the line of the first byte that is not UTF-8)."""
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        raise error(f"{path}: is a folder, not a {what} (give the path of the {kind} file)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise error(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise error(f"{path}: line {line} is not UTF-8 text ({err.reason} at byte {err.start}); save the {what} "
                    "as UTF-8") from None


class JSONFileError(ValueError):
    """A JSON file that cannot be read, in one line naming the file and what to do."""


def read_json(path: str | Path, what: str) -> object:
    """The content of the UTF-8 JSON file ``path`` (a ``what``, e.g. "split file", for messages).

    A missing file is a ``FileNotFoundError``; a folder, an unreadable file, bytes that are not
    UTF-8, invalid JSON and JSON nested too deeply to parse (which Python reports as a bare
    ``RecursionError`` naming no file) are a `JSONFileError` naming the file.
    """
    path = Path(path)
    text = _read_text(path, what, "JSON", JSONFileError)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise JSONFileError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise JSONFileError(f"{path}: lists or objects nested too deeply to be a {what} (a {what} is at most "
                            "a few levels deep)") from None


class YAMLFileError(ValueError):
    """A YAML file that cannot be read, in one line naming the file, the line and what to do."""


def read_yaml(path: str | Path, what: str) -> dict:
    """The settings of the UTF-8 YAML file ``path``: a mapping (an empty file: ``{}``).

    A missing file is a ``FileNotFoundError``; a folder, an unreadable file, bytes that are not
    UTF-8, invalid YAML and a top level that is not a mapping (a list, a bare value) are a
    `YAMLFileError` naming the file and the line.
    """
    path = Path(path)
    text = _read_text(path, what, "YAML", YAMLFileError)
    try:
        content = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = "; ".join(" ".join(part.split()) for part in (err.context, err.problem) if part)
        raise YAMLFileError(f"{path}{where}: not valid YAML ({reason})") from None
    except (yaml.YAMLError, RecursionError) as err:
        raise YAMLFileError(f"{path}: not valid YAML ({' '.join(str(err).split()) or 'nested too deeply'})") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        start = yaml.compose(text, Loader=yaml.SafeLoader).start_mark.line + 1
        kind = "a list" if isinstance(content, list) else f"the value {str(content)[:40]!r}"
        raise YAMLFileError(f"{path}, line {start}: a {what} is a mapping of settings (key: value), not {kind}")
    return content
