"""CHAOS and PSFHS converters on small raw fixtures built here in their published layouts.

The fixtures encode the slice index in both the DICOM pixels and the Ground mask, so any wrong
slice/mask pairing shows up as a mismatch between a case's image and its mask.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tskd_utils.datasets import chaos, main, prepare, psfhs
from tskd_utils.io import DataError, load_case, load_dataset

pydicom = pytest.importorskip("pydicom")

SIZE = 16  # pixels per side of every fixture slice


# ------------------------------------------------------------------------------ DICOM fixtures
def write_dicom(path: Path, stored: np.ndarray, *, instance: int, z: float, slope: float = 1.0,
                intercept: float = -1024.0, spacing=(0.75, 0.75)) -> None:
    """A minimal valid CT slice: 16-bit signed pixels, rescale, spacing, instance number, position."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    if int(pydicom.__version__.split(".")[0]) < 3:
        ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelSpacing = list(spacing)
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.PixelData = stored.astype("<i2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(path, enforce_file_format=True)
    except TypeError:  # pydicom < 3
        ds.save_as(path, write_like_original=False)


def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def slice_hu(k: int) -> np.ndarray:
    """HU of fixture slice k: air on the left third, soft tissue 40 + 10k in the middle, bone right."""
    hu = np.full((SIZE, SIZE), 40.0 + 10 * k)
    hu[:, :5] = -1000.0
    hu[:, 12:] = 1000.0
    return hu


def ct_mask(k: int) -> np.ndarray:
    """Liver rows 0..k (k+1 rows) as 0/255: the mask's area tells the slice index."""
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[: k + 1, 5:12] = 255
    return m


def make_ct(root: Path, patients=(("1", 4), ("2", 3)), empty_last: bool = False) -> Path:
    """RAW/Train_Sets/CT/<id>/{DICOM_anon,Ground} in the published naming."""
    for pid, n in patients:
        base = root / "Train_Sets" / "CT" / pid
        for k in reversed(range(n)):  # created out of order: directory order must not decide the pairing
            write_dicom(base / "DICOM_anon" / f"i{k:04d},0000b.dcm", (slice_hu(k) + 1024).astype(np.int16),
                        instance=k + 1, z=-3.0 * k)
            mask = np.zeros((SIZE, SIZE), np.uint8) if (empty_last and k == n - 1) else ct_mask(k)
            write_png(base / "Ground" / f"liver_GT_{k:03d}.png", mask)
    return root


MR_VALUES = (63, 126, 189, 252)


def mr_ground(k: int, jitter: bool = False) -> np.ndarray:
    """Organ k % 4 fills row block k; value jittered by +-2 on some pixels when asked."""
    m = np.zeros((SIZE, SIZE), np.uint8)
    value = MR_VALUES[k % 4]
    m[k : k + 2, 2:10] = value
    if jitter:
        m[k, 2] = value - 2 if value < 252 else 254
    return m


def make_mr(root: Path, patients=(("3", 5),)) -> Path:
    for pid, n in patients:
        base = root / "Train_Sets" / "MR" / pid / "T2SPIR"
        for k in range(n):
            stored = np.full((SIZE, SIZE), 100 + 50 * k, np.int16)
            stored[0, 0] = 0
            name = f"IMG-0002-{k + 1:05d}"
            write_dicom(base / "DICOM_anon" / f"{name}.dcm", stored, instance=k + 1, z=5.0 * k,
                        slope=1.0, intercept=0.0, spacing=(1.5, 1.5))
            write_png(base / "Ground" / f"{name}.png", mr_ground(k, jitter=(k == 1)))
    return root


def rows(folder: Path) -> list:
    with (folder / "cases.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def leftovers(out: Path) -> list:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


# ----------------------------------------------------------------------------------- CHAOS CT
def test_chaos_ct_cases_subjects_pairing_and_window(tmp_path):
    raw = make_ct(tmp_path / "raw")
    folder = prepare("chaos", raw, tmp_path / "data")
    assert folder == tmp_path / "data" / "chaos_ct"
    info = load_dataset(folder)
    assert info.classes == ["background", "liver"]
    assert len(info.cases) == 7
    subjects = {c.case: c.subject for c in info.cases}
    assert subjects["ct_1_000"] == subjects["ct_1_003"] == "ct_1"
    assert subjects["ct_2_002"] == "ct_2"
    assert all(c.spacing_mm == pytest.approx(0.75) for c in info.cases)
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["n_cases"] == 7 and "CC BY-NC-SA 4.0" in meta["license"] and "3431873" in meta["source"]
    for c in info.cases:
        k = int(c.case.rsplit("_", 1)[1])
        image, mask = load_case(info, c)
        # pairing: the mask rows (k+1) and the image's tissue value (40 + 10k HU) name the same slice
        assert int(mask[:, 8].sum()) == k + 1, c.case
        assert set(np.unique(mask)) <= {0, 1}
        expected_tissue = round((40 + 10 * k + 160) / 400 * 255)
        assert image[0, 8] == expected_tissue, c.case
        # window: air (-1000 HU) -> 0, bone (1000 HU) -> 255
        assert image[:, :5].max() == 0 and image[:, 12:].min() == 255


def test_chaos_accepts_train_sets_and_zip_folder(tmp_path):
    raw = make_ct(tmp_path / "raw" / "CHAOS_Train_Sets", patients=(("1", 2),))
    a = prepare("chaos", tmp_path / "raw", tmp_path / "a")  # folder holding CHAOS_Train_Sets/Train_Sets
    b = prepare("chaos", raw / "Train_Sets", tmp_path / "b")  # Train_Sets itself
    assert len(load_dataset(a).cases) == len(load_dataset(b).cases) == 2


def test_chaos_slice_order_instance_pairs_by_instance_number(tmp_path):
    """File names shuffled against InstanceNumber: 'instance' order follows the DICOM tags."""
    base = tmp_path / "raw" / "Train_Sets" / "CT" / "4"
    names = [2, 0, 1]  # slice k (InstanceNumber k+1) is stored as i000{names[k]}
    for k in range(3):
        write_dicom(base / "DICOM_anon" / f"i{names[k]:04d},0000b.dcm", (slice_hu(k) + 1024).astype(np.int16),
                    instance=k + 1, z=-3.0 * k)
        write_png(base / "Ground" / f"liver_GT_{k:03d}.png", ct_mask(k))
    info = load_dataset(prepare("chaos", tmp_path / "raw", tmp_path / "data", slice_order="instance"))
    for c in info.cases:
        k = int(c.case.rsplit("_", 1)[1])
        image, mask = load_case(info, c)
        assert int(mask[:, 8].sum()) == k + 1
        assert image[0, 8] == round((40 + 10 * k + 160) / 400 * 255)


def test_chaos_skip_empty(tmp_path):
    raw = make_ct(tmp_path / "raw", patients=(("1", 4),), empty_last=True)
    assert len(load_dataset(prepare("chaos", raw, tmp_path / "all")).cases) == 4
    kept = load_dataset(prepare("chaos", raw, tmp_path / "some", skip_empty=True))
    assert [c.case for c in kept.cases] == ["ct_1_000", "ct_1_001", "ct_1_002"]


# ----------------------------------------------------------------------------------- CHAOS MR
def test_chaos_mr_label_mapping_and_normalisation(tmp_path):
    raw = make_mr(tmp_path / "raw")
    info = load_dataset(prepare("chaos", raw, tmp_path / "data", modality="mr"))
    assert info.name == "chaos_mr"
    assert info.classes == ["background", "liver", "right kidney", "left kidney", "spleen"]
    assert [c.case for c in info.cases] == [f"mr_3_{k:03d}" for k in range(5)]
    assert {c.subject for c in info.cases} == {"mr_3"}
    assert info.cases[0].spacing_mm == pytest.approx(1.5)
    images = []
    for k, c in enumerate(info.cases):
        image, mask = load_case(info, c)
        organ = k % 4 + 1
        expected = np.zeros((SIZE, SIZE), np.uint8)
        expected[k : k + 2, 2:10] = organ
        np.testing.assert_array_equal(mask, expected)  # jittered values (+-2) map to the same organ
        images.append(image)
    volume = np.stack(images)
    # per-volume percentiles: the brightest slice saturates, the darkest body slice is darkest
    assert volume.max() == 255 and volume.min() == 0
    assert [int(im[5, 5]) for im in images] == sorted(int(im[5, 5]) for im in images)


def test_chaos_mr_bad_label_value_names_the_file(tmp_path):
    raw = make_mr(tmp_path / "raw")
    bad = raw / "Train_Sets" / "MR" / "3" / "T2SPIR" / "Ground" / "IMG-0002-00003.png"
    m = np.array(Image.open(bad))
    m[0, 0] = 100
    write_png(bad, m)
    out = tmp_path / "data"
    with pytest.raises(DataError, match=r"IMG-0002-00003\.png.*\[100\]"):
        prepare("chaos", raw, out, modality="mr")
    assert leftovers(out) == []  # nothing half-written


# ---------------------------------------------------------------------------------- CHAOS errors
def test_chaos_count_mismatch_names_the_patient_folder(tmp_path):
    raw = make_ct(tmp_path / "raw")
    (raw / "Train_Sets" / "CT" / "2" / "Ground" / "liver_GT_002.png").unlink()
    out = tmp_path / "data"
    with pytest.raises(DataError, match=r"patient folder .*CT[/\\]2: 3 DICOM slices .* but 2 Ground PNGs"):
        prepare("chaos", raw, out)
    assert leftovers(out) == []


def test_chaos_missing_or_empty_raw_and_unknown_modality(tmp_path):
    with pytest.raises(DataError, match="raw folder not found"):
        prepare("chaos", tmp_path / "nowhere", tmp_path / "data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no CHAOS CT training data found"):
        prepare("chaos", tmp_path / "empty", tmp_path / "data")
    (tmp_path / "empty" / "Train_Sets" / "CT").mkdir(parents=True)
    with pytest.raises(DataError, match="no patient folders"):
        prepare("chaos", tmp_path / "empty", tmp_path / "data")
    with pytest.raises(DataError, match="unknown modality 'pet'"):
        prepare("chaos", tmp_path / "empty", tmp_path / "data", modality="pet")
    assert leftovers(tmp_path / "data") == []


def test_chaos_mask_size_mismatch_and_overwrite(tmp_path):
    raw = make_ct(tmp_path / "raw", patients=(("1", 2),))
    out = tmp_path / "data"
    prepare("chaos", raw, out)
    with pytest.raises(FileExistsError):
        prepare("chaos", raw, out)
    write_png(raw / "Train_Sets" / "CT" / "1" / "Ground" / "liver_GT_001.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"liver_GT_001\.png: mask size 8x8"):
        prepare("chaos", raw, out, overwrite=True)
    assert leftovers(out) == ["chaos_ct"] and len(load_dataset(out / "chaos_ct").cases) == 2  # old one intact


def test_chaos_headerless_dicom_is_read_and_garbage_is_named(tmp_path):
    """A DICOM without preamble/file meta (as some anonymisers write) still converts; junk does not."""
    from pydicom.dataset import Dataset

    raw = make_ct(tmp_path / "raw", patients=(("1", 2),))
    path = raw / "Train_Sets" / "CT" / "1" / "DICOM_anon" / "i0001,0000b.dcm"
    ds = Dataset()
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.PixelSpacing, ds.InstanceNumber = 1, -1024, [0.75, 0.75], 2
    ds.PixelData = (slice_hu(1) + 1024).astype("<i2").tobytes()
    if int(pydicom.__version__.split(".")[0]) < 3:
        ds.is_little_endian, ds.is_implicit_VR = True, True
        ds.save_as(path, write_like_original=True)
    else:
        ds.save_as(path, implicit_vr=True, little_endian=True)
    info = load_dataset(prepare("chaos", raw, tmp_path / "data"))
    image, mask = load_case(info, info.case("ct_1_001"))
    assert image[0, 8] == round((40 + 10 + 160) / 400 * 255) and int(mask[:, 8].sum()) == 2
    path.write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(DataError, match=r"i0001,0000b\.dcm: not a readable DICOM"):
        prepare("chaos", raw, tmp_path / "data2")
    assert leftovers(tmp_path / "data2") == []


def test_chaos_command_line(tmp_path, capsys):
    raw = make_ct(tmp_path / "raw", patients=(("1", 2),))
    assert main("chaos", ["--raw", str(raw), "--out", str(tmp_path / "data"), "--modality", "ct"]) == 0
    assert "wrote 2 cases (1 subjects" in capsys.readouterr().out
    assert main("chaos", ["--raw", str(raw), "--out", str(tmp_path / "data"), "--modality", "mr"]) == 2
    assert "no CHAOS MR training data" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- PSFHS
def psfhs_label(k: int) -> np.ndarray:
    lab = np.zeros((SIZE, SIZE), np.uint8)
    lab[0:3, :] = 1  # pubic symphysis
    lab[5 : 6 + k, 4:12] = 2  # fetal head, area depends on the image
    return lab


def make_psfhs_png(root: Path, n: int = 3) -> Path:
    for k in range(n):
        img = np.full((SIZE, SIZE, 3), 20 * k + 10, np.uint8)  # identical RGB channels
        write_png(root / "images" / f"{k:05d}.png", img)
        write_png(root / "labels" / f"{k:05d}.png", psfhs_label(k))
    return root


def write_mha(path: Path, arr: np.ndarray) -> None:
    """MetaImage written by hand (no SimpleITK needed to build the fixture)."""
    types = {np.dtype(np.uint8): "MET_UCHAR", np.dtype(np.int16): "MET_SHORT"}
    dims = " ".join(str(d) for d in arr.shape[::-1])
    header = (f"ObjectType = Image\nNDims = {arr.ndim}\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"DimSize = {dims}\nElementType = {types[arr.dtype]}\nElementDataFile = LOCAL\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.encode() + np.ascontiguousarray(arr).tobytes())


def test_psfhs_png_fallback_layout(tmp_path):
    raw = make_psfhs_png(tmp_path / "raw")
    info = load_dataset(prepare("psfhs", raw, tmp_path / "data"))
    assert info.name == "psfhs" and info.classes == ["background", "pubic symphysis", "fetal head"]
    assert [c.case for c in info.cases] == ["00000", "00001", "00002"]
    assert [c.subject for c in info.cases] == ["00000", "00001", "00002"]  # each image its own subject
    for k, c in enumerate(info.cases):
        image, mask = load_case(info, c)
        assert image.shape == (SIZE, SIZE) and int(image[0, 0]) == 20 * k + 10
        np.testing.assert_array_equal(mask, psfhs_label(k))


def test_psfhs_published_mha_layout(tmp_path):
    pytest.importorskip("SimpleITK")
    raw = tmp_path / "raw" / "PSFHS"  # --raw may be the folder PSFHS.zip was unpacked into
    for k in range(2):
        write_mha(raw / "image_mha" / f"0374{k}.mha", np.full((3, SIZE, SIZE), 30 * k + 5, np.uint8))
        write_mha(raw / "label_mha" / f"0374{k}.mha", psfhs_label(k))
    info = load_dataset(prepare("psfhs", tmp_path / "raw", tmp_path / "data"))
    assert [c.case for c in info.cases] == ["03740", "03741"]
    for k, c in enumerate(info.cases):
        image, mask = load_case(info, c)
        assert image.shape == (SIZE, SIZE) and int(image.max()) == 30 * k + 5
        np.testing.assert_array_equal(mask, psfhs_label(k))


def test_psfhs_mha_without_simpleitk_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import fails as if not installed
    raw = tmp_path / "raw"
    write_mha(raw / "image_mha" / "00001.mha", np.zeros((3, SIZE, SIZE), np.uint8))
    write_mha(raw / "label_mha" / "00001.mha", np.zeros((SIZE, SIZE), np.uint8))
    with pytest.raises(DataError, match="pip install SimpleITK"):
        prepare("psfhs", raw, tmp_path / "data")
    assert leftovers(tmp_path / "data") == []


def test_psfhs_bad_label_value_names_the_file(tmp_path):
    raw = make_psfhs_png(tmp_path / "raw")
    lab = psfhs_label(1)
    lab[2, 2] = 3
    write_png(raw / "labels" / "00001.png", lab)
    with pytest.raises(DataError, match=r"00001\.png: label values \[3\]"):
        prepare("psfhs", raw, tmp_path / "data")
    assert leftovers(tmp_path / "data") == []


def test_psfhs_missing_label_empty_and_missing_raw(tmp_path):
    raw = make_psfhs_png(tmp_path / "raw")
    (raw / "labels" / "00002.png").unlink()
    with pytest.raises(DataError, match=r"00002\.png has no label"):
        prepare("psfhs", raw, tmp_path / "data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PSFHS data found"):
        prepare("psfhs", tmp_path / "empty", tmp_path / "data")
    with pytest.raises(DataError, match="raw folder not found"):
        prepare("psfhs", tmp_path / "nowhere", tmp_path / "data")
    assert leftovers(tmp_path / "data") == []


def test_chaos_and_psfhs_to_gray_helpers():
    """Small units: natural sort of CHAOS names, CT window end points, PSFHS channel handling."""
    names = ["IMG-0002-00010.dcm", "IMG-0002-00002.dcm", "IMG-0002-00001.dcm"]
    assert sorted(names, key=chaos.natural_key) == names[::-1]
    np.testing.assert_array_equal(chaos.window_ct(np.array([-2000.0, -160.0, 40.0, 240.0, 3000.0])),
                                  [0, 0, 128, 255, 255])
    rgb = np.stack([np.full((4, 4), 10), np.full((4, 4), 20), np.full((4, 4), 30)], axis=-1).astype(np.uint8)
    assert psfhs.to_gray_uint8(rgb, Path("x.mha"))[0, 0] == round(10 * 0.299 + 20 * 0.587 + 30 * 0.114)
    assert psfhs.to_gray_uint8(np.full((4, 4), 1000, np.int16), Path("x.mha")).max() == 0  # constant -> 0


# ------------------------------------------------- mask forms, implausible masks, 16-bit (issue 17)
def write_form(path: Path, fg: np.ndarray, form: str) -> None:
    if form == "1bit":
        Image.fromarray(fg).save(path)
    elif form == "palette":  # a grey palette whose index 0 is white: the values shown count
        im = Image.fromarray((~fg).astype(np.uint8), mode="P")
        im.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
        im.save(path)
    else:
        write_png(path, np.stack([fg * 255] * 3, axis=-1) if form == "rgb" else fg * 1)


@pytest.mark.parametrize("form", ["1bit", "L01", "palette", "rgb"])
def test_chaos_ct_ground_in_any_binary_form(tmp_path, form):
    raw = make_ct(tmp_path / "raw", patients=(("1", 3),))
    for png in (raw / "Train_Sets" / "CT" / "1" / "Ground").glob("*.png"):
        write_form(png, np.array(Image.open(png)) > 0, form)
    info = load_dataset(prepare("chaos", raw, tmp_path / "data"))
    for c in info.cases:
        k = int(c.case.rsplit("_", 1)[1])
        assert int(load_case(info, c)[1][:, 8].sum()) == k + 1, (form, c.case)  # not silently empty


def test_chaos_mr_binary_ground_is_ambiguous_and_refused(tmp_path):
    raw = make_mr(tmp_path / "raw")
    bad = raw / "Train_Sets" / "MR" / "3" / "T2SPIR" / "Ground" / "IMG-0002-00002.png"
    write_png(bad, (np.array(Image.open(bad)) > 0).astype(np.uint8))  # 0/1: not CHAOS MR values
    with pytest.raises(DataError, match=r"IMG-0002-00002\.png.*0/1"):
        prepare("chaos", raw, tmp_path / "data", modality="mr")
    assert leftovers(tmp_path / "data") == []


def test_chaos_inverted_ground_is_refused(tmp_path):
    raw = make_ct(tmp_path / "raw", patients=(("1", 3),))
    bad = raw / "Train_Sets" / "CT" / "1" / "Ground" / "liver_GT_001.png"
    write_png(bad, 255 - ct_mask(1))
    with pytest.raises(DataError, match=r"liver_GT_001\.png.*is the mask inverted\?"):
        prepare("chaos", raw, tmp_path / "data")
    assert leftovers(tmp_path / "data") == []


def test_psfhs_inverted_label_is_refused(tmp_path):
    raw = make_psfhs_png(tmp_path / "raw")
    lab = np.full((SIZE, SIZE), 2, np.uint8)
    lab[6:9, 6:9] = 0
    write_png(raw / "labels" / "00001.png", lab)
    with pytest.raises(DataError, match=r"00001\.png.*is the mask inverted\?"):
        prepare("psfhs", raw, tmp_path / "data")
    assert leftovers(tmp_path / "data") == []


def test_psfhs_palette_label_png_uses_its_indices(tmp_path):
    raw = make_psfhs_png(tmp_path / "raw")
    im = Image.fromarray(psfhs_label(2), mode="P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)  # coloured (VOC style): index = class
    im.save(raw / "labels" / "00002.png")
    info = load_dataset(prepare("psfhs", raw, tmp_path / "data"))
    np.testing.assert_array_equal(load_case(info, info.case("00002"))[1], psfhs_label(2))


def test_psfhs_wide_image_is_windowed_by_percentiles(capsys, monkeypatch):
    from tskd_utils import io

    monkeypatch.setattr(io, "_notes_seen", set())  # no note printed yet in this "conversion"
    arr = np.tile(np.linspace(-500, 1500, SIZE), (SIZE, 1)).astype(np.int16)
    arr[3, 3] = 30000  # one bright outlier must not black out the image
    gray = psfhs.to_gray_uint8(arr, Path("x.mha"))
    assert gray[3, 3] == 255 and 100 <= np.median(gray) <= 155
    assert "percentile" in capsys.readouterr().out
