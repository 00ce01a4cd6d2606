"""CLIP-Adapter (Gao et al., IJCV 2023) as the BiomedCoOp code runs it: a residual MLP on the
frozen image feature, ``g = ratio * A(f) + (1 - ratio) * f``, logits ``s * g @ t.T`` with the
zero-shot class features ``t`` and the backbone's ``s = exp(logit_scale)``."""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpt_lightning.methods.base import dassl_lr_factor
from dpt_lightning.methods.frozen_features import FeatureSet, FrozenFeatureTrainer, TrainingViews, set_lr


def reference_iteration_lr(iteration: int, lr: float, warmup_iterations: int, warmup_lr: float,
                           period: int) -> float:
    """The reference schedule, stepped every iteration: ``warmup_iterations`` at ``warmup_lr``,
    then ``lr * (1 + cos(pi * t / period)) / 2`` at iteration ``t`` after them (a cosine that
    falls to 0 after ``period`` iterations and rises again, period ``2 * period``)."""
    if iteration < warmup_iterations:
        return warmup_lr
    return lr * 0.5 * (1 + math.cos(math.pi * (iteration - warmup_iterations) / period))


class CLIPAdapter(FrozenFeatureTrainer):
    """A bottleneck MLP (Linear d->d/reduction, ReLU, Linear back, ReLU; no biases) on the image
    feature, mixed with it by ``ratio``; cross-entropy, SGD (no momentum), fresh augmented views
    every epoch in mini-batches of ``data.batch_size``. The last epoch's adapter is kept.

    Args:
        template: the zero-shot prompt of the class features.
        ratio: the adapter's share of the image feature (reference 0.5).
        reduction: bottleneck factor (4: 512 -> 128 -> 512).
        renormalize: L2-normalise ``g`` before the logits, as the CLIP-Adapter paper; the
            reference code does not.
        schedule: ``iteration`` (reference): the cosine is stepped every iteration with a period of
            ``trainer.max_epochs`` iterations after ``warmup_epochs`` iterations at ``warmup_lr``;
            ``epoch``: the paper's Dassl schedule (warm-up epochs at ``warmup_lr``, then a cosine over
            the epochs, stepped per epoch).
    """

    uses_validation = False

    def __init__(
        self,
        template: str = "a photo of a {}.",
        ratio: float = 0.5,
        reduction: int = 4,
        renormalize: bool = False,
        schedule: Literal["iteration", "epoch"] = "iteration",
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        **kwargs,
    ):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs)
        if not 0 <= ratio <= 1:
            raise ValueError(f"model.ratio must be between 0 and 1, got {ratio}")
        if schedule not in ("iteration", "epoch"):
            raise ValueError(f"model.schedule must be 'iteration' or 'epoch', got {schedule!r}")

    def configure_prompts(self) -> None:
        hp = self.hparams
        self.register_buffer("class_features", self.frozen_class_features(hp.template), persistent=False)
        width, hidden = self.backbone.embed_dim, self.backbone.embed_dim // hp.reduction
        if hidden < 1:
            raise ValueError(f"model.reduction {hp.reduction} leaves no hidden units of {width}")
        self.adapter = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.ReLU(),
                                     nn.Linear(hidden, width, bias=False), nn.ReLU())

    def encode_classes(self, image_features: Tensor | None = None) -> Tensor:
        return self.class_features

    def adapt(self, image_features: Tensor) -> Tensor:
        ratio = self.hparams.ratio
        mixed = ratio * self.adapter(image_features) + (1 - ratio) * image_features
        return F.normalize(mixed, dim=-1) if self.hparams.renormalize else mixed

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        with torch.autocast(self.device.type, enabled=False):
            return super().logits(self.adapt(image_features.float()), text_features)

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.SGD(self.adapter.parameters(), lr=hp.lr, momentum=hp.momentum,
                               weight_decay=hp.weight_decay)

    def learning_rate(self, iteration: int, epoch: int, epochs: int) -> float:
        hp = self.hparams
        if hp.schedule == "iteration":
            return reference_iteration_lr(iteration, hp.lr, hp.warmup_epochs, hp.warmup_lr, epochs)
        return hp.lr * dassl_lr_factor(epoch, epochs, hp.warmup_epochs, hp.warmup_lr / hp.lr)

    def fit_features(self, views: TrainingViews, val: FeatureSet | None, epochs: int,
                     prepared=None) -> dict[str, float]:
        (optimizer,) = self.head_optimizers()
        iteration, losses, correct = 0, [], 0
        for epoch in range(epochs):
            view = views.next_pass()
            losses, correct = [], 0
            for batch in view.batches(views.batch_size):
                set_lr(optimizer, self.learning_rate(iteration, epoch, epochs))
                logits = self.logits(view.features[batch], self.class_features)
                loss = F.cross_entropy(logits, view.labels[batch])
                optimizer.zero_grad()
                self.head_backward(loss)
                optimizer.step()
                losses.append(loss.item())
                correct += int((logits.argmax(-1) == view.labels[batch]).sum())
                iteration += 1
        return {"train_loss": sum(losses) / len(losses), "train_acc": correct / len(view)}
