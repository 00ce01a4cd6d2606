"""Untrusted split files and images (property-based): a clear DataError or a dataset that loads,
never a crash from deep inside PIL or torch, never a crash later in a loader worker."""
from __future__ import annotations

import io
import os
import json
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dpt_lightning.data import DataError, Item, MedicalDataModule
from dpt_lightning.data.images import ImageReadError, load_rgb

CLASSES = ["glioma tumor", "normal brain", "ödem ß"]  # a class name with unicode


class ThreeClassData(MedicalDataModule):
    @property
    def all_classnames(self) -> list[str]:
        return CLASSES

    def read_split(self) -> dict[str, list[Item]]:  # always given a split_file here
        raise AssertionError


def _png(size=(8, 8), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128 if mode in ("L", "I;16") else (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD_PNG = _png()
IMAGE_BYTES = st.sampled_from([GOOD_PNG, _png(mode="L"), _png(mode="RGBA"), b"", GOOD_PNG[:40], b"not an image"]) \
    | st.binary(max_size=64)
NAMES = st.text(alphabet=string.ascii_letters + string.digits + " ()_-é", min_size=1, max_size=12)
RELPATH = NAMES.map(lambda n: f"{n}.png") | st.sampled_from(["../outside.png", "/etc/passwd", "a/../../x.png", ""])
GOOD_ENTRY = st.tuples(NAMES.map(lambda n: f"{n}.png"), st.integers(0, 2)).map(lambda t: [t[0], t[1], CLASSES[t[1]]])
ANY_ENTRY = GOOD_ENTRY | st.tuples(RELPATH, st.integers(-2, 5) | st.text(max_size=3) | st.none(),
                                   st.sampled_from(CLASSES) | st.text(max_size=8) | st.integers()).map(list) \
    | st.lists(st.integers(), max_size=4) | st.none() | st.text(max_size=5)
SPLIT = st.fixed_dictionaries({}, optional={name: st.lists(ANY_ENTRY, max_size=6) | st.integers()
                                            for name in ("train", "val", "test")})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(split=SPLIT, contents=st.lists(IMAGE_BYTES, min_size=1, max_size=6), shots=st.sampled_from([-1, 1, 2]))
def test_any_split_and_images_give_a_clear_error_or_a_loadable_dataset(split, contents, shots):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = [e[0] for part in split.values() if isinstance(part, list) for e in part
                 if isinstance(e, list) and e and isinstance(e[0], str) and e[0] and "/" not in e[0]]
        for k, name in enumerate(names):
            (root / name).write_bytes(contents[k % len(contents)])
        (root / "split.json").write_text(json.dumps(split))
        data = ThreeClassData(root=str(root), split_file=str(root / "split.json"), num_shots=shots,
                              num_workers=0, check_images="full")
        try:
            data.setup()
        except DataError as err:
            assert err.problems and all(isinstance(p, str) and p for p in err.problems)
            return
        for name in ("train", "val", "test"):  # accepted: every image must now load
            for item in data._dataset(name, data.test_transform):
                assert item["image"].shape[0] == 3


@pytest.mark.parametrize("payload", [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, GOOD_PNG[: len(GOOD_PNG) // 2],
                                     bytes(range(256))])
def test_bad_image_bytes_raise_image_read_error_naming_the_file(tmp_path, payload):
    path = tmp_path / "scan (1).png"
    path.write_bytes(payload)
    with pytest.raises(ImageReadError, match=r"scan \(1\)\.png"):
        load_rgb(path)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    import dpt_lightning.data.images as images

    path = tmp_path / "huge.png"
    Image.new("L", (400, 300)).save(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 100_000)
    with pytest.raises(ImageReadError, match="huge.png.*larger than the limit"):
        load_rgb(path)


def test_sixteen_bit_and_rgba_become_rgb(tmp_path):
    import numpy as np

    deep = tmp_path / "deep.tif"
    Image.fromarray(np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)).save(deep)
    rgb = load_rgb(deep)
    assert rgb.mode == "RGB" and np.asarray(rgb).max() == 255 and np.asarray(rgb).min() == 0
    rgba = tmp_path / "alpha.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(rgba)
    assert load_rgb(rgba).mode == "RGB"


# ------------------------------------------------------------------------------------------------
# File names that are not UTF-8 (issue 15.5): refused in setup, the file named by its bytes, and
# what to do; before, they passed setup and fit and broke `predict` after inference.
LATIN1_NAME = b"caf\xe9 (1).png"  # "café (1).png" written in Latin-1


def _bytes_file(folder: Path, name: bytes, payload: bytes = GOOD_PNG) -> bytes:
    path = os.fsencode(folder) + b"/" + name
    with open(path, "wb") as f:
        f.write(payload)
    return path


def _three_class_folder(root: Path, per_class: int = 5) -> None:
    for name in ("a", "b"):
        (root / name).mkdir()
        for k in range(per_class):
            (root / name / f"{k}.png").write_bytes(GOOD_PNG)


def _assert_names_the_bytes(err: DataError, raw: bytes) -> None:
    (problem,) = [p for p in err.problems if "not valid UTF-8" in p]
    assert problem.startswith(repr(raw)) and "rename it" in problem


def test_image_folder_with_a_latin1_file_name_is_refused_in_setup(tmp_path):
    from dpt_lightning.data import ImageFolderDataModule

    _three_class_folder(tmp_path)
    raw = _bytes_file(tmp_path / "a", LATIN1_NAME)
    data = ImageFolderDataModule(root=str(tmp_path), num_workers=0)  # constructing is fine
    with pytest.raises(DataError) as info:
        data.setup("fit")
    _assert_names_the_bytes(info.value, raw)
    assert data.splits is None


def test_image_folder_with_a_latin1_class_folder_is_refused(tmp_path):
    from dpt_lightning.data import ImageFolderDataModule

    _three_class_folder(tmp_path)
    os.mkdir(os.fsencode(tmp_path) + b"/tumeur_b\xe9nigne")
    with pytest.raises(DataError) as info:  # its name would be a class name: refused at once
        ImageFolderDataModule(root=str(tmp_path))
    (problem,) = info.value.problems
    assert problem.startswith(repr(os.fsencode(tmp_path) + b"/tumeur_b\xe9nigne")) and "folder name is not" in problem


def test_benchmark_fallback_with_a_latin1_file_name_is_refused(tmp_path):
    from fakedata import write_fake_dataset

    from dpt_lightning.data import benchmark_datamodule

    write_fake_dataset(tmp_path, "BUSI", split_file=False)
    raw = _bytes_file(tmp_path / "BUSI" / "BUSI" / "benign_tumor", LATIN1_NAME)
    with pytest.raises(DataError) as info, pytest.warns(UserWarning, match="save_split"):
        benchmark_datamodule("BUSI")(root=str(tmp_path)).setup()
    _assert_names_the_bytes(info.value, raw)


@pytest.mark.parametrize("relpath", ["caf\udce9.png", "caf\ud800.png"])
def test_split_file_naming_a_file_that_is_not_utf8_is_refused(tmp_path, relpath):
    if relpath.endswith("\udce9.png"):
        _bytes_file(tmp_path, b"caf\xe9.png")  # the file exists: still refused
    for name in ("g.png", "n.png", "o.png", "n2.png", "o2.png"):
        (tmp_path / name).write_bytes(GOOD_PNG)
    split = {"train": [["g.png", 0, CLASSES[0]], ["n.png", 1, CLASSES[1]], ["o.png", 2, CLASSES[2]]],
             "val": [], "test": [[relpath, 0, CLASSES[0]], ["n2.png", 1, CLASSES[1]], ["o2.png", 2, CLASSES[2]]]}
    (tmp_path / "split.json").write_text(json.dumps(split))  # JSON escapes: "caf\udce9.png"
    data = ThreeClassData(root=str(tmp_path), split_file=str(tmp_path / "split.json"), num_workers=0)
    with pytest.raises(DataError) as info:
        data.setup("test")
    (problem,) = info.value.problems
    assert "the file name is not valid UTF-8 (listed in" in problem and "test[0]" in problem
    assert problem.startswith(repr(os.fsencode(tmp_path) + b"/caf\xe9.png") if "\udce9" in relpath
                              else ascii(str(tmp_path / relpath)))


# ------------------------------------------------------------------------------------------------
# Split files that are not what they claim (issue 15.8): one DataError naming the file.
@pytest.mark.parametrize("content, message", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"train": ' + "[" * 5000 + "]" * 5000 + ', "val": [], "test": []}', "nested too deeply"),
    (b"{\"train\": [[\"b\xe9nin.png\", 0, \"glioma tumor\"]]}", "not UTF-8 text"),
    ("{'train': []}", "not valid JSON"),
    ("", "not valid JSON"),
])
def test_unreadable_split_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "split.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    data = ThreeClassData(root=str(tmp_path), split_file=str(path))
    with pytest.raises(DataError) as info:
        data.setup()
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}: ") and message in problem


def test_deep_but_parseable_entries_are_shown_short(tmp_path):
    deep = "[" * 300 + "]" * 300
    path = tmp_path / "split.json"
    path.write_text('{"train": [' + deep + '], "val": [], "test": [["a.png", ' + deep + ', "x"]]}')
    with pytest.raises(DataError) as info:
        ThreeClassData(root=str(tmp_path), split_file=str(path)).setup()
    assert len(info.value.problems) == 2 and all(len(p) < 300 for p in info.value.problems)


def test_a_split_file_that_is_a_folder(tmp_path):
    (tmp_path / "split.json").mkdir()
    with pytest.raises(DataError, match="is a folder, not a split file"):
        ThreeClassData(root=str(tmp_path), split_file=str(tmp_path / "split.json")).setup()


def test_split_file_duplicates_in_two_spellings(tmp_path):
    for name in ("g.png", "n.png", "o.png"):
        (tmp_path / name).write_bytes(GOOD_PNG)
    train = [["g.png", 0, CLASSES[0]], ["n.png", 1, CLASSES[1]], ["o.png", 2, CLASSES[2]]]
    (tmp_path / "split.json").write_text(json.dumps({"train": train + [["./g.png", 0, CLASSES[0]]], "val": [],
                                                     "test": [["o.png", 2, CLASSES[2]]]}))
    with pytest.raises(DataError) as info:
        ThreeClassData(root=str(tmp_path), split_file=str(tmp_path / "split.json")).setup("test")
    assert info.value.problems == [f"{tmp_path / 'split.json'}: train[3]: duplicate entry './g.png' (also train[0])"]
    (tmp_path / "split.json").write_text(json.dumps({"train": train, "val": [], "test": [["./o.png", 2, CLASSES[2]]]}))
    with pytest.raises(DataError, match=r"test\[0\] './o.png': also listed in 'train'"):
        ThreeClassData(root=str(tmp_path), split_file=str(tmp_path / "split.json")).setup("test")
