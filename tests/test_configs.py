"""Every shipped method config runs unchanged on the offline demo through the ``dpt`` command's
``main()``, on both tiny tower families: with ``tiny-demo`` (BiomedCLIP's BERT + timm ViT) fit (one
short epoch), test, predict, export, and the export loads back; with ``tiny-clip`` (open_clip's
own text transformer + VisionTransformer, the random weights that ``tiny-clip-demo`` pre-trains:
accuracy does not matter here) fit on one batch with the shorter searches of
``conftest.QUICK_SEARCH``, then predict from the checkpoint, whose accuracy must be the fit's test
accuracy (kept cheap: the suite's time budget). A method that learns
nothing (zero-shot) is tested and predicted only."""
from __future__ import annotations

import importlib
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from dpt_lightning.cli import main
from dpt_lightning.export import load_exported
from dpt_lightning.export import main as export_main

pytestmark = pytest.mark.usefixtures("tiny_demo_backbone")
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("trainers/*.yaml"))
#: The backbones every config runs on: one per tower family (the demo config's own is the first).
BACKBONES = ["tiny-demo", "tiny-clip"]
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--data.num_workers", "0",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def method_class(config: Path) -> type:
    class_path = yaml.safe_load(config.read_text())["model"]["class_path"]
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_every_method_has_a_config():
    import dpt_lightning

    shipped = {method_class(config) for config in CONFIGS}
    methods = {getattr(dpt_lightning, name) for name in dpt_lightning.methods.__all__}
    methods = {cls for cls in methods if isinstance(cls, type) and issubclass(cls, dpt_lightning.PromptTrainer)}
    assert methods - {dpt_lightning.PromptTrainer} <= shipped


@pytest.mark.slow
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_on_the_demo_unchanged(config, backbone, tmp_path):
    from conftest import QUICK_SEARCH

    other_family = backbone != BACKBONES[0]
    quick = QUICK
    if other_family:
        quick = [*QUICK, "--model.init_args.backbone", backbone, "--trainer.limit_train_batches", "1",
                 *QUICK_SEARCH.get(config.stem, [])]
    common = ["--config", str(config), "--config", str(ROOT / "datasets/demo.yaml"), *quick]
    out = tmp_path / "predictions.csv"
    if not method_class(config).learns:
        main(["test", *common, "--trainer.default_root_dir", str(tmp_path / "test")])
        main(["predict", *common, "--trainer.default_root_dir", str(tmp_path / "test"), "--predictions.path", str(out)])
        assert len(pd.read_csv(out)) == 48
        return
    main(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "fit")])
    (ckpt,) = (tmp_path / "fit").glob("lightning_logs/version_*/checkpoints/last.ckpt")
    (metrics,) = (tmp_path / "fit").glob("lightning_logs/version_*/metrics.csv")
    fitted = pd.read_csv(metrics)["test_acc"].dropna().iloc[-1]
    if other_family:  # the checkpoint records this backbone, and predicts as the fit tested
        assert torch.load(ckpt, map_location="cpu", weights_only=True)["dpt_lightning"]["backbone"]["text_tower"] == "openclip-text"
        main(["predict", *common, "--trainer.default_root_dir", str(tmp_path / "test"), "--ckpt_path", str(ckpt),
              "--predictions.path", str(out)])
        table = pd.read_csv(out)
        accuracy = (table["prediction"] == table["path"].map(lambda p: Path(p).parent.name)).mean()
        assert len(table) == 48 and accuracy == pytest.approx(fitted, abs=1e-6)
        return

    main(["test", *common, "--trainer.default_root_dir", str(tmp_path / "test"), "--ckpt_path", str(ckpt)])
    (metrics,) = (tmp_path / "test").glob("lightning_logs/version_*/metrics.csv")
    assert pd.read_csv(metrics)["test_acc"].dropna().iloc[-1] == fitted

    main(["predict", *common, "--trainer.default_root_dir", str(tmp_path / "test"), "--ckpt_path", str(ckpt),
          "--predictions.path", str(out)])
    table = pd.read_csv(out)
    accuracy = (table["prediction"] == table["path"].map(lambda p: Path(p).parent.name)).mean()
    assert len(table) == 48 and accuracy == pytest.approx(fitted, abs=1e-6)

    export_main([str(ckpt), "-o", str(tmp_path / "export.safetensors")])
    model = load_exported(tmp_path / "export.safetensors")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    learned = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert learned.keys() <= state.keys()
    for name, value in state.items():
        assert torch.equal(model.state_dict()[name], value), name
