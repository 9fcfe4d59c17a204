"""HC18, BUSI, KidneyUS and folder converters on small raw fixtures built here in their raw layouts.

The first part checks each converter's correct output; the second runs the same bad-input checks
on all four (parametrized); the last test converts the real HC18 copy when it is present.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from tskd_utils.datasets import busi, folder, hc18, kidneyus, main
from tskd_utils.io import DataError, load_case, load_dataset

REPO = Path(__file__).resolve().parents[1]
HC18_REAL = Path(__file__).resolve().parents[2] / "shared/datasets/hc18"
H, W = 48, 64  # fixture image size (rows, columns)


# ------------------------------------------------------------------------------- file helpers
def save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr).astype(np.uint8)).save(path)
    return path


def noise(seed: int, shape=(H, W)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def ellipse(cy: float, cx: float, ry: float, rx: float, shape=(H, W)) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def outline_of(filled: np.ndarray, thickness: int = 2) -> np.ndarray:
    """The ring just inside the head, not drawn along the image border (like the official files)."""
    return filled & ~ndimage.binary_erosion(filled, iterations=thickness, border_value=1)


def perimeter(ry: float, rx: float) -> float:  # Ramanujan's approximation
    return math.pi * (3 * (rx + ry) - math.sqrt((3 * rx + ry) * (rx + 3 * ry)))


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def mask_values(info) -> set:
    values = set()
    for c in info.cases:
        values |= set(np.unique(load_case(info, c)[1]).tolist())
    return values


# ----------------------------------------------------------------------------- HC18 fixtures
HC_HEADS = {  # stem: (cy, cx, ry, rx, pixel size mm)
    "010_HC": (24, 32, 16, 22, 0.10),
    "010_2HC": (23, 31, 15, 21, 0.11),
    "011_HC": (25, 30, 17, 24, 0.09),
    "012_HC": (24, 33, 14, 20, 0.12),
}


def write_hc_csv(path: Path, heads=HC_HEADS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["filename", "pixel size(mm)", "head circumference (mm)"])
        for stem, (_, _, ry, rx, px) in heads.items():
            w.writerow([f"{stem}.png", px, round(perimeter(ry, rx) * px, 3)])


def make_hc18_official(raw: Path, heads=HC_HEADS) -> Path:
    for i, (stem, (cy, cx, ry, rx, _)) in enumerate(heads.items()):
        save(raw / "training_set" / f"{stem}.png", noise(i))
        save(raw / "training_set" / f"{stem}_Annotation.png", outline_of(ellipse(cy, cx, ry, rx)) * 255)
    write_hc_csv(raw / hc18.CSV_NAME, heads)
    return raw


def make_hc18_filled(raw: Path, heads=HC_HEADS) -> Path:
    for i, (stem, (cy, cx, ry, rx, _)) in enumerate(heads.items()):
        save(raw / "images" / f"{stem}.png", noise(i))
        head = ellipse(cy, cx, ry, rx).astype(np.uint8) * 255
        save(raw / "masks" / f"{stem}_Annotation.png", np.stack([head] * 3, axis=-1))  # RGB, R=G=B
    write_hc_csv(raw / hc18.CSV_NAME, heads)
    return raw


# ------------------------------------------------------------------------------ BUSI fixtures
def make_busi(raw: Path) -> Path:
    """benign (1..2), malignant (1..2), normal (1); benign (2) has _mask, _mask_1, _mask_2."""
    top = raw / busi.TOP
    k = 0
    for cls, n in (("benign", 2), ("malignant", 2), ("normal", 1)):
        for i in range(1, n + 1):
            k += 1
            gray = noise(100 + k)
            save(top / cls / f"{cls} ({i}).png", np.stack([gray] * 3, axis=-1))  # stored as RGB
            lesion = np.zeros((H, W), np.uint8) if cls == "normal" else ellipse(20, 20 + 8 * i, 6, 8) * 255
            save(top / cls / f"{cls} ({i})_mask.png", lesion)
    save(top / "benign" / "benign (2)_mask_1.png", ellipse(38, 50, 5, 6) * 255)
    save(top / "benign" / "benign (2)_mask_2.png", ellipse(8, 8, 4, 4) * 255)
    return raw


# -------------------------------------------------------------------------- KidneyUS fixtures
KIDNEY_NAMES = ["1_IM-0001-0059_anon", "130_IM-0650-0033_anon", "130_IM-0650-0053_anon", "14_IM-0699-0002_anon"]


def regions_mask(seed: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[ellipse(24, 32, 18, 26)] = 3  # cortex
    m[ellipse(24, 32, 12, 18)] = 2  # medulla
    m[ellipse(24, 32, 6, 9)] = 1  # central echo complex
    return np.roll(m, seed, axis=1)


def make_kidneyus(raw: Path, capsule_scale: int = 1, unlabelled: int = 1, images_sub: str = "images",
                  ext: str = ".png") -> Path:
    img_dir = raw / images_sub if images_sub else raw
    for i, name in enumerate(KIDNEY_NAMES):
        save(img_dir / f"{name}{ext}", noise(200 + i))
        for a in (1, 2):
            base = raw / "labels" / f"reviewed_masks_{a}"
            if a == 2 and i == 0:
                continue  # the second annotator skipped one image
            save(base / "capsule" / f"{name}.png", ellipse(24, 30 + a + i, 18, 26) * capsule_scale)
            save(base / "regions" / f"{name}.png", regions_mask(i + a))
    for j in range(unlabelled):  # e.g. the unlabelled images of other organs
        save(img_dir / f"9{j}_IM-0999-000{j}_anon{ext}", noise(300 + j))
    return raw


# ---------------------------------------------------------------------------- folder fixtures
def make_folder(raw: Path, suffix: str = "", scale: int = 1) -> Path:
    for i in range(4):
        save(raw / "images" / f"img{i:02d}.png", noise(400 + i))
        m = np.zeros((H, W), np.uint8)
        m[ellipse(24, 32, 15, 20)] = 1
        m[ellipse(24, 32, 6, 8)] = 2
        save(raw / "masks" / f"img{i:02d}{suffix}.png", m * scale)
    return raw


# ====================================================================== correct conversions
def test_hc18_official_layout_fills_outlines(tmp_path):
    raw = make_hc18_official(tmp_path / "raw")
    folder_ = hc18.prepare(raw, tmp_path / "data")
    assert folder_ == tmp_path / "data" / "hc18"
    info = load_dataset(folder_)
    assert [c.case for c in info.cases] == sorted(HC_HEADS)
    assert {c.case: c.subject for c in info.cases} == {"010_2HC": "010", "010_HC": "010", "011_HC": "011",
                                                       "012_HC": "012"}
    assert mask_values(info) == {0, 1}
    for c in info.cases:
        cy, cx, ry, rx, px = HC_HEADS[c.case]
        assert c.spacing_mm == pytest.approx(px)
        image, mask = load_case(info, c)
        assert mask.sum() == pytest.approx(math.pi * ry * rx, rel=0.08)  # the filled ellipse, not the ring
        assert np.array_equal(mask.astype(bool), ellipse(cy, cx, ry, rx))
        assert np.array_equal(image, noise(list(HC_HEADS).index(c.case)))
    meta = json.loads((folder_ / "dataset.json").read_text())
    assert meta["name"] == "hc18" and meta["classes"] == ["background", "fetal head"]
    assert meta["n_cases"] == 4 and "ultrasound" in meta["modality"]
    assert "CC BY 4.0" in meta["license"]
    assert "10.1371/journal.pone.0200412" in meta["citation"] and "10.5281/zenodo.1327317" in meta["citation"]
    assert meta["source"].startswith("https://zenodo.org/") and "1327317" in meta["source"]
    assert "official" in meta["notes"]


def test_hc18_filled_layout_keeps_masks(tmp_path):
    raw = make_hc18_filled(tmp_path / "raw")
    info = load_dataset(hc18.prepare(raw, tmp_path / "data"))
    assert len(info.cases) == 4 and len({c.subject for c in info.cases}) == 3
    for c in info.cases:
        src = np.array(Image.open(raw / "masks" / f"{c.case}_Annotation.png").convert("L")) > 0
        assert np.array_equal(load_case(info, c)[1], src.astype(np.uint8))
    assert "filled" in json.loads((info.root / "dataset.json").read_text())["notes"]


def test_hc18_outline_with_small_gap_and_head_cut_by_border_are_filled(tmp_path):
    heads = {"020_HC": (24, 32, 16, 22, 0.1), "021_HC": (38, 32, 14, 20, 0.1)}  # 021: cut by the bottom edge
    raw = make_hc18_official(tmp_path / "raw", heads)
    ann = raw / "training_set" / "020_HC_Annotation.png"
    ring = np.array(Image.open(ann)) > 0
    ring[20:26, 8:12] = False  # a 6-pixel gap on the left side of the ring
    save(ann, ring * 255)
    # the cut head's circumference is the full ellipse's; its area is clipped, still within the check
    info = load_dataset(hc18.prepare(raw, tmp_path / "data"))
    for c in info.cases:
        cy, cx, ry, rx, _ = heads[c.case]
        truth = ellipse(cy, cx, ry, rx)
        mask = load_case(info, c)[1].astype(bool)
        assert (mask != truth).sum() <= 0.02 * truth.sum()


def test_hc18_outline_that_cannot_be_filled_names_the_file(tmp_path):
    raw = make_hc18_official(tmp_path / "raw")
    ann = raw / "training_set" / "011_HC_Annotation.png"
    ring = np.array(Image.open(ann)) > 0
    ring[:, :30] = False  # half the ellipse is missing: an open arc
    save(ann, ring * 255)
    with pytest.raises(DataError, match=r"011_HC_Annotation\.png.*cannot be filled"):
        hc18.prepare(raw, tmp_path / "data")
    assert not (tmp_path / "data" / "hc18").exists()


def test_hc18_area_check_and_csv_problems(tmp_path):
    raw = make_hc18_filled(tmp_path / "raw")
    ann = raw / "masks" / "012_HC_Annotation.png"
    save(ann, outline_of(ellipse(*HC_HEADS["012_HC"][:4])) * 255)  # an outline where a filled mask belongs
    with pytest.raises(DataError, match=r"012_HC_Annotation\.png: head area"):
        hc18.prepare(raw, tmp_path / "data")
    raw2 = make_hc18_filled(tmp_path / "raw2")
    (raw2 / hc18.CSV_NAME).write_text("filename,pixel size(mm),head circumference (mm)\n010_HC.png,0.1,80\n")
    with pytest.raises(DataError, match=r"010_2HC\.png has no row in .*training_set_pixel_size_and_HC\.csv"):
        hc18.prepare(raw2, tmp_path / "data")
    (raw2 / hc18.CSV_NAME).unlink()
    with pytest.raises(DataError, match=r"training_set_pixel_size_and_HC\.csv is missing"):
        hc18.prepare(raw2, tmp_path / "data")


def test_hc18_unrecognised_layout_says_what_was_expected(tmp_path):
    raw = tmp_path / "raw"
    save(raw / "somewhere" / "x.png", noise(0))
    with pytest.raises(DataError, match=r"does not look like HC18: expected .*training_set/NNN_HC\.png"):
        hc18.prepare(raw, tmp_path / "data")


def test_hc18_max_cases_and_workers_give_the_same_cases(tmp_path):
    raw = make_hc18_official(tmp_path / "raw")
    one = load_dataset(hc18.prepare(raw, tmp_path / "a", workers=1))
    two = load_dataset(hc18.prepare(raw, tmp_path / "b", workers=3))
    assert [c.case for c in one.cases] == [c.case for c in two.cases]
    for c1, c2 in zip(one.cases, two.cases):
        assert np.array_equal(load_case(one, c1)[1], load_case(two, c2)[1])
    assert len(load_dataset(hc18.prepare(raw, tmp_path / "c", max_cases=2)).cases) == 2


def test_error_in_a_reader_thread_stops_cleanly(tmp_path):
    heads = {f"{i:03d}_HC": (24, 32, 16, 22, 0.1) for i in range(40)}
    raw = make_hc18_official(tmp_path / "raw", heads)
    (raw / "training_set" / "017_HC.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"017_HC\.png: not a readable image"):
        hc18.prepare(raw, tmp_path / "data", workers=3)
    assert_nothing_left(tmp_path / "data", "hc18")


def test_busi_ors_extra_masks_and_skips_normal(tmp_path):
    raw = make_busi(tmp_path / "raw")
    info = load_dataset(busi.prepare(raw, tmp_path / "data"))
    assert [c.case for c in info.cases] == ["benign_0001", "benign_0002", "malignant_0001", "malignant_0002"]
    assert all(c.subject == c.case for c in info.cases)
    assert mask_values(info) == {0, 1}
    mask = load_case(info, info.case("benign_0002"))[1].astype(bool)
    expected = ellipse(20, 36, 6, 8) | ellipse(38, 50, 5, 6) | ellipse(8, 8, 4, 4)
    assert np.array_equal(mask, expected)
    image = load_case(info, info.case("malignant_0001"))[0]
    assert image.ndim == 2 and np.array_equal(image, noise(103))  # RGB with equal channels -> the same gray
    meta = json.loads((info.root / "dataset.json").read_text())
    assert meta["classes"] == ["background", "lesion"] and meta["n_cases"] == 4
    assert meta["license"].startswith("not stated by the authors")
    assert "10.1016/j.dib.2019.104863" in meta["citation"] and meta["source"].startswith("https://")
    assert "no patient ids" in meta["notes"] and meta["include_normal"] is False


def test_busi_include_normal_and_raw_pointing_inside(tmp_path):
    raw = make_busi(tmp_path / "raw")
    info = load_dataset(busi.prepare(raw / busi.TOP, tmp_path / "data", include_normal=True))
    assert len(info.cases) == 5
    assert load_case(info, info.case("normal_0001"))[1].max() == 0


def test_busi_mask_without_image_and_missing_class_folder(tmp_path):
    raw = make_busi(tmp_path / "raw")
    save(raw / busi.TOP / "malignant" / "malignant (9)_mask.png", np.zeros((H, W)))
    with pytest.raises(DataError, match=r"malignant \(9\)_mask\.png has no image"):
        busi.prepare(raw, tmp_path / "data")
    raw2 = make_busi(tmp_path / "raw2")
    for p in (raw2 / busi.TOP / "normal").iterdir():
        p.unlink()
    (raw2 / busi.TOP / "normal").rmdir()
    assert len(load_dataset(busi.prepare(raw2, tmp_path / "d2")).cases) == 4  # normal/ is optional ...
    with pytest.raises(DataError, match=r"normal is missing"):
        busi.prepare(raw2, tmp_path / "d3", include_normal=True)  # ... unless asked for


def test_kidneyus_capsule_default(tmp_path, capsys):
    raw = make_kidneyus(tmp_path / "raw", capsule_scale=255, unlabelled=2)
    folder_ = kidneyus.prepare(raw, tmp_path / "data")
    assert folder_.name == "kidneyus_capsule"
    info = load_dataset(folder_)
    assert [c.case for c in info.cases] == sorted(KIDNEY_NAMES)
    assert {c.case: c.subject for c in info.cases}["130_IM-0650-0053_anon"] == "130"
    assert len({c.subject for c in info.cases}) == 3  # the two "130_" images are one subject
    assert mask_values(info) == {0, 1}
    assert "skipped 2 images" in capsys.readouterr().out
    meta = json.loads((folder_ / "dataset.json").read_text())
    assert meta["classes"] == ["background", "capsule"] and meta["annotator"] == 1
    assert "CC BY-NC-SA" in meta["license"] and "2206.06657" in meta["citation"]
    assert meta["source"] == "https://github.com/rsingla92/kidneyUS"


def test_kidneyus_regions_annotator2_images_in_raw_as_jpg(tmp_path, capsys):
    raw = make_kidneyus(tmp_path / "raw", images_sub="", ext=".jpg", unlabelled=0)
    folder_ = kidneyus.prepare(raw, tmp_path / "data", target="regions", annotator=2)
    assert folder_.name == "kidneyus_regions_annotator2"
    info = load_dataset(folder_)
    assert len(info.cases) == 3  # annotator 2 has no mask for the first image: skipped, not an error
    assert "skipped 1 images" in capsys.readouterr().out
    assert mask_values(info) == {0, 1, 2, 3}
    c = info.case(KIDNEY_NAMES[1])
    assert np.array_equal(load_case(info, c)[1], regions_mask(1 + 2))
    meta = json.loads((folder_ / "dataset.json").read_text())
    assert meta["classes"] == ["background", "central echo complex", "medulla", "cortex"]


def test_kidneyus_missing_masks_folder_says_where(tmp_path):
    raw = tmp_path / "raw"
    save(raw / "images" / "1_IM-0001-0059_anon.png", noise(0))
    with pytest.raises(DataError, match=r"labels/reviewed_masks_1/capsule"):
        kidneyus.prepare(raw, tmp_path / "data")


def test_folder_converter_suffix_binarize_subjects(tmp_path):
    raw = make_folder(tmp_path / "raw", suffix="_mask", scale=127)  # 0/127/254: not class indices ...
    with pytest.raises(DataError, match=r"img00_mask\.png: mask values \[127, 254\] are not valid class indices"):
        folder.prepare(raw, tmp_path / "data", mask_suffix="_mask", classes="background,organ,core")
    subjects = tmp_path / "subjects.csv"
    subjects.write_text("case,subject\nimg00,p1\nimg01,p1\nimg02,p2\nimg03,p3\n")
    out = folder.prepare(raw, tmp_path / "data", mask_suffix="_mask", classes="background,organ",
                         binarize=True, subjects=subjects, dataset_name="mine", license="CC0-1.0",
                         citation="me (2024)", modality="ultrasound")  # ... unless binarized
    info = load_dataset(out)
    assert out.name == "mine" and len(info.cases) == 4
    assert {c.case: c.subject for c in info.cases} == {"img00": "p1", "img01": "p1", "img02": "p2", "img03": "p3"}
    assert mask_values(info) == {0, 1}
    meta = json.loads((out / "dataset.json").read_text())
    assert (meta["name"], meta["license"], meta["citation"], meta["modality"], meta["source"]) == (
        "mine", "CC0-1.0", "me (2024)", "ultrasound", "user-supplied")


def test_folder_converter_images_masks_options_and_classes(tmp_path):
    raw = make_folder(tmp_path / "elsewhere")
    out = folder.prepare(None, tmp_path / "data", images=raw / "images", masks=raw / "masks",
                         classes="background,organ,core")
    info = load_dataset(out)
    assert out.name == "custom" and info.classes == ["background", "organ", "core"]
    assert mask_values(info) == {0, 1, 2} and all(c.subject == c.case for c in info.cases)
    with pytest.raises(DataError, match=r"--classes needs at least two"):
        folder.prepare(raw, tmp_path / "x", classes="background")
    with pytest.raises(DataError, match=r"case 'img03'.*not listed in the subjects file"):
        (tmp_path / "s.csv").write_text("case,subject\nimg00,a\nimg01,a\nimg02,b\n")
        folder.prepare(raw, tmp_path / "x", classes="background,organ,core", subjects=tmp_path / "s.csv")


def test_folder_cli_help_explains_raw_versus_images_masks(capsys):
    with pytest.raises(SystemExit):
        main("folder", ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--images" in text and "RAW/images" in text and "--raw ." in text


def test_folder_cli_with_images_and_masks(tmp_path):
    raw = make_folder(tmp_path / "raw")
    rc = main("folder", ["--raw", ".", "--images", str(raw / "images"), "--masks", str(raw / "masks"),
                         "--out", str(tmp_path / "data"), "--classes", "background,organ,core", "--name", "org"])
    assert rc == 0 and len(load_dataset(tmp_path / "data" / "org").cases) == 4


# ======================================================= the same bad inputs for every converter
@dataclass
class Raw:
    """A raw fixture plus what the generic tests need to know about it."""

    name: str  # converter
    raw: Path
    folder: str  # output folder name
    image: Path  # the last case's image ...
    mask: Path  # ... and its mask
    n_cases: int
    bad_values: Callable[[Path], None]  # write a mask with invalid values to this path
    options: dict = field(default_factory=dict)
    argv: list = field(default_factory=list)
    missing_mask_is_error: bool = True

    def prepare(self, out: Path, **kw):
        return {"hc18": hc18, "busi": busi, "kidneyus": kidneyus, "folder": folder}[self.name].prepare(
            self.raw, out, **self.options, **kw)


def _bad(values) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        m = np.zeros((H, W), np.uint8)
        m[10:20, 10:20] = values[0]
        m[30:40, 30:40] = values[1]
        save(path, m)
    return write


def build(name: str, root: Path) -> Raw:
    raw = root / "raw"
    if name == "hc18":
        make_hc18_filled(raw)
        return Raw(name, raw, "hc18", raw / "images" / "012_HC.png", raw / "masks" / "012_HC_Annotation.png", 4,
                   _bad((255, 128)))
    if name == "busi":
        make_busi(raw)
        top = raw / busi.TOP / "malignant"
        return Raw(name, raw, "busi", top / "malignant (2).png", top / "malignant (2)_mask.png", 4, _bad((1, 100)))
    if name == "kidneyus":
        make_kidneyus(raw, unlabelled=0)
        last = sorted(KIDNEY_NAMES)[-1]
        return Raw(name, raw, "kidneyus_capsule", raw / "images" / f"{last}.png",
                   raw / "labels" / "reviewed_masks_1" / "capsule" / f"{last}.png", 4, _bad((1, 7)),
                   missing_mask_is_error=False)
    make_folder(raw)
    return Raw(name, raw, "custom", raw / "images" / "img03.png", raw / "masks" / "img03.png", 4, _bad((2, 3)),
               options={"classes": "background,organ,core"}, argv=["--classes", "background,organ,core"])


CONVERTERS = ["hc18", "busi", "kidneyus", "folder"]


def assert_nothing_left(out: Path, folder_name: str) -> None:
    """No dataset folder and no temporary folder after a failed conversion."""
    assert not (out / folder_name).exists()
    leftovers = [p.name for p in out.iterdir()] if out.exists() else []
    assert leftovers == [], leftovers


@pytest.mark.parametrize("name", CONVERTERS)
def test_converts_and_reads_back(name, tmp_path):
    r = build(name, tmp_path)
    info = load_dataset(r.prepare(tmp_path / "data"))
    assert info.root.name == r.folder and len(info.cases) == r.n_cases
    assert max(mask_values(info)) < info.n_classes
    meta = json.loads((info.root / "dataset.json").read_text())
    for key in ("name", "modality", "classes", "license", "citation", "source", "n_cases"):
        assert key in meta
    assert meta["n_cases"] == r.n_cases and meta["classes"][0] == "background"


@pytest.mark.parametrize("name", CONVERTERS)
def test_truncated_png_names_the_file(name, tmp_path):
    r = build(name, tmp_path)
    data = r.image.read_bytes()
    r.image.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"not a readable image") as e:
        r.prepare(tmp_path / "data")
    assert str(r.image) in str(e.value)
    assert_nothing_left(tmp_path / "data", r.folder)


@pytest.mark.parametrize("name", CONVERTERS)
def test_non_image_with_png_name_names_the_file(name, tmp_path):
    r = build(name, tmp_path)
    r.mask.write_text("this is not a PNG\n")
    with pytest.raises(DataError, match=r"not a readable mask image") as e:
        r.prepare(tmp_path / "data")
    assert str(r.mask) in str(e.value)
    assert_nothing_left(tmp_path / "data", r.folder)


@pytest.mark.parametrize("name", CONVERTERS)
def test_mask_size_differs_from_image(name, tmp_path):
    r = build(name, tmp_path)
    save(r.mask, np.zeros((H + 2, W), np.uint8))
    with pytest.raises(DataError, match=r"mask size 64x50 \(WxH\) differs from its image's 64x48") as e:
        r.prepare(tmp_path / "data")
    assert str(r.mask) in str(e.value)
    assert_nothing_left(tmp_path / "data", r.folder)


@pytest.mark.parametrize("name", CONVERTERS)
def test_mask_values_that_are_not_class_indices(name, tmp_path):
    r = build(name, tmp_path)
    r.bad_values(r.mask)
    with pytest.raises(DataError, match=r"mask values .* not valid") as e:
        r.prepare(tmp_path / "data")
    assert str(r.mask) in str(e.value)
    assert_nothing_left(tmp_path / "data", r.folder)


@pytest.mark.parametrize("name", CONVERTERS)
def test_image_without_mask(name, tmp_path, capsys):
    r = build(name, tmp_path)
    r.mask.unlink()
    if r.missing_mask_is_error:
        with pytest.raises(DataError, match=r"has no mask") as e:
            r.prepare(tmp_path / "data")
        assert str(r.image) in str(e.value)
        assert_nothing_left(tmp_path / "data", r.folder)
    else:  # KidneyUS: images without a mask from the chosen annotator are skipped and counted
        info = load_dataset(r.prepare(tmp_path / "data"))
        assert len(info.cases) == r.n_cases - 1
        assert "skipped 1 images" in capsys.readouterr().out


@pytest.mark.parametrize("name", CONVERTERS)
def test_mask_without_image(name, tmp_path):
    r = build(name, tmp_path)
    r.image.unlink()
    with pytest.raises(DataError, match=r"has no image") as e:
        r.prepare(tmp_path / "data")
    assert r.mask.name in str(e.value)


@pytest.mark.parametrize("name", CONVERTERS)
def test_empty_and_missing_raw_folder(name, tmp_path):
    r = build(name, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    other = dict(r.options)
    mod = {"hc18": hc18, "busi": busi, "kidneyus": kidneyus, "folder": folder}[name]
    with pytest.raises(DataError, match=r"is empty; expected .+") as e:
        mod.prepare(empty, tmp_path / "data", **other)
    assert str(empty) in str(e.value)
    with pytest.raises(DataError, match=r"not found.*expected .+") as e:
        mod.prepare(tmp_path / "nope", tmp_path / "data", **other)
    assert str(tmp_path / "nope") in str(e.value)
    assert_nothing_left(tmp_path / "data", r.folder)


@pytest.mark.parametrize("name", CONVERTERS)
def test_finished_dataset_is_kept_unless_overwrite(name, tmp_path):
    r = build(name, tmp_path)
    out = tmp_path / "data"
    target = r.prepare(out)
    (target / "marker.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        r.prepare(out)
    assert (target / "marker.txt").read_text() == "old"
    assert len(load_dataset(target).cases) == r.n_cases
    # a failing overwrite leaves the old dataset as it was
    data = r.image.read_bytes()
    r.image.write_bytes(data[:20])
    with pytest.raises(DataError):
        r.prepare(out, overwrite=True)
    assert (target / "marker.txt").read_text() == "old"
    r.image.write_bytes(data)
    assert r.prepare(out, overwrite=True) == target
    assert not (target / "marker.txt").exists()
    assert len(load_dataset(target).cases) == r.n_cases
    assert sorted(p.name for p in out.iterdir()) == [r.folder]  # no temp or old folders left


@pytest.mark.parametrize("name", CONVERTERS)
def test_cli_returns_nonzero_with_a_message(name, tmp_path, capsys):
    r = build(name, tmp_path)
    r.mask.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rc = main(name, ["--raw", str(r.raw), "--out", str(tmp_path / "data"), *r.argv])
    assert rc != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and r.mask.name in err
    rc = main(name, ["--raw", str(tmp_path / "missing"), "--out", str(tmp_path / "data"), *r.argv])
    assert rc != 0 and "raw folder not found" in capsys.readouterr().err


def test_prepare_script_runs_as_a_program(tmp_path):
    raw = make_hc18_official(tmp_path / "raw")
    cmd = [sys.executable, str(REPO / "data_scripts" / "prepare_hc18.py"), "--raw", str(raw), "--out", str(tmp_path / "d")]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "wrote 4 cases (3 subjects" in ok.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode != 0 and "already exists" in again.stderr and "--overwrite" in again.stderr


# ================================================ mask forms, implausible masks, duplicates (issue 17)
FORMS = ["L01", "L255", "1bit", "rgb", "palette"]


def mask_paths(r: Raw) -> list:
    if r.name == "busi":
        return sorted((r.raw / busi.TOP).rglob("*_mask*.png"))
    if r.name == "kidneyus":
        return sorted((r.raw / "labels").rglob("capsule/*.png"))
    return sorted((r.raw / "masks").glob("*.png"))


def write_form(path: Path, fg: np.ndarray, form: str) -> None:
    """Save the bool foreground ``fg`` as a 0/1 or 0/255 grey, 1-bit, RGB or palette PNG."""
    if form == "1bit":
        Image.fromarray(fg).save(path)
    elif form == "rgb":
        save(path, np.stack([fg * 255] * 3, axis=-1))
    elif form == "palette":  # index 0 is white: what the image shows counts, not the index
        im = Image.fromarray((~fg).astype(np.uint8), mode="P")
        im.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
        im.save(path)
    else:
        save(path, fg * (1 if form == "L01" else 255))


def convert_with_masks_as(name: str, root: Path, form: str):
    r = build(name, root)
    if name == "folder":
        r.options = {"classes": "background,organ"}  # binary masks: two classes
    for p in mask_paths(r):
        write_form(p, np.array(Image.open(p).convert("L")) > 0, form)
    return load_dataset(r.prepare(root / "data"))


@pytest.mark.parametrize("name", CONVERTERS)
def test_binary_masks_in_any_unambiguous_form_are_accepted(name, tmp_path):
    ref = convert_with_masks_as(name, tmp_path / "ref", "L01")
    assert mask_values(ref) == {0, 1}
    for form in FORMS[1:]:
        got = convert_with_masks_as(name, tmp_path / form, form)
        assert [c.case for c in got.cases] == [c.case for c in ref.cases]
        for a, b in zip(ref.cases, got.cases):
            assert np.array_equal(load_case(ref, a)[1], load_case(got, b)[1]), (form, a.case)


@pytest.mark.parametrize("kind", ["inverted", "frame"])
@pytest.mark.parametrize("name", CONVERTERS)
def test_implausible_mask_is_refused_with_the_file_named(name, kind, tmp_path):
    r = build(name, tmp_path)
    m = np.array(Image.open(r.mask).convert("L"))
    if kind == "inverted":
        bad = np.where(m > 0, 0, m.max())
    else:  # foreground on every border, about 60 % of the image
        bad = np.full((H, W), m.max(), np.uint8)
        bad[10:-10, 12:-12] = 0
    save(r.mask, bad)
    with pytest.raises(DataError, match=r"is the mask inverted\?") as e:
        r.prepare(tmp_path / "data")
    assert str(r.mask) in str(e.value)
    assert_nothing_left(tmp_path / "data", r.folder)
    if name == "folder":  # the user's own data may really look like this: an explicit opt-out
        info = load_dataset(r.prepare(tmp_path / "data", allow_large_foreground=True))
        assert len(info.cases) == r.n_cases


def test_busi_duplicate_case_numbers_are_refused(tmp_path):
    raw = make_busi(tmp_path / "raw")
    top = raw / busi.TOP / "benign"
    save(top / "benign (02).png", noise(7))
    save(top / "benign (02)_mask.png", ellipse(20, 20, 6, 8) * 255)
    with pytest.raises(DataError, match=r"case number 2") as e:
        busi.prepare(raw, tmp_path / "data")
    assert str(top / "benign (2).png") in str(e.value) and str(top / "benign (02).png") in str(e.value)
    (top / "benign (02).png").unlink()  # a duplicate mask number alone is refused as well
    with pytest.raises(DataError, match=r"benign \(02\)_mask\.png"):
        busi.prepare(raw, tmp_path / "data")
    assert_nothing_left(tmp_path / "data", "busi")


# ================================================================================ the real data
@pytest.mark.realdata
@pytest.mark.skipif(not (HC18_REAL / "images").is_dir(), reason=f"real HC18 copy not found at {HC18_REAL}")
def test_real_hc18_converts_completely(tmp_path):
    info = load_dataset(hc18.prepare(HC18_REAL, tmp_path / "data"))
    stems = sorted(p.stem for p in (HC18_REAL / "images").glob("*.png"))
    assert len(info.cases) == 999 and [c.case for c in info.cases] == stems
    assert {c.subject for c in info.cases} == {s[:3] for s in stems}
    assert all(c.spacing_mm and 0.01 < c.spacing_mm < 1.0 for c in info.cases)  # real: 0.049..0.393 mm
    for name in ("000_HC", "010_2HC", "186_HC", stems[-1]):  # 186_HC: the head leaves the image
        image, mask = load_case(info, info.case(name))
        src = np.array(Image.open(HC18_REAL / "masks" / f"{name}_Annotation.png").convert("L")) > 0
        assert np.array_equal(mask, src.astype(np.uint8))
        assert np.array_equal(image, np.array(Image.open(HC18_REAL / "images" / f"{name}.png").convert("L")))


# ============================================================== read_mask fixes (tskd_utils/io.py)
def test_read_mask_accepts_la_and_rejects_16_bit_values_beyond_8_bit(tmp_path):
    from tskd_utils.io import read_mask

    la = np.zeros((H, W, 2), np.uint8)
    la[..., 0] = (ellipse(24, 32, 10, 10) * 2).astype(np.uint8)
    la[..., 1] = 255  # alpha
    Image.fromarray(la).save(tmp_path / "la.png")  # (H, W, 2) uint8 -> mode LA
    assert set(np.unique(read_mask(tmp_path / "la.png", n_classes=3)).tolist()) == {0, 2}
    wide = np.zeros((H, W), np.uint16)
    wide[5:10, 5:10] = 256  # would wrap to 0 in a plain uint8 cast
    Image.fromarray(wide).save(tmp_path / "wide.png")
    with pytest.raises(DataError, match=r"wide\.png: mask values 0\.\.256 do not fit 0\.\.255"):
        read_mask(tmp_path / "wide.png")
