"""CLIP-SVD on the tiny backbone (full depth, tiny width): the mathematics and the frozen backbone.

Checked: with untouched singular values the model is the frozen model (features bit for bit, logits
as zero-shot's); only the singular values learn, as many as the formula says; a changed singular
value changes exactly ``W = U diag(s) V^T`` of its matrix (also a third of a fused q/k/v matrix and
a wide matrix) and nothing else; a training fit and forward passes never touch the shared backbone
(bit-identical to a fresh load, and a model sharing the object sees the plain weights); the
evaluation caches; the selection options; the reference's per-dataset settings and its per-batch
cosine; and ``dpt fit/test/predict`` with the shipped config on the demo, the checkpoint holding the
singular values alone.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import Callback, Trainer
from torchvision import transforms as T

from dpt_lightning import CLIPSVD, DemoDataModule, PromptTrainer, ZeroShot
from dpt_lightning.backbone import BiomedCLIP
from dpt_lightning.data.facts import BENCHMARK_DATASETS
from dpt_lightning.methods.clip_svd import CLIPSVD_SETTINGS, SingularValueTuning, cosine_lr_factor, layer_indices

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "cross", "square"]
ROLES = ("q", "k", "v", "out", "fc1", "fc2")
TRAINABLE = re.compile(r"svd\.matrices\.(image|text)_(\d+)_(q|k|v|out|fc1|fc2)\.s")

#: The reference's learning rates (configs/few_shot/<dataset>.yaml, configs/base2new/<dataset>.yaml).
REFERENCE_LR = {
    "fewshot": {"BTMRI": 0.007, "BUSI": 0.002, "CHMNIST": 0.007, "COVID_19": 0.0005, "CTKidney": 0.001,
                "KneeXray": 0.008, "Kvasir": 0.005, "LungColon": 0.003, "OCTMNIST": 0.01, "RETINA": 0.007},
    "base2novel": {"BTMRI": 0.009, "CHMNIST": 0.001, "COVID_19": 0.002, "CTKidney": 0.01, "KneeXray": 0.002,
                   "Kvasir": 0.003, "LungColon": 0.01, "OCTMNIST": 0.02, "RETINA": 0.02},
}


def build(**kwargs) -> CLIPSVD:
    torch.manual_seed(0)
    return CLIPSVD(**{"classnames": CLASSES, "backbone": "tiny", "dataset": "demo", **kwargs})


def images(tiny, n: int = 3, seed: int = 0) -> torch.Tensor:
    size = tiny.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def prompts(template: str = "a photo of a {}.") -> list[str]:
    return [template.format(name) for name in CLASSES]


def shapes(tiny) -> dict[str, tuple[int, int, int]]:
    """(blocks, width, MLP width) of each tower of the BiomedCLIP-shaped tiny model."""
    vit, bert = tiny.model.visual.trunk.blocks, tiny.model.text.transformer.encoder.layer
    return {"image": (len(vit), vit[0].mlp.fc1.in_features, vit[0].mlp.fc1.out_features),
            "text": (len(bert), bert[0].intermediate.dense.in_features, bert[0].intermediate.dense.out_features)}


def plain_features(model: CLIPSVD, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    backbone = model.backbone
    return (F.normalize(backbone.encode_image(x).float(), dim=-1),
            F.normalize(backbone.encode_text(backbone.tokenize(prompts())).float(), dim=-1))


def perturb(model: CLIPSVD, scale: float = 0.05, seed: int = 1) -> CLIPSVD:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for factors in model.svd.matrices.values():
            factors.s.mul_(1 + scale * torch.randn(factors.s.shape, generator=generator))
    return model


# ------------------------------------------------------------------------------------------------
# Untouched singular values: the frozen model.
def test_untouched_singular_values_are_the_frozen_model(tiny):
    model = build().eval()
    x = images(tiny)
    with torch.no_grad():
        image, text = plain_features(model, x)
        assert torch.equal(model.encode_images(x), image)  # W + U diag(0) V^T is W itself
        assert torch.equal(model.encode_classes(), text)
        zero_shot = ZeroShot(classnames=CLASSES, backbone="tiny", dataset="demo", template="a photo of a {}.").eval()
        torch.testing.assert_close(model(x), zero_shot(x), rtol=1e-6, atol=1e-5)  # zero-shot re-normalises once more
    for tower in ("image", "text"):
        for name, weight in model.svd.weights(model.backbone, tower).items():
            assert torch.equal(weight, model.backbone.get_parameter(name)), name
    model.train()
    model.backbone.eval()  # the same network without dropout: the training path gives the same logits
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model.encode_images(x), model.text_features(None)),
                                   model.eval()(x), rtol=0, atol=0)


def test_each_factorisation_reconstructs_its_matrix(tiny):
    model = build()
    for key, factors in model.svd.matrices.items():
        assert torch.all(factors.s0[:-1] >= factors.s0[1:]) and torch.all(factors.s0 >= 0), key
        assert torch.equal(factors.s, factors.s0) and factors.s is not factors.s0
        product = (factors.u * factors.s0) @ factors.vh
        tower, block, role = key.split("_")
        for name, keys in model.svd.targets[tower]:
            if key in keys:
                weight = model.backbone.get_parameter(name)
                part = weight.chunk(len(keys))[keys.index(key)]
                torch.testing.assert_close(product, part, rtol=0, atol=1e-5 * float(part.abs().max()))


# ------------------------------------------------------------------------------------------------
# What learns.
def test_only_the_singular_values_learn(tiny):
    model = build()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    found = {TRAINABLE.fullmatch(name).groups() for name in trainable}
    dims = shapes(tiny)
    expected = {(tower, str(b), role) for tower, (blocks, _, _) in dims.items() for b in range(blocks) for role in ROLES}
    assert found == expected
    for name, p in trainable.items():
        tower, _, role = TRAINABLE.fullmatch(name).groups()
        _, width, mlp = dims[tower]
        assert p.shape == ((min(width, mlp),) if role in ("fc1", "fc2") else (width,)), name

    def count(blocks, width, mlp):  # q, k, v, out: width each; the MLP's two matrices: min(width, mlp) each
        return blocks * (4 * width + 2 * min(width, mlp))

    total = sum(p.numel() for p in trainable.values())
    assert total == count(*dims["image"]) + count(*dims["text"])
    assert total == sum(SingularValueTuning.parameter_count(*d) for d in dims.values())
    assert 2 * count(12, 768, 3072) == 110_592  # BiomedCLIP (the README's count)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    own = [k for k in model.state_dict() if not k.startswith("backbone.")]
    assert sorted(own) == sorted(trainable)  # U, V and s0 are not state

    model.on_train_epoch_start()  # train mode, BERT dropout on (the reference)
    assert model.backbone.model.text.training and model.backbone_dropout
    x, y = images(tiny, 4), torch.tensor([0, 1, 2, 0])
    f = model.encode_images(x)
    t = model.text_features(f)
    model.compute_loss(model.logits(f, t), y, f, t)["loss"].backward()
    grads = {name: p.grad for name, p in trainable.items()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for tower in ("image", "text"):
        assert sum(float(g.abs().sum()) for n, g in grads.items() if n.split(".")[2].startswith(tower)) > 0
    assert all(p.grad is None for p in model.backbone.parameters())


def test_selected_towers_layers_and_matrices(tiny):
    model = build(towers=["text"], layers=[0, 2], matrices=["q", "fc2"])
    assert sorted(model.svd.matrices) == ["text_0_fc2", "text_0_q", "text_2_fc2", "text_2_q"]
    assert model.svd.weights(model.backbone, "image") == {}
    perturb(model)
    x = images(tiny)
    with torch.no_grad():
        image, text = plain_features(model.eval(), x)
        assert torch.equal(model.encode_images(x), image)  # the image tower is not touched
        assert not torch.allclose(model.encode_classes(), text, atol=1e-6)

    assert layer_indices("all", 12) == list(range(12))
    assert layer_indices("bottom", 12) == [0, 1, 2, 3] and layer_indices("middle", 12) == [4, 5, 6, 7]
    assert layer_indices("top", 12) == [8, 9, 10, 11]  # the reference's include_train_layers presets
    assert layer_indices("top_bottom", 12) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert layer_indices("bottom_middle", 12) == list(range(8)) and layer_indices("top_middle", 12) == list(range(4, 12))
    with pytest.raises(ValueError, match="model.layers"):
        layer_indices("sideways", 12)
    with pytest.raises(ValueError, match="do not exist"):
        build(layers=[0, 99])
    with pytest.raises(ValueError, match="model.towers"):
        build(towers=["audio"])
    with pytest.raises(ValueError, match="model.matrices"):
        build(matrices=["w"])


def test_trained_blocks_follow_the_reference_per_dataset_and_protocol():
    """Issue 21.3: the configs' ``include_train_layers``: every block, but blocks 4-11 of both towers for
    CTKidney base-to-novel (``top_middle``: 96 matrices, not 144); recorded in the hyper-parameters."""
    special = {(name, protocol): row[2] for name, rows in CLIPSVD_SETTINGS.items() for protocol, row in rows.items()
               if row[2] != "all"}
    assert special == {("CTKidney", "base2novel"): "top_middle"}
    classes = list(BENCHMARK_DATASETS["CTKidney"].classnames)
    novel = build(classnames=classes[:2], dataset="CTKidney", protocol="base2novel")
    blocks = {int(TRAINABLE.fullmatch(n).group(2)) for n, p in novel.named_parameters() if p.requires_grad}
    assert novel.hparams.layers == "top_middle" and blocks == set(range(4, 12)) and len(novel.svd.matrices) == 96
    assert 2 * 8 * SingularValueTuning.parameter_count(1, 768, 3072) == 73_728  # at BiomedCLIP size
    fewshot = build(classnames=classes, dataset="CTKidney")
    assert fewshot.hparams.layers == "all" and len(fewshot.svd.matrices) == 144
    assert build().hparams.layers == "all"  # data outside the table
    given = build(classnames=classes[:2], dataset="CTKidney", protocol="base2novel", layers="all")
    assert given.hparams.layers == "all" and len(given.svd.matrices) == 144  # a value the user gives wins


# ------------------------------------------------------------------------------------------------
# A changed singular value changes exactly its matrix.
@pytest.mark.parametrize("key, index", [("image_1_k", 2),  # the middle third of the fused q/k/v matrix
                                        ("text_0_fc2", 0)])  # a wide matrix (factorised through its transpose)
def test_a_changed_singular_value_changes_exactly_its_matrix(tiny, key, index):
    model = build()
    tower = key.split("_")[0]
    name, keys = next((n, k) for n, k in model.svd.targets[tower] if key in k)
    frozen = model.backbone.get_parameter(name).detach().clone()
    part = frozen.chunk(len(keys))[keys.index(key)]
    factors = model.svd.matrices[key]
    hand = torch.linalg.svd(part.double(), full_matrices=False)
    torch.testing.assert_close(factors.s0.double(), hand.S, rtol=1e-5, atol=1e-6)  # the matrix's singular values
    with torch.no_grad():
        factors.s[index] += 0.5
    rebuilt = model.svd.weights(model.backbone, tower)
    rows = part.shape[0]
    start = keys.index(key) * rows
    new = rebuilt[name]
    u, s, vh = factors.u, factors.s.detach(), factors.vh
    torch.testing.assert_close(new[start:start + rows], (u * s) @ vh, rtol=0, atol=1e-5)  # U diag(s) V^T
    torch.testing.assert_close(new[start:start + rows] - part, 0.5 * torch.outer(u[:, index], vh[index]),
                               rtol=0, atol=1e-6)  # exactly one rank-one term moved
    assert torch.equal(new[:start], frozen[:start]) and torch.equal(new[start + rows:], frozen[start + rows:])
    for other, weight in rebuilt.items():
        if other != name:
            assert torch.equal(weight, model.backbone.get_parameter(other)), other
    x = images(tiny)
    with torch.no_grad():
        image, text = plain_features(model.eval(), x)
        moved, kept = (model.encode_images(x), model.encode_classes()) if tower == "image" else \
            (model.encode_classes(), model.encode_images(x))
        assert not torch.equal(moved, image if tower == "image" else text)
        assert torch.equal(kept, text if tower == "image" else image)  # the other tower is untouched


# ------------------------------------------------------------------------------------------------
# The shared backbone.
class RecordLR(Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def fit(model: CLIPSVD, root: Path, epochs: int = 1, batches: int = 2, callbacks=()) -> tuple[Trainer, DemoDataModule]:
    data = DemoDataModule(num_shots=2, batch_size=4, num_workers=0)
    trainer = Trainer(max_epochs=epochs, limit_train_batches=batches, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=root, callbacks=list(callbacks))
    trainer.fit(model, datamodule=data)
    return trainer, data


def test_the_shared_backbone_is_never_modified(tmp_path):
    classes = DemoDataModule().classnames
    fresh = BiomedCLIP("tiny")
    model = CLIPSVD(classnames=classes, backbone="tiny", dataset="demo", lr=0.05)
    neighbour = ZeroShot(classnames=classes, backbone="tiny", dataset="demo")
    neighbour.backbone = model.backbone  # one backbone object, two models
    parameters = dict(model.backbone.named_parameters())

    trainer, data = fit(model, tmp_path)
    assert trainer.global_step == 2
    assert any(not torch.equal(f.s, f.s0) for f in model.svd.matrices.values())  # it learnt
    train_transform = data.train_transform.transforms
    assert isinstance(train_transform[0], T.RandomResizedCrop) and train_transform[0].scale == (0.08, 1.0)
    assert any(isinstance(step, T.RandomHorizontalFlip) for step in train_transform)  # the reference's flip

    x = images(model.backbone, 2)
    model.eval()
    with torch.no_grad():
        adapted = model(x)
    with pytest.raises(Exception):  # an error inside the call (a wrong image size) leaves the weights restored too
        model.svd.call(model.backbone, "image", "encode_image", torch.zeros(1, 3, 7, 7))

    reference = fresh.state_dict()
    state = model.backbone.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, reference[name]), name  # bit-identical to a fresh load
    for name, p in model.backbone.named_parameters():
        assert p is parameters[name] and isinstance(p, torch.nn.Parameter) and not p.requires_grad, name

    plain = ZeroShot(classnames=classes, backbone="tiny", dataset="demo").eval()
    with torch.no_grad():
        assert torch.equal(neighbour.eval()(x), plain(x))  # the neighbour sees the plain weights
        sentences = [f"a photo of a {name}." for name in classes]
        assert torch.equal(neighbour.backbone.encode_sentences(sentences), fresh.encode_sentences(sentences))
        assert not torch.allclose(adapted, plain(x), atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Evaluation caches.
def test_image_features_are_never_cached_and_class_features_follow_the_singular_values(tiny, tmp_path, monkeypatch):
    model, twin = build(cache_eval_features=True).eval(), build().eval()
    assert model.image_path_key() is None  # the image path learns
    monkeypatch.setenv("DPT_CACHE_DIR", str(tmp_path))  # where a feature store would write
    x = images(tiny, 2)
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    batch = {"image": x, "path": [str(tmp_path / "a.png"), str(tmp_path / "b.png")], "label": torch.tensor([0, 1])}
    with torch.no_grad():
        before = model(x)
        assert torch.equal(model.evaluation_logits(batch), before)
    model.on_test_epoch_end()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # nothing stored
    with torch.no_grad():
        factors = model.svd.matrices["text_1_v"]
        factors.s.data.mul_(1.3)  # in place through .data: the version counter does not move
        after = model(x)
    with torch.no_grad():
        twin.svd.matrices["text_1_v"].s.copy_(factors.s)
        torch.testing.assert_close(after, twin(x), rtol=0, atol=0)
    assert not torch.equal(after, before)


# ------------------------------------------------------------------------------------------------
# The reference's settings and schedule.
def test_reference_settings_per_dataset():
    table = {protocol: {name: rows[protocol][0] for name, rows in CLIPSVD_SETTINGS.items() if protocol in rows}
             for protocol in REFERENCE_LR}
    assert table == REFERENCE_LR
    assert CLIPSVD_SETTINGS["CTKidney"]["fewshot"][1] == 200 and CLIPSVD_SETTINGS["COVID_19"]["base2novel"][1] == 50

    def settings(dataset, protocol="fewshot", **kwargs):
        classes = list(BENCHMARK_DATASETS[dataset].classnames)
        hp = build(classnames=classes, dataset=dataset, protocol=protocol, **kwargs).hparams
        return hp.lr, hp.template

    assert settings("COVID_19") == (0.0005, "a chest xray of {}.")
    assert settings("COVID_19", "base2novel") == (0.002, "a photo of a {}.")
    assert settings("OCTMNIST", lr=0.1, template="an OCT scan of {}.") == (0.1, "an OCT scan of {}.")
    hp = build().hparams  # data outside the table: the median of the reference's rates
    assert (hp.lr, hp.template, hp.weight_decay) == (0.006, "a photo of a {}.", 0.0)
    with pytest.raises(ValueError, match="warm-up"):
        build(warmup_epochs=1)
    with pytest.raises(ValueError, match="model.schedule"):
        build(schedule="linear")


def cosine_oracle(lr: float, T_max: int, steps: int) -> list[float]:
    """The learning rate of each of ``steps`` batches under torch's ``CosineAnnealingLR(T_max,
    eta_min=1e-6)`` stepped after every batch (AdamW, as the reference)."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=T_max, eta_min=1e-6)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


@pytest.mark.parametrize("schedule", ["reference", "cosine"])
def test_schedule_is_the_references_cosine_stepped_per_batch(schedule, tmp_path):
    classes = DemoDataModule().classnames
    model = CLIPSVD(classnames=classes, backbone="tiny", dataset="demo", lr=0.01, schedule=schedule)
    record = RecordLR()
    fit(model, tmp_path, epochs=2, batches=2, callbacks=[record])
    assert model.trainer.global_step == 4
    # The oracle: torch's CosineAnnealingLR, T_max = max_epochs (reference) or all steps (cosine),
    # stepped after every batch.
    expected = cosine_oracle(0.01, T_max=2 if schedule == "reference" else 4, steps=4)
    torch.testing.assert_close(torch.tensor(record.lrs, dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    if schedule == "reference":  # period 2 x max_epochs steps: at eta_min after 2 steps, climbing back after
        assert record.lrs[2] == pytest.approx(1e-6) and record.lrs[3] > record.lrs[2]
        assert cosine_lr_factor(4, 2, 0.01, 1e-6) == pytest.approx(1.0)
    else:
        assert record.lrs == sorted(record.lrs, reverse=True)
    optimizer = model.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)
    assert optimizer.defaults["weight_decay"] == 0.0


def test_an_epoch_keeps_its_last_partial_batch_and_the_cosine_follows_every_batch(tmp_path):
    """Issue 21.4: CLIP-SVD's own loader keeps the last partial batch (Dassl's, used by the other
    methods, drops it): the method tells the datamodule. 20 images at batch 8 are 3 steps an epoch,
    and the per-batch cosine (T_max = epochs) runs over those 3 steps per epoch."""
    data = DemoDataModule(num_shots=18, batch_size=32, num_workers=0)  # 4 classes x 18 = 72 images
    assert len(data.train_dataloader()) == 2  # Dassl's rule (the datamodule's default)
    data.use_batch_rule(drop_last=False)
    assert len(data.train_dataloader()) == 3
    assert PromptTrainer.drop_last_batch is True and CLIPSVD.drop_last_batch is False

    model = CLIPSVD(classnames=DemoDataModule().classnames, backbone="tiny", dataset="demo", lr=0.01)
    assert model.hparams.drop_last_batch is False
    record = RecordLR()
    data = DemoDataModule(num_shots=5, batch_size=8, num_workers=0)  # 20 images: 8 + 8 + 4
    trainer = Trainer(max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[record])
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 6 and data.drop_last_batch is False
    expected = cosine_oracle(0.01, T_max=2, steps=6)  # the reference's: T_max = epochs, stepped per batch
    torch.testing.assert_close(torch.tensor(record.lrs, dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# The shipped config on the demo.
def test_dpt_fit_test_predict_with_the_shipped_config(tmp_path, tiny_demo_backbone):
    from dpt_lightning.cli import build_cli

    config = REPO / "trainers" / "clip_svd.yaml"
    assert yaml.safe_load(config.read_text())["model"]["init_args"]["backbone"].startswith("hf-hub:")
    common = ["--config", str(config), "--config", str(REPO / "datasets/demo.yaml"), "--trainer.max_epochs", "1",
              "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false", "--data.num_workers", "0"]
    cli = build_cli(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "fit")])
    assert cli.trainer.global_step == 2
    fitted = float(cli.trainer.callback_metrics["test_acc"])
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "hparams.yaml").read_text())
    assert saved["backbone"] == "tiny-demo" and saved["lr"] == 0.006 and saved["template"] == "a photo of a {}."
    assert saved["layers"] == "all" and saved["drop_last_batch"] is False

    (ckpt,) = (tmp_path / "fit").glob("lightning_logs/version_*/checkpoints/last.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    trainable = {n: p for n, p in cli.model.named_parameters() if p.requires_grad}
    assert sorted(state) == sorted(trainable) and all(TRAINABLE.fullmatch(k) for k in state)
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in trainable.values())
    for name, value in state.items():
        assert torch.equal(value, trainable[name].detach().cpu())

    tested = build_cli(["test", *common, "--trainer.default_root_dir", str(tmp_path / "test"), "--ckpt_path", str(ckpt)])
    assert float(tested.trainer.callback_metrics["test_acc"]) == fitted

    out = tmp_path / "predictions.csv"
    build_cli(["predict", *common, "--trainer.default_root_dir", str(tmp_path / "test"), "--ckpt_path", str(ckpt),
               "--predictions.path", str(out)])
    table = pd.read_csv(out)
    accuracy = (table["prediction"] == table["path"].map(lambda p: Path(p).parent.name)).mean()
    assert accuracy == pytest.approx(fitted, abs=1e-6)
