"""The linear probe as the BiomedCoOp code runs it (CLIP's protocol): L2-regularised logistic
regression on the frozen features of one augmented pass, its inverse strength C searched on the
validation split. The reference fits scikit-learn's ``LogisticRegression(solver="lbfgs")``; this is
the same objective minimised by L-BFGS in torch (float64)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpt_lightning.methods.frozen_features import FeatureSet, FrozenFeatureTrainer, TrainingViews, accuracy

#: scikit-learn's defaults for L-BFGS: relative loss change (scipy's ``ftol``), evaluations.
LOSS_CHANGE_TOLERANCE = 64 * torch.finfo(torch.float64).eps
MAX_EVALUATIONS = 15000


def logistic_objective(weight: Tensor, bias: Tensor, features: Tensor, labels: Tensor, c: float) -> Tensor:
    """scikit-learn's objective divided by N: mean log-loss + ``||W||^2 / (2 C N)``, the intercept
    not penalised. One weight row is the binary model (sigmoid), more rows the multinomial one."""
    scores = features @ weight.t() + bias
    if weight.shape[0] == 1:
        loss = F.binary_cross_entropy_with_logits(scores[:, 0], labels.to(scores.dtype))
    else:
        loss = F.cross_entropy(scores, labels)
    return loss + weight.pow(2).sum() / (2 * c * len(labels))


def class_scores(features: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Logits (N, classes); the binary model's class 0 scores 0 (softmax = sigmoid)."""
    scores = features.to(weight.dtype) @ weight.t() + bias
    return torch.cat([torch.zeros_like(scores), scores], dim=1) if weight.shape[0] == 1 else scores


class LinearProbe(FrozenFeatureTrainer):
    """Logistic regression on frozen image features. C is searched as the reference: fits at each
    value of ``c_grid``, then ``bisection_steps`` steps that fit the two ends of a range around the
    best C (a decade either side, then halves of it in log10) and move toward the better one.

    Args:
        c_grid: the first values of C (reference 1e6 ... 1e-6, two decades apart).
        bisection_steps: reference 8.
        select: ``last_step`` (reference: the better model of the last bisection step) or
            ``best_val`` (the model of the best validation accuracy among every fit, the first one).
        max_iter, tol: L-BFGS iterations and gradient tolerance (scikit-learn: 1000, 1e-4).
    """

    #: Fitted from zero by L-BFGS: the weights legitimately end far from their start.
    guard_parameter_growth = False
    #: One weight row per training class: nothing for a novel class.
    scores_new_classes = False

    def __init__(
        self,
        c_grid: Sequence[float] = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6),
        bisection_steps: int = 8,
        select: Literal["last_step", "best_val"] = "last_step",
        max_iter: int = 1000,
        tol: float = 1e-4,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not c_grid or min(c_grid) <= 0 or bisection_steps < 0 or select not in ("last_step", "best_val"):
            raise ValueError("model.c_grid needs positive values, model.bisection_steps >= 0 and model.select "
                             f"'last_step' or 'best_val'; got {c_grid}, {bisection_steps}, {select!r}")

    def configure_prompts(self) -> None:
        rows = 1 if len(self.classnames) == 2 else len(self.classnames)
        self.weight = nn.Parameter(torch.zeros(rows, self.backbone.embed_dim, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(rows, dtype=torch.float64))

    def encode_classes(self, image_features: Tensor | None = None) -> Tensor:
        return self.weight

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        with torch.autocast(self.device.type, enabled=False):
            return class_scores(image_features, text_features, self.bias).float()

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.LBFGS([self.weight, self.bias], lr=1, max_iter=hp.max_iter, max_eval=MAX_EVALUATIONS,
                                 tolerance_grad=hp.tol, tolerance_change=LOSS_CHANGE_TOLERANCE, history_size=10,
                                 line_search_fn="strong_wolfe")

    def fit_c(self, features: Tensor, labels: Tensor, c: float) -> tuple[Tensor, Tensor]:
        """Minimise the objective for ``c`` from zero; the fitted (weight, bias)."""
        (optimizer,) = self.head_optimizers()
        getattr(optimizer, "optimizer", optimizer).state.clear()
        with torch.no_grad():
            self.weight.zero_()
            self.bias.zero_()

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = logistic_objective(self.weight, self.bias, features, labels, c)
            self.head_backward(loss)
            return loss

        optimizer.step(closure)
        return self.weight.detach().clone(), self.bias.detach().clone()

    def prepare_fit(self, views: TrainingViews, val: FeatureSet | None) -> FeatureSet:
        return views.next_pass()  # the features of one augmented pass

    def fit_features(self, views: TrainingViews, val: FeatureSet | None, epochs: int,
                     prepared=None) -> dict[str, float]:
        hp = self.hparams
        features, labels = prepared.features.double(), prepared.labels

        def fit(c: float) -> tuple[float, tuple[Tensor, Tensor]]:
            weight, bias = self.fit_c(features, labels, c)
            return accuracy(class_scores(val.features, weight, bias), val.labels), (weight, bias)

        c, acc, (weight, bias), fits = search_c(fit, hp.c_grid, hp.bisection_steps, hp.select)
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(bias)
            loss = logistic_objective(weight, bias, features, labels, c).item()
        return {"train_loss": loss, "fit_val_acc": acc, "lp_c": c, "lp_fits": float(fits)}


def search_c(fit, c_grid: Sequence[float], steps: int, select: str = "last_step"):
    """The reference's search of C. ``fit(c)`` returns (validation accuracy, model). First every
    value of ``c_grid``; around the first best C the range [C/10, 10 C] is bisected ``steps`` times
    in log10: both ends are fitted, the better one (the right end only if strictly better) is the
    step's model and the range shrinks to the half on its side. Returns (C, accuracy, model,
    number of fits) of the last step's model, or with ``select="best_val"`` of the first fit of the
    best accuracy."""
    history = [(c, *fit(c)) for c in c_grid]
    chosen = max(history, key=lambda entry: entry[1])  # max keeps the first of equals
    left, right = 0.1 * chosen[0], 10 * chosen[0]
    for _ in range(steps):
        at_left, at_right = (left, *fit(left)), (right, *fit(right))
        history += [at_left, at_right]
        middle = 0.5 * (math.log10(right) + math.log10(left))
        if at_left[1] < at_right[1]:
            chosen, left, right = at_right, 10 ** middle, 10 ** math.log10(right)
        else:
            chosen, left, right = at_left, 10 ** math.log10(left), 10 ** middle
    if select == "best_val":
        chosen = max(history, key=lambda entry: entry[1])
    return (*chosen, len(history))
