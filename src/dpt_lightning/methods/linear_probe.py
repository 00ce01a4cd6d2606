"""The linear probe as the BiomedCoOp code runs it (CLIP's protocol): L2-regularised logistic
regression on the frozen features of one augmented pass, its inverse strength C searched on the
validation split. Every fit is scikit-learn's ``LogisticRegression(solver="lbfgs")`` itself, called
as the reference calls it (``max_iter=1000``, default ``tol=1e-4``, the normalised float32 features
of the tower), so that the same fits stop at the same points and the search picks the same C."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpt_lightning.methods.frozen_features import FeatureSet, FrozenFeatureTrainer, TrainingViews, accuracy


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
        max_iter, tol: scikit-learn's ``max_iter`` and ``tol`` (reference: 1000 and the default 1e-4).
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
        return LogisticRegressionFit(self.weight, self.bias, self.hparams.max_iter, self.hparams.tol)

    def fit_c(self, features: Tensor, labels: Tensor, c: float) -> tuple[Tensor, Tensor]:
        """scikit-learn's fit for ``c`` (one optimiser step); the fitted (weight, bias)."""
        (optimizer,) = self.head_optimizers()
        optimizer.step(problem=(features, labels, c))
        return self.weight.detach().clone(), self.bias.detach().clone()

    def prepare_fit(self, views: TrainingViews, val: FeatureSet | None) -> FeatureSet:
        return views.next_pass()  # the features of one augmented pass

    def fit_features(self, views: TrainingViews, val: FeatureSet | None, epochs: int,
                     prepared=None) -> dict[str, float]:
        hp = self.hparams
        features, labels = prepared.features, prepared.labels  # float32, as the reference hands them over

        def fit(c: float) -> tuple[float, tuple[Tensor, Tensor]]:
            weight, bias = self.fit_c(features, labels, c)
            return accuracy(class_scores(val.features, weight, bias), val.labels), (weight, bias)

        c, acc, (weight, bias), fits = search_c(fit, hp.c_grid, hp.bisection_steps, hp.select)
        c = float(c)
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(bias)
            loss = logistic_objective(weight, bias, features.to(weight.dtype), labels, c).item()
        return {"train_loss": loss, "fit_val_acc": acc, "lp_c": c, "lp_fits": float(fits)}


def search_c(fit, c_grid: Sequence[float], steps: int, select: str = "last_step"):
    """The reference's search of C. ``fit(c)`` returns (validation accuracy, model). First every
    value of ``c_grid``; around the first best C the range [C/10, 10 C] is bisected ``steps`` times
    in log10: both ends are fitted, the better one (the right end only if strictly better) is the
    step's model and the range shrinks to the half on its side. Returns (C, accuracy, model,
    number of fits) of the last step's model, or with ``select="best_val"`` of the first fit of the
    best accuracy.

    The arithmetic is the reference's, NumPy's included: the values after the first step are NumPy
    float64 scalars (``np.power``), as the reference hands them to scikit-learn, whose float32
    arithmetic they change under NumPy 2's promotion rules (a Python float does not)."""
    history = [(c, *fit(c)) for c in c_grid]
    chosen = max(history, key=lambda entry: entry[1])  # max keeps the first of equals
    left, right = 0.1 * chosen[0], 10 * chosen[0]
    for _ in range(steps):
        at_left, at_right = (left, *fit(left)), (right, *fit(right))
        history += [at_left, at_right]
        middle = 0.5 * (np.log10(right) + np.log10(left))
        if at_left[1] < at_right[1]:
            chosen, left, right = at_right, np.power(10, middle), np.power(10, np.log10(right))
        else:
            chosen, left, right = at_left, np.power(10, np.log10(left)), np.power(10, middle)
    if select == "best_val":
        chosen = max(history, key=lambda entry: entry[1])
    return (*chosen, len(history))


class LogisticRegressionFit(torch.optim.Optimizer):
    """scikit-learn's ``LogisticRegression(solver="lbfgs", C=C, max_iter, tol)`` as the optimiser of a
    linear head: ``weight`` (rows, D) and ``bias`` (rows,), one row for two classes (scikit-learn's
    binary model), else one per class. ``step(problem=(features, labels, C))`` fits from zero on
    ``features`` (N, D) as given (their dtype is scikit-learn's: the reference gives float32) and sets
    the head to ``coef_`` and ``intercept_``; it returns the fitted head's objective
    (`logistic_objective`). A step calls its ``closure`` first, if any (Lightning's hooks)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter, max_iter: int = 1000, tol: float = 1e-4):
        super().__init__([{"params": [weight, bias]}], {"max_iter": max_iter, "tol": tol})

    @torch.no_grad()
    def step(self, closure: Callable | None = None, *,  # type: ignore[override]
             problem: tuple[Tensor, Tensor, float]) -> Tensor:
        from sklearn.linear_model import LogisticRegression

        if closure is not None:
            closure()
        features, labels, c = problem
        group = self.param_groups[0]
        weight, bias = group["params"]
        classes = 2 if weight.shape[0] == 1 else weight.shape[0]
        present = sorted(int(label) for label in torch.unique(labels))
        if present != list(range(classes)):
            raise ValueError(f"linear probe: the training features hold the classes {present}, the head has "
                             f"{classes}; every class needs at least one training image")
        # penalty left at its default, "l2" (the reference's; newer versions deprecate naming it)
        fitted = LogisticRegression(solver="lbfgs", C=c, max_iter=group["max_iter"], tol=group["tol"]).fit(
            features.detach().cpu().numpy(), labels.detach().cpu().numpy())
        weight.copy_(torch.as_tensor(fitted.coef_).to(weight))
        bias.copy_(torch.as_tensor(fitted.intercept_).to(bias))
        return logistic_objective(weight, bias, features.to(weight.dtype), labels, c)
