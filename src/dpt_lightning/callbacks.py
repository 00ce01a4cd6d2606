"""Callbacks the CLI adds to every run: the few-shot selection and the prediction CSV."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from dpt_lightning.files import atomic_write


def run_dir(trainer: Trainer) -> Path:
    """The run's log directory (where Lightning writes its logs and the saved config).

    Under DDP ``trainer.log_dir`` is a collective (a broadcast from rank 0): every process must
    call this, never only rank 0, or the run deadlocks."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class SelectionWriter(Callback):
    """Records the few-shot selection of every fit: in ``<log dir>/fewshot_split.json`` (a split
    file that reruns on exactly these images) and in every checkpoint, as
    ``checkpoint["fewshot_selection"]``: the data module, ``num_shots``, ``seed`` and the selected
    ``train`` and ``val`` items (``[relpath, label, classname]``; the test split is the dataset's own,
    so it is not copied)."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = trainer.datamodule
        path = run_dir(trainer) / "fewshot_split.json"  # on every rank (collective under DDP)
        if trainer.is_global_zero and datamodule is not None and hasattr(datamodule, "save_fewshot_split"):
            if not path.exists():
                datamodule.save_fewshot_split(path)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or getattr(datamodule, "selection", None) is None:
            return
        checkpoint["fewshot_selection"] = {
            "datamodule": type(datamodule).__name__,
            "num_shots": datamodule.num_shots,
            "seed": datamodule.seed,
            **datamodule.fewshot_split(splits=("train", "val")),  # not the test split: thousands of items
        }


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict`` results as CSV: path, predicted class, one probability per class.

    The file is written once, atomically, after the last batch: an interrupted or failed predict
    leaves no partial file behind.

    Args:
        path: output file (default ``<log dir>/predictions.csv``).
        overwrite: replace an existing file; otherwise an existing file is an error (checked before
            inference starts, and again when writing).
    """

    def __init__(self, path: str | None = None, overwrite: bool = False):
        super().__init__(write_interval="epoch")
        self.path = path
        self.overwrite = overwrite

    def _target(self, trainer: Trainer) -> Path:
        return Path(self.path) if self.path else run_dir(trainer) / "predictions.csv"

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        target = self._target(trainer)
        if target.exists() and not self.overwrite:
            raise FileExistsError(f"{target} exists; choose another --predictions.path or pass "
                                  "--predictions.overwrite true")

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions, batch_indices) -> None:
        target = self._target(trainer)  # on every rank (collective under DDP)
        if not predictions or not trainer.is_global_zero:
            return
        if isinstance(predictions[0], list):  # several dataloaders
            predictions = [p for group in predictions for p in group]
        names = pl_module.classnames
        probs = torch.cat([p["probs"] for p in predictions]).float().cpu()
        table = pd.DataFrame({
            "path": [path for p in predictions for path in p["path"]],
            "prediction": [names[i] for i in probs.argmax(1).tolist()],
            **{f"prob_{name}": probs[:, k].numpy() for k, name in enumerate(names)},
        })
        atomic_write(target, table.to_csv(index=False), exclusive=not self.overwrite)
        print(f"predictions of {len(table)} images written to {target}")
