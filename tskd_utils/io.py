"""Reading and writing the common dataset format, with clear errors and atomic writes.

The format (conventions.md)::

    <data_root>/<dataset>/
      images/<case>.png   8-bit grayscale
      masks/<case>.png    uint8 class index per pixel (0 = background)
      cases.csv           case,subject[,spacing_mm]
      dataset.json        name, modality, classes, license, citation, source, n_cases

Every problem with an input raises :class:`DataError` whose message names the file or value.
:class:`DatasetWriter` builds a dataset in a temporary folder and renames it into place only
when every case was written, so a failed conversion leaves nothing half-written behind and a
finished dataset is never replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

REQUIRED_KEYS = ("name", "modality", "classes", "license", "citation", "source", "n_cases")


class DataError(ValueError):
    """A bad input file or value; the message names it."""


# ----------------------------------------------------------------------------------- PNG files
def read_image(path: os.PathLike, *, what: str = "image") -> np.ndarray:
    """Read an image file as 8-bit grayscale (H, W) uint8.

    RGB(A) and palette images are converted with ITU-R 601 luma, 16-bit images are scaled to 8 bit.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
                return np.round(arr).astype(np.uint8)
            if im.mode != "L":
                im = im.convert("L")
            return np.array(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def read_label_array(path: os.PathLike, what: str = "mask") -> np.ndarray:
    """A label image as an integer array, uncast (16-bit values stay visible); an RGB(A)/LA image is
    accepted only when its colour channels agree (alpha ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.array(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable {what} image ({type(e).__name__}: {e})") from None
    if arr.ndim == 3:
        colour = arr[..., :3] if arr.shape[2] >= 3 else arr[..., :1]
        if not all(np.array_equal(colour[..., 0], colour[..., i]) for i in range(1, colour.shape[2])):
            raise DataError(f"{path}: {what} has {arr.shape[2]} channels that differ; expected one value per pixel")
        arr = colour[..., 0]
    return np.asarray(arr)


def read_mask(path: os.PathLike, n_classes: Optional[int] = None, shape: Optional[tuple] = None) -> np.ndarray:
    """Read a class-index mask (H, W) uint8 and check its values and size."""
    arr = read_label_array(path)
    if arr.size and arr.dtype != np.uint8 and (arr.min() < 0 or arr.max() > 255):
        # a 16/32-bit mask: values beyond 0..255 would otherwise wrap silently in the uint8 cast below
        raise DataError(f"{path}: mask values {int(arr.min())}..{int(arr.max())} do not fit 0..255 "
                        f"(one 8-bit class index per pixel)")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise DataError(f"{path}: mask size {arr.shape[1]}x{arr.shape[0]} (WxH) differs from its image's "
                        f"{shape[1]}x{shape[0]}")
    if n_classes is not None:
        bad = np.unique(arr[(arr < 0) | (arr >= n_classes)])
        if bad.size:
            raise DataError(f"{path}: mask values {bad[:10].tolist()} are not valid class indices "
                            f"0..{n_classes - 1}")
    return arr.astype(np.uint8)


def write_png(path: os.PathLike, arr: np.ndarray) -> None:
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise DataError(f"{path}: refusing to write a {arr.dtype} array as an 8-bit PNG")
    Image.fromarray(arr).save(path, format="PNG", optimize=False, compress_level=1)


# ------------------------------------------------------------------------- the dataset on disk
@dataclass
class CaseRecord:
    case: str
    subject: str
    image: Path
    mask: Path
    spacing_mm: Optional[float] = None


@dataclass
class DatasetInfo:
    root: Path
    meta: dict
    cases: list  # list[CaseRecord]

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def classes(self) -> list:
        return list(self.meta["classes"])

    @property
    def n_classes(self) -> int:
        return len(self.meta["classes"])

    def case(self, name: str) -> CaseRecord:
        for c in self.cases:
            if c.case == name:
                return c
        raise KeyError(f"case {name!r} not in dataset {self.root}")


def read_dataset_json(root: os.PathLike) -> dict:
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path} is missing: {Path(root)} is not a dataset in the common format "
                        f"(run a data_scripts/prepare_<name>.py script first)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise DataError(f"{path}: missing keys {missing}")
    classes = meta["classes"]
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: 'classes' must be a list of at least two names (index = mask value), "
                        f"got {classes!r}")
    if len(classes) > 255:
        raise DataError(f"{path}: {len(classes)} classes do not fit an 8-bit mask")
    return meta


def load_dataset(root: os.PathLike) -> DatasetInfo:
    """Open a dataset in the common format and check that its files are all there."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    meta = read_dataset_json(root)
    csv_path = root / "cases.csv"
    if not csv_path.is_file():
        raise DataError(f"{csv_path} is missing")
    cases = []
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"case", "subject"} <= set(reader.fieldnames):
            raise DataError(f"{csv_path}: expected columns case,subject[,spacing_mm], got {reader.fieldnames}")
        for i, row in enumerate(reader, start=2):
            name, subject = (row.get("case") or "").strip(), (row.get("subject") or "").strip()
            if not name or not subject:
                raise DataError(f"{csv_path} line {i}: empty case or subject")
            spacing = row.get("spacing_mm")
            try:
                spacing = float(spacing) if spacing not in (None, "") else None
            except ValueError:
                raise DataError(f"{csv_path} line {i}: spacing_mm {spacing!r} is not a number") from None
            image, mask = root / "images" / f"{name}.png", root / "masks" / f"{name}.png"
            if not image.is_file():
                raise DataError(f"case {name!r} listed in {csv_path} has no image: {image} is missing")
            if not mask.is_file():
                raise DataError(f"image {image} has no mask: {mask} is missing")
            cases.append(CaseRecord(name, subject, image, mask, spacing))
    if not cases:
        raise DataError(f"{csv_path} lists no cases")
    names = [c.case for c in cases]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:5]
        raise DataError(f"{csv_path}: duplicate case names {dup}")
    return DatasetInfo(root=root, meta=meta, cases=cases)


def load_case(info: DatasetInfo, record: CaseRecord) -> tuple[np.ndarray, np.ndarray]:
    """Read one case's image and mask, checking size and class values."""
    image = read_image(record.image)
    mask = read_mask(record.mask, n_classes=info.n_classes, shape=image.shape)
    return image, mask


class DatasetWriter:
    """Write a dataset in the common format, atomically.

    ::

        with DatasetWriter(out_root / "hc18", meta, overwrite=False) as w:
            w.add_case("000_HC", "000", image_uint8, mask_uint8, spacing_mm=0.07)

    On success the temporary folder is renamed to ``target``; on any exception it is deleted and
    ``target`` is left exactly as it was.
    """

    def __init__(self, target: os.PathLike, meta: dict, overwrite: bool = False):
        self.target = Path(target)
        self.meta = dict(meta)
        self.overwrite = overwrite
        missing = [k for k in REQUIRED_KEYS if k not in self.meta and k != "n_cases"]
        if missing:
            raise ValueError(f"dataset metadata lacks {missing}")
        self.n_classes = len(self.meta["classes"])
        self.rows: list[dict] = []
        self.tmp: Optional[Path] = None

    def __enter__(self) -> "DatasetWriter":
        if self.target.exists() and not self.overwrite:
            raise FileExistsError(f"{self.target} already exists; pass --overwrite (overwrite=True) to replace it")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{uuid.uuid4().hex[:8]}"
        (self.tmp / "images").mkdir(parents=True)
        (self.tmp / "masks").mkdir()
        return self

    def add_case(self, case: str, subject: str, image: np.ndarray, mask: np.ndarray,
                 spacing_mm: Optional[float] = None, source: str = "") -> None:
        where = f" (from {source})" if source else ""
        if not case or "/" in case or "\\" in case or case.startswith("."):
            raise DataError(f"invalid case name {case!r}{where}")
        if any(r["case"] == case for r in self.rows):
            raise DataError(f"duplicate case name {case!r}{where}")
        image, mask = np.asarray(image), np.asarray(mask)
        if image.ndim != 2 or image.dtype != np.uint8:
            raise DataError(f"case {case!r}{where}: image must be 2-D uint8, got {image.dtype} {image.shape}")
        if mask.shape != image.shape:
            raise DataError(f"case {case!r}{where}: mask size {mask.shape} differs from image size {image.shape}")
        if mask.dtype != np.uint8:
            if mask.min() < 0 or mask.max() > 255:
                raise DataError(f"case {case!r}{where}: mask values outside 0..255")
            mask = mask.astype(np.uint8)
        if mask.max() >= self.n_classes:
            bad = np.unique(mask[mask >= self.n_classes])[:10].tolist()
            raise DataError(f"case {case!r}{where}: mask values {bad} are not valid class indices "
                            f"0..{self.n_classes - 1}")
        write_png(self.tmp / "images" / f"{case}.png", image)
        write_png(self.tmp / "masks" / f"{case}.png", mask)
        row = {"case": case, "subject": str(subject)}
        if spacing_mm is not None:
            row["spacing_mm"] = f"{float(spacing_mm):.6g}"
        self.rows.append(row)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            if not self.rows:
                raise DataError(f"no cases were converted for {self.target}")
            has_spacing = any("spacing_mm" in r for r in self.rows)
            columns = ["case", "subject"] + (["spacing_mm"] if has_spacing else [])
            with (self.tmp / "cases.csv").open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns)
                writer.writeheader()
                for r in self.rows:
                    writer.writerow({k: r.get(k, "") for k in columns})
            meta = dict(self.meta, n_cases=len(self.rows))
            (self.tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
            load_dataset(self.tmp)  # the written dataset must read back
            if self.target.exists():
                old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
                self.target.rename(old)
                try:
                    self.tmp.rename(self.target)
                except BaseException:
                    old.rename(self.target)  # put the finished dataset back rather than lose it
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                self.tmp.rename(self.target)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False


# ------------------------------------------------------------------------------- small helpers
def sha256sum(path: os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: os.PathLike, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:6]}")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def read_json(path: os.PathLike) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed JSON ({e})") from None


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def list_images(folder: os.PathLike, exts: Iterable[str] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
                ) -> list[Path]:
    folder = Path(folder)
    exts = {e.lower() for e in exts}
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts)
