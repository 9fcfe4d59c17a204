"""Reading and writing the common dataset format, with clear errors and atomic writes.

The format::

    <data_root>/<dataset>/
      images/<case>.png   8-bit grayscale
      masks/<case>.png    uint8 class index per pixel (0 = background)
      cases.csv           case,subject[,spacing_mm]
      dataset.json        name, modality, classes, license, citation, source, n_cases

Every problem with an input raises :class:`DataError` whose message names the file or value.
Every name that becomes part of a path (case, class and dataset names) passes :func:`check_name`,
on load and on write alike; writers build paths with :func:`safe_join`, which refuses any that
leaves its root. :class:`DatasetWriter` holds a lock on its target, builds the dataset in a
temporary folder and renames it into place only when every case was written, so a failed or
concurrent conversion leaves nothing half-written behind and a finished dataset is never
replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

REQUIRED_KEYS = ("name", "modality", "classes", "license", "citation", "source", "n_cases")
WINDOW_PERCENTILES = (0.5, 99.5)  # images wider than 8 bit: these percentiles map to 0 and 255
MAX_FOREGROUND = 0.9  # a mask with more foreground than this is refused (inverted?) ...
MAX_COVERED_BORDERS = 2  # ... and so is one whose foreground covers most of 3 or 4 image borders


# the columns of a run's results.csv (and of the sweep's, before its grid columns)
RESULT_COLUMNS = ["dataset", "n_labeled", "seed", "method", "dice", "iou", "hd95", "params_m", "latency_ms",
                  "profile"]


class DataError(ValueError):
    """A bad input file or value; the message names it."""


class BusyError(DataError):
    """Another conversion holds the lock on the same target."""


# ------------------------------------------------------------------------- names and paths
def _has_control(text: str) -> bool:
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in text)


MAX_NAME_BYTES = 200  # a case name becomes a file name with a suffix (".png", ".tmp-..."); file systems stop at 255


def check_name(name, what: str, where: str) -> str:
    """Return ``name`` if it can be one plain file or folder name, else raise :class:`DataError`.

    The rule for every name taken from data that becomes part of a path (case, class and dataset
    names), applied on load and on write: not empty, no path separator (``/`` or ``\\``), not
    absolute (nor a drive such as ``C:``), not starting with ``.`` (so neither ``..`` nor hidden),
    no control characters, at most MAX_NAME_BYTES bytes in UTF-8. ``what`` says what the name is and ``where``
    where it came from, e.g.
    ``check_name(row["case"], "case name", f"{csv_path} line 7")``.
    """
    if not isinstance(name, str) or not name:
        problem = "is empty" if isinstance(name, str) else f"is a {type(name).__name__}, not a string"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator"
    elif name.startswith("."):
        problem = "starts with '.'"
    elif _has_control(name):
        problem = "contains a control character"
    elif len(name.encode("utf-8")) > MAX_NAME_BYTES:
        problem = f"is {len(name.encode('utf-8'))} bytes long (at most {MAX_NAME_BYTES}: file names stop at 255)"
    elif PureWindowsPath(name).anchor or os.path.isabs(name):
        problem = "is an absolute path or a drive"
    else:
        return name
    raise DataError(f"{where}: {what} {name!r} {problem}; expected one plain file name "
                    f"(no '/', '\\', leading '.', or control characters)")


def safe_join(root: os.PathLike, *parts: str) -> Path:
    """``Path(root, *parts)``, or a :class:`DataError` unless it stays inside ``root``.

    A part may hold sub-folders (``"students/ts_kd"``) and hidden names (``".x.tmp-1"``), but no
    empty, ``.`` or ``..`` component, no absolute path and no control character; the joined path,
    symlinks resolved, must lie strictly inside the resolved ``root``. Check names taken from data
    with :func:`check_name` first: its rule is stricter.
    """
    root = Path(root)
    for part in parts:
        text = str(part).replace("\\", "/")
        if (not text or PurePosixPath(text).is_absolute() or PureWindowsPath(str(part)).anchor
                or _has_control(text) or any(c in ("", ".", "..") for c in text.split("/"))):
            raise DataError(f"unsafe path part {part!r} under {root}: expected relative names without "
                            f"empty, '.' or '..' components")
    path = root.joinpath(*parts)
    resolved, base = path.resolve(), root.resolve()
    if base not in resolved.parents:
        raise DataError(f"{path} resolves to {resolved}, outside {root}; refusing to use it")
    return path


# ------------------------------------------------------------------- notes, once per conversion
_notes_seen: set = set()
_notes_lock = threading.Lock()


def _note_once(key: str, message: str) -> None:
    """Print ``message`` the first time ``key`` comes up; each :class:`DatasetWriter` starts afresh."""
    with _notes_lock:
        if key in _notes_seen:
            return
        _notes_seen.add(key)
    print(message)


def _reset_notes() -> None:
    with _notes_lock:
        _notes_seen.clear()


# ----------------------------------------------------------------------------------- PNG files
def window_to_uint8(arr: np.ndarray, source, percentiles=WINDOW_PERCENTILES) -> np.ndarray:
    """Map the image's ``percentiles`` to 0 and 255 (clipped), so one bright outlier cannot black out
    the image; a nearly constant image falls back to its min..max. Notes it once per conversion."""
    arr = np.asarray(arr, dtype=np.float64)
    _note_once("window", f"note: {source} is a 16-bit (or wider) image: its {percentiles[0]:g}-{percentiles[1]:g} "
                         f"percentile range is mapped to 0..255 (as for every such image in this conversion)")
    lo, hi = np.percentile(arr, percentiles) if arr.size else (0.0, 0.0)
    if hi <= lo:
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if hi <= lo:
            return np.zeros(arr.shape, np.uint8)
    return np.clip(np.round((arr - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def _open(path: Path, what: str, kind: str = "", load: bool = True) -> Image.Image:
    """The loaded image (``load=False``: its header only), or a DataError naming the file ("not a readable<kind>
    image")."""
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    im = None
    try:
        im = Image.open(path)
        if load:
            im.load()
        return im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if im is not None:
            im.close()
        raise DataError(f"{path}: not a readable{kind} image ({type(e).__name__}: {e})") from None


def image_size(path: os.PathLike, *, what: str = "image") -> tuple[int, int]:
    """(width, height) from the file's header, or a DataError naming the file."""
    with _open(Path(path), what, load=False) as im:
        return im.size


def read_image(path: os.PathLike, *, what: str = "image") -> np.ndarray:
    """Read an image file as 8-bit grayscale (H, W) uint8.

    RGB(A) and palette images are converted with ITU-R 601 luma; 16-bit (and 32-bit, float) images
    are windowed to their 0.5-99.5 percentiles (:func:`window_to_uint8`, with a note).
    """
    path = Path(path)
    with _open(path, what) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            return window_to_uint8(np.asarray(im), path)
        return np.array(im if im.mode == "L" else im.convert("L"), dtype=np.uint8)


def _palette_as_shown(im: Image.Image) -> np.ndarray:
    """A palette image's grey values when every colour it uses is grey (what the image shows), else
    its indices (the VOC convention: index = class, colours arbitrary)."""
    index = np.array(im)
    lut = np.array(im.getpalette() or [0, 0, 0], np.uint8).reshape(-1, 3)
    used = np.unique(index)
    if used.max() < len(lut) and (lut[used] == lut[used, :1]).all():
        return lut[index, 0]
    return index


def read_label_array(path: os.PathLike, what: str = "mask") -> np.ndarray:
    """A label image as an integer array, uncast (16-bit values stay visible). RGB(A)/LA images are
    accepted only when their colour channels agree (alpha ignored); 1-bit images give 0/1; palette
    images give the grey values they show, or their indices if their colours are not grey."""
    path = Path(path)
    with _open(path, what, f" {what}") as im:
        arr = _palette_as_shown(im) if im.mode == "P" else np.array(im)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
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


def mask_values(arr: np.ndarray) -> list:
    """The distinct values of a label array, sorted (fast for 8-bit masks)."""
    arr = np.asarray(arr)
    if arr.dtype in (np.uint8, np.bool_):
        return np.flatnonzero(np.bincount(arr.ravel(), minlength=1)).tolist()
    return np.unique(arr).tolist()


def binary_foreground(arr: np.ndarray, path, threshold: Optional[int] = None) -> np.ndarray:
    """A binary mask (as :func:`read_label_array` gives it: grey, 1-bit, RGB or palette) -> bool.

    0/1 and 0/255 are unambiguous; with ``threshold`` (BUSI's anti-aliased masks) any 0..255 mask
    with values above it gives foreground = value > threshold. Anything else is a DataError.
    """
    values = mask_values(arr)
    if set(values) <= {0, 1}:
        return np.asarray(arr) == 1
    if set(values) <= {0, 255}:
        return np.asarray(arr) == 255
    if threshold is not None and 0 <= values[0] and values[-1] <= 255 and values[-1] > threshold:
        return np.asarray(arr) > threshold
    extra = f", or 0..255 with values above {threshold}" if threshold is not None else ""
    raise DataError(f"{path}: mask values {values[:10]} are not valid: expected a binary mask, 0/1 or 0/255{extra}")


def check_plausible_mask(foreground: np.ndarray, path) -> None:
    """Refuse a mask that is probably inverted: foreground (any class > 0) over more than
    MAX_FOREGROUND of the image, or over most of more than MAX_COVERED_BORDERS of its 4 borders."""
    fg = np.asarray(foreground).astype(bool, copy=False)
    if not fg.any():
        return
    covered = sum(float(side.mean()) > 0.5 for side in (fg[0], fg[-1], fg[:, 0], fg[:, -1]))
    if fg.mean() > MAX_FOREGROUND or covered > MAX_COVERED_BORDERS:
        raise DataError(f"{path}: the foreground covers {fg.mean():.0%} of the image and most of {covered} of its "
                        f"4 borders: is the mask inverted? (expected at most {MAX_FOREGROUND:.0%} foreground and "
                        f"{MAX_COVERED_BORDERS} borders mostly covered)")


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


def _check_names(meta: dict, where: str) -> None:
    """The class list and the dataset name: names that may become paths."""
    classes = meta["classes"]
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{where}: 'classes' must be a list of at least two names (index = mask value), "
                        f"got {classes!r}")
    if len(classes) > 255:
        raise DataError(f"{where}: {len(classes)} classes do not fit an 8-bit mask")
    for c in classes:
        check_name(c, "class name", where)
    check_name(meta["name"], "dataset name", where)


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
    _check_names(meta, str(path))
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
    cases, seen = [], set()
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: a BOM, as Excel writes it, is skipped
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"case", "subject"} <= set(reader.fieldnames):
                raise DataError(f"{csv_path}: expected columns case,subject[,spacing_mm], got {reader.fieldnames}")
            for i, row in enumerate(reader, start=2):
                where = f"{csv_path} line {i}"
                name, subject = (row.get("case") or "").strip(), (row.get("subject") or "").strip()
                if not name or not subject:
                    raise DataError(f"{where}: empty case or subject")
                check_name(name, "case name", where)
                if name in seen:
                    raise DataError(f"{where}: duplicate case name {name!r}")
                seen.add(name)
                spacing = row.get("spacing_mm")
                try:
                    spacing = float(spacing) if spacing not in (None, "") else None
                except ValueError:
                    raise DataError(f"{where}: spacing_mm {spacing!r} is not a number") from None
                image, mask = root / "images" / f"{name}.png", root / "masks" / f"{name}.png"
                if not image.is_file():
                    raise DataError(f"case {name!r} listed in {csv_path} has no image: {image} is missing")
                if not mask.is_file():
                    raise DataError(f"image {image} has no mask: {mask} is missing")
                cases.append(CaseRecord(name, subject, image, mask, spacing))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: not a readable CSV ({type(e).__name__}: {e})") from None
    if not cases:
        raise DataError(f"{csv_path} lists no cases")
    return DatasetInfo(root=root, meta=meta, cases=cases)


def load_case(info: DatasetInfo, record: CaseRecord) -> tuple[np.ndarray, np.ndarray]:
    """Read one case's image and mask, checking size and class values."""
    image = read_image(record.image)
    mask = read_mask(record.mask, n_classes=info.n_classes, shape=image.shape)
    return image, mask


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def _take_lock(target: Path, timeout: float):
    """The held lock of one conversion target, or BusyError after ``timeout`` seconds (0: at once)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(_lock_path(target)))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        waited = f" after {timeout:.0f} s" if timeout else ""
        raise BusyError(f"another conversion is writing {target} (its lock file {_lock_path(target)} is "
                        f"held{waited}); wait for it to finish, or write to another --out") from None
    return lock


def _release_lock(lock, path: Path) -> None:
    if lock is not None:
        try:
            path.unlink()  # while still held, so no one else's lock file is removed
        except OSError:
            pass
        lock.release()


def wait_for_conversion(target: os.PathLike, timeout: float) -> None:
    """Block until no conversion writes ``target``; BusyError after ``timeout`` seconds."""
    target = Path(target)
    _release_lock(_take_lock(target, timeout), _lock_path(target))


class DatasetWriter:
    """Write a dataset in the common format, atomically, one conversion per target at a time.

    ::

        with DatasetWriter(out_root / "hc18", meta, overwrite=False) as w:
            w.add_case("000_HC", "000", image_uint8, mask_uint8, spacing_mm=0.07)

    ``__enter__`` takes the lock ``.<name>.lock`` beside ``target`` (a second conversion into the
    same target raises :class:`BusyError` at once), removes the ``.<name>.tmp-*``/``.<name>.old-*``
    folders a killed conversion left (a finished dataset moved aside by an interrupted swap is put
    back, never deleted) and refuses an existing ``target`` unless ``overwrite``. On success the
    temporary folder is renamed to ``target`` (checked again under the lock: a target that appeared
    meanwhile is never replaced without ``overwrite``); on any exception it is deleted and
    ``target`` is left exactly as it was.
    """

    def __init__(self, target: os.PathLike, meta: dict, overwrite: bool = False):
        self.target = Path(target)
        self.meta = dict(meta)
        self.overwrite = overwrite
        missing = [k for k in REQUIRED_KEYS if k not in self.meta and k != "n_cases"]
        if missing:
            raise ValueError(f"dataset metadata lacks {missing}")
        if isinstance(self.meta["classes"], tuple):
            self.meta["classes"] = list(self.meta["classes"])
        _check_names(self.meta, f"metadata of {self.target}")
        check_name(self.target.name, "dataset folder name", str(self.target))
        self.n_classes = len(self.meta["classes"])
        self.rows: list[dict] = []
        self._folded: dict = {}  # case name in lower case -> case name
        self.tmp: Optional[Path] = None
        self.lock_path = _lock_path(self.target)
        self._lock = None

    # ------------------------------------------------------------------------------ the lock
    def _acquire(self) -> None:
        self._lock = _take_lock(self.target, 0)

    def _release(self) -> None:
        _release_lock(self._lock, self.lock_path)
        self._lock = None

    def _clean_leftovers(self) -> None:
        """Under the lock: remove what killed conversions of this target left beside it."""
        pattern = re.compile(rf"\.{re.escape(self.target.name)}\.(tmp|old)-[0-9a-f]{{8}}")
        found = [p for p in self.target.parent.iterdir() if pattern.fullmatch(p.name)]
        olds = sorted((p for p in found if ".old-" in p.name), key=lambda p: p.stat().st_mtime, reverse=True)
        if not self.target.exists():  # killed between the two renames of a swap: put the dataset back
            for old in olds:
                try:
                    load_dataset(old)
                except DataError:
                    continue
                old.rename(self.target)
                found.remove(old)
                print(f"note: restored {self.target} from {old.name}, left by an interrupted conversion")
                break
        for p in found:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            print(f"note: removed {p}, left by an interrupted conversion")

    def __enter__(self) -> "DatasetWriter":
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._acquire()
        try:
            self._clean_leftovers()
            if self.target.exists() and not self.overwrite:
                raise FileExistsError(f"{self.target} already exists; pass --overwrite (overwrite=True) to replace it")
            self.tmp = self.target.parent / f".{self.target.name}.tmp-{uuid.uuid4().hex[:8]}"
            (self.tmp / "images").mkdir(parents=True)
            (self.tmp / "masks").mkdir()
        except BaseException:
            self._release()
            raise
        _reset_notes()
        return self

    def add_case(self, case: str, subject: str, image: np.ndarray, mask: np.ndarray,
                 spacing_mm: Optional[float] = None, source: str = "") -> None:
        where = f" (from {source})" if source else ""
        check_name(case, "case name", source or str(self.target))
        other = self._folded.get(case.casefold())
        if other == case:
            raise DataError(f"duplicate case name {case!r}{where}")
        if other is not None:
            raise DataError(f"case names {other!r} and {case!r}{where} differ only in letter case: "
                            f"one file on case-insensitive file systems")
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
        write_png(safe_join(self.tmp, "images", f"{case}.png"), image)
        write_png(safe_join(self.tmp, "masks", f"{case}.png"), mask)
        row = {"case": case, "subject": str(subject)}
        if spacing_mm is not None:
            row["spacing_mm"] = f"{float(spacing_mm):.6g}"
        self.rows.append(row)
        self._folded[case.casefold()] = case

    def _finish(self) -> None:
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
        if not self.target.exists():
            self.tmp.rename(self.target)
            return
        if not self.overwrite:
            raise FileExistsError(f"{self.target} appeared while this conversion ran; not replacing it "
                                  f"(pass --overwrite to replace it)")
        old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
        self.target.rename(old)
        try:
            self.tmp.rename(self.target)
        except BaseException:
            old.rename(self.target)  # put the finished dataset back rather than lose it
            raise
        shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._finish()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)  # gone already when renamed into place
            self._release()
            _reset_notes()
        return False


# ------------------------------------------------------------------------------- small helpers
def sha256sum(path: os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file: weights get it too (safetensors writes 0600)


def atomic_write(path: os.PathLike, write) -> Path:
    """Write ``path`` all or nothing: ``write(tmp)`` fills a temporary beside it (a name unique to this writer),
    which gets the mode every other file gets and is renamed into place; on any failure the temporary is removed
    and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_safetensors(path: os.PathLike, tensors: dict, metadata: Optional[dict] = None) -> Path:
    """safetensors' ``save_file``, atomically and with the usual file mode (see :func:`atomic_write`)."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def write_json(path: os.PathLike, obj, strict: bool = False) -> None:
    """Write JSON atomically (see :func:`atomic_write`); ``strict``: standard JSON, NaN and +-inf written as null."""
    text = json.dumps(_finite(obj) if strict else obj, indent=2, default=_json_default, allow_nan=not strict) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _finite(o):
    """``o`` with every NaN and +-inf (numpy's too) replaced by None: what standard JSON can hold."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, np.ndarray)):
        return [_finite(v) for v in (o.tolist() if isinstance(o, np.ndarray) else o)]
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    return o


def check_writable_dir(path: os.PathLike, what: str = "output folder") -> Path:
    """``path`` if it is a folder, or can be made one, that this process can create files in; else a
    :class:`DataError` naming it. Tried, not looked up (``os.access`` says yes to root everywhere): a probe file is
    created and removed in ``path`` or, if it does not exist yet, its nearest existing parent."""
    path = Path(path)
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise DataError(f"{what} {path} is a file, not a folder" if base == path else
                        f"{what} {path} cannot be made: {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=base)
    except OSError as e:
        raise DataError(f"{what} {path}: cannot create files in {base} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)
    return path


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
