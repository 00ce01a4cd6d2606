"""The image-feature store: what the frozen image tower computed, kept on disk and shared by every
run and process of a machine (a benchmark grid, local workers, a job array).

A method whose image path is fixed (``PromptTrainer.image_path_key()`` is not None: the plain
frozen tower, or constant visual tokens) computes the same feature for the same view of the same
image in every run. The store keeps the tower's pooled token (before the projection, which is the
one step whose last bits may depend on the batch) under a key that covers everything it depends
on, so a stale or foreign feature can never be served:

* the backbone: a digest of all its weights; the image path: the method's ``image_path_key``
  (one folder per pair);
* the view (built by the dataset, `data.dataset.view_key`): the transform (its full ``repr``),
  the image folder, and for a training view the data seed, epoch and index that seed its
  augmentation;
* the file: its resolved path, size and modification time (ns).

Shards. New features are written, at the end of every epoch, as a new file ``<group>-<id>.pt`` of
their view group (one transform and seed of one image folder) with `files.atomic_write`: a shard is
complete or absent, never partial, and never modified. Two processes that compute the same views
write two shards with the same values, which is harmless. A run loads only the shards of the groups
it asks for. The store's total size is bounded (``DPT_FEATURE_STORE_GB``, default 20): the oldest
shards are deleted beyond it, with a warning. ``dpt-bench --clear-cache`` empties it.

A shard starts with a header and the SHA-256 of its content, checked on every read: a shard whose
bytes changed (a bad disk, an edit, a copy cut short, an older format) is never served; it is
removed with one warning and its features are recomputed. The store is a cache and never stops a
run: when it cannot be written (a read-only shared folder, a full disk, a ``DPT_FEATURE_STORE_GB``
that is not a number, found when the store opens), one warning names the folder or file and the
reason, and the run goes on without storing (still reading what is there).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from dpt_lightning.files import atomic_write, cache_root

DEFAULT_LIMIT_GB = 20.0
#: The first bytes of a shard (format 1: followed by the SHA-256 of the rest, then ``torch.save``'s bytes).
SHARD_HEADER = b"dpt-features-1\n"
DIGEST_BYTES = 32


def store_root() -> Path:
    """Where every feature store lives: ``$DPT_CACHE_DIR/features``."""
    return cache_root() / "features"


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, shapes, dtypes, values), computed once per module."""
    cached = getattr(module, "_dpt_weights_digest", None)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself, no copy
    value = digest.hexdigest()
    object.__setattr__(module, "_dpt_weights_digest", value)
    return value


def file_identity(path: str) -> tuple[str, int, int]:
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_size, stat.st_mtime_ns


def limit_bytes() -> int:
    """The store's size bound: ``DPT_FEATURE_STORE_GB`` (default 20) gigabytes."""
    value = os.environ.get("DPT_FEATURE_STORE_GB", str(DEFAULT_LIMIT_GB))
    try:
        gigabytes = float(value)
    except ValueError:
        gigabytes = math.nan
    if not math.isfinite(gigabytes) or gigabytes < 0:
        raise ValueError(f"DPT_FEATURE_STORE_GB={value!r} is not a number of gigabytes (0 or more)")
    return int(gigabytes * 2**30)


def encode_shard(entries: dict[tuple, Tensor]) -> bytes:
    """A shard's bytes: `SHARD_HEADER`, the SHA-256 of the payload, the payload (``torch.save``)."""
    buffer = io.BytesIO()
    torch.save(entries, buffer)
    payload = buffer.getvalue()
    return SHARD_HEADER + hashlib.sha256(payload).digest() + payload


def decode_shard(data: bytes) -> dict[tuple, Tensor]:
    """The entries of a shard's bytes; a `ValueError` saying why when they are not a shard of this
    format whose content matches its checksum."""
    start = len(SHARD_HEADER) + DIGEST_BYTES
    if not data.startswith(SHARD_HEADER) or len(data) < start:
        raise ValueError("no shard header (an older format, or altered)")
    payload = memoryview(data)[start:]
    if hashlib.sha256(payload).digest() != data[len(SHARD_HEADER):start]:
        raise ValueError("its content does not match its checksum")
    try:
        entries = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever torch reports, the shard is not usable
        raise ValueError(f"unreadable ({type(err).__name__})") from None
    if not isinstance(entries, dict):
        raise ValueError("not a mapping of features")
    return entries


class FeatureStore:
    """The features of one (backbone, image path): a folder of shards (module docstring).

    ``pooled(paths, views, images, pool)`` returns the pooled tokens (B, W) of a batch: stored ones
    where present, the others from ``pool`` on the missing images only (and kept for ``flush``).
    """

    def __init__(self, backbone_digest: str, image_path_key: str, root: str | Path | None = None):
        key = hashlib.sha256(f"{backbone_digest}\n{image_path_key}".encode()).hexdigest()[:32]
        self.root = Path(root) if root is not None else store_root()
        self.folder = self.root / key
        self.entries: dict[tuple, Tensor] = {}
        self.new: dict[str, dict[tuple, Tensor]] = {}
        self.groups: set[str] = set()
        self.hits = self.misses = 0
        self.read_only: str | None = None  # why this store stopped writing, if it did
        self.limit: int | None = None  # bytes, DPT_FEATURE_STORE_GB read when the store opens
        try:
            self.limit = limit_bytes()
        except ValueError as err:
            self.stop_writing(str(err), f"set DPT_FEATURE_STORE_GB to a number of gigabytes (default "
                                        f"{DEFAULT_LIMIT_GB:g})")

    def stop_writing(self, reason: str, remedy: str = "make the folder writable, free space, or point "
                                                      "DPT_CACHE_DIR to another folder") -> None:
        """Go on without storing (the one warning of this store, naming ``reason`` and ``remedy``)."""
        self.read_only, self.new = reason, {}
        rank_zero_warn(f"feature store {self.folder}: {reason}; this run goes on without storing image features "
                       f"(they are computed as usual, the results are the same). To store them, {remedy}")

    # ------------------------------------------------------------------ reading
    def _load_group(self, group: str) -> None:
        self.groups.add(group)
        rejected = []
        for shard in sorted(self.folder.glob(f"{group}-*.pt")):
            try:
                data = shard.read_bytes()
            except OSError:  # deleted by a size limit meanwhile, or unreadable: a miss
                continue
            try:
                self.entries.update(decode_shard(data))
            except ValueError as err:
                rejected.append(f"{shard.name}: {err}")
                with contextlib.suppress(OSError):
                    shard.unlink()  # recomputed and stored again by this run
        if rejected:
            rank_zero_warn(f"feature store {self.folder}: {len(rejected)} shard(s) failed their checksum check and "
                           f"are not served ({'; '.join(rejected[:3])}{' ...' if len(rejected) > 3 else ''}); "
                           "removed, their features are recomputed")

    def get(self, path: str, view: str) -> Tensor | None:
        """The stored feature of ``path`` seen as ``view``; None if absent or if the view cannot be
        reproduced (an empty view: a random transform without a seed)."""
        if not view:
            return None
        group = view.split(":", 1)[0]
        if group not in self.groups:
            self._load_group(group)
        return self.entries.get((*file_identity(path), view))

    def pooled(self, paths: list[str], views: list[str], images: Tensor,
               pool: Callable[[Tensor], Tensor]) -> Tensor:
        found = [self.get(p, v) for p, v in zip(paths, views)]
        missing = [i for i, f in enumerate(found) if f is None]
        self.hits += len(found) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = pool(images[missing] if len(missing) < len(found) else images)
            for i, feature in zip(missing, fresh):
                if views[i]:
                    self.put(paths[i], views[i], feature)
                found[i] = feature
        return torch.stack([f.to(images.device) for f in found])

    # ------------------------------------------------------------------ writing
    def put(self, path: str, view: str, feature: Tensor) -> None:
        key = (*file_identity(path), view)
        value = feature.detach().cpu().clone()
        self.entries[key] = value
        if self.read_only is None:
            self.new.setdefault(view.split(":", 1)[0], {})[key] = value

    def flush(self) -> None:
        """Write the new features as one shard per group, atomically; then keep the size bound. A
        write error stops the storing (`stop_writing`), never the run."""
        new, self.new = self.new, {}
        if not new:
            return
        shard = self.folder
        try:
            for group, entries in new.items():
                shard = self.folder / f"{group}-{uuid.uuid4().hex[:12]}.pt"
                atomic_write(shard, encode_shard(entries))
            enforce_limit(self.root, self.limit)
        except OSError as err:
            self.stop_writing(f"cannot write {err.filename or shard} ({err.strerror or err})")


def shards(root: Path) -> list[tuple[Path, int]]:
    """Every shard under ``root`` with its size, oldest first (shards deleted meanwhile are left out)."""
    found = []
    for path in root.glob("*/*.pt") if root.is_dir() else []:
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        found.append((stat.st_mtime_ns, path, stat.st_size))
    return [(path, size) for _, path, size in sorted(found)]


def store_size(root: Path | None = None) -> tuple[int, int]:
    """(bytes, shards) of every store under ``root`` (default `store_root`)."""
    files = shards(root or store_root())
    return sum(size for _, size in files), len(files)


def enforce_limit(root: Path, limit: int | None = None) -> int:
    """Delete the oldest shards until the stores under ``root`` fit ``limit`` bytes; returns the
    bytes freed (and warns when it freed any)."""
    limit = limit_bytes() if limit is None else limit
    files = shards(root)
    total, freed = sum(size for _, size in files), 0
    for path, size in files:
        if total - freed <= limit:
            break
        try:
            path.unlink(missing_ok=True)
        except OSError:  # another user's shard in a shared store, a read-only folder: kept
            continue
        freed += size
    if freed:
        rank_zero_warn(f"feature store {root}: removed {freed / 2**20:.1f} MiB of the oldest features to stay within "
                       f"{limit / 2**30:.1f} GiB (DPT_FEATURE_STORE_GB); they are recomputed when needed")
    return freed
