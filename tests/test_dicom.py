"""DICOM -> uint8 conversion, checked against pydicom's own LUT functions on real files from pydicom-data."""

from __future__ import annotations

import copy
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.pixels.decoders import JPEGLosslessSV1Decoder
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1

from litegpt.data.dicom import (
    MAX_PIXELS,
    ConvertConfig,
    DicomError,
    convert_dicom,
    convert_image_file,
    read_dicom,
    resize_max_side,
    to_uint8,
)

FULL = ConvertConfig(max_side=100_000)


def data(name: str) -> Path:
    path = get_testdata_file(name, download=False)  # never a pattern search: that goes to the network
    if path is None:
        pytest.skip(f"{name} not in pydicom-data")
    return Path(path)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def reference_display(ds: pydicom.Dataset, out_max: float) -> np.ndarray:
    """Viewer display by pydicom's LUT functions on the whole image, scaled by the VOI output range."""
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    grey = np.rint(values / out_max * 255.0)
    return 255.0 - grey if ds.PhotometricInterpretation == "MONOCHROME1" else grey


@pytest.fixture(scope="module")
def rg1() -> pydicom.Dataset:
    return pydicom.dcmread(data("RG1_UNCR.dcm"))


@pytest.fixture(scope="module")
def rg1_converted():
    return convert_dicom(data("RG1_UNCR.dcm"), FULL)


def test_rg1_window_and_monochrome1_inversion_match_pydicom(rg1, rg1_converted):
    got = rg1_converted
    assert (got.rows, got.cols, got.photometric, got.bits_stored) == (1955, 1841, "MONOCHROME1", 15)
    assert got.window == {"source": "window_tags", "center": 15000.0, "width": 30000.0}
    assert got.pixels.dtype == np.uint8 and got.pixels.shape == (1955, 1841)
    # No rescale, unsigned, 15 bits stored: pydicom's windowing outputs 0 .. 2**15 - 1.
    assert max_diff(got.pixels, reference_display(rg1, 2**15 - 1)) <= 1


def test_rg1_polarity_is_anatomical(rg1, rg1_converted):
    raw, img = rg1.pixel_array, rg1_converted.pixels
    # MONOCHROME1: the highest stored values (most exposure: air) must be the darkest output.
    assert img[raw >= np.percentile(raw, 99.5)].mean() < 60
    assert img[raw <= np.percentile(raw, 0.5)].mean() > 200
    h, w = img.shape
    band = img[h * 3 // 10:h // 2]  # mid-thorax rows
    lungs = np.r_[band[:, w // 5:w * 2 // 5].ravel(), band[:, w * 3 // 5:w * 4 // 5].ravel()]
    spine = band[:, w * 9 // 20:w * 11 // 20]
    assert lungs.mean() + 40 < spine.mean()  # lung fields dark, mediastinum/spine bright


def test_rg1_jpeg2000_lossless_twin_is_identical(rg1_converted):
    twin = convert_dicom(data("RG1_J2KR.dcm"), FULL)
    assert twin.transfer_syntax == "1.2.840.10008.1.2.4.90"
    assert np.array_equal(twin.pixels, rg1_converted.pixels)
    assert twin.window == rg1_converted.window


def test_rescale_is_applied_before_windowing(rg1, rg1_converted):
    ds = copy.deepcopy(rg1)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1000
    ds.WindowCenter, ds.WindowWidth = 2 * 15000 - 1000, 2 * 30000
    img, window = to_uint8(ds)
    assert window["center"] == 29000.0
    assert max_diff(img, rg1_converted.pixels) <= 1


def test_multivalued_window_uses_first_value(rg1, rg1_converted):
    ds = copy.deepcopy(rg1)
    ds.WindowCenter, ds.WindowWidth = [15000, 3000], [30000, 500]
    img, window = to_uint8(ds)
    assert (window["center"], window["width"]) == (15000.0, 30000.0)
    assert np.array_equal(img, rg1_converted.pixels)


@pytest.mark.parametrize("width", [0, "", None])
def test_unusable_window_falls_back_to_minmax(rg1, width):
    ds = copy.deepcopy(rg1)
    ds.WindowWidth = width
    img, window = to_uint8(ds)
    raw = ds.pixel_array.astype(np.float64)
    assert window == {"source": "minmax", "center": (874 + 26479) / 2, "width": 26479.0 - 874}
    expected = 255 - np.rint((raw - raw.min()) / (raw.max() - raw.min()) * 255)
    assert max_diff(img, expected) <= 1


def test_jpeg_lossless_decodes_and_converts():
    ds = pydicom.dcmread(data("JPEG-LL.dcm"))
    got = convert_dicom(data("JPEG-LL.dcm"), FULL)
    assert got.transfer_syntax == JPEGLosslessSV1 and (got.rows, got.cols) == (1024, 256)
    assert got.window["source"] == "minmax"
    raw = ds.pixel_array.astype(np.float64)  # no window tags, no rescale: min/max over the image
    assert max_diff(got.pixels, np.rint((raw - raw.min()) / (raw.max() - raw.min()) * 255)) <= 1
    assert got.pixels.min() == 0 and got.pixels.max() == 255


def test_voi_lut_sequence_matches_pydicom(tmp_path):
    ds = pydicom.dcmread(data("vlut_04.dcm"))
    got = convert_dicom(data("vlut_04.dcm"), FULL)
    assert got.window == {"source": "voi_lut_sequence", "center": None, "width": None}
    depth = ds.VOILUTSequence[0].LUTDescriptor[2]
    assert max_diff(got.pixels, reference_display(ds, 2**depth - 1)) <= 1
    # The file's LUT is a linear ramp; a curved one (with the window tags it would override) shows
    # that the LUT itself is applied, not a rescaling of the stored values.
    ds.VOILUTSequence[0].LUTData = [round(65535 * (i / 255) ** 0.4) for i in range(256)]
    ds.WindowCenter, ds.WindowWidth = 128, 256
    path = tmp_path / "curved-lut.dcm"
    ds.save_as(path)
    curved = convert_dicom(path, FULL)
    assert curved.window["source"] == "voi_lut_sequence"
    expected = reference_display(ds, 2**depth - 1)
    assert max_diff(curved.pixels, expected) <= 1
    assert max_diff(expected, ds.pixel_array) > 40


def test_modality_lut_sequence_is_applied():
    path = data("mlut_18.dcm")
    ds = pydicom.dcmread(path)
    modality = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    got = convert_dicom(path, FULL)
    assert got.window["source"] == "minmax"
    span = modality.max() - modality.min()
    assert max_diff(got.pixels, np.rint((modality - modality.min()) / span * 255)) <= 1
    # A window given in modality-output units (0..65535) only makes sense after the LUT is applied.
    ds.WindowCenter, ds.WindowWidth = 20000, 16000
    img, window = to_uint8(ds)
    assert window["source"] == "window_tags"
    assert max_diff(img, reference_display(ds, 2**16 - 1)) <= 1
    assert 0 < (img == 0).mean() < 0.9 and img.std() > 20  # raw values (-2048..2047) would all be black


def paper_appendix_a1(image_dicom: pydicom.Dataset) -> np.ndarray:
    """Literal transcription of the paper's appendix A.1 code (float64), before the RGB conversion."""
    image = image_dicom.pixel_array.astype(np.float64)
    if image_dicom[0x00280004].value == "MONOCHROME1":
        flip = -1
    else:
        flip = 1
    try:
        normalized_image = ((image - float(image_dicom[0x00281050].value)) / float(image_dicom[0x00281051].value))
        image = ((np.clip(normalized_image, -1, 1) * flip * 127.5 + 127.5)).astype(np.uint8)
    except KeyError:
        normalized_image = ((image - np.mean(image)) / (np.max(image) - np.min(image)))
        image = ((np.clip(normalized_image, -1, 1) * flip * 127.5 + 127.5)).astype(np.uint8)
    return image


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "JPEG-LL.dcm", "vlut_04.dcm"])
def test_paper_method_matches_appendix_code(name):
    got = convert_dicom(data(name), ConvertConfig(max_side=100_000, method="paper"))
    expected = paper_appendix_a1(pydicom.dcmread(data(name)))
    assert max_diff(got.pixels, expected) <= 1
    assert got.pixels.std() > 5


def test_paper_and_lut_methods_differ(rg1_converted):
    paper = convert_dicom(data("RG1_UNCR.dcm"), ConvertConfig(max_side=100_000, method="paper"))
    assert max_diff(paper.pixels, rg1_converted.pixels) > 20  # the paper divides by w, not w / 2


@pytest.mark.parametrize(("shape", "max_side", "expected"), [
    ((3000, 2000), 1024, (1024, 683)),
    ((2000, 3000), 1024, (683, 1024)),
    ((2048, 2048), 1024, (1024, 1024)),
    ((1955, 1841), 512, (512, 482)),
    ((5000, 3), 1000, (1000, 1)),
])
def test_resize_keeps_aspect_and_hits_max_side(shape, max_side, expected):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = resize_max_side(img, max_side)
    assert out.shape == expected and out.dtype == np.uint8
    assert max(out.shape) == max_side
    assert abs(out.shape[1] / out.shape[0] - shape[1] / shape[0]) <= shape[1] / shape[0] * 1.0 / min(expected)
    assert abs(float(out.mean()) - float(img.mean())) < 1.5  # a normalised filter keeps the mean


def test_resize_antialiases():
    rows, cols = np.indices((2500, 2000))
    checkerboard = ((rows + cols) % 2 * 255).astype(np.uint8)
    out = resize_max_side(checkerboard, 1024)
    assert abs(out.mean() - 127.5) < 2 and out.std() < 5  # point sampling keeps 0/255 (std 127)


def test_resize_never_upscales():
    img = np.arange(600, dtype=np.uint8).reshape(20, 30)
    assert resize_max_side(img, 30) is img
    assert resize_max_side(img, 1024) is img
    with pytest.raises(ValueError):
        resize_max_side(img, 0)


def test_convert_resizes_and_reports_original_geometry(rg1_converted):
    got = convert_dicom(data("RG1_UNCR.dcm"))
    assert got.pixels.shape == (1024, 964) and (got.rows, got.cols) == (1955, 1841)
    assert np.array_equal(got.pixels, resize_max_side(rg1_converted.pixels, 1024))


def test_conversion_is_deterministic():
    for method in ("lut", "paper"):
        first = convert_dicom(data("RG1_UNCR.dcm"), ConvertConfig(method=method))
        second = convert_dicom(data("RG1_UNCR.dcm"), ConvertConfig(method=method))
        assert first.pixels.tobytes() == second.pixels.tobytes() and first.window == second.window


def test_constant_image_gives_zeros_in_lut_and_mid_grey_in_paper(rg1, tmp_path):
    ds = copy.deepcopy(rg1)
    del ds.WindowCenter, ds.WindowWidth
    ds.PixelData = np.full((ds.Rows, ds.Columns), 1234, dtype=np.uint16).tobytes()
    path = tmp_path / "constant.dcm"
    ds.save_as(path)
    lut = convert_dicom(path, FULL)
    assert lut.window == {"source": "minmax", "center": 1234.0, "width": 0.0}
    assert not lut.pixels.any()
    paper = convert_dicom(path, ConvertConfig(max_side=100_000, method="paper"))
    assert (paper.pixels == 127).all()


@pytest.mark.parametrize("implicit", [True, False])
def test_file_without_preamble_or_transfer_syntax_is_read(rg1_converted, tmp_path, implicit):
    ds = pydicom.dcmread(data("RG1_UNCR.dcm"))
    del ds.file_meta
    ds.preamble = None
    path = tmp_path / "bare.dcm"
    pydicom.dcmwrite(path, ds, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    assert b"DICM" not in path.read_bytes()[:200]
    got = convert_dicom(path, FULL)
    assert got.transfer_syntax == ("1.2.840.10008.1.2" if implicit else ExplicitVRLittleEndian)
    assert np.array_equal(got.pixels, rg1_converted.pixels)


def test_compressed_file_without_transfer_syntax_is_sniffed(tmp_path):
    ds = pydicom.dcmread(data("JPEG-LL.dcm"))
    del ds.file_meta
    ds.preamble = None
    path = tmp_path / "bare-jpeg.dcm"
    pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=True, enforce_file_format=False)
    got = convert_dicom(path, FULL)
    assert got.transfer_syntax == "1.2.840.10008.1.2.4.57"  # process 14: decodes .70 streams too
    assert np.array_equal(got.pixels, convert_dicom(data("JPEG-LL.dcm"), FULL).pixels)


def assert_refused(path: Path, *fragments: str, cfg: ConvertConfig = ConvertConfig()) -> DicomError:
    with pytest.raises(DicomError) as info:
        convert_dicom(path, cfg)
    message = str(info.value)
    assert path.name in message
    for fragment in fragments:
        assert fragment in message
    return info.value


def test_text_file_is_refused(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("this is not a DICOM file\n" * 50)
    assert_refused(path, "not a DICOM file")


def test_missing_file_is_refused(tmp_path):
    assert_refused(tmp_path / "absent.dicom", "cannot read")


@pytest.mark.parametrize(("size", "problem"), [(200, "no Pixel Data"), (4_000_000, "less than expected")])
def test_truncated_file_is_refused(tmp_path, size, problem):
    path = tmp_path / f"cut-{size}.dcm"
    path.write_bytes(data("RG1_UNCR.dcm").read_bytes()[:size])
    assert_refused(path, problem)


def test_dataset_without_pixel_data_is_refused(tmp_path):
    ds = pydicom.dcmread(data("RG1_UNCR.dcm"))
    del ds.PixelData
    path = tmp_path / "nopixels.dcm"
    ds.save_as(path)
    assert_refused(path, "no Pixel Data")
    del ds.file_meta
    ds.preamble = None
    bare = tmp_path / "nopixels-bare.dcm"
    pydicom.dcmwrite(bare, ds, implicit_vr=True, enforce_file_format=False)
    assert_refused(bare, "Pixel Data")


def test_multiframe_and_colour_are_refused():
    assert_refused(data("emri_small.dcm"), "multi-frame")
    assert_refused(data("SC_rgb.dcm"), "RGB", "MONOCHROME")


def test_corrupt_compressed_data_names_transfer_syntax_and_decoders(tmp_path):
    ds = pydicom.dcmread(data("JPEG-LL.dcm"))
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9"])
    path = tmp_path / "garbled.dcm"
    ds.save_as(path)
    assert_refused(path, "JPEG Lossless", "1.2.840.10008.1.2.4.70", "gdcm")


@pytest.mark.filterwarnings("ignore")  # pydicom warns about the damaged elements it reads
@pytest.mark.parametrize("seed", range(8))
def test_corrupted_files_raise_only_dicom_error(tmp_path, seed):
    """Random truncations and header byte damage: each file converts or raises DicomError, nothing else."""
    rng = np.random.default_rng(seed)
    original = data("JPEG-LL.dcm").read_bytes()
    for i in range(6):
        damaged = bytearray(original[:rng.integers(1, len(original))] if i % 2 else original)
        for at in rng.integers(0, 1200, size=rng.integers(1, 8)):
            damaged[at] = rng.integers(256)
        path = tmp_path / f"damaged-{i}.dcm"
        path.write_bytes(damaged)
        try:
            assert convert_dicom(path).pixels.dtype == np.uint8
        except DicomError as error:
            assert path.name in str(error)


def test_header_claiming_a_huge_image_is_refused_before_decoding(tmp_path):
    """A real RLE file (pydicom's 64 x 64 MR) whose header claims 20000 x 20000: the RLE decoder would allocate
    800 MB for it (4-4.5 GB for the issue's crafted file); the refusal names the claim and allocates nothing."""
    ds = pydicom.dcmread(data("MR_small_RLE.dcm"))
    ds.Rows = ds.Columns = 20000
    path = tmp_path / "bomb.dcm"
    ds.save_as(path)
    tracemalloc.start()
    try:
        assert_refused(path, "20000 x 20000", "400,000,000", f"{MAX_PIXELS:,}", "before decoding", "--max-pixels")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


def test_pixel_limit_is_overridable_and_admits_real_radiographs():
    small = data("MR_small_RLE.dcm")  # 64 x 64, one sample, one frame
    assert_refused(small, "64 x 64", "4,096 values", cfg=ConvertConfig(max_pixels=64 * 64 - 1))
    assert convert_dicom(small, ConvertConfig(max_pixels=64 * 64)).rows == 64
    assert MAX_PIXELS >= 4 * 3100 * 3100  # VinDr-CXR's largest images are about 3100 px a side


def test_missing_decoder_names_the_packages_needed():
    JPEGLosslessSV1Decoder.remove_plugin("gdcm")  # as on a machine without python-gdcm
    try:
        error = assert_refused(data("JPEG-LL.dcm"), "JPEG Lossless", "no decoder plugin installed")
        assert "pylibjpeg-libjpeg" in str(error)
    finally:
        JPEGLosslessSV1Decoder.add_plugin("gdcm", ("pydicom.pixels.decoders.gdcm", "_decode_frame"))
    assert convert_dicom(data("JPEG-LL.dcm")).rows == 1024


def test_read_dicom_returns_dataset_with_transfer_syntax():
    ds = read_dicom(data("RG1_UNCR.dcm"))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_bad_configuration_is_a_plain_value_error(rg1):
    for bad in (lambda: to_uint8(rg1, method="gamma"), lambda: ConvertConfig(method="gamma"),
                lambda: ConvertConfig(max_side=0), lambda: ConvertConfig(max_pixels=0)):
        with pytest.raises(ValueError) as info:
            bad()
        assert not isinstance(info.value, DicomError)


def test_image_file_inputs(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (1500, 1200), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    got = convert_image_file(tmp_path / "grey.png")
    assert (got.rows, got.cols, got.transfer_syntax) == (1500, 1200, "PNG")
    assert np.array_equal(got.pixels, resize_max_side(grey, 1024))

    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.png")
    assert np.array_equal(convert_image_file(tmp_path / "rgb.png").pixels, got.pixels)

    wide = (np.arange(300 * 200, dtype=np.uint16).reshape(300, 200) % 4096) + 100
    Image.fromarray(wide).save(tmp_path / "wide.png")
    got16 = convert_image_file(tmp_path / "wide.png")
    assert got16.window["source"] == "minmax" and got16.pixels.min() == 0 and got16.pixels.max() == 255

    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DicomError, match="bad.png"):
        convert_image_file(tmp_path / "bad.png")
    with pytest.raises(DicomError, match=r"grey.png: 1200 x 1500 pixels, more than the limit of 1,000,000"):
        convert_image_file(tmp_path / "grey.png", max_pixels=1_000_000)  # from the header, before decoding
