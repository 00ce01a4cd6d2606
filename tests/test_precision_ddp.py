"""Mixed precision and multi-process training.

* ``bf16-mixed`` on CPU (and ``16-mixed`` where a GPU is present): the towers really run in low
  precision, while the logits and every loss term stay float32 (``PromptTrainer.logits`` leaves
  autocast), the loss is the hand-computed cross-entropy of those logits, and training moves the
  prompt without NaN.
* DDP on CPU (2 processes, gloo): ``dpt fit`` and ``dpt test`` work, and the synchronised test
  metrics equal those of one process on the same checkpoint.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from dpt_lightning import BiomedDPT, CoOp, DemoDataModule, MaPLe

pytestmark = pytest.mark.usefixtures("tiny_demo_backbone")  # built once, before any dpt subprocess
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["--config", str(ROOT / "trainers/coop.yaml"), "--config", str(ROOT / "datasets/demo.yaml")]


class DtypeProbe:
    """Mixin that records, inside the real training and evaluation steps, the dtypes of the tower
    outputs, the logits and the loss terms, and whether autocast was on."""

    def configure_prompts(self) -> None:
        super().configure_prompts()
        self.seen = {"tower": set(), "logits": [], "losses": [], "autocast": [], "ce_error": []}
        model = self.backbone.model
        for module in (model.visual.head, model.text.proj):
            module.register_forward_hook(lambda _m, _i, out: self.seen["tower"].add(out.dtype))

    def logits(self, image_features, text_features):
        out = super().logits(image_features, text_features)
        self.seen["logits"].append(out.dtype)
        self.seen["autocast"].append(torch.is_autocast_enabled(self.device.type))
        return out

    def compute_loss(self, logits, labels, image_features, text_features):
        losses = super().compute_loss(logits, labels, image_features, text_features)
        self.seen["losses"].append({name: value.dtype for name, value in losses.items()})
        ce = losses.get("ce", losses["loss"])  # CoOp's loss is the cross-entropy itself
        self.seen["ce_error"].append(float((ce.detach() - F.cross_entropy(logits.detach().double(), labels)).abs()))
        return losses


class ProbedCoOp(DtypeProbe, CoOp):
    pass


class ProbedMaPLe(DtypeProbe, MaPLe):
    pass


class ProbedBiomedDPT(DtypeProbe, BiomedDPT):
    pass


PRECISIONS = [
    pytest.param("bf16-mixed", "cpu", torch.bfloat16, id="bf16-cpu"),
    pytest.param("16-mixed", "gpu", torch.float16, id="fp16-gpu",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a GPU")),
]


@pytest.mark.parametrize("precision, accelerator, low", PRECISIONS)
@pytest.mark.parametrize("method", [ProbedCoOp, ProbedMaPLe, ProbedBiomedDPT], ids=lambda m: m.__name__)
def test_mixed_precision_trains_with_fp32_logits_and_losses(method, precision, accelerator, low, tmp_path):
    data = DemoDataModule(num_shots=4, batch_size=4, test_batch_size=16, num_workers=0)
    model = method(classnames=data.classnames, dataset="demo", backbone="tiny", lr=0.05, warmup_epochs=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer = Trainer(precision=precision, accelerator=accelerator, devices=1, max_epochs=2, limit_train_batches=3,
                      limit_val_batches=0, limit_test_batches=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    seen = model.seen
    assert low in seen["tower"], "autocast did not reach the towers"
    assert all(seen["autocast"]) and len(seen["losses"]) == 6
    assert set(seen["logits"]) == {torch.float32}
    assert all(dtype == torch.float32 for losses in seen["losses"] for dtype in losses.values())
    assert max(seen["ce_error"]) < 1e-5  # the loss is the cross-entropy of the fp32 logits
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and torch.isfinite(p).all(), name
            assert not torch.equal(p.detach(), before[name]), f"{name} did not train"

    seen["logits"].clear()
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    assert seen["logits"] and set(seen["logits"]) == {torch.float32}
    assert all(0.0 <= value <= 1.0 for value in metrics.values())


def test_bf16_mixed_through_the_cli(tmp_path):
    from dpt_lightning.cli import build_cli

    cli = build_cli(["fit", *CONFIGS, "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "1",
                     "--trainer.limit_train_batches", "2", "--trainer.log_every_n_steps", "1",
                     "--trainer.limit_test_batches", "1", "--trainer.default_root_dir", str(tmp_path),
                     "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.precision == "bf16-mixed"
    table = pd.read_csv(Path(cli.trainer.log_dir) / "metrics.csv")
    losses = table["train_loss"].dropna()
    assert len(losses) == 2 and losses.map(math.isfinite).all()
    assert 0.0 <= table["test_acc"].dropna().iloc[-1] <= 1.0


# ------------------------------------------------------------------------------------------ DDP
def dpt(*args: str, cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "dpt_lightning", *args], cwd=cwd, capture_output=True, text=True,
                            env=os.environ.copy(), timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"dpt {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")


def logged_test_metrics(root: Path) -> dict[str, float]:
    """The test metrics of the only run logged under ``root`` (CSV logger)."""
    (version,) = sorted((root / "lightning_logs").glob("version_*"))
    table = pd.read_csv(version / "metrics.csv")
    return {k: float(table[k].dropna().iloc[-1]) for k in table.columns if k.startswith("test_")}





@pytest.mark.slow
def test_ddp_fit_and_test_match_one_process(tmp_path):
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    dpt("fit", *CONFIGS, *ddp, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "fit"),
        cwd=tmp_path)
    (ckpt,) = (tmp_path / "fit").glob("lightning_logs/version_*/checkpoints/last.ckpt")
    dpt("test", *CONFIGS, "--ckpt_path", str(ckpt), "--trainer.devices", "1",
        "--trainer.default_root_dir", str(tmp_path / "one"), cwd=tmp_path)
    dpt("test", *CONFIGS, *ddp, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(tmp_path / "two"),
        cwd=tmp_path)

    one = logged_test_metrics(tmp_path / "one")
    assert set(one) >= {"test_acc", "test_macro_acc", "test_f1", "test_auroc"}
    # the demo's 48 test images split evenly over 2 processes: no DistributedSampler padding
    for name in ("fit", "two"):
        synced = logged_test_metrics(tmp_path / name)
        assert synced["test_acc"] == one["test_acc"], name
        assert synced == pytest.approx(one, abs=1e-6), name
