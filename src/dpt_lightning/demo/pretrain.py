"""The ``tiny-demo`` and ``tiny-clip-demo`` backbones: the tiny random models of both tower
families (``tiny``, ``tiny-clip``) after the same short contrastive pre-training.

The tiny model (`dpt_lightning.demo.models`) has random weights, so on the synthetic demo pictures its
zero-shot accuracy is chance and prompt learning has nothing to build on. This module gives it a
small "CLIP pre-training" on demo-like pictures and their captions, so that the offline demo tells
the real story: zero-shot above chance, prompt learning better.

Recipe (`PRETRAIN_RECIPE`; seeded, cached, about a minute of CPU time):

* pictures: ``images_per_class`` fresh pictures of every demo class, drawn by the demo's own
  ``draw_demo_image`` from a separate random stream (``image_seed``): the demo data set's own
  images (its train and test splits) are never seen in pre-training;
* captions: `pretraining_captions` = the demo's ``DEMO_CAPTIONS`` plus a few variants per class,
  made of words of the tiny vocabulary, with a bias like that of web captions: "a photo of" comes
  before most circles and stripes and never before squares or crosses. The methods' template
  ``a photo of a {}.`` therefore pulls squares and crosses towards circles and stripes: like a
  real model meeting a prompt that its pre-training captions skewed, its zero-shot accuracy is
  well above chance but far from perfect (about 75% with this recipe, 4 classes), and learning
  the context (or the images' prompts) removes the bias;
* model: every weight trains (AdamW, warm-up) except ``logit_scale``;
* loss: class-level contrastive. Each step samples a batch of pictures and one caption per class;
  every picture is classified among the captions (cross-entropy) and every caption among the
  pictures, its target spread evenly over the pictures of its class.

Pre-training works on the open_clip model itself (its own ``encode_text`` / ``encode_image``, the
tokenizer from the folder, open_clip's evaluation transform), not on `dpt_lightning.backbone`. The
result is written next to the tiny model in ``$DPT_CACHE_DIR`` as a complete ``local-dir:`` folder
(the tiny folder's files with new weights and a ``pretraining.json`` record), named by a hash of the
recipe, and loaded through exactly the same open_clip path as every other backbone.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpt_lightning.demo.models import (
    TINY_BERT_NAME,
    TINY_CLIP_RECIPE,
    TINY_RECIPE,
    WEIGHTS_FILE,
    recipe_key,
    write_clip_dir,
    write_model_dir,
)
from dpt_lightning.recipe import CLIP_MEAN, CLIP_STD
from dpt_lightning.demo.pictures import DEMO_CAPTIONS, DEMO_CLASSES, draw_demo_image
from dpt_lightning.files import atomic_directory, atomic_write, cache_root

ZERO_SHOT_TEMPLATE = "a photo of a {}."

#: Extra captions per demo class (words of the tiny vocabulary only). A caption bias, as in web
#: captions: "a photo of" precedes circles and stripes (most of their captions), never squares or
#: crosses, and no caption ends in "." as the template does.
EXTRA_CAPTIONS = {
    "circle": ["a photo of a red circle", "a photo of a circle", "a photo of a round circle",
               "a photo of a bright round circle in the centre"],
    "square": ["a square", "green square", "a sharp green square", "a bright square with sharp edge"],
    "stripes": ["a photo of blue stripes", "a photo of stripes", "a photo of many horizontal stripes",
                "a photo of a pattern of blue stripes"],
    "cross": ["a cross", "bright cross", "a bright cross", "a cross with vertical and horizontal lines"],
}

PRETRAIN_RECIPE = {
    "images_per_class": 48,
    "image_seed": 2024,  # the demo data set is drawn with seed 0: its pictures are never seen here
    "validation_per_class": 16,  # fresh pictures (own seed) for the recorded zero-shot accuracy
    "validation_seed": 2025,
    "steps": 150,
    "batch_size": 32,
    "lr": 1e-3,
    "warmup_steps": 20,
    "weight_decay": 0.01,
    "seed": 0,
    "version": 2,
}


def pretraining_captions() -> dict[str, list[str]]:
    """Captions per demo class folder: the demo's own caption first, then the variants."""
    return {name: [DEMO_CAPTIONS[name], *EXTRA_CAPTIONS.get(name, [])] for name in DEMO_CLASSES}


def evaluation_transform(image_size: int):
    """open_clip's evaluation preprocessing of the tiny model (resize, centre crop, CLIP normalisation)."""
    import open_clip

    return open_clip.image_transform(image_size, is_train=False, mean=tuple(CLIP_MEAN), std=tuple(CLIP_STD))


def pretraining_images(transform, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """Fresh demo pictures (``per_class`` of each class, in ``DEMO_CLASSES`` order) after
    ``transform``, and their labels."""
    rng = random.Random(seed)
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


def features(model: nn.Module, tokenizer, texts: list[str], images: Tensor) -> tuple[Tensor, Tensor]:
    """L2-normalised (text, image) features from open_clip's own encoders."""
    text = F.normalize(model.encode_text(tokenizer(texts)).float(), dim=-1)
    image = F.normalize(model.encode_image(images).float(), dim=-1)
    return text, image


def zero_shot_accuracy(model: nn.Module, tokenizer, images: Tensor, labels: Tensor,
                       template: str = ZERO_SHOT_TEMPLATE) -> float:
    """Top-1 accuracy of ``template`` prompts of the demo class names on (transformed) images."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        text, image = features(model, tokenizer, [template.format(name) for name in DEMO_CLASSES], images)
    model.train(was_training)
    return float(((image @ text.t()).argmax(dim=1) == labels).float().mean())


def pretrain(model: nn.Module, tokenizer, image_size: int, recipe: dict = PRETRAIN_RECIPE) -> dict:
    """Pre-train an open_clip ``model`` (modified in place) on demo pictures and captions.

    Every weight trains except ``logit_scale``. Deterministic for a given recipe on a given
    platform (seeded, CPU). Returns a record: losses of the first and last step and the zero-shot
    accuracy of ``a photo of a {}.`` on separate validation pictures.
    """
    torch.manual_seed(recipe["seed"])
    rng = random.Random(recipe["seed"])
    transform = evaluation_transform(image_size)
    images, labels = pretraining_images(transform, recipe["images_per_class"], recipe["image_seed"])
    captions = list(pretraining_captions().values())
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
            text, image = features(model, tokenizer, [rng.choice(options) for options in captions], images[index])
            loss = class_contrastive_loss(model.logit_scale.exp() * image @ text.t(), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    finally:
        model.eval()
        model.requires_grad_(False)
    held_out, held_out_labels = pretraining_images(transform, recipe["validation_per_class"],
                                                   recipe["validation_seed"])
    return {"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
            "validation_zero_shot": zero_shot_accuracy(model, tokenizer, held_out, held_out_labels)}


def _recipe_key(model_recipe: dict = TINY_RECIPE) -> str:
    key = json.dumps([PRETRAIN_RECIPE, pretraining_captions(), sorted(DEMO_CLASSES), recipe_key(model_recipe),
                      torch.__version__.split("+")[0]], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _pretrained_dir(tag: str, source: str, model_recipe: dict, write, image_size: int) -> Path:
    """``$DPT_CACHE_DIR/<tag>-<key>``: the generated model ``write(folder)`` writes (the folder of
    ``source``, same recipe and seed: the same weights), pre-trained; built on first use."""
    import open_clip

    folder = cache_root() / f"{tag}-{_recipe_key(model_recipe)}"
    if folder.is_dir():  # built under a temporary name: a folder that exists is complete
        return folder
    with atomic_directory(folder) as tmp:
        model = write(tmp)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp}")
        record = pretrain(model, tokenizer, image_size)
        atomic_write(tmp / WEIGHTS_FILE, lambda f: torch.save(model.state_dict(), f))
        atomic_write(tmp / "pretraining.json", json.dumps(
            {"recipe": PRETRAIN_RECIPE, "captions": pretraining_captions(),
             "source": f"{source}-{recipe_key(model_recipe)}", **record}, indent=2))
    return folder


def tiny_demo_dir() -> Path:
    """The ``tiny-demo`` model folder: generated on first use (pre-training), then cached."""
    return _pretrained_dir("tiny-demo", "tiny", TINY_RECIPE,
                           lambda tmp: write_model_dir(tmp, TINY_RECIPE, TINY_BERT_NAME),
                           TINY_RECIPE["vision"]["image_size"])


def tiny_clip_demo_dir() -> Path:
    """The ``tiny-clip-demo`` model folder: ``tiny-clip`` after the same pre-training as ``tiny-demo``."""
    return _pretrained_dir("tiny-clip-demo", "tiny-clip", TINY_CLIP_RECIPE,
                           lambda tmp: write_clip_dir(tmp, TINY_CLIP_RECIPE),
                           TINY_CLIP_RECIPE["model_cfg"]["vision_cfg"]["image_size"])
