"""HC18 (fetal head circumference, 2D ultrasound) training set -> the common format.

Accepted layouts of ``--raw`` (detected automatically):

* **official** (Zenodo record 1327317, unzipped)::

      RAW/training_set/NNN_HC.png               images (NNN_2HC.png ... are more frames of subject NNN)
      RAW/training_set/NNN_HC_Annotation.png    the head as an ellipse OUTLINE (filled here)
      RAW/training_set_pixel_size_and_HC.csv    filename,pixel size(mm),head circumference (mm)

* **filled** (a copy whose outlines were filled beforehand)::

      RAW/images/NNN_HC.png
      RAW/masks/NNN_HC_Annotation.png           already filled, values 0/255 (R=G=B if RGB)
      RAW/training_set_pixel_size_and_HC.csv

Output: ``OUT/hc18`` with classes background (0) and fetal head (1), ``spacing_mm`` from the CSV,
subject = the 3-digit prefix (``010_HC`` and ``010_2HC`` are one subject), case = the image stem.

Each head mask is checked against the head circumference in the CSV: the mask's area divided by
the area of a circle with that circumference (P^2 / 4 pi, P in pixels) must lie in
[0.7, 1.3] (real masks: 0.95 to 1.03). This catches outlines that could not be filled, outlines
given where filled masks were expected, and images paired with the wrong row.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage

from ..io import DataError, DatasetWriter, binary_foreground, check_plausible_mask, read_image, read_mask, safe_join
from .folder import RawCase, add_workers_argument, check_raw_dir, write_cases

DESCRIPTION = "HC18 fetal head ultrasound (training set, 999 images) -> OUT/hc18 (background, fetal head)."

FOLDER = "hc18"
CSV_NAME = "training_set_pixel_size_and_HC.csv"
CLASSES = ["background", "fetal head"]
CASE_RE = re.compile(r"^(\d{3})_(\d*)HC$")
AREA_RATIO_RANGE = (0.7, 1.3)
MAX_CLOSING = 3  # gaps of up to 2 * MAX_CLOSING pixels in an outline are bridged

EXPECTED = (f"either the official layout RAW/training_set/NNN_HC.png + NNN_HC_Annotation.png with RAW/{CSV_NAME}, "
            f"or RAW/images/NNN_HC.png + RAW/masks/NNN_HC_Annotation.png (filled) with RAW/{CSV_NAME}")

META = {
    "name": "hc18",
    "modality": "ultrasound (2D B-mode, fetal head standard plane)",
    "classes": CLASSES,
    "license": "CC BY 4.0 (Zenodo record 1327317); masks changed: the official ellipse outlines are filled",
    "citation": ("van den Heuvel TLA, de Bruijn D, de Korte CL, van Ginneken B. Automated measurement of fetal "
                 "head circumference using 2D ultrasound images. PLoS ONE 13(8): e0200412 (2018). "
                 "doi:10.1371/journal.pone.0200412. Data: van den Heuvel et al. (2018), HC18 training and test "
                 "set, Zenodo, doi:10.5281/zenodo.1327317"),
    "source": "https://zenodo.org/records/1327317",
}


def add_arguments(parser) -> None:
    parser.add_argument("--max-cases", type=int, default=None,
                        help="convert only the first N cases in name order (a quick subset); default: all")
    add_workers_argument(parser)


# --------------------------------------------------------------------------------- the layout
def detect_layout(raw: Path) -> tuple[str, Path, Path, Path]:
    """Return (layout, images_dir, masks_dir, csv_path) for a raw HC18 folder."""
    raw = check_raw_dir(raw, EXPECTED)
    csv_path = raw / CSV_NAME
    if (raw / "training_set").is_dir():
        layout, images, masks = "official", raw / "training_set", raw / "training_set"
    elif (raw / "images").is_dir() and (raw / "masks").is_dir():
        layout, images, masks = "filled", raw / "images", raw / "masks"
    else:
        found = sorted(p.name for p in raw.iterdir())[:8]
        raise DataError(f"{raw} does not look like HC18: expected {EXPECTED}; found {found}")
    if not csv_path.is_file():
        raise DataError(f"{csv_path} is missing: HC18 needs the pixel-size CSV ({CSV_NAME}) beside "
                        f"{images.name}/ (expected {EXPECTED})")
    return layout, images, masks, csv_path


def read_pixel_csv(csv_path: Path) -> dict:
    """{image file name: (pixel size mm, head circumference mm or None)}."""
    rows: dict = {}
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{csv_path} is empty; expected columns filename,pixel size(mm),head circumference (mm)")
            norm = [h.strip().lower() for h in header]
            try:
                i_name = norm.index("filename")
                i_px = next(i for i, h in enumerate(norm) if h.startswith("pixel size"))
            except (ValueError, StopIteration):
                raise DataError(f"{csv_path}: expected columns filename,pixel size(mm),head circumference (mm); "
                                f"got {header}") from None
            i_hc = next((i for i, h in enumerate(norm) if h.startswith("head circumference")), None)
            for line, row in enumerate(reader, start=2):
                if not row or not any(cell.strip() for cell in row):
                    continue
                try:
                    name = row[i_name].strip()
                    px = float(row[i_px])
                    hc = float(row[i_hc]) if i_hc is not None and row[i_hc].strip() else None
                except (IndexError, ValueError):
                    raise DataError(f"{csv_path} line {line}: cannot read filename, pixel size and head "
                                    f"circumference from {row}") from None
                if not (math.isfinite(px) and px > 0):
                    raise DataError(f"{csv_path} line {line}: pixel size {row[i_px]!r} is not a positive number")
                if hc is not None and not (math.isfinite(hc) and hc > 0):
                    raise DataError(f"{csv_path} line {line}: head circumference {row[i_hc]!r} is not a positive number")
                rows[name] = (px, hc)
    except UnicodeDecodeError as e:
        raise DataError(f"{csv_path}: not a text CSV ({e})") from None
    if not rows:
        raise DataError(f"{csv_path} has no rows")
    return rows


def find_cases(raw: Path, max_cases: Optional[int] = None) -> tuple[str, list, dict]:
    """Check the raw folder and pair every image with its mask and CSV row (no pixel is read)."""
    layout, images_dir, masks_dir, csv_path = detect_layout(raw)
    pngs = sorted(p for p in images_dir.iterdir()
                  if p.is_file() and p.suffix.lower() == ".png" and not p.name.startswith("."))
    images = {p.stem: p for p in pngs if not p.stem.endswith("_Annotation")}
    if masks_dir == images_dir:
        masks = {p.stem[: -len("_Annotation")]: p for p in pngs if p.stem.endswith("_Annotation")}
    else:
        masks = {}
        for p in sorted(q for q in masks_dir.iterdir()
                        if q.is_file() and q.suffix.lower() == ".png" and not q.name.startswith(".")):
            if not p.stem.endswith("_Annotation"):
                raise DataError(f"{p}: unexpected file in {masks_dir}; HC18 masks are named NNN_HC_Annotation.png")
            masks[p.stem[: -len("_Annotation")]] = p
    if not images:
        raise DataError(f"no HC18 images (NNN_HC.png) in {images_dir}; expected {EXPECTED}")
    for stem, mask in masks.items():
        if stem not in images:
            raise DataError(f"mask {mask} has no image: expected {images_dir / (stem + '.png')}")
    spacing = read_pixel_csv(csv_path)
    cases = []
    for stem, image in images.items():
        m = CASE_RE.match(stem)
        if m is None:
            raise DataError(f"{image}: unexpected HC18 file name; expected NNN_HC.png or NNN_kHC.png "
                            f"(NNN = 3-digit subject number)")
        if stem not in masks:
            raise DataError(f"image {image} has no mask: expected {masks_dir / (stem + '_Annotation.png')}")
        if image.name not in spacing:
            raise DataError(f"image {image} has no row in {csv_path} (needed for its pixel size)")
        cases.append(RawCase(stem, m.group(1), image, (masks[stem],), spacing[image.name][0]))
    unused = len(set(spacing) - {c.image.name for c in cases})
    if unused:
        print(f"note: {unused} rows of {csv_path.name} have no image in {images_dir} (ignored)")
    if max_cases is not None:
        if max_cases < 1:
            raise DataError(f"--max-cases must be at least 1, got {max_cases}")
        cases = cases[:max_cases]
    return layout, cases, spacing


# ----------------------------------------------------------------------------- mask handling
def _fill_holes(binary: np.ndarray) -> np.ndarray:
    """binary_fill_holes via one labelling of the background (4-connected): much faster."""
    labels, n = ndimage.label(~binary)
    if n == 0:
        return binary.copy()
    outside = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    holes = ~np.isin(labels, outside) & (labels > 0)
    return binary | holes


def fill_outline(outline: np.ndarray, source: str = "") -> np.ndarray:
    """Fill an ellipse outline (bool H x W) and return the filled head (outline included).

    Tries a plain fill first; then bridges gaps of up to 2 * MAX_CLOSING pixels by dilating the
    outline k = 1..MAX_CLOSING times (3x3), filling, and eroding the filled head back by k (a closing
    of the filled region; a plain closing of a thin diagonal outline does not bridge its gaps). An
    outline cut by the image border (a head partly outside the image) is closed along the border it
    touches. The fill must be clearly bigger than the outline (at least twice its area), otherwise a
    DataError names ``source``.
    """
    outline = np.asarray(outline, dtype=bool)
    ys, xs = np.nonzero(outline)
    if ys.size == 0:
        raise DataError(f"{source}: the annotation is empty (no outline to fill)")
    h, w = outline.shape
    pad = MAX_CLOSING + 2
    y0, y1 = max(int(ys.min()) - pad, 0), min(int(ys.max()) + pad + 1, h)
    x0, x1 = max(int(xs.min()) - pad, 0), min(int(xs.max()) + pad + 1, w)
    crop = outline[y0:y1, x0:x1]
    # sides where the outline touches the image border: (top, bottom, left, right)
    touching = (bool(outline[0].any()), bool(outline[-1].any()), bool(outline[:, 0].any()), bool(outline[:, -1].any()))
    structure = np.ones((3, 3), dtype=bool)
    n_outline = int(crop.sum())
    best = None
    for close_border in ((False, True) if any(touching) else (False,)):
        t, b, l, r = (int(s) for s in touching) if close_border else (0, 0, 0, 0)
        for k in range(MAX_CLOSING + 1):
            grown = crop if k == 0 else ndimage.binary_dilation(crop, structure=structure, iterations=k)
            padded = np.pad(grown, ((t, b), (l, r)), constant_values=True)
            filled = _fill_holes(padded)[t:padded.shape[0] - b, l:padded.shape[1] - r]
            if k:  # shrink back; edge padding keeps the array border from eating into the head
                filled = ndimage.binary_erosion(np.pad(filled, k, mode="edge"), structure=structure,
                                                iterations=k)[k:-k, k:-k] | crop
            if filled.sum() >= 2 * n_outline:
                best = filled
                break
        if best is not None:
            break
    if best is None:
        raise DataError(f"{source}: the head outline cannot be filled (it is not closed, even after bridging "
                        f"gaps of up to {2 * MAX_CLOSING} pixels); the fill is no bigger than the outline")
    out = np.zeros_like(outline)
    out[y0:y1, x0:x1] = best
    return out


def check_area(head: np.ndarray, pixel_mm: float, hc_mm: Optional[float], path: Path) -> None:
    if hc_mm is None:
        return
    perimeter_px = hc_mm / pixel_mm
    ratio = float(head.sum()) / (perimeter_px ** 2 / (4 * math.pi))
    lo, hi = AREA_RATIO_RANGE
    if not lo <= ratio <= hi:
        raise DataError(f"{path}: head area {int(head.sum())} px is {ratio:.2f} x the area of a circle with the "
                        f"CSV's circumference ({hc_mm} mm at {pixel_mm} mm/px); expected {lo}..{hi}: "
                        f"an unfilled or broken outline, or a mask paired with the wrong image?")


# ------------------------------------------------------------------------------------ prepare
def prepare(raw, out, overwrite: bool = False, max_cases: Optional[int] = None,
            workers: Optional[int] = None) -> Path:
    layout, cases, spacing = find_cases(raw, max_cases=max_cases)

    def load(c: RawCase) -> tuple:
        image = read_image(c.image)
        mask_path = c.masks[0]
        raw_mask = read_mask(mask_path, shape=image.shape)
        if layout == "official":
            # outline pixels: anything above 0 (an anti-aliased edge still counts, so no gap opens)
            head = fill_outline(raw_mask > 0, source=str(mask_path))
        else:  # filled: 0/1 or 0/255, as grey, 1-bit, RGB or palette PNG
            head = binary_foreground(raw_mask, mask_path)
        check_plausible_mask(head, mask_path)
        pixel_mm, hc_mm = spacing[c.image.name]
        check_area(head, pixel_mm, hc_mm, mask_path)
        return image, head.astype(np.uint8)

    meta = dict(META, notes=(
        f"converted from the {layout} layout; subject = 3-digit prefix (frames NNN_HC, NNN_2HC, ... of one "
        f"subject share it); spacing_mm = the CSV's pixel size; "
        + ("masks are the official ellipse outlines, filled" if layout == "official"
           else "masks were already filled in the source copy")
        + f"; every head area checked against the CSV's circumference (ratio {AREA_RATIO_RANGE[0]}.."
        f"{AREA_RATIO_RANGE[1]})"))
    target = safe_join(out, FOLDER)
    with DatasetWriter(target, meta, overwrite=overwrite) as writer:
        write_cases(writer, cases, load, workers=workers, desc="hc18")
    return target
