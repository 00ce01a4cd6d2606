"""Reliability, round 3 (issue 27, items A-E, M, N, O and old checkpoints): no wrong number with
exit 0. Backbones and conversions checked for every file and tensor before use; one class-distinctness
rule; non-finite tensors refused at load, at export and in evaluation; untrained tests said; the
first hour's mistakes one message each; class names never silently replaced; checkpoints that cannot
show their backbone refused unless asked for."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from safetensors.torch import load_file, save_file

from dpt_lightning import CLIPSVD, CoOp, DemoDataModule, ImageFolderDataModule, LinearProbe, TipAdapterF, ZeroShot
from dpt_lightning.backbone import Backbone, BackboneLoadError
from dpt_lightning.backbone.convert import ConversionError, convert_hf_clip
from dpt_lightning.cli import main
from dpt_lightning.data import DataError
from dpt_lightning.demo.models import tiny_model_dir
from dpt_lightning.export import export_checkpoint, load_exported
from dpt_lightning.methods import CheckpointMismatchError
from dpt_lightning.methods.base import NonFiniteLogitsError
from dpt_lightning.methods.checkpoints import CheckpointReadError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["--config", str(ROOT / "datasets/demo.yaml")]
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_test_batches", "1",
         "--trainer.limit_predict_batches", "1", "--data.num_workers", "0", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--test_after_fit", "false", "--data.num_shots", "2"]
CLASSES = ["circle", "cross", "square", "stripes"]


def config(name: str) -> list[str]:
    return ["--config", str(ROOT / f"trainers/{name}.yaml"), *DEMO, *QUICK]


def fails(capsys, *args: str) -> str:
    """Run ``dpt`` in-process; it must exit with status 2 and one short message, no traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "dpt: error:" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    return err


@pytest.fixture(scope="module")
def coop_ckpt(tmp_path_factory, tiny_demo_backbone) -> Path:
    root = tmp_path_factory.mktemp("coop")
    main(["fit", *config("coop"), "--trainer.default_root_dir", str(root)])
    return next(root.glob("lightning_logs/version_*/checkpoints/last.ckpt"))


def own_checkpoint(model, **tensors) -> dict:
    """A checkpoint of ``model`` as it would save one, with ``tensors`` put in its state dict."""
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    return {"dpt_lightning": model.checkpoint_identity(), "state_dict": {**state, **tensors}}


def copy_of_tiny(folder: Path) -> Path:
    shutil.copytree(tiny_model_dir(), folder)
    return folder


# ---------------------------------------------------------- A. backbones: every file, before loading
def test_a_local_folder_without_tokenizer_files_is_refused_before_loading(tmp_path, monkeypatch):
    import open_clip

    folder = copy_of_tiny(tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    monkeypatch.setattr(open_clip, "create_model_from_pretrained", lambda *a, **k: pytest.fail("loaded anyway"))
    with pytest.raises(BackboneLoadError, match=r"no-tokenizer has no tokenizer files \(tokenizer.json, or vocab.txt"):
        Backbone(f"local-dir:{folder}")


def test_a_tokenizer_that_cannot_spell_ordinary_words_is_refused(tmp_path):
    """Tokenizer files present but holding only the special tokens: what a tokenizer built without
    its vocabulary looks like (every word [UNK], every class prompt the same)."""
    folder = copy_of_tiny(tmp_path / "five-tokens")
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(BackboneLoadError, match=r"its tokenizer has 5 tokens and spells 'a photo of a chest x-ray' as "
                                                r"\['\[UNK\]'"):
        Backbone(f"local-dir:{folder}")


def hub_repo(cache: Path, repo: str, files: dict[str, Path | str]) -> None:
    """``repo`` in a Hugging Face cache folder, as huggingface_hub lays it out."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copy(content, snapshot / name)
        else:
            (snapshot / name).write_text(content)


@pytest.mark.parametrize("dropped, named", [
    (("tokenizer.json", "vocab.txt"), r"test-org/tiny-bert: the tokenizer files"),
    (("config.json",), r"test-org/tiny-bert/config.json \(the text tower's config\)"),
    (("open_clip_pytorch_model.bin",), r"test-org/tiny-biomedclip: a weights file"),
])
def test_an_incomplete_hub_cache_offline_names_what_is_missing(tmp_path, monkeypatch, dropped, named):
    """An ``hf-hub:`` model in the Hugging Face cache, offline: every file its loader needs (the
    model's config and weights, its text tower's config and tokenizer files) is checked first."""
    import huggingface_hub.constants
    import open_clip

    import dpt_lightning.demo.models  # noqa: F401  registers the tiny image tower the config names

    tiny = tiny_model_dir()
    config = json.loads((tiny / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"].update(hf_model_name="test-org/tiny-bert", hf_tokenizer_name="test-org/tiny-bert")
    model_files = {"open_clip_config.json": json.dumps(config),
                   "open_clip_pytorch_model.bin": tiny / "open_clip_pytorch_model.bin"}
    text_files = {name: tiny / name for name in ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json")}
    complete = tmp_path / "complete"
    hub_repo(complete, "test-org/tiny-biomedclip", model_files)
    hub_repo(complete, "test-org/tiny-bert", text_files)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(complete))
    assert Backbone("hf-hub:test-org/tiny-biomedclip").word_pieces("a chest x-ray") == ["a", "chest", "x", "-", "ray"]

    partial = tmp_path / "partial"
    hub_repo(partial, "test-org/tiny-biomedclip", {k: v for k, v in model_files.items() if k not in dropped})
    hub_repo(partial, "test-org/tiny-bert", {k: v for k, v in text_files.items() if k not in dropped})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(partial))
    monkeypatch.setattr(open_clip, "create_model_from_pretrained", lambda *a, **k: pytest.fail("loaded anyway"))
    with pytest.raises(BackboneLoadError, match=rf"not complete in the Hugging Face cache \(it lacks {named}.*"
                                                r"HF_HUB_OFFLINE is set.*local-dir"):
        Backbone("hf-hub:test-org/tiny-biomedclip")


# ------------------------------------------------ B. conversion: the source's own tensors, or nothing
@pytest.fixture(scope="module")
def hf_source(tmp_path_factory) -> Path:
    from test_backbone_clip import tiny_hf_clip

    folder = tmp_path_factory.mktemp("hf-clip-source") / "model"
    tiny_hf_clip(folder)
    return folder


def source_copy(hf_source: Path, folder: Path, drop=lambda name: False) -> Path:
    """A copy of the transformers source without the tensors ``drop`` selects."""
    shutil.copytree(hf_source, folder)
    weights = folder / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if not drop(k)}, weights, metadata={"format": "pt"})
    return folder


def test_conversion_refuses_a_source_missing_tensors(hf_source, tmp_path, monkeypatch):
    """transformers fills missing tensors randomly; the conversion used to convert (and cache) them,
    its check comparing the random model with itself. Now every tensor the target needs must be
    stored in the source, and nothing is written or cached otherwise."""
    monkeypatch.setenv("DPT_CACHE_DIR", str(tmp_path / "cache"))
    source = source_copy(hf_source, tmp_path / "no-vision",
                         lambda k: k.startswith("vision_model.") or k in ("text_projection.weight", "logit_scale"))
    with pytest.raises(ConversionError, match=r"its weights lack \d+ of the \d+ tensors the converted model needs: "
                                              r"text_projection.weight, logit_scale, vision_model.\* \(\d+ tensors\)"):
        convert_hf_clip(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(BackboneLoadError, match=r"hf-clip:.*lack"):
        Backbone(f"hf-clip:{source}")
    assert not list((tmp_path / "cache").glob("hf-clip-*"))
    one = source_copy(hf_source, tmp_path / "no-logit-scale", lambda k: k == "logit_scale")
    with pytest.raises(ConversionError, match=r"lack 1 of the \d+ tensors the converted model needs: logit_scale;"):
        convert_hf_clip(one, tmp_path / "out")


def test_a_broken_source_is_one_message_naming_it(hf_source, tmp_path):
    from transformers import BertConfig

    from dpt_lightning.backbone.__main__ import main as backbone_main

    truncated = source_copy(hf_source, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ConversionError, match=rf"cannot convert {truncated} .*model.safetensors cannot be read"):
        convert_hf_clip(truncated, tmp_path / "out")
    no_config = source_copy(hf_source, tmp_path / "no-config")
    (no_config / "config.json").unlink()
    with pytest.raises(ConversionError, match=rf"cannot convert {no_config} .*it has no config.json"):
        convert_hf_clip(no_config, tmp_path / "out")
    bert = source_copy(hf_source, tmp_path / "bert")
    BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    with pytest.raises(ConversionError, match=rf"cannot convert {bert} .*describes a 'bert' model, not a "
                                              "transformers CLIPModel"):
        convert_hf_clip(bert, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert backbone_main(["convert-hf-clip", str(bert), str(tmp_path / "out")]) == 1


# --------------------------------------------------------- O. hf-clip: without its tokenizer files
def test_hf_clip_without_tokenizer_files_says_what_is_missing(hf_source, tmp_path):
    source = source_copy(hf_source, tmp_path / "no-tokenizer")
    for f in source.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            f.unlink()
    with pytest.raises(ConversionError, match="it has no tokenizer files: the folder needs vocab.json and merges.txt"):
        convert_hf_clip(source, tmp_path / "out")


# ----------------------------------------------------------------- C. one class-distinctness rule
def test_classes_with_identical_texts_are_an_error_naming_both(tmp_path):
    with pytest.raises(ValueError, match=r"model.template: the texts of classes 'circle' and 'cross' are the same text "
                                         r"\('a photo'\).*a template needs '\{\}'"):
        ZeroShot(classnames=["circle", "cross"], backbone="tiny", template="a photo")
    unspellable = ["опухоль", "норма"]  # the tiny vocabulary has no Cyrillic: both names read [UNK]
    for method in (ZeroShot, CoOp):
        with pytest.raises(ValueError, match=r"classes 'опухоль' and 'норма' are identical once tokenized.*cannot "
                                             "spell the class names"):
            method(classnames=unspellable, backbone="tiny")
    bank = tmp_path / "bank.json"
    bank.write_text(json.dumps({"circle": ["a round shape.", "a ring."], "cross": ["a ring.", "a round shape."]}))
    with pytest.raises(ValueError, match=r"model.descriptions: the texts of classes 'circle' and 'cross' are the same"):
        ZeroShot(classnames=["circle", "cross"], backbone="tiny", descriptions=str(bank))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ZeroShot(classnames=["circle", "cross"], backbone="tiny")  # distinct classes: not a word


def test_image_folders_that_differ_only_in_case_are_refused(tmp_path):
    from PIL import Image

    for name in ("circle", "Circle", "cross"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    with pytest.raises(DataError, match=r"class folders \['Circle', 'circle'\] are one class for the model"):
        ImageFolderDataModule(root=str(tmp_path))
    shutil.rmtree(tmp_path / "Circle")
    (tmp_path / "normal_brain").mkdir()
    (tmp_path / "normal brain").mkdir()
    with pytest.raises(DataError, match=r"\['normal brain', 'normal_brain'\] are one class"):
        ImageFolderDataModule(root=str(tmp_path))


# ------------------------------------------------------------------------ D. non-finite tensors
def test_a_nan_checkpoint_is_refused_at_load_and_at_export(coop_ckpt, tmp_path, capsys):
    state = torch.load(coop_ckpt, weights_only=True)
    state["state_dict"]["prompt.ctx"][0, 0] = float("nan")
    poisoned = tmp_path / "nan.ckpt"
    torch.save(state, poisoned)
    err = fails(capsys, "test", *config("coop"), "--trainer.default_root_dir", str(tmp_path), "--ckpt_path",
                str(poisoned))
    assert f"checkpoint {poisoned} holds NaN or infinite values in prompt.ctx" in err
    with pytest.raises(CheckpointReadError, match="holds NaN or infinite values in prompt.ctx"):
        export_checkpoint(poisoned, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()
    weights, _ = export_checkpoint(coop_ckpt, tmp_path / "fine.safetensors")
    tensors = load_file(weights)
    tensors["prompt.ctx"][1, 2] = float("inf")
    save_file(tensors, weights)
    with pytest.raises(CheckpointReadError, match=r"export .*fine.safetensors holds NaN or infinite values in prompt"):
        load_exported(weights)


@pytest.mark.parametrize("method, tensor", [(TipAdapterF, "cache_keys"), (LinearProbe, "weight"), (CLIPSVD, "svd.")])
def test_non_finite_tensors_of_any_method_are_refused_at_load(method, tensor):
    model = method(classnames=CLASSES, backbone="tiny", dataset="demo")
    checkpoint = own_checkpoint(model)
    state = checkpoint["state_dict"]
    if method is TipAdapterF:  # a fitted cache: 3 keys and their labels
        state["cache_keys"], state["cache_labels"] = torch.randn(3, model.backbone.embed_dim), torch.tensor([0, 1, 2])
    name = next(k for k in state if k.startswith(tensor) and state[k].is_floating_point() and state[k].numel())
    state[name] = state[name].clone().view(-1).index_fill(0, torch.tensor([0]), float("nan")).view(state[name].shape)
    with pytest.raises(CheckpointReadError, match=rf"holds NaN or infinite values in {name}"):
        model.on_load_checkpoint(checkpoint)


def test_evaluation_stops_on_non_finite_logits():
    data = DemoDataModule(num_shots=1, num_workers=0, test_batch_size=4)
    model = ZeroShot(classnames=data.classnames, backbone="tiny", dataset="demo")
    model.class_features[1, 0] = float("nan")
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_test_batches=1,
                      limit_predict_batches=1)
    with pytest.raises(NonFiniteLogitsError, match=r"non-finite logits in test batch 0 \(ZeroShot\): its tensors "
                                                   "class_features hold NaN"):
        trainer.test(model, datamodule=data)
    with pytest.raises(NonFiniteLogitsError, match="non-finite logits in predict batch 0"):
        trainer.predict(model, datamodule=data)


# --------------------------------------------------------------------- E. untrained tests are said
@pytest.mark.slow
def test_testing_an_untrained_method_is_said_in_the_console_and_the_run(coop_ckpt, tmp_path, capsys):
    with pytest.warns(UserWarning, match=r"test of an UNTRAINED CoOp: no --ckpt_path was given.*--untrained true"):
        main(["test", *config("coop"), "--trainer.default_root_dir", str(tmp_path / "plain")])
    note = next((tmp_path / "plain").rglob("UNTRAINED.txt")).read_text()
    assert note.startswith("test of an UNTRAINED CoOp")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".* of an UNTRAINED ")
        main(["predict", *config("coop"), "--trainer.default_root_dir", str(tmp_path / "asked"), "--untrained", "true"])
        assert "Asked for with --untrained true" in next((tmp_path / "asked").rglob("UNTRAINED.txt")).read_text()
        main(["test", *config("coop"), "--trainer.default_root_dir", str(tmp_path / "ckpt"), "--ckpt_path",
              str(coop_ckpt)])
        main(["test", *config("zeroshot"), "--trainer.default_root_dir", str(tmp_path / "zeroshot")])
    assert not list((tmp_path / "ckpt").rglob("UNTRAINED.txt"))
    assert not list((tmp_path / "zeroshot").rglob("UNTRAINED.txt"))  # zero-shot learns nothing: nothing to say


def test_validate_with_validation_off_says_so(tmp_path, capsys):
    err = fails(capsys, "validate", *config("coop"), "--trainer.default_root_dir", str(tmp_path))
    assert "validation is off in this config (trainer.limit_val_batches: 0" in err


# ------------------------------------------------------------------ M. the first hour's mistakes
def test_first_hour_mistakes_are_one_message_each(tmp_path, capsys):
    root = ["--trainer.default_root_dir", str(tmp_path / "run")]
    err = fails(capsys, "fit", "--config", str(ROOT / "trainers/coop.yaml"), *QUICK, *root)
    assert "no data config: add --config datasets/<dataset>.yaml (shipped: btmri" in err
    err = fails(capsys, "fit", *DEMO, *QUICK, *root)
    assert "no method config: add --config trainers/<method>.yaml (shipped: biomed_coop" in err
    err = fails(capsys, "fit", *config("coop"), *root, "--data.seed", "-1")
    assert "data.seed -1 is not a seed" in err
    err = fails(capsys, "fit", *config("coop"), *root, "--seed_everything", "-3")
    assert "seed_everything -3 is not a seed" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = fails(capsys, "fit", *config("coop"), "--trainer.default_root_dir", str(blocker / "run"))
    assert f"trainer.default_root_dir {blocker / 'run'} cannot be written" in err


def test_a_read_only_run_folder_is_one_message(tmp_path, capsys, monkeypatch):
    import tempfile

    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except PermissionError:
        pass
    else:  # root writes anyway: what the folder would do for anyone else
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(folder))

        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    try:
        err = fails(capsys, "fit", *config("coop"), "--trainer.default_root_dir", str(folder))
    finally:
        folder.chmod(0o755)
    assert f"trainer.default_root_dir {folder} cannot be written (Permission denied)" in err


@pytest.mark.parametrize("tamper, problem", [
    (lambda s: s.update(cache_labels=s["cache_labels"][:2]), "3 cache keys but 2 cache labels"),
    (lambda s: s.update(cache_labels=torch.tensor([0, 1, 7])), "cache labels must be class numbers 0..3"),
    (lambda s: s.update(cache_keys=s["cache_keys"][:, :5]), r"cache_keys has shape \(3, 5\) \(this model: \(N, 32\)\)"),
])
def test_tampered_tip_adapter_keys_fail_at_load_not_at_test(tamper, problem):
    model = TipAdapterF(classnames=CLASSES, backbone="tiny", dataset="demo")
    checkpoint = own_checkpoint(model, cache_keys=torch.nn.functional.normalize(torch.randn(3, 32), dim=-1),
                                cache_labels=torch.tensor([0, 1, 2]))
    model.on_load_checkpoint({**checkpoint, "state_dict": dict(checkpoint["state_dict"])})  # as the fit wrote it
    tamper(checkpoint["state_dict"])
    with pytest.raises(CheckpointMismatchError, match=rf"fitted tensors of this TipAdapterF checkpoint are not "
                                                      rf"consistent: {problem}"):
        TipAdapterF(classnames=CLASSES, backbone="tiny", dataset="demo").on_load_checkpoint(checkpoint)


def test_a_library_error_while_building_the_model_is_one_message(tmp_path, capsys, monkeypatch):
    (tmp_path / "broken_method.py").write_text(
        "import torch\nfrom dpt_lightning import CoOp\n\n\nclass BrokenCoOp(CoOp):\n"
        "    def configure_prompts(self):\n        torch.zeros(-1)  # a library's exception during init\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    err = fails(capsys, "test", *config("coop"), "--model", "broken_method.BrokenCoOp",
                "--trainer.default_root_dir", str(tmp_path / "run"))
    assert "could not build the run from its config: RuntimeError:" in err and "configure_prompts" in err
    err = fails(capsys, "test", *config("zeroshot"), "--trainer.strategy", "no-such-strategy",
                "--trainer.default_root_dir", str(tmp_path / "run"))
    assert "could not build the run from its config: ValueError: You selected an invalid strategy name" in err


# --------------------------------------------------------------- N. the user's class names are kept
def test_class_names_the_user_gave_are_never_replaced_silently(tmp_path, capsys):
    root = ["--trainer.default_root_dir", str(tmp_path)]
    err = fails(capsys, "test", *config("zeroshot"), *root, "--model.init_args.classnames", "[tumor, normal, a, b]")
    assert ("model.init_args.classnames ['tumor', 'normal', 'a', 'b'] differ from the data's classes "
            "['circle', 'cross', 'square', 'stripes']") in err
    main(["test", *config("zeroshot"), *root, "--model.init_args.classnames", json.dumps(CLASSES)])  # the same: fine


# ------------------------------------------------ old checkpoints: the format number is checked
def test_a_checkpoint_without_the_weights_digest_needs_an_explicit_opt_in(coop_ckpt, tmp_path, capsys):
    state = torch.load(coop_ckpt, weights_only=True)
    identity = state["dpt_lightning"]
    del identity["format"], identity["backbone"]["weights_digest"]
    for key in ("text_tower", "image_tower"):
        del identity["backbone"][key]
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    run = ["test", *config("coop"), "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(old)]
    err = fails(capsys, *run)
    assert "written by an older dpt_lightning (checkpoint format 1, this one writes 2)" in err
    assert "--allow_unverified_backbone true" in err
    main([*run, "--allow_unverified_backbone", "true"])  # at the user's explicit word: only the widths compared
    identity["format"] = 99
    torch.save(state, old)
    err = fails(capsys, *run, "--allow_unverified_backbone", "true")
    assert "has format 99, written by a newer dpt_lightning" in err
