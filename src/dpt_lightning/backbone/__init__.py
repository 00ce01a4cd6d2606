"""The frozen backbone: loading by name (`loading`) apart from the tower code (`towers`), and the
`Backbone` module every method uses (`model`; `BiomedCLIP` is the same class). A process that runs
many runs keeps its loaded model (`keep_loaded_model`) and gives each run a copy. Knows nothing about
Lightning, the data layer, the methods, the benchmark runner or the command line; reaches
`dpt_lightning.demo` only to build the generated models (``tiny``, ``tiny-demo``, ``tiny-clip``,
``tiny-clip-demo``, ``random-biomedclip``). `convert` turns a Hugging Face ``CLIPModel``
(PubMedCLIP) into an open_clip folder."""
from dpt_lightning.backbone.loading import (
    BIOMEDBERT_HUB_ID,
    BIOMEDCLIP_HUB_ID,
    GENERATED_NAMES,
    OPENAI_CLIP_ID,
    PUBMEDCLIP_ID,
    QUILTNET_ID,
    BackboneLoadError,
    download_backbone,
    download_biomedclip,
    forget_loaded_model,
    keep_loaded_model,
    load_open_clip,
    resolve_backbone_name,
)
from dpt_lightning.backbone.model import Backbone, BiomedCLIP
from dpt_lightning.backbone.towers import ImageFacts, TextFacts, VisualPrompts

__all__ = [
    "BIOMEDBERT_HUB_ID", "BIOMEDCLIP_HUB_ID", "GENERATED_NAMES", "OPENAI_CLIP_ID", "PUBMEDCLIP_ID", "QUILTNET_ID",
    "Backbone", "BackboneLoadError", "BiomedCLIP", "ImageFacts", "TextFacts", "VisualPrompts", "download_backbone",
    "download_biomedclip", "forget_loaded_model", "keep_loaded_model", "load_open_clip", "resolve_backbone_name",
]
