"""The real ``dpt`` command end to end on the offline demo: fit, checkpoint, test, predict."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.usefixtures("tiny_demo_backbone")  # built once, before any dpt subprocess
ROOT = Path(__file__).resolve().parents[1]
DPT = [sys.executable, "-m", "dpt_lightning"]


def dpt(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*DPT, *args], cwd=cwd, capture_output=True, text=True, env=os.environ.copy(),
                            timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"dpt {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def test_help_and_print_config(tmp_path):
    assert "fit" in dpt("--help", cwd=tmp_path).stdout
    assert "--model CONFIG" in dpt("fit", "--help", cwd=tmp_path).stdout
    printed = dpt("fit", "--print_config", "--config", str(ROOT / "trainers/coop.yaml"),
                  "--config", str(ROOT / "datasets/demo.yaml"), cwd=tmp_path).stdout
    assert "class_path: dpt_lightning.CoOp" in printed and "backbone: tiny" in printed
    assert "class_path: dpt_lightning.DemoDataModule" in printed


def _metrics(version_dir: Path) -> dict:
    table = pd.read_csv(version_dir / "metrics.csv")
    return {k: table[k].dropna().iloc[-1] for k in table.columns if table[k].notna().any()}


@pytest.mark.slow
def test_fit_checkpoint_test_predict_round_trip(tmp_path):
    configs = ["--config", str(ROOT / "trainers/coop.yaml"), "--config", str(ROOT / "datasets/demo.yaml")]
    fit = dpt("fit", *configs, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path)
    assert "test_acc" in fit.stdout
    fit_dir = tmp_path / "lightning_logs" / "version_0"
    fitted = _metrics(fit_dir)
    selection = fit_dir / "fewshot_split.json"
    assert selection.is_file()

    ckpt = fit_dir / "checkpoints" / "last.ckpt"
    assert ckpt.stat().st_size < 50_000, "the frozen backbone must not be in the checkpoint"
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert list(state["state_dict"]) == ["prompt.ctx"]
    assert state["method_settings"]["classnames"] == ["circle", "cross", "square", "stripes"]
    assert state["dpt_lightning"]["backbone"]["text_width"] == 32
    recorded = state["fewshot_selection"]  # the checkpoint records the images it was trained on
    written = json.loads(selection.read_text())
    assert recorded["train"] == written["train"] and recorded["val"] == written["val"]
    assert len(recorded["train"]) == 4 * recorded["num_shots"] and recorded["datamodule"] == "DemoDataModule"

    dpt("test", *configs, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path)
    tested = _metrics(tmp_path / "lightning_logs" / "version_1")
    assert tested["test_acc"] == fitted["test_acc"]
    assert tested["test_f1"] == fitted["test_f1"]

    out = tmp_path / "predictions.csv"
    dpt("predict", *configs, "--ckpt_path", str(ckpt), "--predictions.path", str(out),
        "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path)
    table = pd.read_csv(out)
    assert list(table.columns) == ["path", "prediction", "prob_circle", "prob_cross", "prob_square", "prob_stripes"]
    assert len(table) == 48  # the demo's test split: 12 images per class
    assert table.filter(like="prob_").sum(axis=1).round(4).eq(1).all()
    accuracy = (table["prediction"] == table["path"].map(lambda p: Path(p).parent.name)).mean()
    assert accuracy == pytest.approx(fitted["test_acc"], abs=1e-6)

    again = dpt("predict", *configs, "--ckpt_path", str(ckpt), "--predictions.path", str(out),
                "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path, check=False)
    assert again.returncode != 0 and "--predictions.overwrite" in again.stderr


def test_zero_shot_test_runs_in_process(tmp_path):
    from dpt_lightning.cli import build_cli

    cli = build_cli(["test", "--config", str(ROOT / "trainers/zeroshot.yaml"), "--config",
                     str(ROOT / "datasets/demo.yaml"), "--trainer.default_root_dir", str(tmp_path),
                     "--trainer.enable_progress_bar", "false"])
    assert 0.0 <= float(cli.trainer.callback_metrics["test_acc"]) <= 1.0
    assert cli.model.classnames == cli.datamodule.classnames
