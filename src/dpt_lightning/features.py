"""A disk cache of evaluation image features for methods whose image path learns nothing.

Zero-shot, CoOp, BiomedCoOp and Biomed-DPT (fixed zero tokens) encode every test image the same
way in every run of a benchmark grid. The cache keeps those features under a key that covers
everything they depend on, so a stale feature can never be served:

* the backbone: a digest of all its weights (and its architecture facts);
* the image path: the method's visual prompt setting (``PromptTrainer.image_path_key``);
* the evaluation transform (its full ``repr``);
* each file: its resolved path, size and modification time (ns).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from dpt_lightning.files import atomic_write


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, shapes, dtypes, values), computed once per module."""
    cached = getattr(module, "_dpt_weights_digest", None)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    value = digest.hexdigest()
    object.__setattr__(module, "_dpt_weights_digest", value)
    return value


def file_identity(path: str) -> tuple[str, int, int]:
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_size, stat.st_mtime_ns


class EvalFeatureCache:
    """Features of images by file identity, in one file per (backbone, image path, transform)."""

    def __init__(self, folder: str | Path, backbone_digest: str, image_path_key: str, transform_repr: str):
        key = hashlib.sha256("\n".join([backbone_digest, image_path_key, transform_repr]).encode()).hexdigest()
        self.file = Path(folder) / f"{key[:32]}.pt"
        self.entries: dict[str, tuple[int, int, Tensor]] = {}
        if self.file.is_file():
            self.entries = torch.load(self.file, weights_only=True)
        self.dirty = False

    def get(self, path: str) -> Tensor | None:
        real, size, mtime = file_identity(path)
        entry = self.entries.get(real)
        if entry is None or entry[0] != size or entry[1] != mtime:
            return None
        return entry[2]

    def put(self, path: str, feature: Tensor) -> None:
        real, size, mtime = file_identity(path)
        self.entries[real] = (size, mtime, feature.detach().float().cpu().clone())
        self.dirty = True

    def features(self, paths: list[str], images: Tensor, encode: Callable[[Tensor], Tensor]) -> Tensor:
        """Features (B, D) of a batch: cached ones where present, the rest from ``encode`` on the
        missing images (and stored)."""
        cached = [self.get(p) for p in paths]
        missing = [i for i, f in enumerate(cached) if f is None]
        if missing:
            fresh = encode(images[missing])
            for i, feature in zip(missing, fresh):
                self.put(paths[i], feature)
                cached[i] = feature
        return torch.stack([f.to(images.device) for f in cached])

    def flush(self) -> None:
        """Write the cache atomically (only if something was added)."""
        if not self.dirty:
            return
        atomic_write(self.file, lambda f: torch.save(self.entries, f))
        self.dirty = False
