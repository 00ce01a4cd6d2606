"""Untrusted split files and images (property-based): a clear DataError or a dataset that loads,
never a crash from deep inside PIL or torch, never a crash later in a loader worker."""
from __future__ import annotations

import io
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
