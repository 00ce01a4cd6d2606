"""The tower families behind `BiomedCLIP`, and every fact that differs between backbones.

A backbone is an open_clip model plus one text-tower adapter and one image-tower adapter. An
adapter knows its tower's code; everything a method may depend on is in its frozen facts
(`TextFacts`, `ImageFacts`): widths, depth, context length, pad id, pooling, where prompts go,
image size, normalisation. Methods only see the `BiomedCLIP` interface, so a new family (e.g.
open_clip's own text transformer and VisionTransformer, for OpenAI CLIP, QuiltNet or PubMedCLIP)
is one more adapter class in `TEXT_TOWERS` / `IMAGE_TOWERS`, not a change in any method.

Families here:

* `HFTextTower`: a Hugging Face BERT-style text tower (open_clip's ``HFTextEncoder``, BiomedCLIP's
  PubMedBERT): CLS pooling, pad id from the BERT config, the tokenizer's context length.
* `TimmImageTower`: a timm VisionTransformer trunk (open_clip's ``TimmModel``, BiomedCLIP's
  ViT-B/16): CLS pooling, prompts after the prefix (CLS) tokens.

Prompts enter through the towers' PUBLIC forward passes: for the duration of one call, forward
pre-hooks (put first, `prompts_before_blocks`) overwrite or insert prompt tokens in the input of
the chosen blocks / layers. No private timm or transformers function is called, and the BERT
attention mask is built by ``BertModel`` itself, as in every transformers version.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: Visual prompts: one tensor per prompted block, each (N, width) or (B, N, width).
VisualPrompts = Sequence[Tensor]
VISUAL_PROMPT_MODES = ("insert", "replace")


@dataclass(frozen=True)
class TextFacts:
    """What a method may rely on about a text tower."""

    width: int  # token embedding width
    num_layers: int  # transformer layers (deep prompts enter before layers 1..num_layers-1)
    output_dim: int  # feature width after the projection (the joint embedding space)
    context_length: int  # the tokenizer's padded length (not the model's position table)
    pad_id: int
    vocab_size: int
    pooling: str  # "cls": the first token's state (BERT); "eot": the end-of-text token's (CLIP)
    prompt_start: int  # the first position after the start token: where context tokens go


@dataclass(frozen=True)
class ImageFacts:
    """What a method may rely on about an image tower."""

    width: int
    num_blocks: int
    image_size: int
    patch_size: int
    num_patches: int
    patch_fan_in: int  # inputs of one patch embedding: channels * patch height * patch width
    prefix_tokens: int  # tokens before the patches (CLS): visual prompts go right after them
    pooling: str  # "cls": the first token's state is the image feature (prompts never pooled)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # resize interpolation of the reference preprocessing ("bicubic")


# ---------------------------------------------------------------------------------- prompt hooks
def batched(prompt: Tensor, x: Tensor) -> Tensor:
    """``prompt`` (N, W) or (B, N, W) as (B, N, W) in ``x``'s dtype."""
    prompt = prompt.to(x.dtype)
    return prompt.expand(x.shape[0], -1, -1) if prompt.dim() == 2 else prompt


def overwrite(prompt: Tensor, start: int) -> Callable[[Tensor], Tensor]:
    """An edit of a (B, L, W) sequence: positions ``start .. start+N`` become the prompt (out of place)."""
    def edit(x: Tensor) -> Tensor:
        p = batched(prompt, x)
        return torch.cat([x[:, :start], p, x[:, start + p.shape[1]:]], dim=1)
    return edit


def insert(prompt: Tensor, start: int) -> Callable[[Tensor], Tensor]:
    """An edit of a (B, L, W) sequence: the prompt's N tokens are inserted at ``start`` (length L + N)."""
    def edit(x: Tensor) -> Tensor:
        return torch.cat([x[:, :start], batched(prompt, x), x[:, start:]], dim=1)
    return edit


def _edit_first_input(edit: Callable[[Tensor], Tensor], module: nn.Module, args: tuple):
    if not args:
        raise TypeError(f"{type(module).__name__} was called without a positional hidden-state input; "
                        "prompts cannot be placed in it")
    return (edit(args[0]), *args[1:])


@contextlib.contextmanager
def prompts_before_blocks(blocks: Sequence[nn.Module], edits: Mapping[int, Callable[[Tensor], Tensor]]
                          ) -> Iterator[None]:
    """While active, the first input of ``blocks[i]`` is replaced by ``edits[i](input)``.

    The hooks are put before any other forward pre-hook (hooks registered by users see the
    prompted input) and removed on exit, also after an error. Gradient checkpointing of the tower
    is refused by the adapters: a recomputation would run without the hooks.
    """
    handles = []
    try:
        for index, edit in edits.items():
            hook = functools.partial(_edit_first_input, edit)
            handles.append(blocks[index].register_forward_pre_hook(hook, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------ text towers
class HFTextTower:
    """open_clip's ``HFTextEncoder`` around a BERT-style Hugging Face model (BiomedCLIP)."""

    family = "hf-bert"

    @staticmethod
    def matches(model: nn.Module) -> bool:
        encoder = getattr(model, "text", None)
        bert = getattr(encoder, "transformer", None)
        return (type(encoder).__name__ == "HFTextEncoder" and hasattr(getattr(bert, "encoder", None), "layer")
                and hasattr(getattr(bert, "embeddings", None), "word_embeddings"))

    def __init__(self, model: nn.Module, tokenizer):
        self.encoder = model.text  # .transformer (BertModel), .pooler, .proj
        self.tokenizer = tokenizer
        bert = self.encoder.transformer
        self.layers = bert.encoder.layer
        pooler = type(self.encoder.pooler).__name__
        self.facts = TextFacts(
            width=bert.config.hidden_size,
            num_layers=len(self.layers),
            output_dim=self.encoder.output_dim,
            # the tokenizer's length: the BERT position table (model.context_length) is longer
            context_length=int(tokenizer.context_length),
            pad_id=bert.config.pad_token_id or 0,
            vocab_size=bert.config.vocab_size,
            pooling="cls" if pooler in ("ClsPooler", "ClsLastHiddenStatePooler") else pooler,
            prompt_start=1,  # after [CLS]
        )

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids (B, context_length), padded with ``pad_id``."""
        return self.tokenizer(list(texts))

    def word_pieces(self, text: str) -> list[str]:
        return self.tokenizer.tokenizer.tokenize(text)

    def token_embedding(self, ids: Tensor) -> Tensor:
        return self.encoder.transformer.embeddings.word_embeddings(ids)

    def encode(self, embeddings: Tensor, attention_mask: Tensor, deep_prompts: Sequence[Tensor],
               prompt_start: int) -> Tensor:
        """What open_clip's ``HFTextEncoder.forward`` computes, from word embeddings; deep prompt
        ``i`` overwrites positions ``prompt_start ..`` before layer ``i + 1``."""
        bert = self.encoder.transformer
        if deep_prompts and getattr(bert.encoder, "gradient_checkpointing", False):
            raise RuntimeError("deep text prompts cannot be used with gradient checkpointing of the text tower")
        mask = attention_mask.long()
        edits = {i + 1: overwrite(prompt, prompt_start) for i, prompt in enumerate(deep_prompts)}
        with prompts_before_blocks(self.layers, edits):
            out = bert(inputs_embeds=embeddings, attention_mask=mask)
        return self.encoder.proj(self.encoder.pooler(out, mask))


TEXT_TOWERS: tuple[type, ...] = (HFTextTower,)


# ----------------------------------------------------------------------------------- image towers
class TimmImageTower:
    """open_clip's ``TimmModel`` around a timm VisionTransformer trunk (BiomedCLIP's ViT-B/16)."""

    family = "timm-vit"

    @staticmethod
    def matches(model: nn.Module) -> bool:
        trunk = getattr(getattr(model, "visual", None), "trunk", None)
        return all(hasattr(trunk, a) for a in ("blocks", "patch_embed", "embed_dim", "num_prefix_tokens"))

    def __init__(self, model: nn.Module, preprocess_cfg: Mapping):
        self.visual = model.visual  # .trunk (timm VisionTransformer), .head
        trunk = self.visual.trunk
        self.blocks = trunk.blocks
        size = preprocess_cfg["size"]
        patch = trunk.patch_embed.patch_size
        self.facts = ImageFacts(
            width=trunk.embed_dim,
            num_blocks=len(self.blocks),
            image_size=int(size if isinstance(size, int) else size[0]),
            patch_size=int(patch if isinstance(patch, int) else patch[0]),
            num_patches=int(trunk.patch_embed.num_patches),
            patch_fan_in=trunk.patch_embed.proj.weight[0].numel(),
            prefix_tokens=int(trunk.num_prefix_tokens),
            pooling="cls" if getattr(trunk, "global_pool", "token") == "token" else str(trunk.global_pool),
            mean=tuple(preprocess_cfg["mean"]),
            std=tuple(preprocess_cfg["std"]),
            interpolation=str(preprocess_cfg.get("interpolation", "bicubic")),
        )

    def pool(self, images: Tensor, prompts: VisualPrompts, mode: str) -> Tensor:
        """The trunk's pooled token (B, width), open_clip's ``TimmModel.forward`` before its head,
        with prompt ``i`` entering before block ``i`` (inserted after the prefix tokens before
        block 0 in ``insert`` mode, else overwriting)."""
        if prompts and self.facts.pooling != "cls":
            raise ValueError(f"visual prompts need CLS pooling; this image tower pools {self.facts.pooling!r}")
        if prompts and getattr(self.visual.trunk, "grad_checkpointing", False):
            raise RuntimeError("visual prompts cannot be used with gradient checkpointing of the image tower")
        start = self.facts.prefix_tokens
        edits = {i: (insert if i == 0 and mode == "insert" else overwrite)(prompt, start)
                 for i, prompt in enumerate(prompts)}
        with prompts_before_blocks(self.blocks, edits):
            return self.visual.trunk(images)

    def project(self, pooled: Tensor) -> Tensor:
        """``TimmModel``'s head: pooled tokens into the joint embedding space."""
        return self.visual.head(pooled)


IMAGE_TOWERS: tuple[type, ...] = (TimmImageTower,)


def build_towers(model: nn.Module, tokenizer, preprocess_cfg: Mapping, name: str):
    """The (text, image) tower adapters of an open_clip model; ValueError naming what is not supported."""
    text = next((cls for cls in TEXT_TOWERS if cls.matches(model)), None)
    image = next((cls for cls in IMAGE_TOWERS if cls.matches(model)), None)
    missing = []
    if text is None:
        missing.append(f"text tower {type(getattr(model, 'text', model)).__name__} (supported: "
                       f"{', '.join(c.family for c in TEXT_TOWERS)})")
    if image is None:
        missing.append(f"image tower {type(getattr(model, 'visual', model)).__name__} (supported: "
                       f"{', '.join(c.family for c in IMAGE_TOWERS)})")
    if missing:
        raise ValueError(f"backbone {name!r} has an unsupported {' and '.join(missing)}: use a BiomedCLIP-style "
                         "model (Hugging Face BERT text tower, timm ViT image tower)")
    return text(model, tokenizer), image(model, preprocess_cfg)
