"""VPT (Jia et al., ECCV 2022): learnable tokens in the image tower, a frozen zero-shot classifier."""
from __future__ import annotations

from torch import Tensor

from dpt_lightning.methods.base import PromptTrainer
from dpt_lightning.visual_prompts import PromptInit, VisualPromptMode, VisualPromptTokens, check_visual_prompts


class VPT(PromptTrainer):
    """Visual prompt tokens trained with cross-entropy against frozen zero-shot class features.

    The text side is zero-shot's: class features from ``template`` (or a ``descriptions``
    ensemble), computed once without dropout and kept as a buffer. Only the prompt tokens train;
    the backbone stays in eval mode while training, as in the reference code.

    Defaults reproduce the benchmark's VPT on BiomedCLIP: shallow, 4 tokens from N(0, 0.02) that
    replace patch tokens 1..4. The paper's VPT is ``mode=insert``, ``init=xavier`` and ``depth`` up
    to the number of vision blocks (deep).

    Args:
        template: the frozen classifier's prompt, ``{}`` is the class name.
        descriptions: a description bank for the frozen classifier instead (as ``ZeroShot``).
        mode: ``replace`` (tokens overwrite patch tokens 1..N; length unchanged) or ``insert``
            (tokens added after CLS; the sequence grows by N).
        depth: prompted blocks: 1 = shallow, the block count (12 for ViT-B) = deep; 0 = no prompts
            (the zero-shot model; nothing to train).
        n_prompts: tokens per prompted block.
        init: ``normal`` (std 0.02, the reference) or ``xavier`` (uniform, the paper).
        prompt_dropout: dropout on the tokens while training.
        **kwargs: the base settings (`PromptTrainer`).
    """

    def __init__(
        self,
        template: str = "a photo of a {}.",
        descriptions: str | None = None,
        mode: VisualPromptMode = "replace",
        depth: int = 1,
        n_prompts: int = 4,
        init: PromptInit = "normal",
        prompt_dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)

    @staticmethod
    def parameter_count(depth: int, n_prompts: int, vision_width: int) -> int:
        """Trainable parameters: ``depth * n_prompts * vision_width`` (3072 for the reference)."""
        return depth * n_prompts * vision_width

    def configure_prompts(self) -> None:
        hp = self.hparams
        self.register_buffer("class_features", self.frozen_class_features(hp.template, hp.descriptions),
                             persistent=False)
        check_visual_prompts(self.backbone, hp.depth, hp.n_prompts, hp.mode, "VPT")
        self.visual_mode = hp.mode
        self.prompts = VisualPromptTokens(self.backbone, hp.depth, hp.n_prompts, init=hp.init,
                                          dropout=hp.prompt_dropout)

    def visual_prompts(self) -> list[Tensor]:
        return self.prompts()

    def encode_classes(self, image_features: Tensor | None = None) -> Tensor:
        return self.class_features
