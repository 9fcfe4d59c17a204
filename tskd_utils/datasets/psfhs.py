"""PSFHS (pubic symphysis and fetal head, intrapartum ultrasound) -> the common format (``psfhs``).

Source: Chen G, Bai J, Ou Z, Lu Y, Wang H. "PSFHS: Intrapartum ultrasound image dataset for
AI-based segmentation of pubic symphysis and fetal head", Scientific Data 11, 436 (2024),
doi:10.1038/s41597-024-03266-4; data: Zenodo record 10969427 (``PSFHS.zip``), 1358 images from
1124 women. Licence: CC BY 4.0 as reported by public dataset lists (we could not open the Zenodo
page from here; please confirm it there).

Raw layout. We could not read the paper's Data Records section or the Zenodo page itself; the
layout below is the one that every public loader we found agrees on (torch-em's ``psfhs.py``, which
downloads ``PSFHS.zip`` and globs ``PSFHS/image_mha/*.mha`` and ``PSFHS/label_mha/*.mha``, the
UltraBench PSFHS scripts, and several training repositories; one of them counts 2716 .mha files,
i.e. 1358 images + 1358 labels)::

    RAW/[PSFHS/]image_mha/<id>.mha    ultrasound image, 3 identical channels (SimpleITK array 3 x H x W),
                                      256 x 256 in the public release
    RAW/[PSFHS/]label_mha/<id>.mha    label map, same name: 0 background, 1 pubic symphysis, 2 fetal head

Fallback layouts (not published; for data already exported elsewhere): ``images/`` + ``labels/``
(or ``image_mha/`` + ``label_mha/``) holding .mha or PNG/TIFF/BMP files paired by file name.
``--raw`` may point at the folder holding these two folders or at its parent (e.g. the folder the zip
was unpacked into, which holds ``PSFHS/``).

.mha files are read with SimpleITK, imported only when needed: without it a clear error says to
``pip install SimpleITK``; other files as in :func:`tskd_utils.io.read_image` and
:func:`tskd_utils.io.read_label_array`. Colour images whose channels are identical are reduced to
one channel; otherwise ITU-R 601 luma is used. Images that are not 8-bit are windowed to their
0.5-99.5 percentiles. Label values must be 0, 1 or 2 (a DataError names the file otherwise); a label
map that looks inverted is refused. No pixel spacing is recorded: the release does not document one
we could verify.

Subjects: every image is its own subject. The ids are plain running numbers and the release has
no woman/examination id, although 1358 images come from 1124 women, so some women contribute more
than one image and a grouped split cannot keep them together (a possible source of leakage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..io import (DataError, DatasetWriter, check_plausible_mask, read_image, read_label_array, safe_join,
                  window_to_uint8)

DESCRIPTION = ("PSFHS intrapartum ultrasound (Zenodo 10969427): pubic symphysis and fetal head, "
               "image_mha/ + label_mha/ (.mha via SimpleITK)")

CLASSES = ["background", "pubic symphysis", "fetal head"]
CITATION = ("Chen G, Bai J, Ou Z, Lu Y, Wang H. PSFHS: Intrapartum ultrasound image dataset for AI-based "
            "segmentation of pubic symphysis and fetal head. Scientific Data 11, 436 (2024). "
            "doi:10.1038/s41597-024-03266-4. Data: Zenodo, doi:10.5281/zenodo.10969427")
LICENSE = "CC BY 4.0 (as reported for Zenodo record 10969427; confirm on the record page)"
SOURCE = "https://doi.org/10.5281/zenodo.10969427"

LAYOUTS = (("image_mha", "label_mha"), ("images", "labels"))
IMAGE_SUFFIXES = (".mha", ".mhd", ".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
LABEL_SUFFIXES = (".mha", ".mhd", ".png", ".tif", ".tiff", ".bmp")  # no lossy JPEG labels


def add_arguments(parser) -> None:
    """PSFHS has no options besides --raw, --out and --overwrite."""


# ------------------------------------------------------------------------------------- finding
def find_layout(raw: Optional[Path]) -> tuple:
    """Return (image folder, label folder) from the published layout or a fallback."""
    if raw is None:
        raise DataError("PSFHS needs --raw: the folder holding image_mha/ and label_mha/ (from PSFHS.zip)")
    raw = Path(raw)
    if not raw.is_dir():
        raise DataError(f"raw folder not found: {raw}")
    bases = [raw] + sorted(p for p in raw.iterdir() if p.is_dir())
    for base in bases:
        for image_dir, label_dir in LAYOUTS:
            if (base / image_dir).is_dir() and (base / label_dir).is_dir():
                return base / image_dir, base / label_dir
    names = " or ".join(f"{i}/ + {lab}/" for i, lab in LAYOUTS)
    raise DataError(f"{raw}: no PSFHS data found (expected {names} in it or in one of its sub-folders, "
                    f"as unpacked from PSFHS.zip)")


def _by_stem(folder: Path, suffixes: tuple, what: str) -> dict:
    files = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix.lower() not in suffixes or p.name.startswith("."):  # skip "._" forks
            continue
        if p.stem in files:
            raise DataError(f"{folder}: two {what} files named {p.stem!r} ({files[p.stem].name}, {p.name})")
        files[p.stem] = p
    if not files:
        raise DataError(f"{folder}: no {what} files ({', '.join(suffixes)})")
    return files


# ---------------------------------------------------------------------------------- reading
def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError:
        raise DataError("reading .mha files needs SimpleITK, which is not installed: pip install SimpleITK (or the "
                        "project's extra: pip install -e \".[psfhs]\", make -B install EXTRAS=dev,psfhs)") from None
    return sitk


def read_mha(path: Path) -> np.ndarray:
    """Pixel array, (H, W) or channels last (H, W, C), of one .mha/.mhd file (SimpleITK)."""
    sitk = _sitk()
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DataError(f"{path}: not a readable MetaImage ({str(e).strip().splitlines()[-1]})") from None
    arr = np.asarray(sitk.GetArrayFromImage(img))
    if img.GetDimension() == 3 and img.GetNumberOfComponentsPerPixel() == 1:
        arr = np.moveaxis(arr, 0, -1)  # PSFHS stores the 3 channels as a third axis: (3, H, W) -> (H, W, 3)
    return arr


def _is_mha(path: Path) -> bool:
    return path.suffix.lower() in (".mha", ".mhd")


def load_image(path: Path) -> np.ndarray:
    return to_gray_uint8(read_mha(path), path) if _is_mha(path) else read_image(path)


def load_label(path: Path, shape: tuple) -> np.ndarray:
    arr = read_mha(path) if _is_mha(path) else read_label_array(path, what="label")
    label = to_label(arr, path, shape)
    check_plausible_mask(label, path)
    return label


def _channels_last(arr: np.ndarray, path: Path, what: str) -> np.ndarray:
    """(H, W) -> (H, W, 1); (H, W, C) with C in 1, 3, 4 stays; anything else is a DataError."""
    if arr.ndim == 2:
        return arr[..., None]
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        return arr
    raise DataError(f"{path}: {what} has shape {arr.shape}; expected a 2-D image (optionally with 1, 3 or 4 channels)")


def to_gray_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    arr = _channels_last(np.asarray(arr), path, "image")
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.shape[-1] == 1 or all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[-1])):
        gray = arr[..., 0]
    else:
        gray = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
    if arr.dtype == np.uint8:
        return np.clip(np.round(gray), 0, 255).astype(np.uint8)
    gray = gray.astype(np.float64)
    if np.all(gray == np.round(gray)) and gray.min() >= 0 and gray.max() <= 255:
        return gray.astype(np.uint8)
    return window_to_uint8(gray, path)


def to_label(arr: np.ndarray, path: Path, shape: tuple) -> np.ndarray:
    arr = _channels_last(np.asarray(arr), path, "label map")
    if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[-1])):
        raise DataError(f"{path}: label map has {arr.shape[-1]} channels that differ; expected one class per pixel")
    label = arr[..., 0]
    if tuple(label.shape) != tuple(shape):
        raise DataError(f"{path}: label size {label.shape[1]}x{label.shape[0]} (WxH) differs from its image's "
                        f"{shape[1]}x{shape[0]}")
    valid = np.isin(label, np.arange(len(CLASSES)))
    if not valid.all():
        bad = np.unique(label[~valid])[:10].tolist()
        raise DataError(f"{path}: label values {bad} are not PSFHS classes 0 (background), 1 (pubic symphysis), "
                        f"2 (fetal head)")
    return label.astype(np.uint8)


# -------------------------------------------------------------------------------- conversion
def prepare(raw, out, overwrite: bool = False) -> Path:
    """Convert PSFHS into ``out/psfhs``; each image is its own subject."""
    from tqdm.auto import tqdm

    image_dir, label_dir = find_layout(raw)
    images = _by_stem(image_dir, IMAGE_SUFFIXES, "image")
    labels = _by_stem(label_dir, LABEL_SUFFIXES, "label")
    no_label = sorted(set(images) - set(labels))
    if no_label:
        raise DataError(f"image {images[no_label[0]]} has no label in {label_dir} "
                        f"({len(no_label)} images without a label)")
    no_image = sorted(set(labels) - set(images))
    if no_image:
        raise DataError(f"label {labels[no_image[0]]} has no image in {image_dir} "
                        f"({len(no_image)} labels without an image)")

    meta = {
        "name": "psfhs",
        "modality": "ultrasound (intrapartum transperineal)",
        "classes": CLASSES,
        "license": LICENSE,
        "citation": CITATION,
        "source": SOURCE,
        "preprocessing": ("identical colour channels reduced to one; images wider than 8 bit windowed to their "
                          "0.5-99.5 percentiles; no resampling; labels 0/1/2 kept as published"),
    }
    target = safe_join(out, "psfhs")
    with DatasetWriter(target, meta, overwrite=overwrite) as writer:
        for stem in tqdm(sorted(images), desc="PSFHS", unit="image"):
            image = load_image(images[stem])
            label = load_label(labels[stem], image.shape)
            writer.add_case(stem, stem, image, label, source=str(images[stem]))
    return target
