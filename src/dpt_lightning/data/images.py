"""Reading medical images as 3-channel RGB, whatever their mode and bit depth, and DICOM files
(`dpt_lightning.data.dicom`: rescale, window, MONOCHROME1) wherever an image path is accepted."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from dpt_lightning.data.dicom import (DICOM_SUFFIXES, DicomReadError, DicomWindow, is_dicom, read_dicom_rgb,
                                      read_header)

#: Formats PIL reads, and DICOM.
PIL_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp")
IMAGE_EXTENSIONS = PIL_EXTENSIONS + DICOM_SUFFIXES

#: Refuse images that would decompress to more pixels than this (decompression bombs).
MAX_PIXELS = 100_000_000


class ImageReadError(ValueError):
    """An image file that cannot be used, with the file named in the message."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA, CMYK and 16-bit images become 8-bit RGB (alpha on black)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        array = (array - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(array)
        image = Image.fromarray(array.round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def load_rgb(path: str | Path, dicom_window: DicomWindow = 0) -> Image.Image:
    """Open ``path`` fully and return it as RGB; any problem is an ``ImageReadError`` naming the file.
    A DICOM file (`dicom.is_dicom`) is read through pydicom with ``dicom_window`` (`dicom.DicomWindow`)."""
    if is_dicom(path, PIL_EXTENSIONS):
        try:
            return read_dicom_rgb(path, dicom_window, MAX_PIXELS)
        except DicomReadError as err:
            raise ImageReadError(str(err)) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ImageReadError(
                        f"{path}: {image.width}x{image.height} pixels is larger than the limit of "
                        f"{MAX_PIXELS} (possible decompression bomb)"
                    )
                image.load()
                return to_rgb(image)
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageReadError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err


def list_images(folder: str | Path) -> list[str]:
    """Names of the image files directly inside ``folder`` (known extensions, any case; hidden
    files skipped), sorted so that every file system gives the same order."""
    return sorted(entry.name for entry in Path(folder).iterdir()
                  if entry.is_file() and not entry.name.startswith(".")
                  and entry.suffix.lower() in IMAGE_EXTENSIONS)


def check_image(path: str | Path, decode: bool = True, dicom_window: DicomWindow = 0) -> str | None:
    """None if ``path`` is a usable image, else a one-line description of the problem.

    ``decode=False`` checks existence, size and the header only (fast); ``True`` decodes fully
    (a DICOM file with ``dicom_window``).
    """
    path = Path(path)
    if not path.is_file():
        return f"{path}: file not found"
    if path.stat().st_size == 0:
        return f"{path}: empty file (0 bytes)"
    try:
        if decode:
            load_rgb(path, dicom_window)
        elif is_dicom(path, PIL_EXTENSIONS):
            read_header(path, MAX_PIXELS)
        else:
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    return f"{path}: {image.width}x{image.height} pixels is larger than the limit of {MAX_PIXELS}"
    except (ImageReadError, DicomReadError) as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad headers
        return f"{path}: cannot read image ({type(err).__name__}: {err})"
    return None
