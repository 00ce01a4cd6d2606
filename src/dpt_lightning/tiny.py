"""Locally generated BiomedCLIP-shaped models, written as ``local-dir:`` folders.

* ``tiny``: timm's ``test_vit`` + a 2-layer BERT over a small vocabulary. Random weights. For tests
  and the offline demo: it loads through exactly the same open_clip path as the real BiomedCLIP.
* ``random-biomedclip``: the full BiomedCLIP architecture (ViT-B/16 + PubMedBERT-base sized BERT)
  with RANDOM weights, for speed benchmarks only. Its numbers mean nothing as accuracy.

Both are written once into the cache folder (``$DPT_CACHE_DIR``, default ``~/.cache/dpt_lightning``)
under a name that hashes their recipe, so a changed recipe never reuses a stale folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Words our prompts, templates, class names and the demo use; anything else falls back to letters.
_WORDS = """
a an the of in on by and or with to is are at as from for image images photo scan presented shows
mr mri ct oct x ray chest frontal knee joint lung lungs brain breast kidney skin colon retina eye
ultrasound histopathological histopathology dermatoscopy endoscopic fundus optical coherence covid
affected tissue tissues cells cell normal healthy benign malignant tumor tumour glioma meningioma
pituitary adipose complex stroma simple debris empty background immune mucosal glands epithelium
opacity viral pneumonia cyst stone actinic keratosis basal carcinoma dermatofibroma melanoma
melanocytic nevus vascular lesion doubtful minimal moderate severe osteoarthritis dyed lifted polyps
polyp resection margins esophagitis cecum pylorus z line ulcerative colitis adenocarcinoma squamous
choroidal neovascularization diabetic macular edema drusen retinopathy glaucoma cataract
circle circles square squares stripe stripes dot dots ring rings cross crosses blob blobs
bright dark round sharp smooth irregular texture pattern shape large small many few red green
blue white black gray grey center centre edge left right top bottom horizontal vertical disease
lesion lesions feature features visible seen appears appear region regions area areas
""".split()


def cache_root() -> Path:
    return Path(os.environ.get("DPT_CACHE_DIR", Path.home() / ".cache" / "dpt_lightning")).expanduser()


def _vocabulary(size: int | None = None) -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = ["##" + c for c in string.ascii_lowercase + string.digits]
    words = sorted(set(_WORDS) - set(chars))
    vocab = specials + chars + pieces + words
    if size is not None:  # pad to a real vocabulary size (benchmarks): unused pieces, never produced
        vocab += [f"[unused{i}]" for i in range(size - len(vocab))]
    return vocab


TINY_RECIPE = {
    "vision": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
               "timm_proj": "linear", "image_size": 160},
    "bert": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 128},
    "embed_dim": 32, "context_length": 64, "vocab_size": None, "seed": 0,
}

# The published BiomedCLIP configuration (open_clip_config.json of the hub repository).
BIOMEDCLIP_RECIPE = {
    "vision": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
               "timm_proj": "linear", "image_size": 224},
    "bert": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "max_position_embeddings": 512},
    "embed_dim": 512, "context_length": 256, "vocab_size": 30522, "seed": 0,
}


def write_model_dir(folder: Path, recipe: dict, bert_hub_name: str) -> None:
    """Write a complete ``local-dir:`` folder (configs, tokenizer, random weights) for ``recipe``."""
    import open_clip
    from transformers import BertConfig, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _vocabulary(recipe["vocab_size"])
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.model_max_length = recipe["context_length"]
    tokenizer.save_pretrained(folder)
    BertConfig(vocab_size=len(vocab), pad_token_id=0, **recipe["bert"]).save_pretrained(folder)
    config = {
        "model_cfg": {
            "embed_dim": recipe["embed_dim"],
            "vision_cfg": recipe["vision"],
            "text_cfg": {
                "hf_model_name": bert_hub_name,
                "hf_tokenizer_name": bert_hub_name,
                "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": recipe["context_length"],
            },
        },
        "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    text_cfg = {**config["model_cfg"]["text_cfg"], "hf_model_name": str(folder),
                "hf_tokenizer_name": str(folder), "hf_model_pretrained": False}
    torch.manual_seed(recipe["seed"])
    model = open_clip.create_model(f"local-dir:{folder}", text_cfg=text_cfg, load_weights=False,
                                   pretrained_text=False)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")


def _cached_model_dir(tag: str, recipe: dict, bert_hub_name: str) -> Path:
    import open_clip

    key = json.dumps([recipe, _vocabulary(recipe["vocab_size"])[:400], open_clip.__version__], sort_keys=True)
    folder = cache_root() / f"{tag}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (folder / "open_clip_pytorch_model.bin").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{tag}-", dir=folder.parent))
    try:
        write_model_dir(tmp, recipe, bert_hub_name)
        try:
            tmp.rename(folder)  # atomic: a concurrent writer may have won, which is fine
        except OSError:
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def tiny_model_dir() -> Path:
    """The tiny BiomedCLIP-shaped model folder (generated on first use, ~1 MB)."""
    return _cached_model_dir("tiny", TINY_RECIPE, "dpt-lightning/tiny-biomedbert")


def random_biomedclip_dir() -> Path:
    """Full-size BiomedCLIP architecture with random weights (benchmarks only, ~800 MB)."""
    return _cached_model_dir("random-biomedclip", BIOMEDCLIP_RECIPE,
                             "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract")
