"""A Hugging Face ``transformers`` ``CLIPModel`` (PubMedCLIP, ...) as an open_clip ``local-dir:`` folder.

Some medical CLIPs are published only in the ``transformers`` format, e.g. PubMedCLIP
(``flaviagiammarino/pubmed-clip-vit-base-patch32``, OpenAI's CLIP ViT-B/32 fine-tuned on ROCO).
Their architecture is OpenAI's CLIP, which open_clip builds natively, so one conversion of the
weights makes them a backbone like any other (the CLIP tower family, `towers.OpenClipTextTower` and
`towers.OpenClipViTTower`):

* the configuration becomes an open_clip ``model_cfg`` (widths, depths, heads, MLP ratio, patch and
  image size, context length, QuickGELU); the image processor's mean and std its ``preprocess_cfg``;
* the weights are renamed, the separate query/key/value matrices of each attention stacked into
  one, and the projections transposed (open_clip multiplies by a matrix where ``transformers`` has
  a Linear layer);
* the tokenizer: open_clip's built-in BPE tokenizer is used, which requires the model's vocabulary
  to be OpenAI's (checked: ``vocab.json`` must equal open_clip's token table);
* the weights are the source's own stored tensors: a source whose weight files lack any tensor the
  converted model needs is refused, naming them (``transformers`` would fill them randomly);
* the converted folder is loaded back through open_clip and must give the ``transformers`` model's
  own text and image features (checked on a sentence and a random image; that model must hold the
  stored tensors), else nothing is written. A source without config.json, with another model's
  config, truncated or damaged files is one `ConversionError` naming it.

``convert_hf_clip(source, folder)`` converts once (``python -m dpt_lightning.backbone convert-hf-clip
SOURCE FOLDER``); the backbone name ``hf-clip:<source>`` converts on first use into the cache.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path

import torch

from dpt_lightning.files import atomic_write, cache_root

#: open_clip's name for each part of a ``transformers`` CLIP layer (both towers).
LAYER_PARTS = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # -> open_clip's quick_gelu flag
CHECK_TEXT = "a chest x-ray showing pneumonia."
#: The special tokens of OpenAI's vocab.json under open_clip's names (same ids, 49406 and 49407).
OPENAI_SPECIAL_TOKENS = {"<|startoftext|>": "<start_of_text>", "<|endoftext|>": "<end_of_text>"}


#: The weight files of a ``transformers`` model, in the order ``from_pretrained`` prefers them.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
#: The tokenizer files of a CLIP model: either group.
CLIP_TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
#: Part of the cache key of a converted folder: a conversion made by an earlier, less careful
#: version (one that could convert random weights) is never reused.
CONVERSION_FORMAT = "2"


class ConversionError(ValueError):
    """A Hugging Face model that cannot become an open_clip folder; the message says why."""


def open_clip_model_cfg(config) -> dict:
    """The open_clip ``model_cfg`` of a ``transformers`` ``CLIPConfig``."""
    text, vision = config.text_config, config.vision_config
    acts = {text.hidden_act, vision.hidden_act}
    if len(acts) != 1 or not acts <= set(ACTIVATIONS):
        raise ConversionError(f"activations {sorted(acts)}: open_clip's CLIP has one of {sorted(ACTIVATIONS)} "
                              "for both towers")
    for tower in (text, vision):
        if not math.isclose(tower.layer_norm_eps, 1e-5):
            raise ConversionError(f"layer norm epsilon {tower.layer_norm_eps}: open_clip's CLIP uses 1e-5")
        if tower.hidden_size % tower.num_attention_heads:
            raise ConversionError("the hidden size is not a multiple of the number of attention heads")
    return {
        "embed_dim": config.projection_dim,
        "quick_gelu": ACTIVATIONS[acts.pop()],
        "vision_cfg": {"image_size": vision.image_size, "patch_size": vision.patch_size, "width": vision.hidden_size,
                       "layers": vision.num_hidden_layers,
                       "head_width": vision.hidden_size // vision.num_attention_heads,
                       "mlp_ratio": vision.intermediate_size / vision.hidden_size},
        "text_cfg": {"context_length": text.max_position_embeddings, "vocab_size": text.vocab_size,
                     "width": text.hidden_size, "heads": text.num_attention_heads, "layers": text.num_hidden_layers,
                     "mlp_ratio": text.intermediate_size / text.hidden_size},
    }


def _layers(state: dict, hf_prefix: str, oc_prefix: str, count: int) -> dict:
    out = {}
    for i in range(count):
        src, dst = f"{hf_prefix}.encoder.layers.{i}.", f"{oc_prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for hf_name, oc_name in LAYER_PARTS.items():
                out[f"{dst}{oc_name}.{kind}"] = state[f"{src}{hf_name}.{kind}"]
    return out


class _Stored(dict):
    """A state dict that notes the names asked of it, and those not in it (read as a placeholder)."""

    def __init__(self, state: dict):
        super().__init__(state)
        self.asked: set[str] = set()
        self.missing: list[str] = []

    def __getitem__(self, key: str):
        self.asked.add(key)
        return super().__getitem__(key)

    def __missing__(self, key: str):
        self.missing.append(key)
        return torch.zeros(1)


def describe_missing(missing: list[str], needed: int) -> str:
    """``missing`` tensor names, short: a prefix with every tensor missing is written ``prefix.*``."""
    groups: dict[str, list[str]] = {}
    for name in missing:
        groups.setdefault(name.split(".")[0], []).append(name)
    parts = [f"{prefix}.* ({len(names)} tensors)" if len(names) > 3 else ", ".join(names)
             for prefix, names in groups.items()]
    return f"{len(missing)} of the {needed} tensors the converted model needs: {', '.join(parts)}"


def open_clip_state_dict(state: dict, config) -> dict:
    """The weights of a ``transformers`` ``CLIPModel`` under open_clip's ``CLIP`` names. A
    `ConversionError` names the tensors ``state`` lacks (none is ever made up)."""
    state = _Stored(state)
    text, vision = "text_model", "vision_model"
    out = {
        "token_embedding.weight": state[f"{text}.embeddings.token_embedding.weight"],
        "positional_embedding": state[f"{text}.embeddings.position_embedding.weight"],
        "ln_final.weight": state[f"{text}.final_layer_norm.weight"],
        "ln_final.bias": state[f"{text}.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].t().contiguous(),
        "logit_scale": state["logit_scale"].reshape(()),
        "visual.class_embedding": state[f"{vision}.embeddings.class_embedding"],
        "visual.conv1.weight": state[f"{vision}.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": state[f"{vision}.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": state[f"{vision}.pre_layrnorm.weight"],
        "visual.ln_pre.bias": state[f"{vision}.pre_layrnorm.bias"],
        "visual.ln_post.weight": state[f"{vision}.post_layernorm.weight"],
        "visual.ln_post.bias": state[f"{vision}.post_layernorm.bias"],
        "visual.proj": state["visual_projection.weight"].t().contiguous(),
    }
    out |= _layers(state, text, "", config.text_config.num_hidden_layers)
    out |= _layers(state, vision, "visual.", config.vision_config.num_hidden_layers)
    if state.missing:
        raise ConversionError(f"its weights lack {describe_missing(state.missing, len(state.asked))}; the folder is "
                              "incomplete or holds another model: download the model's weights again")
    return {k: v.detach().clone().float() for k, v in out.items()}


def source_file(source: str, name: str) -> Path | None:
    """The file ``name`` of a source (a folder, or a hub repository through the Hugging Face
    cache, downloaded if needed and possible); None when the source has no such file."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder / name if (folder / name).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(source, name))
    except EntryNotFoundError:
        return None


def clip_config(source: str):
    """The source's ``transformers`` configuration; it must describe a CLIP model."""
    from transformers import AutoConfig

    if Path(source).expanduser().is_dir() and source_file(source, "config.json") is None:
        raise ConversionError("it has no config.json (the transformers model's configuration): copy the whole "
                              "repository of the model into the folder")
    config = AutoConfig.from_pretrained(source)
    if config.model_type != "clip":
        raise ConversionError(f"its config.json describes a {config.model_type!r} model, not a transformers "
                              "CLIPModel (model_type 'clip'); an open_clip model (BiomedCLIP, QuiltNet) loads with "
                              "'hf-hub:' or 'local-dir:' instead")
    return config


def stored_tensors(source: str) -> dict:
    """The tensors the source's weight files hold (one file or the shards of an index), as stored."""
    from safetensors.torch import load_file

    for name in HF_WEIGHT_FILES:
        path = source_file(source, name)
        if path is None:
            continue
        files = [path]
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            files = [source_file(source, shard) for shard in shards]
            absent = [shard for shard, f in zip(shards, files) if f is None]
            if absent:
                raise ConversionError(f"{name} lists weight files it does not have: {absent}")
        state = {}
        for f in files:
            try:
                state |= load_file(f) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu",
                                                                                    weights_only=True)
            except Exception as err:  # noqa: BLE001 - truncated or damaged file
                raise ConversionError(f"its weights file {f} cannot be read ({type(err).__name__}: "
                                      f"{first_line(err)}); it is truncated or damaged: download it again") from None
        return state
    offline = "" if Path(source).expanduser().is_dir() else " in the Hugging Face cache or on the hub"
    raise ConversionError(f"it has no weights file ({' or '.join(HF_WEIGHT_FILES)}){offline}")


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def check_vocabulary(source: str) -> None:
    """open_clip's built-in tokenizer is used: the model's vocabulary must be OpenAI's."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import AutoTokenizer

    if Path(source).expanduser().is_dir() and not any(
            all(source_file(source, f) for f in group) for group in CLIP_TOKENIZER_FILES):
        raise ConversionError("it has no tokenizer files: the folder needs vocab.json and merges.txt (or "
                              "tokenizer.json) from the model's repository, to check that its vocabulary is OpenAI "
                              "CLIP's")
    try:
        vocab = AutoTokenizer.from_pretrained(source).get_vocab()
    except Exception as err:  # noqa: BLE001 - missing or unreadable tokenizer files
        raise ConversionError(f"its tokenizer cannot be read ({first_line(err)}): the folder needs vocab.json and "
                              "merges.txt") from err
    if len(vocab) < 1000:
        raise ConversionError(f"its tokenizer has only {len(vocab)} tokens: its tokenizer files are incomplete (the "
                              "folder needs vocab.json and merges.txt from the model's repository)")
    # OpenAI's files name the special tokens <|startoftext|> / <|endoftext|>; open_clip <start_of_text> / ...
    vocab = {OPENAI_SPECIAL_TOKENS.get(token, token): index for token, index in vocab.items()}
    if vocab != SimpleTokenizer().encoder:
        raise ConversionError("its vocabulary is not OpenAI CLIP's, which the converted folder's open_clip tokenizer "
                              "would use")


def preprocess_cfg(source: str, image_size: int) -> dict:
    """Mean, std and size of the model's image processor (OpenAI CLIP's values when it has none)."""
    from dpt_lightning.recipe import CLIP_MEAN, CLIP_STD

    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(source)
        mean, std = list(processor.image_mean), list(processor.image_std)
    except Exception:  # noqa: BLE001 - no preprocessor_config.json: the CLIP values
        mean, std = list(CLIP_MEAN), list(CLIP_STD)
    return {"size": image_size, "mean": mean, "std": std, "interpolation": "bicubic", "resize_mode": "shortest"}


def convert_hf_clip(source: str | Path, folder: str | Path, check: bool = True) -> Path:
    """Write the ``transformers`` ``CLIPModel`` ``source`` (a hub repository id, or a folder with
    its ``config.json``, weights and tokenizer files) as an open_clip ``local-dir:`` folder.

    With ``check`` (default) the folder is loaded back through open_clip and its features must
    equal the ``transformers`` model's (text and image, to 1e-4 relative); otherwise, or for a
    model that open_clip's CLIP cannot represent, `ConversionError` says why and nothing is written.
    """
    import open_clip

    source, folder = str(source), Path(folder).expanduser()
    where = f"cannot convert {source} into an open_clip folder"
    try:
        config = clip_config(source)
        model_cfg = open_clip_model_cfg(config)
        check_vocabulary(source)
        state = open_clip_state_dict(stored_tensors(source), config)  # the source's own tensors, as stored
        hf_model = load_hf_clip(source, config) if check else None
    except ConversionError as err:
        raise ConversionError(f"{where}: {err}") from None
    except OSError as err:
        raise ConversionError(f"{where}: it is not a transformers CLIPModel repository or folder "
                              f"({first_line(err)})") from err
    except Exception as err:  # noqa: BLE001 - a library's error on a damaged source: one message
        raise ConversionError(f"{where}: {type(err).__name__}: {first_line(err)}") from err
    files = {  # written in this order: a folder with its open_clip_config.json is complete
        "open_clip_pytorch_model.bin": lambda f: torch.save(state, f),
        "conversion.json": json.dumps({"source": source, "from": "transformers CLIPModel",
                                       "tokenizer": "open_clip's SimpleTokenizer (OpenAI CLIP's BPE vocabulary)"}),
        "open_clip_config.json": json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(
            source, model_cfg["vision_cfg"]["image_size"])}, indent=2),
    }
    if check:  # load a scratch copy back through open_clip before anything is written
        with tempfile.TemporaryDirectory(prefix="dpt-convert-") as scratch:
            for name, data in files.items():
                atomic_write(Path(scratch) / name, data)
            model, _ = open_clip.create_model_from_pretrained(f"local-dir:{scratch}")
            problem = feature_difference(hf_model, model.eval(), open_clip.get_tokenizer(f"local-dir:{scratch}"))
        # the features are compared with a transformers model that must hold the stored tensors
        theirs = open_clip_state_dict(hf_model.state_dict(), config)
        differ = [name for name, value in state.items() if not torch.equal(theirs[name], value)]
        problem = "; ".join(filter(None, [problem, differ and f"transformers loaded other values than the stored "
                                                             f"{', '.join(differ[:5])}"]))
        if problem:
            raise ConversionError(f"{where}: the converted model differs from the original ({problem})")
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write(folder / name, data)
    return folder


def load_hf_clip(source: str, config):
    """The ``transformers`` model, for the features check; each of its tensors the stored one."""
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(source, config=config, dtype=torch.float32).eval()


@torch.no_grad()
def feature_difference(hf_model, oc_model, tokenizer) -> str:
    """'' when the open_clip model gives the ``transformers`` model's features, else what differs."""
    ids = tokenizer([CHECK_TEXT])
    size = hf_model.config.vision_config.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    pairs = {"text": (hf_model.get_text_features(input_ids=ids), oc_model.encode_text(ids)),
             "image": (hf_model.get_image_features(pixel_values=images), oc_model.encode_image(images))}
    problems = []
    for name, (theirs, ours) in pairs.items():
        theirs = getattr(theirs, "pooler_output", theirs)
        if not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max())):
            problems.append(f"{name} features differ by {float((ours - theirs).abs().max()):.3g}")
    return "; ".join(problems)


def source_key(source: str) -> str:
    """A cache key of a conversion source: its name, and for a folder the size and time of its files."""
    path = Path(source).expanduser()
    parts = [source, CONVERSION_FORMAT]
    if path.is_dir():
        parts += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(path.iterdir()) if f.is_file()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def converted_dir(source: str) -> Path:
    """The converted folder of ``source`` in the cache (``$DPT_CACHE_DIR/hf-clip-<key>``), converted
    on first use (a hub source is downloaded by ``transformers``: see README 'Offline use')."""
    folder = cache_root() / f"hf-clip-{source_key(source)}"
    if not (folder / "open_clip_config.json").is_file():
        convert_hf_clip(source, folder)
    return folder
