"""DICOM input (issue 22): ``.dcm`` files are read through pydicom wherever an image path is
accepted, on the DICOM files that pydicom itself ships.

Pixel values equal a hand-applied rescale (modality LUT) + window (PS3.3 C.11.2.1.2, LINEAR) +
MONOCHROME1 inversion + one rounding to 8 bits, computed here from the file's own tags; files that
cannot be used (no pixel data, several frames, a compressed syntax without its decoder, a window the
file does not have) are one message naming the file. pydicom ships no MONOCHROME1 file, so one is
made here from MR_small.dcm by changing that tag.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dpt_lightning.data import CSVDataModule, DataError, ImageFolderDataModule
from dpt_lightning.data.dataset import view_group
from dpt_lightning.data.images import ImageReadError, check_image, list_images, load_rgb

CT = get_testdata_file("CT_small.dcm")  # 16-bit CT, RescaleSlope 1, RescaleIntercept -1024, no window
MR = get_testdata_file("MR_small.dcm")  # 16-bit MR, one window: centre 600, width 1600


def stored(path) -> tuple[pydicom.Dataset, np.ndarray]:
    ds = pydicom.dcmread(path)
    return ds, ds.pixel_array.astype(np.float64)


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, written out: below the window 0, above it 1, linear in between."""
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    out = (values - (center - 0.5)) / (width - 1) + 0.5
    return np.where(values <= low, 0.0, np.where(values > high, 1.0, out))


def to_8bit(unit: np.ndarray) -> np.ndarray:
    return np.round(unit * 255).astype(np.uint8)


def gray(image: Image.Image) -> np.ndarray:
    array = np.asarray(image)
    assert image.mode == "RGB" and (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    return array[..., 0]


# ------------------------------------------------------------------------------------------------
def test_ct_rescaled_to_hounsfield_units_then_windowed(tmp_path):
    ds, raw = stored(CT)
    hu = raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert float(ds.RescaleIntercept) == -1024 and "WindowCenter" not in ds
    # an explicit lung window over Hounsfield units, not over the stored values
    assert (gray(load_rgb(CT, dicom_window=(-600, 1500))) == to_8bit(linear_window(hu, -600, 1500))).all()
    assert (gray(load_rgb(CT, dicom_window=[40, 400])) == to_8bit(linear_window(hu, 40, 400))).all()
    # no window in the file: the image's own range
    expected = to_8bit((hu - hu.min()) / (hu.max() - hu.min()))
    assert (gray(load_rgb(CT)) == expected).all() and (gray(load_rgb(CT, dicom_window="minmax")) == expected).all()


def test_mr_uses_the_files_first_window_unless_told_otherwise():
    ds, raw = stored(MR)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600, 1600) and "RescaleSlope" not in ds
    image = gray(load_rgb(MR))
    assert image.shape == raw.shape and (image == to_8bit(linear_window(raw, 600, 1600))).all()
    assert (gray(load_rgb(MR, dicom_window="minmax")) == to_8bit((raw - raw.min()) / (raw.max() - raw.min()))).all()
    with pytest.raises(ImageReadError, match=r"MR_small.dcm: data.dicom_window 1 asks for view 1, but the file has 1"):
        load_rgb(MR, dicom_window=1)


def test_second_window_of_a_file_with_several(tmp_path):
    ds = pydicom.dcmread(MR)
    ds.WindowCenter, ds.WindowWidth = [600, 300], [1600, 200]
    path = tmp_path / "two_windows.dcm"
    ds.save_as(path)
    raw = ds.pixel_array.astype(np.float64)
    assert (gray(load_rgb(path)) == to_8bit(linear_window(raw, 600, 1600))).all()
    assert (gray(load_rgb(path, dicom_window=1)) == to_8bit(linear_window(raw, 300, 200))).all()


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(MR)
    ds.PhotometricInterpretation = "MONOCHROME1"  # higher values darker
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    raw = ds.pixel_array.astype(np.float64)
    assert (gray(load_rgb(path)) == to_8bit(1.0 - linear_window(raw, 600, 1600))).all()


@pytest.mark.parametrize("entries, first, vr", [(256, 0, "US"), (1024, -512, "US"), (1024, -512, "OW")])
def test_voi_lut_sequence_when_the_file_has_no_window(tmp_path, entries, first, vr):
    """A VOI LUT table (8-bit output) over Hounsfield units: values below the table take its first
    entry, values past it the last; 1024 entries exceed the 8-bit range that pydicom's own lookup
    computes its index in."""
    ds = pydicom.dcmread(CT)
    table = (np.arange(entries)[::-1] * 256 // entries).astype(np.uint16)  # decreasing, 255 .. 0
    lut = Dataset()
    # LUT Descriptor (entries, first value mapped, bits): SS when the first value is negative
    lut.add_new(0x00283002, "SS" if first < 0 else "US", [entries, first, 8])
    lut.add_new(0x00283006, vr, table.tobytes() if vr == "OW" else table.tolist())  # LUT Data
    ds.VOILUTSequence = Sequence([lut])
    path = tmp_path / "lut.dcm"
    ds.save_as(path)
    hu = ds.pixel_array.astype(np.float64) - 1024
    expected = table[np.clip(hu - first, 0, entries - 1).astype(int)] / 255
    assert (gray(load_rgb(path)) == to_8bit(expected)).all()


def test_colour_dicom_is_kept_as_rgb():
    path = get_testdata_file("examples_rgb_color.dcm")
    ds = pydicom.dcmread(path)
    assert (np.asarray(load_rgb(path)) == ds.pixel_array).all()


@pytest.mark.parametrize("name, message", [
    ("rtplan.dcm", "the DICOM file has no pixel data (it is RTPLAN); only image files can be used"),
    ("rtdose.dcm", "a multi-frame DICOM (15 frames); one file must hold one image"),
    ("SC_rgb_rle_2frame.dcm", "a multi-frame DICOM (2 frames)"),
])
def test_unusable_dicom_files_are_one_message_naming_the_file(name, message):
    path = get_testdata_file(name)
    for problem in (check_image(path, decode=False), check_image(path, decode=True)):
        assert problem == f"{path}: {message}" or problem.startswith(f"{path}: {message}")
    with pytest.raises(ImageReadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_rgb(path)


def test_a_compressed_syntax_without_its_decoder_names_the_package():
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    problem = check_image(path, decode=False)
    assert problem == (f"{path}: the pixel data is compressed as JPEG-LS Lossless Image Compression "
                       f"({JPEGLSLossless}) and no installed decoder reads it; pip install pylibjpeg "
                       "pylibjpeg-libjpeg (or python-gdcm)")
    with pytest.raises(ImageReadError, match="pip install pylibjpeg pylibjpeg-libjpeg"):
        load_rgb(path)


def test_compressed_syntaxes_with_an_installed_decoder_are_read():
    rle = get_testdata_file("MR_small_RLE.dcm")  # decoded by pydicom itself
    assert (np.asarray(load_rgb(rle)) == np.asarray(load_rgb(MR))).all()


def test_a_dicom_without_a_suffix_is_recognised_and_a_broken_one_named(tmp_path):
    plain = tmp_path / "IM00001"
    shutil.copy(MR, plain)
    assert (np.asarray(load_rgb(plain)) == np.asarray(load_rgb(MR))).all()
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a dicom file at all" * 10)
    assert check_image(broken, decode=False).startswith(f"{broken}: not a DICOM file")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(Path(MR).read_bytes()[:-2000])
    assert check_image(truncated).startswith(f"{truncated}: ")


def test_image_folder_and_csv_accept_dicom_and_report_a_bad_one(tmp_path):
    for name, count in (("ct", 4), ("mr", 4)):
        (tmp_path / name).mkdir()
        for k in range(count):
            shutil.copy(CT if name == "ct" else MR, tmp_path / name / f"{k}.dcm")
    assert list_images(tmp_path / "ct") == ["0.dcm", "1.dcm", "2.dcm", "3.dcm"]
    data = ImageFolderDataModule(root=str(tmp_path), num_workers=0)
    data.setup()
    sample = data.test_dataloader().dataset[0]
    assert sample["image"].shape == (3, 224, 224) and sample["path"].endswith(".dcm")
    shutil.copy(get_testdata_file("rtplan.dcm"), tmp_path / "mr" / "1.dcm")
    rows = [f"{name}/{k}.dcm,{name}" for name in ("ct", "mr") for k in range(4)]
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"mr/1.dcm: the DICOM file has no pixel data"):
        CSVDataModule(csv=str(tmp_path / "labels.csv"), num_workers=0).setup()


@pytest.mark.parametrize("window", [-1, True, [1500], [40, 0], "lung", 2.5])
def test_a_bad_dicom_window_setting_names_it(tmp_path, window):
    with pytest.raises(ValueError, match="data.dicom_window must be a window index"):
        ImageFolderDataModule(root=str(tmp_path), dicom_window=window)


def test_the_dicom_window_setting_reaches_the_images_and_the_view_digests(tmp_path):
    assert view_group("t", tmp_path, None) == view_group("t", tmp_path, None, 0)  # digests of old runs kept
    assert view_group("t", tmp_path, None, (40, 400)) != view_group("t", tmp_path, None)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for k in range(4):
            shutil.copy(CT, tmp_path / name / f"{k}.dcm")
    default, lung = (ImageFolderDataModule(root=str(tmp_path), num_workers=0, **kwargs)
                     for kwargs in ({}, {"dicom_window": [-600, 1500]}))
    for data in (default, lung):
        data.setup()
        data.use_transforms(np.asarray, np.asarray)  # the decoded picture itself
    ds, raw = stored(CT)
    hu = raw - 1024
    assert (gray(Image.fromarray(lung.test_dataloader().dataset[0]["image"])) ==
            to_8bit(linear_window(hu, -600, 1500))).all()
    assert lung.test_dataloader().dataset.eval_group != default.test_dataloader().dataset.eval_group
