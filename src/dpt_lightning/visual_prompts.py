"""Visual prompt tokens for the ViT image tower, shared by every method that prompts the image path.
(A ResNet image tower has no tokens: ``check_visual_prompts`` refuses prompts for it, naming the setting.)

The backbone's ``encode_image(images, prompts, mode)`` does the placing (insert after CLS or replace
patch tokens 1..N before block 0, overwrite the same positions before each later prompted block).
This module holds what VPT and MaPLe share on top of that:

* ``check_visual_prompts``: the validation of depth, token count and placement mode, with errors
  that name the setting;
* ``VisualPromptTokens``: free learnable tokens, one set per prompted block (VPT).

A method hands its tokens to the image tower through ``PromptTrainer.visual_prompts()`` (VPT
returns its free tokens, MaPLe projections of its text prompts, Biomed-DPT constant zeros).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from dpt_lightning.backbone import BiomedCLIP

VisualPromptMode = Literal["insert", "replace"]
VISUAL_PROMPT_MODES = ("insert", "replace")
PromptInit = Literal["normal", "xavier"]


def check_visual_prompts(backbone: BiomedCLIP, depth: int, n_prompts: int, mode: str, owner: str,
                         max_depth: int | None = None, depth_setting: str = "depth",
                         count_setting: str = "n_prompts", mode_setting: str = "mode") -> None:
    """Raise ``ValueError`` naming ``owner``'s setting when the prompts do not fit the backbone.

    ``depth`` may be 0 (no visual prompts: the frozen image tower) up to ``max_depth`` (default:
    the number of vision blocks). In replace mode the tokens must leave at least one patch.
    """
    if isinstance(depth, int) and depth > 0 and not backbone.image_facts.prompt_tokens:
        off = " or model.vision_prompt=off" if mode_setting == "vision_prompt" else ""
        raise ValueError(f"{owner}: model.{depth_setting}={depth} (model.{mode_setting}={mode!r}) puts visual prompt "
                         f"tokens into the image tower, but backbone {backbone.name!r} has a "
                         f"{backbone.image_tower.family} image tower (a ResNet), which has no tokens to prompt: use a "
                         f"ViT backbone, or no visual prompts (model.{depth_setting}=0{off})")
    limit = backbone.num_vision_blocks if max_depth is None else max_depth
    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= limit:
        raise ValueError(f"{owner}: model.{depth_setting}={depth!r} is out of range for backbone "
                         f"{backbone.name!r}: use 0..{limit} (1 = shallow, {limit} = deepest; 0 = no prompts)")
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1:
        raise ValueError(f"{owner}: model.{count_setting}={n_prompts!r}: use at least 1 prompt token")
    if mode not in VISUAL_PROMPT_MODES:
        raise ValueError(f"{owner}: model.{mode_setting}={mode!r} is unknown: use 'insert' (tokens added "
                         "after CLS) or 'replace' (tokens overwrite patch tokens 1..N)")
    patches = backbone.num_patches
    if mode == "replace" and n_prompts >= patches and depth > 0:  # depth 0: no tokens enter (e.g. a ResNet)
        raise ValueError(f"{owner}: model.{count_setting}={n_prompts} would replace all {patches} patch "
                         f"tokens: use fewer tokens or model.{mode_setting}=insert")


def xavier_bound(fan_in: int, width: int) -> float:
    """VPT's uniform init bound ``sqrt(6 / (fan_in + width))``, fan_in = channels * patch area
    (Xavier for the patch projection). ViT-B/16: ``sqrt(6 / (3 * 16 * 16 + 768)) = 0.0625``."""
    return math.sqrt(6.0 / (fan_in + width))


def patch_fan_in(backbone: BiomedCLIP) -> int:
    """Inputs of one patch-embedding output: channels * patch height * patch width."""
    return backbone.patch_fan_in


class VisualPromptTokens(nn.Module):
    """Learnable prompt tokens ``(depth, n_prompts, vision_width)``: row ``i`` enters before block ``i``.

    Args:
        backbone: the frozen backbone (width, patch size).
        depth: number of prompted blocks (1 = shallow); 0 holds no parameter.
        n_prompts: tokens per block.
        init: ``normal`` (N(0, ``init_std``), the benchmark's reference) or ``xavier``
            (uniform(-v, v) with ``v = xavier_bound(patch_fan_in(backbone), width)``, the VPT paper).
        dropout: dropout on the tokens while training (VPT's optional prompt dropout).
    """

    def __init__(self, backbone: BiomedCLIP, depth: int, n_prompts: int, init: PromptInit = "normal",
                 dropout: float = 0.0, init_std: float = 0.02):
        super().__init__()
        if init not in ("normal", "xavier"):
            raise ValueError(f"model.init={init!r} is unknown: use 'normal' (N(0, {init_std})) or 'xavier'")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.prompt_dropout={dropout!r}: use a probability in [0, 1)")
        tokens = torch.empty(depth, n_prompts, backbone.vision_width)
        if init == "normal":
            nn.init.normal_(tokens, std=init_std)
        else:
            bound = xavier_bound(patch_fan_in(backbone), backbone.vision_width)
            nn.init.uniform_(tokens, -bound, bound)
        self.tokens = nn.Parameter(tokens, requires_grad=depth > 0)  # depth 0: nothing to train
        self.dropout = nn.Dropout(dropout)

    def forward(self) -> list[Tensor]:
        """One (n_prompts, width) tensor per prompted block (dropout applied in train mode)."""
        return list(self.dropout(self.tokens).unbind(0))
