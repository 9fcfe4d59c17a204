"""Any dataset given as a folder of images and a folder of masks -> the common format.

This is the converter for users' own data (and for sets such as Autooral that already come as
image/mask pairs). Images and masks are matched by file stem; a mask may carry a suffix
(``--mask-suffix _mask``: ``img01.png`` <-> ``img01_mask.png``). Masks hold class indices
(0 = background, 1..K-1 = the classes named by ``--classes``); with two classes, 0/1 and 0/255
masks are both read as binary (in any PNG form: grey, 1-bit, RGB, palette); ``--binarize`` turns
any mask into 0/1 (value > 0). A mask whose foreground covers more than 90 % of the image or most
of 3 or 4 of its borders is refused as probably inverted, unless ``--allow-large-foreground``.
Subjects come from ``--subjects CSV`` (columns ``case,subject``), else each case is its own subject.

Where the folders are (decided in this order):

* ``--images DIR`` and ``--masks DIR`` when given;
* otherwise ``RAW/images`` and ``RAW/masks`` (``--raw`` is the dataset's root folder).

``--raw`` stays required on the command line (it is part of every converter's contract); when both
``--images`` and ``--masks`` are given it is used only to name the data in messages, so
``--raw .`` is fine.

This module also holds the small helpers the other converters share (raw-folder checks, the
threaded case loop), because they are generic "folder of files" helpers.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from ..io import (DataError, DatasetWriter, binary_foreground, check_name, check_plausible_mask, read_image, read_mask,
                  safe_join)

DESCRIPTION = ("Bring your own dataset: a folder of images and a folder of masks (class index per pixel) "
               "with matching file names -> the common format.")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_EXTS = (".png", ".bmp", ".tif", ".tiff")  # lossless only: a JPEG mask has compression noise in it


# ============================================================================ shared helpers
@dataclass(frozen=True)
class RawCase:
    """One case to convert: where its files are and how it is grouped."""

    case: str
    subject: str
    image: Path
    masks: tuple  # one or more mask files (BUSI has several per image)
    spacing_mm: Optional[float] = None


def check_raw_dir(raw, expected: str) -> Path:
    """Return ``raw`` as a Path, or raise a DataError saying what was expected there."""
    if raw is None or str(raw) == "":
        raise DataError(f"no raw folder given (--raw); expected {expected}")
    raw = Path(raw).expanduser()
    if not raw.exists():
        raise DataError(f"raw folder not found: {raw}; expected {expected}")
    if not raw.is_dir():
        raise DataError(f"{raw} is not a folder; expected {expected}")
    if not any(p for p in raw.iterdir() if not p.name.startswith(".")):
        raise DataError(f"raw folder {raw} is empty; expected {expected}")
    return raw


def list_files(folder: Path, exts: Sequence[str]) -> list[Path]:
    """Plain files in ``folder`` (not recursive) with one of ``exts``, sorted; hidden files skipped."""
    exts = {e.lower() for e in exts}
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts)


def index_by_stem(files: Iterable[Path], what: str) -> dict:
    """{stem: path}; two files with one stem (``a.png`` and ``a.jpg``) are a DataError."""
    out: dict = {}
    for p in files:
        if p.stem in out:
            raise DataError(f"two {what} files share the name {p.stem!r}: {out[p.stem]} and {p}")
        out[p.stem] = p
    return out


def default_workers(n_cases: int) -> int:
    """Threads for reading cases: PIL and scipy release the GIL, so threads overlap well."""
    if n_cases < 32:
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def add_workers_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=None,
                        help="threads that read and check cases (default: up to 4, 1 for small sets)")


def write_cases(writer: DatasetWriter, cases: Sequence[RawCase],
                load: Callable[[RawCase], tuple], workers: Optional[int] = None,
                desc: str = "converting") -> None:
    """Load every case with ``load(case) -> (image, mask)`` and add it to ``writer``, in order.

    Loading runs in up to ``workers`` threads with a bounded look-ahead (memory stays small);
    writing stays in this thread. The first error stops the loop and is raised as is.
    """
    workers = default_workers(len(cases)) if workers is None else max(1, int(workers))
    progress = _progress(len(cases), desc)
    try:
        if workers == 1:
            for c in cases:
                image, mask = load(c)
                writer.add_case(c.case, c.subject, image, mask, spacing_mm=c.spacing_mm, source=str(c.image))
                progress.update(1)
            return
        window = 4 * workers
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convert")
        pending: deque = deque()
        try:
            it = iter(cases)
            for c in it:
                pending.append((c, pool.submit(load, c)))
                if len(pending) >= window:
                    break
            while pending:
                c, fut = pending.popleft()
                image, mask = fut.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(load, nxt)))
                writer.add_case(c.case, c.subject, image, mask, spacing_mm=c.spacing_mm, source=str(c.image))
                progress.update(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        progress.close()


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a converter must not fail for want of a bar
        return _NoProgress()
    return tqdm(total=total, desc=desc, unit="case", disable=None, leave=False)


def read_subjects_csv(path: Path) -> dict:
    """{case: subject} from a CSV with columns case,subject."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"subjects file not found: {path} (expected a CSV with columns case,subject)")
    out: dict = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            if not {"case", "subject"} <= set(cols):
                raise DataError(f"{path}: expected columns case,subject, got {reader.fieldnames}")
            for i, row in enumerate(reader, start=2):
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
                case, subject = row.get("case", ""), row.get("subject", "")
                if not case or not subject:
                    raise DataError(f"{path} line {i}: empty case or subject")
                if case in out and out[case] != subject:
                    raise DataError(f"{path} line {i}: case {case!r} is listed twice with different subjects")
                out[case] = subject
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text CSV ({e})") from None
    if not out:
        raise DataError(f"{path} lists no cases")
    return out


# ============================================================================ the converter
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (DESCRIPTION + " Folders: --images/--masks when given, else RAW/images and RAW/masks. "
                          "--raw is still required (use --raw . when giving --images and --masks).")
    parser.add_argument("--images", type=Path, default=None, help="folder of images (default: RAW/images)")
    parser.add_argument("--masks", type=Path, default=None, help="folder of masks (default: RAW/masks)")
    parser.add_argument("--mask-suffix", default="",
                        help="mask file stem = image stem + this suffix, e.g. _mask for img01_mask.png")
    parser.add_argument("--classes", required=True,
                        help="comma-separated class names, index = mask value, e.g. background,tooth")
    # dest is not "name": tskd_utils.datasets.prepare() takes the converter's name as its first argument
    parser.add_argument("--name", dest="dataset_name", default="custom", help="dataset folder name inside --out")
    parser.add_argument("--subjects", type=Path, default=None,
                        help="CSV with columns case,subject for grouped splits (default: each case its own subject)")
    parser.add_argument("--binarize", action="store_true",
                        help="mask > 0 -> 1 whatever the values (0/1 and 0/255 masks need no flag); "
                             "needs exactly two classes")
    parser.add_argument("--allow-large-foreground", action="store_true",
                        help="accept masks whose foreground covers most of the image or of its borders "
                             "(refused by default: usually an inverted mask)")
    parser.add_argument("--modality", default="unspecified", help="e.g. ultrasound, CT, MRI, photograph")
    parser.add_argument("--license", default="unspecified (user-supplied data)", help="the data's licence")
    parser.add_argument("--citation", default="", help="how to cite the data")
    parser.add_argument("--source", default="user-supplied", help="URL the data came from")
    add_workers_argument(parser)


def _parse_classes(classes) -> list:
    if classes is None:
        raise DataError("--classes is required, e.g. --classes background,organ")
    names = [c.strip() for c in (classes.split(",") if isinstance(classes, str) else classes)]
    if len(names) < 2 or any(not n for n in names):
        raise DataError(f"--classes needs at least two non-empty comma-separated names "
                        f"(index = mask value, 0 = background), got {classes!r}")
    if len(set(names)) != len(names):
        raise DataError(f"--classes has duplicate names: {classes!r}")
    for n in names:
        check_name(n, "class name", "--classes")
    if len(names) > 255:
        raise DataError(f"--classes lists {len(names)} classes; an 8-bit mask holds at most 255")
    return names


def _pair_cases(image_files: dict, mask_files: dict, masks: Path, mask_suffix: str, subjects, images: Path) -> list:
    """One RawCase per image, with its mask (``<stem><mask_suffix>``) and subject (the subjects file's, or its own);
    an image without a mask, a mask without an image or a case missing from the subjects file is an error."""
    cases: list[RawCase] = []
    used = set()
    subject_of = read_subjects_csv(subjects) if subjects is not None else None
    for stem, image_path in image_files.items():
        mask_path = mask_files.get(stem + mask_suffix)
        if mask_path is None:
            raise DataError(f"image {image_path} has no mask: expected {masks / (stem + mask_suffix)}.png "
                            f"(mask suffix {mask_suffix!r})")
        used.add(stem + mask_suffix)
        if subject_of is not None:
            if stem not in subject_of:
                raise DataError(f"case {stem!r} ({image_path}) is not listed in the subjects file {subjects}")
            subject = subject_of[stem]
        else:
            subject = stem
        cases.append(RawCase(stem, subject, image_path, (mask_path,)))
    orphans = sorted(set(mask_files) - used)
    if orphans:
        raise DataError(f"mask {mask_files[orphans[0]]} has no image in {images}"
                        + (f" ({len(orphans) - 1} more masks without images)" if len(orphans) > 1 else ""))
    if subject_of is not None:
        extra = set(subject_of) - set(image_files)
        if extra:
            print(f"note: {len(extra)} cases in {subjects} have no image and are ignored")

    return cases


def prepare(raw, out, overwrite: bool = False, images=None, masks=None, mask_suffix: str = "",
            classes=None, dataset_name: str = "custom", subjects=None, binarize: bool = False,
            modality: str = "unspecified", license: str = "unspecified (user-supplied data)",
            citation: str = "", source: str = "user-supplied", workers: Optional[int] = None,
            allow_large_foreground: bool = False) -> Path:
    class_names = _parse_classes(classes)
    if binarize and len(class_names) != 2:
        raise DataError(f"--binarize makes 0/1 masks, so --classes must name exactly two classes, got {class_names}")
    name = dataset_name
    if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise DataError(f"--name {name!r} is not a usable folder name (letters, digits, _ . -)")

    expected = "a folder with images/ and masks/ (or pass --images DIR --masks DIR)"
    if images is None or masks is None:
        root = check_raw_dir(raw, expected)
        images = Path(images) if images is not None else root / "images"
        masks = Path(masks) if masks is not None else root / "masks"
    images, masks = Path(images).expanduser(), Path(masks).expanduser()
    for folder, what in ((images, "images"), (masks, "masks")):
        if not folder.is_dir():
            raise DataError(f"{what} folder not found: {folder}; expected {expected}")
    image_files = index_by_stem(list_files(images, IMAGE_EXTS), "image")
    if not image_files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) in {images}")
    mask_files = index_by_stem(list_files(masks, MASK_EXTS), "mask")

    cases = _pair_cases(image_files, mask_files, masks, mask_suffix, subjects, images)

    n_classes = len(class_names)
    seen = np.zeros(256, dtype=bool)

    def load(c: RawCase) -> tuple:
        image = read_image(c.image)
        path = c.masks[0]
        mask = read_mask(path, n_classes=None if binarize or n_classes == 2 else n_classes, shape=image.shape)
        if binarize:
            mask = (mask > 0).astype(np.uint8)
        elif n_classes == 2:  # 0/1 or 0/255
            mask = binary_foreground(mask, path).astype(np.uint8)
        if not allow_large_foreground:
            check_plausible_mask(mask, path)
        seen[np.unique(mask)] = True
        return image, mask

    meta = {
        "name": name, "modality": modality, "classes": class_names, "license": license,
        "citation": citation, "source": source,
        "notes": (f"converted with data_scripts/prepare_folder.py from {images} and {masks}"
                  + ("; masks binarized (> 0 -> 1)" if binarize else "")
                  + ("; large-foreground masks allowed" if allow_large_foreground else "")
                  + ("; subjects from " + str(subjects) if subjects is not None else "; each case is its own subject")),
    }
    target = safe_join(out, name)
    with DatasetWriter(target, meta, overwrite=overwrite) as writer:
        write_cases(writer, cases, load, workers=workers, desc=name)
    missing = [class_names[i] for i in range(1, n_classes) if not seen[i]]
    if missing:
        print(f"note: classes {missing} never occur in any mask; check --classes")
    return target
