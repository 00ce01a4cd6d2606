"""The frozen backbone shared by every prompt method.

`Backbone` (also importable as `BiomedCLIP`, its first and default model) loads an open_clip model
by name (`dpt_lightning.backbone.loading`) and exposes, once for all methods, the pieces prompt
learning needs: the tokenizer, the reference transforms, word embeddings, a text encoder that
accepts input embeddings (with optional deep prompts) and an image encoder that accepts visual
prompt tokens. The tower code of each family (BiomedCLIP's BERT + timm ViT, open_clip's own CLIP
text transformer + ViT or ResNet) lives in `dpt_lightning.backbone.towers`; this class only
delegates to it. It knows nothing about Lightning.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dpt_lightning.backbone.loading import BIOMEDCLIP_HUB_ID, BackboneLoadError, load_open_clip
from dpt_lightning.backbone.towers import (VISUAL_PROMPT_MODES, ImageFacts, TextFacts, VisualPrompts, build_towers,
                                          last_true)
from dpt_lightning.recipe import reference_transforms


class Backbone(nn.Module):
    """A frozen open_clip model whose towers `towers.build_towers` supports: BiomedCLIP (the
    default), OpenAI CLIP, QuiltNet, PubMedCLIP (converted), ... (README "Backbones")."""

    def __init__(self, name: str = BIOMEDCLIP_HUB_ID):
        super().__init__()
        self.name = name
        model, tokenizer, preprocess_cfg = load_open_clip(name)
        model.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess_cfg = dict(preprocess_cfg)
        try:
            self.text_tower, self.image_tower = build_towers(model, tokenizer, self.preprocess_cfg, name)
        except ValueError as err:
            raise BackboneLoadError(str(err)) from err
        self.eval()  # open_clip returns train mode; methods decide when BERT dropout is on

    def train(self, mode: bool = True) -> Backbone:
        """Train mode switches dropout on, never batch statistics: the running means of a ResNet's
        BatchNorm layers are frozen weights like any other (they stay in eval mode)."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    # ----------------------------------------------------------------- facts
    @property
    def text_facts(self) -> TextFacts:
        return self.text_tower.facts

    @property
    def image_facts(self) -> ImageFacts:
        return self.image_tower.facts

    @property
    def pad_id(self) -> int:
        return self.text_facts.pad_id

    @property
    def context_length(self) -> int:
        return self.text_facts.context_length

    @property
    def text_width(self) -> int:
        return self.text_facts.width

    @property
    def num_text_layers(self) -> int:
        return self.text_facts.num_layers

    @property
    def embed_dim(self) -> int:
        return self.text_facts.output_dim

    @property
    def vision_width(self) -> int:
        return self.image_facts.width

    @property
    def num_vision_blocks(self) -> int:
        return self.image_facts.num_blocks

    @property
    def image_size(self) -> int:
        return self.image_facts.image_size

    @property
    def num_patches(self) -> int:
        return self.image_facts.num_patches

    @property
    def patch_fan_in(self) -> int:
        """Inputs of one patch embedding (channels * patch area): VPT's Xavier bound uses it."""
        return self.image_facts.patch_fan_in

    @property
    def logit_scale(self) -> Tensor:
        """``exp`` of the frozen learned temperature, ``s`` in ``s * f @ t.T``."""
        return self.model.logit_scale.exp()

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def fingerprint(self) -> dict:
        """Facts that identify the backbone architecture, stored in checkpoints."""
        return {
            "name": self.name,
            "text_tower": self.text_tower.family,
            "image_tower": self.image_tower.family,
            "text_width": self.text_width,
            "vision_width": self.vision_width,
            "embed_dim": self.embed_dim,
            "context_length": self.context_length,
            "vocab_size": self.text_facts.vocab_size,
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
        }

    # ------------------------------------------------------------ transforms
    def _transforms(self) -> tuple:
        facts = self.image_facts
        return reference_transforms(self.image_size, facts.mean, facts.std, facts.interpolation)

    def train_transform(self):
        """RandomResizedCrop (scale 0.08-1) + normalise; no flip (the reference recipe, `recipe.py`)."""
        return self._transforms()[0]

    def test_transform(self):
        """Resize the shorter side + CenterCrop + normalise."""
        return self._transforms()[1]

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: Sequence[str], trim: bool = True) -> Tensor:
        """Token ids (B, L). With ``trim`` the padding beyond the longest text is cut (exact for
        both text families: see `dpt_lightning.backbone.towers`)."""
        ids = self.text_tower.tokenize(texts).to(self.device)
        if trim:
            ids = ids[:, :int(last_true(self.attention_mask(ids)).max()) + 1]
        return ids

    def attention_mask(self, ids: Tensor) -> Tensor:
        """The mask (B, L) that goes with token ids into `encode_text_embeddings`: the tokens that
        are not padding (BERT), the positions up to the end-of-text token (CLIP)."""
        return self.text_tower.attention_mask(ids)

    def word_pieces(self, text: str) -> list[str]:
        """The tokenizer's word pieces of ``text`` without special tokens."""
        return self.text_tower.word_pieces(text)

    def token_embedding(self, ids: Tensor) -> Tensor:
        """Word embeddings (B, L, text_width) of token ids (no position embeddings)."""
        return self.text_tower.token_embedding(ids)

    def encode_text(self, ids: Tensor) -> Tensor:
        """Text features (B, embed_dim), unnormalised: open_clip's ``encode_text``."""
        return self.encode_text_embeddings(self.token_embedding(ids), self.attention_mask(ids))

    def encode_text_embeddings(
        self,
        embeddings: Tensor,
        attention_mask: Tensor,
        deep_prompts: Sequence[Tensor] | None = None,
        prompt_start: int | None = None,
    ) -> Tensor:
        """Text features from input word embeddings (B, L, W) and the attention mask (B, L)
        (`attention_mask` of the token ids; for a CLIP text tower its last True position is the
        end-of-text token, which is pooled).

        ``deep_prompts[i]`` (N, W) or (B, N, W), if given, overwrites positions
        ``prompt_start .. prompt_start+N`` of the hidden states before text layer ``i + 1`` (layer 0
        sees ``embeddings`` as given). ``prompt_start`` defaults to the position after the start
        token (1 for BERT's [CLS] and CLIP's start-of-text).
        """
        deep_prompts = list(deep_prompts or [])
        if len(deep_prompts) >= self.num_text_layers:
            raise ValueError(f"at most {self.num_text_layers - 1} deep text prompts, got {len(deep_prompts)}")
        start = self.text_facts.prompt_start if prompt_start is None else prompt_start
        return self.text_tower.encode(embeddings, attention_mask, deep_prompts, start)

    @torch.no_grad()
    def encode_sentences(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """L2-normalised features (N, D) of fixed sentences, always without dropout."""
        was_training = self.training
        self.eval()
        try:
            chunks = [self.encode_text(self.tokenize(texts[i:i + batch_size]))
                      for i in range(0, len(texts), batch_size)]
        finally:
            self.train(was_training)
        return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1)

    def encode_class_sentences(self, sentences: Sequence[Sequence[str]]) -> Tensor:
        """Per-class ensemble (C, D): each sentence normalised, averaged, re-normalised."""
        flat = [s for group in sentences for s in group]
        features = self.encode_sentences(flat)
        means, start = [], 0
        for group in sentences:
            means.append(features[start:start + len(group)].mean(0))
            start += len(group)
        return torch.nn.functional.normalize(torch.stack(means), dim=-1)

    # ----------------------------------------------------------------- image
    def encode_image(self, images: Tensor, prompts: VisualPrompts | None = None, mode: str = "replace") -> Tensor:
        """Image features (B, embed_dim), unnormalised, with optional visual prompt tokens.

        ``prompts[i]`` (N, W) or (B, N, W) enters before vision block ``i``: ``mode="insert"`` adds
        the tokens after CLS before block 0 (the sequence grows by N); ``"replace"`` overwrites
        tokens 1..N. Before later blocks the same positions are overwritten in both modes, so
        ``len(prompts)`` is the prompt depth (1 = shallow). CLS pooling keeps prompts out of the head.
        Equal to ``project_image(pool_image(images, prompts, mode))``.
        """
        return self.project_image(self.pool_image(images, prompts, mode))

    def pool_image(self, images: Tensor, prompts: VisualPrompts | None = None, mode: str = "replace") -> Tensor:
        """The image tower up to its pooled token (B, width), before the projection into the joint
        space (a ResNet's attention pool projects itself: (B, embed_dim)): what feature caches keep, because it does not depend on the other images of the
        batch (the projection, a matrix product with as many rows as images, may differ in the last
        bits between batch sizes)."""
        prompts = list(prompts or [])
        if len(prompts) > self.num_vision_blocks:
            raise ValueError(f"at most {self.num_vision_blocks} visual prompt layers, got {len(prompts)}")
        if mode not in VISUAL_PROMPT_MODES:
            raise ValueError(f"visual prompt mode must be 'insert' or 'replace', got {mode!r}")
        return self.image_tower.pool(images, prompts, mode)

    def project_image(self, pooled: Tensor) -> Tensor:
        """The image tower's projection of pooled tokens (B, width) into the joint space (B, embed_dim)."""
        return self.image_tower.project(pooled)


#: The backbone's first name, kept: ``dpt_lightning.BiomedCLIP("tiny")`` is the same class.
BiomedCLIP = Backbone
