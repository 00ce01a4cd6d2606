"""The tower families behind `Backbone`, and every fact that differs between backbones.

A backbone is an open_clip model plus one text-tower adapter and one image-tower adapter. An
adapter knows its tower's code; everything a method may depend on is in its frozen facts
(`TextFacts`, `ImageFacts`): widths, depth, context length, pad id, pooling, where prompts go,
image size, normalisation, whether the image tower takes prompt tokens. Methods only see the
`Backbone` interface, so a new family is one more adapter class in `TEXT_TOWERS` /
`IMAGE_TOWERS`, not a change in any method.

Families here:

* `HFTextTower` (``hf-bert``): a Hugging Face BERT-style text tower (open_clip's ``HFTextEncoder``,
  BiomedCLIP's PubMedBERT): bidirectional attention under a padding mask, CLS pooling, pad id from
  the BERT config, the tokenizer's context length.
* `OpenClipTextTower` (``openclip-text``): open_clip's own text transformer (OpenAI CLIP, QuiltNet,
  PubMedCLIP once converted): causal attention, the end-of-text token pooled, pad id 0, 77 tokens.
* `TimmImageTower` (``timm-vit``): a timm VisionTransformer trunk (open_clip's ``TimmModel``,
  BiomedCLIP's ViT-B/16): CLS pooling, prompts after the prefix (CLS) tokens.
* `OpenClipViTTower` (``openclip-vit``): open_clip's own VisionTransformer (CLIP ViT-B/16, B/32):
  CLS pooling, prompts after CLS, the projection a matrix.
* `OpenClipResNetTower` (``openclip-resnet``): open_clip's ModifiedResNet (CLIP RN50, ...). It has
  no tokens, so visual prompts cannot enter it (`ImageFacts.prompt_tokens` is False): methods that
  prompt the image tower refuse it with an error naming their setting.

Prompts enter through the towers' PUBLIC forward passes: for the duration of one call, forward
pre-hooks (put first, `prompts_before_blocks`) overwrite or insert prompt tokens in the input of
the chosen blocks / layers. No private timm, transformers or open_clip function is called; the BERT
attention mask is built by ``BertModel`` itself, and open_clip's text transformer receives its own
causal mask.

Padding. Texts are padded to the tokenizer's context; `Backbone.tokenize` cuts the padding beyond
the longest text. That is exact for both text families: BERT never attends to padding (the
attention mask), and in a CLIP text tower every token attends only to the tokens before it (the
causal mask) and the end-of-text token is pooled, so nothing after it can change the feature.
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
    prompt_tokens: bool = True  # can visual prompt tokens enter? (a ViT: yes; a ResNet: no)


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


def batch_second(edit: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The same edit for blocks that see (L, B, W) sequences (open_clip's ``batch_first=False``)."""
    def edit_transposed(x: Tensor) -> Tensor:
        return edit(x.transpose(0, 1)).transpose(0, 1)
    return edit_transposed


def last_true(mask: Tensor) -> Tensor:
    """Per row of a (B, L) mask, the position of its last True entry (the end-of-text token)."""
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    return (mask.long() * positions).argmax(dim=-1)


@contextlib.contextmanager
def captured_output(module: nn.Module) -> Iterator[list[Tensor]]:
    """While active, every output of ``module``'s forward is appended to the yielded list."""
    seen: list[Tensor] = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        yield seen
    finally:
        handle.remove()


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

    def attention_mask(self, ids: Tensor) -> Tensor:
        """The tokens BERT attends to: everything but padding."""
        return ids != self.facts.pad_id

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


class OpenClipTextTower:
    """open_clip's own text transformer: on the ``CLIP`` model itself (``token_embedding``,
    ``positional_embedding``, ``transformer``, ``ln_final``, ``text_projection``, ``attn_mask``), or
    a ``TextTransformer`` in ``model.text`` (``CustomTextCLIP``). OpenAI CLIP, QuiltNet, PubMedCLIP.

    Causal attention (each token sees the tokens before it) and the end-of-text token's state as
    the text feature: ``argmax`` pooling (the end-of-text id is the largest, OpenAI's tokenizer) or
    ``eos`` pooling (the first end-of-text id). The attention mask a method passes therefore only
    marks where the text ends: its last True position is the pooled token.
    """

    family = "openclip-text"
    PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")

    @classmethod
    def root(cls, model: nn.Module) -> nn.Module | None:
        """The module holding the text tower's parts: ``model.text`` or the model itself."""
        for candidate in (getattr(model, "text", None), model):
            if candidate is not None and all(hasattr(candidate, a) for a in cls.PARTS) and \
                    hasattr(candidate.transformer, "resblocks"):
                return candidate
        return None

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return cls.root(model) is not None

    def __init__(self, model: nn.Module, tokenizer):
        root = self.root(model)
        self.root_module = root
        self.tokenizer = tokenizer
        self.transformer = root.transformer
        self.layers = root.transformer.resblocks
        # CLIP keeps these as text_pool_type / text_eos_id, a TextTransformer as pool_type / eos_id
        self.pool_type = getattr(root, "text_pool_type", getattr(root, "pool_type", "argmax"))
        self.eos_id = getattr(root, "text_eos_id", getattr(root, "eos_id", None))
        problems = []
        if getattr(root, "attn_mask", None) is None:
            problems.append("bidirectional attention (no causal mask)")
        if self.pool_type not in ("argmax", "eos"):
            problems.append(f"{self.pool_type!r} pooling")
        if getattr(root, "cls_emb", None) is not None or getattr(root, "use_pad_mask", False):
            problems.append("a class token or padding mask (CoCa-style)")
        if problems:
            raise ValueError(f"open_clip text tower with {', '.join(problems)}: supported are causal text "
                             "transformers that pool the end-of-text token (OpenAI CLIP and its relatives)")
        projection = root.text_projection
        width = root.transformer.width
        output_dim = (width if projection is None else
                      projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1])
        self.facts = TextFacts(
            width=width,
            num_layers=len(self.layers),
            output_dim=int(output_dim),
            context_length=int(min(tokenizer.context_length, root.positional_embedding.shape[0])),
            pad_id=tokenizer_pad_id(tokenizer),
            vocab_size=root.token_embedding.num_embeddings,
            pooling="eot",
            prompt_start=1,  # after the start-of-text token
        )

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids (B, context_length): start, text, end-of-text, then ``pad_id``."""
        return self.tokenizer(list(texts))

    def word_pieces(self, text: str) -> list[str]:
        if hasattr(self.tokenizer, "encode") and hasattr(self.tokenizer, "decoder"):  # open_clip's BPE
            return [self.tokenizer.decoder[i] for i in self.tokenizer.encode(text)]
        return self.tokenizer.tokenizer.tokenize(text)  # a Hugging Face tokenizer

    def attention_mask(self, ids: Tensor) -> Tensor:
        """Positions up to the end-of-text token, which is where the feature is pooled (a ``!``
        has id 0 in OpenAI's vocabulary, so padding alone cannot say where a text ends)."""
        if self.pool_type == "argmax":
            end = ids.argmax(dim=-1)
        else:
            end = (ids == self.eos_id).int().argmax(dim=-1)
        return torch.arange(ids.shape[-1], device=ids.device)[None, :] <= end[:, None]

    def token_embedding(self, ids: Tensor) -> Tensor:
        return self.root_module.token_embedding(ids)

    def project(self, pooled: Tensor) -> Tensor:
        projection = self.root_module.text_projection
        if projection is None:
            return pooled
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection

    def encode(self, embeddings: Tensor, attention_mask: Tensor, deep_prompts: Sequence[Tensor],
               prompt_start: int) -> Tensor:
        """What open_clip's ``encode_text`` computes, from token embeddings (B, L, W) of any length
        L up to the context: position embeddings and the causal mask cut to L, the end-of-text
        token (the last True of ``attention_mask``) pooled. Deep prompt ``i`` overwrites positions
        ``prompt_start ..`` before layer ``i + 1``."""
        root = self.root_module
        if deep_prompts and self.transformer.grad_checkpointing:
            raise RuntimeError("deep text prompts cannot be used with gradient checkpointing of the text tower")
        length = embeddings.shape[1]
        if length > root.positional_embedding.shape[0]:
            raise ValueError(f"{length} text tokens do not fit the text tower's {root.positional_embedding.shape[0]} "
                             "positions")
        cast = self.transformer.get_cast_dtype()
        x = embeddings.to(cast) + root.positional_embedding[:length].to(cast)
        mask = root.attn_mask[:length, :length]
        wrap = (lambda e: e) if getattr(self.transformer, "batch_first", True) else batch_second
        edits = {i + 1: wrap(overwrite(prompt, prompt_start)) for i, prompt in enumerate(deep_prompts)}
        with prompts_before_blocks(self.layers, edits):
            x = self.transformer(x, attn_mask=mask)
        x = root.ln_final(x)
        end = last_true(attention_mask).to(x.device)
        return self.project(x[torch.arange(x.shape[0], device=x.device), end])


def tokenizer_pad_id(tokenizer) -> int:
    """The id a tokenizer pads with: a Hugging Face tokenizer's pad token, else 0 (open_clip's BPE)."""
    inner = getattr(tokenizer, "tokenizer", None)
    pad = getattr(inner, "pad_token_id", None)
    return int(pad) if pad is not None else 0


TEXT_TOWERS: tuple[type, ...] = (HFTextTower, OpenClipTextTower)


# ----------------------------------------------------------------------------------- image towers
def preprocess_facts(preprocess_cfg: Mapping) -> dict:
    """Image size, normalisation and interpolation of open_clip's preprocessing config."""
    size = preprocess_cfg["size"]
    return {"image_size": int(size if isinstance(size, int) else size[0]), "mean": tuple(preprocess_cfg["mean"]),
            "std": tuple(preprocess_cfg["std"]), "interpolation": str(preprocess_cfg.get("interpolation", "bicubic"))}


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
        patch = trunk.patch_embed.patch_size
        self.facts = ImageFacts(
            width=trunk.embed_dim,
            num_blocks=len(self.blocks),
            patch_size=int(patch if isinstance(patch, int) else patch[0]),
            num_patches=int(trunk.patch_embed.num_patches),
            patch_fan_in=trunk.patch_embed.proj.weight[0].numel(),
            prefix_tokens=int(trunk.num_prefix_tokens),
            pooling="cls" if getattr(trunk, "global_pool", "token") == "token" else str(trunk.global_pool),
            **preprocess_facts(preprocess_cfg),
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


class OpenClipViTTower:
    """open_clip's own ``VisionTransformer`` (OpenAI CLIP ViT-B/16, QuiltNet ViT-B/32, ...):
    ``conv1`` patches, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
    ``transformer.resblocks``, ``ln_post``, and ``proj`` (a matrix) into the joint space."""

    family = "openclip-vit"
    PARTS = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        visual = getattr(model, "visual", None)
        return all(hasattr(visual, a) for a in cls.PARTS) and hasattr(visual.transformer, "resblocks")

    def __init__(self, model: nn.Module, preprocess_cfg: Mapping):
        self.visual = model.visual
        visual = self.visual
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("open_clip image tower with attentional pooling (CoCa-style): supported are "
                             "VisionTransformers that pool the class token or average the patches")
        self.blocks = visual.transformer.resblocks
        self.pool_type = visual.pool_type
        if self.pool_type not in ("tok", "avg"):
            raise ValueError(f"open_clip image tower with pool_type {self.pool_type!r}: supported are 'tok' and 'avg'")
        patch = visual.patch_size
        grid = visual.grid_size
        self.facts = ImageFacts(
            width=int(visual.transformer.width),
            num_blocks=len(self.blocks),
            patch_size=int(patch if isinstance(patch, int) else patch[0]),
            num_patches=int(grid[0] * grid[1]),
            patch_fan_in=visual.conv1.weight[0].numel(),
            prefix_tokens=1,  # the class token
            pooling="cls" if self.pool_type == "tok" else "avg",
            **preprocess_facts(preprocess_cfg),
        )

    def pool(self, images: Tensor, prompts: VisualPrompts, mode: str) -> Tensor:
        """The pooled token (B, width) of open_clip's ``VisionTransformer.forward``, before ``proj``
        (the output of ``ln_post`` is captured: its class token, or its mean over the patches),
        with prompt ``i`` entering before block ``i`` as in `TimmImageTower.pool`."""
        if prompts and self.facts.pooling != "cls":
            raise ValueError(f"visual prompts need CLS pooling; this image tower pools {self.facts.pooling!r}")
        if prompts and self.visual.transformer.grad_checkpointing:
            raise RuntimeError("visual prompts cannot be used with gradient checkpointing of the image tower")
        start = self.facts.prefix_tokens
        wrap = (lambda e: e) if getattr(self.visual.transformer, "batch_first", True) else batch_second
        edits = {i: wrap((insert if i == 0 and mode == "insert" else overwrite)(prompt, start))
                 for i, prompt in enumerate(prompts)}
        with prompts_before_blocks(self.blocks, edits), captured_output(self.visual.ln_post) as seen:
            self.visual(images)
        x = seen[-1]
        if x.dim() == 2:  # final_ln_after_pool: ln_post ran on the pooled token itself
            return x
        return x[:, 0] if self.pool_type == "tok" else x[:, 1:].mean(dim=1)

    def project(self, pooled: Tensor) -> Tensor:
        """``pooled @ proj``, as ``VisionTransformer.forward`` ends."""
        return pooled if self.visual.proj is None else pooled @ self.visual.proj


class OpenClipResNetTower:
    """open_clip's ``ModifiedResNet`` (OpenAI CLIP RN50, RN101, ...): convolutions and an attention
    pool that already projects into the joint space. It has no tokens, so it takes no visual
    prompts (``prompt_tokens=False``); methods that only learn on the text side work."""

    family = "openclip-resnet"

    @staticmethod
    def matches(model: nn.Module) -> bool:
        visual = getattr(model, "visual", None)
        return all(hasattr(visual, a) for a in ("attnpool", "layer1", "layer4", "conv1"))

    def __init__(self, model: nn.Module, preprocess_cfg: Mapping):
        self.visual = model.visual
        facts = preprocess_facts(preprocess_cfg)
        stride = 32  # the stem and three strided stages halve the resolution five times
        self.facts = ImageFacts(
            width=int(self.visual.output_dim),
            num_blocks=4,  # residual stages (layer1 .. layer4)
            patch_size=stride,
            num_patches=(facts["image_size"] // stride) ** 2,
            patch_fan_in=self.visual.conv1.weight[0].numel(),
            prefix_tokens=0,
            pooling="attention",
            prompt_tokens=False,
            **facts,
        )

    def pool(self, images: Tensor, prompts: VisualPrompts, mode: str) -> Tensor:
        """The attention pool's output (B, embed_dim): for this tower it includes the projection."""
        if prompts:
            raise ValueError("a ResNet image tower (open_clip ModifiedResNet) has no tokens and cannot take "
                             "visual prompts: use a ViT backbone")
        return self.visual(images)

    def project(self, pooled: Tensor) -> Tensor:
        """Nothing left to do: the attention pool projected already."""
        return pooled


IMAGE_TOWERS: tuple[type, ...] = (TimmImageTower, OpenClipViTTower, OpenClipResNetTower)


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
        raise ValueError(f"backbone {name!r} has an unsupported {' and '.join(missing)}: use an open_clip model "
                         "with a BERT-style (BiomedCLIP) or CLIP text tower and a ViT or ResNet image tower")
    return text(model, tokenizer), image(model, preprocess_cfg)
