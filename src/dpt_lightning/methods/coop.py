"""CoOp (Zhou et al., IJCV 2022): a learnable context in the text tower's word-embedding space."""
from __future__ import annotations

from torch import Tensor

from dpt_lightning.methods.base import PromptTrainer
from dpt_lightning.prompts import ClassTokenPosition, ContextPrompt


class CoOp(PromptTrainer):
    """Context vectors shared by all classes (or one set per class), trained with cross-entropy.

    Args:
        template: the prompt; its words before ``{}`` initialise the context (CTX_INIT).
        n_ctx: context length; ``None`` = the number of words before ``{}`` (16 with random_init).
        random_init: N(0, 0.02) context instead of CTX_INIT.
        class_specific: one context per class (CSC).
        class_token_position: ``end`` (reference), ``middle`` or ``front``.
    """

    def __init__(
        self,
        template: str = "a photo of a {}.",
        n_ctx: int | None = None,
        random_init: bool = False,
        class_specific: bool = False,
        class_token_position: ClassTokenPosition = "end",
        **kwargs,
    ):
        super().__init__(**kwargs)

    def configure_prompts(self) -> None:
        hp = self.hparams
        self.prompt = ContextPrompt(self.backbone, self.classnames, hp.template, n_ctx=hp.n_ctx,
                                    random_init=hp.random_init, class_specific=hp.class_specific,
                                    position=hp.class_token_position, trim=not self.reference_compute)

    def encode_classes(self, image_features: Tensor | None = None) -> Tensor:
        return self.encode_prompt_embeddings(self.prompt(), self.prompt.attention_mask)
