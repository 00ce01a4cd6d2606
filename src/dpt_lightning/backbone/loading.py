"""Loading a backbone by name: hub ids, local folders, the generated models; offline checks.

Backbone names:

* ``hf-hub:<repo>`` (default `BIOMEDCLIP_HUB_ID`): from the Hugging Face cache or the hub. An
  uncached model fails at once, pointing at ``local-dir:``, when ``HF_HUB_OFFLINE`` is set or the
  hub cannot be reached (instead of half a minute of retries inside huggingface_hub).
* ``local-dir:<folder>`` (or a plain folder path): a folder in the hub layout
  (``open_clip_config.json``, weights, tokenizer files), e.g. written by `download_biomedclip`.
  When it also holds the text tower's ``config.json`` the text tower is built from it, so nothing
  is fetched (open_clip would otherwise ask the hub for the BERT config named in the folder's config).
* ``tiny``, ``tiny-demo``, ``random-biomedclip``: generated once into the cache folder by
  `dpt_lightning.demo` and then loaded as ``local-dir:`` folders through the same code.

Everything is loaded through open_clip's public loader; nothing here knows the tower code.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from dpt_lightning.files import atomic_write

BIOMEDCLIP_HUB_ID = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDBERT_HUB_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
CONFIG_FILE = "open_clip_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")  # the files open_clip looks for in a local folder
#: Names of the models that `dpt_lightning.demo` generates locally.
GENERATED_NAMES = ("tiny", "tiny-demo", "random-biomedclip")

OFFLINE_HINT = (" Without network access, download the model once elsewhere (`download_biomedclip(folder)`) and "
                "load it with 'local-dir:/path' (README 'Offline use'), or set HF_HUB_CACHE to a prepared cache.")


class BackboneLoadError(RuntimeError):
    """Raised with an actionable message when a backbone cannot be loaded."""


def generated_model_dir(name: str) -> Path:
    """The folder of a generated model (``tiny``, ``tiny-demo``, ``random-biomedclip``), built on
    first use by `dpt_lightning.demo` (imported only here, and only for these names)."""
    if name == "tiny":
        from dpt_lightning.demo.models import tiny_model_dir

        return tiny_model_dir()
    if name == "tiny-demo":
        from dpt_lightning.demo.pretrain import tiny_demo_dir

        return tiny_demo_dir()
    if name == "random-biomedclip":
        from dpt_lightning.demo.models import random_biomedclip_dir

        return random_biomedclip_dir()
    raise ValueError(f"{name!r} is not a generated model: one of {', '.join(GENERATED_NAMES)}")


def resolve_backbone_name(name: str) -> str:
    """Turn a user-facing backbone string into an open_clip model name (``hf-hub:`` or
    ``local-dir:``); generated models are built on first use."""
    if name in GENERATED_NAMES:
        return f"local-dir:{generated_model_dir(name)}"
    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    if os.path.isdir(name):
        return f"local-dir:{name}"
    raise BackboneLoadError(
        f"backbone {name!r} is not understood: use 'hf-hub:<repo>', 'local-dir:<folder>', 'tiny', "
        f"'tiny-demo' or 'random-biomedclip' (default {BIOMEDCLIP_HUB_ID})"
    )


# ---------------------------------------------------------------------------------- local folders
def local_folder_kwargs(folder: Path) -> dict:
    """Check a ``local-dir:`` folder and return the open_clip keyword arguments that load it
    without network access. Raises `BackboneLoadError` naming the folder and what is missing."""
    if not folder.exists():
        raise BackboneLoadError(f"local-dir backbone folder {folder} does not exist: check the path (README "
                                "'Offline use' shows how to prepare a folder with download_biomedclip)")
    if not folder.is_dir():
        raise BackboneLoadError(f"local-dir backbone {folder} is a file, not a folder: give the folder that "
                                f"holds {CONFIG_FILE}, the weights and the tokenizer files")
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise BackboneLoadError(f"local-dir backbone folder {folder} has no {CONFIG_FILE}; see README 'Offline "
                                "use' for the files a local BiomedCLIP folder needs")
    try:
        model_cfg = json.loads(config_file.read_text())["model_cfg"]
    except (ValueError, KeyError, TypeError) as err:
        raise BackboneLoadError(f"{config_file} is not an open_clip config with a 'model_cfg' ({err}): "
                                "replace it with the file from the model's hub repository") from err
    if not any(f.suffix in WEIGHT_SUFFIXES for f in folder.iterdir()):
        raise BackboneLoadError(f"local-dir backbone folder {folder} has no weights file (e.g. "
                                "open_clip_pytorch_model.bin or open_clip_model.safetensors from the model's hub "
                                "repository): put it beside open_clip_config.json")
    register_image_tower(model_cfg.get("vision_cfg", {}), config_file)
    text_cfg = model_cfg.get("text_cfg", {})
    if "hf_model_name" not in text_cfg or not (folder / "config.json").is_file():
        return {}  # open_clip builds the text tower from the name in the config (the hub, or its cache)
    return {"text_cfg": {**text_cfg, "hf_model_name": str(folder), "hf_tokenizer_name": str(folder),
                         "hf_model_pretrained": False}}


def local_folder_hint(folder: Path) -> str:
    """What to do when a ``local-dir:`` folder failed to load (empty when nothing is known)."""
    try:
        text_cfg = json.loads((folder / CONFIG_FILE).read_text())["model_cfg"].get("text_cfg", {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ""
    if "hf_model_name" in text_cfg and not (folder / "config.json").is_file():
        return (f" The folder has no config.json for its text tower {text_cfg['hf_model_name']!r}, so open_clip "
                "asked the Hugging Face hub for it: copy that model's config.json into the folder "
                "(download_biomedclip does; README 'Offline use').")
    return ""


def register_image_tower(vision_cfg: dict, config_file: Path) -> None:
    """Make sure timm knows the folder's image tower: the generated models' tiny ViT is registered
    by `dpt_lightning.demo.models` (imported here only when timm does not know the name)."""
    name = vision_cfg.get("timm_model_name")
    if not name:
        return
    import timm

    if not timm.is_model(name):
        import dpt_lightning.demo.models  # noqa: F401  registers the generated image towers

    if not timm.is_model(name):
        raise BackboneLoadError(f"{config_file} names the image tower {name!r}, which timm {timm.__version__} "
                                "does not know: install the timm version the model was made with")


# -------------------------------------------------------------------------------------- the hub
def hub_is_cached(repo: str) -> bool:
    """Whether the Hugging Face cache already holds ``repo``'s open_clip config (no network used)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, CONFIG_FILE), str)


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


# -------------------------------------------------------------------------------------- loading
def load_open_clip(name: str):
    """Load ``(model, tokenizer, preprocess_cfg)`` through open_clip's public loader."""
    import open_clip

    model_name = resolve_backbone_name(name)
    kwargs = {}
    if model_name.startswith("local-dir:"):
        folder = Path(model_name[len("local-dir:"):]).expanduser()
        kwargs = local_folder_kwargs(folder)
        model_name = f"local-dir:{folder}"
    else:
        check_hub_access(model_name)
    try:
        model, _ = open_clip.create_model_from_pretrained(model_name, **kwargs)
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as err:  # network, missing or broken files: explain what to do
        hint = OFFLINE_HINT if model_name.startswith("hf-hub:") else local_folder_hint(folder)
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
    atomic_write(folder / "config.json", bert_config.read_bytes())
    return folder
