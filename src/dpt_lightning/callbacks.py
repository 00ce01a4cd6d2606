"""Callbacks the CLI adds to every run: the few-shot selection, the prediction CSV, the
divergence guard and the notice of an untrained evaluation."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn

from dpt_lightning.files import atomic_write


def run_dir(trainer: Trainer) -> Path:
    """The run's log directory (where Lightning writes its logs and the saved config).

    Under DDP ``trainer.log_dir`` is a collective (a broadcast from rank 0): every process must
    call this, never only rank 0, or the run deadlocks."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class SelectionWriter(Callback):
    """Records the few-shot selection of every fit: in ``<log dir>/fewshot_split.json`` (a split
    file that reruns on exactly these images) and in every checkpoint, as
    ``checkpoint["fewshot_selection"]``: the data module, ``num_shots``, ``seed`` (the run's),
    ``selection_seed`` (the one that selected the images) and the selected ``train`` and ``val``
    items (``[relpath, label, classname]``; the test split is the dataset's own, so it is not copied)."""

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
            "selection_seed": getattr(datamodule, "selection_seed", datamodule.seed),
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


class DivergenceError(FloatingPointError):
    """Training ran away (prompt norms or the loss exploded) and ``--divergence.stop`` is set."""


class DivergenceGuard(Callback):
    """Notices a fit that runs away while every number stays finite (a learning rate far too large
    makes prompts grow without bound while the normalised features keep the logits finite).

    After every training step: a trainable tensor whose norm grew beyond ``norm_growth`` times its
    norm at the start of the fit (at least ``sqrt(numel) * 0.01``, for tensors that start at zero),
    or a loss beyond ``loss_growth`` times the first step's (at least 1), gives one warning naming
    the tensor, the step and what to do; with ``stop`` the fit ends with `DivergenceError` instead.
    A method whose parameters legitimately grow far from their start (a linear probe fitted from
    zero) sets ``guard_parameter_growth = False``: only its loss is watched.

    Args:
        norm_growth: allowed growth of a trainable tensor's norm.
        loss_growth: allowed growth of the training loss.
        stop: end the fit instead of warning.
    """

    def __init__(self, norm_growth: float = 100.0, loss_growth: float = 100.0, stop: bool = False):
        self.norm_growth, self.loss_growth, self.stop = norm_growth, loss_growth, stop
        self._start: dict[str, float] = {}
        self._first_loss: float | None = None
        self._warned = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        watched = getattr(pl_module, "guard_parameter_growth", True)
        self._start = {name: max(p.detach().norm().item(), 0.01 * p.numel() ** 0.5)
                       for name, p in pl_module.named_parameters() if watched and p.requires_grad and p.numel()}
        self._first_loss = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._warned:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        problems = []
        if isinstance(loss, torch.Tensor):
            value = loss.detach().float().item()
            self._first_loss = value if self._first_loss is None else self._first_loss
            if value > self.loss_growth * max(self._first_loss, 1.0):
                problems.append(f"the loss is {value:.3g}, {value / max(self._first_loss, 1.0):.0f}x its first value")
        with torch.no_grad():
            for name, p in pl_module.named_parameters():
                start = self._start.get(name)
                if start is not None and p.norm().item() > self.norm_growth * start:
                    problems.append(f"{name} has norm {p.norm().item():.3g}, {p.norm().item() / start:.3g}x its start")
        if not problems:
            return
        message = (f"training is diverging at epoch {trainer.current_epoch}, step {trainer.global_step}: "
                   f"{'; '.join(problems[:3])}. Lower --model.init_args.lr (or check the loss weights)")
        if self.stop:
            raise DivergenceError(message + "; stopped because --divergence.stop is true")
        rank_zero_warn(message + "; add --divergence.stop true to stop such a run")
        self._warned = True


#: The file in the run folder that records an evaluation of a method with nothing learned.
UNTRAINED_FILE = "UNTRAINED.txt"


class UntrainedNotice(Callback):
    """Says so when a method that learns (``learns``) is validated, tested or predicts with nothing
    learned: no checkpoint was loaded and nothing was fitted in this run, so its numbers are the
    initial prompt's. A warning in the console, unless ``allow`` (the command's ``--untrained
    true``: on purpose), and in either case `UNTRAINED_FILE` in the run folder, so that the run's
    files say it too."""

    def __init__(self, allow: bool = False):
        self.allow = allow

    def _notice(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not getattr(pl_module, "learns", False) or getattr(pl_module, "weights_source", "fit") is not None:
            return
        folder = run_dir(trainer)  # on every rank (collective under DDP)
        message = (f"{stage} of an UNTRAINED {type(pl_module).__name__}: no --ckpt_path was given and nothing was "
                   "fitted in this run, so these are the numbers of its initial parameters, not of a trained "
                   "model.")
        if trainer.is_global_zero:
            atomic_write(folder / UNTRAINED_FILE, message + (" Asked for with --untrained true.\n" if self.allow else
                                                            "\n"))
        if not self.allow:
            rank_zero_warn(f"{message} Pass --ckpt_path PATH (or --ckpt_path last: this config's last fit) for a "
                           "trained model, or --untrained true to do this on purpose (and silence this warning)")

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":  # not the validation inside a fit
            self._notice(trainer, pl_module, "validation")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._notice(trainer, pl_module, "test")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._notice(trainer, pl_module, "predict")
