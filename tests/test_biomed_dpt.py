"""Biomed-DPT (and BiomedCoOp beside it) on the tiny model: the mathematics of the method.

Checked: N_CTX per dataset and the word pieces the context covers; the per-dataset lambdas (and
BiomedCoOp's settings) for both protocols, recorded in the hyper-parameters; the losses against a
hand computation; the KL term vanishing when student and teacher agree; the teacher encoded once per
fit and never stored; gradients on the context only; the zero tokens at the input of every ViT
block; and ``dpt fit`` with the shipped configs on the demo and on fake copies of all 11 datasets.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from fakedata import write_fake_benchmark
from lightning.pytorch import Trainer

from dpt_lightning import BiomedCLIP, BiomedCoOp, BiomedDPT, DemoDataModule
from dpt_lightning.data.facts import BENCHMARK_DATASETS, dataset_facts
from dpt_lightning.descriptions import DescriptionBankError, load_bank
from dpt_lightning.prompts import reference_n_ctx
from dpt_lightning.methods.biomed_coop import BIOMED_COOP_SETTINGS, keep_sentences, sentence_scores
from dpt_lightning.methods.biomed_coop import DEFAULT_SETTINGS as COOP_DEFAULTS
from dpt_lightning.methods.biomed_dpt import BIOMED_DPT_LAMBDAS, DEFAULT_LAMBDAS
from dpt_lightning.methods.shared import resolve_settings

REPO = Path(__file__).resolve().parents[1]
DEMO = ["circle", "cross", "square", "stripes"]
SIZE = 160  # the tiny model's image size

#: datasets.md: N_CTX of each clinical template (the reference's word count of CTX_INIT).
N_CTX = {"BTMRI": 5, "BUSI": 5, "CHMNIST": 5, "COVID_19": 6, "CTKidney": 5, "DermaMNIST": 5, "KneeXray": 6,
         "Kvasir": 5, "LungColon": 5, "OCTMNIST": 5, "RETINA": 4}
#: methods.md: (lambda_L1, lambda_KL) few-shot and base-to-novel, written out from the spec.
LAMBDAS = {
    "BTMRI": ((12.5, 0.25), (25, 0.5)), "BUSI": ((18.75, 1), (18.75, 0.65)), "CHMNIST": ((12.5, 0.5), (23, 0.9)),
    "COVID_19": ((65, 2.5), (18.75, 0.5)), "CTKidney": ((18.75, 0.25), (25, 1)), "DermaMNIST": ((25, 20), (11.5, 5)),
    "KneeXray": ((25, 10), (23, 4.5)), "Kvasir": ((25, 0.75), (10, 0.5)), "LungColon": ((12.5, 0.25), (9.5, 0.3)),
    "OCTMNIST": ((12.5, 0.25), (12.5, 0.5)), "RETINA": ((10.5, 0.25), (22, 0.4)),
}


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def dpt_model(**kwargs) -> BiomedDPT:
    return BiomedDPT(**{"classnames": DEMO, "backbone": "tiny", "dataset": "demo", **kwargs})


def hand_teacher(backbone: BiomedCLIP, sentences: list[list[str]]) -> torch.Tensor:
    """g_c: each sentence encoded alone, L2-normalised, averaged, re-normalised."""
    rows = []
    for group in sentences:
        feats = torch.stack([backbone.encode_sentences([s])[0] for s in group])
        mean = feats.mean(0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def hand_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """sum over batch and classes of p_T (log p_T - log p_S), divided by B * C."""
    log_s = student - student.logsumexp(1, keepdim=True)
    log_t = teacher - teacher.logsumexp(1, keepdim=True)
    return (log_t.exp() * (log_t - log_s)).sum() / student.numel()


def hand_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    log_p = logits - logits.logsumexp(1, keepdim=True)
    return -log_p[torch.arange(len(labels)), labels].mean()


# ------------------------------------------------------------------------------------------------
# Student: template, N_CTX, context.
def test_n_ctx_of_every_clinical_template_matches_the_table():
    assert {name: reference_n_ctx(f.template) for name, f in BENCHMARK_DATASETS.items()} == N_CTX


@pytest.mark.parametrize("name, pieces", [("COVID_19", ["a", "chest", "x", "-", "ray", "photo"]),
                                          ("KneeXray", ["a", "frontal", "x", "-", "ray", "photo"])])
def test_x_ray_templates_give_6_context_vectors_over_the_first_6_word_pieces(tiny, name, pieces):
    facts = dataset_facts(name)
    model = BiomedDPT(classnames=list(facts.classnames), backbone="tiny", dataset=name)
    assert model.hparams.template == facts.template and model.prompt.n_ctx == 6
    assert model.prompt.ctx.shape == (6, tiny.text_width)
    prefix_pieces = tiny.word_pieces(facts.template.split("{}")[0])
    assert prefix_pieces[:6] == pieces and len(prefix_pieces) == 8  # "X-ray" is 3 pieces: 2 words stay fixed
    ids = tiny.tokenize([facts.template.format(facts.classnames[0])])
    assert torch.equal(model.prompt.ctx.data, tiny.token_embedding(ids[0, 1:7]))
    assert torch.equal(model.prompt()[0, 7:], model.prompt.embeddings[0, 7:])  # "of a <class> ..." unchanged


def test_template_comes_from_the_dataset_or_must_be_given():
    assert dpt_model().hparams.template == "a photo of a {}."  # the demo's generic prompt
    own = dpt_model(dataset=None, template="a CT photo of a {} in the kidney.", descriptions="demo")
    assert own.prompt.n_ctx == 5
    with pytest.raises(ValueError, match="model.template"):
        dpt_model(dataset=None, descriptions="demo")


def test_only_the_context_trains_and_bert_dropout_is_on(tiny):
    model = dpt_model()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt.ctx"]
    assert model.prompt.ctx.shape == (reference_n_ctx(model.hparams.template), tiny.text_width)
    assert model.backbone_dropout is True
    model.on_train_epoch_start()
    assert model.backbone.model.text.training
    x, y = images(2), torch.tensor([0, 3])
    f, t = model.encode_images(x), model.encode_classes()
    model.compute_loss(model.logits(f, t), y, f, t)["loss"].backward()
    assert model.prompt.ctx.grad is not None and model.prompt.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for name, p in model.named_parameters() if name != "prompt.ctx")
    assert "vision_zeros" not in dict(model.named_parameters())


# ------------------------------------------------------------------------------------------------
# Lambdas per dataset and protocol.
def test_lambda_table_is_the_papers_for_both_protocols():
    for name, rows in LAMBDAS.items():
        for protocol, expected in zip(("fewshot", "base2novel"), rows):
            for spelling in (name, name.lower()):
                got = resolve_settings({"lambda_l1": None, "lambda_kl": None}, BIOMED_DPT_LAMBDAS, DEFAULT_LAMBDAS,
                                       spelling, protocol, "BiomedDPT")
                assert (got["lambda_l1"], got["lambda_kl"]) == expected, (name, protocol)


@pytest.mark.parametrize("name, protocol", [("COVID_19", "fewshot"), ("DermaMNIST", "base2novel")])
def test_the_model_records_the_lambdas_it_uses(name, protocol):
    expected = LAMBDAS[name][protocol == "base2novel"]
    model = BiomedDPT(classnames=list(BENCHMARK_DATASETS[name].classnames), backbone="tiny", dataset=name,
                      protocol=protocol)
    assert (model.hparams.lambda_l1, model.hparams.lambda_kl) == expected
    assert (model.hparams_initial.lambda_l1, model.hparams_initial.lambda_kl) == expected  # -> hparams.yaml


def test_lambdas_given_win_defaults_documented_and_negatives_refused():
    hp = dpt_model(lambda_l1=3.0).hparams  # the demo is not in the table: its kl is the default
    assert (hp.lambda_l1, hp.lambda_kl) == (3.0, 0.25) and DEFAULT_LAMBDAS == (12.5, 0.25)
    with pytest.raises(ValueError, match="model.lambda_kl=-1"):
        dpt_model(lambda_kl=-1.0)
    with pytest.raises(ValueError, match="model.protocol"):
        dpt_model(protocol="zeroshot")


# ------------------------------------------------------------------------------------------------
# Teacher and loss.
def test_loss_equals_a_hand_computation(tiny):
    torch.manual_seed(0)
    model = dpt_model(lambda_l1=2.0, lambda_kl=3.0)
    with torch.no_grad():
        model.prompt.ctx.add_(0.3 * torch.randn_like(model.prompt.ctx))  # student != initialisation
    x, y = images(3), torch.tensor([0, 2, 3])
    f, t = model.encode_images(x), model.encode_classes()
    z = model.logits(f, t)
    parts = model.compute_loss(z, y, f, t)

    g = hand_teacher(tiny, [load_bank("demo")[name] for name in DEMO])
    torch.testing.assert_close(model.teacher_features, g, atol=1e-5, rtol=0)
    s = tiny.model.logit_scale.exp()
    torch.testing.assert_close(z, s * f @ t.T)
    z_teacher = s * f @ g.T
    ce, l1, kl = hand_ce(z, y), (t - g).abs().sum() / t.numel(), hand_kl(z, z_teacher)
    torch.testing.assert_close(parts["ce"], ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts["l1"], l1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(parts["kl"], kl, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(parts["loss"], ce + 2.0 * l1 + 3.0 * kl, atol=1e-5, rtol=1e-5)
    assert kl > 0 and l1 > 0


def test_kl_and_l1_vanish_when_student_equals_teacher():
    model = dpt_model()
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    f = model.encode_images(x)
    g = model.teacher_text_features()
    parts = model.compute_loss(model.logits(f, g), y, f, g)
    assert parts["kl"].abs() < 1e-7 and parts["l1"] == 0
    torch.testing.assert_close(parts["loss"], parts["ce"])


def test_inference_uses_the_student_only():
    model = dpt_model().eval()
    x = images(2)
    with torch.no_grad():
        expected = model.logits(model.encode_images(x), model.encode_classes())
        torch.testing.assert_close(model(x), expected)
    assert model.teacher_features is None  # never needed outside training


class CountingBackbone:
    """Counts the backbone's sentence-encoder calls (the teacher's only path)."""

    def __init__(self, monkeypatch):
        self.calls = {"encode_class_sentences": 0, "encode_sentences": 0}
        for name in self.calls:
            original = getattr(BiomedCLIP, name)
            monkeypatch.setattr(BiomedCLIP, name, self._counting(name, original))

    def _counting(self, name, original):
        def wrapper(backbone, *args, **kwargs):
            self.calls[name] += 1
            return original(backbone, *args, **kwargs)
        return wrapper


def test_teacher_is_encoded_once_per_fit_and_never_checkpointed(tmp_path, monkeypatch):
    counter = CountingBackbone(monkeypatch)
    model = dpt_model()
    assert counter.calls == {"encode_class_sentences": 0, "encode_sentences": 0}  # lazy: eval-only runs skip it
    data = DemoDataModule(num_shots=4, batch_size=4, num_workers=0)
    trainer = Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 4
    assert counter.calls == {"encode_class_sentences": 1, "encode_sentences": 1}
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False, map_location="cpu")
    assert list(state["state_dict"]) == ["prompt.ctx"]  # no teacher, no zero tokens, no backbone
    assert state["method_settings"]["lambda_l1"] == 12.5
    teacher = model.teacher_features.clone()
    reloaded = BiomedDPT.load_from_checkpoint(ckpt)
    assert torch.equal(reloaded.prompt.ctx, model.prompt.ctx)
    torch.testing.assert_close(reloaded.teacher_text_features(), teacher)  # rebuilt from the bank
    assert counter.calls["encode_class_sentences"] == 2


# ------------------------------------------------------------------------------------------------
# Vision: zero tokens at the input of every block.
def block_inputs(backbone: BiomedCLIP, encode) -> list[torch.Tensor]:
    """The hidden states entering each ViT block while ``encode()`` runs (forward pre-hooks)."""
    seen, handles = [], []
    for block in backbone.model.visual.trunk.blocks:
        handles.append(block.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach())))
    try:
        with torch.no_grad():
            encode()
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("mode, depth", [("replace", None), ("insert", None), ("replace", 1), ("off", None)])
def test_zero_tokens_sit_at_positions_1_to_4_before_blocks(mode, depth):
    model = dpt_model(vision_prompt=mode, vision_depth=depth)
    backbone, x = model.backbone, images(2)
    plain = block_inputs(backbone, lambda: backbone.encode_image(x))
    seen = block_inputs(backbone, lambda: model.encode_images(x))
    blocks = backbone.num_vision_blocks
    assert len(seen) == blocks == len(plain)
    prompted = 0 if mode == "off" else blocks if depth is None else depth
    length = plain[0].shape[1] + (4 if mode == "insert" else 0)
    for i, hidden in enumerate(seen):
        assert hidden.shape == (2, length, backbone.vision_width)
        zero = torch.equal(hidden[:, 1:5], torch.zeros_like(hidden[:, 1:5]))
        assert zero == (i < prompted), f"block {i}"
    assert torch.equal(seen[0][:, 0], plain[0][:, 0])  # CLS untouched
    if mode == "insert":
        assert torch.equal(seen[0][:, 5:], plain[0][:, 1:])  # no patch lost
    else:
        assert torch.equal(seen[0][:, 5:], plain[0][:, 5:])  # patches 1..4 replaced (or, off, kept)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt.ctx"]  # zeros: a buffer
    key = "plain" if mode == "off" else f"zero-tokens:{mode}:4x{prompted}"
    assert model.image_path_key() == key  # the evaluation feature cache tells the image paths apart


def test_bad_vision_settings_are_clear_errors():
    with pytest.raises(ValueError, match="model.vision_prompt"):
        dpt_model(vision_prompt="deep")
    with pytest.raises(ValueError, match="model.vision_depth"):
        dpt_model(vision_depth=99)


def test_a_bank_missing_classes_names_every_missing_class(tmp_path):
    bank = tmp_path / "bank.json"
    bank.write_text('{"Circle": ["a red circle"]}')
    with pytest.raises(DescriptionBankError, match=r"3 class\(es\): \['cross', 'square', 'stripes'\]"):
        dpt_model(descriptions=str(bank))
    with pytest.raises(DescriptionBankError, match="no dataset name"):
        dpt_model(dataset=None, template="a photo of a {}.")


# ------------------------------------------------------------------------------------------------
# BiomedCoOp.
def test_biomedcoop_settings_per_dataset_and_protocol():
    def settings(dataset, protocol="fewshot"):
        got = resolve_settings({"lambda_sccm": None, "lambda_kdsp": None, "tau": None}, BIOMED_COOP_SETTINGS,
                               COOP_DEFAULTS, dataset, protocol, "BiomedCoOp")
        return got["lambda_sccm"], got["lambda_kdsp"], got["tau"]

    assert settings("BTMRI") == (0.5, 0.25, 1.5)
    assert settings("kneexray") == (5.0, 20.0, 1.75)
    assert settings("RETINA", "base2novel") == (5.0, 1.0, 2.0)
    assert settings("BUSI", "base2novel") == (1.0, 1.0, 1.5)  # not in the reference: its code's defaults
    assert settings("demo") == settings(None) == COOP_DEFAULTS == (1.0, 1.0, 1.5)
    assert all(set(rows) <= {"fewshot", "base2novel"} for rows in BIOMED_COOP_SETTINGS.values())
    assert set(BIOMED_COOP_SETTINGS) == set(BENCHMARK_DATASETS)
    hp = BiomedCoOp(classnames=list(BENCHMARK_DATASETS["CHMNIST"].classnames), backbone="tiny", dataset="CHMNIST",
                    protocol="base2novel", tau=0.5).hparams
    assert (hp.lambda_sccm, hp.lambda_kdsp, hp.tau) == (10.0, 1.0, 0.5)
    assert (hp.template, hp.descriptions, hp.outlier_rule) == ("a photo of a {}.", "auto", "reference")


def test_biomedcoop_scores_and_pruning_match_the_reference_formulas():
    torch.manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    e = torch.nn.functional.normalize(torch.randn(3, 7, 8), dim=-1)
    scores = sentence_scores(f, e, 10.0)
    loop = torch.stack([(10.0 * f @ e[:, i].T).max(dim=1).values.mean() for i in range(7)])
    torch.testing.assert_close(scores, loop)

    scores = torch.tensor([1.0, 1.1, 0.9, 1.05, 3.0, 0.95, -1.0])
    med = scores.median()
    z = (scores - med) / (scores - med).abs().median()  # the reference: robust z, then standardised
    reference = ((z - z.mean()) / z.std()).abs() <= 1.5
    assert torch.equal(keep_sentences(scores, 1.5, "reference"), reference)
    assert keep_sentences(scores, 1.5, "reference").tolist() == [True] * 4 + [False, True, False]
    assert torch.equal(keep_sentences(scores, 1.5, "robust"), z.abs() <= 1.5)
    assert keep_sentences(torch.ones(5), 1.5).all()  # degenerate (reference: NaN): keep all


def test_biomedcoop_loss_equals_a_hand_computation(tiny):
    torch.manual_seed(1)
    model = BiomedCoOp(classnames=DEMO, backbone="tiny", dataset="demo", lambda_sccm=2.0, lambda_kdsp=3.0, tau=0.8)
    assert model.prompt.n_ctx == 4 and model.hparams.template == "a photo of a {}."
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt.ctx"]
    with torch.no_grad():
        model.prompt.ctx.add_(0.3 * torch.randn_like(model.prompt.ctx))
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    f, t = model.encode_images(x), model.encode_classes()
    torch.testing.assert_close(f, torch.nn.functional.normalize(tiny.encode_image(x), dim=-1))  # unprompted
    z = model.logits(f, t)
    parts = model.compute_loss(z, y, f, t)

    bank = load_bank("demo")
    e = torch.stack([torch.stack([tiny.encode_sentences([s])[0] for s in bank[c]]) for c in DEMO])  # (C, P, D)
    s = tiny.model.logit_scale.exp()
    scores = torch.tensor([(s * f @ e[:, i].T).max(1).values.mean() for i in range(e.shape[1])])
    z_scores = (scores - scores.mean()) / scores.std()
    keep = z_scores.abs() <= 0.8
    assert 0 < keep.sum() < len(keep)  # the pruning does something here
    teacher = e[:, keep].mean(1)
    teacher = teacher / teacher.norm(dim=-1, keepdim=True)
    everything = e.mean(1)
    everything = everything / everything.norm(dim=-1, keepdim=True)
    ce, sccm, kdsp = hand_ce(z, y), ((t - everything) ** 2).mean(), hand_kl(z, s * f @ teacher.T)
    torch.testing.assert_close(parts["ce"], ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts["sccm"], sccm, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(parts["kdsp"], kdsp, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(parts["loss"], ce + 2.0 * sccm + 3.0 * kdsp, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# The dpt command with the shipped configs.
def fit(tmp_path: Path, trainer_yaml: str, data_args: list[str], *extra: str):
    from dpt_lightning.cli import build_cli

    return build_cli([
        "fit", "--config", str(REPO / "trainers" / trainer_yaml), *data_args, "--model.backbone", "tiny",
        "--data.num_workers", "0", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
        "--trainer.limit_test_batches", "1", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra,
    ])


def saved_hparams(cli) -> dict:
    return yaml.safe_load((Path(cli.trainer.log_dir) / "hparams.yaml").read_text())


@pytest.mark.parametrize("trainer_yaml, parts", [("biomed_dpt.yaml", ("ce", "l1", "kl")),
                                                 ("biomed_coop.yaml", ("ce", "sccm", "kdsp"))])
def test_dpt_fit_on_the_demo_with_the_shipped_config(tmp_path, trainer_yaml, parts):
    cli = fit(tmp_path, trainer_yaml, ["--config", str(REPO / "datasets/demo.yaml")],
              "--trainer.log_every_n_steps", "1")
    model = cli.model
    assert model.hparams.lr == 0.0025 and cli.trainer.global_step == 1
    logged = pd.read_csv(Path(cli.trainer.log_dir) / "metrics.csv").columns
    assert {"train_loss", *(f"train_loss_{p}" for p in parts)} <= set(logged)
    assert "test_acc" in cli.trainer.callback_metrics
    saved = saved_hparams(cli)
    if trainer_yaml == "biomed_dpt.yaml":
        assert (saved["lambda_l1"], saved["lambda_kl"], saved["template"]) == (12.5, 0.25, "a photo of a {}.")
    else:
        assert (saved["lambda_sccm"], saved["lambda_kdsp"], saved["tau"]) == (1.0, 1.0, 1.5)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return write_fake_benchmark(tmp_path_factory.mktemp("benchmark"))


@pytest.mark.parametrize("name, subsample", [(n, "all") for n in LAMBDAS] + [("COVID_19", "base")])
def test_dpt_fit_runs_for_every_dataset_with_its_own_lambdas(fake_root, tmp_path, name, subsample):
    facts = dataset_facts(name)
    cli = fit(tmp_path, "biomed_dpt.yaml", ["--config", str(REPO / f"datasets/{facts.key}.yaml"),
                                            "--data.root", str(fake_root), "--data.num_shots", "2",
                                            "--data.subsample", subsample])
    expected = LAMBDAS[name][0 if subsample == "all" else 1]
    saved = saved_hparams(cli)
    assert (saved["lambda_l1"], saved["lambda_kl"]) == expected
    assert saved["template"] == facts.template
    assert saved["protocol"] == ("fewshot" if subsample == "all" else "base2novel")
    assert cli.model.prompt.n_ctx == N_CTX[name] and cli.datamodule.batch_size == 4
    assert cli.trainer.global_step == 1 and "test_acc" in cli.trainer.callback_metrics
