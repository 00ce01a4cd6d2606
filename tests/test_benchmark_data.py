"""The 11 benchmark datamodules on fake copies of the real layout (tests/fakedata.py).

What is checked: the few-shot selection against a plain re-statement of the original algorithm,
base/novel classes against the reference table, sampling before subsampling, label remapping, the
exported selection and its reuse, the fallback split, image conversion, every bad-input error
(each naming its file, all listed at once, raised in ``setup``) and the documented ``dpt fit``
command for every dataset.
"""
from __future__ import annotations

import json
import math
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import FAKE_LAYOUTS, write_fake_benchmark, write_fake_dataset
from PIL import Image
from torchvision import transforms as T

from dpt_lightning.data import BENCHMARK_DATAMODULES, DataError, Item, benchmark_datamodule, write_split_file
from dpt_lightning.data.facts import BENCHMARK_DATASETS

REPO = Path(__file__).resolve().parents[1]
NAMES = list(BENCHMARK_DATASETS)

#: datasets.md: base = the first ceil(n/2) labels, novel = the rest (written out, not computed).
BASE_NOVEL = {
    "BTMRI": (["glioma tumor", "meningioma tumor"], ["pituitary tumor", "normal brain"]),
    "BUSI": (["benign tumor", "malignant tumor"], ["normal scan"]),
    "CHMNIST": (["adipose tissue", "complex stroma", "debris", "empty background"],
                ["immune cells", "normal mucosal glands", "simple stroma", "tumour epithelium"]),
    "COVID_19": (["covid lungs", "lung opacity lungs"], ["viral pneumonia lungs", "normal lungs"]),
    "CTKidney": (["cyst kidney", "kidney stone"], ["kidney tumor", "normal kidney"]),
    "DermaMNIST": (["actinic keratosis", "basal cell carcinoma", "benign keratosis", "dermatofibroma"],
                   ["melanoma", "melanocytic nevus", "vascular lesion"]),
    "KneeXray": (["healthy knee", "doubtful osteoarthritis", "minimal osteoarthritis"],
                 ["moderate osteoarthritis", "severe osteoarthritis"]),
    "Kvasir": (["dyed lifted polyps", "dyed resection margins", "esophagitis", "normal cecum"],
               ["normal pylorus", "normal z line", "polyps", "ulcerative colitis"]),
    "LungColon": (["colon adenocarcinoma", "colon benign tissue", "lung adenocarcinoma"],
                  ["lung benign tissue", "lung squamous cell carcinoma"]),
    "OCTMNIST": (["choroidal neovascularization", "diabetic macular edema"], ["drusen", "normal oct scan"]),
    "RETINA": (["diabetic retinopathy", "glaucoma"], ["cataract", "normal retina"]),
}
#: datasets.md: label first appearance in the real train lists (not label order).
TRAIN_ORDER = {"BTMRI": [0, 1, 3, 2], "DermaMNIST": [5, 4, 2, 1, 6, 0, 3], "KneeXray": [1, 0, 2, 3, 4],
               "RETINA": [2, 0, 1, 3], "COVID_19": [0, 1, 3, 2]}


@pytest.fixture(scope="session")
def fake_root(tmp_path_factory) -> Path:
    return write_fake_benchmark(tmp_path_factory.mktemp("benchmark"))


def split_of(root: Path, name: str) -> dict:
    return json.loads((root / name / f"split_{name}.json").read_text())


def datamodule(name: str, root: Path, **kwargs):
    return benchmark_datamodule(name)(root=str(root), **kwargs)


# ------------------------------------------------------------------------------------------------
# The original algorithm, re-stated plainly (datasets.md), with the GLOBAL random as the original.
def original_selection(split: dict, shots: int, seed: int) -> dict:
    random.seed(seed)

    def per_class(entries: list, k: int) -> list:
        order = []
        for entry in entries:
            if entry[1] not in order:
                order.append(entry[1])
        chosen = []
        for label in order:
            members = [entry for entry in entries if entry[1] == label]
            chosen += random.sample(members, k) if len(members) >= k else members
        return chosen

    train = per_class(split["train"], shots)
    val = per_class(split["val"], min(shots, 4))
    return {"train": train, "val": val, "test": split["test"]}


def original_fallback_split(image_dir: Path, folders: list[str], classnames: list[str], seed: int) -> dict:
    """Dassl's read_and_split_data re-stated (sorted file listing, global random)."""
    random.seed(seed)
    out = {"train": [], "val": [], "test": []}
    for label, (folder, name) in enumerate(zip(folders, classnames)):
        files = sorted(p.name for p in (image_dir / folder).iterdir())
        random.shuffle(files)
        n_train, n_val = round(len(files) * 0.5), round(len(files) * 0.2)
        entries = [[f"{folder}/{f}", label, name] for f in files]
        out["train"] += entries[:n_train]
        out["val"] += entries[n_train:n_train + n_val]
        out["test"] += entries[n_train + n_val:]
    return out


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_identity_comes_from_the_facts(name):
    cls = benchmark_datamodule(name)
    facts = BENCHMARK_DATASETS[name]
    assert cls is BENCHMARK_DATAMODULES[name] and cls.dataset_name == name and cls.template == facts.template
    dm = cls(root="/no/such/folder", num_shots=4, seed=2, batch_size=8, num_workers=0)  # no model, no data
    assert dm.all_classnames == list(facts.classnames) and dm.classnames == dm.all_classnames
    assert (dm.modality, dm.organ) == (facts.modality, facts.organ)
    assert dm.image_dir == Path("/no/such/folder") / name / name
    config = (REPO / "datasets" / f"{facts.key}.yaml").read_text()
    assert f"class_path: dpt_lightning.{cls.__name__}\n" in config and "batch_size: " not in config.replace(
        "test_batch_size", "")  # the training batch size is the method's


@pytest.mark.parametrize("name", NAMES)
def test_base_and_novel_classes(name):
    base, novel = BASE_NOVEL[name]
    n = len(BENCHMARK_DATASETS[name].classnames)
    assert len(base) == math.ceil(n / 2) and len(base) + len(novel) == n
    for subsample, expected in (("base", base), ("new", novel)):
        dm = datamodule(name, Path("/unused"), subsample=subsample)
        assert [c.lower() for c in dm.classnames] == expected
        assert dm.protocol == "base2novel" and dm.num_classes == len(expected)


@pytest.mark.parametrize("name", NAMES)
def test_fewshot_selection_equals_the_original(fake_root, name):
    split = split_of(fake_root, name)
    order = list(dict.fromkeys(label for _, label, _ in split["train"]))
    assert order == TRAIN_ORDER.get(name, sorted(order))  # the fake reproduces the real first-appearance order
    seen_subsets = set()
    for shots in (1, 2, 4, 8, 16):
        for seed in (1, 2, 3):
            random.seed(999), np.random.seed(7), torch.manual_seed(5)
            random.random()  # whatever the program did before must not shift the selection
            dm = datamodule(name, fake_root, num_shots=shots, seed=seed, num_workers=0)
            dm.setup()
            expected = original_selection(split, shots, seed)
            assert dm.fewshot_split() == expected, (name, shots, seed)
            assert dm.splits == {p: [Item(*e) for e in expected[p]] for p in expected}  # subsample all: as is
            counts = Counter(label for _, label, _ in expected["train"])
            available = Counter(label for _, label, _ in split["train"])
            assert counts == {label: min(shots, n) for label, n in available.items()}
            seen_subsets.add(json.dumps(expected["train"]))
    assert len(seen_subsets) > 10  # seeds and K really change the selection


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("subsample", ["base", "new"])
def test_sampling_happens_before_subsampling(fake_root, name, subsample):
    full = datamodule(name, fake_root, num_shots=16, seed=2)
    part = datamodule(name, fake_root, num_shots=16, seed=2, subsample=subsample)
    full.setup(), part.setup()
    kept = [full.all_classnames.index(c) for c in part.classnames]
    assert kept == sorted(kept)
    remap = {old: new for new, old in enumerate(kept)}
    for split in ("train", "val", "test"):
        expected = [Item(i.relpath, remap[i.label], i.classname) for i in full.splits[split] if i.label in remap]
        assert part.splits[split] == expected and expected
        assert {i.label for i in part.splits[split]} <= set(range(len(kept)))
        assert all(i.classname.lower() == part.classnames[i.label].lower() for i in part.splits[split])
    assert part.fewshot_split() == full.fewshot_split()  # the selection is the K=16 run's, all classes


def test_exported_selection_reruns_on_the_same_images(fake_root, tmp_path):
    dm = datamodule("DermaMNIST", fake_root, num_shots=2, seed=3, subsample="base")
    dm.setup()
    exported = dm.fewshot_split()
    assert list(exported) == ["train", "val", "test"]
    assert all(isinstance(r, str) and type(y) is int and isinstance(c, str) and len(e) == 3
               for p in exported.values() for e in p for r, y, c in [e])
    path = dm.save_fewshot_split(tmp_path / "selection.json")
    assert json.loads(path.read_text()) == exported
    with pytest.raises(FileExistsError):
        dm.save_fewshot_split(path)  # never replaced
    for subsample in ("base", "all"):
        first = datamodule("DermaMNIST", fake_root, num_shots=2, seed=3, subsample=subsample)
        again = datamodule("DermaMNIST", fake_root, split_file=str(path), num_shots=-1, seed=99, subsample=subsample)
        first.setup(), again.setup()
        assert again.splits == first.splits and again.fewshot_split() == exported


@pytest.mark.parametrize("name", ["CHMNIST", "BUSI", "RETINA", "DermaMNIST"])
def test_every_image_becomes_rgb(fake_root, name):
    dm = datamodule(name, fake_root, num_shots=-1, num_workers=0)
    dm.use_transforms(T.ToTensor(), T.ToTensor())
    modes, suffixes = set(), set()
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        dataset = loader.dataset
        for k in range(len(dataset)):
            sample = dataset[k]
            with Image.open(sample["path"]) as raw:
                modes.add(raw.mode)
            suffixes.add(Path(sample["path"]).suffix)
            assert sample["image"].shape[0] == 3 and sample["image"].dtype == torch.float32
            assert sample["image"].max() <= 1.0 and sample["image"].max() > 0.5  # 16-bit scaled, not clipped to 0
    expected_modes = {"CHMNIST": {"I;16", "L", "RGB"}, "BUSI": {"L", "RGB", "RGBA"}, "RETINA": {"RGB", "L", "RGBA"},
                      "DermaMNIST": {"RGB", "RGBA"}}[name]
    assert expected_modes <= {"I;16" if m.startswith("I;16") else m for m in modes}
    assert {f".{e}" for e in FAKE_LAYOUTS[name].extensions} == suffixes
    if name == "BUSI":
        assert any(" (" in Path(i.relpath).name for i in dm.splits["train"])


# ------------------------------------------------------------------------------------------------
# Bad inputs: one clear error, raised in setup, naming every problem's file.
@pytest.fixture
def busi(tmp_path):
    """A fresh fake BUSI (3 classes) that a test may break: (root, split, split path, image dir)."""
    split = write_fake_dataset(tmp_path, "BUSI")
    return tmp_path, split, tmp_path / "BUSI" / "split_BUSI.json", tmp_path / "BUSI" / "BUSI"


def problems_of(root: Path, **kwargs) -> list[str]:
    dm = datamodule("BUSI", root, num_shots=1, seed=1, **kwargs)
    with pytest.raises(DataError) as info:
        dm.setup()
    assert dm.splits is None  # nothing half set up
    return info.value.problems


def rewrite(path: Path, split: dict) -> None:
    path.write_text(json.dumps(split))


def test_missing_listed_file_is_reported_even_when_not_selected(busi):
    root, split, _, images = busi
    relpath = split["train"][-1][0]  # reported whether or not the 1-shot run selects it
    (images / relpath).unlink()
    assert problems_of(root) == [f"{images / relpath}: file not found (listed in {root}/BUSI/split_BUSI.json: "
                                 f"train[{len(split['train']) - 1}] {relpath!r})"]


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    (lambda p: p.write_bytes(b"this is not an image at all"), "cannot read image"),
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "cannot read image"),  # truncated
])
def test_unreadable_images(busi, damage, message):
    root, split, _, images = busi
    path = images / split["test"][0][0]  # the test split is always used whole
    damage(path)
    (problem,) = problems_of(root)
    assert problem.startswith(f"{path}: {message}")


def test_unused_unreadable_image_is_not_decoded(busi):
    root, split, _, images = busi
    dm = datamodule("BUSI", root, num_shots=1, seed=1)
    dm.setup()
    used = {i.relpath for p in dm.splits.values() for i in p}
    unused = next(e[0] for e in split["train"] if e[0] not in used)
    (images / unused).write_bytes(b"garbage")
    datamodule("BUSI", root, num_shots=1, seed=1).setup()  # only the run's images are decoded


@pytest.mark.parametrize("change, message", [
    (lambda e: e.__setitem__(1, 1), "class name 'benign tumor' does not match label 1, which is 'malignant tumor'"),
    (lambda e: e.__setitem__(2, "benign tumour"), "class name 'benign tumour' does not match label 0, which is "
                                                   "'benign tumor'"),
    (lambda e: e.__setitem__(1, 7), "label 7 is not a label of this dataset (0..2)"),
    (lambda e: e.__setitem__(0, "../../outside.png"), "the path leaves the image folder"),
    (lambda e: e.__setitem__(0, "/etc/hostname"), "the path leaves the image folder"),
    (lambda e: e.__setitem__(0, "benign_tumor/../../../x.png"), "the path leaves the image folder"),
])
def test_entries_that_disagree_with_the_dataset(busi, change, message):
    root, split, path, _ = busi
    change(split["val"][3])
    relpath = split["val"][3][0]
    rewrite(path, split)
    problems = problems_of(root)
    assert f"{path}: val[3] {relpath!r}: {message}" in problems[0]
    assert len(problems) == 1


def test_image_in_two_splits(busi):
    root, split, path, _ = busi
    split["test"].append(split["train"][0])
    rewrite(path, split)
    assert problems_of(root) == [f"{path}: test[{len(split['test']) - 1}] {split['train'][0][0]!r}: also listed "
                                 "in 'train' (an image may belong to one split only)"]


def test_class_without_training_images(busi):
    root, split, path, _ = busi
    split["train"] = [e for e in split["train"] if e[1] != 2]
    rewrite(path, split)
    assert problems_of(root) == [f"{path}: class 2 'normal scan' has no training images"]


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("val"), "'val' is missing or not a list"),
    (lambda s: s["train"].__setitem__(0, ["benign_tumor/benign (1).png", 0]), "train[0]: expected [relpath, label, "
                                                                             "classname]"),
    (lambda s: s["test"][1].__setitem__(1, "0"), "test[1]: label must be an integer"),
])
def test_malformed_split_file(busi, edit, message):
    root, split, path, _ = busi
    edit(split)
    rewrite(path, split)
    problems = problems_of(root)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: {message}")


def test_missing_split_file_given_by_the_user(busi, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"split file {tmp_path / 'nope.json'} does not exist"):
        datamodule("BUSI", busi[0], split_file=str(tmp_path / "nope.json")).setup()


def test_all_problems_are_listed_at_once(busi):
    root, split, path, images = busi
    (images / split["train"][1][0]).unlink()
    (images / split["test"][0][0]).write_bytes(b"")
    split["val"][0][1] = 2
    split["val"][1][0] = "../escape.png"
    rewrite(path, split)
    problems = problems_of(root)
    assert len(problems) == 4
    message = str(DataError(problems))
    for needle in ("file not found", "empty file", "does not match label 2", "leaves the image folder"):
        assert needle in message


def test_wrong_root_gets_a_hint(busi, tmp_path):
    root = busi[0]
    with pytest.raises(FileNotFoundError, match=r"pass its parent"):
        datamodule("BUSI", root / "BUSI").setup()
    with pytest.raises(FileNotFoundError, match=r"must hold the benchmark layout <root>/BTMRI/BTMRI"):
        datamodule("BTMRI", root).setup()


def test_errors_come_before_training(busi, tmp_path):
    from dpt_lightning.cli import build_cli

    root, split, _, images = busi
    (images / split["test"][2][0]).write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="cannot read image"):
        build_cli(["fit", "--config", str(REPO / "trainers/coop.yaml"), "--config", str(REPO / "datasets/busi.yaml"),
                   "--data.root", str(root), "--data.num_workers", "0", "--model.backbone", "tiny",
                   "--trainer.default_root_dir", str(tmp_path / "logs"), "--trainer.enable_progress_bar", "false"])


# ------------------------------------------------------------------------------------------------
# The fallback split when the split file is missing.
def test_fallback_split_is_the_originals_and_written_only_when_allowed(tmp_path):
    write_fake_dataset(tmp_path, "RETINA", split_file=False)
    facts = BENCHMARK_DATASETS["RETINA"]
    image_dir = tmp_path / "RETINA" / "RETINA"
    expected = original_fallback_split(image_dir, [c.replace(" ", "_") for c in facts.classnames],
                                       list(facts.classnames), seed=5)
    dm = datamodule("RETINA", tmp_path, num_shots=2, seed=1, split_seed=5)
    with pytest.warns(UserWarning, match="save_split"):
        dm.setup()
    assert not dm.split_path.exists()  # not written without permission
    assert dm.fewshot_split() == original_selection(expected, 2, 1)

    saving = datamodule("RETINA", tmp_path, num_shots=2, seed=1, split_seed=5, save_split=True)
    saving.setup()
    assert json.loads(saving.split_path.read_text()) == expected
    assert saving.fewshot_split() == dm.fewshot_split()
    reader = datamodule("RETINA", tmp_path, num_shots=2, seed=1, split_seed=6, save_split=True)
    reader.setup()  # the written file is now THE split (split_seed no longer matters)
    assert reader.split_source == str(reader.split_path) and reader.fewshot_split() == dm.fewshot_split()

    before = saving.split_path.read_bytes()
    with pytest.raises(FileExistsError):
        write_split_file({"train": [], "val": [], "test": []}, saving.split_path)
    assert saving.split_path.read_bytes() == before


def test_fallback_split_matches_class_folders_ignoring_case(tmp_path):
    write_fake_dataset(tmp_path, "OCTMNIST", split_file=False)  # folder normal_OCT_scan, class "normal oct scan"
    dm = datamodule("OCTMNIST", tmp_path, num_shots=-1, save_split=True)
    dm.setup()
    assert {i.relpath.split("/")[0] for i in dm.splits["train"] if i.label == 3} == {"normal_OCT_scan"}
    assert {i.classname for i in dm.splits["test"]} == set(BENCHMARK_DATASETS["OCTMNIST"].classnames)


def test_fallback_split_problems(tmp_path):
    write_fake_dataset(tmp_path, "BUSI", split_file=False)
    images = tmp_path / "BUSI" / "BUSI"
    for extra in sorted((images / "malignant_tumor").iterdir())[3:]:
        extra.unlink()  # 3 images cannot give train, val and test one each
    with pytest.raises(DataError, match=r"malignant_tumor: 3 image\(s\) cannot be split"):
        datamodule("BUSI", tmp_path).setup()
    shutil.rmtree(images / "normal_scan")
    with pytest.raises(DataError, match=r"normal_scan: class folder not found") as info:
        datamodule("BUSI", tmp_path).setup()
    assert "folders found in" in str(info.value)


# ------------------------------------------------------------------------------------------------
# Done-when: `dpt fit --config trainers/coop.yaml --config datasets/<name>.yaml --data.root <root>
# --data.num_shots 4 --data.seed 1 --model.backbone tiny` runs for every dataset. One batch of
# training and of testing; BUSI runs with the configs' batch sizes, the others with small ones (speed).
@pytest.mark.parametrize("name, subsample", [(n, "all") for n in NAMES] + [("BUSI", "base")])
def test_dpt_fit_runs_for_every_dataset(fake_root, tmp_path, name, subsample):
    from dpt_lightning.cli import build_cli

    as_configured = (name, subsample) == ("BUSI", "all")
    cli = build_cli([
        "fit", "--config", str(REPO / "trainers/coop.yaml"),
        "--config", str(REPO / f"datasets/{BENCHMARK_DATASETS[name].key}.yaml"),
        "--data.root", str(fake_root), "--data.num_shots", "4", "--data.seed", "1", "--model.backbone", "tiny",
        "--data.subsample", subsample, "--data.num_workers", "0",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_test_batches", "1",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        *([] if as_configured else ["--data.batch_size", "8", "--data.test_batch_size", "4"]),
    ])
    dm, model = cli.datamodule, cli.model
    assert type(dm) is BENCHMARK_DATAMODULES[name]
    assert (dm.batch_size, dm.test_batch_size) == ((32, 100) if as_configured else (8, 4))  # coop.yaml's 32 kept
    assert model.classnames == dm.classnames and model.hparams.dataset == name
    if subsample == "base":  # the model is built for the subset's classes only
        assert [c.lower() for c in model.classnames] == BASE_NOVEL[name][0]
    assert cli.trainer.global_step == 1 and "test_acc" in cli.trainer.callback_metrics
    written = json.loads((Path(cli.trainer.log_dir) / "fewshot_split.json").read_text())
    assert written == dm.fewshot_split() == original_selection(split_of(fake_root, name), 4, 1)


def test_the_selection_seed_picks_the_images_and_the_seed_trains(fake_root, tmp_path):
    """Issue 21.2: ``data.selection_seed`` selects the few-shot images (the BiomedCoOp code's adapter
    baselines: seed 1's images for every training seed), ``data.seed`` drives the rest (views, order,
    seed_everything); both are recorded in hparams.yaml and in the checkpoint's selection. Unset, the
    selection seed is the seed."""
    import os

    import yaml

    from dpt_lightning.cli import build_cli

    split = split_of(fake_root, "BTMRI")
    assert original_selection(split, 4, 1) != original_selection(split, 4, 2)
    default = datamodule("BTMRI", fake_root, num_shots=4, seed=2)
    default.setup()
    assert default.selection_seed == 2 and default.fewshot_split() == original_selection(split, 4, 2)

    cli = build_cli([
        "fit", "--config", str(REPO / "trainers/coop.yaml"), "--config", str(REPO / "datasets/btmri.yaml"),
        "--data.root", str(fake_root), "--data.num_shots", "4", "--data.seed", "2", "--data.selection_seed", "1",
        "--model.backbone", "tiny", "--data.num_workers", "0", "--data.batch_size", "8", "--data.test_batch_size", "4",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_test_batches", "1",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ])
    dm, log_dir = cli.datamodule, Path(cli.trainer.log_dir)
    assert dm.fewshot_split() == original_selection(split, 4, 1)  # seed 1's images ...
    assert json.loads((log_dir / "fewshot_split.json").read_text()) == dm.fewshot_split()
    loader = dm.train_dataloader()
    assert loader.sampler.seed == 2 and loader.dataset.seed == 2 and os.environ["PL_GLOBAL_SEED"] == "2"  # ... seed 2's run
    saved = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert (saved["seed"], saved["selection_seed"]) == (2, 1)
    recorded = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["fewshot_selection"]
    assert (recorded["seed"], recorded["selection_seed"]) == (2, 1)
    assert recorded["train"] == original_selection(split, 4, 1)["train"]
