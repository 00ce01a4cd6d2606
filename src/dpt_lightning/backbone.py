"""The frozen BiomedCLIP backbone shared by every prompt method.

`BiomedCLIP` wraps an open_clip model and exposes, once for all methods, the pieces prompt learning
needs: the tokenizer, the reference transforms, word embeddings, a text encoder that accepts input
embeddings (with optional deep prompts) and an image encoder that accepts visual prompt tokens.
It knows nothing about Lightning.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse
from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision import transforms as T

BIOMEDCLIP_HUB_ID = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDBERT_HUB_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"

#: Visual prompts: one tensor per prompted block, each (N, width) or (B, N, width).
VisualPrompts = Sequence[Tensor]


class BackboneLoadError(RuntimeError):
    """Raised with an actionable message when a backbone cannot be loaded."""


def resolve_backbone_name(name: str) -> str:
    """Turn a user-facing backbone string into an open_clip model name.

    ``tiny`` builds (once, cached) the tiny random test model; ``tiny-demo`` the tiny model after
    the demo's contrastive pre-training (`dpt_lightning.pretrain`); ``random-biomedclip`` the
    full-size architecture with random weights (benchmarks only); ``hf-hub:`` and ``local-dir:``
    pass through.
    """
    if name == "tiny":
        from dpt_lightning.tiny import tiny_model_dir

        return f"local-dir:{tiny_model_dir()}"
    if name == "tiny-demo":
        from dpt_lightning.pretrain import tiny_demo_dir

        return f"local-dir:{tiny_demo_dir()}"
    if name == "random-biomedclip":
        from dpt_lightning.tiny import random_biomedclip_dir

        return f"local-dir:{random_biomedclip_dir()}"
    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    if os.path.isdir(name):
        return f"local-dir:{name}"
    raise BackboneLoadError(
        f"backbone {name!r} is not understood: use 'hf-hub:<repo>', 'local-dir:<folder>', 'tiny', "
        f"'tiny-demo' or 'random-biomedclip' (default {BIOMEDCLIP_HUB_ID})"
    )


def _local_text_cfg(folder: Path) -> dict | None:
    """The text config of a local folder, pointed at the folder itself when it holds the BERT config.

    open_clip's BiomedCLIP config names the BERT hub id, so loading a local folder would still try
    the network; a ``config.json`` (the BiomedBERT config) beside ``open_clip_config.json`` avoids it.
    """
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    if "hf_model_name" not in cfg or not (folder / "config.json").is_file():
        return None
    return {**cfg, "hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_model_pretrained": False}


OFFLINE_HINT = (" Without network access, download the model once elsewhere (`download_biomedclip(folder)`) and "
                "load it with 'local-dir:/path' (README 'Offline use'), or set HF_HUB_CACHE to a prepared cache.")


def hub_is_cached(repo: str) -> bool:
    """Whether the Hugging Face cache already holds ``repo``'s open_clip config (no network used)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, "open_clip_config.json"), str)


def hub_is_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host (``HF_ENDPOINT``) accepts a connection within ``timeout`` seconds."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_hub_access(name: str) -> None:
    """Fail at once, with the ``local-dir:`` alternative, for an uncached ``hf-hub:`` model when the
    hub cannot be reached (instead of minutes of retries inside huggingface_hub)."""
    repo = name[len("hf-hub:"):]
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}
    if hub_is_cached(repo):
        return
    if offline or not hub_is_reachable():
        reason = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise BackboneLoadError(f"backbone {name!r} is not in the Hugging Face cache and {reason}.{OFFLINE_HINT}")


def load_open_clip(name: str):
    """Load ``(model, tokenizer, preprocess_cfg)`` through open_clip's public loader."""
    import open_clip

    model_name = resolve_backbone_name(name)
    kwargs = {}
    if model_name.startswith("local-dir:"):
        folder = Path(model_name[len("local-dir:"):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise BackboneLoadError(
                f"local-dir backbone {folder} has no open_clip_config.json; see README 'Offline use' for "
                "the files a local BiomedCLIP folder needs"
            )
        text_cfg = _local_text_cfg(folder)
        if text_cfg is not None:
            kwargs["text_cfg"] = text_cfg
        model_name = f"local-dir:{folder}"
    else:
        check_hub_access(model_name)
    try:
        model, _ = open_clip.create_model_from_pretrained(model_name, **kwargs)
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as err:  # network, missing files: explain what to do
        hint = OFFLINE_HINT if model_name.startswith("hf-hub:") else ""
        raise BackboneLoadError(f"could not load backbone {name!r}: {err}.{hint}") from err
    return model, tokenizer, model.visual.preprocess_cfg


def download_biomedclip(folder: str | Path, repo: str = BIOMEDCLIP_HUB_ID, text_repo: str = BIOMEDBERT_HUB_ID) -> Path:
    """On a machine WITH internet: write everything ``local-dir:<folder>`` needs to load offline.

    The folder receives the BiomedCLIP hub files (``open_clip_config.json``, weights, tokenizer
    files) and the BiomedBERT ``config.json`` that open_clip's text tower would otherwise fetch.
    Copy the folder to the offline machine and use ``--model.backbone local-dir:<folder>``.
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    snapshot_download(repo.removeprefix("hf-hub:"), local_dir=folder)
    bert_config = Path(hf_hub_download(text_repo, "config.json"))
    (folder / "config.json").write_bytes(bert_config.read_bytes())
    return folder


class BiomedCLIP(nn.Module):
    """Frozen BiomedCLIP (or any open_clip model with a timm ViT and an HF BERT text tower)."""

    def __init__(self, name: str = BIOMEDCLIP_HUB_ID):
        super().__init__()
        self.name = name
        model, tokenizer, preprocess_cfg = load_open_clip(name)
        model.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess_cfg = dict(preprocess_cfg)
        bert = model.text.transformer
        self.pad_id = bert.config.pad_token_id or 0
        self.context_length = int(tokenizer.context_length)
        self.text_width = bert.config.hidden_size
        self.vision_width = model.visual.trunk.embed_dim
        self.embed_dim = model.text.output_dim
        self.num_text_layers = len(bert.encoder.layer)
        self.num_vision_blocks = len(model.visual.trunk.blocks)
        self.eval()  # open_clip returns train mode; methods decide when BERT dropout is on

    # ------------------------------------------------------------------ misc
    @property
    def logit_scale(self) -> Tensor:
        """``exp`` of the frozen learned temperature, ``s`` in ``s * f @ t.T``."""
        return self.model.logit_scale.exp()

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg["size"]
        return int(size if isinstance(size, int) else size[0])

    def fingerprint(self) -> dict:
        """Facts that identify the backbone architecture, stored in checkpoints."""
        return {
            "name": self.name,
            "text_width": self.text_width,
            "vision_width": self.vision_width,
            "embed_dim": self.embed_dim,
            "context_length": self.context_length,
            "vocab_size": self.model.text.transformer.config.vocab_size,
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
        }

    # ------------------------------------------------------------ transforms
    def _normalize(self):
        return T.Normalize(self.preprocess_cfg["mean"], self.preprocess_cfg["std"])

    def train_transform(self):
        """RandomResizedCrop (bicubic, scale 0.08-1) + normalise; no flip (the reference recipe)."""
        return T.Compose([
            T.RandomResizedCrop(self.image_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            self._normalize(),
        ])

    def test_transform(self):
        """Resize the shorter side (bicubic) + CenterCrop + normalise."""
        return T.Compose([
            T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(self.image_size),
            T.ToTensor(),
            self._normalize(),
        ])

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: Sequence[str], trim: bool = True) -> Tensor:
        """Token ids (B, L). With ``trim`` the padding beyond the longest text is cut (exact)."""
        ids = self.tokenizer(list(texts)).to(self.device)
        if trim:
            length = int((ids != self.pad_id).sum(1).max())
            ids = ids[:, :length]
        return ids

    def word_pieces(self, text: str) -> list[str]:
        """The tokenizer's word pieces of ``text`` without special tokens."""
        return self.tokenizer.tokenizer.tokenize(text)

    def token_embedding(self, ids: Tensor) -> Tensor:
        """Word embeddings (B, L, text_width) of token ids (no position embeddings)."""
        return self.model.text.transformer.embeddings.word_embeddings(ids)

    def encode_text(self, ids: Tensor) -> Tensor:
        """Text features (B, embed_dim), unnormalised: open_clip's ``encode_text``."""
        return self.encode_text_embeddings(self.token_embedding(ids), ids != self.pad_id)

    def encode_text_embeddings(
        self,
        embeddings: Tensor,
        attention_mask: Tensor,
        deep_prompts: Sequence[Tensor] | None = None,
        prompt_start: int = 1,
    ) -> Tensor:
        """Text features from input word embeddings (B, L, W) and the attention mask (B, L).

        ``deep_prompts[i]`` (N, W), if given, overwrites positions ``prompt_start .. prompt_start+N``
        of the hidden states before BERT layer ``i + 1`` (layer 0 sees ``embeddings`` as given).
        """
        from transformers.masking_utils import create_bidirectional_mask

        bert = self.model.text.transformer
        hidden = bert.embeddings(inputs_embeds=embeddings)
        mask = attention_mask.long()
        ext = create_bidirectional_mask(config=bert.config, inputs_embeds=hidden, attention_mask=mask)
        deep_prompts = list(deep_prompts or [])
        if len(deep_prompts) >= self.num_text_layers:
            raise ValueError(f"at most {self.num_text_layers - 1} deep text prompts, got {len(deep_prompts)}")
        for i, layer in enumerate(bert.encoder.layer):
            if 0 < i <= len(deep_prompts):
                hidden = _overwrite(hidden, deep_prompts[i - 1], prompt_start)
            hidden = layer(hidden, attention_mask=ext)
            if isinstance(hidden, tuple):  # transformers < 5 returns a tuple
                hidden = hidden[0]
        text = self.model.text
        pooled = text.pooler(_HiddenStates(hidden), mask)
        return text.proj(pooled)

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
        """
        trunk = self.model.visual.trunk
        x = trunk.patch_embed(images)
        x = trunk._pos_embed(x)
        x = trunk.patch_drop(x)
        x = trunk.norm_pre(x)
        prompts = list(prompts or [])
        if len(prompts) > len(trunk.blocks):
            raise ValueError(f"at most {len(trunk.blocks)} visual prompt layers, got {len(prompts)}")
        if mode not in ("insert", "replace"):
            raise ValueError(f"visual prompt mode must be 'insert' or 'replace', got {mode!r}")
        for i, block in enumerate(trunk.blocks):
            if i < len(prompts):
                if i == 0 and mode == "insert":
                    p = _batched(prompts[0], x)
                    x = torch.cat([x[:, :1], p, x[:, 1:]], dim=1)
                else:
                    x = _overwrite(x, prompts[i], 1)
            x = block(x)
        x = trunk.norm(x)
        x = trunk.forward_head(x)
        return self.model.visual.head(x)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device


class _HiddenStates:
    """The one attribute open_clip's poolers read from a transformers output."""

    def __init__(self, last_hidden_state: Tensor):
        self.last_hidden_state = last_hidden_state
        self.pooler_output = None


def _batched(prompt: Tensor, x: Tensor) -> Tensor:
    prompt = prompt.to(x.dtype)
    return prompt.expand(x.shape[0], -1, -1) if prompt.dim() == 2 else prompt


def _overwrite(x: Tensor, prompt: Tensor, start: int) -> Tensor:
    """``x`` with positions ``start .. start+N`` replaced by the prompt (out of place)."""
    p = _batched(prompt, x)
    return torch.cat([x[:, :start], p, x[:, start + p.shape[1]:]], dim=1)
