"""Checkpoints written atomically: a kill while saving never leaves a half-written file."""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dpt_lightning.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the same folder, flushes it to disk, then renames it over the
    target (`files.atomic_write`), so ``last.ckpt`` is always either the old or the new file, with
    the user's normal file mode. Loading uses ``weights_only=True``: a checkpoint cannot run code."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        kwargs = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=True, **kwargs)
