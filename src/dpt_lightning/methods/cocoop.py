"""CoCoOp (Zhou et al., CVPR 2022): CoOp's context, shifted for every image by a small meta-network.

The meta-network reads the image's normalised feature f (embed_dim, 512 for BiomedCLIP) and
returns one vector pi(f) of the text tower's width (768), which is added to every context vector:
the prompt of class c for image f is ``[CLS] ctx_1 + pi(f) .. ctx_N + pi(f) <class c> . [SEP]``.
Every image therefore has its own classifier, and the logits are ``s * f . t_c(f)``.

As the reference code (HealthX-Lab/BiomedCoOp, ``trainers/CoCoOp/cocoop_biomedclip.py``):
* meta-network Linear(embed_dim -> embed_dim // 16) -> ReLU -> Linear(-> text width), PyTorch's
  default initialisation (512 -> 32 -> 768 on BiomedCLIP: 41,760 parameters, 44,832 with the context);
* context from CTX_INIT "a photo of a" (4 vectors), class name at the end, cross-entropy loss;
* only the prompt learner is switched to train mode: the backbone stays in eval mode, so BERT's
  dropout is off (``backbone_dropout`` changes that);
* batch size 1, SGD lr 0.001, 10 epochs with one constant warm-up epoch at 1e-5 (few-shot and
  base-to-novel alike; see ``trainers/cocoop.yaml``).
"""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from dpt_lightning.methods.coop import CoOp


class CoCoOp(CoOp):
    """Instance-conditioned context: CoOp's context plus the meta-network's per-image shift.

    Trains the context and the meta-network. Evaluation encodes the class prompts once per image
    (the class features cannot be cached), which costs B x C text-tower passes per batch.

    Args:
        **kwargs: `CoOp`'s (template ``a photo of a {}.``, n_ctx, ...) and `PromptTrainer`'s.
    """

    instance_conditioned = True

    def configure_prompts(self) -> None:
        super().configure_prompts()  # the context, as CoOp's
        embed_dim = self.backbone.embed_dim
        hidden = max(embed_dim // 16, 1)
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(embed_dim, hidden)),
            ("relu", nn.ReLU()),
            ("linear2", nn.Linear(hidden, self.backbone.text_width)),
        ]))

    def encode_classes(self, image_features: Tensor | None = None) -> Tensor:
        """Class features per image (B, C, D) from the normalised image features (B, D)."""
        if image_features is None:
            raise ValueError("CoCoOp's class features depend on the image: pass the image features")
        shift = self.meta_net(image_features)
        return self.encode_prompt_embeddings(self.prompt(shift), self.prompt.attention_mask)
