"""Checkpoints: small, identity-checked, weights_only, exportable to safetensors + JSON card."""
from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Trainer

from dpt_lightning import CoOp, DemoDataModule
from dpt_lightning.checkpoint_io import AtomicCheckpointIO
from dpt_lightning.export import export_checkpoint, load_exported, main as export_main
from dpt_lightning.methods import CheckpointMismatchError


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    data = DemoDataModule(num_shots=2, num_workers=0, batch_size=4)
    model = CoOp(classnames=data.classnames, backbone="tiny", dataset="demo")
    trainer = Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, plugins=[AtomicCheckpointIO()], default_root_dir=folder)
    trainer.fit(model, datamodule=data)
    path = folder / "model.ckpt"
    trainer.save_checkpoint(path)
    return model.eval(), path


def test_checkpoint_holds_prompt_and_identity_only(fitted):
    model, path = fitted
    state = torch.load(path, weights_only=True)
    assert list(state["state_dict"]) == ["prompt.ctx"]
    identity = state["dpt_lightning"]
    assert identity["method"] == "CoOp" and identity["classnames"] == model.classnames
    assert identity["backbone"]["name"] == "tiny"
    assert path.stat().st_size < 50_000
    assert not list(path.parent.glob(".model.ckpt.*.tmp"))  # the atomic writer left no temporary


def test_load_into_other_classes_or_backbone_is_a_clear_error(fitted):
    _, path = fitted
    other = CoOp(classnames=["circle", "square", "cross", "blob"], backbone="tiny")
    with pytest.raises(CheckpointMismatchError, match="classes"):
        other.on_load_checkpoint(torch.load(path, weights_only=True))
    state = torch.load(path, weights_only=True)
    state["dpt_lightning"]["backbone"]["text_width"] = 768
    same = CoOp(classnames=fitted[0].classnames, backbone="tiny")
    with pytest.raises(CheckpointMismatchError, match="text_width"):
        same.on_load_checkpoint(state)
    state = torch.load(path, weights_only=True)
    state["state_dict"] = {}
    with pytest.raises(CheckpointMismatchError, match="lacks trainable"):
        same.on_load_checkpoint(state)


def test_a_checkpoint_refuses_the_other_tower_family(fitted):
    """Trained on ``tiny`` (BERT + timm ViT), loaded with ``tiny-clip`` (open_clip's CLIP towers, the
    same widths): refused, naming both backbones' towers and the backbone to load it with."""
    _, path = fitted
    state = torch.load(path, weights_only=True)
    assert (state["dpt_lightning"]["backbone"]["text_tower"], state["dpt_lightning"]["backbone"]["image_tower"]) == \
        ("hf-bert", "timm-vit")
    clip = CoOp(classnames=fitted[0].classnames, backbone="tiny-clip")
    with pytest.raises(CheckpointMismatchError, match=r"backbone 'tiny' with a hf-bert text tower and a timm-vit image "
                       r"tower \(this model: 'tiny-clip' with openclip-text \+ openclip-vit\).*"
                       r"--model.init_args.backbone=tiny"):
        clip.on_load_checkpoint(state)
    for key in ("text_tower", "image_tower"):  # a checkpoint from before the tower families: widths still checked
        del state["dpt_lightning"]["backbone"][key]
    with pytest.raises(CheckpointMismatchError) as err:
        clip.on_load_checkpoint(state)
    assert "tower" not in str(err.value) and "weights" in str(err.value)


def test_base_to_novel_may_load_a_prompt_trained_on_base_classes(fitted):
    _, path = fitted
    state = torch.load(path, weights_only=True)
    state["dpt_lightning"]["protocol"] = "base2novel"
    novel = CoOp(classnames=["blob"], backbone="tiny", protocol="base2novel")
    novel.on_load_checkpoint(state)  # no error: same context, other classes


def test_export_round_trip_and_no_silent_overwrite(fitted, tmp_path, capsys):
    model, path = fitted
    out = tmp_path / "coop.safetensors"
    export_main([str(path), "-o", str(out)])
    assert out.stat().st_size < 10_000
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["dpt_lightning"]["class_path"] == "dpt_lightning.methods.coop.CoOp"
    assert card["tensors"] == {"prompt.ctx": [4, 32]}
    loaded = load_exported(out)
    assert torch.equal(loaded.prompt.ctx, model.prompt.ctx)
    images = torch.randn(2, 3, 160, 160)
    torch.testing.assert_close(loaded(images), model(images))
    with pytest.raises(SystemExit):
        export_main([str(path), "-o", str(out)])
    assert "--overwrite" in capsys.readouterr().err
    export_checkpoint(path, out, overwrite=True)


def test_a_card_cannot_make_us_import_other_code(fitted, tmp_path):
    _, path = fitted
    out = tmp_path / "x.safetensors"
    export_checkpoint(path, out)
    card = json.loads(out.with_suffix(".json").read_text())
    card["dpt_lightning"]["class_path"] = "os.system"
    out.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(CheckpointMismatchError, match="not a dpt_lightning method"):
        load_exported(out)
