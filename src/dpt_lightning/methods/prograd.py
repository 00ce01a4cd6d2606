"""ProGrad (Zhu et al., ICCV 2023): CoOp whose cross-entropy gradient never opposes a guide.

Each step computes two gradients of the context: g_ce of the cross-entropy and g_kl of the
distillation term towards a teacher's prediction. The step uses g_ce alone, except where the two
conflict (``g_ce . g_kl < 0``): then the conflicting part is removed,
``g = g_ce - lambda * (g_ce . g_kl / |g_kl|^2) g_kl``, so that with lambda = 1 the update no longer
increases the distillation term to first order (``g . g_kl = 0``). Exactly as the reference
(HealthX-Lab/BiomedCoOp, ``trainers/ProGrad/prograd_biomedclip.py`` with Dassl's
``prograd_backward_and_update``), the test is made per parameter tensor, and a zero or non-finite
g_kl leaves g_ce unchanged (there its normalisation gives NaN and the comparison fails).

The distillation term is the reference's ``T^2 * mean_b sum_c -p_T log p_S`` with
``p = softmax(logits / T)``: the cross-entropy of the softened predictions. It differs from
``T^2 * KL(p_T || p_S)`` by the teacher's entropy only, so its gradient is the KL's; logged as ``kl``.
The logged ``loss`` is the cross-entropy: its (projected) gradient is the only one applied.

Teacher (``teacher``):
* ``student`` (default, the reference code's fp32 path): the "zero-shot" prediction is computed by
  the model being trained, in a second forward pass without gradients, so teacher and student
  agree and g_kl is rounding noise (or exactly zero). Where that noise "conflicts" with g_ce, the
  projection removes g_ce's component along it, a change the paper does not describe; otherwise
  the step is CoOp's. Here the student's logits, detached, are the teacher (the same numbers: the
  backbone has no dropout during training, as in the reference).
* ``zeroshot`` (the paper): the frozen zero-shot classifier of ``hand_template``
  (``a photo of a {class}.``, the reference's CUSTOM_TEMPLATES for all 11 datasets) on the same
  image features; the reference's (broken) AMP path would use this teacher.

In Lightning the projection runs in ``on_before_optimizer_step``: after the backward of the
cross-entropy (and, under 16-bit mixed precision, after the gradients are unscaled), before
gradient clipping and the optimiser step. g_kl is computed in ``compute_loss`` with
``torch.autograd.grad`` (the graph is kept for Lightning's backward), summed over gradient
accumulation and averaged over DDP processes, so every process applies the same update.
Automatic optimisation stays on: the per-epoch Dassl schedule, checkpoints and exact resume are
the base class's. SGD's weight decay is added by the optimiser after the projection, as in Dassl.

Settings: temperature T per dataset (`PROGRAD_TEMPERATURES`, from ``configs/trainers/ProGrad``),
lambda 1 (the reference's default; no config changes it). Batch 128, SGD lr 0.002, 100 epochs
few-shot; base-to-novel lr 0.0015, 50 epochs (``trainers/prograd.yaml``). The backbone stays in
eval mode during training (no BERT dropout), as in CoOp.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dpt_lightning.methods.coop import CoOp
from dpt_lightning.methods.shared import record_hparams, resolve_settings

Teacher = Literal["student", "zeroshot"]

#: (temperature,) per dataset and protocol, from the reference configs (few_shot/<dataset>.yaml;
#: base-to-novel: one config, T = 1, for every dataset).
PROGRAD_TEMPERATURES: dict[str, dict[str, tuple[float]]] = {
    name: {"fewshot": (t,), "base2novel": (1.0,)}
    for name, t in {"BTMRI": 2.0, "BUSI": 0.25, "CHMNIST": 1.0, "COVID_19": 1.0, "CTKidney": 1.0,
                    "DermaMNIST": 4.0, "KneeXray": 1.0, "Kvasir": 1.0, "LungColon": 1.0, "OCTMNIST": 1.0,
                    "RETINA": 1.0}.items()
}
#: The reference's default T (its train.py), for data outside the table.
DEFAULT_TEMPERATURE = (1.0,)


def prograd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * mean_b sum_c -softmax(z_T / T) log_softmax(z_S / T)`` (the reference's term)."""
    t = temperature
    target = F.softmax(teacher_logits.float() / t, dim=-1)
    return -(target * F.log_softmax(student_logits.float() / t, dim=-1)).sum(-1).mean() * t * t


def project_gradient(g_ce: Tensor, g_kl: Tensor, lambda_: float = 1.0) -> Tensor:
    """g_ce with ``lambda_`` times its component along g_kl removed if the two conflict (negative
    dot product), else g_ce unchanged; also unchanged when either is zero or not finite."""
    a, b = g_ce.flatten().float(), g_kl.flatten().float()
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if not (torch.isfinite(norm_b) and norm_b > 0 and norm_a > 0):
        return g_ce
    unit = b / norm_b
    along = torch.dot(a, unit)
    if along >= 0:
        return g_ce
    return (a - lambda_ * along * unit).view_as(g_ce).to(g_ce.dtype)


class ProGrad(CoOp):
    """CoOp trained with prompt-aligned gradients. Only the context trains (4 x text width).

    Args:
        temperature: T of the distillation term; ``None`` = the reference's value for the dataset
            and protocol (`PROGRAD_TEMPERATURES`, else `DEFAULT_TEMPERATURE`), recorded in the
            hyper-parameters.
        projection_lambda: how much of the conflicting component is removed (1 = all of it).
        teacher: ``student`` (reference code) or ``zeroshot`` (paper); see the module docstring.
        hand_template: the zero-shot teacher's prompt.
        **kwargs: `CoOp`'s (template ``a photo of a {}.``, n_ctx, ...) and `PromptTrainer`'s.
    """

    def __init__(self, temperature: float | None = None, projection_lambda: float = 1.0,
                 teacher: Teacher = "student", hand_template: str = "a photo of a {}.", **kwargs):
        super().__init__(**kwargs)

    def configure_prompts(self) -> None:
        hp = self.hparams
        if hp.teacher not in ("student", "zeroshot"):
            raise ValueError(f"model.teacher must be 'student' (reference code) or 'zeroshot' (paper), "
                             f"got {hp.teacher!r}")
        settings = resolve_settings({"temperature": hp.temperature}, PROGRAD_TEMPERATURES, DEFAULT_TEMPERATURE,
                                    hp.dataset, hp.protocol, "ProGrad")
        if settings["temperature"] <= 0 or hp.projection_lambda < 0:
            raise ValueError(f"ProGrad: model.temperature must be > 0 (got {settings['temperature']}) and "
                             f"model.projection_lambda >= 0 (got {hp.projection_lambda})")
        record_hparams(self, **settings)
        super().configure_prompts()
        teacher = self.frozen_class_features(hp.hand_template).float() if hp.teacher == "zeroshot" else None
        self.register_buffer("teacher_features", teacher, persistent=False)
        self._guide: list[Tensor | None] | None = None

    def teacher_logits(self, logits: Tensor, image_features: Tensor) -> Tensor:
        """The teacher's logits (no gradient): the student's own, or the frozen zero-shot classifier's."""
        if self.teacher_features is None:
            return logits.detach()
        with torch.no_grad():
            return self.logits(image_features, self.teacher_features)

    def compute_loss(self, logits: Tensor, labels: Tensor, image_features: Tensor,
                     text_features: Tensor) -> dict[str, Tensor]:
        ce = F.cross_entropy(logits, labels)
        kl = prograd_kl(logits, self.teacher_logits(logits, image_features), self.hparams.temperature)
        if self.training and kl.requires_grad:
            self._add_guide_gradient(kl)
        return {"loss": ce, "kl": kl}

    def _add_guide_gradient(self, kl: Tensor) -> None:
        """Add g_kl of this (micro-)batch to the pending guide, keeping the graph for the CE backward."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        scale = scaler.get_scale() if scaler is not None else 1.0  # fp16: keep small gradients representable
        params = self.trainable_parameters()
        grads = torch.autograd.grad(kl * scale, params, retain_graph=True, allow_unused=True)
        if self._guide is None:
            self._guide = list(grads)
        else:
            self._guide = [g if acc is None else acc if g is None else acc + g for acc, g in zip(self._guide, grads)]

    def on_before_optimizer_step(self, optimizer) -> None:
        guide, self._guide = self._guide, None
        if guide is None:
            return
        distributed = self._trainer is not None and self.trainer.world_size > 1
        for param, g_kl in zip(self.trainable_parameters(), guide):
            if g_kl is None:
                continue
            if distributed:  # every process reduces the same tensors, in the same order
                g_kl = self.trainer.strategy.reduce(g_kl, reduce_op="mean")
            if param.grad is not None:
                param.grad.copy_(project_gradient(param.grad, g_kl, self.hparams.projection_lambda))
