"""MaPLe (Khattak et al., CVPR 2023): text prompts, and vision prompts coupled to them."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dpt_lightning.methods.base import PromptTrainer
from dpt_lightning.prompts import ContextPrompt
from dpt_lightning.visual_prompts import VisualPromptMode, check_visual_prompts


class MaPLe(PromptTrainer):
    """Multi-modal prompts: a learnable text context plus deep text prompts, each mapped into the
    image tower by its own coupling ``Linear(text_width -> vision_width)``; cross-entropy loss.

    Prompt level ``j`` (0 .. depth-1) has a text prompt ``T_j`` (n_ctx, text_width): ``T_0`` is the
    CoOp-style context (initialised from the template's words), ``T_j`` for j >= 1 is a free tensor
    (init N(0, 0.02)) that overwrites the context positions 1..n_ctx before BERT layer ``j``. The
    vision prompt of level ``j`` is ``coupling_j(T_j)``, placed before vision block ``j``. The whole
    model is in train mode while training (BERT dropout), as in the reference code.

    Defaults reproduce the benchmark's MaPLe on BiomedCLIP: 4 context tokens from "a photo of a",
    ``depth=1`` (the deep prompts of the reference are never used), the vision prompts replace patch
    tokens 1..4. The paper's MaPLe: ``n_ctx=2``, ``depth=9``, ``vision_mode=insert`` (the paper
    appends the tokens at the end of the sequence; the ViT has no position embedding for them, so
    after CLS is the same computation).

    Args:
        template: the prompt; its words before ``{}`` initialise the context (CTX_INIT).
        n_ctx: context length; ``None`` = the number of words before ``{}`` (the reference).
        depth: prompt levels, 1 .. min(text layers, vision blocks); 0 = no coupling and no deep
            prompts (the text context alone, i.e. CoOp), for ablations.
        vision_mode: ``replace`` (overwrite patch tokens 1..n_ctx) or ``insert`` (add tokens).
    """

    reference_backbone_dropout = True
    deep_init_std = 0.02

    def __init__(
        self,
        template: str = "a photo of a {}.",
        n_ctx: int | None = None,
        depth: int = 1,
        vision_mode: VisualPromptMode = "replace",
        **kwargs,
    ):
        super().__init__(**kwargs)

    @staticmethod
    def parameter_count(depth: int, n_ctx: int, text_width: int, vision_width: int) -> int:
        """Trainable parameters: context ``n_ctx * Wt`` + deep text prompts ``(depth - 1) * n_ctx * Wt``
        + coupling layers ``depth * (Wt * Wv + Wv)``."""
        deep = max(depth - 1, 0) * n_ctx * text_width
        return n_ctx * text_width + deep + depth * (text_width * vision_width + vision_width)

    def configure_prompts(self) -> None:
        hp, backbone = self.hparams, self.backbone
        self.prompt = ContextPrompt(backbone, self.classnames, hp.template, n_ctx=hp.n_ctx,
                                    trim=not self.reference_compute)
        n_ctx = self.prompt.n_ctx
        # level j prompts BERT layer j and vision block j: both towers bound the depth
        check_visual_prompts(backbone, hp.depth, n_ctx, hp.vision_mode, "MaPLe",
                             max_depth=min(backbone.num_text_layers, backbone.num_vision_blocks),
                             count_setting="n_ctx", mode_setting="vision_mode")
        self.visual_mode = hp.vision_mode
        self.deep_text = nn.ParameterList(
            nn.Parameter(torch.randn(n_ctx, backbone.text_width) * self.deep_init_std)
            for _ in range(max(hp.depth - 1, 0))
        )
        self.coupling = nn.ModuleList(nn.Linear(backbone.text_width, backbone.vision_width)
                                      for _ in range(hp.depth))

    def text_prompts(self) -> list[Tensor]:
        """``T_0 .. T_{depth-1}``: the context, then the deep text prompts."""
        return [self.prompt.ctx, *self.deep_text]

    def visual_prompts(self) -> list[Tensor]:
        return [couple(prompt) for couple, prompt in zip(self.coupling, self.text_prompts())]

    def encode_classes(self, image_features: Tensor | None = None) -> Tensor:
        return self.encode_prompt_embeddings(self.prompt(), self.prompt.attention_mask,
                                             deep_prompts=list(self.deep_text))
