"""Reading DICOM files (``.dcm``) as the 8-bit RGB pictures the transforms expect, through pydicom.

A grayscale image (MONOCHROME1/2) goes through the display pipeline of the DICOM standard, at full
precision (float64) until one final rounding:

1. **Modality LUT**: stored values to modality values (Rescale Slope/Intercept, e.g. Hounsfield
   units, or a Modality LUT Sequence), pydicom's ``apply_modality_lut``.
2. **VOI** (`DicomWindow`, the setting ``data.dicom_window``), to [0, 1]:

   * ``0`` (default), ``1``, ...: that view of the file: its Window Center/Width pair of that
     index (with the file's VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID, PS3.3 C.11.2.1.2),
     else its VOI LUT Sequence item of that index; a file with neither is stretched min..max. An
     index the file does not have is an error naming the file.
   * ``[center, width]``: this window (LINEAR) for every file, e.g. ``[-600, 1500]`` for lungs in CT.
   * ``"minmax"``: each image's own modality values stretched min..max (no VOI).
3. **MONOCHROME1** (higher values darker) inverted, so that every image is white-on-black alike.
4. One rounding to 8 bits: ``round(255 * y)``, copied to three channels.

Why 8 bits at the end: the transforms (torchvision on PIL images) and every backbone here were made
for 8-bit RGB pictures, and the window is the step that chooses which values matter; 256 levels over
the window is the precision of a radiology display (a 1500 HU lung window: 6 HU a level, below CT
noise). Everything before the window keeps the file's full 12/16-bit precision.

Colour DICOMs (RGB; YBR, which pydicom converts to RGB) are kept as they are (scaled to 8 bits
when stored with more). Refused, each with one message naming the file: a file without pixel data,
a multi-frame file, a palette or other photometric interpretation, and a compressed transfer syntax
whose optional decoder is not installed (the message names the package to install).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

#: Suffixes of DICOM files (any case); a file with another suffix that is no known image format is
#: recognised by the ``DICM`` marker of the DICOM file format.
DICOM_SUFFIXES = (".dcm", ".dicom")
#: ``data.dicom_window``: the index of the file's own window / VOI LUT, a ``[center, width]``, or ``minmax``.
DicomWindow = int | tuple[float, float] | Literal["minmax"]
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GRAY = ("MONOCHROME1", "MONOCHROME2")

#: pip packages that decode each family of compressed transfer syntaxes (pydicom plugins).
_DECODERS = {
    "JPEG 2000": "pylibjpeg pylibjpeg-openjpeg",
    "High-Throughput JPEG 2000": "pylibjpeg pylibjpeg-openjpeg",
    "JPEG-LS": "pylibjpeg pylibjpeg-libjpeg",
    "JPEG": "pylibjpeg pylibjpeg-libjpeg",
}


class DicomReadError(ValueError):
    """A DICOM file that cannot be used, with the file named in the message."""


def check_dicom_window(window: object) -> DicomWindow:
    """``data.dicom_window`` as used: an index (0 or more), ``(center, width)`` (a list becomes a
    tuple) or ``"minmax"``; anything else is a ``ValueError`` saying what to give."""
    if isinstance(window, (list, tuple)) and len(window) == 2 and \
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in window) and window[1] > 0:
        return (float(window[0]), float(window[1]))
    if window == "minmax" or (isinstance(window, int) and not isinstance(window, bool) and window >= 0):
        return window
    raise ValueError(f"data.dicom_window must be a window index of the files (0, 1, ...), [center, width] with a "
                     f"positive width, or 'minmax'; got {window!r}")


def is_dicom(path: str | Path, image_suffixes: tuple[str, ...] = ()) -> bool:
    """Is ``path`` a DICOM file? Its suffix is ``.dcm``/``.dicom``, or it has none of
    ``image_suffixes`` and carries the ``DICM`` marker at byte 128 (DICOM files often have no suffix)."""
    suffix = Path(path).suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in image_suffixes:
        return False
    try:
        with open(path, "rb") as file:
            head = file.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def install_hint(transfer_syntax) -> str:
    """What to install to decode ``transfer_syntax`` (a pydicom UID)."""
    name = getattr(transfer_syntax, "name", str(transfer_syntax))
    for family, packages in _DECODERS.items():
        if name.startswith(family):
            return f"pip install {packages} (or python-gdcm)"
    return "pip install python-gdcm"


def read_header(path: str | Path, max_pixels: int):
    """The dataset of ``path`` with its pixel data not loaded (deferred), after every check that needs
    no decoding: pixel data present, one frame, a supported photometric interpretation, at most
    ``max_pixels`` pixels, and a decoder for its transfer syntax installed."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import get_decoder

    try:
        ds = pydicom.dcmread(path, defer_size=1024)
    except InvalidDicomError:
        raise DicomReadError(f"{path}: not a DICOM file (no 'DICM' marker after the 128-byte preamble); "
                             "rewrite it as a DICOM file (e.g. pydicom's dcmwrite) or convert it to PNG") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DicomReadError(f"{path}: cannot read the DICOM file ({type(err).__name__}: {err})") from None
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        kind = ds.get("Modality") or ds.get("SOPClassUID", "")
        kind = getattr(kind, "name", kind) or "no image"
        raise DicomReadError(f"{path}: the DICOM file has no pixel data (it is {kind}); only image files can be used")
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, ValueError, TypeError) as err:
        raise DicomReadError(f"{path}: the DICOM file's image size is unreadable "
                             f"({type(err).__name__}: {err})") from None
    if frames > 1:
        raise DicomReadError(f"{path}: a multi-frame DICOM ({frames} frames); one file must hold one image: "
                             "write the frame you want to its own file")
    if rows * columns > max_pixels:
        raise DicomReadError(f"{path}: {columns}x{rows} pixels is larger than the limit of {max_pixels}")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric not in _GRAY and photometric != "RGB" and not photometric.startswith("YBR"):
        raise DicomReadError(f"{path}: photometric interpretation {photometric!r} is not supported (grayscale "
                             "MONOCHROME1/2 and colour RGB/YBR are); convert the file to RGB or grayscale")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise DicomReadError(f"{path}: the pixel data is compressed as {syntax.name} ({syntax}) and no installed "
                                 f"decoder reads it; {install_hint(syntax)}")
    return ds


def read_dicom_rgb(path: str | Path, window: DicomWindow = 0, max_pixels: int = 100_000_000) -> Image.Image:
    """``path`` as an 8-bit RGB picture (see the module's docstring); every problem is a
    `DicomReadError` naming the file."""
    ds = read_header(path, max_pixels)
    try:
        pixels = ds.pixel_array
    except RuntimeError as err:  # pydicom: no plugin could decode (missing or failing decoders)
        syntax = ds.file_meta.TransferSyntaxUID
        reason = str(err).splitlines()[-1].strip()
        raise DicomReadError(f"{path}: cannot decode the pixel data ({syntax.name}: {reason}); "
                             f"{install_hint(syntax)}") from None
    except (ValueError, AttributeError, KeyError, TypeError, NotImplementedError) as err:
        raise DicomReadError(f"{path}: cannot decode the pixel data ({type(err).__name__}: {err})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric not in _GRAY:  # colour: converted to RGB by pydicom; no VOI for colour images
        bits = int(ds.get("BitsStored") or 8)
        rgb = pixels if bits <= 8 else np.round(pixels.astype(np.float64) * (255 / (2 ** bits - 1)))
        return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")
    unit = gray_unit(pixels, ds, window, path)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return Image.fromarray(np.round(unit * 255.0).astype(np.uint8), mode="L").convert("RGB")


def gray_unit(pixels: np.ndarray, ds, window: DicomWindow, path: str | Path) -> np.ndarray:
    """Stored grayscale values -> modality values -> the VOI ``window``, in [0, 1] (float64)."""
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if isinstance(window, str):
        if window != "minmax":
            raise DicomReadError(f"data.dicom_window {window!r}: give 'minmax', a window index (0, 1, ...) or "
                                 "[center, width]")
        return stretch(values)
    if isinstance(window, (tuple, list)):
        center, width = window
        return apply_window(values, float(center), float(width), "LINEAR", path)
    windows = file_windows(ds)
    luts = ds.get("VOILUTSequence") or []
    if windows or luts:
        views = windows or luts
        if not 0 <= window < len(views):
            what = "Window Center/Width pair(s)" if windows else "VOI LUT(s)"
            raise DicomReadError(f"{path}: data.dicom_window {window} asks for view {window}, but the file has "
                                 f"{len(views)} {what} (0..{len(views) - 1}); choose another, or [center, width]")
        if windows:
            function = str(ds.get("VOILUTFunction", "LINEAR")).strip() or "LINEAR"
            return apply_window(values, *windows[window], function, path)
        return apply_voi_table(values, luts[window], ds)
    return stretch(values)


def apply_voi_table(values: np.ndarray, item, ds) -> np.ndarray:
    """A VOI LUT Sequence ``item`` applied to modality ``values``, to [0, 1] (PS3.3 C.11.2.1.1):
    values below the first mapped value take the first entry, those past the table the last one.
    (pydicom's ``apply_voi`` computes the index in the table's own 8/16-bit type, which wraps
    around for values far above the table; hence this lookup.)"""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):  # OW: 16-bit words in the file's byte order
        little = ds.original_encoding[1] is not False
        table = np.frombuffer(bytes(data), dtype="<u2" if little else ">u2")
    else:  # US: one number or several
        table = np.asarray(list(data) if hasattr(data, "__iter__") else [data])
    table = table[:entries or 2 ** 16].astype(np.float64)
    index = np.clip(np.round(values) - first, 0, len(table) - 1).astype(np.int64)
    return table[index] / (2 ** bits - 1)


def file_windows(ds) -> list[tuple[float, float]]:
    """The file's (Window Center, Window Width) pairs, in order (both tags may hold several values)."""
    centers, widths = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centers is None or widths is None:
        return []
    def values(tag) -> list:  # one value, or pydicom's MultiValue of several
        return list(tag) if hasattr(tag, "__iter__") and not isinstance(tag, str) else [tag]

    return [(float(c), float(w)) for c, w in zip(values(centers), values(widths))]


def apply_window(values: np.ndarray, center: float, width: float, function: str, path: str | Path) -> np.ndarray:
    """The VOI window of PS3.3 C.11.2.1.2 to [0, 1]: LINEAR (width >= 1), LINEAR_EXACT or SIGMOID (width > 0)."""
    if width <= 0 or (function == "LINEAR" and width < 1):
        raise DicomReadError(f"{path}: window width {width} is not usable (LINEAR needs 1 or more, the others more "
                             "than 0)")
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function != "LINEAR":
        raise DicomReadError(f"{path}: VOI LUT Function {function!r} is not one of LINEAR, LINEAR_EXACT, SIGMOID")
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) if width > 1 else \
        (values > center - 0.5).astype(np.float64)


def stretch(values: np.ndarray) -> np.ndarray:
    """``values`` stretched min..max to [0, 1] (all zeros for a flat image)."""
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


__all__ = ["DICOM_SUFFIXES", "DicomReadError", "DicomWindow", "apply_window", "file_windows", "is_dicom",
           "read_dicom_rgb", "read_header"]
