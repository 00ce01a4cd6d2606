"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022) as the BiomedCoOp code runs them.

A cache of the few-shot training features (keys K, one-hot labels V) is added to zero-shot CLIP:
``logits = scale * f @ t.T + alpha * exp(-beta * (1 - f @ K.T)) @ V``, with ``alpha`` and ``beta``
searched on the validation split. Tip-Adapter-F also trains the keys (cross-entropy, AdamW).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpt_lightning.methods.frozen_features import (FeatureSet, FrozenFeatureTrainer, GridSearch, TrainingViews,
                                                   accuracy, set_lr)

#: The reference code's fixed zero-shot scale (BiomedCLIP's learned temperature, rounded).
REFERENCE_CLIP_SCALE = 85.2323


def tip_logits(features: Tensor, class_features: Tensor, keys: Tensor, values: Tensor, alpha: Tensor | float,
               beta: Tensor | float, scale: Tensor | float) -> Tensor:
    """Zero-shot logits plus the cache's: ``(scale f) t.T + alpha exp(-(beta - beta f K.T)) V``."""
    affinity = features @ keys.t()
    cache = (-(beta - beta * affinity)).exp() @ values
    return (scale * features) @ class_features.t() + cache * alpha


def search_grid(scale: float, steps: int) -> list[float]:
    """The reference's search values: ``0.1 + i * (scale - 0.1) / steps`` for i < steps."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


class TipAdapter(FrozenFeatureTrainer):
    """Training-free Tip-Adapter: the cache is fitted from the data (its keys are the mean tower
    output of each training image over ``augment_epochs`` augmented passes, normalised), then
    ``(beta, alpha)`` are searched on the validation split (the first best point, beta outermost).
    Nothing learns by gradient; the cache, ``alpha`` and ``beta`` are what a checkpoint holds.

    Args:
        template: the zero-shot prompt.
        clip_scale: scale of the zero-shot logits; the reference fixes 85.2323; ``None`` takes the
            backbone's own ``exp(logit_scale)``.
        augment_epochs: augmented passes averaged into the keys (reference 1; the Tip-Adapter paper 10).
        init_alpha, init_beta: starting values (Tip-Adapter-F trains with ``init_beta``).
        search_scale, search_step: the (beta, alpha) grids, ``search_step`` values each up to
            about ``search_scale`` (reference: 200 values up to 50 for both).
    """

    data_shaped = ("cache_keys", "cache_labels")
    #: The cache's values are the training classes' one-hot labels: nothing for a novel class.
    scores_new_classes = False
    #: Are the cache keys trained (Tip-Adapter-F)?
    finetune = False

    def __init__(
        self,
        template: str = "a photo of a {}.",
        clip_scale: float | None = REFERENCE_CLIP_SCALE,
        augment_epochs: int = 1,
        init_alpha: float = 1.0,
        init_beta: float = 1.0,
        search_scale: tuple[float, float] = (50.0, 50.0),
        search_step: tuple[int, int] = (200, 200),
        **kwargs,
    ):
        super().__init__(**kwargs)
        if augment_epochs < 1 or min(search_step) < 1:
            raise ValueError("model.augment_epochs and model.search_step must be at least 1")

    def configure_prompts(self) -> None:
        hp = self.hparams
        self.register_buffer("class_features", self.frozen_class_features(hp.template), persistent=False)
        embed_dim = self.backbone.embed_dim
        self.cache_keys = nn.Parameter(torch.zeros(0, embed_dim), requires_grad=self.finetune)
        self.register_buffer("cache_labels", torch.zeros(0, dtype=torch.long))
        self.alpha = nn.Parameter(torch.tensor(float(hp.init_alpha)), requires_grad=False)
        self.beta = nn.Parameter(torch.tensor(float(hp.init_beta)), requires_grad=False)

    def encode_classes(self, image_features: Tensor | None = None) -> Tensor:
        return self.class_features

    def check_fitted_tensors(self, state: dict) -> list[str]:
        """One label per cache key, each a class of this model."""
        keys, labels = state["cache_keys"], state["cache_labels"]
        problems = []
        if len(keys) != len(labels):
            problems.append(f"{len(keys)} cache keys but {len(labels)} cache labels")
        if labels.is_floating_point() or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max())
                                          < len(self.classnames)):
            problems.append(f"cache labels must be class numbers 0..{len(self.classnames) - 1}")
        return problems

    def clip_scale(self) -> Tensor | float:
        scale = self.hparams.clip_scale
        return self.backbone.logit_scale.float() if scale is None else scale

    def cache_values(self) -> Tensor:
        return F.one_hot(self.cache_labels, len(self.classnames)).float()

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        with torch.autocast(self.device.type, enabled=False):
            return tip_logits(image_features.float(), text_features.float(), self.cache_keys, self.cache_values(),
                              self.alpha, self.beta, self.clip_scale())

    def configure_optimizers(self):
        hp = self.hparams
        return GridSearch([{"params": [self.beta], "grid": search_grid(hp.search_scale[0], hp.search_step[0])},
                           {"params": [self.alpha], "grid": search_grid(hp.search_scale[1], hp.search_step[1])}])

    # ------------------------------------------------------------------ fit
    def build_cache(self, views: TrainingViews) -> None:
        """Keys: each training image's tower output (unnormalised) averaged over ``augment_epochs``
        passes, then normalised, as the reference's ``build_cache_model``."""
        passes = [views.next_pass().by_item() for _ in range(self.hparams.augment_epochs)]
        keys = torch.stack([p.raw for p in passes]).mean(0)
        self.cache_keys.data = F.normalize(keys, dim=-1)
        self.cache_labels = passes[0].labels.clone()

    def search_alpha_beta(self, val: FeatureSet) -> float:
        """Set (beta, alpha) to the grid point of the best validation accuracy; returns it. When no
        point gets one validation image right, (beta, alpha) = (0, 0), as the reference (whose
        search starts there and moves only on a strictly better accuracy): zero-shot logits."""
        search = self.head_optimizers()[-1]
        betas, alphas = (torch.tensor(group["grid"], device=self.device) for group in search.param_groups)
        scale, values = self.clip_scale(), self.cache_values()

        def errors() -> Tensor:
            """Minus the number of correct validation images at every (beta, alpha) of the grid."""
            zero_shot = (scale * val.features) @ self.class_features.t()
            affinity = val.features @ self.cache_keys.t()
            table = []
            for beta in betas:  # all alphas of one beta at a time
                cache = (-(beta - beta * affinity)).exp() @ values
                logits = zero_shot + cache * alphas[:, None, None]
                table.append(-(logits.argmax(-1) == val.labels).sum(-1))
            return torch.stack(table).float()

        correct = -float(search.step(errors))
        if correct == 0:
            with torch.no_grad():
                self.beta.zero_()
                self.alpha.zero_()
        return correct / len(val)

    def prepare_fit(self, views: TrainingViews, val: FeatureSet | None) -> None:
        self.build_cache(views)

    def fit_features(self, views: TrainingViews, val: FeatureSet | None, epochs: int,
                     prepared=None) -> dict[str, float]:
        summary = self.finetune_keys(views, val, epochs)
        summary["fit_val_acc"] = self.search_alpha_beta(val)
        if "train_loss" not in summary:  # nothing trained: the fitted model's loss on its own cache
            with torch.no_grad():
                summary["train_loss"] = F.cross_entropy(self.logits(self.cache_keys, self.class_features),
                                                        self.cache_labels).item()
        return {**summary, "tip_alpha": float(self.alpha), "tip_beta": float(self.beta)}

    def finetune_keys(self, views: TrainingViews, val: FeatureSet, epochs: int) -> dict[str, float]:
        """Train the cache keys (Tip-Adapter-F); Tip-Adapter trains nothing."""
        return {}


class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: the cache keys are trained (cross-entropy on ``tip_logits`` with
    ``init_beta``; AdamW, cosine per iteration to 0 over each training; fresh augmented views every
    epoch), then ``(beta, alpha)`` are searched on validation as in Tip-Adapter.

    The reference first searches the initial alpha: for each ``a`` in 0..``init_alpha_scale``-1 it
    trains the keys for ``epochs`` epochs with alpha ``a`` (fresh optimiser and schedule each time)
    and notes the validation accuracy. Its keys and the trained adapter share one tensor, so these
    trainings follow one another on the same keys (``init_alpha_scale * epochs`` epochs in all),
    and the final training that follows updates nothing (its optimiser holds a parameter that
    receives no gradients). ``shared_keys=False`` trains each candidate from the cache keys and then
    trains the chosen one again for ``epochs`` epochs, keeping its best validation epoch;
    ``init_alpha_search=False`` is the Tip-Adapter paper: one training from the cache keys with
    ``init_alpha``, best validation epoch kept.

    Args:
        lr, eps, weight_decay: AdamW settings (reference 1e-3, 1e-4, and AdamW's default 0.01).
        init_alpha_search: search the training alpha over 0..``init_alpha_scale``-1 first (reference).
        init_alpha_scale: number of candidate alphas (reference 10).
        shared_keys: the candidates' trainings share the keys, as in the reference code (see above).
    """

    finetune = True

    def __init__(
        self,
        lr: float = 0.001,
        eps: float = 1e-4,
        weight_decay: float = 0.01,
        init_alpha_search: bool = True,
        init_alpha_scale: int = 10,
        shared_keys: bool = True,
        **kwargs,
    ):
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
        if init_alpha_scale < 1:
            raise ValueError(f"model.init_alpha_scale must be at least 1, got {init_alpha_scale}")

    def configure_optimizers(self):
        hp = self.hparams
        adamw = torch.optim.AdamW([self.cache_keys], lr=hp.lr, eps=hp.eps, weight_decay=hp.weight_decay)
        return [adamw, super().configure_optimizers()]

    def train_keys(self, views: TrainingViews, alpha: float, epochs: int, val: FeatureSet | None = None) -> float:
        """Train the keys for ``epochs`` fresh passes with a fresh AdamW and a per-iteration cosine
        from ``lr`` to 0. With ``val``, the keys of the first best validation epoch are kept.
        Returns the last epoch's mean loss."""
        optimizer = self.head_optimizers()[0]
        getattr(optimizer, "optimizer", optimizer).state.clear()
        beta, scale, values = float(self.hparams.init_beta), self.clip_scale(), self.cache_values()
        total, iteration, best, kept, losses = None, 0, 0.0, None, []
        for _ in range(epochs):
            view = views.next_pass()
            total = total or epochs * math.ceil(len(view) / views.batch_size)
            losses = []
            for batch in view.batches(views.batch_size):
                set_lr(optimizer, self.hparams.lr * 0.5 * (1 + math.cos(math.pi * iteration / total)))
                logits = tip_logits(view.features[batch], self.class_features, self.cache_keys, values, alpha,
                                    beta, scale)
                loss = F.cross_entropy(logits, view.labels[batch])
                optimizer.zero_grad()
                self.head_backward(loss)
                optimizer.step()
                losses.append(loss.item())
                iteration += 1
            if val is not None:
                acc = self.val_accuracy(val, alpha)
                if acc > best:
                    best, kept = acc, self.cache_keys.detach().clone()
        if kept is not None:
            self.cache_keys.data.copy_(kept)
        return sum(losses) / len(losses)

    def val_accuracy(self, val: FeatureSet, alpha: float) -> float:
        with torch.no_grad():
            return accuracy(tip_logits(val.features, self.class_features, self.cache_keys, self.cache_values(),
                                       alpha, float(self.hparams.init_beta), self.clip_scale()), val.labels)

    def finetune_keys(self, views: TrainingViews, val: FeatureSet, epochs: int) -> dict[str, float]:
        hp = self.hparams
        alpha, loss = float(hp.init_alpha), float("nan")
        final_training = True
        if hp.init_alpha_search:
            start, best, chosen = self.cache_keys.detach().clone(), 0.0, None
            for candidate in range(hp.init_alpha_scale):
                if not hp.shared_keys:
                    self.cache_keys.data.copy_(start)
                loss = self.train_keys(views, float(candidate), epochs)
                acc = self.val_accuracy(val, float(candidate))
                if acc > best:
                    best, alpha, chosen = acc, float(candidate), self.cache_keys.detach().clone()
            if chosen is not None and not hp.shared_keys:
                self.cache_keys.data.copy_(chosen)
            final_training = chosen is None or not hp.shared_keys
        if final_training:
            loss = self.train_keys(views, alpha, epochs, val=val)
        return {"train_loss": loss, "tip_train_alpha": alpha}
