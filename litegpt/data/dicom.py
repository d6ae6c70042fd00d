"""DICOM (and PNG/JPEG) -> 8-bit grayscale, as a radiologist's viewer would show it.

`prepare` calls `convert_dicom` once per image in worker processes, so a broken file must surface as a
`DicomError` (never another exception) and the per-pixel work must be cheap: every display transform
(modality LUT, VOI LUT or windowing, scaling to 0..255, MONOCHROME1 inversion) is a function of the stored
integer value alone, so it is computed once over the stored-value domain with pydicom's own functions and
applied to the image as a single uint8 lookup. No float work happens at full resolution on that path.

A header can claim up to 65535 x 65535 pixels, and a few MB of RLE then expand to gigabytes, so the pixel
count the header claims is checked against `max_pixels` before the decoder runs.

Only geometry and photometric fields leave this module; no other header value (no patient data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLSNearLossless,
)

METHODS = ("lut", "paper")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_REQUIRED = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation")
# JPEG start-of-frame markers -> a transfer syntax whose decoder reads that process (used only when the
# file names no transfer syntax). SOF3 with any predictor is process 14, which the .57 decoder covers.
_JPEG_SOF = {0xC0: JPEGBaseline8Bit, 0xC1: JPEGExtended12Bit, 0xC3: JPEGLossless, 0xF7: JPEGLSNearLossless}
# Elements every image has; a file read without its DICM header that has none of them is not DICOM.
_IDENTIFYING = ("SOPClassUID", "Modality", "Rows", "StudyInstanceUID")
_J2K_MAGIC = (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  ")
# Most values (rows x columns x samples x frames) a file may claim before it is decoded. 8192 x 8192 admits
# every single radiograph with margin (VinDr-CXR's largest are about 3100 px a side, a 43 cm detector at
# 100 um is 4300) and bounds one decode to 128 MiB of 16-bit values (256 MiB of float32 for the paper
# method); the same order as Pillow's MAX_IMAGE_PIXELS (89.5 M), which guards PNG/JPEG inputs.
MAX_PIXELS = 8192 * 8192


class DicomError(ValueError):
    """An input this module cannot turn into an image; the message names the file and the problem."""


@dataclass(frozen=True)
class ConvertConfig:
    max_side: int = 1024  # longer side after resize, aspect kept; never upscale
    method: str = "lut"  # "lut" (viewer display) or "paper" (appendix A.1 of the paper)
    max_pixels: int = MAX_PIXELS  # larger claimed images are refused before decoding

    def __post_init__(self) -> None:  # fail when prepare starts, not in every worker
        if self.method not in METHODS:
            raise ValueError(f"unknown conversion method {self.method!r}; choose from {METHODS}")
        if self.max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {self.max_side}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")


@dataclass(frozen=True)
class ConvertedImage:
    pixels: np.ndarray  # uint8, H x W, resized
    rows: int  # original geometry: boxes are normalised by these
    cols: int
    photometric: str
    bits_stored: int
    transfer_syntax: str
    window: dict  # {"source": ..., "center": float | None, "width": float | None}


def _name(ds: Dataset | None, path: Path | str | None) -> str:
    if path is not None:
        return str(path)
    filename = getattr(ds, "filename", None)
    return filename if isinstance(filename, str) else "<dataset>"


def read_dicom(path: Path | str) -> Dataset:
    """Read a DICOM file, tolerating a missing preamble/meta header and a missing transfer syntax.

    A file with no transfer syntax gets one inferred from how it parsed (implicit/explicit VR, byte
    order) or, for encapsulated pixel data, from the codestream's own markers, so that it decodes.
    """
    try:
        ds = pydicom.dcmread(path)
        forced = False
    except InvalidDicomError:
        forced = True
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception as exc:
            raise DicomError(f"{path}: not a DICOM file ({exc})") from exc
    except Exception as exc:  # unreadable file or a header pydicom cannot parse
        raise DicomError(f"{path}: cannot read DICOM ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds:
        if forced and not any(keyword in ds for keyword in _IDENTIFYING):
            raise DicomError(f"{path}: not a DICOM file (no DICM header, no recognisable DICOM elements)")
        raise DicomError(f"{path}: no Pixel Data element (not an image, or the file is truncated)")
    if not ds.file_meta.get("TransferSyntaxUID"):
        ds.file_meta.TransferSyntaxUID = _infer_transfer_syntax(ds, path)
    return ds


def _infer_transfer_syntax(ds: Dataset, path: Path | str) -> UID:
    implicit, little = ds.original_encoding
    if not ds["PixelData"].is_undefined_length:
        if implicit:
            return ImplicitVRLittleEndian
        return ExplicitVRBigEndian if little is False else ExplicitVRLittleEndian
    try:
        fragments = generate_fragments(ds.PixelData)
        next(fragments, None)  # the Basic Offset Table item
        frame = next(fragments, b"")
    except ValueError:  # not a sequence of items: nothing to recognise
        frame = b""
    if frame.startswith(_J2K_MAGIC):
        return JPEG2000
    if frame[:2] == b"\xff\xd8":  # walk the JPEG marker segments to the start-of-frame
        i = 2
        while i + 4 <= len(frame) and frame[i] == 0xFF:
            if frame[i + 1] in _JPEG_SOF:
                return _JPEG_SOF[frame[i + 1]]
            i += 2 + int.from_bytes(frame[i + 2:i + 4], "big")
    raise DicomError(f"{path}: compressed pixel data but no transfer syntax, and the codec is not recognised")


def _decode(ds: Dataset, name: str, max_pixels: int) -> np.ndarray:
    """Check that the dataset is one grayscale frame of an admissible size, then decode it with whichever
    plugin pydicom finds (the decoders allocate what the header claims, so the size is checked first)."""
    missing = [tag for tag in _REQUIRED if ds.get(tag) is None]
    if missing:
        raise DicomError(f"{name}: missing required image tag(s) {', '.join(missing)}")
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples, frames = int(ds.get("SamplesPerPixel") or 1), int(ds.get("NumberOfFrames") or 1)
    claimed = rows * cols * samples * frames
    if claimed > max_pixels:
        raise DicomError(f"{name}: header claims {rows} x {cols} pixels x {samples} sample(s) x {frames} frame(s) "
                         f"= {claimed:,} values, above the limit of {max_pixels:,}; refused before decoding "
                         "(raise the limit with --max-pixels if the image is genuine)")
    photometric = ds.get("PhotometricInterpretation")
    if samples != 1 or photometric not in _MONOCHROME:
        raise DicomError(f"{name}: colour or unknown photometric interpretation {photometric!r} "
                         f"(only MONOCHROME1/MONOCHROME2 grayscale is supported)")
    if frames != 1:
        raise DicomError(f"{name}: multi-frame image ({ds.NumberOfFrames} frames); expected one radiograph")
    ts = ds.file_meta.TransferSyntaxUID
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise DicomError(f"{name}: cannot decode pixel data with transfer syntax {ts.name} ({ts}): "
                         f"{exc}{_decoder_hint(ts)}") from exc
    if arr.ndim != 2 or 0 in arr.shape:
        raise DicomError(f"{name}: decoded pixel data has shape {arr.shape}, expected rows x columns")
    return arr


def _decoder_hint(ts: UID) -> str:
    try:
        if not ts.is_compressed:
            return ""
        decoder = get_decoder(ts)
    except (ValueError, NotImplementedError):  # not a transfer syntax pydicom knows
        return "; pydicom has no decoder for this transfer syntax"
    if decoder.is_available:
        return f"; available decoder plugins: {', '.join(decoder.available_plugins)}"
    return f"; no decoder plugin installed, need one of: {'; '.join(decoder.missing_dependencies)}"


def _window_tags(ds: Dataset) -> tuple[float, float] | None:
    """First Window Center/Width values, or None when absent, empty or not numbers."""
    try:
        center, width = (ds[tag].value for tag in ("WindowCenter", "WindowWidth"))
        first = [float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v) for v in (center, width)]
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return first[0], first[1]


def _display_unit(ds: Dataset, stored: np.ndarray, index: np.ndarray | None) -> tuple[np.ndarray, dict]:
    """Map stored values to display values in [0, 1] (before MONOCHROME1 inversion).

    `stored` is either the image itself (`index` None) or a value domain that `index` (the image)
    points into. Tries the VOI LUT Sequence, then Window Center/Width (with the VOI LUT Function), then
    min/max of the modality values that occur in the image. A VOI step whose attributes are unusable is
    skipped; the returned window dict says which step was applied. A constant image gives width 0, zeros.
    """
    modality = apply_modality_lut(stored, ds)
    if ds.get("VOILUTSequence"):
        try:
            voi = apply_voi(np.rint(modality).astype(np.int64), ds)
            top = 2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
            return voi / top, {"source": "voi_lut_sequence", "center": None, "width": None}
        except (AttributeError, KeyError, TypeError, ValueError, IndexError, NotImplementedError):
            pass
    window = _window_tags(ds)
    if window is not None:
        try:
            y_min, y_max = apply_windowing(np.array([-np.inf, np.inf]), ds)  # pydicom's output range
            voi = apply_windowing(modality, ds)
            return (voi - y_min) / (y_max - y_min), {"source": "window_tags", "center": window[0],
                                                     "width": window[1]}
        except ValueError:  # width < 1 for LINEAR, or an unknown VOI LUT Function
            pass
    observed = modality if index is None else modality[np.bincount(index.ravel(), minlength=modality.size) > 0]
    low, high = float(observed.min()), float(observed.max())
    info = {"source": "minmax", "center": (low + high) / 2, "width": high - low}
    if high == low:
        return np.zeros_like(modality, dtype=np.float64), info
    return (modality - low) / (high - low), info


def _lut_method(ds: Dataset, arr: np.ndarray) -> tuple[np.ndarray, dict]:
    invert = ds.PhotometricInterpretation == "MONOCHROME1"
    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2:
        index_type = np.dtype(f"uint{8 * arr.dtype.itemsize}")
        index = arr.view(index_type)
        domain = np.arange(2 ** (8 * arr.dtype.itemsize), dtype=index_type).view(arr.dtype).astype(np.int64)
    else:  # 32-bit pixel data: too wide for a lookup table, transform the pixels directly
        index, domain = None, arr
    unit, window = _display_unit(ds, domain, index)
    lut = np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    constant = window["source"] == "minmax" and window["width"] == 0
    if invert and not constant:  # MONOCHROME1: high values are dark; a constant image stays all 0
        np.subtract(255, lut, out=lut)
    return (lut if index is None else lut[index]), window


def _paper_method(ds: Dataset, arr: np.ndarray) -> tuple[np.ndarray, dict]:
    """Appendix A.1 of the paper on the raw stored values (no rescale), single channel, in float32.

    Deviations only where the paper's code fails: a multi-valued window uses its first value, a window
    width <= 0 falls back like a missing window, and a constant image (min == max) gives normalised 0,
    i.e. mid grey 127, instead of NaN.
    """
    x = arr.astype(np.float32)
    flip = -1.0 if ds.PhotometricInterpretation == "MONOCHROME1" else 1.0
    window = _window_tags(ds)
    if window is not None and window[1] > 0:
        x -= np.float32(window[0])
        x /= np.float32(window[1])
        info = {"source": "window_tags", "center": window[0], "width": window[1]}
    else:
        mean, low, high = float(x.mean(dtype=np.float64)), float(x.min()), float(x.max())
        info = {"source": "minmax", "center": mean, "width": high - low}
        x -= np.float32(mean)
        if high > low:
            x /= np.float32(high - low)
    np.clip(x, -1.0, 1.0, out=x)
    x *= np.float32(flip * 127.5)
    x += np.float32(127.5)
    return x.astype(np.uint8), info


def to_uint8(ds: Dataset, method: str = "lut", path: Path | str | None = None,
             max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, dict]:
    """Decode `ds` and return the full-resolution uint8 display image and the window that was applied.

    A header claiming more than `max_pixels` values is refused (DicomError) before anything is decoded.
    """
    if method not in METHODS:
        raise ValueError(f"unknown conversion method {method!r}; choose from {METHODS}")
    name = _name(ds, path)
    try:
        arr = _decode(ds, name, max_pixels)
        return (_lut_method if method == "lut" else _paper_method)(ds, arr)
    except DicomError:
        raise
    except Exception as exc:  # malformed image attributes or LUTs
        raise DicomError(f"{name}: invalid image attributes ({type(exc).__name__}: {exc})") from exc


def resize_max_side(img: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink so the longer side is `max_side` (aspect kept, never upscaled) with Pillow's BILINEAR.

    When shrinking, Pillow widens the bilinear kernel to the scale factor: a proper antialiasing tent
    filter whose weights are all positive, so no ringing or clipping at collimator edges and markers.
    On a 2500 x 2000 radiograph it takes ~8 ms against ~18 ms for LANCZOS (mean difference 0.24 grey
    levels); BOX (~5 ms) aliases fine periodic detail ~13x more.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    rows, cols = img.shape
    longer = max(rows, cols)
    if longer <= max_side:
        return img
    size = (max(1, round(cols * max_side / longer)), max(1, round(rows * max_side / longer)))
    return np.array(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR))


def convert_dicom(path: Path | str, cfg: ConvertConfig = ConvertConfig()) -> ConvertedImage:
    """Read, convert and resize one DICOM; any problem with the file raises DicomError."""
    ds = read_dicom(path)
    full, window = to_uint8(ds, cfg.method, path, cfg.max_pixels)
    return ConvertedImage(
        pixels=resize_max_side(full, cfg.max_side),
        rows=full.shape[0],
        cols=full.shape[1],
        photometric=str(ds.PhotometricInterpretation),
        bits_stored=int(ds.BitsStored),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        window=window,
    )


def convert_image_file(path: Path | str, max_side: int = 1024, max_pixels: int = MAX_PIXELS) -> ConvertedImage:
    """A PNG/JPEG (or other Pillow-readable) image as 8-bit grayscale, resized like a DICOM.

    8-bit images are taken as already displayed (luma for colour, EXIF orientation applied); 16-bit and
    float images are min/max scaled. `transfer_syntax` holds the Pillow format name (e.g. "PNG"). An image
    whose header claims more than `max_pixels` pixels is refused before it is decoded.
    """
    try:
        with Image.open(path) as opened:
            fmt = opened.format or ""
            if opened.width * opened.height > max_pixels:
                raise DicomError(f"{path}: {opened.width} x {opened.height} pixels, more than the limit of "
                                 f"{max_pixels:,} (--max-pixels)")
            img = ImageOps.exif_transpose(opened)
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                arr = np.asarray(img).astype(np.float32)
                low, high = float(arr.min()), float(arr.max())
                unit = (arr - low) / (high - low) if high > low else np.zeros_like(arr)
                full = np.rint(unit * 255.0).astype(np.uint8)
                bits, window = 16, {"source": "minmax", "center": (low + high) / 2, "width": high - low}
            else:
                full = np.asarray(img.convert("L"))
                bits, window = 8, {"source": "image_file", "center": None, "width": None}
    except DicomError:
        raise
    except Exception as exc:
        raise DicomError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    return ConvertedImage(
        pixels=resize_max_side(full, max_side),
        rows=full.shape[0],
        cols=full.shape[1],
        photometric="MONOCHROME2",
        bits_stored=bits,
        transfer_syntax=fmt,
        window=window,
    )
