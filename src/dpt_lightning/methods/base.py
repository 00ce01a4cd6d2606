"""The base LightningModule every prompt method extends.

It owns what all methods share: the frozen backbone, the class names, the Dassl optimiser and
schedule, the metrics, logits ``s * f @ t.T`` in fp32, class text features computed once per
evaluation, and checkpoints that hold only the trainable prompt parameters.

A method overrides ``configure_prompts`` (build its modules), ``encode_classes`` (class text
features) and, where its image path or loss differ, ``encode_images`` and ``compute_loss``.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

from dpt_lightning.backbone import BIOMEDCLIP_HUB_ID, BiomedCLIP

CHECKPOINT_FORMAT = 1


class CheckpointMismatchError(RuntimeError):
    """A checkpoint that does not belong to this model (other backbone, classes or method)."""


class NonFiniteLossError(FloatingPointError):
    """A loss term or the logits became NaN or infinite during training."""


def make_metrics(num_classes: int) -> MetricCollection:
    """Micro accuracy (the headline), macro accuracy, macro F1 and macro AUROC."""
    n = max(num_classes, 2)  # a single novel class (BUSI) is still a valid, if trivial, task
    return MetricCollection({
        "acc": MulticlassAccuracy(n, average="micro"),
        "macro_acc": MulticlassAccuracy(n, average="macro"),
        "f1": MulticlassF1Score(n, average="macro"),
        "auroc": MulticlassAUROC(n, average="macro"),
    })


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
        cache_eval_features: keep evaluation image features on disk (``$DPT_CACHE_DIR/features``)
            for methods whose image path learns nothing, so that the runs of a benchmark grid
            encode each test image once (single process only; see ``feature_cache.py``).
    """

    #: Does the method train anything? (False: validate, test and predict only; a benchmark grid
    #: tests it once per dataset instead of fitting it per shot count and seed.)
    learns: bool = True
    #: Reference code: is the whole model switched to train mode (BERT dropout) during training?
    reference_backbone_dropout: bool = False
    #: Does the image path have no learnable part? (Then image features may be cached.)
    fixed_image_path: bool = True
    #: Text template of the method (``{}`` is the class name).
    template: str = "a photo of a {}."

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
        self._text_cache: tuple[tuple, Tensor] | None = None
        self._feature_cache = None
        self.configure_prompts()
        metrics = make_metrics(len(self.classnames))
        self.train_metrics = MetricCollection({"acc": MulticlassAccuracy(max(len(self.classnames), 2),
                                                                         average="micro")}, prefix="train_")
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")

    # ------------------------------------------------------------------ hooks
    def configure_prompts(self) -> None:
        """Build the method's prompt modules (the only trainable parameters)."""

    def encode_classes(self) -> Tensor:
        """Class text features (C, D), L2-normalised, with gradients where prompts learn."""
        raise NotImplementedError

    def encode_images(self, images: Tensor) -> Tensor:
        """Image features (B, D), L2-normalised. Default: the plain frozen image tower."""
        return F.normalize(self.backbone.encode_image(images).float(), dim=-1)

    def image_path_key(self) -> str:
        """Identifies how ``encode_images`` computes (for the evaluation feature cache); a method
        with fixed visual prompts returns their setting."""
        return "plain"

    def compute_loss(self, logits: Tensor, labels: Tensor, image_features: Tensor,
                     text_features: Tensor) -> dict[str, Tensor]:
        """The training loss (key ``loss``) and its named parts. Default: cross-entropy."""
        return {"loss": F.cross_entropy(logits, labels)}

    # --------------------------------------------------------------- helpers
    def tokenize(self, texts: list[str]) -> Tensor:
        """Token ids, trimmed to the longest real prompt unless computing as the reference."""
        return self.backbone.tokenize(texts, trim=not self.reference_compute)

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """``s * f @ t.T`` in fp32 (also under mixed precision)."""
        with torch.autocast(self.device.type, enabled=False):
            return self.backbone.logit_scale.float() * image_features.float() @ text_features.float().t()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def eval_text_features(self) -> Tensor:
        """Class text features for evaluation, recomputed only when a prompt parameter changed."""
        if self.reference_compute:
            with torch.no_grad():
                return self.encode_classes()
        key = (str(self.device), tuple(p._version for p in self.trainable_parameters()),
               tuple(p.data_ptr() for p in self.trainable_parameters()))
        if self._text_cache is None or self._text_cache[0] != key:
            with torch.no_grad():
                self._text_cache = (key, self.encode_classes().detach())
        return self._text_cache[1]

    def forward(self, images: Tensor) -> Tensor:
        """Logits (B, C) of a batch of images."""
        text = self.encode_classes() if self.training else self.eval_text_features()
        return self.logits(self.encode_images(images), text)

    def evaluation_logits(self, batch: dict) -> Tensor:
        """Logits of an evaluation batch, with image features from the cache where allowed."""
        cache = self._eval_feature_cache()
        if cache is None:
            return self(batch["image"])
        paths = batch["path"]
        cached = [cache.get(p) for p in paths]
        missing = [i for i, f in enumerate(cached) if f is None]
        if missing:
            fresh = self.encode_images(batch["image"][missing])
            for i, feature in zip(missing, fresh):
                cache.put(paths[i], feature)
                cached[i] = feature
        features = torch.stack([f.to(self.device) for f in cached])
        return self.logits(features, self.eval_text_features())

    def _eval_feature_cache(self):
        if not (self.hparams.cache_eval_features and self.fixed_image_path) or self.training:
            return None
        if self._trainer is not None and self.trainer.world_size > 1:
            return None
        if self._feature_cache is None:
            from dpt_lightning.feature_cache import EvalFeatureCache, weights_digest
            from dpt_lightning.tiny import cache_root

            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            transform = getattr(datamodule, "test_transform", None) or self.backbone.test_transform()
            self._feature_cache = EvalFeatureCache(cache_root() / "features", weights_digest(self.backbone),
                                                   self.image_path_key(), repr(transform))
        return self._feature_cache

    def _flush_feature_cache(self) -> None:
        if self._feature_cache is not None:
            self._feature_cache.flush()

    def on_validation_epoch_end(self) -> None:
        self._flush_feature_cache()

    def on_test_epoch_end(self) -> None:
        self._flush_feature_cache()

    def on_predict_epoch_end(self) -> None:
        self._flush_feature_cache()

    # ------------------------------------------------------------ lightning
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "use_transforms"):
            datamodule.use_transforms(self.backbone.train_transform(), self.backbone.test_transform())
        if datamodule is not None and getattr(datamodule, "classnames", None) not in (None, self.classnames):
            if stage == "fit":
                raise ValueError(f"the data's classes {datamodule.classnames} differ from the model's "
                                 f"{self.classnames}")

    def on_train_epoch_start(self) -> None:
        self.train()
        self.backbone.train(self.backbone_dropout)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # Dropout draws from the global generator: seed it per step so that a resumed fit
        # continues exactly as an uninterrupted one would.
        torch.manual_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)) * 1_000_003 + self.global_step)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, labels = batch["image"], batch["label"]
        image_features = self.encode_images(images)
        text_features = self.encode_classes()
        logits = self.logits(image_features, text_features)
        losses = self.compute_loss(logits, labels, image_features, text_features)
        self._check_finite(logits, losses)
        batch_size = labels.shape[0]
        for name, value in losses.items():
            key = "train_loss" if name == "loss" else f"train_loss_{name}"
            self.log(key, value.detach(), prog_bar=name == "loss", batch_size=batch_size)
        self.train_metrics(_metric_logits(logits), labels)
        self.log_dict(self.train_metrics, prog_bar=True, batch_size=batch_size)
        return losses["loss"]

    def _check_finite(self, logits: Tensor, losses: dict[str, Tensor]) -> None:
        bad = [name for name, value in {"logits": logits, **losses}.items() if not torch.isfinite(value).all()]
        if bad:
            raise NonFiniteLossError(
                f"non-finite {', '.join(bad)} at epoch {self.current_epoch}, step {self.global_step} "
                f"({type(self).__name__}); stopping instead of training on NaN. Lower model.lr, check the "
                "loss weights, or use --trainer.precision 32-true")

    def _evaluate(self, batch: dict, metrics: MetricCollection) -> None:
        logits = self.evaluation_logits(batch)
        metrics.update(_metric_logits(logits), batch["label"])
        self.log_dict(metrics, prog_bar=True, batch_size=batch["label"].shape[0])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        probs = self.evaluation_logits(batch).softmax(dim=-1)
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
        return {"format": CHECKPOINT_FORMAT, "method": type(self).__name__,
                "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "backbone": self.backbone.fingerprint(), "classnames": self.classnames,
                "protocol": self.hparams.protocol, "dataset": self.hparams.dataset}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("backbone.")]:
            del state[key]
        checkpoint["dpt_lightning"] = self.checkpoint_identity()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        identity = checkpoint.get("dpt_lightning")
        if identity is None:
            raise CheckpointMismatchError("this checkpoint was not written by dpt_lightning")
        mine = self.checkpoint_identity()
        problems = []
        if identity["method"] != mine["method"]:
            problems.append(f"method {identity['method']} (this model: {mine['method']})")
        for key in ("text_width", "vision_width", "embed_dim", "vocab_size"):
            if identity["backbone"].get(key) != mine["backbone"].get(key):
                problems.append(f"backbone {key} {identity['backbone'].get(key)} "
                                f"(this model: {mine['backbone'].get(key)})")
        if identity["classnames"] != mine["classnames"] and not (
                identity.get("protocol") == mine["protocol"] == "base2novel"):
            problems.append(f"classes {identity['classnames']} (this model: {mine['classnames']}); only a "
                            "base-to-novel evaluation may load a prompt trained on other classes")
        if problems:
            raise CheckpointMismatchError("checkpoint does not fit this model: " + "; ".join(problems))
        shapes = {name: p.shape for name, p in self.named_parameters() if p.requires_grad}
        wrong = [f"{k} {tuple(v.shape)} (this model: {tuple(shapes[k])})"
                 for k, v in checkpoint["state_dict"].items() if k in shapes and v.shape != shapes[k]]
        if wrong:
            raise CheckpointMismatchError("checkpoint parameters have other shapes: " + "; ".join(wrong))
        wanted = {name for name, p in self.named_parameters() if p.requires_grad}
        missing = sorted(wanted - set(checkpoint["state_dict"]))
        if missing:
            raise CheckpointMismatchError(f"checkpoint lacks trainable parameters {missing}")


def _metric_logits(logits: Tensor) -> Tensor:
    """Metrics need at least two classes: a single-class task gets an impossible second class."""
    if logits.shape[1] >= 2:
        return logits.detach().float()
    return torch.cat([logits.detach().float(), torch.full_like(logits, -1e4)], dim=1)
