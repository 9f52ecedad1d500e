"""Decoding one image file of any accepted format to an (H, W, C) array that keeps its dynamic range.

Readers return pixels in the file's own terms: uint8 for 8-bit files, uint16 for 16-bit ones, float32 in
[0, 1] for DICOM (after rescale and window) and float data. ``conform`` then applies the channel policy
(``data.channels``) and the size; ``cache.to_dtype`` brings a whole set to one cache dtype. Each reader is the
format's well-kept library: Pillow (PNG, JPEG, BMP), tifffile (any TIFF, multi-band included), pydicom.

Every reader checks two things before decoding: that the file is a regular file (a FIFO or a device
named ``.png`` would be read forever), and that the image it declares fits the pixel budget
(``max_pixels``, ``data.max_image_pixels``): a small compressed file can declare 30000x30000 pixels,
and Pillow's own ``MAX_IMAGE_PIXELS`` covers only its formats. JPEG/PNG orientation tags (EXIF) are
applied, so a phone photo is read upright by ingest and predict alike.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal

import cv2
import numpy as np
from PIL import Image, ImageOps

from pipeline.data.sources import listing, non_regular

Channels = Literal["rgb", "keep"]
PIL_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
IMAGE_SUFFIXES = PIL_SUFFIXES | TIFF_SUFFIXES | {".dcm", ".npy"}
MAX_PIXELS = 100_000_000  # data.max_image_pixels' default: 10000x10000, about 300 MB as 8-bit RGB


class UnreadableImage(ValueError):
    """The file could not be decoded as an image; the message says why."""


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # (H, W, C): uint8, uint16 or float32 in [0, 1]
    mode: str  # what the file held, for the data card: 'L', 'RGB', 'RGBA', 'I;16', '5-band', 'DICOM MONOCHROME2'...
    bits: int  # bit depth of the stored samples (32 for float)


def image_files(folder: Path, root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """The files under ``folder`` that a reader here takes (by suffix), and the others, which are ignored;
    listed under ``sources``' link policy (``root``: the source folder links must stay in)."""
    found = listing(folder, root)
    images = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
    return images, [p for p in found if p.suffix.lower() not in IMAGE_SUFFIXES]


def read(
    path: Path, dicom_window: tuple[float, float] | None = None, max_pixels: int = MAX_PIXELS
) -> Decoded:
    """Decode ``path`` by its suffix; raises ``UnreadableImage`` (or OSError) with the reason."""
    if kind := non_regular(path):
        raise UnreadableImage(f"not a regular file ({kind})")
    if path.stat().st_size == 0:
        raise UnreadableImage("empty file")
    return _read_as(path, path.suffix.lower(), dicom_window, max_pixels)


def read_bytes(
    data: bytes, name: str, dicom_window: tuple[float, float] | None = None, max_pixels: int = MAX_PIXELS
) -> Decoded:
    """Decode a file's bytes (a tar shard's member) exactly as ``read`` decodes the file ``name``, which the
    reasons name as ``read``'s do (not the in-memory stream)."""
    if not data:
        raise UnreadableImage("empty file")
    stream = io.BytesIO(data)
    try:
        return _read_as(stream, PurePosixPath(name).suffix.lower(), dicom_window, max_pixels)
    except UnreadableImage as err:
        raise UnreadableImage(str(err).replace(repr(stream), repr(str(name)))) from None


def _read_as(source: Path | BinaryIO, suffix: str, dicom_window, max_pixels: int) -> Decoded:
    if suffix in PIL_SUFFIXES:
        return _read_pil(source, max_pixels)
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(source, max_pixels)
    if suffix == ".dcm":
        return _read_dicom(source, dicom_window, max_pixels)
    if suffix == ".npy":
        return _read_npy(source, max_pixels)
    raise UnreadableImage(f"unsupported suffix '{suffix}' (accepted: {', '.join(sorted(IMAGE_SUFFIXES))})")


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Refuse, before decoding, an image that declares more pixels than the budget."""
    if width * height > max_pixels:
        raise UnreadableImage(
            f"{width}x{height} pixels is over data.max_image_pixels ({max_pixels}); "
            "raise it if the image is real (a small file declaring this many is a "
            "decompression bomb)"
        )


def _read_pil(path: Path | BinaryIO, max_pixels: int) -> Decoded:
    try:
        with Image.open(path) as opened:
            _check_pixels(*opened.size, max_pixels)
            opened.load()
            img = ImageOps.exif_transpose(
                opened
            )  # EXIF orientation: what the camera saw, not how it stored it
            mode = img.mode
            if mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("L" if mode == "1" else "RGB")
            arr = np.asarray(img)
    # ValueError: how Pillow reports some malformed files, e.g. a text chunk over PngImagePlugin.MAX_TEXT_CHUNK
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"{type(err).__name__}: {err}") from None
    if mode in ("LA", "RGBA", "PA") or (mode == "P" and arr.ndim == 3 and arr.shape[-1] == 4):
        arr = arr[..., :-1]  # alpha is not image content
    return _decoded(arr, mode)


def _read_tiff(path: Path | BinaryIO, max_pixels: int) -> Decoded:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            if not isinstance(page, tifffile.TiffPage):  # the first page always is; later ones may be frames
                raise tifffile.TiffFileError("the first page is not a TIFF page")
            _check_pixels(page.imagewidth, page.imagelength, max_pixels)
            arr = page.asarray()
            planar = page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and arr.ndim == 3
            alpha = page.photometric == tifffile.PHOTOMETRIC.RGB and any(
                e in (tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA)
                for e in page.extrasamples
            )
    except (tifffile.TiffFileError, ValueError, OSError) as err:
        raise UnreadableImage(f"{type(err).__name__}: {err}") from None
    if planar:
        arr = np.moveaxis(arr, 0, -1)
    if alpha:
        arr = arr[..., :-1]
    return _decoded(arr, "TIFF")


def _read_dicom(path: Path | BinaryIO, window: tuple[float, float] | None, max_pixels: int) -> Decoded:
    """Modality values (rescale slope/intercept), then the window from params, else from the tags."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
        # All frames are decoded at once: the budget is over rows x columns x frames.
        _check_pixels(
            int(ds.get("Columns", 0)),
            int(ds.get("Rows", 0)) * int(ds.get("NumberOfFrames", 1) or 1),
            max_pixels,
        )
        raw = ds.pixel_array
    except (InvalidDicomError, AttributeError, ValueError, OSError, RuntimeError) as err:
        raise UnreadableImage(f"{type(err).__name__}: {err}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric in ("RGB", "YBR_FULL"):
        return _decoded(raw, f"DICOM {photometric}")
    if raw.ndim == 3:
        raise UnreadableImage(f"multi-frame DICOM ({raw.shape[0]} frames) is not supported; export one frame")
    values = raw.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
        window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
    if window is not None:
        center, width = window
        low, high = center - width / 2, center + width / 2
    else:  # no window anywhere: the image's own range
        low, high = float(values.min()), float(values.max())
    unit = np.clip((values - low) / max(high - low, 1e-12), 0, 1)
    if photometric == "MONOCHROME1":  # stored inverted: high values are dark
        unit = 1 - unit
    bits = int(ds.get("BitsStored", raw.dtype.itemsize * 8))
    return Decoded(unit.astype(np.float32)[..., None], f"DICOM {photometric}", bits)


def _first(value) -> float:
    """A window tag may hold several windows; the first is the default one."""
    return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)


def _read_npy(path: Path | BinaryIO, max_pixels: int) -> Decoded:
    try:
        # A file: the header only, until the budget is checked (a memory map needs a file, not bytes in memory)
        arr = np.load(path, mmap_mode="r" if isinstance(path, Path) else None, allow_pickle=False)
        height, width = (
            sorted(arr.shape)[-2:] if arr.ndim >= 2 else (1, arr.size)
        )  # the band axis is the short one
        _check_pixels(width, height, max_pixels)
        arr = np.array(arr)
    except (ValueError, OSError) as err:
        raise UnreadableImage(f"{type(err).__name__}: {err}") from None
    return _decoded(arr, "npy")


def _decoded(arr: np.ndarray, mode: str) -> Decoded:
    """Normalize layout to (H, W, C) and dtype to uint8, uint16 or float32 in [0, 1]."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or min(arr.shape[:2]) < 1:
        raise UnreadableImage(f"expected a 2-D image or (H, W, C) array, got shape {arr.shape}")
    if arr.shape[-1] > 64 and arr.shape[0] <= 64:  # (C, H, W) as written by most array code
        arr = np.moveaxis(arr, 0, -1)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    bits = arr.dtype.itemsize * 8
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise UnreadableImage("array holds NaN or infinite values")
        if arr.min() < 0 or arr.max() > 1:  # not already in [0, 1]: scaled by the image's own range
            arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-12)
        arr = arr.astype(np.float32)
    elif arr.dtype.kind in "ui" and arr.dtype.itemsize > 1:
        if arr.min() < 0 or arr.max() > 65535:
            raise UnreadableImage(f"{arr.dtype} values outside 0..65535 ({arr.min()}..{arr.max()})")
        arr, bits = arr.astype(np.uint16), 16
    elif arr.dtype.kind in "ui":
        if arr.dtype.kind == "i" and arr.min() < 0:
            raise UnreadableImage("int8 values below 0")
        arr = arr.astype(np.uint8)
    else:
        raise UnreadableImage(f"unsupported pixel type {arr.dtype}")
    if mode in ("TIFF", "npy"):
        mode = {1: "L", 3: "RGB"}.get(arr.shape[-1], f"{arr.shape[-1]}-band")
    return Decoded(arr, mode, bits)


def conform(decoded: Decoded, size: int, channels: Channels) -> np.ndarray:
    """Apply the channel policy, then resize to (size, size); raises ``UnreadableImage`` when it cannot apply."""
    arr = decoded.pixels
    n = arr.shape[-1]
    if channels == "rgb":
        if n == 1:
            arr = np.repeat(arr, 3, axis=-1)
        elif n != 3:
            raise UnreadableImage(
                f"{n} bands cannot be made RGB; set data.channels: keep for multi-band data"
            )
    method = (
        cv2.INTER_AREA if size < min(arr.shape[:2]) else cv2.INTER_LINEAR
    )  # area: no aliasing when shrinking
    # OpenCV resizes at most 4 channels at a time
    parts = [
        cv2.resize(np.ascontiguousarray(arr[..., c : c + 4]), (size, size), interpolation=method).reshape(
            size, size, -1
        )
        for c in range(0, arr.shape[-1], 4)
    ]
    return np.concatenate(parts, axis=-1)
