"""Biomed-DPT (Peng et al., 2025): dual-modality prompt tuning for BiomedCLIP.

* Text student: the dataset's clinical template whose first N_CTX word pieces are a shared learnable
  context initialised from them (CoOp-style; N_CTX = the reference's word count of the prefix).
* Text teacher: per class, the description bank's first sentences (as many as the class with the
  fewest has: the reference's rule) encoded once by the frozen backbone, normalised, averaged and
  re-normalised (g). Built lazily, once, at the start of fitting; a
  non-persistent buffer, so never in checkpoints (rebuilt from the bank).
* Vision: ``vision_tokens`` zero vectors (not learnable) that replace patch tokens 1..N before every
  ViT block (reference), are inserted after CLS (variant) or are left out (ablation).
* Loss: ``CE(z, y) + lambda_L1 * mean|t - g| + lambda_KL * KL(softmax(z_T) || softmax(z))`` with
  ``z = s f t^T``, ``z_T = s f g^T`` and the KL summed and divided by ``B * C`` (reference code).
  Inference uses the student only.

The per-dataset lambdas of the paper live in `BIOMED_DPT_LAMBDAS` (the one place); the trainer
picks them (and the clinical template) from the dataset and protocol the CLI links in, and records
the values it used in its hyper-parameters (``hparams.yaml``, checkpoints).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dpt_lightning.methods.coop import CoOp
from dpt_lightning.methods.shared import (clinical_template, distillation_kl, record_hparams, resolve_settings,
                                          teacher_sentences)
from dpt_lightning.prompts import check_class_texts
from dpt_lightning.visual_prompts import check_visual_prompts

VisionPrompt = Literal["replace", "insert", "off"]

#: (lambda_L1, lambda_KL) per dataset and protocol: the values of the Biomed-DPT reference runs.
BIOMED_DPT_LAMBDAS: dict[str, dict[str, tuple[float, float]]] = {
    "BTMRI": {"fewshot": (12.5, 0.25), "base2novel": (25.0, 0.5)},
    "BUSI": {"fewshot": (18.75, 1.0), "base2novel": (18.75, 0.65)},
    "CHMNIST": {"fewshot": (12.5, 0.5), "base2novel": (23.0, 0.9)},
    "COVID_19": {"fewshot": (65.0, 2.5), "base2novel": (18.75, 0.5)},
    "CTKidney": {"fewshot": (18.75, 0.25), "base2novel": (25.0, 1.0)},
    "DermaMNIST": {"fewshot": (25.0, 20.0), "base2novel": (11.5, 5.0)},
    "KneeXray": {"fewshot": (25.0, 10.0), "base2novel": (23.0, 4.5)},
    "Kvasir": {"fewshot": (25.0, 0.75), "base2novel": (10.0, 0.5)},
    "LungColon": {"fewshot": (12.5, 0.25), "base2novel": (9.5, 0.3)},
    "OCTMNIST": {"fewshot": (12.5, 0.25), "base2novel": (12.5, 0.5)},
    "RETINA": {"fewshot": (10.5, 0.25), "base2novel": (22.0, 0.4)},
}
#: Lambdas for data outside the table (the demo, your own data): the table's most common few-shot
#: setting (BTMRI, LungColon and OCTMNIST use it). Tune them for your data.
DEFAULT_LAMBDAS = (12.5, 0.25)


class BiomedDPT(CoOp):
    """Biomed-DPT: clinical-template student distilled from a description-bank teacher, with a
    zero-vector visual prompt. Only the text context (N_CTX x text width) trains.

    Args:
        template: the clinical prompt; ``None`` = the dataset's (datasets.md). Its words before
            ``{}`` initialise the context; N_CTX = their number (``n_ctx`` overrides).
        descriptions: the description bank: ``auto`` (the dataset's shipped bank), a shipped bank
            name, or a JSON file ``{classname: [sentences]}``.
        n_prompts: sentences per class in the teacher (each class's first ones); ``None`` = the
            smallest count of any class (the reference's rule; 50 for the shipped banks).
        lambda_l1, lambda_kl: loss weights; ``None`` = the per-dataset values of the paper for the
            dataset and protocol (`BIOMED_DPT_LAMBDAS`), or `DEFAULT_LAMBDAS` for other data.
            The values used are stored in the hyper-parameters.
        vision_prompt: ``replace`` patch tokens 1..N before every block (reference), ``insert`` N
            tokens after CLS (no patch lost), or ``off`` (no visual prompt, ablation).
        vision_tokens: number of zero tokens (4 in the reference).
        vision_depth: number of blocks that see the zero tokens re-written at their input;
            ``None`` = every block (reference), 1 = input only.
        **kwargs: `CoOp`'s (n_ctx, random_init, class_specific, class_token_position) and
            `PromptTrainer`'s arguments (lr, backbone_dropout, ...).
    """

    reference_backbone_dropout = True

    def __init__(
        self,
        template: str | None = None,
        descriptions: str = "auto",
        n_prompts: int | None = None,
        lambda_l1: float | None = None,
        lambda_kl: float | None = None,
        vision_prompt: VisionPrompt = "replace",
        vision_tokens: int = 4,
        vision_depth: int | None = None,
        **kwargs,
    ):
        super().__init__(template=template, **kwargs)

    def configure_prompts(self) -> None:
        self.resolve_dataset_settings()
        super().configure_prompts()  # the student: CoOp's context on the clinical template
        hp = self.hparams
        if hp.vision_prompt not in ("replace", "insert", "off"):
            raise ValueError(f"BiomedDPT: model.vision_prompt={hp.vision_prompt!r} is unknown: use replace "
                             "(reference), insert or off")
        every_block = self.backbone.num_vision_blocks if hp.vision_depth is None else hp.vision_depth
        off = hp.vision_prompt == "off"
        self.vision_depth = 0 if off else every_block
        self.visual_mode = "replace" if off else hp.vision_prompt
        check_visual_prompts(self.backbone, self.vision_depth, hp.vision_tokens, self.visual_mode, "BiomedDPT",
                             depth_setting="vision_depth", count_setting="vision_tokens", mode_setting="vision_prompt")
        self.register_buffer("vision_zeros", torch.zeros(hp.vision_tokens, self.backbone.vision_width),
                             persistent=False)
        self.teacher_sentences = teacher_sentences(hp.descriptions, hp.dataset, self.classnames, hp.n_prompts)
        check_class_texts(self.backbone, self.teacher_sentences, self.classnames, "model.descriptions")
        self.register_buffer("teacher_features", None, persistent=False)

    def resolve_dataset_settings(self) -> None:
        """Fill in the template and lambdas left to the dataset (``None``) and record them."""
        hp = self.hparams
        lambdas = resolve_settings({"lambda_l1": hp.lambda_l1, "lambda_kl": hp.lambda_kl}, BIOMED_DPT_LAMBDAS,
                                   DEFAULT_LAMBDAS, hp.dataset, hp.protocol, "BiomedDPT")
        record_hparams(self, template=clinical_template(hp.template, hp.dataset, "BiomedDPT"), **lambdas)

    # --------------------------------------------------------------- teacher
    def teacher_text_features(self) -> Tensor:
        """g (C, D): the bank's sentences encoded once (eval mode), per class averaged, normalised."""
        if self.teacher_features is None:
            self.teacher_features = self.backbone.encode_class_sentences(self.teacher_sentences).float()
        return self.teacher_features

    def on_fit_start(self) -> None:
        self.teacher_text_features()

    # ------------------------------------------------------------------ hooks
    def visual_prompts(self) -> list[Tensor]:
        """The zero tokens, once per prompted block (none when the visual prompt is off)."""
        return [self.vision_zeros] * self.vision_depth

    def image_path_key(self) -> str:
        """The zero tokens never change, so image features may be cached: under their own key."""
        if not self.vision_depth:
            return "plain"
        return f"zero-tokens:{self.visual_mode}:{self.hparams.vision_tokens}x{self.vision_depth}"

    def compute_loss(self, logits: Tensor, labels: Tensor, image_features: Tensor,
                     text_features: Tensor) -> dict[str, Tensor]:
        teacher = self.teacher_text_features()
        teacher_logits = self.logits(image_features, teacher)
        ce = F.cross_entropy(logits, labels)
        l1 = (text_features.float() - teacher).abs().mean()
        kl = distillation_kl(logits, teacher_logits)
        hp = self.hparams
        return {"loss": ce + hp.lambda_l1 * l1 + hp.lambda_kl * kl, "ce": ce, "l1": l1, "kl": kl}
