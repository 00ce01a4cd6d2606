"""What evaluation shares across methods: the metrics, and class text features kept between batches."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score


def make_metrics(num_classes: int) -> MetricCollection:
    """Micro accuracy (the headline), macro accuracy, macro F1 and macro AUROC."""
    n = max(num_classes, 2)  # a single novel class (BUSI) is still a valid, if trivial, task
    return MetricCollection({
        "acc": MulticlassAccuracy(n, average="micro"),
        "macro_acc": MulticlassAccuracy(n, average="macro"),
        "f1": MulticlassF1Score(n, average="macro"),
        "auroc": MulticlassAUROC(n, average="macro"),
    })


def metric_logits(logits: Tensor) -> Tensor:
    """Metrics need at least two classes: a single-class task gets an impossible second class."""
    if logits.shape[1] >= 2:
        return logits.detach().float()
    return torch.cat([logits.detach().float(), torch.full_like(logits, -1e4)], dim=1)


class TextFeatureCache:
    """Class text features computed once and served until any learnable parameter changes.

    The cache keeps a copy of the parameters it was computed from and compares values, not
    version counters: a parameter changed in place through ``.data`` (which keeps its version)
    or loaded from a checkpoint is noticed as surely as an optimiser step. Comparing a few
    thousand (or, for MaPLe, a few million) numbers costs far less than one text-tower pass.
    """

    def __init__(self) -> None:
        self._snapshot: list[Tensor] | None = None
        self._features: Tensor | None = None

    def clear(self) -> None:
        self._snapshot = self._features = None

    def get(self, parameters: list[nn.Parameter], compute: Callable[[], Tensor], device: torch.device) -> Tensor:
        """The cached features, recomputed with ``compute`` (without gradients) when a parameter
        or the device changed since they were computed."""
        current = [p.detach() for p in parameters]
        fresh = self._snapshot is not None and self._features.device == device and len(current) == len(self._snapshot) and all(
            a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            for a, b in zip(current, self._snapshot))
        if not fresh:
            with torch.no_grad():
                self._features = compute().detach()
            self._snapshot = [p.clone() for p in current]
        return self._features
