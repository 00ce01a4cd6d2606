"""The base LightningModule every prompt method extends.

It owns what all methods share: the frozen backbone, the class names, the Dassl optimiser and
schedule, the metrics, logits ``s * f @ t.T`` in fp32, class text features computed once per
evaluation, and checkpoints that hold only the trainable parameters.

A method builds its modules in ``configure_prompts`` and overrides the hooks that differ from
plain zero-shot CLIP. Images are always encoded first, so class features may depend on them:

* image side: ``transform_images`` (input space, e.g. a pixel frame) -> ``visual_prompts`` (tokens
  entering the ViT blocks, placed by ``visual_mode``) -> ``encode_images`` (all of it, normalised);
  ``image_path_key`` says whether (and under which key) image features may be cached;
* text side: ``encode_classes(image_features)`` -> (C, D), or (B, C, D) for a method that declares
  ``instance_conditioned`` (one set of class features per image, as CoCoOp);
* ``logits`` and ``compute_loss``.

Helpers for the hooks: ``frozen_class_features`` (hand-crafted prompts or a description bank,
encoded once without dropout), ``encode_prompt_embeddings`` (prompt embeddings of any leading shape
through the text tower, normalised) and ``tokenize``.
"""
from __future__ import annotations

import itertools
import math
import os
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from dpt_lightning.backbone import BIOMEDCLIP_HUB_ID, BiomedCLIP
from dpt_lightning.descriptions import resolve_sentences
from dpt_lightning.methods.checkpoints import (check_checkpoint, checkpoint_identity, drop_frozen_weights,
                                               non_finite_tensors)
from dpt_lightning.methods.evaluation import TextFeatureCache, make_metrics, metric_logits
from dpt_lightning.prompts import check_class_texts, fill_template

#: Hooks that change the image path; a method overriding any of them is never served cached
#: plain image features unless it declares its own ``image_path_key``.
IMAGE_PATH_HOOKS = ("transform_images", "visual_prompts", "encode_images")


class NonFiniteLossError(FloatingPointError):
    """A loss term or the logits became NaN or infinite during training."""


class NonFiniteLogitsError(FloatingPointError):
    """Evaluation or prediction met NaN or infinite logits."""


def dassl_lr_factor(epoch: int, max_epochs: int, warmup_epochs: int, warmup_ratio: float) -> float:
    """LR multiplier of Dassl's constant warm-up followed by per-epoch cosine over ``max_epochs``."""
    if epoch < warmup_epochs:
        return warmup_ratio
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / max_epochs))


class PromptTrainer(LightningModule):
    """Base of every method. Subclasses set the class attributes below and override the hooks.

    Args:
        classnames: class names in label order (linked from the datamodule by the CLI).
        backbone: ``hf-hub:...``, ``local-dir:/path``, ``tiny`` or ``random-biomedclip``.
        dataset: the dataset's name (linked from the datamodule), for per-dataset settings.
        protocol: ``fewshot`` or ``base2novel`` (linked from the datamodule).
        lr, momentum, weight_decay: SGD settings (the reference: momentum 0.9, wd 5e-4).
        warmup_epochs, warmup_lr: constant warm-up before the per-epoch cosine schedule.
        backbone_dropout: keep the backbone in train mode while training (BERT dropout active);
            ``None`` takes the method's reference behaviour (``reference_backbone_dropout``).
        reference_compute: compute as the reference code does (prompts padded to the full
            context, class text features recomputed for every evaluation batch). Same results,
            slower; for speed comparisons only.
        cache_eval_features, cache_train_features: serve the image features of evaluation views,
            and of augmented training views, from the feature store (``$DPT_CACHE_DIR/features``,
            `dpt_lightning.features`) for methods whose image path is fixed (``image_path_key``
            not None), so that the runs of a benchmark grid encode each view once. Results are
            the same bit for bit; ``dpt-bench`` turns both on.
    """

    #: Does the method train anything? (False: validate, test and predict only; a benchmark grid
    #: tests it once per dataset instead of fitting it per shot count and seed.)
    learns: ClassVar[bool] = True
    #: Reference code: is the whole model switched to train mode (BERT dropout) during training?
    reference_backbone_dropout: ClassVar[bool] = False
    #: Do the class features depend on the image? Then ``encode_classes`` receives the image
    #: features and returns (B, C, D), and evaluation never caches class features.
    instance_conditioned: ClassVar[bool] = False
    #: Can what the method learns score classes it was not trained on (base-to-novel)? False for a
    #: method that learns one entry per training class (a linear head, a class-specific context).
    scores_new_classes: ClassVar[bool] = True
    #: How ``visual_prompts`` enter the ViT: ``replace`` patch tokens 1..N or ``insert`` after CLS.
    visual_mode: Literal["replace", "insert"] = "replace"
    #: Does the training loader drop an epoch's last partial batch? Dassl's rule, the reference loader
    #: of most methods (told to the datamodule in ``setup``).
    drop_last_batch: bool = True
    #: Where checkpoints keep the settings. Not Lightning's ``hyper_parameters``: LightningCLI would
    #: apply those over the user's config (and import the class they name) on ``--ckpt_path``; here
    #: the config and the command line define the model and the checkpoint must match it.
    CHECKPOINT_HYPER_PARAMS_KEY = "method_settings"

    def __init__(
        self,
        classnames: list[str] | None = None,
        backbone: str = BIOMEDCLIP_HUB_ID,
        dataset: str | None = None,
        protocol: str = "fewshot",
        lr: float = 0.002,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        backbone_dropout: bool | None = None,
        reference_compute: bool = False,
        cache_eval_features: bool = False,
        cache_train_features: bool = False,
    ):
        super().__init__()
        if not classnames:
            raise ValueError(f"{type(self).__name__} needs model.classnames (the CLI links them from the data)")
        if len(set(classnames)) != len(classnames):
            raise ValueError(f"model.classnames has duplicates: {classnames}")
        if lr <= 0 or weight_decay < 0 or warmup_epochs < 0 or warmup_lr <= 0:
            raise ValueError("model.lr and model.warmup_lr must be positive, weight_decay and warmup_epochs >= 0")
        self.save_hyperparameters()
        self.classnames = list(classnames)
        self.backbone = BiomedCLIP(backbone)
        self.backbone_dropout = self.reference_backbone_dropout if backbone_dropout is None else backbone_dropout
        self.reference_compute = reference_compute
        self.strict_loading = False  # the frozen backbone is not in our checkpoints
        #: Load a checkpoint that cannot show its backbone's weights (an older format: `check_checkpoint`)?
        self.allow_unverified_backbone = False
        #: Where what the method learns comes from: None (as initialised), "fit" or "checkpoint".
        self.weights_source: str | None = None
        self.text_cache = TextFeatureCache()
        self._feature_stores: dict = {}
        self.configure_prompts()
        metrics = make_metrics(len(self.classnames))
        self.train_metrics = MetricCollection({"acc": MulticlassAccuracy(max(len(self.classnames), 2),
                                                                         average="micro")}, prefix="train_")
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")

    # ------------------------------------------------------------------ hooks
    def configure_prompts(self) -> None:
        """Build the method's modules (their parameters are the only trainable ones)."""

    def transform_images(self, images: Tensor) -> Tensor:
        """Input-space hook: the normalised image batch before the image tower (pixel prompts)."""
        return images

    def visual_prompts(self) -> list[Tensor]:
        """Tokens entering the ViT: one (N, W) or (B, N, W) tensor per prompted block; none by default."""
        return []

    def encode_images(self, images: Tensor) -> Tensor:
        """Image features (B, D), L2-normalised: the image tower on ``transform_images(images)``
        with ``visual_prompts()`` placed by ``visual_mode``."""
        features = self.backbone.encode_image(self.transform_images(images), self.visual_prompts(),
                                              mode=self.visual_mode)
        return F.normalize(features.float(), dim=-1)

    def image_path_key(self) -> str | None:
        """Identifies how ``encode_images`` computes, for image-feature caches; ``None``: never cache.

        Derived: ``"plain"`` (the frozen tower) unless the method overrides one of the image-path
        hooks, then ``None``. A method whose changed image path is nevertheless fixed (constant
        tokens, no learning) overrides this with a key naming its setting."""
        cls = type(self)
        changed = any(getattr(cls, hook) is not getattr(PromptTrainer, hook) for hook in IMAGE_PATH_HOOKS)
        return None if changed else "plain"

    def encode_classes(self, image_features: Tensor | None = None) -> Tensor:
        """Class features, L2-normalised, with gradients where prompts learn: (C, D), or (B, C, D)
        from ``image_features`` (B, D) for an ``instance_conditioned`` method."""
        raise NotImplementedError

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """``s * f @ t.T`` (B, C) in fp32 (also under mixed precision); ``text_features`` (C, D) or
        per image (B, C, D)."""
        with torch.autocast(self.device.type, enabled=False):
            f, t = image_features.float(), text_features.float()
            scores = f @ t.t() if t.dim() == 2 else torch.einsum("bd,bcd->bc", f, t)
            return self.backbone.logit_scale.float() * scores

    def compute_loss(self, logits: Tensor, labels: Tensor, image_features: Tensor,
                     text_features: Tensor) -> dict[str, Tensor]:
        """The training loss (key ``loss``) and its named parts. Default: cross-entropy."""
        return {"loss": F.cross_entropy(logits, labels)}

    # --------------------------------------------------------------- helpers
    def tokenize(self, texts: list[str]) -> Tensor:
        """Token ids, trimmed to the longest real prompt unless computing as the reference."""
        return self.backbone.tokenize(texts, trim=not self.reference_compute)

    def encode_prompt_embeddings(self, embeddings: Tensor, attention_mask: Tensor,
                                 deep_prompts: list[Tensor] | None = None) -> Tensor:
        """Text features of prompt embeddings (..., L, W) with their mask (L,) or (C, L), normalised:
        (..., D). Leading dimensions (classes, or images x classes) are flattened into one batch."""
        lead, (length, width) = embeddings.shape[:-2], embeddings.shape[-2:]
        mask = attention_mask.expand(*lead, length).reshape(-1, length)
        features = self.backbone.encode_text_embeddings(embeddings.reshape(-1, length, width), mask,
                                                        deep_prompts=deep_prompts)
        return F.normalize(features.float(), dim=-1).reshape(*lead, -1)

    def frozen_class_features(self, template: str = "a photo of a {}.", descriptions: str | None = None) -> Tensor:
        """Hand-crafted class features (C, D), encoded once by the frozen backbone without dropout:
        ``template`` filled with each class name, or with ``descriptions`` (a bank path, a shipped
        bank name, or ``auto`` for the dataset's) the ensemble of each class's sentences
        (normalised, averaged, re-normalised). Keep the result as a non-persistent buffer."""
        if descriptions:
            sentences = resolve_sentences(descriptions, self.hparams.dataset, self.classnames)
        else:
            sentences = [[fill_template(template, name)] for name in self.classnames]
        check_class_texts(self.backbone, sentences, self.classnames,
                           "model.descriptions" if descriptions else "model.template")
        return self.backbone.encode_class_sentences(sentences)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def text_features(self, image_features: Tensor) -> Tensor:
        """``encode_classes`` as training and evaluation call it: evaluation of a method whose class
        features do not depend on the image computes them once (until a parameter changes). Only
        where no gradient is wanted: with gradients on and a trainable parameter, also in eval mode
        (test-time adaptation, saliency, calibration), they are computed with their graph."""
        if self.instance_conditioned:
            return self.encode_classes(image_features)
        if self.training or (torch.is_grad_enabled() and self.trainable_parameters()):
            return self.encode_classes()
        return self.eval_text_features()

    def eval_text_features(self) -> Tensor:
        """Class features for evaluation, recomputed only when a learnable parameter changed."""
        if self.reference_compute:
            with torch.no_grad():
                return self.encode_classes()
        return self.text_cache.get(self.trainable_parameters(), self.encode_classes, self.device)

    def forward(self, images: Tensor) -> Tensor:
        """Logits (B, C) of a batch of images."""
        image_features = self.encode_images(images)
        return self.logits(image_features, self.text_features(image_features))

    def evaluation_logits(self, batch: dict) -> Tensor:
        """Logits of an evaluation batch (image features from the store where allowed)."""
        features = self.image_features(batch)
        return self.logits(features, self.text_features(features))

    def image_features(self, batch: dict) -> Tensor:
        """``encode_images`` of a batch; served from the feature store (same values) when it is on
        for this stage and the method's image path is fixed (`feature_store`)."""
        store = self.feature_store()
        if store is None or "view" not in batch:
            return self.encode_images(batch["image"])
        pooled = store.pooled(batch["path"], batch["view"], batch["image"], self.pool_images)
        return F.normalize(self.backbone.project_image(pooled).float(), dim=-1)

    def pool_images(self, images: Tensor) -> Tensor:
        """The image path of `encode_images` up to the pooled token, before the projection."""
        return self.backbone.pool_image(self.transform_images(images), self.visual_prompts(), mode=self.visual_mode)

    def feature_store(self):
        """The feature store for the current stage, or None: off for this stage, an image path that
        learns (``image_path_key`` None), an ``encode_images`` of the method's own (it cannot be
        split at the pooled token), or a stochastic image tower in training (dropout)."""
        wanted = self.hparams.cache_train_features if self.training else self.hparams.cache_eval_features
        key = self.image_path_key() if wanted else None
        if key is None or type(self).encode_images is not PromptTrainer.encode_images:
            return None
        if self.training and any(getattr(m, "p", 0) or getattr(m, "drop_prob", 0)
                                 for m in self.backbone.model.visual.modules() if m.training):
            return None
        # the numbers also depend on where and in which precision the tower runs
        device = self.device.type
        precision = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else "no-autocast"
        key = f"{key}|{device}|{self.backbone.model.logit_scale.dtype}|{precision}"
        if key not in self._feature_stores:
            from dpt_lightning.features import FeatureStore, weights_digest

            self._feature_stores[key] = FeatureStore(weights_digest(self.backbone), key)
        return self._feature_stores[key]

    def _flush_features(self) -> None:
        for store in self._feature_stores.values():
            store.flush()

    on_train_epoch_end = on_validation_epoch_end = on_test_epoch_end = on_predict_epoch_end = _flush_features

    # ------------------------------------------------------------ lightning
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "use_transforms"):
            datamodule.use_transforms(self.backbone.train_transform(), self.backbone.test_transform())
        if datamodule is not None and hasattr(datamodule, "use_batch_rule"):
            datamodule.use_batch_rule(drop_last=self.drop_last_batch)
        if datamodule is not None and getattr(datamodule, "classnames", None) not in (None, self.classnames):
            if stage == "fit":
                raise ValueError(f"the data's classes {datamodule.classnames} differ from the model's "
                                 f"{self.classnames}")

    def on_train_start(self) -> None:
        self.weights_source = "fit"

    def on_train_epoch_start(self) -> None:
        self.train()
        self.backbone.train(self.backbone_dropout)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # Dropout draws from the global generator: seed it per step so that a resumed fit
        # continues exactly as an uninterrupted one would.
        torch.manual_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)) * 1_000_003 + self.global_step)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        labels = batch["label"]
        image_features = self.image_features(batch)
        text_features = self.text_features(image_features)
        logits = self.logits(image_features, text_features)
        losses = self.compute_loss(logits, labels, image_features, text_features)
        self._check_finite(logits, losses)
        batch_size = labels.shape[0]
        for name, value in losses.items():
            key = "train_loss" if name == "loss" else f"train_loss_{name}"
            self.log(key, value.detach(), prog_bar=name == "loss", batch_size=batch_size)
        self.train_metrics(metric_logits(logits), labels)
        self.log_dict(self.train_metrics, prog_bar=True, batch_size=batch_size)
        return losses["loss"]

    def _check_finite(self, logits: Tensor, losses: dict[str, Tensor]) -> None:
        bad = [name for name, value in {"logits": logits, **losses}.items() if not torch.isfinite(value).all()]
        if bad:
            raise NonFiniteLossError(
                f"non-finite {', '.join(bad)} at epoch {self.current_epoch}, step {self.global_step} "
                f"({type(self).__name__}); stopping instead of training on NaN. Lower model.lr, check the "
                "loss weights, or use --trainer.precision 32-true")

    def _evaluate(self, batch: dict, batch_idx: int, metrics: MetricCollection, stage: str) -> None:
        logits = self.finite_logits(batch, batch_idx, stage)
        metrics.update(metric_logits(logits), batch["label"])
        self.log_dict(metrics, prog_bar=True, batch_size=batch["label"].shape[0])

    def finite_logits(self, batch: dict, batch_idx: int, stage: str) -> Tensor:
        """`evaluation_logits`; `NonFiniteLogitsError` (naming the method's tensors that are not
        finite, if any) instead of metrics or predictions computed from NaN or infinity."""
        logits = self.evaluation_logits(batch)
        if not bool(torch.isfinite(logits).all()):
            own = {name: t for name, t in itertools.chain(self.named_parameters(), self.named_buffers())
                   if not name.startswith("backbone.")}
            bad = non_finite_tensors(own)
            cause = (f"its tensors {', '.join(bad[:8])} hold NaN or infinite values (a damaged checkpoint?)" if bad
                     else "the backbone's features overflowed (try --trainer.precision 32-true) or an image is "
                          "not finite")
            raise NonFiniteLogitsError(f"non-finite logits in {stage} batch {batch_idx} ({type(self).__name__}): "
                                       f"{cause}; stopping instead of reporting numbers computed from them")
        return logits

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, self.val_metrics, "validation")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, self.test_metrics, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        probs = self.finite_logits(batch, batch_idx, "predict").softmax(dim=-1)
        return {"path": batch["path"], "probs": probs, "pred": probs.argmax(dim=-1)}

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise RuntimeError(f"{type(self).__name__} has no trainable parameters: it can validate, test "
                               "and predict, not fit")
        hp = self.hparams
        optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        max_epochs = self.trainer.max_epochs if self._trainer is not None and self.trainer.max_epochs else 1
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda epoch: dassl_lr_factor(epoch, max(max_epochs, 1), hp.warmup_epochs, hp.warmup_lr / hp.lr),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}

    # ----------------------------------------------------------- checkpoints
    def checkpoint_identity(self) -> dict:
        """What a checkpoint records to refuse loading into a different model."""
        return checkpoint_identity(self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        drop_frozen_weights(checkpoint["state_dict"])
        checkpoint["dpt_lightning"] = self.checkpoint_identity()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint(self, checkpoint)
        self.weights_source = "checkpoint"
