"""CoCoOp, KgCoOp and ProGrad on the tiny model: the mathematics of each baseline.

Checked: CoCoOp with a zeroed meta-net equals CoOp, its per-image classifier against a hand
computation, the meta-net's widths and which parameters learn; KgCoOp with weight 0 equals CoOp
(loss and gradients), its term against a hand computation (and the ||t - h||^2 / 2 relation);
ProGrad's distillation term by hand, its projection on constructed vectors and, through a real
Lightning step, the update applied (projected where the two gradients conflict, g_ce unchanged where
they do not), the reference's self-teacher, bf16-mixed and exact resume; the reference's
per-dataset settings recorded in the hyper-parameters; and ``dpt fit`` with each shipped config on
the demo.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from dpt_lightning import CoCoOp, CoOp, DemoDataModule, KgCoOp, ProGrad
from dpt_lightning.data.facts import BENCHMARK_DATASETS
from dpt_lightning.methods.kgcoop import KGCOOP_WEIGHTS
from dpt_lightning.methods.prograd import PROGRAD_TEMPERATURES, project_gradient, prograd_kl

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "cross", "square"]

#: The reference configs, written out: KgCoOp's W (configs/trainers/KgCoOp/few_shot/<dataset>.yaml)
#: and ProGrad's T (configs/trainers/ProGrad/few_shot/<dataset>.yaml).
REFERENCE_W = {"BTMRI": 2.0, "BUSI": 10.0, "CHMNIST": 1.0, "COVID_19": 1.0, "CTKidney": 8.0, "DermaMNIST": 8.0,
               "KneeXray": 4.0, "Kvasir": 6.0, "LungColon": 8.0, "OCTMNIST": 1.0, "RETINA": 1.0}
REFERENCE_T = {"BTMRI": 2.0, "BUSI": 0.25, "DermaMNIST": 4.0}  # the others: 1.0


def build(cls, **kwargs):
    torch.manual_seed(0)
    return cls(**{"classnames": CLASSES, "backbone": "tiny", "dataset": "demo", **kwargs})


def images(tiny, n: int = 3, seed: int = 0) -> torch.Tensor:
    size = tiny.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def training_mode(model):
    """Train mode as the fit sets it (backbone in eval mode for these three methods)."""
    model.on_train_epoch_start()
    assert not model.backbone.model.text.training
    return model


def perturb(model, seed: int = 1, scale: float = 0.3):
    """Move the context away from its initialisation (CTX_INIT is the zero-shot prompt)."""
    with torch.no_grad():
        ctx = model.prompt.ctx
        ctx.add_(scale * torch.randn(ctx.shape, generator=torch.Generator().manual_seed(seed)))
    return model


def hand_ce(logits, labels):
    log_p = logits - logits.logsumexp(1, keepdim=True)
    return -log_p[torch.arange(len(labels)), labels].mean()


def step_parts(model, x, y):
    """Logits and loss parts of one training step, as ``training_step`` computes them."""
    f = model.encode_images(x)
    t = model.text_features(f)
    z = model.logits(f, t)
    return f, t, z, model.compute_loss(z, y, f, t)


# ------------------------------------------------------------------------------------------------
# CoCoOp.
def test_cocoop_meta_net_widths_and_trainable_parameters(tiny):
    model = build(CoCoOp)
    assert CoCoOp.instance_conditioned and model.reference_backbone_dropout is False
    d, w = tiny.embed_dim, tiny.text_width
    linear1, relu, linear2 = model.meta_net
    assert (linear1.in_features, linear1.out_features) == (d, d // 16) and isinstance(relu, torch.nn.ReLU)
    assert (linear2.in_features, linear2.out_features) == (d // 16, w)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {"prompt.ctx", "meta_net.linear1.weight", "meta_net.linear1.bias",
                              "meta_net.linear2.weight", "meta_net.linear2.bias"}

    def count(embed_dim, text_width, n_ctx=4):
        hidden = embed_dim // 16
        return n_ctx * text_width + (embed_dim + 1) * hidden + (hidden + 1) * text_width

    assert sum(trainable.values()) == count(d, w)
    assert count(512, 768) == 44_832  # BiomedCLIP: 512 -> 32 -> 768 (the README's count)


def test_cocoop_with_a_zeroed_meta_net_equals_coop(tiny):
    coop, cocoop = build(CoOp), build(CoCoOp)
    perturb(coop)
    cocoop.load_state_dict(coop.state_dict(), strict=False)
    with torch.no_grad():
        cocoop.meta_net.linear2.weight.zero_()
        cocoop.meta_net.linear2.bias.zero_()
    x, y = images(tiny), torch.tensor([0, 1, 2])
    for model in (coop, cocoop):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(cocoop(x), coop(x), rtol=1e-5, atol=1e-5)
    losses = []
    for model in (coop, cocoop):
        training_mode(model)
        *_, parts = step_parts(model, x, y)
        parts["loss"].backward()
        losses.append(parts["loss"])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cocoop.prompt.ctx.grad, coop.prompt.ctx.grad, rtol=1e-4, atol=1e-7)
    # The zeroed output layer still learns (its bias gets the gradient of the shift); the first layer
    # gets none through zero weights: the gradients follow the network, not a mask.
    assert cocoop.meta_net.linear2.bias.grad.abs().sum() > 0
    assert cocoop.meta_net.linear1.weight.grad.abs().sum() == 0 == cocoop.meta_net.linear1.bias.grad.abs().sum()
    assert all(p.grad is None for p in cocoop.backbone.parameters())


def test_cocoop_logits_and_loss_equal_a_hand_computation(tiny):
    model = training_mode(perturb(build(CoCoOp)))
    with torch.no_grad():
        model.meta_net.linear1.bias.fill_(0.5)  # the tiny meta-net has 2 hidden units: keep them active
    x, y = images(tiny, 2), torch.tensor([2, 0])
    f, t, z, parts = step_parts(model, x, y)
    assert t.shape == (2, len(CLASSES), tiny.embed_dim)

    net = model.meta_net
    prompt = model.prompt
    s = tiny.model.logit_scale.exp()
    with torch.no_grad():
        plain = F.normalize(tiny.encode_image(x), dim=-1)
        torch.testing.assert_close(f, plain)  # CoCoOp does not touch the image path
        rows = []
        for b in range(2):
            hidden = torch.relu(net.linear1.weight @ plain[b] + net.linear1.bias)
            shift = net.linear2.weight @ hidden + net.linear2.bias
            e = prompt.embeddings.clone()
            e[:, 1:1 + prompt.n_ctx] = prompt.ctx + shift  # every context vector, every class
            text = F.normalize(tiny.encode_text_embeddings(e, prompt.attention_mask), dim=-1)
            rows.append(s * text @ plain[b])
        logits = torch.stack(rows)
    torch.testing.assert_close(z, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts["loss"], hand_ce(logits, y), rtol=1e-5, atol=1e-5)
    parts["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())
    assert all(p.grad is None for p in model.backbone.parameters())


# ------------------------------------------------------------------------------------------------
# KgCoOp.
def test_kgcoop_with_weight_zero_equals_coop(tiny):
    coop, kg = perturb(build(CoOp)), perturb(build(KgCoOp, lambda_kg=0.0))
    assert torch.equal(coop.prompt.ctx, kg.prompt.ctx)
    x, y = images(tiny), torch.tensor([0, 2, 1])
    losses = []
    for model in (coop, kg):
        training_mode(model)
        *_, parts = step_parts(model, x, y)
        parts["loss"].backward()
        losses.append(parts["loss"])
    assert torch.equal(losses[1], losses[0])
    assert torch.equal(kg.prompt.ctx.grad, coop.prompt.ctx.grad)


def test_kgcoop_loss_equals_a_hand_computation(tiny):
    model = training_mode(perturb(build(KgCoOp, lambda_kg=3.0)))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt.ctx"]
    assert model.prompt.n_ctx == 4 and model.reference_backbone_dropout is False
    x, y = images(tiny), torch.tensor([1, 1, 0])
    f, t, z, parts = step_parts(model, x, y)

    with torch.no_grad():
        hand = F.normalize(tiny.encode_sentences([f"a photo of a {name}." for name in CLASSES]), dim=-1)
    torch.testing.assert_close(model.hand_features, hand, rtol=0, atol=1e-6)
    cosines = (t * hand).sum(-1)
    kg = 1 - cosines.double().mean()
    # The tiny model's class features are nearly parallel (kg ~ 3e-5): compare at float32's resolution.
    torch.testing.assert_close(parts["kg"].double(), kg, rtol=0, atol=5e-7)
    torch.testing.assert_close(parts["kg"].double(), ((t - hand).double() ** 2).sum(-1).mean() / 2, rtol=0, atol=5e-7)
    torch.testing.assert_close(parts["ce"], hand_ce(z, y), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts["loss"], hand_ce(z, y) + 3.0 * kg.float(), rtol=1e-5, atol=1e-5)
    assert parts["kg"] > 1e-5

    parts["loss"].backward()
    with_kg = model.prompt.ctx.grad.clone()
    model.prompt.ctx.grad = None
    *_, again = step_parts(model, x, y)
    again["ce"].backward()
    ce_only = model.prompt.ctx.grad
    assert (with_kg - ce_only).norm() > 1e-3 * ce_only.norm()  # the term pulls the context
    assert all(p.grad is None for p in model.backbone.parameters())


def test_kgcoop_term_vanishes_at_initialisation():
    """The context starts as "a photo of a", the hand-crafted prompt: t = h, so the term is 0."""
    model = training_mode(build(KgCoOp))
    with torch.no_grad():
        t = model.encode_classes()
    assert abs(float(F.cosine_similarity(t, model.hand_features, dim=-1).mean()) - 1) < 1e-6


# ------------------------------------------------------------------------------------------------
# Per-dataset settings.
def test_per_dataset_settings_are_the_reference_configs_and_recorded():
    assert set(KGCOOP_WEIGHTS) == set(BENCHMARK_DATASETS) == set(PROGRAD_TEMPERATURES)
    for name, facts in BENCHMARK_DATASETS.items():
        classes = list(facts.classnames)
        for protocol in ("fewshot", "base2novel"):
            kg = KgCoOp(classnames=classes, backbone="tiny", dataset=name.lower(), protocol=protocol)
            expected = REFERENCE_W[name] if protocol == "fewshot" else 8.0
            assert kg.hparams.lambda_kg == kg.hparams_initial.lambda_kg == expected, (name, protocol)
            pg = ProGrad(classnames=classes, backbone="tiny", dataset=name, protocol=protocol)
            expected = REFERENCE_T.get(name, 1.0) if protocol == "fewshot" else 1.0
            assert pg.hparams.temperature == pg.hparams_initial.temperature == expected, (name, protocol)
            assert pg.hparams.projection_lambda == 1.0 and pg.hparams.teacher == "student"


def test_settings_given_win_and_other_data_get_the_documented_defaults():
    assert build(KgCoOp).hparams.lambda_kg == 1.0  # the reference train.py's W
    assert build(KgCoOp, protocol="base2novel").hparams.lambda_kg == 8.0  # its base-to-novel config
    assert build(KgCoOp, dataset="BUSI", lambda_kg=0.5).hparams.lambda_kg == 0.5
    assert build(ProGrad).hparams.temperature == 1.0
    assert build(ProGrad, dataset="DermaMNIST", temperature=3.0).hparams.temperature == 3.0
    with pytest.raises(ValueError, match="model.lambda_kg=-1"):
        build(KgCoOp, lambda_kg=-1.0)
    with pytest.raises(ValueError, match="model.temperature"):
        build(ProGrad, temperature=0.0)
    with pytest.raises(ValueError, match="model.teacher"):
        build(ProGrad, teacher="clip")
    with pytest.raises(ValueError, match="model.protocol"):
        build(KgCoOp, protocol="zeroshot")


# ------------------------------------------------------------------------------------------------
# ProGrad: the distillation term and the projection.
def test_prograd_kl_equals_the_reference_formula():
    torch.manual_seed(0)
    z_s, z_t, T = torch.randn(5, 4), torch.randn(5, 4), 2.0
    p_t = torch.softmax(z_t / T, dim=1)
    log_p_s = torch.log_softmax(z_s / T, dim=1)
    hand = (-(p_t * log_p_s).sum(1)).mean() * T * T
    torch.testing.assert_close(prograd_kl(z_s, z_t, T), hand)
    # It is T^2 KL(p_T || p_S) plus T^2 times the teacher's entropy: the KL's gradient.
    kl = (p_t * (p_t.log() - log_p_s)).sum(1).mean() * T * T
    entropy = (-(p_t * p_t.log()).sum(1)).mean() * T * T
    torch.testing.assert_close(prograd_kl(z_s, z_t, T), kl + entropy)


def test_projection_on_constructed_gradients():
    g_kl = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    conflict = torch.tensor([[-3.0, 1.0], [2.0, -1.0]])  # dot with g_kl = -3 - 2 = -5 < 0
    projected = project_gradient(conflict, g_kl)
    expected = conflict - (conflict * g_kl).sum() / (g_kl * g_kl).sum() * g_kl
    torch.testing.assert_close(projected, expected)
    torch.testing.assert_close(projected, torch.tensor([[-2.0, 1.0], [2.0, 1.0]]))
    assert (projected * g_kl).sum().abs() < 1e-6  # lambda 1: orthogonal to the guide
    half = project_gradient(conflict, g_kl, 0.5)
    torch.testing.assert_close(half, conflict - 0.5 * (conflict * g_kl).sum() / (g_kl * g_kl).sum() * g_kl)
    assert (half * g_kl).sum() < 0  # lambda < 1 keeps part of the conflict

    agree = torch.tensor([[3.0, -1.0], [0.5, 1.0]])  # dot = 3 + 2 > 0
    assert torch.equal(project_gradient(agree, g_kl), agree)
    assert torch.equal(project_gradient(conflict, torch.zeros_like(g_kl)), conflict)  # reference: NaN -> unchanged
    assert torch.equal(project_gradient(conflict, torch.full_like(g_kl, float("inf"))), conflict)


class Batches(DataLoader):
    """The same training batch, once per epoch."""

    def __init__(self, batch: dict):
        super().__init__([batch], batch_size=None)


def one_sgd_step(model, batch: dict, tmp_path, **trainer_kwargs) -> torch.Tensor:
    """The gradient Lightning applies in one plain SGD step (lr 1, no momentum or weight decay)."""
    before = model.prompt.ctx.detach().clone()
    trainer = Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      **trainer_kwargs)
    trainer.fit(model, train_dataloaders=Batches(batch))
    assert trainer.global_step == 1
    return before - model.prompt.ctx.detach()


def gradients(model, x: torch.Tensor, label_sets: list[list[int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """g_ce of the context for each label set, and g_kl, by plain autograd on images ``x``."""
    training_mode(model)
    f = model.encode_images(x)
    z = model.logits(f, model.encode_classes())
    ctx = model.prompt.ctx
    g_ce = [torch.autograd.grad(F.cross_entropy(z, torch.tensor(labels)), ctx, retain_graph=True)[0]
            for labels in label_sets]
    kl = prograd_kl(z, model.teacher_logits(z, f), model.hparams.temperature)
    g_kl, = torch.autograd.grad(kl, ctx)
    return g_ce, g_kl


def test_prograd_applies_the_projected_gradient_through_lightning(tiny, tmp_path):
    """Zero-shot teacher, a moved context: pick labels whose g_ce conflicts with g_kl and labels
    whose g_ce agrees, and compare the update Lightning applies with g_ce projected by hand."""
    lr = 1e3  # the tiny model's gradients are small: a large step keeps ctx_before - ctx_after exact enough
    settings = dict(teacher="zeroshot", temperature=2.0, lr=lr, momentum=0.0, weight_decay=0.0, warmup_epochs=0)
    x = images(tiny, 2, seed=3)
    label_sets = [[a, b] for a in range(len(CLASSES)) for b in range(len(CLASSES))]
    g_ces, g_kl = gradients(perturb(build(ProGrad, **settings)), x, label_sets)

    def cosine(g):
        return float((g * g_kl).sum() / (g.norm() * g_kl.norm()))

    cosines = [cosine(g) for g in g_ces]
    conflict, agree = min(range(len(cosines)), key=cosines.__getitem__), max(range(len(cosines)), key=cosines.__getitem__)
    assert cosines[conflict] < -0.05 and cosines[agree] > 0.05, cosines

    g_ce = g_ces[conflict]
    batch = {"image": x, "label": torch.tensor(label_sets[conflict]), "path": ["a", "b"]}
    applied = one_sgd_step(perturb(build(ProGrad, **settings)), batch, tmp_path) / lr
    expected = g_ce - float((g_ce * g_kl).sum() / (g_kl * g_kl).sum()) * g_kl
    assert abs(cosine(expected)) < 1e-5  # lambda 1: the conflicting component is gone
    torch.testing.assert_close(applied, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    assert cosine(applied) > -1e-3 and not torch.allclose(applied, g_ce, rtol=1e-2, atol=0)

    batch = {"image": x, "label": torch.tensor(label_sets[agree]), "path": ["a", "b"]}
    applied = one_sgd_step(perturb(build(ProGrad, **settings)), batch, tmp_path) / lr
    torch.testing.assert_close(applied, g_ces[agree], rtol=1e-3, atol=1e-3 * float(g_ces[agree].abs().max()))


def test_prograd_reference_teacher_is_the_student_itself(tiny):
    """Default (the reference's fp32 path): the teacher's prediction is the student's own, so the
    guide gradient is rounding noise and the logged term is T^2 times the student's entropy."""
    model = perturb(build(ProGrad, dataset="BTMRI", classnames=list(BENCHMARK_DATASETS["BTMRI"].classnames)))
    assert model.hparams.temperature == 2.0 and model.teacher_features is None
    x, y = images(tiny, 3), torch.tensor([0, 1, 2])
    (g_ce,), g_kl = gradients(model, x, [y.tolist()])
    # rounding noise: measured 1e-5 of the CE gradient on one machine, far below any real guide gradient
    assert float(g_kl.norm()) < 1e-3 * float(g_ce.norm())
    f, _, z, parts = step_parts(model, x, y)
    p = torch.softmax(z / 2.0, dim=1)
    torch.testing.assert_close(parts["kl"], (-(p * p.log()).sum(1)).mean() * 4.0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["loss"], hand_ce(z, y), rtol=1e-5, atol=1e-5)
    zero_shot = build(ProGrad, teacher="zeroshot", dataset="BTMRI",
                      classnames=list(BENCHMARK_DATASETS["BTMRI"].classnames))
    hand = F.normalize(tiny.encode_sentences([f"a photo of a {c}." for c in zero_shot.classnames]), dim=-1)
    torch.testing.assert_close(zero_shot.teacher_features, hand, rtol=0, atol=1e-6)


def test_prograd_only_the_context_learns_and_checkpoints_hold_it_alone(tmp_path):
    data = DemoDataModule(num_shots=2, batch_size=4, num_workers=0)
    model = build(ProGrad, teacher="zeroshot", classnames=data.classnames)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt.ctx"]
    trainer = Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert list(state["state_dict"]) == ["prompt.ctx"]  # no teacher, no backbone
    assert model._guide is None  # nothing pending between steps


def test_prograd_bf16_mixed_and_exact_resume(tmp_path):
    """bf16-mixed trains; resuming from the epoch-1 checkpoint of a 2-epoch fit ends exactly where
    the uninterrupted fit ends (momentum, schedule and data order restored; nothing of ProGrad's
    projection is carried between steps)."""
    classes = DemoDataModule().classnames

    def fit(root, ckpt=None, precision="32-true", epochs=2):
        model = build(ProGrad, teacher="zeroshot", classnames=classes, lr=0.05, warmup_epochs=0)
        every_epoch = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)
        trainer = Trainer(max_epochs=epochs, limit_train_batches=2, limit_val_batches=0, logger=False,
                          precision=precision, callbacks=[every_epoch], enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=root)
        trainer.fit(model, datamodule=DemoDataModule(num_shots=2, batch_size=4, num_workers=0), ckpt_path=ckpt)
        return model, trainer

    start = build(ProGrad, teacher="zeroshot", classnames=classes).prompt.ctx.detach().clone()
    low, _ = fit(tmp_path / "bf16", precision="bf16-mixed", epochs=1)
    assert torch.isfinite(low.prompt.ctx).all() and not torch.equal(low.prompt.ctx, start)

    whole, _ = fit(tmp_path / "whole")
    resumed, trainer = fit(tmp_path / "resumed", ckpt=str(tmp_path / "whole" / "epoch=0.ckpt"))
    assert trainer.global_step == 4
    torch.testing.assert_close(resumed.prompt.ctx, whole.prompt.ctx, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# The dpt command with the shipped configs, unchanged, on the demo.
@pytest.mark.parametrize("name, settings", [("cocoop", {"lr": 0.001}),
                                            ("kgcoop", {"lambda_kg": 1.0, "lr": 0.002}),
                                            ("prograd", {"temperature": 1.0, "teacher": "student", "lr": 0.002})])
def test_dpt_fit_on_the_demo_with_the_shipped_config(name, settings, tmp_path, tiny_demo_backbone):
    from dpt_lightning.cli import build_cli

    config = yaml.safe_load((REPO / "trainers" / f"{name}.yaml").read_text())
    cli = build_cli(["fit", "--config", str(REPO / "trainers" / f"{name}.yaml"), "--config",
                     str(REPO / "datasets/demo.yaml"), "--trainer.max_epochs", "1", "--trainer.limit_train_batches",
                     "2", "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                     "--trainer.enable_model_summary", "false"])
    assert cli.trainer.global_step == 2 and "test_acc" in cli.trainer.callback_metrics
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "hparams.yaml").read_text())
    assert {key: saved[key] for key in settings} == settings
    assert config["model"]["init_args"]["backbone"].startswith("hf-hub:")  # the demo config sets tiny-demo
    assert saved["backbone"] == "tiny-demo"
