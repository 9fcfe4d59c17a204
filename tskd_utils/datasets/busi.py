"""BUSI (Breast Ultrasound Images, Al-Dhabyani et al. 2020) -> the common format.

Published layout (``--raw`` may be the folder holding ``Dataset_BUSI_with_GT`` or that folder)::

    RAW/Dataset_BUSI_with_GT/benign/benign (1).png          image (stored as RGB; made grayscale)
    RAW/Dataset_BUSI_with_GT/benign/benign (1)_mask.png     lesion mask, 0/255
    RAW/Dataset_BUSI_with_GT/benign/benign (4)_mask_1.png   extra lesion masks of the same image
    RAW/Dataset_BUSI_with_GT/malignant/...
    RAW/Dataset_BUSI_with_GT/normal/...                     no lesion (empty masks): only with --include-normal

Output: ``OUT/busi`` with classes background (0) and lesion (1). All masks of an image
(``_mask``, ``_mask_1``, ``_mask_2``, ...) are OR-ed into one lesion mask. Case names are
``benign_0001`` etc. The authors give no patient ids, so each image is its own subject.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from ..io import DataError, DatasetWriter, binary_foreground, check_plausible_mask, read_image, read_mask, safe_join
from .folder import RawCase, add_workers_argument, check_raw_dir, write_cases

DESCRIPTION = "BUSI breast ultrasound (benign/malignant [+ normal]) -> OUT/busi (background, lesion)."

FOLDER = "busi"
TOP = "Dataset_BUSI_with_GT"
CLASSES = ["background", "lesion"]
TUMOUR_CLASSES = ("benign", "malignant")
FILE_RE = re.compile(r"^(benign|malignant|normal) \((\d+)\)(_mask(?:_(\d+))?)?\.png$")
LESION_THRESHOLD = 127  # see read_lesion_mask

EXPECTED = (f"RAW/{TOP}/{{benign,malignant,normal}}/<class> (N).png with <class> (N)_mask.png "
            f"(and optional <class> (N)_mask_1.png, ...)")

META = {
    "name": "busi",
    "modality": "ultrasound (2D B-mode, breast)",
    "classes": CLASSES,
    "license": ("not stated by the authors; the data paper (Data in Brief) is open access, but no licence is "
                "given for the images themselves: check the terms before redistributing"),
    "citation": ("Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound images. "
                 "Data in Brief 28 (2020) 104863. doi:10.1016/j.dib.2019.104863"),
    "source": "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset",
}


def add_arguments(parser) -> None:
    parser.add_argument("--include-normal", action="store_true",
                        help="also convert the 'normal' images (their masks are empty)")
    add_workers_argument(parser)


def find_root(raw) -> Path:
    raw = check_raw_dir(raw, EXPECTED)
    for root in (raw / TOP, raw):
        if all((root / c).is_dir() for c in TUMOUR_CLASSES):
            return root
    found = sorted(p.name for p in raw.iterdir())[:8]
    raise DataError(f"{raw} does not look like BUSI: expected {EXPECTED} (benign/ and malignant/ folders); "
                    f"found {found}")


def find_cases(raw, include_normal: bool = False) -> list:
    """Pair every image with its masks (no pixel is read)."""
    root = find_root(raw)
    classes = TUMOUR_CLASSES + (("normal",) if include_normal else ())
    cases, ignored = [], []
    for cls in classes:
        folder = root / cls
        if not folder.is_dir():
            raise DataError(f"{folder} is missing (needed for --include-normal); expected {EXPECTED}")
        images: dict = {}
        masks: dict = {}
        for p in sorted(folder.iterdir()):
            if not p.is_file() or p.name.startswith("."):
                continue
            m = FILE_RE.match(p.name)
            if m is None or m.group(1) != cls:
                ignored.append(p)
                continue
            number = int(m.group(2))
            if m.group(3) is None:
                group, key = images, number
            else:
                group, key = masks.setdefault(number, {}), int(m.group(4)) if m.group(4) is not None else 0
            if key in group:  # "benign (3)" and "benign (03)": one case number, two files
                raise DataError(f"{group[key]} and {p} have the same case number {number}"
                                + (f" (mask {key})" if group is not images else "") + "; keep one of them")
            group[key] = p
        if not images:
            raise DataError(f"no BUSI images ('{cls} (N).png') in {folder}; expected {EXPECTED}")
        for number, group in sorted(masks.items()):
            if number not in images:
                first = group[min(group)]
                raise DataError(f"mask {first} has no image: expected {folder / f'{cls} ({number}).png'}")
        for number, image in sorted(images.items()):
            group = masks.get(number, {})
            if 0 not in group:
                raise DataError(f"image {image} has no mask: expected {folder / f'{cls} ({number})_mask.png'}")
            ordered = tuple(group[k] for k in sorted(group))  # _mask, _mask_1, _mask_2, ...
            name = f"{cls}_{number:04d}"
            cases.append(RawCase(name, name, image, ordered))
    if ignored:
        shown = ", ".join(p.name for p in ignored[:3])
        print(f"note: ignored {len(ignored)} files that are not BUSI images or masks (e.g. {shown})")
    return cases


def read_lesion_mask(path: Path, shape: tuple) -> np.ndarray:
    """One BUSI mask file -> bool lesion mask.

    BUSI masks are 0/255 (some stored as RGB/RGBA with equal colour channels, some copies as 1-bit
    or palette PNGs); 0/1 masks are accepted too. Otherwise lesion = value > 127: a mid-grey
    threshold, so anti-aliased or resampled edges do not widen the lesion. A mask whose values fit
    none of these, or that looks inverted, is an error naming the file.
    """
    lesion = binary_foreground(read_mask(path, shape=shape), path, threshold=LESION_THRESHOLD)
    check_plausible_mask(lesion, path)
    return lesion


def prepare(raw, out, overwrite: bool = False, include_normal: bool = False,
            workers: Optional[int] = None) -> Path:
    cases = find_cases(raw, include_normal=include_normal)

    def load(c: RawCase) -> tuple:
        image = read_image(c.image)
        lesion = np.zeros(image.shape, dtype=bool)
        for mask_path in c.masks:  # OR of _mask, _mask_1, _mask_2, ...
            lesion |= read_lesion_mask(mask_path, image.shape)
        return image, lesion.astype(np.uint8)

    n_multi = sum(len(c.masks) > 1 for c in cases)
    meta = dict(META, include_normal=bool(include_normal), notes=(
        "the authors give no patient ids, so each image is its own subject (images of one patient may "
        "fall on both sides of a split); "
        f"{n_multi} images have several mask files (_mask, _mask_1, ...), OR-ed into one lesion mask; "
        f"lesion = mask value > {LESION_THRESHOLD}; images converted from RGB to grayscale; "
        + ("normal images (empty masks) included" if include_normal else "normal images left out")))
    target = safe_join(out, FOLDER)
    with DatasetWriter(target, meta, overwrite=overwrite) as writer:
        write_cases(writer, cases, load, workers=workers, desc="busi")
    return target
