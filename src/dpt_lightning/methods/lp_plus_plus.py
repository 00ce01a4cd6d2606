"""LP++ (Huang et al., CVPR 2024) as the BiomedCoOp code (its ``LP2`` trainer) runs it: a linear
probe blended with the zero-shot classifier, ``logits = f @ W.T + b + alpha * (f @ t.T)`` (one
``alpha`` per class, cosine text logits without temperature), trained full-batch on the features of
one augmented pass with learning rates computed from the data instead of tuned."""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpt_lightning.methods.frozen_features import FeatureSet, FrozenFeatureTrainer, TrainingViews, accuracy, set_lr


def weight_lr(features: Tensor) -> float:
    """``4 N / lambda_max(F.T F)``: the step size of the class weights."""
    features = features.double()
    return 4 * len(features) / torch.linalg.eigvalsh(features.t() @ features).max().item()


def alpha_lr(text_logits: Tensor) -> float:
    """``N / (4 max_k sum_n (f_n . t_k)^2)``: the step size of the blending weights."""
    return len(text_logits) / (4 * text_logits.double().pow(2).sum(0).max().item())


def initial_alpha(text_logits: Tensor, labels: Tensor, scale: float) -> float:
    """``scale`` times the mean over classes of each class's mean true-class text similarity."""
    per_class = [text_logits[labels == c, c].mean() for c in labels.unique()]
    return scale * torch.stack(per_class).double().mean().item()


def class_sums(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Each class's sum of features, from fp16 features and rounded to fp16 as the reference."""
    one_hot = F.one_hot(labels, num_classes).float()
    return (one_hot.t() @ features.half().float()).half().float()


class LPPlusPlus(FrozenFeatureTrainer):
    """LP++: the class weights start as class feature sums, the bias as PyTorch's default uniform
    init, ``alpha`` as ``alpha_init_scale`` times the mean true-class text similarity. Each epoch is
    one full-batch step of SGD (momentum) on W and b with ``lr_w = 4N / lambda_max(F.T F)``; every
    ``alpha_every`` epochs ``alpha -= lr_alpha * grad`` with ``lr_alpha = N / (4 max_k sum (f.t_k)^2)``.

    Args:
        template: the zero-shot prompt of the class features.
        alpha_init_scale: 250 in the reference.
        alpha_every: epochs between alpha updates (10).
        alpha_gradient: ``accumulated`` (reference: alpha's gradient is never cleared, so each update
            uses the sum of the gradients of all epochs so far) or ``current`` (the gradient of the
            epoch of the update).
        select: ``best_val`` (reference: the model of the last epoch whose validation accuracy
            equals the best) or ``last`` (the last epoch's).
        momentum, weight_decay: SGD settings of W and b (reference 0.9 and none).
    """

    #: One weight row and one alpha per training class: nothing for a novel class.
    scores_new_classes = False

    def __init__(
        self,
        template: str = "a photo of a {}.",
        alpha_init_scale: float = 250.0,
        alpha_every: int = 10,
        alpha_gradient: Literal["accumulated", "current"] = "accumulated",
        select: Literal["best_val", "last"] = "best_val",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        **kwargs,
    ):
        super().__init__(momentum=momentum, weight_decay=weight_decay, **kwargs)
        if alpha_gradient not in ("accumulated", "current") or select not in ("best_val", "last"):
            raise ValueError("model.alpha_gradient must be 'accumulated' or 'current', model.select 'best_val' or "
                             f"'last'; got {alpha_gradient!r}, {select!r}")
        if alpha_every < 1:
            raise ValueError(f"model.alpha_every must be at least 1, got {alpha_every}")

    def configure_prompts(self) -> None:
        self.register_buffer("class_features", self.frozen_class_features(self.hparams.template), persistent=False)
        classes, width = len(self.classnames), self.backbone.embed_dim
        self.weight = nn.Parameter(torch.zeros(classes, width))
        bound = 1 / math.sqrt(width)  # nn.Linear's default bias init
        self.bias = nn.Parameter(torch.empty(classes).uniform_(-bound, bound))
        self.alpha = nn.Parameter(torch.zeros(classes))

    def encode_classes(self, image_features: Tensor | None = None) -> Tensor:
        return self.class_features

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        with torch.autocast(self.device.type, enabled=False):
            f = image_features.float()
            return f @ self.weight.t() + self.bias + self.alpha * (f @ text_features.float().t())

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.SGD([self.weight, self.bias], lr=1.0, momentum=hp.momentum, weight_decay=hp.weight_decay)

    def prepare_fit(self, views: TrainingViews, val: FeatureSet | None) -> FeatureSet:
        """The features of one augmented pass; W from their class sums, alpha from their text similarity."""
        train = views.next_pass()
        text_logits = train.features @ self.class_features.t()
        with torch.no_grad():
            self.weight.copy_(class_sums(train.features, train.labels, len(self.classnames)))
            self.alpha.fill_(initial_alpha(text_logits, train.labels, self.hparams.alpha_init_scale))
        return train

    def fit_features(self, views: TrainingViews, val: FeatureSet | None, epochs: int,
                     prepared=None) -> dict[str, float]:
        hp = self.hparams
        (optimizer,) = self.head_optimizers()
        features, labels = prepared.features, prepared.labels
        lr_w, lr_alpha = weight_lr(features), alpha_lr(features @ self.class_features.t())
        self.alpha.grad = None
        set_lr(optimizer, lr_w)
        best, best_epoch, kept, loss = -1.0, -1, None, None
        for epoch in range(epochs):
            if hp.alpha_gradient == "current":
                self.alpha.grad = None
            loss = F.cross_entropy(self.logits(features, self.class_features), labels)
            optimizer.zero_grad()  # W and b only: alpha's gradient is left to accumulate
            self.head_backward(loss)
            optimizer.step()
            if (epoch + 1) % hp.alpha_every == 0:
                with torch.no_grad():
                    self.alpha -= lr_alpha * self.alpha.grad
            with torch.no_grad():
                acc = accuracy(self.logits(val.features, self.class_features), val.labels)
            if acc >= best:
                best, best_epoch = acc, epoch
                kept = [p.detach().clone() for p in (self.weight, self.bias, self.alpha)]
        if hp.select == "best_val":
            with torch.no_grad():
                for param, value in zip((self.weight, self.bias, self.alpha), kept):
                    param.copy_(value)
        else:
            best, best_epoch = acc, epochs - 1
        self.alpha.grad = None
        return {"train_loss": loss.item(), "fit_val_acc": best, "lpp_kept_epoch": best_epoch, "lpp_lr_w": lr_w,
                "lpp_lr_alpha": lr_alpha}
