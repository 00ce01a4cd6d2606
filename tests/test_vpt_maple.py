"""VPT and MaPLe: zero-effect equality with zero-shot, where the prompts enter each tower (recorded
with hooks on the ViT blocks and the BERT layers), which parameters learn and how many, the
train-mode policy, option errors, and the four shipped configs through the real CLI."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch

from dpt_lightning import MaPLe, VPT, ZeroShot
from dpt_lightning.data.facts import dataset_facts
from dpt_lightning.demo.models import BIOMEDCLIP_RECIPE, TINY_RECIPE, write_model_dir
from dpt_lightning.visual_prompts import patch_fan_in, xavier_bound

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["glioma tumor", "normal brain", "pituitary tumor"]
TEXT_LAYERS = 4  # the test backbone's BERT depth, so that "no further than depth" is observable


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tensors are small, and on a busy 2-core machine a second thread
    makes every small op wait for a descheduled worker (Normalize of one image: 0.1 ms vs 60 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> str:
    """The tiny model with 4 BERT layers (12 ViT blocks, 100 patches, widths text 32 / vision 64)."""
    folder = tmp_path_factory.mktemp("tiny-bert4")
    recipe = {**TINY_RECIPE, "bert": {**TINY_RECIPE["bert"], "num_hidden_layers": TEXT_LAYERS}}
    write_model_dir(folder, recipe, "dpt-lightning/tiny-biomedbert4")
    return f"local-dir:{folder}"


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 160, 160, generator=torch.Generator().manual_seed(0))


def build(cls, backbone, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(classnames=CLASSES, backbone=backbone, **kwargs).eval()


@contextlib.contextmanager
def recorded(modules):
    """Record each module's first input and its output (tensor) at every call."""
    inputs, outputs, handles = {}, {}, []
    for i, module in enumerate(modules):
        handles.append(module.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0])))
        handles.append(module.register_forward_hook(
            lambda m, args, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out)))
    try:
        yield inputs, outputs
    finally:
        for handle in handles:
            handle.remove()


def vision_blocks(model):
    return model.backbone.model.visual.trunk.blocks


def bert_layers(model):
    return model.backbone.model.text.transformer.encoder.layer


# ------------------------------------------------------------------ zero effect
def test_without_prompts_both_methods_are_zero_shot(backbone, images):
    zeroshot = build(ZeroShot, backbone)
    expected = zeroshot(images)
    vpt = build(VPT, backbone, depth=0)
    maple = build(MaPLe, backbone, depth=0)
    with torch.no_grad():
        torch.testing.assert_close(vpt(images), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(maple(images), expected, rtol=0, atol=1e-6)
        # MaPLe's context starts as CTX_INIT: its text side equals zero-shot at depth 1 (no deep
        # prompts); the image side then differs because 4 patches are replaced
        reference = build(MaPLe, backbone)
        torch.testing.assert_close(reference.encode_classes(), zeroshot.class_features, rtol=0, atol=1e-6)
        assert not torch.allclose(reference(images), expected, atol=1e-3)
    assert not vpt.trainable_parameters()  # depth 0: nothing to fit
    with pytest.raises(RuntimeError, match="no trainable parameters"):
        vpt.configure_optimizers()


# --------------------------------------------------------------- vision tower
@pytest.mark.parametrize("cls,kwargs,n", [
    (VPT, {"mode": "replace", "depth": 3, "n_prompts": 4}, 4),
    (VPT, {"mode": "insert", "depth": 3, "n_prompts": 5}, 5),
    (MaPLe, {"vision_mode": "replace", "depth": 3, "n_ctx": 2}, 2),
    (MaPLe, {"vision_mode": "insert", "depth": 3, "n_ctx": 2}, 2),
])
def test_vision_prompts_enter_every_block_up_to_depth_and_no_further(backbone, images, cls, kwargs, n):
    model = build(cls, backbone, **kwargs)
    insert = "insert" in kwargs.values()
    blocks = vision_blocks(model)
    with torch.no_grad(), recorded(blocks) as (inputs, outputs):
        model.encode_images(images)
        prompts = model.visual_prompts()
    with torch.no_grad(), recorded(blocks[:1]) as (plain, _):
        model.backbone.encode_image(images)
    patches = plain[0].shape[1]  # CLS + 100 patches
    assert len(prompts) == 3 and all(p.shape == (n, model.backbone.vision_width) for p in prompts)
    for i in range(len(blocks)):
        x = inputs[i]
        assert x.shape[1] == patches + (n if insert else 0)  # insert grows by n, replace keeps the length
        at_prompts = x[:, 1:1 + n]
        if i < 3:
            assert torch.equal(at_prompts, prompts[i].expand_as(at_prompts))
        if i > 0:  # other positions flow on; prompt positions flow on only after the depth
            assert torch.equal(x[:, 1 + n:], outputs[i - 1][:, 1 + n:])
            assert torch.equal(x[:, :1], outputs[i - 1][:, :1])
            assert torch.equal(at_prompts, outputs[i - 1][:, 1:1 + n]) == (i >= 3)
    # block 0: insert keeps every patch after the prompts, replace loses patches 1..n
    kept = plain[0][:, 1:] if insert else plain[0][:, 1 + n:]
    assert torch.equal(inputs[0][:, 1 + n:], kept)


# ------------------------------------------------------------------ text tower
@pytest.mark.parametrize("depth", [1, 3])
def test_maple_text_prompts_enter_bert_layers_up_to_depth_and_no_further(backbone, depth):
    model = build(MaPLe, backbone, depth=depth, n_ctx=2)
    assert model.backbone.num_text_layers == TEXT_LAYERS
    layers = bert_layers(model)
    with torch.no_grad(), recorded(layers) as (inputs, outputs):
        model.encode_classes()
    assert len(model.deep_text) == depth - 1
    for i in range(1, TEXT_LAYERS):
        at_ctx, before = inputs[i][:, 1:3], outputs[i - 1]
        if i < depth:  # layer i's own prompt replaces the context positions, for every class
            assert torch.equal(at_ctx, model.deep_text[i - 1].expand_as(at_ctx))
            assert not torch.equal(at_ctx, before[:, 1:3])
        else:
            assert torch.equal(at_ctx, before[:, 1:3])
        assert torch.equal(inputs[i][:, 3:], before[:, 3:]) and torch.equal(inputs[i][:, :1], before[:, :1])


def test_maple_vision_prompts_are_the_coupled_text_prompts(backbone):
    model = build(MaPLe, backbone, depth=3, n_ctx=2)
    text = [model.prompt.ctx, *model.deep_text]
    for couple, t, v in zip(model.coupling, text, model.visual_prompts(), strict=True):
        torch.testing.assert_close(v, t @ couple.weight.t() + couple.bias)
    assert model.coupling[0].in_features == model.backbone.text_width
    assert model.coupling[0].out_features == model.backbone.vision_width


# ------------------------------------------------------ what learns, how much
def _vpt_count(model):
    hp = model.hparams
    return VPT.parameter_count(hp.depth, hp.n_prompts, model.backbone.vision_width)


def _maple_count(model):
    b = model.backbone
    return MaPLe.parameter_count(model.hparams.depth, model.prompt.n_ctx, b.text_width, b.vision_width)


@pytest.mark.parametrize("cls,kwargs,names,count", [
    (VPT, {}, {"prompts.tokens"}, _vpt_count),
    (VPT, {"mode": "insert", "depth": 6, "n_prompts": 3, "init": "xavier", "prompt_dropout": 0.1},
     {"prompts.tokens"}, _vpt_count),
    (MaPLe, {}, {"prompt.ctx", "coupling.0.weight", "coupling.0.bias"}, _maple_count),
    (MaPLe, {"depth": 4, "n_ctx": 2, "vision_mode": "insert"},
     {"prompt.ctx", *(f"deep_text.{j}" for j in range(3)),
      *(f"coupling.{j}.{w}" for j in range(4) for w in ("weight", "bias"))}, _maple_count),
])
def test_only_the_documented_parameters_learn(backbone, images, cls, kwargs, names, count):
    model = build(cls, backbone, **kwargs)
    model.on_train_epoch_start()
    logits = model(images)
    loss = model.compute_loss(logits, torch.tensor([0, 1, 2]), None, None)["loss"]
    loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == names == {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad.abs().sum() > 0 for name, p in model.named_parameters() if name in names)
    assert sum(p.numel() for p in model.trainable_parameters()) == count(model)
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    if cls is MaPLe:  # the context learns through both towers
        assert model.prompt.ctx.grad.shape == (model.prompt.n_ctx, model.backbone.text_width)


def test_parameter_formulas_at_biomedclip_width():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):  # the real ViT-B/16 geometry without allocating it
        vit = timm.create_model(BIOMEDCLIP_RECIPE["vision"]["timm_model_name"], pretrained=False)
    text_width, vision_width = BIOMEDCLIP_RECIPE["bert"]["hidden_size"], vit.embed_dim
    assert (text_width, vision_width, len(vit.blocks)) == (768, 768, 12)
    # MaPLe canonical: context 2*768 + deep text 8*2*768 + 9 couplings 768*768 + 768
    assert MaPLe.parameter_count(9, 2, text_width, vision_width) == 2 * 768 + 8 * 2 * 768 + 9 * (768 * 768 + 768)
    assert MaPLe.parameter_count(9, 2, text_width, vision_width) == 5_329_152
    assert MaPLe.parameter_count(1, 4, text_width, vision_width) == 593_664  # the benchmark's MaPLe
    assert VPT.parameter_count(1, 4, vision_width) == 3_072  # the benchmark's VPT
    assert VPT.parameter_count(12, 4, vision_width) == 36_864  # trainers/vpt_deep.yaml
    fan_in = vit.patch_embed.proj.weight[0].numel()
    assert fan_in == 3 * 16 * 16
    assert xavier_bound(fan_in, vision_width) == pytest.approx(math.sqrt(6 / (3 * 16 * 16 + 768))) == 0.0625


def test_vpt_initialisations_and_prompt_dropout(backbone):
    normal = build(VPT, backbone, depth=6, n_prompts=8)
    assert normal.prompts.tokens.std().item() == pytest.approx(0.02, rel=0.1)
    xavier = build(VPT, backbone, depth=6, n_prompts=8, init="xavier", prompt_dropout=0.5)
    bound = xavier_bound(patch_fan_in(xavier.backbone), 64)
    assert bound == pytest.approx(math.sqrt(6 / (3 * 16 * 16 + 64)))
    tokens = xavier.prompts.tokens
    assert tokens.abs().max() <= bound and tokens.abs().max() > 0.9 * bound
    assert tokens.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # uniform(-v, v)
    assert all(torch.equal(p, t) for p, t in zip(xavier.visual_prompts(), tokens))  # eval: no dropout
    xavier.on_train_epoch_start()
    dropped = torch.stack(xavier.visual_prompts())
    assert ((dropped == 0) | torch.isclose(dropped, 2 * tokens)).all() and (dropped == 0).any()


def test_train_mode_policy(backbone):
    vpt, maple = build(VPT, backbone), build(MaPLe, backbone)
    assert (VPT.reference_backbone_dropout, MaPLe.reference_backbone_dropout) == (False, True)
    assert vpt.image_path_key() is None and maple.image_path_key() is None  # never served cached features
    vpt.on_train_epoch_start()
    maple.on_train_epoch_start()
    assert vpt.prompts.training and not vpt.backbone.training
    assert maple.training and maple.backbone.model.text.transformer.training  # BERT dropout active
    torch.manual_seed(1)
    first = maple.encode_classes()
    assert not torch.equal(first, maple.encode_classes())  # dropout: two draws differ
    frozen = build(MaPLe, backbone, backbone_dropout=False)
    frozen.on_train_epoch_start()
    assert torch.equal(frozen.encode_classes(), frozen.encode_classes())


@pytest.mark.parametrize("cls,kwargs,message", [
    (VPT, {"depth": 13}, r"model.depth=13 is out of range .* use 0..12"),
    (VPT, {"depth": -1}, "model.depth=-1"),
    (VPT, {"n_prompts": 0}, "model.n_prompts=0: use at least 1"),
    (VPT, {"mode": "append"}, "model.mode='append' is unknown"),
    (VPT, {"n_prompts": 100}, "would replace all 100 patch tokens"),
    (VPT, {"init": "kaiming"}, "model.init='kaiming' is unknown"),
    (VPT, {"prompt_dropout": 1.0}, "model.prompt_dropout=1.0"),
    (MaPLe, {"depth": TEXT_LAYERS + 1}, rf"model.depth={TEXT_LAYERS + 1} is out of range .* use 0..{TEXT_LAYERS}"),
    (MaPLe, {"vision_mode": "append"}, "model.vision_mode='append' is unknown"),
    (MaPLe, {"n_ctx": 9}, "n_ctx=9 does not fit"),
])
def test_invalid_options_are_clear_errors(backbone, cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(cls, backbone, **kwargs)


# ------------------------------------------------------------------------ CLI
#: config -> overrides for the tiny backbone (none: it has BiomedCLIP's 12 ViT blocks and 12 BERT layers)
CONFIGS = {"vpt": [], "vpt_deep": [], "maple": [], "maple_deep": []}
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--data.num_workers", "0",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.log_every_n_steps", "1"]


def _run(command: str, config: str, data: list[str], root: Path, *extra: str):
    from dpt_lightning.cli import build_cli

    return build_cli([command, "--config", str(ROOT / f"trainers/{config}.yaml"), *data, *CONFIGS[config],
                      *QUICK, "--trainer.default_root_dir", str(root), *extra])


def test_deep_config_on_a_smaller_backbone_names_the_override(tmp_path, backbone):
    from dpt_lightning.cli import build_cli

    with pytest.raises(ValueError, match=rf"model.depth=9 is out of range for backbone '{backbone}': use 0..{TEXT_LAYERS}"):
        build_cli(["fit", "--config", str(ROOT / "trainers/maple_deep.yaml"), "--config",
                   str(ROOT / "datasets/demo.yaml"), "--model.init_args.backbone", backbone,
                   "--trainer.default_root_dir", str(tmp_path)])


@pytest.fixture(scope="module")
def benchmark_root(tmp_path_factory) -> Path:
    from fakedata import write_fake_dataset

    root = tmp_path_factory.mktemp("benchmark")
    write_fake_dataset(root, "BTMRI")
    return root


@pytest.mark.parametrize("config", list(CONFIGS))
def test_config_fits_demo_and_checkpoint_round_trips(tmp_path, config):
    demo = ["--config", str(ROOT / "datasets/demo.yaml")]
    fit = _run("fit", config, demo, tmp_path / "fit")
    (ckpt,) = (tmp_path / "fit").glob("lightning_logs/version_*/checkpoints/last.ckpt")
    learned = {name: p.detach().clone() for name, p in fit.model.named_parameters() if p.requires_grad}
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert set(state) == set(learned)  # only the prompts, no backbone
    tested = _run("test", config, demo, tmp_path / "test", "--ckpt_path", str(ckpt))
    for name, value in tested.model.named_parameters():
        if value.requires_grad:
            assert torch.equal(value, learned[name]), name
    for metric in ("test_acc", "test_f1"):
        assert tested.trainer.callback_metrics[metric] == fit.trainer.callback_metrics[metric]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_config_fits_a_benchmark_dataset(tmp_path, benchmark_root, config):
    data = ["--config", str(ROOT / "datasets/btmri.yaml"), "--data.root", str(benchmark_root),
            "--data.num_shots", "2", "--model.init_args.backbone", "tiny"]
    fit = _run("fit", config, data, tmp_path)
    assert fit.model.classnames == list(dataset_facts("BTMRI").classnames)
    assert 0.0 <= float(fit.trainer.callback_metrics["test_acc"]) <= 1.0
    assert fit.trainer.global_step == min(2, math.ceil(2 * 4 / fit.datamodule.batch_size))  # 2 shots x 4 classes
