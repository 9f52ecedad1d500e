"""Each accepted format decodes to (H, W, C) pixels that keep the file's dynamic range."""

import numpy as np
import pytest
from PIL import Image

from pipeline.data import readers


def ramp16(h: int = 16, w: int = 16) -> np.ndarray:
    return np.tile(np.linspace(0, 65535, w), (h, 1)).astype(np.uint16)


IDENTIFYING = {  # tags that identify a person, as write_dicom writes them: none may reach any output
    "PatientName": "Doe^Jane",
    "PatientID": "P-0001",
    "PatientBirthDate": "19700321",
    "PatientAddress": "12 Elm Street, Springfield",
    "InstitutionName": "Springfield General",
    "InstitutionAddress": "1 Hospital Road",
    "ReferringPhysicianName": "House^Gregory",
    "OtherPatientIDs": "OTHER-7781",
    "AccessionNumber": "ACC-55231",
}


def write_dicom(
    path, stored: np.ndarray, slope: float, intercept: float, window=None, photometric="MONOCHROME2"
):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    for tag, value in IDENTIFYING.items():
        setattr(ds, tag, value)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_eight_bit_rgb_and_gray(tmp_path, suffix):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 200, 40
    Image.fromarray(rgb).save(tmp_path / f"rgb{suffix}")
    Image.fromarray(rgb[..., 0]).save(tmp_path / f"gray{suffix}")
    color, gray = readers.read(tmp_path / f"rgb{suffix}"), readers.read(tmp_path / f"gray{suffix}")
    assert color.pixels.shape == (16, 16, 3) and color.pixels.dtype == np.uint8
    assert abs(int(color.pixels[8, 8, 0]) - 200) <= 3 and abs(int(color.pixels[8, 8, 2]) - 40) <= 3
    assert gray.pixels.shape == (16, 16, 1) and gray.bits == 8


def test_rgba_png_drops_alpha(tmp_path):
    Image.fromarray(np.full((8, 8, 4), 77, np.uint8)).save(tmp_path / "a.png")
    found = readers.read(tmp_path / "a.png")
    assert found.mode == "RGBA" and found.pixels.shape == (8, 8, 3)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_keeps_its_range(tmp_path, suffix):
    import tifffile

    path = tmp_path / f"ramp{suffix}"
    Image.fromarray(ramp16()).save(path) if suffix == ".png" else tifffile.imwrite(path, ramp16())
    found = readers.read(path)
    assert found.pixels.dtype == np.uint16 and found.bits == 16
    assert found.pixels.min() == 0 and found.pixels.max() == 65535
    np.testing.assert_array_equal(found.pixels[..., 0], ramp16())


def test_five_band_tiff_keeps_every_band(tmp_path):
    import tifffile

    bands = np.stack([np.full((12, 12), 1000 * (b + 1), np.uint16) for b in range(5)], axis=-1)
    tifffile.imwrite(tmp_path / "tile.tif", bands, planarconfig="contig")
    found = readers.read(tmp_path / "tile.tif")
    assert found.pixels.shape == (12, 12, 5) and found.mode == "5-band"
    assert list(found.pixels[0, 0]) == [1000, 2000, 3000, 4000, 5000]
    kept = readers.conform(found, 8, "keep")
    assert kept.shape == (8, 8, 5) and kept.dtype == np.uint16
    with pytest.raises(readers.UnreadableImage, match=r"data.channels: keep"):
        readers.conform(found, 8, "rgb")


def test_dicom_applies_rescale_and_window(tmp_path):
    stored = np.tile(np.arange(16) * 100, (16, 1))  # 0..1500 stored -> -1024..476 HU with slope 1
    write_dicom(tmp_path / "ct.dcm", stored, slope=1.0, intercept=-1024.0, window=(0, 400))  # -200..200 HU
    found = readers.read(tmp_path / "ct.dcm")
    px = found.pixels[..., 0]
    assert found.pixels.dtype == np.float32 and found.pixels.shape == (16, 16, 1)
    assert px[0, 0] == 0.0 and px[0, -1] == 1.0  # below and above the window: clipped
    assert px[0, 10] == pytest.approx((1000 - 1024 + 200) / 400)  # -24 HU inside the window
    by_params = readers.read(tmp_path / "ct.dcm", dicom_window=(-1024 + 750, 1500))  # whole range
    assert by_params.pixels[0, 0, 0] == 0.0 and by_params.pixels[0, 8, 0] == pytest.approx(800 / 1500)


def test_dicom_slope_and_monochrome1(tmp_path):
    stored = np.tile(np.arange(16), (16, 1))
    write_dicom(tmp_path / "x.dcm", stored, slope=2.0, intercept=10.0, photometric="MONOCHROME1")
    px = readers.read(tmp_path / "x.dcm").pixels[..., 0]  # no window tags: the image's own range, inverted
    assert px[0, 0] == 1.0 and px[0, -1] == 0.0 and px[0, 5] == pytest.approx(1 - 5 / 15)


def test_npy_arrays(tmp_path):
    np.save(tmp_path / "f.npy", np.linspace(-5, 5, 64, dtype=np.float32).reshape(8, 8))
    np.save(tmp_path / "chw.npy", np.ones((4, 100, 100), np.uint16))
    floats = readers.read(tmp_path / "f.npy").pixels
    assert floats.dtype == np.float32 and floats.min() == 0.0 and floats.max() == 1.0
    assert readers.read(tmp_path / "chw.npy").pixels.shape == (100, 100, 4)


def test_unreadable_files_say_why(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(readers.UnreadableImage, match="empty file"):
        readers.read(tmp_path / "empty.png")
    with pytest.raises(readers.UnreadableImage):
        readers.read(tmp_path / "junk.dcm")
    (tmp_path / "junk.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(readers.UnreadableImage) as from_file:
        readers.read(tmp_path / "junk.jpg")
    with pytest.raises(
        readers.UnreadableImage
    ) as from_bytes:  # a shard member: named, not '<_io.BytesIO ...>'
        readers.read_bytes(b"not a jpeg", str(tmp_path / "junk.jpg"))
    assert str(from_bytes.value) == str(from_file.value) and "junk.jpg" in str(from_file.value)
