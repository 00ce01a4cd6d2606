"""Reliability: exact resume after SIGKILL, determinism, atomic checkpoints, NaN guard, bad settings."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from dpt_lightning import CoOp, DemoDataModule
from dpt_lightning.checkpoint_io import AtomicCheckpointIO
from dpt_lightning.methods.base import NonFiniteLossError

pytestmark = pytest.mark.usefixtures("tiny_demo_backbone")  # built once, before any dpt subprocess
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["--config", str(ROOT / "trainers/coop.yaml"), "--config", str(ROOT / "datasets/demo.yaml")]


def dpt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "helpers")}
    return subprocess.run([sys.executable, "-m", "dpt_lightning", *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=600)


def _final(run_dir: Path) -> tuple[torch.Tensor, float]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    return ckpt["state_dict"]["prompt.ctx"], float(metrics["test_acc"].dropna().iloc[-1])


@pytest.mark.slow
def test_fit_killed_mid_epoch_resumes_exactly(tmp_path):
    """SIGKILL in epoch 2, resume with --ckpt_path last: same prompt and accuracy as uninterrupted."""
    # 2-step epochs with augmentation, shuffling, momentum, warm-up and cosine all in play
    common = [*CONFIGS, "--trainer.max_epochs", "4", "--data.num_shots", "4", "--data.batch_size", "8"]
    whole = tmp_path / "whole"
    done = dpt("fit", *common, "--trainer.default_root_dir", str(whole), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    broken = tmp_path / "broken"
    killed = dpt("fit", *common, "--trainer.default_root_dir", str(broken),
                 "--trainer.callbacks+=killer.KillAt", "--trainer.callbacks.epoch=2", "--trainer.callbacks.batch=1",
                 cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    interrupted = torch.load(broken / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert interrupted["epoch"] == 1  # the last finished epoch before the kill

    resumed = dpt("fit", *common, "--trainer.default_root_dir", str(broken), "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ctx_whole, acc_whole = _final(whole / "lightning_logs/version_0")
    ctx_resumed, acc_resumed = _final(broken / "lightning_logs/version_1")
    assert torch.equal(ctx_whole, ctx_resumed)
    assert acc_whole == acc_resumed


def test_resume_without_a_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    result = dpt("fit", *CONFIGS, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last", cwd=tmp_path)
    assert result.returncode != 0
    assert "no checkpoints/last.ckpt" in result.stderr


def _fit_once(seed: int, folder: Path) -> torch.Tensor:
    seed_everything(seed)
    data = DemoDataModule(num_shots=4, batch_size=4, num_workers=0, seed=seed)
    model = CoOp(classnames=data.classnames, backbone="tiny", backbone_dropout=True)  # dropout in play
    Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=folder).fit(model, datamodule=data)
    return model.prompt.ctx.detach().clone()


def test_same_seed_same_result(tmp_path):
    first, second = _fit_once(3, tmp_path), _fit_once(3, tmp_path)
    assert torch.equal(first, second)
    assert not torch.equal(first, _fit_once(4, tmp_path))


def test_augmentation_does_not_depend_on_workers_or_history():
    data = DemoDataModule(num_shots=2, batch_size=4, num_workers=0)
    data.setup()
    loader = data.train_dataloader()
    loader.sampler.set_epoch(1)
    first = next(iter(loader))["image"]
    torch.manual_seed(12345)  # other code consuming the global generator changes nothing
    torch.rand(100)
    again = next(iter(loader))["image"]
    assert torch.equal(first, again)
    loader.sampler.set_epoch(2)
    assert not torch.equal(first, next(iter(loader))["image"])


def test_a_kill_while_saving_leaves_the_previous_checkpoint_intact(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    script = f"""
import os, signal, torch
from dpt_lightning.checkpoint_io import AtomicCheckpointIO
real_save = torch.save
def dying_save(obj, f, *a, **k):
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
AtomicCheckpointIO().save_checkpoint({{"state_dict": {{"w": torch.zeros(3)}}}}, {str(target)!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL
    state = AtomicCheckpointIO().load_checkpoint(target)
    assert torch.equal(state["state_dict"]["w"], torch.ones(3))


class _NaNAfterTwoSteps(CoOp):
    def compute_loss(self, logits, labels, image_features, text_features):
        losses = super().compute_loss(logits, labels, image_features, text_features)
        if self.global_step >= 2:
            losses["ce"] = losses["loss"] * float("nan")
            losses["loss"] = losses["loss"] + losses["ce"]
        return losses


def test_non_finite_loss_stops_with_the_step_and_the_term(tmp_path):
    data = DemoDataModule(num_shots=4, batch_size=4, num_workers=0)
    model = _NaNAfterTwoSteps(classnames=data.classnames, backbone="tiny")
    trainer = Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss, ce at epoch 0, step 2"):
        trainer.fit(model, datamodule=data)


@pytest.mark.parametrize("flag,value,message", [
    ("--data.num_shots", "0", "num_shots"),
    ("--data.num_shots", "-2", "num_shots"),
    ("--model.n_ctx", "40", "n_ctx=40 does not fit"),
    ("--model.lr", "-1", "model.lr"),
    ("--data.batch_size", "0", "batch_size"),
])
def test_bad_settings_are_clear_errors(tmp_path, flag, value, message):
    from dpt_lightning.cli import build_cli

    with pytest.raises((ValueError, SystemExit)) as info:
        build_cli(["fit", *CONFIGS, flag, value, "--trainer.default_root_dir", str(tmp_path)])
    assert message in str(info.value) or info.type is SystemExit
