"""Multi-label findings, the data side (issue 22): several findings per image.

Checked on files written in the real layouts: the multi-hot labels of ``batch["label"]`` (float
(B, C), 1 present, 0 absent, -1 ignored); the multi-label few-shot rule on a FIXED CSV (exact
expected images, and the rule re-stated with its random calls); ``fewshot_split.json`` in its
multi-label form, re-run from the file; the class rule for findings; the generic multi-label CSV
(a ``labels`` column or one column per finding), ChestX-ray14's official files (both image
layouts, the patient-wise validation split) and CheXpert's CSVs (uncertainty policies, blank = 0,
frontal only); every bad input one message naming the file and the line; the ChestX-ray14
description bank, also under CheXpert's names. Single-label data is unchanged (its own tests).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from dpt_lightning.data import (IGNORE, CheXpertDataModule, ChestXray14DataModule, CSVDataModule, DataError,
                                DemoMultiLabelDataModule, ImageFolderDataModule, MultiLabelItem, read_split_file)
from dpt_lightning.data.chest import CHESTXRAY14_LABELS, CHEXPERT_OBSERVATIONS
from dpt_lightning.data.splits import patient_split
from dpt_lightning.descriptions import DescriptionBankError, load_bank, resolve_sentences, validate_bank

ROOT = Path(__file__).resolve().parents[1]


def png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (40, 80, 120)).save(path)


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def no_validation(data):
    data.trainer = SimpleNamespace(limit_val_batches=0)  # as the reference configs
    return data


def error_of(make, *args) -> str:
    with pytest.raises(DataError) as info:
        make(*args)
    return str(info.value)


# ------------------------------------------------------------------------------------------------
# The generic multi-label CSV and THE few-shot rule, on a fixed file.
#: (image, labels, split): findings a, b, c; "No Finding" images t3, t6, t9, v3, s2.
FIXED = [("t0", "a", "train"), ("t1", "a|b", "train"), ("t2", "b", "train"), ("t3", "No Finding", "train"),
         ("t4", "c", "train"), ("t5", "a|c", "train"), ("t6", "No Finding", "train"), ("t7", "b|c", "train"),
         ("t8", "a", "train"), ("t9", "No Finding", "train"), ("v0", "a", "val"), ("v1", "b", "val"),
         ("v2", "c|a", "val"), ("v3", "No Finding", "val"), ("v4", "b|c", "val"), ("s0", "a", "test"),
         ("s1", "b|c", "test"), ("s2", "No Finding", "test")]


@pytest.fixture
def fixed_csv(tmp_path) -> Path:
    for name, _, _ in FIXED:
        png(tmp_path / "img" / f"{name}.png")
    return write(tmp_path / "labels.csv", ["path,labels,split"] + [f"img/{n}.png,{l},{s}" for n, l, s in FIXED])


def names(items) -> list[str]:
    return [Path(item.relpath if isinstance(item, MultiLabelItem) else item[0]).stem for item in items]


def restated_selection(split, k: int, seed: int) -> dict[str, list[str]]:
    """The rule re-stated: one random.Random(seed); per split, for each finding in label order
    ``sample`` K of the images that have it and were not drawn yet (all when fewer), then K normal
    images; val with min(K, 4) from the same stream."""
    rng = random.Random(seed)
    out = {}
    for name, shots in (("train", k), ("val", min(k, 4))):
        free, chosen = list(split[name]), []
        for test in [*(lambda i, f=f: f in i.labels for f in range(3)), lambda i: not i.labels]:
            group = [i for i in free if test(i)]
            drawn = rng.sample(group, shots) if len(group) >= shots else group
            chosen += drawn
            free = [i for i in free if i not in drawn]
        out[name] = names(chosen)
    return out


@pytest.mark.parametrize("k, seed, train, val", [
    (1, 1, ["t1", "t2", "t5", "t3"], ["v2", "v4", "v3"]),
    (2, 1, ["t1", "t5", "t2", "t7", "t4", "t3", "t6"], ["v2", "v0", "v4", "v1", "v3"]),
    (2, 3, ["t1", "t5", "t2", "t7", "t4", "t9", "t6"], ["v0", "v2", "v4", "v1", "v3"]),
])
def test_fewshot_selection_on_a_fixed_csv_is_exactly_these_images(fixed_csv, k, seed, train, val):
    data = CSVDataModule(csv=str(fixed_csv), num_shots=k, seed=seed, num_workers=0)
    data.setup()
    assert data.task == "multilabel" and data.classnames == ["a", "b", "c"]
    assert names(data.splits["train"]) == train and names(data.splits["val"]) == val
    assert names(data.splits["test"]) == ["s0", "s1", "s2"]  # whole
    assert restated_selection(data.full_split, k, seed) == {"train": train, "val": val}
    everything = CSVDataModule(csv=str(fixed_csv), num_shots=-1, num_workers=0)
    everything.setup()
    assert names(everything.splits["train"]) == [n for n, _, s in FIXED if s == "train"]


def test_multi_hot_labels_in_the_batch(fixed_csv):
    data = CSVDataModule(csv=str(fixed_csv), num_workers=0, test_batch_size=3)
    data.setup()
    item = data.splits["val"][2]  # v2: "c|a", written in another order than label order
    assert item == MultiLabelItem("img/v2.png", (0, 2), ("a", "c"))
    batch = next(iter(data.test_dataloader()))
    assert batch["label"].dtype == torch.float32 and batch["label"].shape == (3, 3)
    assert batch["label"].tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]  # s0 a, s1 b|c, s2 No Finding
    assert batch["image"].shape == (3, 3, 224, 224)


def test_uncertain_findings_are_minus_one_under_ignore(tmp_path):
    for n in range(4):
        png(tmp_path / f"{n}.png")
    rows = ["path,Edema,Effusion,split", "0.png,1,-1,train", "1.png,0,1,train", "2.png,-1.0,0.0,test",
            "3.png,1.0,1,test"]
    path = write(tmp_path / "labels.csv", rows)
    labels = {}
    for policy in ("ignore", "ones", "zeros"):
        data = CSVDataModule(csv=str(path), findings=["Edema", "Effusion"], uncertain=policy, num_workers=0)
        data.setup("test")
        labels[policy] = data.test_dataloader().dataset[0]["label"].tolist()  # 2.png: -1, 0
    assert labels == {"ignore": [IGNORE, 0.0], "ones": [1.0, 0.0], "zeros": [0.0, 0.0]}
    data = CSVDataModule(csv=str(path), findings=["Edema", "Effusion"], uncertain="ignore")
    assert data.read_split()["train"][0] == MultiLabelItem("0.png", (0,), ("Edema",), (1,))


def test_fewshot_split_file_in_its_multi_label_form_reruns_the_same_images(tmp_path):
    for n in range(8):
        png(tmp_path / f"{n}.png")
    rows = ["path,a,b,split"] + [f"{n}.png,{n % 2},{-1 if n == 7 else int(n > 3)},{'train' if n < 6 else 'test'}"
                                 for n in range(8)]
    path = write(tmp_path / "labels.csv", rows)
    data = CSVDataModule(csv=str(path), findings=["a", "b"], uncertain="ignore", num_shots=1, seed=2, num_workers=0)
    data.setup("test")
    saved = data.save_fewshot_split(tmp_path / "fewshot_split.json")
    written = json.loads(saved.read_text())
    assert written == data.fewshot_split()
    assert written["test"] == [["6.png", [1], ["b"]], ["7.png", [0], ["a"], [1]]]  # ignored labels: a fourth list
    again = CSVDataModule(csv=str(path), findings=["a", "b"], uncertain="ignore", num_shots=-1,
                          split_file=str(saved), num_workers=0)
    again.setup("test")
    assert again.splits == data.splits and again.fewshot_split() == written


def test_a_split_file_of_the_other_kind_is_refused_naming_it(tmp_path, fixed_csv):
    for label in ("x", "y"):
        for n in range(4):
            png(tmp_path / "folder" / label / f"{n}.png")
    multi = write(tmp_path / "multi.json", [json.dumps({"train": [["x/0.png", [0], ["x"]]], "val": [], "test": []})])
    message = error_of(ImageFolderDataModule(root=str(tmp_path / "folder"), split_file=str(multi)).setup)
    assert f"{multi}: holds multi-label entries [relpath, [labels], [findings]], but ImageFolderDataModule is " \
           "multiclass data" in message
    single = write(tmp_path / "single.json", [json.dumps({"train": [["img/t0.png", 0, "a"]], "val": [], "test": []})])
    message = error_of(CSVDataModule(csv=str(fixed_csv), split_file=str(single)).setup)
    assert f"{single}: holds single-label entries [relpath, label, classname], but CSVDataModule is multilabel" in message
    mixed = write(tmp_path / "mixed.json", [json.dumps({"train": [["a.png", 0, "a"], ["b.png", [0], ["a"]]],
                                                        "val": [], "test": [["c.png", [1, 1], ["b", "b"]]]})])
    message = error_of(read_split_file, mixed)
    assert f"{mixed}: test[0]: labels repeat a label" in message
    assert "mixes single-label entries [relpath, label, classname] (first: train[0]) and multi-label entries" \
           " [relpath, [labels], [findings]] (first: train[1])" in message


def test_split_file_entries_are_checked_against_the_findings(tmp_path, fixed_csv):
    bad = write(tmp_path / "bad.json", [json.dumps({
        "train": [["img/t0.png", [0], ["b"]], ["img/t1.png", [7], ["z"]], ["img/t2.png", [1], ["b"], [9]]],
        "val": [], "test": [["img/s0.png", [0], ["a"]]]})])
    message = error_of(CSVDataModule(csv=str(fixed_csv), split_file=str(bad), num_workers=0).setup, "test")
    assert "train[0] 'img/t0.png': finding 'b' does not match label 0, which is 'a'" in message
    assert "train[1] 'img/t1.png': label 7 is not a label of this dataset (0..2)" in message
    assert "train[2] 'img/t2.png': label 9 is not a label of this dataset (0..2)" in message


def test_the_class_rule_asks_every_finding_for_positives(tmp_path):
    rows = [("t0", "a|b", "train"), ("t1", "c", "train"), ("v0", "a", "val"), ("s0", "a", "test"),
            ("s1", "No Finding", "test")]
    for name, _, _ in rows:
        png(tmp_path / f"{name}.png")
    path = write(tmp_path / "labels.csv", ["path,labels,split"] + [f"{n}.png,{l},{s}" for n, l, s in rows])
    message = error_of(CSVDataModule(csv=str(path), num_workers=0).setup, "fit")
    assert f"{path}: finding 1 'b' has no positive validation or test images" in message
    assert f"{path}: finding 2 'c' has no positive validation or test images" in message
    assert "finding 0" not in message
    assert "Positive images per finding (train/val/test): 'b' 1/0/0, 'c' 1/0/0" in message
    message = error_of(no_validation(CSVDataModule(csv=str(path), num_workers=0)).setup, "fit")
    assert f"{path}: finding 1 'b' has no positive test images" in message
    one_finding = [(n, "a" if l != "No Finding" else l, s) for n, l, s in rows]
    ok = write(tmp_path / "ok.csv", ["path,labels,split"] + [f"{n}.png,{l},{s}" for n, l, s in one_finding])
    one = CSVDataModule(csv=str(ok), num_workers=0)  # one finding is a yes/no question worth training
    no_validation(one).setup("fit")
    assert one.classnames == ["a"]


def test_subsample_keeps_every_image_and_only_those_findings(fixed_csv):
    base = CSVDataModule(csv=str(fixed_csv), subsample="base", num_workers=0)
    base.setup()
    assert base.classnames == ["a", "b"] and len(base.splits["test"]) == 3
    assert [i.labels for i in base.splits["test"]] == [(0,), (1,), ()]
    new = CSVDataModule(csv=str(fixed_csv), subsample="new", num_workers=0)
    new.setup()
    assert new.classnames == ["c"] and [i.labels for i in new.splits["test"]] == [(), (0,), ()]
    assert next(iter(new.test_dataloader()))["label"].shape == (3, 1)


def test_without_a_split_column_the_images_are_split_50_20_30_as_one_group(tmp_path):
    labels = ["a", "b", "a|b", "No Finding"] * 5
    for n in range(20):
        png(tmp_path / f"{n}.png")
    path = write(tmp_path / "labels.csv", ["path,labels"] + [f"{n}.png,{l}" for n, l in enumerate(labels)])
    data = CSVDataModule(csv=str(path), split_seed=4, num_workers=0)
    items = data.read_split()
    order = [f"{n}.png" for n in range(20)]
    random.Random(4).shuffle(order)
    assert [[i.relpath for i in items[s]] for s in ("train", "val", "test")] == [order[:10], order[10:14], order[14:]]


@pytest.mark.parametrize("header, row, kwargs, expected", [
    ("path,label", "a.png,Effusion|Mass", {}, "line 2: the label 'Effusion|Mass' lists several findings ('|'); a "
     "'label' column holds one class name per image: for multi-label data name the column 'labels'"),
    ("path,labels", "a.png,", {}, "line 2: empty labels"),
    ("path,labels", "a.png,Mass|", {}, "line 2: an empty finding name in 'Mass|'"),
    ("path,labels", "a.png,No Finding|Mass", {}, "line 2: 'No Finding' together with findings in 'No Finding|Mass'"),
    ("path,labels", "a.png,Mass|Mass", {}, "line 2: a finding named twice in 'Mass|Mass'"),
    ("path,labels", "a.png,Masss", {"findings": ["Mass"]}, "line 2: finding(s) ['Masss'] are not in data.findings"),
    ("path,labels", "a.png,Mass", {"class_order": ["Mass"]}, "data.class_order orders the classes of single-label"),
    ("path,label", "a.png,Mass", {"findings": ["Mass"]}, "data.findings are multi-label settings, but"),
    ("path,label", "a.png,Mass", {"uncertain": "ones"}, "data.uncertain are multi-label settings, but"),
    ("path,label,labels", "a.png,Mass,Mass", {}, "has both 'label' (one class per image) and 'labels'"),
    ("path,Mass", "a.png,-1", {"findings": ["Mass"]}, "line 2: 'Mass' is '-1' (uncertain); choose what it means with "
     "data.uncertain: ones, zeros or ignore"),
    ("path,Mass", "a.png,2", {"findings": ["Mass"]}, "line 2: 'Mass' is '2'; write 1 (present), 0 (absent) or -1"),
    ("path,Mass", "a.png,", {"findings": ["Mass"]}, "line 2: empty mass"),
    ("path,Mass", "a.png,1", {"findings": ["Mass", "Edema"]}, "lacks the column(s) ['edema']"),
    ("path,labels", "a.png,No Finding", {}, "no image has a finding (every row is 'No Finding')"),
])
def test_bad_multi_label_input_is_one_message_naming_the_file_and_line(tmp_path, header, row, kwargs, expected):
    path = write(tmp_path / "labels.csv", [header, row])
    with pytest.raises(DataError) as info:
        CSVDataModule(csv=str(path), **kwargs)
    message = str(info.value)
    assert str(path) in message and expected in message, message


def test_bad_multi_label_settings_name_the_setting(tmp_path):
    path = write(tmp_path / "labels.csv", ["path,labels", "a.png,Mass"])
    with pytest.raises(ValueError, match="data.findings .*none twice"):
        CSVDataModule(csv=str(path), findings=["Mass", "mass"])
    with pytest.raises(ValueError, match=r"data.uncertain must be one of \['ones', 'zeros', 'ignore'\]"):
        CSVDataModule(csv=str(path), findings=["Mass"], uncertain="maybe")


# ------------------------------------------------------------------------------------------------
# ChestX-ray14 in its official layout.
def chestxray14_findings(n: int) -> str:
    """Image n: two findings, or none when n is a multiple of 6 (the 12 test images cover all 14)."""
    if n % 6 == 0:
        return "No Finding"
    return "|".join(CHESTXRAY14_LABELS[j] for j in sorted({n % 14, (n + 5) % 14}))


def write_chestxray14(root: Path, layout: str = "archive") -> list[str]:
    """24 patients of 2 images: patients 1-18 in train_val_list.txt, 19-24 in test_list.txt; the
    official CSV's header (one more field than the rows) and the images in ``images_00k/images/``
    (``archive``) or all in ``images/`` (``flat``). Returns the image names."""
    images = [f"{p:08d}_{k:03d}.png" for p in range(1, 25) for k in range(2)]
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    rows = [f"{name},{chestxray14_findings(n)},{n % 2},{int(name[:8])},058Y,M,PA,2682,2749,0.143,0.143"
            for n, name in enumerate(images)]
    write(root / "Data_Entry_2017.csv", [header, *rows])
    write(root / "train_val_list.txt", images[:36])
    write(root / "test_list.txt", images[36:])
    for n, name in enumerate(images):
        png(root / ("images" if layout == "flat" else f"images_{1 + n // 24:03d}/images") / name)
    return images


@pytest.mark.parametrize("layout", ["archive", "flat"])
def test_chestxray14_from_its_official_files(tmp_path, layout):
    images = write_chestxray14(tmp_path, layout)
    data = ChestXray14DataModule(root=str(tmp_path), num_workers=0, test_batch_size=12)
    assert data.task == "multilabel" and data.dataset_name == "ChestXray14"
    assert data.classnames[:3] == ["Atelectasis", "Cardiomegaly", "Effusion"] and data.num_classes == 14
    assert data.classnames[12] == "Pleural Thickening" and data.classnames[13] == "Hernia"
    no_validation(data).setup("fit")
    split = data.full_split
    assert [Path(i.relpath).name for i in split["test"]] == images[36:]  # test_list.txt, whole, in order
    folder = "images" if layout == "flat" else "images_001/images"
    assert split["test"][0].relpath == ("images" if layout == "flat" else "images_002/images") + f"/{images[36]}"
    # patient-wise validation: 10% of the 18 train_val patients (sorted as text, shuffled by split_seed)
    patients = sorted(str(p) for p in range(1, 19))
    random.Random(1).shuffle(patients)
    val = {Path(i.relpath).name[:8] for i in split["val"]}
    assert val == {f"{int(p):08d}" for p in patients[:2]} and len(split["val"]) == 4
    assert not val & {Path(i.relpath).name[:8] for i in split["train"]} and len(split["train"]) == 32
    # image 1 (00000001_001.png): findings 1 and 6 -> Cardiomegaly|Pneumonia
    first = next(i for i in split["train"] + split["val"] if i.relpath == f"{folder}/00000001_001.png")
    assert first.labels == (1, 6) and first.findings == ("Cardiomegaly", "Pneumonia")
    label = data.test_dataloader().dataset[1]["label"]  # 00000019_001.png, n = 37: 9 and 0
    assert label.shape == (14,) and label.nonzero().flatten().tolist() == [0, 9]


def test_chestxray14_fewshot_draws_per_finding_then_normal_images(tmp_path):
    write_chestxray14(tmp_path)
    data = no_validation(ChestXray14DataModule(root=str(tmp_path), num_shots=1, seed=1, num_workers=0))
    data.setup("fit")
    train = data.splits["train"]
    assert len(train) <= 15 and sum(item.is_normal for item in train) == 1
    assert {label for item in train for label in item.labels} == set(range(14))
    assert data.fewshot_split()["train"] == [item.entry() for item in train]


def test_chestxray14_class_rule_with_validation_names_the_findings(tmp_path):
    write_chestxray14(tmp_path)
    message = error_of(ChestXray14DataModule(root=str(tmp_path), num_workers=0).setup, "fit")
    assert "ChestX-ray14 split (Data_Entry_2017.csv, train_val_list.txt, test_list.txt): finding" in message
    assert "has no positive validation images" in message and "(data.findings)" in message


def test_chestxray14_bad_files_name_the_file_and_line(tmp_path):
    images = write_chestxray14(tmp_path)
    entry = tmp_path / "Data_Entry_2017.csv"
    lines = entry.read_text().splitlines()
    lines[3] = lines[3].replace("Effusion", "Pneumonitis")
    lines[7] = lines[7].replace("No Finding", "")
    entry.write_text("\n".join(lines) + "\n")
    message = error_of(ChestXray14DataModule(root=str(tmp_path)).setup)
    assert f"{entry}, line 4: unknown finding(s) ['Pneumonitis']; ChestX-ray14's findings are" in message
    assert f"{entry}, line 8: empty Finding Labels (an image without findings says 'No Finding')" in message
    write_chestxray14(tmp_path)
    (tmp_path / "images_002/images" / images[40]).unlink()
    write(tmp_path / "test_list.txt", [*images[36:], "99999999_000.png"])
    message = error_of(ChestXray14DataModule(root=str(tmp_path)).setup)
    assert f"{tmp_path / 'test_list.txt'}, line 13: '99999999_000.png' is not in Data_Entry_2017.csv" in message
    assert f"{tmp_path}: 1 listed image(s) are in no images*/ folder, e.g. ['{images[40]}']" in message
    (tmp_path / "Data_Entry_2017.csv").rename(tmp_path / "Data_Entry_2017_v2020.csv")
    assert error_of(ChestXray14DataModule(root=str(tmp_path)).setup)  # the 2020 file is found too
    (tmp_path / "Data_Entry_2017_v2020.csv").unlink()
    with pytest.raises(FileNotFoundError, match="no Data_Entry_2017.csv or Data_Entry_2017_v2020.csv"):
        ChestXray14DataModule(root=str(tmp_path))


# ------------------------------------------------------------------------------------------------
# CheXpert in its official layout.
CHEXPERT_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_OBSERVATIONS)
CYCLE = ["1.0", "", "0.0", "-1.0"]


def chexpert_row(split: str, patient: int, view: str, values: list[str]) -> str:
    number = 1 if view == "Frontal" else 2
    path = f"CheXpert-v1.0-small/{split}/patient{patient:05d}/study1/view{number}_{view.lower()}.jpg"
    return ",".join([path, "Female", "68", view, "AP" if view == "Frontal" else ""] + values)


def write_chexpert(parent: Path) -> Path:
    """CheXpert-v1.0-small/ with 20 training patients (a frontal and a lateral view each; the 14
    observations cycle through 1.0, blank, 0.0, -1.0) and 6 validation patients (frontal)."""
    folder = parent / "CheXpert-v1.0-small"
    train = [chexpert_row("train", p, view, [CYCLE[(p + j + v) % 4] for j in range(14)])
             for p in range(1, 21) for v, view in enumerate(("Frontal", "Lateral"))]
    valid = [chexpert_row("valid", p, "Frontal", ["1.0" if (p + j) % 2 else "0.0" for j in range(14)])
             for p in range(64541, 64547)]
    write(folder / "train.csv", [CHEXPERT_HEADER, *train])
    write(folder / "valid.csv", [CHEXPERT_HEADER, *valid])
    for row in train + valid:
        png(folder / row.split(",")[0].split("/", 1)[1])
    return folder


def test_chexpert_from_its_official_files(tmp_path):
    folder = write_chexpert(tmp_path)
    for root in (tmp_path, folder):  # the unpacked folder, or the folder holding it
        data = no_validation(CheXpertDataModule(root=str(root), num_workers=0))
        assert data.image_dir == folder and data.task == "multilabel" and data.dataset_name == "CheXpert"
        assert data.classnames == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
        data.setup("fit")
    split = data.full_split
    assert [i.relpath for i in split["test"]][:1] == ["valid/patient64541/study1/view1_frontal.jpg"]
    assert len(split["test"]) == 6 and len(split["train"]) + len(split["val"]) == 40
    val = {i.relpath.split("/")[1] for i in split["val"]}
    assert len(val) == 2 and not val & {i.relpath.split("/")[1] for i in split["train"]}
    # patient 1, frontal (v = 0): observation j is CYCLE[(1 + j) % 4]; Atelectasis is j = 8 -> "" (blank: 0),
    # Cardiomegaly j = 2 -> "-1.0", Consolidation j = 6 -> "-1.0", Edema j = 5 -> "0.0", Effusion j = 10 -> "-1.0"
    expected = {"ignore": ((), (1, 2, 4)), "ones": ((1, 2, 4), ()), "zeros": ((), ())}
    for policy, (labels, ignored) in expected.items():
        data = CheXpertDataModule(root=str(tmp_path), uncertain=policy)
        item = next(i for s in data.read_split().values() for i in s
                    if i.relpath == "train/patient00001/study1/view1_frontal.jpg")
        assert (item.labels, item.ignored) == (labels, ignored), policy
    # patient 2, frontal: Atelectasis j = 8 -> (2 + 8) % 4 = 2 -> "0.0"; Edema j = 5 -> 3 -> "-1.0";
    # Cardiomegaly j = 2 -> 0 -> "1.0"; Consolidation j = 6 -> 0 -> "1.0"; Effusion j = 10 -> 0 -> "1.0"
    data = CheXpertDataModule(root=str(tmp_path), num_workers=0)
    data.setup("test")
    item = next(i for s in data.full_split.values() for i in s if i.relpath == "train/patient00002/study1/view1_frontal.jpg")
    assert item == MultiLabelItem(item.relpath, (1, 2, 4), ("Cardiomegaly", "Consolidation", "Pleural Effusion"), (3,))


def test_chexpert_blank_is_negative_frontal_only_and_chosen_findings(tmp_path):
    write_chexpert(tmp_path)
    data = CheXpertDataModule(root=str(tmp_path), findings=["No Finding", "pleural effusion"], frontal_only=True)
    assert data.classnames == ["No Finding", "Pleural Effusion"]
    split = data.read_split()
    assert all("frontal" in i.relpath for s in split.values() for i in s)
    assert len(split["train"]) + len(split["val"]) == 20
    # patient 3 frontal: No Finding j = 0 -> CYCLE[3] = "-1.0" (ignored); Effusion j = 10 -> CYCLE[1] = "" (blank: 0)
    item = next(i for s in split.values() for i in s if i.relpath.startswith("train/patient00003/"))
    assert item == MultiLabelItem(item.relpath, (), (), (0,))
    with pytest.raises(ValueError, match=r"data.findings: \['Pneumonitis'\] are not CheXpert observations"):
        CheXpertDataModule(root=str(tmp_path), findings=["Edema", "Pneumonitis"])


def test_chexpert_bad_files_name_the_file_and_line(tmp_path):
    folder = write_chexpert(tmp_path)
    lines = (folder / "train.csv").read_text().splitlines()
    for index, column, value in ((2, 5, "2.0"), (5, 13, "yes")):  # patient 1 lateral: No Finding; 3 frontal: Atelectasis
        cells = lines[index].split(",")
        cells[column] = value
        lines[index] = ",".join(cells)
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    message = error_of(CheXpertDataModule(root=str(tmp_path), findings=["No Finding", "Atelectasis"]).setup)
    assert f"{folder / 'train.csv'}, line 3: 'No Finding' is '2.0'; write 1 (present), 0 (absent) or -1" in message
    assert f"{folder / 'train.csv'}, line 6: 'Atelectasis' is 'yes'" in message
    with pytest.raises(FileNotFoundError, match="no CheXpert train.csv here nor in"):
        CheXpertDataModule(root=str(tmp_path / "elsewhere"))


# ------------------------------------------------------------------------------------------------
# Patient-wise split, the demo, the bank.
def test_patient_split_holds_out_whole_patients():
    items = [(f"p{p}", k) for p in range(10) for k in range(3)]
    rest, held = patient_split(items, lambda item: item[0], 0.3, seed=5)
    patients = sorted(f"p{p}" for p in range(10))
    random.Random(5).shuffle(patients)
    assert {i[0] for i in held} == set(patients[:3]) and len(held) == 9
    assert rest == [i for i in items if i not in held]


def test_multilabel_demo_is_generated_and_read_as_a_multi_label_csv():
    data = DemoMultiLabelDataModule(num_shots=16, num_workers=0)
    data.setup()
    assert data.task == "multilabel" and data.dataset_name == "demo_multilabel"
    assert data.classnames == ["circle", "cross", "square", "stripes"]
    assert {name: len(items) for name, items in data.splits.items()} == {"train": 75, "val": 19, "test": 72}
    assert sum(item.is_normal for item in data.full_split["train"]) > 0


@pytest.mark.slow
def test_multilabel_demo_config_builds_through_the_cli(tmp_path, tiny_demo_backbone):
    from dpt_lightning.cli import build_cli

    cli = build_cli(["--config", str(ROOT / "trainers/coop.yaml"), "--config",
                     str(ROOT / "datasets/demo_multilabel.yaml"), "--trainer.default_root_dir", str(tmp_path)],
                    run=False)
    assert cli.datamodule.task == "multilabel"
    assert cli.model.classnames == ["circle", "cross", "square", "stripes"]


def test_the_chestxray14_bank_serves_chexpert_names_too():
    bank = load_bank("chestxray14")
    findings = [name.replace("_", " ") for name in CHESTXRAY14_LABELS]
    for name in [*findings, "No Finding"]:
        assert 45 <= len(bank[name]) <= 55 and len(set(bank[name])) == len(bank[name]), name
    everything = [s for name in [*findings, "No Finding"] for s in bank[name]]
    assert len(set(everything)) == len(everything)
    assert resolve_sentences("auto", "ChestXray14", list(CHESTXRAY14_LABELS))[12] == bank["Pleural Thickening"]
    chexpert = resolve_sentences("auto", "CheXpert", ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                                                      "Pleural Effusion"])
    assert chexpert[4] == bank["Effusion"]
    assert resolve_sentences("auto", "demo_multilabel", ["circle"]) == [load_bank("demo")["circle"]]
    with pytest.raises(DescriptionBankError, match="'x': an alias names a class of the bank that has sentences"):
        validate_bank({"a": ["one"], "x": "b"}, "bank.json")


def test_the_readme_multi_label_example_runs_as_written():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Multi-label and DICOM"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    data = namespace["data"]
    assert data.task == "multilabel" and namespace["batch"]["label"].shape[1] == 4
