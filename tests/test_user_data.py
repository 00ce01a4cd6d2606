"""The user's own data (issue 15.1, 15.7, 15.8; issue 12.4): an image folder and a label CSV,
through the real ``dpt`` command as the README shows them, and every way a CSV can be wrong.

Checked: ``dpt fit``/``test``/``predict`` on a CSV configured exactly as in the README (which used
to crash every subcommand merging hyperparameters: the datamodule's own ``classnames`` argument
clashed with the model's linked class names) and on an image folder; the CSV's class order
(``class_order``); and one clear `DataError` naming the file and the lines for an empty CSV, a
Latin-1 CSV, a bad structure, missing columns, empty cells, bad split values and an image listed
twice (within or across splits).
"""
from __future__ import annotations

import inspect
import os
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

import dpt_lightning
from dpt_lightning.data import (CSVDataModule, DataError, ImageFolderDataModule, Item, MedicalDataModule,
                                read_label_csv)
from dpt_lightning.data.splits import build_split

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["benign tumor", "normal scan", "malignant tumor"]


def write_images(folder: Path, counts: dict[str, int], seed: int = 0) -> list[tuple[str, str]]:
    """Tiny PNGs in ``folder/<class with _>/<n>.png``; returns (relpath, class) in writing order."""
    rng = random.Random(seed)
    rows = []
    for name, n in counts.items():
        sub = folder / name.replace(" ", "_")
        sub.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            Image.new("RGB", (rng.randint(8, 12), 10), tuple(rng.randrange(256) for _ in range(3))).save(sub / f"{k}.png")
            rows.append((f"{name.replace(' ', '_')}/{k}.png", name))
    return rows


def write_csv(path: Path, rows: list[tuple], header: str = "path,label") -> Path:
    lines = [header] + [",".join(f'"{v}"' if "," in v else v for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cli_args(*args: str, root: Path) -> list[str]:
    return [*args, "--config", str(REPO / "trainers/coop.yaml"), "--model.init_args.backbone", "tiny",
            "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root / "logs"),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4"]


def build(*args: str):
    from dpt_lightning.cli import build_cli

    return build_cli(list(args))


# ------------------------------------------------------------------------------------------------
# Through the CLI.
@pytest.fixture
def csv_data(tmp_path) -> Path:
    rows = write_images(tmp_path / "images", {"normal scan": 6, "benign tumor": 5})
    return write_csv(tmp_path / "labels.csv", [(f"images/{p}", c) for p, c in rows])


def test_csv_as_the_readme_shows_fits_tests_and_predicts(tmp_path, csv_data, tiny):
    config = tmp_path / "data.yaml"  # the README's block, word for word, with the CSV's path
    config.write_text(f"data:\n  class_path: dpt_lightning.CSVDataModule\n"
                      f"  init_args: {{csv: {csv_data}, num_shots: -1}}\n")
    fit = subprocess.run([sys.executable, "-m", "dpt_lightning", *cli_args("fit", root=tmp_path), "--config", str(config)],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path, env=os.environ.copy())
    assert fit.returncode == 0, fit.stderr[-4000:]
    assert "Error while merging hparams" not in fit.stderr and "test_acc" in fit.stdout
    ckpt = tmp_path / "logs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    tested = build(*cli_args("test", root=tmp_path), "--config", str(config), "--ckpt_path", str(ckpt))
    assert tested.model.classnames == ["benign tumor", "normal scan"]  # sorted labels
    assert 0 <= float(tested.trainer.callback_metrics["test_acc"]) <= 1

    out = tmp_path / "predictions.csv"
    predicted = build(*cli_args("predict", root=tmp_path), "--config", str(config), "--ckpt_path", str(ckpt),
                      "--predictions.path", str(out))
    table = pd.read_csv(out)
    test_items = predicted.datamodule.splits["test"]
    assert len(table) == len(test_items) == 2 + 2  # 50/20/30 of 6 and of 5: 2 test images each
    assert list(table.columns) == ["path", "prediction", "prob_benign tumor", "prob_normal scan"]
    assert sorted(table["path"]) == sorted(str(tmp_path / i.relpath) for i in test_items)


def test_csv_class_order_through_the_cli(tmp_path, csv_data, tiny):
    cli = build(*cli_args("fit", root=tmp_path), "--data.class_path", "dpt_lightning.CSVDataModule",
                "--data.init_args.csv", str(csv_data), "--data.init_args.class_order",
                '["normal scan", "benign tumor"]', "--test_after_fit", "false")
    assert cli.model.classnames == cli.datamodule.classnames == ["normal scan", "benign tumor"]
    assert cli.trainer.current_epoch == 1
    labels = {i.classname: i.label for i in cli.datamodule.splits["train"]}
    assert labels == {"normal scan": 0, "benign tumor": 1}


def test_image_folder_fits_tests_and_predicts_through_the_cli(tmp_path, tiny):
    write_images(tmp_path / "scans", {"benign tumor": 5, "normal scan": 4})
    data = ["--data.class_path", "dpt_lightning.ImageFolderDataModule", "--data.init_args.root",
            str(tmp_path / "scans"), "--data.init_args.num_shots", "2"]
    fit = build(*cli_args("fit", root=tmp_path), *data)
    assert fit.model.classnames == ["benign tumor", "normal scan"] and "test_acc" in fit.trainer.callback_metrics
    ckpt = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    tested = build(*cli_args("test", root=tmp_path), *data, "--ckpt_path", str(ckpt))
    assert float(tested.trainer.callback_metrics["test_acc"]) == float(fit.trainer.callback_metrics["test_acc"])
    out = tmp_path / "predictions.csv"
    build(*cli_args("predict", root=tmp_path), *data, "--ckpt_path", str(ckpt), "--predictions.path", str(out))
    assert len(pd.read_csv(out)) == 2 + 1  # test images of 5 and of 4


def test_no_datamodule_argument_shares_a_name_with_a_model_argument():
    """Lightning merges the datamodule's and the model's hyperparameters and refuses a shared name
    with different values: that is how ``CSVDataModule(classnames=...)`` broke every subcommand."""
    modules = [getattr(dpt_lightning, name) for name in dpt_lightning.__all__]
    classes = [obj for obj in modules if inspect.isclass(obj)]
    data = [c for c in classes if issubclass(c, MedicalDataModule)]
    from lightning.pytorch import LightningModule

    models = [c for c in classes if issubclass(c, LightningModule)]
    assert CSVDataModule in data and len(models) >= 6

    def arguments(cls) -> set[str]:
        return {name for klass in cls.__mro__ if "__init__" in vars(klass)
                for name in inspect.signature(klass.__init__).parameters} - {"self", "args", "kwargs"}

    model_args = set().union(*map(arguments, models))
    for cls in data:
        assert not arguments(cls) & model_args, cls


# ------------------------------------------------------------------------------------------------
# The CSV's own problems: one DataError naming the file (and the lines), never a raw parser error.
def csv_problems(path: Path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        CSVDataModule(csv=str(path), **kwargs)
    message = str(info.value)
    assert str(path) in message
    return message


@pytest.mark.parametrize("content, expected", [
    (b"", "the file is empty"),
    (b"\n  \n", "the file is empty"),
    (b"path,label\n", "no rows after the header"),
    (b"path,label\nb\xe9nin/1.png,b\xe9nin\n", "not UTF-8 text"),  # Latin-1
    (b"path,label\na.png,x,extra\nb.png\n", "line 2: 3 fields, the header has 2"),
    (b"file,class\na.png,x\n", "lacks the column(s) ['path', 'label']"),
    (b"path,label,label\na.png,x,y\n", "repeats the column(s) ['label']"),
    (b'path,label\n"a.png,x\n', "not readable as CSV"),
    (b"path,label\na.png,\n", "line 2: empty label"),
    (b"path,label,split\na.png,x,training\n", "line 2: split 'training' is not train, val or test"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "not UTF-8 text"),  # not a CSV at all
])
def test_a_bad_csv_is_one_clear_error(tmp_path, content, expected):
    path = tmp_path / "labels.csv"
    path.write_bytes(content)
    message = csv_problems(path)
    assert expected in message, message
    assert "Error tokenizing" not in message and "No columns to parse" not in message


def test_every_csv_problem_is_listed_with_its_line(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("path,label,split\na.png,x,train\nb.png,,val\nc.png,y,dev\nd.png,y\n")
    with pytest.raises(DataError) as info:
        CSVDataModule(csv=str(path))
    assert [p.split(": ", 1)[0] for p in info.value.problems] == [f"{path}, line {n}" for n in (3, 4, 5)]
    assert "header line naming the columns path,label" in str(info.value)  # what to do


@pytest.mark.parametrize("rows, first, again", [
    ([("a/1.png", "x", "train"), ("a/2.png", "x", "train"), ("a/1.png", "x", "train")], 2, 4),  # one split
    ([("a/1.png", "x", "train"), ("a/2.png", "x", "val"), ("a/2.png", "x", "test")], 3, 4),  # across splits
    ([("a/1.png", "x", "train"), ("./a//1.png", "x", "test")], 2, 3),  # two spellings of one file
])
def test_an_image_listed_twice_is_an_error_naming_both_lines(tmp_path, rows, first, again):
    path = write_csv(tmp_path / "labels.csv", rows, header="path,label,split")
    message = csv_problems(path)
    assert f"line {again}: the image {rows[again - 2][0]!r} is listed again (first on line {first})" in message


def test_duplicates_without_a_split_column_too(tmp_path):
    path = write_csv(tmp_path / "labels.csv", [("a.png", "x"), ("b.png", "y"), ("a.png", "x")])
    assert "line 4: the image 'a.png' is listed again (first on line 2)" in csv_problems(path)


def test_class_order(tmp_path):
    path = write_csv(tmp_path / "labels.csv", [("a.png", "x"), ("b.png", "y")])
    assert CSVDataModule(csv=str(path)).classnames == ["x", "y"]
    assert CSVDataModule(csv=str(path), class_order=["y", "x"]).classnames == ["y", "x"]
    assert "label(s) ['y'] (lines {'y': [3]}) are not in data.class_order ['x']" in csv_problems(path, class_order=["x"])
    assert "differ only in case" in csv_problems(path, class_order=["x", "y", "X"])
    with pytest.raises(TypeError):
        CSVDataModule(csv=str(path), classnames=["x", "y"])  # renamed: see the class docstring


def test_csv_reading_details(tmp_path):
    """A UTF-8 BOM (spreadsheets write one), spaces after commas, quoted commas and blank lines."""
    path = tmp_path / "labels.csv"
    path.write_bytes('\ufeffpath, label ,split\n"a, b.png", ödem ß ,TRAIN\n\nc.png,x,test\n'.encode())
    rows, has_split = read_label_csv(path)
    assert has_split and [(r.line, r.path, r.label, r.split) for r in rows] == [
        (2, "a, b.png", "ödem ß", "train"), (4, "c.png", "x", "test")]


def test_csv_without_split_column_uses_the_one_split_builder(tmp_path):
    rows = write_images(tmp_path, {"b": 7, "a": 9, "c": 4})
    random.Random(3).shuffle(rows)  # the CSV's row order is each class's order before the shuffle
    data = CSVDataModule(csv=str(write_csv(tmp_path / "labels.csv", rows)), split_seed=5, num_workers=0)
    data.setup()
    label = {"a": 0, "b": 1, "c": 2}
    groups = {label[c]: [Item(p, label[c], c) for p, c in rows if c == name] for name, c in
              ((n, n) for n in "abc")}
    assert data.full_split == build_split(groups, 5)
    # the builder re-stated: classes in label order, one random.Random(seed) stream, round() sizes
    rng, expected = random.Random(5), {"train": [], "val": [], "test": []}
    for name in "abc":
        items = [Item(p, label[c], c) for p, c in rows if c == name]
        rng.shuffle(items)
        n_train, n_val = round(len(items) * 0.5), round(len(items) * 0.2)
        expected["train"] += items[:n_train]
        expected["val"] += items[n_train:n_train + n_val]
        expected["test"] += items[n_train + n_val:]
    assert data.full_split == expected


def test_image_folder_split_is_the_builders_on_sorted_files(tmp_path):
    write_images(tmp_path, {"b": 6, "a": 5})
    (tmp_path / "a" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    data = ImageFolderDataModule(root=str(tmp_path), split_seed=2, num_workers=0)
    data.setup()
    groups = {0: [Item(f"a/{k}.png", 0, "a") for k in range(5)], 1: [Item(f"b/{k}.png", 1, "b") for k in range(6)]}
    assert data.full_split == build_split(groups, 2)
