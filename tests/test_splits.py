"""THE split builder and THE class rule (issue 12.4, 15.7), for every source of a split.

The rule: every class a run uses needs at least one image in every split the run uses; ``fit``
uses train and test, and val when validation runs; ``validate`` val; ``test`` test; ``predict``
only needs a non-empty test split; a set-up without a stage checks all three. ``fit`` also needs
two classes. Checked on the benchmark fallback, the image folder, the CSV without and with a
split column and a split file: each reports every offending class in one `DataError` naming the
class, where its images are, the counts and what to do. Before, a class of exactly 3 images got
an empty test split silently (round(1.5) = 2 train, 1 val, 0 test).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from fakedata import write_fake_dataset
from PIL import Image

from dpt_lightning.data import CSVDataModule, DataError, ImageFolderDataModule, Item, benchmark_datamodule
from dpt_lightning.data.checks import coverage_problems, needed_splits
from dpt_lightning.data.splits import SPLITS, build_split, enough_for_every_split, split_counts


def images(folder: Path, counts: dict[str, int]) -> list[tuple[str, str]]:
    rows = []
    for name, n in counts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            Image.new("RGB", (8, 8), (k * 20 % 256, 0, 0)).save(folder / name / f"{k}.png")
            rows.append((f"{name}/{k}.png", name))
    return rows


def csv_file(folder: Path, rows, split_column: bool = False) -> str:
    header = "path,label,split" if split_column else "path,label"
    (folder / "labels.csv").write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
    return str(folder / "labels.csv")


def error_of(data, stage=None) -> DataError:
    with pytest.raises(DataError) as info:
        data.setup(stage)
    return info.value


def no_validation(data):
    data.trainer = SimpleNamespace(limit_val_batches=0)  # as the reference configs
    return data


# ------------------------------------------------------------------------------------------------
def test_split_sizes_are_the_originals_and_three_images_leave_test_empty():
    assert [split_counts(n) for n in (1, 2, 3, 4, 5, 7, 10)] == [
        (0, 0, 1), (1, 0, 1), (2, 1, 0), (2, 1, 1), (2, 1, 2), (4, 1, 2), (5, 2, 3)]
    assert enough_for_every_split() == 4 and enough_for_every_split(needed=("train", "test")) == 4
    assert enough_for_every_split(needed=("test",)) == 4 and enough_for_every_split(needed=("train",)) == 2


def test_needed_splits_per_stage():
    assert needed_splits(None) == SPLITS
    assert needed_splits("fit") == ("train", "val", "test")
    assert needed_splits("fit", validation=False) == ("train", "test")
    assert needed_splits("validate") == ("val",) and needed_splits("test") == ("test",)
    assert needed_splits("predict") == ()


def test_build_split_takes_classes_in_label_order_with_one_stream():
    groups = {1: [Item(f"b{k}", 1, "b") for k in range(5)], 0: [Item(f"a{k}", 0, "a") for k in range(4)]}
    split = build_split(groups, seed=3)
    assert [i.label for i in split["train"]] == [0, 0, 1, 1] and len(split["test"]) == 1 + 2
    assert split == build_split(dict(sorted(groups.items())), seed=3)  # order of the mapping is irrelevant
    assert split != build_split(groups, seed=4)


# ------------------------------------------------------------------------------------------------
# Every source reports the rule the same way.
def test_image_folder_class_of_three_images(tmp_path):
    images(tmp_path, {"big": 6, "rare": 3, "tiny": 1})
    err = error_of(ImageFolderDataModule(root=str(tmp_path), num_workers=0))
    assert err.problems == [
        f"{tmp_path / 'rare'}: 3 image(s) cannot be split so that train, val and test each get one (class 'rare': "
        "the 50/20/30 split with split_seed=1 gives train 2, val 1, test 0)",
        f"{tmp_path / 'tiny'}: 1 image(s) cannot be split so that train, val and test each get one (class 'tiny': "
        "the 50/20/30 split with split_seed=1 gives train 0, val 0, test 1)"]
    assert "Images per class (train/val/test): 'rare' 2/1/0, 'tiny' 0/0/1" in str(err)
    assert "4 or more per class" in str(err) and "data.split_file" in str(err)


def test_csv_without_split_column_class_of_three_images(tmp_path):
    rows = images(tmp_path, {"big": 6, "rare": 3})
    err = error_of(CSVDataModule(csv=csv_file(tmp_path, rows), num_workers=0), "fit")
    assert err.problems == [f"{tmp_path / 'labels.csv'} (rows of class 'rare'): 3 image(s) cannot be split so that "
                            "train, val and test each get one (class 'rare': the 50/20/30 split with split_seed=1 "
                            "gives train 2, val 1, test 0)"]


def test_csv_with_split_column_class_without_test_images(tmp_path):
    rows = images(tmp_path, {"a": 3, "b": 3, "c": 2})
    splits = ["train", "val", "test", "train", "val", "val", "train", "val"]  # b: no test, c: no test
    path = csv_file(tmp_path, [(p, c, s) for (p, c), s in zip(rows, splits)], split_column=True)
    err = error_of(CSVDataModule(csv=path, num_workers=0), "test")
    assert err.problems == [f"{path}: class 1 'b' has no test images", f"{path}: class 2 'c' has no test images"]
    assert "'b' 1/2/0, 'c' 1/1/0" in str(err)
    err = error_of(CSVDataModule(csv=path, num_workers=0, class_order=["a", "b", "c", "d"]), "fit")
    assert f"{path}: class 3 'd' has no training, validation or test images" in err.problems


def test_split_file_class_without_test_images(tmp_path):
    split = write_fake_dataset(tmp_path, "BUSI")
    split["test"] = [e for e in split["test"] if e[1] != 1]
    path = tmp_path / "BUSI" / "split_BUSI.json"
    path.write_text(json.dumps(split))
    data = benchmark_datamodule("BUSI")(root=str(tmp_path), num_shots=2)
    assert error_of(data, "fit").problems == [f"{path}: class 1 'malignant tumor' has no test images"]
    data.setup("validate")  # a stage that does not use the test split


def test_benchmark_fallback_class_of_three_images_and_the_file_not_written(tmp_path):
    write_fake_dataset(tmp_path, "BUSI", split_file=False)
    folder = tmp_path / "BUSI" / "BUSI" / "normal_scan"
    for extra in sorted(folder.iterdir())[3:]:
        extra.unlink()
    data = benchmark_datamodule("BUSI")(root=str(tmp_path), save_split=True, split_seed=4)
    with pytest.warns(UserWarning, match="not written"):
        err = error_of(data, "fit")
    assert err.problems == [f"{folder}: 3 image(s) cannot be split so that train, val and test each get one "
                            "(class 'normal scan': the 50/20/30 split with split_seed=4 gives train 2, val 1, test 0)"]
    assert not data.split_path.exists()  # a split file is every later run's split: only a good one


# ------------------------------------------------------------------------------------------------
# What "used" means.
def test_validation_may_lack_a_class_when_validation_is_off(tmp_path):
    images(tmp_path, {"a": 5, "b": 2})  # b: train 1, val 0, test 1
    data = ImageFolderDataModule(root=str(tmp_path), num_workers=0)
    err = error_of(data, "fit")  # no trainer: validation assumed
    assert err.problems[0].endswith("gives train 1, val 0, test 1)") and "train, val and test" in err.problems[0]
    no_validation(data).setup("fit")
    assert [i.classname for i in data.splits["train"]].count("b") == 1 and not any(
        i.classname == "b" for i in data.splits["val"])
    err = error_of(data, "validate")  # asked for later: the rule is checked for each new stage
    assert err.problems == [f"{tmp_path / 'b'}: 2 image(s) cannot be split so that val gets one (class 'b': the "
                            "50/20/30 split with split_seed=1 gives train 1, val 0, test 1)"]
    data.setup("test")


def test_test_and_predict_do_not_need_training_images(tmp_path):
    rows = images(tmp_path, {"a": 2, "b": 2})
    path = csv_file(tmp_path, [(p, c, s) for (p, c), s in zip(rows, ["test", "test", "train", "test"])],
                    split_column=True)
    assert "class 0 'a' has no training or validation images" in str(error_of(CSVDataModule(csv=path, num_workers=0), "fit"))
    CSVDataModule(csv=path, num_workers=0).setup("test")
    CSVDataModule(csv=path, num_workers=0).setup("predict")


def test_predict_needs_a_test_image(tmp_path):
    rows = images(tmp_path, {"a": 2})
    path = csv_file(tmp_path, [(p, c, "train") for p, c in rows], split_column=True)
    err = error_of(CSVDataModule(csv=path, num_workers=0), "predict")
    assert err.problems == [f"{path}: the test split has no images of the classes used; predict reads the test split"]


def test_one_class_fails_fit_and_may_be_tested_and_predicted(tmp_path):
    images(tmp_path, {"only": 6})
    err = error_of(no_validation(ImageFolderDataModule(root=str(tmp_path), num_workers=0)), "fit")
    assert len(err.problems) == 1 and "training needs at least two classes; this data has one class, 'only'" \
        in err.problems[0]
    for stage in ("test", "predict"):
        ImageFolderDataModule(root=str(tmp_path), num_workers=0).setup(stage)


def test_busi_novel_half_is_one_class_tested_not_trained(tmp_path):
    write_fake_dataset(tmp_path, "BUSI")
    novel = benchmark_datamodule("BUSI")(root=str(tmp_path), subsample="new", num_shots=4)
    assert novel.classnames == ["normal scan"]
    assert "training needs at least two classes" in str(error_of(novel, "fit"))
    novel.setup("test")
    assert {i.label for i in novel.splits["test"]} == {0}


def test_classes_outside_the_subset_are_not_used(tmp_path):
    split = write_fake_dataset(tmp_path, "BTMRI")
    split["test"] = [e for e in split["test"] if e[1] != 3]  # "normal brain" is a novel class
    (tmp_path / "BTMRI" / "split_BTMRI.json").write_text(json.dumps(split))
    benchmark_datamodule("BTMRI")(root=str(tmp_path), subsample="base").setup("fit")
    assert "class 3 'normal brain' has no test images" in str(
        error_of(benchmark_datamodule("BTMRI")(root=str(tmp_path), subsample="new"), "test"))


def test_coverage_problems_is_a_pure_function():
    split = {"train": [Item("a", 0, "x"), Item("b", 1, "y")], "val": [Item("c", 0, "x")], "test": [Item("d", 0, "x")]}
    problems, hint = coverage_problems(split, ["x", "y"], [0, 1], ("train", "val", "test"), "s.json")
    assert problems == ["s.json: class 1 'y' has no validation or test images"] and "'y' 1/0/0" in hint
    assert coverage_problems(split, ["x", "y"], [0], SPLITS, "s.json") == ([], None)
    assert coverage_problems(split, ["x", "y"], [0, 1], (), "s.json") == ([], None)


def test_data_error_survives_pickling():
    import pickle

    err = DataError(["a.png: bad", "b.png: worse"], "context", "do this")
    again = pickle.loads(pickle.dumps(err))
    assert (again.problems, again.context, again.hint, str(again)) == (err.problems, "context", "do this", str(err))
