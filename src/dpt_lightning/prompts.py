"""Learnable text context (CoOp-style), as a plain ``nn.Module`` any method can reuse.

The class prompts are tokenised once; their frozen word embeddings are kept as a (non-persistent)
buffer and the learnable context vectors are placed into them at every forward.
"""
from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor, nn

from dpt_lightning.backbone import BiomedCLIP

ClassTokenPosition = Literal["end", "middle", "front"]


def template_prefix(template: str) -> str:
    """The words of a template before the class slot ``{}`` (the CTX_INIT of the reference)."""
    if template.count("{}") != 1:
        raise ValueError(f"a prompt template needs exactly one '{{}}' for the class name, got {template!r}")
    return template.split("{}")[0].strip()


def reference_n_ctx(template: str) -> int:
    """N_CTX as the reference derives it from CTX_INIT: its number of space-separated words.

    The context then covers the first N_CTX word pieces of the tokenised prompt. For words the
    tokenizer splits ("X-ray" -> x, -, ray) this is fewer pieces than the prefix has: the
    reference's behaviour, kept so that results are comparable.
    """
    return len(template_prefix(template).split())


def fill_template(template: str, name: str, setting: str = "model.template") -> str:
    """``template`` with ``name`` in its ``{}``; a template that ``str.format`` cannot fill with one
    name (``{x}``, ``{0} {1}``, a lone ``{``) is a ValueError naming the setting."""
    try:
        return template.format(name)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{setting} {template!r} cannot be filled with a class name ({type(err).__name__}: {err}): "
                         "write '{}' where the class name goes (and '{{' / '}}' for literal braces)") from None


def check_class_texts(backbone: BiomedCLIP, groups: list[list[str]], classnames: list[str], setting: str) -> None:
    """The class-distinctness rule, for every method and every source of class texts (a template,
    a description bank): once tokenized and cut to the tokenizer's context, no two classes may have
    the same texts, since their features would be the same and the classes could not be told apart.
    A ValueError names both classes and why (no ``{}`` in the template, names the vocabulary cannot
    spell, texts cut before the class name). Texts longer than the context are said (a warning
    with the count)."""
    flat = [text for group in groups for text in group]
    ids = backbone.tokenize(flat, trim=False).tolist() if flat else []
    seen: dict[tuple, int] = {}
    start = 0
    for index, group in enumerate(groups):
        key = tuple(sorted(map(tuple, ids[start:start + len(group)])))  # the ensemble ignores order
        start += len(group)
        if key in seen:
            first = seen[key]
            what, remedy = _why_identical(backbone, groups[first], group)
            raise ValueError(f"{setting}: the texts of classes {classnames[first]!r} and {classnames[index]!r} {what}, "
                             f"so the classes cannot be told apart; {remedy}")
        seen[key] = index
    limit = backbone.context_length - 2  # [CLS]/[SEP] or start/end tokens
    long = [text for text in flat if len(backbone.word_pieces(text)) > limit]
    if long:
        warnings.warn(f"{setting}: {len(long)} of {len(flat)} text(s) are longer than the tokenizer's "
                      f"{backbone.context_length} tokens and were cut, e.g. {long[0][:80]!r}...", stacklevel=3)


def _why_identical(backbone: BiomedCLIP, first: list[str], second: list[str]) -> tuple[str, str]:
    """What made two classes' texts identical, and what to do."""
    if sorted(first) == sorted(second):
        return (f"are the same text ({first[0][:80]!r})", "the class name is not in it: a template needs '{}' where "
                "the class name goes, a description bank sentences of each class's own")
    limit = backbone.context_length - 2
    if any(len(backbone.word_pieces(text)) > limit for text in first + second):
        return (f"are identical once cut to the tokenizer's {backbone.context_length} tokens",
                "shorten the template or sentences (the class name must come before the cut)")
    a, b = (backbone.word_pieces(text) for text in (first[0], second[0]))
    return (f"are identical once tokenized ({first[0][:60]!r} -> {a[:12]}, {second[0][:60]!r} -> {b[:12]})",
            "the backbone's vocabulary cannot spell the class names: write them in words it knows (e.g. English), "
            "or check that the backbone folder has its own tokenizer files")


class ContextPrompt(nn.Module):
    """Class prompts ``[CLS] ctx_1..ctx_N <class> <rest of template> [SEP]`` in embedding space
    (``<start> .. <end-of-text>`` for a CLIP text tower: the context always follows the start token).

    Args:
        backbone: the frozen backbone (tokenizer and word embeddings).
        classnames: class names in label order.
        template: prompt template with ``{}`` for the class name.
        n_ctx: number of context vectors. ``None``: the reference's count of the words before
            ``{}`` (initialised from their word pieces), or 16 with ``random_init``.
        random_init: initialise N(0, ``init_std``) and use placeholder words instead of the prefix.
        class_specific: one context per class (CoOp's CSC) instead of one shared context.
        position: where the class name goes relative to the context (CoOp): end, middle, front.
        trim: cut padding beyond the longest prompt (exact for BERT, whose attention mask hides
            padding, and for CLIP, whose causal mask keeps padding after the pooled end-of-text
            token from reaching it); False pads to the full context.
    """

    def __init__(
        self,
        backbone: BiomedCLIP,
        classnames: list[str],
        template: str = "a photo of a {}.",
        n_ctx: int | None = None,
        random_init: bool = False,
        class_specific: bool = False,
        position: ClassTokenPosition = "end",
        init_std: float = 0.02,
        trim: bool = True,
    ):
        super().__init__()
        prefix = template_prefix(template)
        if position not in ("end", "middle", "front"):
            raise ValueError(f"class token position must be end, middle or front, got {position!r}")
        if random_init:
            n_ctx = 16 if n_ctx is None else n_ctx
            template = " ".join(["x"] * n_ctx) + " " + template[template.index("{}"):]
        else:
            available = len(backbone.word_pieces(prefix))
            n_ctx = reference_n_ctx(template) if n_ctx is None else n_ctx
            if not 1 <= n_ctx <= available:
                raise ValueError(f"n_ctx={n_ctx} does not fit the template {template!r}: its prefix "
                                 f"{prefix!r} has {available} word pieces to initialise from (use 1..{available} "
                                 "or random_init)")
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")
        self.n_ctx = n_ctx
        self.template = template
        self.class_specific = class_specific
        self.position = position
        prompts = [fill_template(template, name) for name in classnames]
        check_class_texts(backbone, [[p] for p in prompts], classnames, "model.template")
        ids = backbone.tokenize(prompts, trim=trim)
        with torch.no_grad():
            embeddings = backbone.token_embedding(ids).float()
        if random_init:
            shape = (len(classnames), n_ctx, embeddings.shape[-1]) if class_specific else (n_ctx, embeddings.shape[-1])
            ctx = torch.randn(shape) * init_std
        else:
            ctx = embeddings[0, 1:1 + n_ctx].clone()
            if class_specific:
                ctx = ctx.expand(len(classnames), -1, -1).clone()
        self.ctx = nn.Parameter(ctx)
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("attention_mask", backbone.attention_mask(ids), persistent=False)
        self.register_buffer("embeddings", embeddings, persistent=False)
        name_lengths = [len(backbone.word_pieces(name)) for name in classnames]
        self.register_buffer("order", self._positions(ids.shape[1], name_lengths), persistent=False)

    def _positions(self, length: int, name_lengths: list[int]) -> Tensor:
        """Per class, the source position of each output position (identity for ``end``)."""
        n = self.n_ctx
        rows = []
        for k in name_lengths:
            ctx, name, rest = list(range(1, 1 + n)), list(range(1 + n, 1 + n + k)), list(range(1 + n + k, length))
            if self.position == "front":
                order = [0] + name + ctx + rest
            elif self.position == "middle":
                order = [0] + ctx[:n // 2] + name + ctx[n // 2:] + rest
            else:
                order = list(range(length))
            rows.append(order)
        return torch.tensor(rows)

    def forward(self, shift: Tensor | None = None) -> Tensor:
        """Prompt embeddings (C, L, W) with the context in place; with a per-instance ``shift``
        (B, W), added to every context vector (CoCoOp's meta-net bias), (B, C, L, W)."""
        num_classes = self.embeddings.shape[0]
        ctx = self.ctx if self.class_specific else self.ctx.expand(num_classes, -1, -1)
        e = self.embeddings
        if shift is not None:
            ctx = ctx.unsqueeze(0) + shift[:, None, None, :].to(ctx.dtype)  # (B, C, n_ctx, W)
            e = e.expand(shift.shape[0], *e.shape)
        x = torch.cat([e[..., :1, :], ctx.to(e.dtype), e[..., 1 + self.n_ctx:, :]], dim=-2)
        if self.position != "end":
            order = self.order.expand(*x.shape[:-2], -1)[..., None].expand(*x.shape)
            x = x.gather(-2, order)
        return x
