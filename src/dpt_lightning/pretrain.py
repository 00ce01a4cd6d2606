"""The ``tiny-demo`` backbone: the tiny random model after a short contrastive pre-training.

The tiny model (`dpt_lightning.tiny`) has random weights, so on the synthetic demo pictures its
zero-shot accuracy is chance and prompt learning has nothing to build on. This module gives it a
small "CLIP pre-training" on demo-like pictures and their captions, so that the offline demo tells
the real story: zero-shot above chance, prompt learning better.

Recipe (`PRETRAIN_RECIPE`; seeded, cached, well under a minute on a 2-core CPU):

* pictures: ``images_per_class`` fresh pictures of every demo class, drawn by the demo's own
  ``draw_demo_image`` from a separate random stream (``image_seed``): the demo data set's own
  images (its train and test splits) are never seen in pre-training;
* captions: `pretraining_captions` = the demo's ``DEMO_CAPTIONS`` plus a few variants per class,
  made of words of the tiny vocabulary. None contains "photo" or "of", so the methods' template
  ``a photo of a {}.`` holds two words the text tower never learned: like a real model meeting a
  prompt unlike its pre-training captions, its zero-shot accuracy is well above chance but far
  from perfect (about 50% with this recipe, 4 classes), and learning the context fixes it;
* model: every weight trains (AdamW, warm-up) except ``logit_scale``;
* loss: class-level contrastive. Each step samples a batch of pictures and one caption per class;
  every picture is classified among the captions (cross-entropy) and every caption among the
  pictures, its target spread evenly over the pictures of its class.

The result is written next to the tiny model in ``$DPT_CACHE_DIR`` as a complete ``local-dir:``
folder (a copy of the tiny folder with new weights and a ``pretraining.json`` record), named by a
hash of the recipe, and loaded through exactly the same open_clip path as every other backbone.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dpt_lightning.data.demo import DEMO_CAPTIONS, DEMO_CLASSES, draw_demo_image
from dpt_lightning.tiny import cache_root, tiny_model_dir

WEIGHTS_FILE = "open_clip_pytorch_model.bin"
ZERO_SHOT_TEMPLATE = "a photo of a {}."

#: Extra captions per demo class (words of the tiny vocabulary only; never "photo" or "of").
EXTRA_CAPTIONS = {
    "circle": ["a round red circle", "a circle", "red circle", "a bright round circle in the centre"],
    "square": ["a square", "green square", "a sharp green square", "a bright square with sharp edge"],
    "stripes": ["stripes", "blue stripes", "many horizontal stripes", "a pattern of blue stripes"],
    "cross": ["a cross", "bright cross", "a bright cross", "a cross with vertical and horizontal lines"],
}

PRETRAIN_RECIPE = {
    "images_per_class": 48,
    "image_seed": 2024,  # the demo data set is drawn with seed 0: its pictures are never seen here
    "validation_per_class": 16,  # fresh pictures (own seed) for the recorded zero-shot accuracy
    "validation_seed": 2025,
    "steps": 250,
    "batch_size": 32,
    "lr": 1e-3,
    "warmup_steps": 20,
    "weight_decay": 0.01,
    "seed": 0,
    "version": 1,
}


def pretraining_captions() -> dict[str, list[str]]:
    """Captions per demo class folder: the demo's own caption first, then the variants."""
    return {name: [DEMO_CAPTIONS[name], *EXTRA_CAPTIONS.get(name, [])] for name in DEMO_CLASSES}


def pretraining_images(backbone, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """Fresh demo pictures (``per_class`` of each class, in ``DEMO_CLASSES`` order) after the
    backbone's test transform, and their labels."""
    rng = random.Random(seed)
    transform = backbone.test_transform()
    images, labels = [], []
    for label, (shape, colour) in enumerate(DEMO_CLASSES.values()):
        for _ in range(per_class):
            images.append(transform(draw_demo_image(shape, colour, rng)))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def class_contrastive_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Symmetric class-level contrastive loss of image x caption logits (B, C).

    Image -> caption: cross-entropy with the image's class. Caption -> image (for each class with
    a picture in the batch): cross-entropy against a target spread evenly over that class's
    pictures. The sum of both directions.
    """
    num_classes = logits.shape[1]
    image_to_text = F.cross_entropy(logits, labels)
    members = (labels[None, :] == torch.arange(num_classes, device=labels.device)[:, None]).float()
    present = members.sum(1) > 0
    target = members[present] / members[present].sum(1, keepdim=True)
    text_to_image = -(target * logits.t()[present].log_softmax(dim=1)).sum(1).mean()
    return image_to_text + text_to_image


def zero_shot_accuracy(backbone, images: Tensor, labels: Tensor, template: str = ZERO_SHOT_TEMPLATE) -> float:
    """Top-1 accuracy of ``template`` prompts of the demo class names on (transformed) images."""
    was_training = backbone.model.training
    backbone.model.eval()
    with torch.no_grad():
        text = backbone.encode_sentences([template.format(name) for name in DEMO_CLASSES])
        image = F.normalize(backbone.encode_image(images).float(), dim=-1)
    backbone.model.train(was_training)
    return float(((image @ text.t()).argmax(dim=1) == labels).float().mean())


def pretrain(backbone, recipe: dict = PRETRAIN_RECIPE) -> dict:
    """Pre-train ``backbone`` (a `BiomedCLIP`, modified in place) on demo pictures and captions.

    Every weight trains except ``logit_scale``. Deterministic for a given recipe on a given
    platform (seeded, CPU). Returns a record: losses of the first and last step and the zero-shot
    accuracy of ``a photo of a {}.`` on separate validation pictures.
    """
    torch.manual_seed(recipe["seed"])
    rng = random.Random(recipe["seed"])
    images, labels = pretraining_images(backbone, recipe["images_per_class"], recipe["image_seed"])
    captions = list(pretraining_captions().values())
    model = backbone.model
    model.requires_grad_(True)
    model.logit_scale.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"], betas=(0.9, 0.98))
    warmup = recipe["warmup_steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    generator = torch.Generator().manual_seed(recipe["seed"])
    losses = []
    model.train()
    try:
        for _ in range(recipe["steps"]):
            index = torch.randint(len(images), (recipe["batch_size"],), generator=generator)
            texts = [rng.choice(options) for options in captions]
            text = F.normalize(backbone.encode_text(backbone.tokenize(texts)).float(), dim=-1)
            image = F.normalize(backbone.encode_image(images[index]).float(), dim=-1)
            loss = class_contrastive_loss(backbone.logit_scale * image @ text.t(), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    finally:
        model.eval()
        model.requires_grad_(False)
    held_out, held_out_labels = pretraining_images(backbone, recipe["validation_per_class"], recipe["validation_seed"])
    return {"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
            "validation_zero_shot": zero_shot_accuracy(backbone, held_out, held_out_labels)}


def _recipe_key() -> str:
    key = json.dumps([PRETRAIN_RECIPE, pretraining_captions(), sorted(DEMO_CLASSES), tiny_model_dir().name,
                      torch.__version__.split("+")[0]], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def tiny_demo_dir() -> Path:
    """The ``tiny-demo`` model folder: generated on first use (pre-training), then cached."""
    from dpt_lightning.backbone import BiomedCLIP

    source = tiny_model_dir()
    folder = cache_root() / f"tiny-demo-{_recipe_key()}"
    if (folder / WEIGHTS_FILE).is_file():
        return folder
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-demo-", dir=folder.parent))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        backbone = BiomedCLIP(f"local-dir:{tmp}")
        record = pretrain(backbone)
        torch.save(backbone.model.state_dict(), tmp / WEIGHTS_FILE)
        (tmp / "pretraining.json").write_text(json.dumps(
            {"recipe": PRETRAIN_RECIPE, "captions": pretraining_captions(), "source": source.name, **record},
            indent=2))
        try:
            tmp.rename(folder)  # atomic; a concurrent writer may have won, which is fine
        except OSError:
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
