"""Loading a backbone by name: hub ids, open_clip's pretrained tags, local folders, converted
Hugging Face CLIP models, the generated models; offline checks and offline folders.

Backbone names (README "Backbones"):

* ``hf-hub:<repo>`` (default `BIOMEDCLIP_HUB_ID`): an open_clip model on the Hugging Face hub
  (BiomedCLIP, QuiltNet, OpenAI CLIP as ``hf-hub:timm/vit_base_patch16_clip_224.openai``), from the
  Hugging Face cache or the hub. An uncached model fails at once, pointing at ``local-dir:``, when
  ``HF_HUB_OFFLINE`` is set or the hub cannot be reached (instead of half a minute of retries).
* ``openclip:<architecture>/<tag>``: one of open_clip's built-in architectures with one of its
  pretrained tags, e.g. ``openclip:ViT-B-16/openai`` (OpenAI CLIP ViT-B/16, the BiomedCoOp tables'
  "CLIP"); the tag's QuickGELU setting is applied. Same offline check as the hub.
* ``hf-clip:<repo or folder>``: a Hugging Face ``transformers`` ``CLIPModel`` (PubMedCLIP:
  `PUBMEDCLIP_ID`), converted once into an open_clip folder in the cache (`convert.convert_hf_clip`).
* ``local-dir:<folder>`` (or a plain folder path): a folder in open_clip's hub layout
  (``open_clip_config.json``, weights, tokenizer files), e.g. written by `download_backbone`.
  When it also holds a BERT text tower's ``config.json`` the text tower is built from it, so nothing
  is fetched (open_clip would otherwise ask the hub for the BERT config named in the folder's config).
* ``tiny``, ``tiny-demo``, ``tiny-clip``, ``tiny-clip-demo``, ``random-biomedclip``: generated once
  into the cache folder by `dpt_lightning.demo` and then loaded as ``local-dir:`` folders through
  the same code.

`download_backbone(name, folder)` writes, on a machine with internet, the ``local-dir:`` folder of
any of these names for a machine without. Everything is loaded through open_clip's public loader;
nothing here knows the tower code.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import socket
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch.overrides import TorchFunctionMode

from dpt_lightning.files import atomic_write

BIOMEDCLIP_HUB_ID = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDBERT_HUB_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
#: OpenAI CLIP ViT-B/16 (the "CLIP" of the BiomedCoOp tables), by open_clip's pretrained tag.
OPENAI_CLIP_ID = "openclip:ViT-B-16/openai"
#: PubMedCLIP (CLIP ViT-B/32 fine-tuned on ROCO), a Hugging Face CLIPModel, converted on first use.
PUBMEDCLIP_ID = "hf-clip:flaviagiammarino/pubmed-clip-vit-base-patch32"
#: QuiltNet (CLIP ViT-B/32 fine-tuned on histopathology), an open_clip hub model.
QUILTNET_ID = "hf-hub:wisdomik/QuiltNet-B-32"
CONFIG_FILE = "open_clip_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")  # the files open_clip looks for in a local folder
#: open_clip's weight files in a hub repository, in the order its local-dir loader prefers them.
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
#: Names of the models that `dpt_lightning.demo` generates locally.
GENERATED_NAMES = ("tiny", "tiny-demo", "tiny-clip", "tiny-clip-demo", "random-biomedclip")
SCHEMES = ("hf-hub:", "local-dir:", "openclip:", "hf-clip:")
#: The files a Hugging Face tokenizer can be built from: any one of these groups.
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.txt",), ("vocab.json", "merges.txt"), ("spiece.model",),
                       ("sentencepiece.bpe.model",), ("tokenizer.model",))
TOKENIZER_FILES_TEXT = "tokenizer.json, or vocab.txt, or vocab.json with merges.txt, or a sentencepiece .model file"
#: Ordinary words the tokenizer of any usable backbone spells without an unknown token.
ORDINARY_TEXT = "a photo of a chest x-ray"
#: Fewer tokens than this: the tokenizer was built without its vocabulary (only its special tokens).
MIN_VOCABULARY = 100

OFFLINE_HINT = (" Without network access, write the model's folder once elsewhere (`download_backbone(name, "
                "folder)`, or `python -m dpt_lightning.backbone download NAME FOLDER`) and load it with "
                "'local-dir:/path' (README 'Offline use'), or set HF_HUB_CACHE to a prepared cache.")


class BackboneLoadError(RuntimeError):
    """Raised with an actionable message when a backbone cannot be loaded."""


def generated_model_dir(name: str) -> Path:
    """The folder of a generated model (`GENERATED_NAMES`), built on first use by
    `dpt_lightning.demo` (imported only here, and only for these names)."""
    if name in ("tiny", "tiny-clip", "random-biomedclip"):
        from dpt_lightning.demo import models

        return {"tiny": models.tiny_model_dir, "tiny-clip": models.tiny_clip_dir,
                "random-biomedclip": models.random_biomedclip_dir}[name]()
    if name in ("tiny-demo", "tiny-clip-demo"):
        from dpt_lightning.demo import pretrain

        return pretrain.tiny_demo_dir() if name == "tiny-demo" else pretrain.tiny_clip_demo_dir()
    raise ValueError(f"{name!r} is not a generated model: one of {', '.join(GENERATED_NAMES)}")


def resolve_backbone_name(name: str) -> str:
    """Turn a user-facing backbone string into an open_clip model name (``hf-hub:``,
    ``openclip:`` or ``local-dir:``); generated and converted models are built on first use."""
    if name in GENERATED_NAMES:
        return f"local-dir:{generated_model_dir(name)}"
    if name.startswith("hf-clip:"):
        from dpt_lightning.backbone.convert import ConversionError, converted_dir

        try:
            return f"local-dir:{converted_dir(name[len('hf-clip:'):])}"
        except ConversionError as err:
            raise BackboneLoadError(f"backbone {name!r}: {err}") from err
    if name.startswith(("hf-hub:", "local-dir:", "openclip:")):
        return name
    if os.path.isdir(name):
        return f"local-dir:{name}"
    raise BackboneLoadError(
        f"backbone {name!r} is not understood: use 'hf-hub:<repo>', 'openclip:<architecture>/<tag>' (e.g. "
        f"{OPENAI_CLIP_ID}), 'hf-clip:<repo or folder>' (e.g. {PUBMEDCLIP_ID}), 'local-dir:<folder>' or one of "
        f"{', '.join(GENERATED_NAMES)} (default {BIOMEDCLIP_HUB_ID}; README 'Backbones')"
    )


# ---------------------------------------------------------------------------------- local folders
def local_folder_kwargs(folder: Path) -> dict:
    """Check a ``local-dir:`` folder and return the open_clip keyword arguments that load it
    without network access. Raises `BackboneLoadError` naming the folder and what is missing."""
    if not folder.exists():
        raise BackboneLoadError(f"local-dir backbone folder {folder} does not exist: check the path (README "
                                "'Offline use' shows how to prepare a folder with download_backbone)")
    if not folder.is_dir():
        raise BackboneLoadError(f"local-dir backbone {folder} is a file, not a folder: give the folder that "
                                f"holds {CONFIG_FILE}, the weights and the tokenizer files")
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise BackboneLoadError(f"local-dir backbone folder {folder} has no {CONFIG_FILE}; see README 'Offline "
                                "use' for the files a local backbone folder needs (download_backbone writes them)")
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
    tokenizer = text_cfg.get("hf_tokenizer_name")
    if tokenizer and not has_tokenizer_files(lambda f: (folder / f).is_file()):
        raise BackboneLoadError(
            f"local-dir backbone folder {folder} has no tokenizer files ({TOKENIZER_FILES_TEXT}) for its text "
            f"tower's tokenizer {tokenizer!r}: open_clip reads them from the folder, and without them every word "
            f"would be unknown. Copy them from the hub repository {tokenizer} into the folder (download_backbone "
            "writes them; README 'Offline use')")
    if "hf_model_name" not in text_cfg or not (folder / "config.json").is_file():
        repo = text_cfg.get("hf_model_name")
        reason = None if not repo or hub_file_cached(repo, "config.json") else hub_unreachable()
        if reason:  # open_clip would ask the hub for the text tower's config
            raise BackboneLoadError(f"local-dir backbone folder {folder} has no config.json for its text tower "
                                    f"{repo!r}, nor has the Hugging Face cache, and {reason}: copy that model's "
                                    "config.json into the folder (download_backbone does; README 'Offline use')")
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
                "(download_backbone does; README 'Offline use').")
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


def has_tokenizer_files(exists: Callable[[str], bool]) -> bool:
    """Whether the files a Hugging Face tokenizer is built from are there (``exists(name)``):
    one of `TOKENIZER_FILE_SETS`."""
    return any(all(exists(name) for name in group) for group in TOKENIZER_FILE_SETS)


def check_tokenizer(tokenizer, name: str) -> None:
    """Refuse a loaded tokenizer that cannot spell ordinary words: a Hugging Face tokenizer built
    without its vocabulary files has a handful of special tokens and reads every word as unknown,
    so every class prompt would be the same. (open_clip's own BPE tokenizer is built in: complete.)"""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is None or not hasattr(inner, "tokenize"):
        return
    size, pieces = len(inner), inner.tokenize(ORDINARY_TEXT)
    unknown = getattr(inner, "unk_token", None)
    if size < MIN_VOCABULARY or (unknown is not None and unknown in pieces):
        raise BackboneLoadError(
            f"backbone {name!r}: its tokenizer has {size} tokens and spells {ORDINARY_TEXT!r} as {pieces}: its "
            f"vocabulary files are missing or incomplete, and every class name would read the same. Give the "
            f"backbone the tokenizer files of the model's hub repository ({TOKENIZER_FILES_TEXT}; download_backbone "
            "writes them, README 'Offline use')")


# -------------------------------------------------------------------------------------- the hub
def hub_file_cached(repo: str, filename: str) -> bool:
    """Whether the Hugging Face cache holds ``filename`` of ``repo`` (no network used)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename), str)


def hub_is_cached(repo: str) -> bool:
    """Whether the Hugging Face cache already holds ``repo``'s open_clip config (no network used)."""
    return hub_file_cached(repo, CONFIG_FILE)


def missing_hub_files(repo: str) -> list[str]:
    """What open_clip's loader needs of the open_clip model ``repo`` and the Hugging Face cache does
    not hold: the config, a weights file and, for a Hugging Face text tower, its config and its
    tokenizer files (from the repositories the config names). Empty when everything is cached."""
    if not hub_is_cached(repo):
        return [f"{repo}/{CONFIG_FILE}"]
    missing = []
    if not any(hub_file_cached(repo, f) for f in OPEN_CLIP_WEIGHTS):
        missing.append(f"{repo}: a weights file ({' or '.join(OPEN_CLIP_WEIGHTS)})")
    from huggingface_hub import try_to_load_from_cache

    try:
        text_cfg = json.loads(Path(try_to_load_from_cache(repo, CONFIG_FILE)).read_text())["model_cfg"].get(
            "text_cfg", {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise BackboneLoadError(f"the cached {CONFIG_FILE} of {repo} is not an open_clip config ({err}): delete it "
                                "from the Hugging Face cache and download the model again") from err
    if text_cfg.get("hf_model_name") and not hub_file_cached(text_cfg["hf_model_name"], "config.json"):
        missing.append(f"{text_cfg['hf_model_name']}/config.json (the text tower's config)")
    tokenizer = text_cfg.get("hf_tokenizer_name")
    if tokenizer and not has_tokenizer_files(lambda f: hub_file_cached(tokenizer, f)):
        missing.append(f"{tokenizer}: the tokenizer files ({TOKENIZER_FILES_TEXT})")
    return missing


def hub_is_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host (``HF_ENDPOINT``) accepts a connection within ``timeout`` seconds."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_unreachable() -> str | None:
    """Why nothing can be downloaded now (``HF_HUB_OFFLINE`` set, or no connection), or None."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    return None if hub_is_reachable() else "the hub cannot be reached"


def require_download(name: str, cached: bool, where: str = "the Hugging Face cache",
                     missing: Sequence[str] = ()) -> None:
    """Fail at once, with the ``local-dir:`` alternative, for a model that is not ``cached`` (the
    files it lacks: ``missing``) when the hub cannot be reached (instead of minutes of retries
    inside huggingface_hub, or a model loaded without some of its files)."""
    reason = None if cached else hub_unreachable()
    if reason:
        lacks = f" (it lacks {'; '.join(missing)})" if missing else ""
        raise BackboneLoadError(f"backbone {name!r} is not complete in {where}{lacks} and {reason}.{OFFLINE_HINT}")


def check_hub_access(name: str) -> None:
    """`require_download` for an ``hf-hub:`` model: every file its loader needs (`missing_hub_files`);
    a model not (wholly) in the cache is then fetched, verified, before open_clip reads it
    (`fetch.prefetch_open_clip`: one message for a failed download)."""
    repo = name[len("hf-hub:"):]
    missing = missing_hub_files(repo)
    require_download(name, not missing, missing=missing)
    if missing:
        from dpt_lightning.backbone.fetch import HubFetchError, prefetch_open_clip

        try:
            prefetch_open_clip(repo)
        except HubFetchError as err:
            raise BackboneLoadError(f"backbone {name!r}: {err}. The cache keeps no partial or damaged file: run the "
                                    "same command again, or load a folder prepared elsewhere with 'local-dir:' "
                                    "(README 'Offline use')") from None


# ----------------------------------------------------------------------- open_clip's own tags
def parse_openclip_name(name: str) -> tuple[str, str]:
    """``openclip:<architecture>/<tag>`` -> (architecture, tag)."""
    architecture, _, tag = name[len("openclip:"):].rpartition("/")
    if not architecture or not tag:
        raise BackboneLoadError(f"backbone {name!r}: write 'openclip:<architecture>/<pretrained tag>', e.g. "
                                f"{OPENAI_CLIP_ID} (open_clip.list_pretrained() lists them)")
    return architecture, tag


def openclip_pretrained_cfg(name: str) -> tuple[str, str, dict]:
    """(architecture, tag, open_clip's pretrained config of the tag); a `BackboneLoadError` naming
    the known architectures or tags when open_clip has no such weights."""
    import open_clip

    architecture, tag = parse_openclip_name(name)
    if open_clip.get_model_config(architecture) is None:
        raise BackboneLoadError(f"backbone {name!r}: open_clip {open_clip.__version__} has no architecture "
                                f"{architecture!r} (open_clip.list_models() lists them, e.g. ViT-B-16, ViT-B-32, RN50)")
    cfg = open_clip.get_pretrained_cfg(architecture, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(architecture)
        raise BackboneLoadError(f"backbone {name!r}: open_clip has no pretrained weights {tag!r} for {architecture}; "
                                f"its tags: {', '.join(tags) or 'none'}")
    return architecture, tag, cfg


def openclip_is_cached(cfg: dict) -> bool:
    """Whether the weights of an open_clip pretrained config are already on this machine."""
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)  # 'org/repo/' (the default file) or 'org/repo/file', as open_clip
        candidates = [filename, *OPEN_CLIP_WEIGHTS] if filename else OPEN_CLIP_WEIGHTS
        return any(isinstance(try_to_load_from_cache(repo, f), str) for f in candidates)
    url = cfg.get("url", "")
    return bool(url) and (Path("~/.cache/clip").expanduser() / os.path.basename(urlparse(url).path)).is_file()


# -------------------------------------------------------------------------------------- loading
#: The random initialisers that building a model calls, by name: ``torch.nn.init``'s, the tensor
#: methods they call, and the wrappers ``transformers`` puts in their place while it builds a model.
RANDOM_INITIALISERS = frozenset({
    "uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
    "xavier_normal_", "orthogonal_", "sparse_",
})


class SkipRandomInit(TorchFunctionMode):
    """Inside this mode the random initialisers (`RANDOM_INITIALISERS`) fill their tensor with zeros.

    For building a model whose every parameter and persistent buffer is then overwritten by a
    strict checkpoint load (``create_model_from_pretrained`` loads the full checkpoint with
    ``strict=True`` and fails when there is none): drawing 200 M random numbers first is two
    seconds of a BiomedCLIP load on CPU, thrown away. Nothing else changes: constant fills,
    ``torch.arange`` position ids, attention masks are computed as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in RANDOM_INITIALISERS:
            tensor = args[0] if args else kwargs["tensor"]
            with torch.no_grad():
                return tensor.zero_()
        return func(*args, **(kwargs or {}))


#: The model `keep_loaded_model` keeps: ``{key: (model, tokenizer, preprocess_cfg)}``, one entry.
_KEPT: dict = {}
_keeping = False  # inside `keep_loaded_model`?


@contextmanager
def keep_loaded_model():
    """Within: `load_open_clip` keeps the last model it loaded (one, in CPU memory, until the process
    loads another) and serves the same backbone again as a copy of it, without reading the weights
    and building the model again. For processes that run many runs in a row (``dpt-bench``'s
    cells): every run gets its own copy, so what one run does to its model (a precision cast,
    CLIP-SVD's singular values) never reaches the next. A folder whose files changed is loaded anew."""
    global _keeping
    before, _keeping = _keeping, True
    try:
        yield
    finally:
        _keeping = before


def forget_loaded_model() -> None:
    """Free the model `keep_loaded_model` keeps (the next load within it reads the weights again)."""
    _KEPT.clear()


def _kept_key(model_name: str, kwargs: dict) -> str:
    """What identifies a load: the resolved name, the loader's arguments, the default dtype and,
    for a local folder, its files' sizes and modification times."""
    files = []
    if model_name.startswith("local-dir:"):
        folder = Path(model_name[len("local-dir:"):])
        stats = ((f.name, f.stat()) for f in folder.iterdir() if f.is_file())
        files = sorted((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats)
    return json.dumps([model_name, kwargs, str(torch.get_default_dtype()), files], sort_keys=True, default=str)


def load_open_clip(name: str):
    """Load ``(model, tokenizer, preprocess_cfg)`` through open_clip's public loader.

    The random initialisation that the checkpoint replaces is skipped (`SkipRandomInit`), and the
    load draws nothing from the caller's random generators: a seed set before it gives the same
    draws after it (prompt initialisation), whatever the libraries' initialisation order. Within
    `keep_loaded_model`, a backbone loaded before is served as a copy."""
    model_name, kwargs, folder = _open_clip_arguments(name)
    key = _kept_key(model_name, kwargs) if _keeping else None
    if key is None or key not in _KEPT:
        loaded = _load(name, model_name, kwargs, folder)
        if key is None:
            return loaded
        _KEPT.clear()
        _KEPT[key] = loaded
    model, tokenizer, preprocess_cfg = _KEPT[key]
    return copy.deepcopy(model), tokenizer, dict(preprocess_cfg)


def _open_clip_arguments(name: str) -> tuple[str, dict, Path | None]:
    """open_clip's model name and keyword arguments for a backbone name, after the offline checks;
    the local folder, if it is one."""
    model_name = resolve_backbone_name(name)
    kwargs, folder = {}, None
    if model_name.startswith("local-dir:"):
        folder = Path(model_name[len("local-dir:"):]).expanduser()
        kwargs = local_folder_kwargs(folder)
        model_name = f"local-dir:{folder}"
    elif model_name.startswith("openclip:"):
        architecture, tag, cfg = openclip_pretrained_cfg(model_name)
        require_download(model_name, openclip_is_cached(cfg), "the Hugging Face or open_clip cache")
        # the tag's activation (OpenAI's weights need QuickGELU; the plain architecture has GELU)
        kwargs = {"pretrained": tag, "force_quick_gelu": bool(cfg.get("quick_gelu", False))}
        model_name = architecture
    else:
        check_hub_access(model_name)
    return model_name, kwargs, folder


def _load(name: str, model_name: str, kwargs: dict, folder: Path | None):
    import open_clip

    try:
        with torch.random.fork_rng(devices=[]), SkipRandomInit():
            model, _ = open_clip.create_model_from_pretrained(model_name, **kwargs)
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as err:  # network, missing or broken files: explain what to do
        hint = local_folder_hint(folder) if folder is not None else OFFLINE_HINT
        raise BackboneLoadError(f"could not load backbone {name!r}: {err}.{hint}") from err
    check_tokenizer(tokenizer, name)
    return model, tokenizer, model.visual.preprocess_cfg


# ------------------------------------------------------------------------------ offline folders
def skipped_hub_files(files: list[str]) -> list[str]:
    """Of a hub repository's files, those an open_clip folder does not need: every weight file but
    the one open_clip's loader would pick (timm repositories also hold timm's own ``model.safetensors``;
    some hold the same weights twice)."""
    weights = [f for f in files if f.endswith(WEIGHT_SUFFIXES) or f.endswith((".msgpack", ".h5", ".onnx", ".ckpt"))]
    keep = next((w for w in OPEN_CLIP_WEIGHTS if w in files), None)
    return [f for f in weights if f != keep]


def add_text_tower_files(folder: Path, text_repo: str | None = None) -> None:
    """Give a folder whose config names a Hugging Face text tower (BiomedCLIP's BERT) that model's
    ``config.json``, and its tokenizer files when the folder has none, so that it loads offline."""
    from huggingface_hub import hf_hub_download, snapshot_download

    text_cfg = json.loads((folder / CONFIG_FILE).read_text())["model_cfg"].get("text_cfg", {})
    if "hf_model_name" in text_cfg and not (folder / "config.json").is_file():
        config = Path(hf_hub_download(text_repo or text_cfg["hf_model_name"], "config.json"))
        atomic_write(folder / "config.json", config.read_bytes())
    tokenizer = text_cfg.get("hf_tokenizer_name")
    if tokenizer and not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        snapshot_download(tokenizer, local_dir=folder, allow_patterns=[
            "tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "*.model"])


def download_openclip(name: str, folder: Path) -> None:
    """Write an ``openclip:<architecture>/<tag>`` model as a ``local-dir:`` folder: the
    architecture's config (with the tag's QuickGELU), the tag's preprocessing and its weights."""
    import open_clip

    architecture, _, cfg = openclip_pretrained_cfg(name)
    model_cfg = open_clip.get_model_config(architecture)
    if cfg.get("quick_gelu"):
        model_cfg["quick_gelu"] = True
    weights = Path(open_clip.download_pretrained(cfg))
    target = OPEN_CLIP_WEIGHTS[0] if weights.suffix == ".safetensors" else "open_clip_pytorch_model.bin"
    with weights.open("rb") as source:
        atomic_write(folder / target, lambda f: shutil.copyfileobj(source, f))
    preprocess = {key: cfg[key] for key in ("mean", "std", "interpolation", "resize_mode") if key in cfg}
    atomic_write(folder / CONFIG_FILE, json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2))
    add_text_tower_files(folder)


def download_backbone(name: str, folder: str | Path, text_repo: str | None = None) -> Path:
    """On a machine WITH internet: write everything ``local-dir:<folder>`` needs to load the
    backbone ``name`` offline; returns the folder. Copy it to the offline machine and use
    ``--model.backbone local-dir:<folder>``.

    * ``hf-hub:<repo>``: the repository's open_clip files (config, one weights file, tokenizer
      files) and, for a Hugging Face text tower (BiomedCLIP's BERT), that model's ``config.json``
      (``text_repo`` overrides where it comes from), which open_clip would otherwise fetch;
    * ``openclip:<architecture>/<tag>``: the built-in architecture's config and the tag's weights;
    * ``hf-clip:<repo or folder>``: the converted open_clip folder (`convert.convert_hf_clip`);
    * a generated name (``tiny``, ...): a copy of the generated folder.
    """
    folder = Path(folder).expanduser()
    if not name.startswith("hf-hub:"):  # an hf-hub: folder appears once all its files arrived (staged_folder)
        folder.mkdir(parents=True, exist_ok=True)
    if name in GENERATED_NAMES:
        shutil.copytree(generated_model_dir(name), folder, dirs_exist_ok=True)
    elif name.startswith("hf-hub:"):
        import huggingface_hub

        from dpt_lightning.backbone.fetch import HubFetchError, hub_errors, staged_folder, verify_folder

        repo = name[len("hf-hub:"):]
        try:
            with staged_folder(folder) as staging, hub_errors(f"downloading {repo}"):
                huggingface_hub.snapshot_download(repo, local_dir=staging, ignore_patterns=skipped_hub_files(
                    huggingface_hub.list_repo_files(repo)))
                if not (staging / CONFIG_FILE).is_file():
                    raise BackboneLoadError(f"hub repository {repo} has no {CONFIG_FILE}: it is not an open_clip "
                                            f"model (a transformers CLIPModel? then use 'hf-clip:{repo}')")
                add_text_tower_files(staging, text_repo)
                verify_folder(repo, staging)
        except HubFetchError as err:
            raise BackboneLoadError(f"{err}; nothing was written to {folder}. Run the same command again") from None
    elif name.startswith("openclip:"):
        download_openclip(name, folder)
    elif name.startswith("hf-clip:"):
        from dpt_lightning.backbone.convert import convert_hf_clip

        convert_hf_clip(name[len("hf-clip:"):], folder)
    else:
        raise BackboneLoadError(f"download_backbone: {name!r} is not a name to download: use 'hf-hub:<repo>', "
                                "'openclip:<architecture>/<tag>', 'hf-clip:<repo or folder>' or a generated name "
                                "(a local-dir: folder is already offline)")
    return folder


def download_biomedclip(folder: str | Path, repo: str = BIOMEDCLIP_HUB_ID, text_repo: str = BIOMEDBERT_HUB_ID) -> Path:
    """`download_backbone` for BiomedCLIP (kept for existing scripts): the BiomedCLIP hub files and
    the BiomedBERT ``config.json`` that open_clip's text tower would otherwise fetch."""
    return download_backbone(repo if repo.startswith("hf-hub:") else f"hf-hub:{repo}", folder, text_repo=text_repo)
