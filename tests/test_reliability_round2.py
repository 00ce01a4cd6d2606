"""Reliability, round 2 (issue 15): checkpoints cannot override the user's settings or import code,
backbone identity by weights, ``--ckpt_path last`` finds this run's own checkpoint, over-long texts,
one-screen errors, divergence that stays finite, and file modes."""
from __future__ import annotations

import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from dpt_lightning import CoOp, ZeroShot
from dpt_lightning.cli import build_cli, main
from dpt_lightning.export import export_checkpoint
from dpt_lightning.methods import CheckpointMismatchError
from dpt_lightning.runs import RunNotFoundError, last_checkpoint

pytestmark = pytest.mark.usefixtures("tiny_demo_backbone")
ROOT = Path(__file__).resolve().parents[1]
DEMO = ["--config", str(ROOT / "datasets/demo.yaml")]
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--data.num_workers", "0",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--test_after_fit", "false", "--data.num_shots", "2"]


def config(name: str) -> list[str]:
    return ["--config", str(ROOT / f"trainers/{name}.yaml"), *DEMO, *QUICK]


def fit(name: str, root: Path, *extra: str) -> Path:
    main(["fit", *config(name), "--trainer.default_root_dir", str(root), *extra])
    return max(root.glob("lightning_logs/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime_ns)


def fails(capsys, *args: str) -> str:
    """Run ``dpt`` in-process; it must exit with status 2 and one message, no traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "dpt: error:" in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def vpt_ckpt(tmp_path_factory) -> Path:
    return fit("vpt", tmp_path_factory.mktemp("vpt"))


@pytest.fixture(scope="module")
def coop_ckpt(tmp_path_factory) -> Path:
    return fit("coop", tmp_path_factory.mktemp("coop"))


# ----------------------------------------------------------------- 2. the config defines the model
def test_a_checkpoint_of_another_method_is_refused_not_obeyed(vpt_ckpt, tmp_path, capsys):
    err = fails(capsys, "test", *config("coop"), "--trainer.default_root_dir", str(tmp_path), "--ckpt_path",
                str(vpt_ckpt))
    assert "method VPT (this model: CoOp)" in err


def test_command_line_settings_are_honoured_with_a_checkpoint(coop_ckpt, tmp_path, tiny_demo_backbone):
    """The checkpoint was trained on ``tiny-demo``; the same weights from their folder (local-dir:)
    and a changed evaluation option are used as given, never replaced by the checkpoint's."""
    cli = build_cli(["test", *config("coop"), "--trainer.default_root_dir", str(tmp_path), "--ckpt_path",
                     str(coop_ckpt), "--model.init_args.backbone", tiny_demo_backbone,
                     "--model.init_args.lr", "0.123"])
    assert cli.model.hparams.backbone == tiny_demo_backbone and cli.model.hparams.lr == 0.123
    assert cli.trainer.callback_metrics["test_acc"] >= 0  # the checkpoint loaded into these settings


def test_a_class_path_in_a_checkpoint_is_never_imported(coop_ckpt, tmp_path, monkeypatch):
    (tmp_path / "planted.py").write_text("open(__file__ + '.imported', 'w').close()\nclass X:\n    pass\n")
    state = torch.load(coop_ckpt, weights_only=True)
    for key in ("hyper_parameters", "method_settings"):
        state[key] = {**state.get("method_settings", {}), "_class_path": "planted.X"}
    planted = tmp_path / "planted.ckpt"
    torch.save(state, planted)
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["test", *config("coop"), "--trainer.default_root_dir", str(tmp_path / "run"), "--ckpt_path",
                     str(planted)])
    assert type(cli.model) is CoOp
    assert not (tmp_path / "planted.py.imported").exists()


# --------------------------------------------------------------------- 3. identity by the weights
def test_a_backbone_of_the_same_shape_but_other_weights_is_refused(coop_ckpt, tmp_path, tiny_demo_backbone):
    folder = tmp_path / "other-weights"
    shutil.copytree(tiny_demo_backbone.removeprefix("local-dir:"), folder)
    weights = folder / "open_clip_pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    name = next(k for k in state if k.endswith("weight"))
    state[name] = state[name] + 1e-3
    torch.save(state, weights)
    model = CoOp(classnames=["circle", "cross", "square", "stripes"], backbone=f"local-dir:{folder}", dataset="demo")
    with pytest.raises(CheckpointMismatchError, match="backbone weights"):
        model.on_load_checkpoint(torch.load(coop_ckpt, weights_only=True))


def test_extra_backbone_tensors_in_a_checkpoint_are_refused(coop_ckpt, tiny_demo_backbone):
    state = torch.load(coop_ckpt, weights_only=True)
    model = CoOp(classnames=state["dpt_lightning"]["classnames"], backbone="tiny-demo", dataset="demo")
    key = next(iter(model.backbone.state_dict()))
    state["state_dict"][f"backbone.{key}"] = torch.zeros_like(model.backbone.state_dict()[key])
    with pytest.raises(CheckpointMismatchError, match="does not have"):
        model.on_load_checkpoint(state)


# --------------------------------------------------------------- 4. --ckpt_path last: its own run
def test_ckpt_path_last_resolves_within_this_runs_settings(tmp_path, capsys):
    seed1 = fit("coop", tmp_path, "--data.seed", "1")
    seed2 = fit("coop", tmp_path, "--data.seed", "2")
    assert seed1 != seed2
    os.utime(seed2)  # the other seed's checkpoint is the newest
    resumed = fit("coop", tmp_path, "--data.seed", "1", "--ckpt_path", "last", "--trainer.max_epochs", "2")
    assert Path(yaml.safe_load((resumed.parents[1] / "config.yaml").read_text())["ckpt_path"]) == seed1
    assert torch.load(resumed, weights_only=True)["epoch"] == 1  # it went on from seed 1's epoch 0
    fit("coop", tmp_path, "--data.seed", "1")  # a second run of seed 1 from scratch: now ambiguous
    err = fails(capsys, "fit", *config("coop"), "--trainer.default_root_dir", str(tmp_path), "--data.seed", "1",
                "--ckpt_path", "last")
    assert "ambiguous" in err and str(seed1) in err
    err = fails(capsys, "fit", *config("coop"), "--trainer.default_root_dir", str(tmp_path), "--data.seed", "3",
                "--ckpt_path", "last")
    assert "no run under" in err


def test_a_resumed_run_continues_its_chain(tmp_path):
    first = fit("coop", tmp_path)
    second = fit("coop", tmp_path, "--ckpt_path", "last", "--trainer.max_epochs", "2")
    assert second != first
    saved = yaml.safe_load((second.parents[1] / "config.yaml").read_text())
    assert Path(saved["ckpt_path"]) == first
    assert last_checkpoint(tmp_path, {**saved, "ckpt_path": "last", "trainer": {}}) == second
    with pytest.raises(RunNotFoundError, match="no checkpoints/last.ckpt"):
        last_checkpoint(tmp_path / "empty", saved)


# ------------------------------------------------------------------------- 6. over-long texts
def test_over_long_template_warns_and_colliding_classes_are_an_error():
    filler = " ".join(["bright"] * 70)
    with pytest.warns(UserWarning, match="longer than the tokenizer's 64 tokens and were cut"):
        ZeroShot(classnames=["circle", "cross"], backbone="tiny", template="a {} " + filler)
    with pytest.raises(ValueError, match="classes 'circle' and 'cross' are identical once cut"):
        CoOp(classnames=["circle", "cross"], backbone="tiny", template="a photo of " + filler + " {}.")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CoOp(classnames=["circle", "cross"], backbone="tiny")  # short prompts: not a word


# ----------------------------------------------------------------------- 8. one-screen errors
def test_setting_errors_are_one_message(tmp_path, capsys):
    err = fails(capsys, "fit", *config("coop"), "--trainer.default_root_dir", str(tmp_path),
                "--model.init_args.n_ctx", "99")
    assert "n_ctx=99 does not fit" in err and len(err.strip().splitlines()) <= 3


def test_a_truncated_checkpoint_is_one_message_naming_it(coop_ckpt, tmp_path, capsys):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(coop_ckpt.read_bytes()[:500])
    err = fails(capsys, "test", *config("coop"), "--trainer.default_root_dir", str(tmp_path), "--ckpt_path",
                str(broken))
    assert str(broken) in err and "truncated" in err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("DPT_DEBUG", "1")
    with pytest.raises(ValueError):
        main(["fit", *config("coop"), "--trainer.default_root_dir", str(tmp_path), "--model.init_args.n_ctx", "99"])


# ------------------------------------------------------------------------------ 10. divergence
def test_divergence_that_stays_finite_warns_and_can_stop(tmp_path, capsys):
    runaway = ["--model.init_args.lr", "1e6", "--trainer.limit_train_batches", "4", "--trainer.max_epochs", "2"]
    with pytest.warns(UserWarning, match="training is diverging"):
        main(["fit", *config("coop"), *runaway, "--trainer.default_root_dir", str(tmp_path / "warn")])
    err = fails(capsys, "fit", *config("coop"), *runaway, "--trainer.default_root_dir", str(tmp_path / "stop"),
                "--divergence.stop", "true")
    assert "diverging" in err and "prompt.ctx" in err


# ------------------------------------------------------------------------------ 11. file modes
def test_checkpoints_and_exports_get_the_users_file_mode(tmp_path, coop_ckpt):
    old = os.umask(0o022)
    try:
        ckpt = fit("coop", tmp_path / "run")
        weights, card = export_checkpoint(ckpt, tmp_path / "export.safetensors")
    finally:
        os.umask(old)
    for path in (ckpt, weights, card):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert json.loads(card.read_text())["hyper_parameters"]["classnames"]
