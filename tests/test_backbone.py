"""The shared backbone: real open_clip loading, equalities with open_clip, gradient facts."""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch

from dpt_lightning.backbone import BackboneLoadError, BiomedCLIP, load_open_clip, resolve_backbone_name
from dpt_lightning.demo.models import tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a photo of a glioma tumor.", "a chest X-ray photo of a normal lungs affected by covid-19 in the lung.",
         "cat"]


def test_tiny_loads_through_open_clip_local_dir(tiny):
    folder = tiny_model_dir()
    assert resolve_backbone_name("tiny") == f"local-dir:{folder}"
    assert (folder / "open_clip_config.json").is_file() and (folder / "config.json").is_file()
    assert type(tiny.model).__name__ == "CustomTextCLIP"
    assert tiny.context_length == 64 == open_clip.get_tokenizer(f"local-dir:{folder}").context_length
    assert all(not p.requires_grad for p in tiny.parameters())
    assert not tiny.model.training


def test_bert_config_trap_is_avoided_and_explained(tmp_path):
    """Without the BERT config beside it, open_clip would ask the hub for the text tower."""
    broken = tmp_path / "clip"
    shutil.copytree(tiny_model_dir(), broken)
    (broken / "config.json").unlink()
    with pytest.raises(BackboneLoadError, match="local-dir"):
        load_open_clip(f"local-dir:{broken}")


def test_uncached_hub_model_fails_fast_with_local_dir_hint():
    with pytest.raises(BackboneLoadError, match="local-dir"):
        BiomedCLIP("hf-hub:microsoft/this-model-is-not-cached-anywhere")


def test_uncached_hub_model_without_network_fails_at_once(monkeypatch):
    """No HF_HUB_OFFLINE, and a hub that refuses connections: a clear error before any download
    attempt (huggingface_hub would otherwise retry for about half a minute)."""
    import open_clip

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(open_clip, "create_model_from_pretrained",
                        lambda *a, **k: pytest.fail("open_clip must not be asked to download"))
    started = time.perf_counter()
    with pytest.raises(BackboneLoadError, match="cannot be reached.*local-dir"):
        BiomedCLIP("hf-hub:microsoft/this-model-is-not-cached-anywhere")
    assert time.perf_counter() - started < 10


def test_unknown_backbone_string():
    with pytest.raises(BackboneLoadError, match="hf-hub"):
        BiomedCLIP("no-such-thing")


def test_encode_text_equals_open_clip(tiny):
    full = tiny.tokenizer(TEXTS)
    assert full.shape[1] == tiny.context_length
    expected = tiny.model.encode_text(full)
    assert torch.equal(tiny.encode_text(full), expected)
    trimmed = tiny.tokenize(TEXTS)
    assert trimmed.shape[1] < full.shape[1]
    torch.testing.assert_close(tiny.encode_text(trimmed), expected, atol=1e-5, rtol=0)


def test_encode_text_embeddings_without_prompts_equals_plain(tiny):
    ids = tiny.tokenize(TEXTS)
    plain = tiny.encode_text(ids)
    via_embeddings = tiny.encode_text_embeddings(tiny.token_embedding(ids), ids != tiny.pad_id, deep_prompts=[])
    assert torch.equal(plain, via_embeddings)


def test_encode_image_equals_open_clip(tiny):
    images = torch.randn(3, 3, tiny.image_size, tiny.image_size)
    assert torch.equal(tiny.encode_image(images), tiny.model.encode_image(images))
    assert torch.equal(tiny.encode_image(images, prompts=[]), tiny.model.encode_image(images))


def _record_block_inputs(tiny):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
             for b in tiny.model.visual.trunk.blocks]
    return seen, hooks


@pytest.mark.parametrize("mode,extra", [("replace", 0), ("insert", 3)])
def test_visual_prompts_positions_and_depth(tiny, mode, extra):
    images = torch.randn(2, 3, tiny.image_size, tiny.image_size)
    prompts = [torch.full((3, tiny.vision_width), float(i + 1)) for i in range(2)]
    seen, hooks = _record_block_inputs(tiny)
    try:
        tiny.encode_image(images, prompts, mode=mode)
    finally:
        for h in hooks:
            h.remove()
    n_tokens = 1 + (tiny.image_size // 16) ** 2
    assert all(x.shape[1] == n_tokens + extra for x in seen)
    assert torch.equal(seen[0][:, 1:4], torch.full_like(seen[0][:, 1:4], 1.0))
    assert torch.equal(seen[1][:, 1:4], torch.full_like(seen[1][:, 1:4], 2.0))
    assert not torch.equal(seen[2][:, 1:4], torch.full_like(seen[2][:, 1:4], 2.0))  # depth 2: block 2 untouched


def test_deep_text_prompts_replace_positions_before_each_layer(tiny):
    ids = tiny.tokenize(TEXTS[:2])
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw=None: seen.append(a[0].detach().clone()))
             for layer in tiny.model.text.transformer.encoder.layer]
    deep = [torch.full((2, tiny.text_width), 7.0)]
    try:
        tiny.encode_text_embeddings(tiny.token_embedding(ids), ids != tiny.pad_id, deep_prompts=deep)
    finally:
        for h in hooks:
            h.remove()
    assert not torch.equal(seen[0][:, 1:3], torch.full_like(seen[0][:, 1:3], 7.0))
    assert torch.equal(seen[1][:, 1:3], torch.full_like(seen[1][:, 1:3], 7.0))
    with pytest.raises(ValueError, match="at most"):
        tiny.encode_text_embeddings(tiny.token_embedding(ids), ids != tiny.pad_id,
                                    deep_prompts=deep * tiny.num_text_layers)


def test_gradients_reach_prompts_never_the_backbone(tiny):
    visual = [torch.zeros(4, tiny.vision_width, requires_grad=True) for _ in range(2)]
    ids = tiny.tokenize(TEXTS[:2])
    ctx = torch.zeros(2, tiny.text_width, requires_grad=True)
    embeddings = torch.cat([tiny.token_embedding(ids)[:, :1], ctx.expand(2, -1, -1),
                            tiny.token_embedding(ids)[:, 3:]], dim=1)
    deep = [torch.randn(2, tiny.text_width, requires_grad=True)]
    text = tiny.encode_text_embeddings(embeddings, ids != tiny.pad_id, deep_prompts=deep)
    image = tiny.encode_image(torch.randn(2, 3, tiny.image_size, tiny.image_size), visual, mode="insert")
    (tiny.logit_scale * image @ text.t()).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [*visual, ctx, *deep])
    assert all(p.grad is None for p in tiny.parameters())


def test_class_sentence_ensemble_is_normalised_mean(tiny):
    groups = [["a red circle", "a round circle"], ["a green square"]]
    got = tiny.encode_class_sentences(groups)
    single = tiny.encode_sentences(["a red circle", "a round circle", "a green square"])
    expected0 = torch.nn.functional.normalize(single[:2].mean(0), dim=-1)
    torch.testing.assert_close(got[0], expected0)
    torch.testing.assert_close(got[1], single[2])
    assert not tiny.training and not tiny.model.text.training


def test_reference_transforms(tiny):
    from PIL import Image

    image = Image.new("RGB", (300, 200), (255, 0, 0))
    assert tiny.test_transform()(image).shape == (3, tiny.image_size, tiny.image_size)
    assert tiny.train_transform()(image).shape == (3, tiny.image_size, tiny.image_size)
    names = [type(t).__name__ for t in tiny.train_transform().transforms]
    assert names == ["RandomResizedCrop", "ToTensor", "Normalize"]  # no flip, as the reference


def test_download_biomedclip_writes_an_offline_folder(tmp_path, monkeypatch):
    """The download helper (mocked hub) lays out a folder that loads with no network."""
    import huggingface_hub

    from dpt_lightning.backbone import download_biomedclip

    source = tiny_model_dir()

    def fake_snapshot(repo_id, local_dir, ignore_patterns=()):
        for f in source.iterdir():
            if f.name != "config.json":  # the hub repo of BiomedCLIP has no BERT config
                shutil.copy(f, local_dir)

    def fake_file(repo_id, filename):
        return str(source / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: [f.name for f in source.iterdir()])
    monkeypatch.setattr(huggingface_hub, "list_repo_tree", lambda repo, recursive: [])  # no LFS digests to check
    folder = download_biomedclip(tmp_path / "biomedclip")
    loaded = BiomedCLIP(f"local-dir:{folder}")
    ids = loaded.tokenize(TEXTS)
    torch.testing.assert_close(loaded.encode_text(ids), BiomedCLIP("tiny").encode_text(ids))


# ------------------------------------------------------------- loading errors and generated models
def test_missing_local_folder_says_it_does_not_exist(tmp_path):
    with pytest.raises(BackboneLoadError, match="does not exist"):
        BiomedCLIP(f"local-dir:{tmp_path / 'nonexistent'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneLoadError, match="has no open_clip_config.json"):
        BiomedCLIP(f"local-dir:{tmp_path / 'empty'}")


def test_tiny_has_biomedclips_full_depth(tiny):
    """12 ViT blocks and 12 BERT layers, as BiomedCLIP: every shipped config's depth fits."""
    import yaml

    from dpt_lightning.demo.models import TINY_VIT_NAME

    assert tiny.num_vision_blocks == 12 == tiny.num_text_layers
    assert (tiny.image_size, tiny.image_facts.patch_size, tiny.num_patches) == (160, 16, 100)
    assert tiny.model.visual.trunk.default_cfg["architecture"] == TINY_VIT_NAME
    for config in sorted((ROOT / "trainers").glob("*.yaml")):
        depth = yaml.safe_load(config.read_text())["model"]["init_args"].get("depth", 0)
        assert depth <= min(tiny.num_vision_blocks, tiny.num_text_layers), config.name


@pytest.mark.slow
def test_loader_registers_the_generated_image_tower_itself():
    """A fresh process that loads a generated folder by path (not by the name ``tiny``) gets the
    tiny ViT registered with timm by the loader, before open_clip builds the model."""
    code = ("import sys\nfrom dpt_lightning.backbone import BiomedCLIP\n"
            "assert 'dpt_lightning.demo.models' not in sys.modules\n"
            f"b = BiomedCLIP('local-dir:{tiny_model_dir()}')\nprint(b.num_vision_blocks)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "12"


def test_generated_models_do_not_warn_but_user_folders_do(tmp_path, caplog):
    """open_clip's "no CLIP weights found" warning is silenced while our models are generated
    (they have no weights until written); open_clip's warnings about a user's folder still show."""
    from dpt_lightning.demo.models import TINY_BERT_NAME, TINY_RECIPE, WEIGHTS_FILE, write_model_dir

    with caplog.at_level(logging.WARNING):
        write_model_dir(tmp_path / "generated", TINY_RECIPE, TINY_BERT_NAME)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    user = tmp_path / "user"
    shutil.copytree(tmp_path / "generated", user)
    (user / WEIGHTS_FILE).rename(user / "a.bin")
    shutil.copy(user / "a.bin", user / "b.bin")
    with caplog.at_level(logging.WARNING):
        BiomedCLIP(f"local-dir:{user}")
    assert "Multiple checkpoints found" in caplog.text
    for f in ("a.bin", "b.bin"):
        (user / f).unlink()
    with pytest.raises(BackboneLoadError, match="has no weights file"):
        BiomedCLIP(f"local-dir:{user}")


def test_prompts_refuse_gradient_checkpointing(tiny):
    """A recomputation in backward would run the blocks without the prompts: refused."""
    trunk = tiny.model.visual.trunk
    trunk.set_grad_checkpointing(True)
    try:
        with pytest.raises(RuntimeError, match="checkpointing"):
            tiny.encode_image(torch.randn(1, 3, tiny.image_size, tiny.image_size),
                              [torch.zeros(2, tiny.vision_width)])
    finally:
        trunk.set_grad_checkpointing(False)
