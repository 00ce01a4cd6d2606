"""The CLIP tower family (open_clip's own text transformer, VisionTransformer and ModifiedResNet),
loaded through the real loader: equalities with open_clip's ``encode_text`` / ``encode_image``, the
exact padding cut, where deep text prompts and visual prompts go (against hand-made forward passes),
gradients, the ResNet refusal of visual prompts, the PubMedCLIP conversion and offline folders."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from dpt_lightning import CoOp, VPT
from dpt_lightning.backbone import Backbone, BackboneLoadError, download_backbone
from dpt_lightning.backbone.convert import ConversionError, convert_hf_clip, open_clip_model_cfg, open_clip_state_dict
from dpt_lightning.demo.models import TINY_CLIP_RECIPE, tiny_clip_dir

TEXTS = ["a photo of a glioma tumor.", "a chest x-ray of normal lungs affected by covid-19 in the lung!", "cat"]
CLASSES = ["glioma tumor", "normal brain", "pituitary tumor"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors on a busy machine: one intra-op thread (as tests/test_vpt_maple.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip() -> Backbone:
    return Backbone("tiny-clip")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------- facts
def test_tiny_clip_facts(clip):
    assert (clip.text_tower.family, clip.image_tower.family) == ("openclip-text", "openclip-vit")
    facts = clip.text_facts
    assert (facts.pooling, facts.context_length, facts.pad_id, facts.prompt_start) == ("eot", 77, 0, 1)
    assert (facts.width, facts.num_layers, facts.output_dim, facts.vocab_size) == (32, 12, 32, 49408)
    image = clip.image_facts
    assert (image.width, image.num_blocks, image.image_size, image.patch_size, image.num_patches) == (64, 12, 160, 16, 100)
    assert (image.prefix_tokens, image.pooling, image.prompt_tokens, image.patch_fan_in) == (1, "cls", True, 3 * 16 * 16)
    assert clip.fingerprint()["text_tower"] == "openclip-text"
    assert all(not p.requires_grad for p in clip.parameters()) and not clip.model.training
    assert type(clip.model).__name__ == "CLIP"


# -------------------------------------------------------------------------------- no prompt = open_clip
def test_encode_text_equals_open_clip_and_trim_is_exact(clip):
    full = clip.tokenizer(TEXTS)
    assert full.shape[1] == 77 and int(full[2, 3:].abs().sum()) == 0  # start, "cat", end, then pad 0
    expected = clip.model.encode_text(full)
    torch.testing.assert_close(clip.encode_text(full), expected, atol=1e-6, rtol=0)
    trimmed = clip.tokenize(TEXTS)
    assert trimmed.shape[1] == int((full != 0).sum(1).max()) < 77  # cut right after the longest end-of-text
    assert torch.equal(trimmed, full[:, :trimmed.shape[1]])
    torch.testing.assert_close(clip.encode_text(trimmed), expected, atol=1e-6, rtol=0)
    # a "!" is id 0 in OpenAI's vocabulary, like padding: the mask still ends at the end-of-text token
    mask = clip.attention_mask(full)
    assert mask.sum(1).tolist() == (full.argmax(1) + 1).tolist()


def test_encode_image_equals_open_clip(clip, images):
    expected = clip.model.encode_image(images)
    torch.testing.assert_close(clip.encode_image(images), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(clip.encode_image(images, prompts=[]), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(clip.project_image(clip.pool_image(images)), expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------ hand-made passes
def hand_text(clip, embeddings, ids, deep, start=1):
    """open_clip's text transformer written out block by block; ``deep[i]`` overwrites positions
    ``start..`` before block ``i + 1``."""
    m = clip.model
    length = embeddings.shape[1]
    x = embeddings + m.positional_embedding[:length]
    for i, block in enumerate(m.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = x.clone()
            x[:, start:start + deep[i - 1].shape[0]] = deep[i - 1]
        x = block(x, attn_mask=m.attn_mask[:length, :length])
    x = m.ln_final(x)
    return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ m.text_projection


def hand_image(clip, images, prompts, mode):
    """open_clip's VisionTransformer written out block by block with prompts after the class token."""
    v = clip.model.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    x = v.ln_pre(x)
    for i, block in enumerate(v.transformer.resblocks):
        if i < len(prompts):
            p = prompts[i].expand(x.shape[0], -1, -1)
            if i == 0 and mode == "insert":
                x = torch.cat([x[:, :1], p, x[:, 1:]], dim=1)
            else:
                x = torch.cat([x[:, :1], p, x[:, 1 + p.shape[1]:]], dim=1)
        x = block(x)
    return v.ln_post(x)[:, 0] @ v.proj


def test_deep_text_prompts_match_a_hand_made_forward(clip):
    ids = clip.tokenize(TEXTS)
    embeddings = clip.token_embedding(ids)
    deep = [torch.randn(2, clip.text_width, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    got = clip.encode_text_embeddings(embeddings, clip.attention_mask(ids), deep_prompts=deep)
    torch.testing.assert_close(got, hand_text(clip, embeddings, ids, deep), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clip.encode_text_embeddings(embeddings, clip.attention_mask(ids)),
                               hand_text(clip, embeddings, ids, []), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, hand_text(clip, embeddings, ids, []), atol=1e-3)  # the prompts matter
    with pytest.raises(ValueError, match="at most 11"):
        clip.encode_text_embeddings(embeddings, clip.attention_mask(ids), deep_prompts=deep * 4)


def test_deep_text_prompt_equal_to_what_it_overwrites_changes_nothing(clip):
    """Per-text prompts (B, N, W) equal to the hidden states at positions 1..2 before layer 1 and 2."""
    ids = clip.tokenize(TEXTS)
    mask = clip.attention_mask(ids)
    blocks = clip.model.transformer.resblocks
    seen = {}
    hooks = [blocks[i].register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach().clone()))
             for i in (1, 2)]
    try:
        plain = clip.encode_text(ids)
    finally:
        for h in hooks:
            h.remove()
    same = clip.encode_text_embeddings(clip.token_embedding(ids), mask,
                                       deep_prompts=[seen[1][:, 1:3], seen[2][:, 1:3]])
    assert torch.equal(same, plain)


@pytest.mark.parametrize("mode,extra", [("replace", 0), ("insert", 3)])
def test_visual_prompts_positions_and_hand_made_forward(clip, images, mode, extra):
    prompts = [torch.full((3, clip.vision_width), float(i + 1)) for i in range(2)]
    seen = {}
    blocks = clip.model.visual.transformer.resblocks
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach().clone()))
             for i, b in enumerate(blocks)]
    try:
        got = clip.encode_image(images, prompts, mode=mode)
    finally:
        for h in hooks:
            h.remove()
    assert all(x.shape[1] == 1 + 100 + extra for x in seen.values())
    assert torch.equal(seen[0][:, 1:4], torch.ones_like(seen[0][:, 1:4]))
    assert torch.equal(seen[1][:, 1:4], torch.full_like(seen[1][:, 1:4], 2.0))
    assert not torch.equal(seen[2][:, 1:4], torch.full_like(seen[2][:, 1:4], 2.0))  # depth 2
    torch.testing.assert_close(got, hand_image(clip, images, prompts, mode), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clip.encode_image(images), hand_image(clip, images, [], mode), atol=1e-5, rtol=1e-5)


def test_gradients_reach_prompts_never_the_backbone(clip, images):
    ids = clip.tokenize(TEXTS[:2])
    ctx = torch.zeros(2, clip.text_width, requires_grad=True)
    e = clip.token_embedding(ids)
    embeddings = torch.cat([e[:, :1], ctx.expand(2, -1, -1), e[:, 3:]], dim=1)
    deep = [torch.randn(2, clip.text_width, requires_grad=True)]
    visual = [torch.zeros(4, clip.vision_width, requires_grad=True) for _ in range(2)]
    text = clip.encode_text_embeddings(embeddings, clip.attention_mask(ids), deep_prompts=deep)
    image = clip.encode_image(images, visual, mode="insert")
    (clip.logit_scale * image @ text.t()).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [ctx, *deep, *visual])
    assert all(p.grad is None for p in clip.parameters())


# ------------------------------------------------------------------------------------- ResNet tower
def test_resnet_tower_equals_open_clip_and_refuses_visual_prompts(resnet):
    backbone = Backbone(resnet)
    assert backbone.image_tower.family == "openclip-resnet" and not backbone.image_facts.prompt_tokens
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(backbone.encode_image(images), backbone.model.encode_image(images), atol=1e-6, rtol=0)
    backbone.train()  # train mode never touches the frozen BatchNorm statistics
    assert not any(m.training for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with pytest.raises(ValueError, match="ResNet"):
        backbone.encode_image(images, [torch.zeros(2, backbone.vision_width)])
    with pytest.raises(ValueError, match=r"VPT: model.depth=1 .*ResNet.*ViT backbone"):
        VPT(classnames=CLASSES, backbone=resnet)


def test_coop_learns_on_a_resnet_backbone(resnet):
    torch.manual_seed(0)
    model = CoOp(classnames=CLASSES, backbone=resnet)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    logits = model(images)
    assert logits.shape == (2, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    learned = [name for name, p in model.named_parameters() if p.grad is not None]
    assert learned and all("backbone" not in name for name in learned)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------- names and folders
def test_download_backbone_copies_a_generated_model(clip, tmp_path):
    folder = download_backbone("tiny-clip", tmp_path / "tiny-clip")
    loaded = Backbone(f"local-dir:{folder}")
    ids = loaded.tokenize(TEXTS)
    assert torch.equal(loaded.encode_text(ids), clip.encode_text(ids))
    assert json.loads((folder / "open_clip_config.json").read_text())["model_cfg"] == TINY_CLIP_RECIPE["model_cfg"]
    assert folder != tiny_clip_dir()


def test_openclip_names_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import dpt_lightning.backbone.loading as loading

    monkeypatch.setattr(loading, "openclip_is_cached", lambda cfg: False)
    with pytest.raises(BackboneLoadError, match=r"openclip:ViT-B-16/openai.*HF_HUB_OFFLINE.*local-dir"):
        Backbone("openclip:ViT-B-16/openai")
    with pytest.raises(BackboneLoadError, match="no pretrained weights 'no-such-tag'.*openai"):
        Backbone("openclip:ViT-B-16/no-such-tag")
    with pytest.raises(BackboneLoadError, match="no architecture 'ViT-Q-99'"):
        Backbone("openclip:ViT-Q-99/openai")
    with pytest.raises(BackboneLoadError, match="openclip:<architecture>/<pretrained tag>"):
        Backbone("openclip:ViT-B-16")


# ----------------------------------------------------------------------------- PubMedCLIP conversion
def write_openai_tokenizer(folder, vocab_swap: bool = False):
    """OpenAI's tokenizer files (vocab.json with OpenAI's special-token names, as PubMedCLIP ships
    them, and merges.txt) from open_clip's own BPE table, saved as a transformers CLIPTokenizer."""
    import gzip

    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from transformers import CLIPTokenizer

    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    encoder = {names.get(token, token): index for token, index in SimpleTokenizer().encoder.items()}
    if vocab_swap:  # two tokens trade ids: not OpenAI's vocabulary any more
        encoder["cat</w>"], encoder["dog</w>"] = encoder["dog</w>"], encoder["cat</w>"]
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    (folder / "vocab.json").write_text(json.dumps(encoder))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)


def tiny_hf_clip(folder):
    """A tiny transformers CLIPModel (OpenAI's vocabulary size and context) saved in ``folder``."""
    from transformers import CLIPConfig, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    write_openai_tokenizer(folder)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 16},
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a misplaced weight shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-clip") / "model"
    return folder, tiny_hf_clip(folder)


def test_conversion_gives_the_transformers_features(hf_clip):
    """``hf-clip:<folder>`` converts once into the cache (checked there against the transformers
    model) and loads as a CLIP-family backbone with the transformers model's features."""
    source, hf_model = hf_clip
    backbone = Backbone(f"hf-clip:{source}")
    assert (backbone.text_tower.family, backbone.image_tower.family) == ("openclip-text", "openclip-vit")
    ids = backbone.tokenize(TEXTS)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs_text = hf_model.get_text_features(input_ids=backbone.tokenizer(TEXTS))
        theirs_image = hf_model.get_image_features(pixel_values=images)
    theirs_text = getattr(theirs_text, "pooler_output", theirs_text)
    theirs_image = getattr(theirs_image, "pooler_output", theirs_image)
    torch.testing.assert_close(backbone.encode_text(ids), theirs_text, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(backbone.encode_image(images), theirs_image, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(backbone.logit_scale, hf_model.logit_scale.exp().detach())
    cfg = open_clip_model_cfg(hf_model.config)  # the config and state dict alone: every weight has its place
    assert (cfg["text_cfg"]["context_length"], cfg["vision_cfg"]["layers"], cfg["quick_gelu"]) == (77, 2, True)
    state = open_clip_state_dict(hf_model.state_dict(), hf_model.config)
    assert state.keys() == backbone.model.state_dict().keys()
    for name, value in state.items():
        assert torch.equal(backbone.model.state_dict()[name], value), name


def test_conversion_refuses_another_vocabulary_and_non_clip_folders(hf_clip, tmp_path):
    source = tmp_path / "swapped"
    shutil.copytree(hf_clip[0], source)
    for f in source.iterdir():
        if f.suffix in (".json", ".txt") and f.name != "config.json":
            f.unlink()
    write_openai_tokenizer(source, vocab_swap=True)
    with pytest.raises(ConversionError, match="vocabulary is not OpenAI CLIP's"):
        convert_hf_clip(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(BackboneLoadError, match=r"hf-clip:.*not a transformers CLIPModel"):
        Backbone(f"hf-clip:{tmp_path / 'nothing-here'}")


def test_methods_on_a_resnet_backbone_without_visual_prompts(resnet):
    """Biomed-DPT with its visual prompt off, CLIP-SVD on the text tower only: they work; CLIP-SVD on
    the ResNet image tower (no transformer matrices) is refused naming model.towers."""
    from dpt_lightning import CLIPSVD, BiomedDPT

    classes = ["circle", "square", "stripes", "cross"]
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    dpt = BiomedDPT(classnames=classes, backbone=resnet, dataset="demo", template="a photo of a {}.",
                    vision_prompt="off")
    svd = CLIPSVD(classnames=classes, backbone=resnet, towers=["text"])
    assert dpt(images).shape == svd(images).shape == (2, 4)
    with pytest.raises(ValueError, match=r"CLIP-SVD: model.towers includes 'image'.*model.towers=\[text\]"):
        CLIPSVD(classnames=classes, backbone=resnet)
