"""The ``tiny-demo`` backbone: the tiny random model after a short contrastive pre-training.

The tiny model (`dpt_lightning.tiny`) has random weights, so on the synthetic demo pictures its
zero-shot accuracy is chance and prompt learning has nothing to build on. This module gives it a
small "CLIP pre-training" on demo-like pictures and their captions, so that the demo tells the
real story: zero-shot above chance, prompt learning better still.

Recipe (seeded, cached, well under a minute on a 2-core CPU):

* pictures: ``images_per_class`` fresh pictures per demo class, drawn by the demo's own
  ``draw_demo_image`` from a separate random stream (``image_seed``), so the demo data set's own
  images (train and test) are never seen in pre-training;
* captions: `pretraining_captions` = the demo's ``DEMO_CAPTIONS`` plus a few variants per class
  made of words of the tiny vocabulary; none contains the prompt words "photo of", so the
  methods' template ``a photo of a {}.`` is not what the text tower was trained on: zero-shot
  transfers only partly and prompt learning has something to learn;
* model: the image trunk stays random and frozen (its outputs are computed once), the image
  projection, the final image LayerNorm and the whole text tower train; ``logit_scale`` stays;
* loss: class-level contrastive. Each step samples a batch of pictures and one caption per class;
  pictures are classified among the captions (cross-entropy) and every caption among the
  pictures, its target spread evenly over the pictures of its class.

The result is written next to the tiny model in ``$DPT_CACHE_DIR`` as a complete ``local-dir:``
folder (a copy of the tiny folder with new weights), named by a hash of the recipe, and loaded
through exactly the same open_clip path as every other backbone.
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

#: Extra captions per demo class (words of the tiny vocabulary only; no "photo", no "of").
EXTRA_CAPTIONS = {
    "circle": ["a round red circle", "a circle", "red circle", "a bright round circle in the centre"],
    "square": ["a square", "green square", "a sharp green square", "a bright square with sharp edge"],
    "stripes": ["stripes", "blue stripes", "many horizontal stripes", "a pattern of blue stripes"],
    "cross": ["a cross", "bright cross", "a bright cross", "a cross with vertical and horizontal lines"],
}

PRETRAIN_RECIPE = {
    "images_per_class": 48,
    "image_seed": 2024,  # the demo data set uses seed 0: its pictures are not in pre-training
    "steps": 250,
    "batch_size": 32,
    "lr": 1e-3,
    "warmup_steps": 20,
    "weight_decay": 0.01,
    "word_embedding_std": 0.25,
    "seed": 0,
    "version": 3,
}


def pretraining_captions() -> dict[str, list[str]]:
    """Captions per demo class folder: the demo's own caption first, then the variants."""
    return {name: [DEMO_CAPTIONS[name], *EXTRA_CAPTIONS.get(name, [])] for name in DEMO_CLASSES}


def pretraining_pictures(per_class: int, seed: int) -> tuple[list, Tensor]:
    """Fresh demo pictures (PIL), ``per_class`` of each class in ``DEMO_CLASSES`` order, and labels."""
    rng = random.Random(seed)
    pictures, labels = [], []
    for label, (shape, colour) in enumerate(DEMO_CLASSES.values()):
        for _ in range(per_class):
            pictures.append(draw_demo_image(shape, colour, rng))
            labels.append(label)
    return pictures, torch.tensor(labels)


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


def pretrain(backbone, recipe: dict = PRETRAIN_RECIPE) -> list[float]:
    """Pre-train ``backbone`` (a `BiomedCLIP`, modified in place) on demo pictures and captions.

    Every weight trains except ``logit_scale``. Returns the loss of every step. Deterministic for
    a given recipe on a given platform (seeded, CPU).
    """
    torch.manual_seed(recipe["seed"])
    rng = random.Random(recipe["seed"])
    pictures, labels = pretraining_pictures(recipe["images_per_class"], recipe["image_seed"])
    augment = backbone.train_transform()  # the crops prompt learning trains on: features must cope
    captions = list(pretraining_captions().values())
    model = backbone.model
    with torch.no_grad():  # word vectors on the scale of a real BERT's (norm ~1.4), not the init's 0.1
        model.text.transformer.embeddings.word_embeddings.weight.normal_(0.0, recipe["word_embedding_std"])
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
            index = torch.randint(len(pictures), (recipe["batch_size"],), generator=generator)
            images = torch.stack([augment(pictures[i]) for i in index.tolist()])
            texts = [rng.choice(options) for options in captions]
            text = F.normalize(backbone.encode_text(backbone.tokenize(texts)).float(), dim=-1)
            image = F.normalize(backbone.encode_image(images).float(), dim=-1)
            loss = class_contrastive_loss(backbone.logit_scale * image @ text.t(), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    finally:
        model.eval()
        model.requires_grad_(False)
    return losses


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
        losses = pretrain(backbone)
        torch.save(backbone.model.state_dict(), tmp / WEIGHTS_FILE)
        (tmp / "pretraining.json").write_text(json.dumps(
            {"recipe": PRETRAIN_RECIPE, "captions": pretraining_captions(), "source": source.name,
             "first_loss": losses[0], "last_loss": losses[-1]}, indent=2))
        try:
            tmp.rename(folder)  # atomic; a concurrent writer may have won, which is fine
        except OSError:
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
