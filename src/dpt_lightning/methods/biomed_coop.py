"""BiomedCoOp (Koleilat et al., CVPR 2025): CoOp regularised by description-bank knowledge.

The strongest prior method, kept beside Biomed-DPT for side-by-side comparison. The student is
CoOp with ``a photo of a {}.`` (4 context vectors from "a photo of a"); image features are the
plain (unprompted) ones. The teacher is built from the bank's sentences, each encoded once:

* every training batch scores each sentence index i by the batch mean of the maximum (over classes)
  of ``s f e_{c,i}^T``, turns the scores into z-scores and keeps the sentences with ``|z| <= tau``;
  the kept sentences' features are averaged per class and re-normalised into the teacher classifier;
* ``L = CE + lambda_SCCM * MSE(t, mean of all sentences) + lambda_KDSP * KL(teacher || student)``
  (the KL summed and divided by ``B * C``, as in `distillation_kl`).

z-scores, ``outlier_rule``: the paper describes a robust z-score ``(score - median) / MAD``. The
reference code computes it and then standardises it once more (``(z - mean z) / std z``) before the
threshold, which cancels the median and MAD: the kept set is that of the plain z-score
``(score - mean) / std`` (unbiased std). ``reference`` (default) reproduces the code, ``robust``
applies the paper's rule. Should no sentence pass (a degenerate batch; the reference code would
produce NaN there), all sentences are kept.

Per-dataset settings (lambda_SCCM, lambda_KDSP, tau) are the reference configuration files'
(`BIOMED_COOP_SETTINGS`); data outside that table uses the reference code's defaults.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dpt_lightning.methods.coop import CoOp
from dpt_lightning.methods.shared import distillation_kl, record_hparams, resolve_settings, teacher_sentences
from dpt_lightning.prompts import check_class_texts

OutlierRule = Literal["reference", "robust"]

#: (lambda_SCCM, lambda_KDSP, tau) per dataset and protocol, from the BiomedCoOp reference configs
#: (configs/trainers/BiomedCoOp/{few_shot,base_to_novel}/<dataset>.yaml). The reference has no
#: base-to-novel setting for BUSI (it leaves BUSI out there): BUSI base-to-novel uses the defaults.
BIOMED_COOP_SETTINGS: dict[str, dict[str, tuple[float, float, float]]] = {
    "BTMRI": {"fewshot": (0.5, 0.25, 1.5), "base2novel": (0.5, 0.5, 1.25)},
    "BUSI": {"fewshot": (0.75, 0.75, 1.5)},
    "CHMNIST": {"fewshot": (0.25, 0.25, 1.5), "base2novel": (10.0, 1.0, 1.5)},
    "COVID_19": {"fewshot": (0.5, 2.0, 1.5), "base2novel": (20.0, 1.0, 1.25)},
    "CTKidney": {"fewshot": (1.0, 0.5, 1.5), "base2novel": (10.0, 0.25, 1.25)},
    "DermaMNIST": {"fewshot": (5.0, 20.0, 1.5), "base2novel": (2.0, 0.5, 1.5)},
    "KneeXray": {"fewshot": (5.0, 20.0, 1.75), "base2novel": (0.25, 3.0, 1.25)},
    "Kvasir": {"fewshot": (0.75, 0.75, 1.5), "base2novel": (1.0, 1.0, 1.25)},
    "LungColon": {"fewshot": (0.5, 0.5, 1.5), "base2novel": (0.25, 0.75, 1.25)},
    "OCTMNIST": {"fewshot": (1.0, 0.75, 1.5), "base2novel": (0.75, 0.5, 1.5)},
    "RETINA": {"fewshot": (0.25, 0.25, 1.5), "base2novel": (5.0, 1.0, 2.0)},
}
#: The reference code's defaults (its train.py), for data outside the table.
DEFAULT_SETTINGS = (1.0, 1.0, 1.5)


def sentence_scores(image_features: Tensor, sentence_features: Tensor, scale: Tensor | float) -> Tensor:
    """Score (P,) of each sentence index i: the batch mean of ``max_c s f_b . e_{c,i}``.

    ``image_features`` (B, D) and ``sentence_features`` (C, P, D) are L2-normalised.
    """
    logits = scale * torch.einsum("bd,cpd->bpc", image_features.float(), sentence_features.float())
    return logits.max(dim=-1).values.mean(dim=0)


def keep_sentences(scores: Tensor, tau: float, rule: OutlierRule = "reference") -> Tensor:
    """Boolean mask (P,) of the sentences whose z-score is within ``tau`` (module docstring)."""
    if rule == "reference":
        z = (scores - scores.mean()) / scores.std()
    elif rule == "robust":
        median = scores.median()
        z = (scores - median) / (scores - median).abs().median()
    else:
        raise ValueError(f"model.outlier_rule must be 'reference' or 'robust', got {rule!r}")
    keep = z.abs() <= tau
    return keep if bool(keep.any()) else torch.ones_like(keep)


class BiomedCoOp(CoOp):
    """BiomedCoOp on BiomedCLIP. Only the text context trains (4 x text width by default).

    Args:
        descriptions: ``auto`` (the dataset's shipped bank), a shipped bank name or a JSON bank.
        lambda_sccm, lambda_kdsp, tau: ``None`` = the per-dataset reference setting
            (`BIOMED_COOP_SETTINGS`) for the dataset and protocol, else `DEFAULT_SETTINGS`. The
            values used are stored in the hyper-parameters.
        n_prompts: sentences per class used (the first ones); ``None`` = the smallest count of any
            class (50 for the shipped banks, as the reference's N_PROMPTS).
        outlier_rule: ``reference`` or ``robust`` z-scores for the pruning (module docstring).
        **kwargs: `CoOp`'s (template ``a photo of a {}.``, n_ctx, ...) and `PromptTrainer`'s.
    """

    reference_backbone_dropout = True

    def __init__(
        self,
        descriptions: str = "auto",
        lambda_sccm: float | None = None,
        lambda_kdsp: float | None = None,
        tau: float | None = None,
        n_prompts: int | None = None,
        outlier_rule: OutlierRule = "reference",
        **kwargs,
    ):
        super().__init__(**kwargs)

    def configure_prompts(self) -> None:
        hp = self.hparams  # settings left to the dataset (None) are filled in and recorded first
        record_hparams(self, **resolve_settings({"lambda_sccm": hp.lambda_sccm, "lambda_kdsp": hp.lambda_kdsp,
                                                 "tau": hp.tau}, BIOMED_COOP_SETTINGS, DEFAULT_SETTINGS,
                                                hp.dataset, hp.protocol, "BiomedCoOp"))
        super().configure_prompts()  # the student: CoOp's context
        hp = self.hparams
        if hp.outlier_rule not in ("reference", "robust"):
            raise ValueError(f"model.outlier_rule must be 'reference' or 'robust', got {hp.outlier_rule!r}")
        self.teacher_sentences = teacher_sentences(hp.descriptions, hp.dataset, self.classnames, hp.n_prompts)
        check_class_texts(self.backbone, self.teacher_sentences, self.classnames, "model.descriptions")
        self.register_buffer("sentence_features", None, persistent=False)

    # --------------------------------------------------------------- teacher
    def teacher_sentence_features(self) -> Tensor:
        """(C, P, D) normalised features of each class's sentences, encoded once in eval mode."""
        if self.sentence_features is None:
            flat = [s for group in self.teacher_sentences for s in group]
            features = self.backbone.encode_sentences(flat).float()
            self.sentence_features = features.view(len(self.classnames), -1, features.shape[-1])
        return self.sentence_features

    def on_fit_start(self) -> None:
        self.teacher_sentence_features()

    def pruned_teacher(self, image_features: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher class features (C, D) from this batch's kept sentences, and the mask (P,)."""
        features = self.teacher_sentence_features()
        with torch.no_grad():
            scores = sentence_scores(image_features, features, self.backbone.logit_scale)
            keep = keep_sentences(scores, self.hparams.tau, self.hparams.outlier_rule)
        return F.normalize(features[:, keep].mean(dim=1), dim=-1), keep

    def compute_loss(self, logits: Tensor, labels: Tensor, image_features: Tensor,
                     text_features: Tensor) -> dict[str, Tensor]:
        hp = self.hparams
        features = self.teacher_sentence_features()
        all_sentences = F.normalize(features.mean(dim=1), dim=-1)
        teacher, _ = self.pruned_teacher(image_features)
        ce = F.cross_entropy(logits, labels)
        sccm = F.mse_loss(text_features.float(), all_sentences)
        kdsp = distillation_kl(logits, self.logits(image_features, teacher))
        return {"loss": ce + hp.lambda_sccm * sccm + hp.lambda_kdsp * kdsp, "ce": ce, "sccm": sccm, "kdsp": kdsp}
