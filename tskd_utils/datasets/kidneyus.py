"""KidneyUS (The Open Kidney Ultrasound Data Set, Singla et al. 2023) -> the common format.

The images come from the authors after registration; the masks are in their GitHub repository
(https://github.com/rsingla92/kidneyUS, folder ``labels/``). Expected layout::

    RAW/images/<image name>.png                                   images (or directly in RAW/)
    RAW/labels/reviewed_masks_{1,2}/{capsule,regions}/<image name>.png
                                                                  (RAW/reviewed_masks_{1,2}/... also works)

Images may be .png, .jpg, .jpeg, .bmp, .tif or .tiff; they are matched to masks by file stem.
``--target capsule`` (default) gives classes background/capsule (masks 0/1 or 0/255);
``--target regions`` gives background/central echo complex/medulla/cortex (masks 0..3).

Class order of the region masks: the repository's ``src/annotation_analysis/create_masks.py``
maps the VGG annotation labels Capsule=1, Central Echo Complex=2, Medulla=3, Cortex=4, draws the
capsule alone into ``capsule/`` (value 1) and the other three into ``regions/`` as label - 1, so
regions: 1 = central echo complex, 2 = medulla, 3 = cortex.

``--annotator 1|2`` picks the sonographer (default 1). Images without a mask from that annotator
(e.g. the unlabelled images) are skipped and counted; a mask without an image is an error.

Subjects: the README says each image comes from a different patient, but the file names
(``<N>_IM-<series>-<instance>_anon.png``) repeat the leading number N for some images of the same
series (e.g. ``130_IM-0650-0033`` and ``130_IM-0650-0053``). To be safe, images sharing N are one
subject; a name without a leading number is its own subject.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from ..io import DataError, DatasetWriter, binary_foreground, check_plausible_mask, read_image, read_mask, safe_join
from .folder import IMAGE_EXTS, RawCase, add_workers_argument, check_raw_dir, index_by_stem, list_files, write_cases

DESCRIPTION = ("KidneyUS (Open Kidney Ultrasound) images + the repo's reviewed masks -> OUT/kidneyus_<target> "
               "(capsule, or central echo complex/medulla/cortex).")

CLASSES = {
    "capsule": ["background", "capsule"],
    "regions": ["background", "central echo complex", "medulla", "cortex"],
}
SUBJECT_RE = re.compile(r"^(\d+)_")

EXPECTED = ("images in RAW/images/ (or directly in RAW/) and the masks of github.com/rsingla92/kidneyUS in "
            "RAW/labels/reviewed_masks_{1,2}/{capsule,regions}/<image name>.png")

META = {
    "modality": "ultrasound (2D B-mode, kidney)",
    "license": ("CC BY-NC-SA 4.0 (non-commercial; the repository README states CC BY-NC-SA); the images are "
                "released by the authors after registration"),
    "citation": ("Singla R, Ringstrom C, Hu G, Lessoway V, Reid J, Nguan C, Rohling R. The Open Kidney "
                 "Ultrasound Data Set. In: Simplifying Medical Ultrasound (ASMUS 2023), LNCS. "
                 "arXiv:2206.06657"),
    "source": "https://github.com/rsingla92/kidneyUS",
}


def add_arguments(parser) -> None:
    parser.add_argument("--target", choices=sorted(CLASSES), default="capsule",
                        help="capsule: kidney vs background; regions: central echo complex, medulla, cortex")
    parser.add_argument("--annotator", type=int, choices=(1, 2), default=1,
                        help="whose masks: labels/reviewed_masks_1 or reviewed_masks_2")
    add_workers_argument(parser)


def folder_name(target: str, annotator: int) -> str:
    return f"kidneyus_{target}" + ("" if int(annotator) == 1 else f"_annotator{int(annotator)}")


def find_cases(raw, target: str = "capsule", annotator: int = 1) -> tuple[list, int]:
    """Pair images with masks; returns (cases, number of images skipped for want of a mask)."""
    if target not in CLASSES:
        raise DataError(f"--target must be one of {sorted(CLASSES)}, got {target!r}")
    if int(annotator) not in (1, 2):
        raise DataError(f"--annotator must be 1 or 2, got {annotator!r}")
    raw = check_raw_dir(raw, EXPECTED)
    sub = Path(f"reviewed_masks_{int(annotator)}") / target
    candidates = (raw / "labels" / sub, raw / sub)
    mask_dir = next((d for d in candidates if d.is_dir()), None)
    if mask_dir is None:
        raise DataError(f"no KidneyUS masks for target {target!r}, annotator {annotator} in {raw}: expected "
                        f"{candidates[0]}/ (copy the repository's labels/ folder there); layout: {EXPECTED}")
    image_dir = raw / "images" if (raw / "images").is_dir() else raw
    images = index_by_stem(list_files(image_dir, IMAGE_EXTS), "image")
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) in {image_dir}; expected {EXPECTED}")
    masks = index_by_stem(list_files(mask_dir, (".png",)), "mask")
    if not masks:
        raise DataError(f"no masks (.png) in {mask_dir}; expected {EXPECTED}")
    for stem, path in masks.items():
        if stem not in images:
            raise DataError(f"mask {path} has no image: expected {image_dir / stem}.png (or .jpg, ...)")
    cases, skipped = [], 0
    for stem, image in images.items():
        if stem not in masks:
            skipped += 1
            continue
        m = SUBJECT_RE.match(stem)
        cases.append(RawCase(stem, m.group(1) if m else stem, image, (masks[stem],)))
    return cases, skipped


def to_class_mask(arr: np.ndarray, target: str, path: Path) -> np.ndarray:
    """Capsule: a binary mask (0/1 or 0/255, any PNG form) -> 0/1; regions: values 0..3 kept.
    A mask that looks inverted is refused."""
    if target == "capsule":
        mask = binary_foreground(arr, path).astype(np.uint8)
    else:
        bad = [v for v in np.unique(arr).tolist() if v > 3]
        if bad:
            raise DataError(f"{path}: region mask values {bad[:10]} are not valid class indices 0..3 "
                            f"(background, central echo complex, medulla, cortex)")
        mask = arr.astype(np.uint8)
    check_plausible_mask(mask, path)
    return mask


def prepare(raw, out, overwrite: bool = False, target: str = "capsule", annotator: int = 1,
            workers: Optional[int] = None) -> Path:
    cases, skipped = find_cases(raw, target=target, annotator=annotator)
    if not cases:
        raise DataError(f"none of the images in {raw} has a {target} mask from annotator {annotator}; "
                        f"expected {EXPECTED}")
    if skipped:
        print(f"note: skipped {skipped} images without a {target} mask from annotator {annotator}")

    def load(c: RawCase) -> tuple:
        image = read_image(c.image)
        arr = read_mask(c.masks[0], shape=image.shape)  # checks size and equal colour channels
        return image, to_class_mask(arr, target, c.masks[0])

    name = folder_name(target, annotator)
    meta = dict(META, name=name, classes=CLASSES[target], target=target, annotator=int(annotator), notes=(
        f"masks: labels/reviewed_masks_{int(annotator)}/{target} of the repository; "
        "region order from src/annotation_analysis/create_masks.py (label - 1: 1 central echo complex, "
        "2 medulla, 3 cortex); subject = the leading number of the file name (the README says one image "
        "per patient, but some numbers repeat within one series, so they are grouped to be safe); "
        f"{skipped} images without a mask from this annotator were skipped"))
    folder = safe_join(out, name)
    with DatasetWriter(folder, meta, overwrite=overwrite) as writer:
        write_cases(writer, cases, load, workers=workers, desc=name)
    return folder
