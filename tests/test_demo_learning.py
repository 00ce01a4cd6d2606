"""The offline demo tells the real story: the pre-trained tiny backbone (``tiny-demo``) is better
than chance zero-shot, and every method of the demo grid beats its own zero-shot start after a
short fit on the synthetic pictures (held-out test split, never seen in pre-training)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpt_lightning.bench import Run, load_grid
from dpt_lightning.bench.job import run_stages
from dpt_lightning.demo.pretrain import class_contrastive_loss

ROOT = Path(__file__).resolve().parents[1]
GRID = load_grid(ROOT / "benchmarks/demo.yaml")
DEMO = GRID.datasets[0]
#: The prompt methods of the first demo grid (the other baselines' learning is tested in their own files).
PROMPT_METHODS = ("coop", "vpt", "vpt_deep", "maple", "maple_deep", "biomed_coop", "biomed_dpt")
LEARNING = [m for m in GRID.methods if m.fit and m.name in PROMPT_METHODS]
CHANCE = 0.25  # 4 classes


def demo_accuracy(method, subcommand: str, folder: Path) -> float:
    """Test accuracy of ``method`` on the demo (16 shots, seed 1) through the dpt code: ``test``
    gives the untrained start, ``fit`` the model after the demo grid's short training."""
    _, args, _ = Run(method, DEMO, "fewshot", 16, 1, tuple(GRID.args)).stages(folder)[0]
    return run_stages([(subcommand, [*args, "--trainer.enable_progress_bar=false"], "")], folder)["acc"]


def test_class_contrastive_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 0])
    log_softmax_rows = logits.log_softmax(1)
    image_to_text = -(log_softmax_rows[0, 0] + log_softmax_rows[1, 1] + log_softmax_rows[2, 0]) / 3
    columns = logits.t().log_softmax(1)  # each caption over the 3 pictures
    text_to_image = -((columns[0, 0] + columns[0, 2]) / 2 + columns[1, 1]) / 2  # class 0 has pictures 0 and 2
    assert class_contrastive_loss(logits, labels) == pytest.approx(float(image_to_text + text_to_image), abs=1e-6)


def test_tiny_demo_is_the_tiny_architecture_with_pretrained_weights():
    from dpt_lightning.backbone import BiomedCLIP, resolve_backbone_name

    tiny, demo = BiomedCLIP("tiny"), BiomedCLIP("tiny-demo")
    facts = {k: v for k, v in demo.fingerprint().items() if k != "name"}
    assert facts == {k: v for k, v in tiny.fingerprint().items() if k != "name"}
    assert not torch.equal(tiny.model.visual.head.proj.weight, demo.model.visual.head.proj.weight)
    assert torch.equal(tiny.model.logit_scale, demo.model.logit_scale)  # the temperature is not trained
    folder = Path(resolve_backbone_name("tiny-demo")[len("local-dir:"):])
    record = json.loads((folder / "pretraining.json").read_text())
    assert record["last_loss"] < record["first_loss"]
    assert CHANCE + 0.1 < record["validation_zero_shot"] < 1.0


def test_zero_shot_on_the_held_out_demo_images_is_above_chance_and_leaves_room(tmp_path):
    zeroshot = next(m for m in GRID.methods if m.name == "zeroshot")
    accuracy = demo_accuracy(zeroshot, "test", tmp_path)
    assert CHANCE + 0.1 < accuracy < 0.9


@pytest.mark.slow
@pytest.mark.parametrize("method", LEARNING, ids=[m.name for m in LEARNING])
def test_every_method_beats_its_zero_shot_start(method, tmp_path):
    start = demo_accuracy(method, "test", tmp_path / "start")
    learned = demo_accuracy(method, "fit", tmp_path / "fit")
    assert learned > start, f"{method.name}: {start:.3f} before training, {learned:.3f} after"
