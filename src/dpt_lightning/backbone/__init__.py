"""The frozen backbone: loading by name (`loading`) apart from the tower code (`towers`), and the
`BiomedCLIP` module every method uses (`model`). Knows nothing about Lightning, the data layer,
the methods, the benchmark runner or the command line; reaches `dpt_lightning.demo` only to build
the generated models (``tiny``, ``tiny-demo``, ``random-biomedclip``)."""
from dpt_lightning.backbone.loading import (
    BIOMEDBERT_HUB_ID,
    BIOMEDCLIP_HUB_ID,
    GENERATED_NAMES,
    BackboneLoadError,
    download_biomedclip,
    load_open_clip,
    resolve_backbone_name,
)
from dpt_lightning.backbone.model import BiomedCLIP
from dpt_lightning.backbone.towers import ImageFacts, TextFacts, VisualPrompts

__all__ = [
    "BIOMEDBERT_HUB_ID", "BIOMEDCLIP_HUB_ID", "GENERATED_NAMES", "BackboneLoadError", "BiomedCLIP", "ImageFacts",
    "TextFacts", "VisualPrompts", "download_biomedclip", "load_open_clip", "resolve_backbone_name",
]
