"""Use a trained model on new images: class-index masks and overlays at each image's original size.

::

    python -m tskd_utils.predict --run RUN_DIR --method ts_kd --input PATH_OR_DIR --out DIR
                                 [--overwrite] [--backend torch|onnx] [--onnx FILE] [--max-pixels N]

or, from Python, :func:`predict_files`. Inputs are PNG, JPEG, TIFF (8 or 16 bit, grayscale or
colour) and DICOM files, or a folder of them (not recursive). Each image gets exactly the
preprocessing the model was trained with (:func:`to_gray_uint8`, then :func:`model_input`):

1. to 8-bit grayscale. 8-bit images are read as :func:`tskd_utils.io.read_image` reads the
   dataset (colour by ITU-R 601 luma); 16-bit and float images are windowed to their
   0.5-99.5 percentile range (a note is printed: min/max would let one hot pixel flatten the
   contrast); DICOM gets its rescale slope/intercept, then its window center/width when the
   file has one, else the percentile window (MONOCHROME1 is inverted);
2. letterbox to the model's input size (:func:`tskd_utils.data.letterbox`) and scale to [0, 1];
3. the logits are mapped back to the original size (:func:`tskd_utils.data.unletterbox`) before
   the argmax, as evaluation does.

Outputs: ``DIR/masks/<name>.png`` (uint8, value = class index) and ``DIR/overlays/<name>.png``,
each written atomically (a temporary file renamed into place, so no truncated PNG is ever left).
Existing outputs are never replaced without ``overwrite``, and ``DIR`` must be a folder this process
can write in (both checked before any work). A folder run goes on past any file it cannot read,
predict or write (an image whose overlay cannot be written keeps no new mask either) and lists
the failures with their errors at the end; the command then exits with status 1.

Memory: about ``4 K + 6`` bytes per input pixel for K classes (the logits at the original size,
float32, the uint8 mask and overlay; float64/int64 temporaries are made a block of rows at a time).
Images of more than ``MAX_PIXELS`` pixels (``--max-pixels``) are refused, per file, before decoding.
``--method teacher`` runs the run's LoRA teacher live on each image (for comparison; the run's
feature caches are neither read nor written).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .checkpoints import load_student, load_teacher, to_label_map as label_map  # noqa: F401 (predict.label_map)
from .data import by_rows, letterbox, letterbox_valid
from .io import DataError, atomic_write, check_writable_dir, read_json, write_png
from .run import load_run
from .viz import CLASS_COLORS, overlay

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
SUPPORTED = "PNG, JPEG, TIFF or DICOM (.png .jpg .jpeg .tif .tiff .dcm .dicom, or a DICOM file without extension)"
WINDOW_PERCENTILES = (0.5, 99.5)  # of the pixel values of one image: the window of 16-bit / float input
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # PIL modes that are not 8-bit
MAX_PIXELS = 50_000_000  # larger images are refused (about 4 K + 6 bytes per pixel: 0.9 GB here for 3 classes)


# --------------------------------------------------------------------------------- reading


def is_dicom(path: Path) -> bool:
    """A ``.dcm``/``.dicom`` name, or the DICOM magic ``DICM`` after the 128-byte preamble."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def window_percentiles(values: np.ndarray, percentiles: tuple[float, float] = WINDOW_PERCENTILES) -> np.ndarray:
    """Map values linearly so that their low/high percentiles become 0/255 (clipped), as uint8.

    The same rule as the dataset converters' :func:`tskd_utils.io.read_image` for 16-bit images: one
    hot pixel cannot black out the image; a nearly constant image falls back to its min..max.
    """
    v = np.asarray(values)
    lo, hi = np.percentile(v, percentiles)  # float64, on a copy of v's own dtype
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
        if hi <= lo:  # a flat image: no contrast to keep
            return np.zeros(v.shape, np.uint8)
    return by_rows(lambda b: np.round(np.clip((b.astype(np.float64) - lo) / (hi - lo), 0, 1) * 255.0), v)


def window_center_width(values: np.ndarray, center: float, width: float, rescale=(1.0, 0.0)) -> np.ndarray:
    """DICOM's linear VOI window (PS3.3 C.11.2.1.2) onto 0..255, as uint8, of ``values * slope + intercept``
    (``rescale``: DICOM's RescaleSlope and RescaleIntercept)."""
    (slope, intercept), width = rescale, max(float(width), 1.0)

    def window(b):
        y = ((b.astype(np.float64) * slope + intercept - (float(center) - 0.5)) / (width - 1.0 if width > 1 else 1.0)
             + 0.5) * 255.0
        return np.round(np.clip(y, 0, 255))
    return by_rows(window, np.asarray(values))


def luma(rgb: np.ndarray, bgr: bool = False) -> np.ndarray:
    """ITU-R 601 luma of an (H, W, 3+) array as float32 (PIL's ``convert("L")`` weights; computed in float64)."""
    def block(c):
        c = c[..., :3].astype(np.float64)
        r, g, b = (c[..., 2], c[..., 1], c[..., 0]) if bgr else (c[..., 0], c[..., 1], c[..., 2])
        return 0.299 * r + 0.587 * g + 0.114 * b
    return by_rows(block, np.asarray(rgb), dtype=np.float32)


def _percentile_note(path: Path, what: str) -> str:
    lo, hi = WINDOW_PERCENTILES
    return (f"{path.name}: {what}, windowed to its {lo:g}-{hi:g} percentile range (not min/max) to make the "
            f"8-bit grayscale the model was trained on")


PIL_DEPTHS = {"I": "32-bit integer image", "F": "floating-point image"}  # others in HIGH_DEPTH_MODES: 16-bit


def _first_value(v) -> float:
    """A DICOM number that may be multi-valued (several windows: the first is the default)."""
    try:
        return float(v)
    except TypeError:
        return float(v[0])


def check_size(path: Path, width: int, height: int, max_pixels: int) -> None:
    """A :class:`DataError` naming the file and its size if it has more than ``max_pixels`` pixels."""
    if width * height > max_pixels:
        raise DataError(f"{path}: {width}x{height} = {width * height:,} pixels, more than the {max_pixels:,} predict "
                        f"takes (about 4 K + 6 bytes of memory per pixel for K classes); shrink the image or raise "
                        f"--max-pixels")


def _read_dicom(path: Path, max_pixels: int) -> tuple[np.ndarray, Optional[str]]:
    """One DICOM slice -> uint8 grayscale: rescale slope/intercept, then its window (or percentiles)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # InvalidDicomError, a truncated file, ...
        raise DataError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data (not an image)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"{path}: multi-frame DICOM ({frames} frames) is not supported; give one slice per file")
    check_size(path, int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0), max_pixels)
    try:
        arr = np.asarray(ds.pixel_array)
    except Exception as e:
        raise DataError(f"{path}: cannot decode the DICOM pixel data ({type(e).__name__}: {e}); if it is "
                        f"compressed, install a pydicom pixel handler (pip install pylibjpeg pylibjpeg-libjpeg)"
                        ) from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour: luma, then a percentile window if not 8-bit
        if arr.dtype == np.uint8:
            return np.array(Image.fromarray(arr[..., :3]).convert("L")), None
        return window_percentiles(luma(arr)), _percentile_note(path, "colour DICOM")
    if arr.ndim != 2:
        raise DataError(f"{path}: expected one 2-D slice, got DICOM pixel data of shape {arr.shape}")
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        gray, note = window_center_width(arr, _first_value(center), _first_value(width), (slope, intercept)), None
    else:  # the percentiles of arr * slope + intercept are those of arr, rescaled: only the slope's sign matters
        gray, note = window_percentiles(arr), _percentile_note(path, "DICOM without a window")
        gray = 255 - gray if slope < 0 else gray
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":  # 0 = white
        gray = 255 - gray
    return gray, note


def _read_deep_colour(path: Path) -> Optional[np.ndarray]:
    """A >8-bit colour PNG/TIFF at full depth (BGR), via OpenCV; None if it is 8-bit.

    PIL opens 16-bit colour as 8-bit RGB without a word, which would skip the percentile window.
    """
    import cv2

    if path.suffix.lower() not in (".png", ".tif", ".tiff"):
        return None
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return None if arr is None or arr.dtype == np.uint8 or arr.ndim != 3 else arr


def _read_raster(path: Path, max_pixels: int) -> tuple[np.ndarray, Optional[str]]:
    """PNG / JPEG / TIFF -> uint8 grayscale (8-bit: as the dataset is read; deeper: percentile window)."""
    try:
        with Image.open(path) as im:
            check_size(path, *im.size, max_pixels)
            if getattr(im, "n_frames", 1) > 1:
                raise DataError(f"{path}: {im.n_frames} pages/frames; give one 2-D image per file")
            im.load()
            if im.mode in HIGH_DEPTH_MODES:
                what = PIL_DEPTHS.get(im.mode, "16-bit image")
                return window_percentiles(np.asarray(im)), _percentile_note(path, what)
            deep = _read_deep_colour(path) if im.mode in ("RGB", "RGBA") else None
            if deep is not None:
                what = f"{deep.dtype.itemsize * 8}-bit colour image"
                return window_percentiles(luma(deep, bgr=True)), _percentile_note(path, what)
            if im.mode != "L":
                im = im.convert("L")
            return np.array(im, dtype=np.uint8), None
    except DataError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def to_gray_uint8(path, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, Optional[str]]:
    """Read an input image as (H, W) uint8 grayscale, the form the models were trained on.

    Returns the image and a note (or None) saying how a non-8-bit image was windowed. An image of more than
    ``max_pixels`` pixels is a :class:`DataError` (:func:`check_size`), raised before its pixels are decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input image not found: {path}")
    if is_dicom(path):
        gray, note = _read_dicom(path, max_pixels)
    elif path.suffix.lower() in RASTER_SUFFIXES:
        gray, note = _read_raster(path, max_pixels)
    else:
        raise DataError(f"{path}: unsupported format {path.suffix or '(no extension)'}; expected {SUPPORTED}")
    if gray.ndim != 2 or min(gray.shape) < 1:
        raise DataError(f"{path}: expected a 2-D image, got shape {gray.shape}")
    return gray, note


def model_input(gray: np.ndarray, size: int) -> np.ndarray:
    """(H, W) uint8 -> (1, 1, size, size) float32 in [0, 1]: letterboxed, as in training and evaluation."""
    return (letterbox(gray, size).astype(np.float32) / 255.0)[None, None]


def overlay_uint8(gray: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The image with its predicted classes in colour, as an (H, W, 3) uint8 picture: the colours of
    :func:`tskd_utils.viz.overlay`, looked up per (class, grey value) instead of computed in float per pixel."""
    n = len(CLASS_COLORS)  # classes beyond it get its last colour, as in viz.overlay
    grey = np.tile(np.arange(256, dtype=np.uint8), (n, 1))
    lut = np.round(overlay(grey, np.repeat(np.arange(n)[:, None], 256, 1)) * 255.0).astype(np.uint8).reshape(-1, 3)
    return by_rows(lambda g, lab: lut[np.minimum(lab, n - 1).astype(np.intp) * 256 + g], gray, np.asarray(labels))


# ---------------------------------------------------------------------------------- models


class NonFiniteModel(RuntimeError):
    """A model whose output holds NaN or inf (a diverged training): predicting stops, nothing is written."""


@dataclass
class Segmenter:
    """A model ready for single images.

    ``forward(x, valid)`` maps float32 (B, 1, S, S) in [0, 1] to (B, K, S, S) logits; ``valid`` holds each
    image's (rows, cols) inside the padding, for models whose normalisation must skip the padding
    (the teacher's per-image min-max, as MedSAM does); the students and ONNX files ignore it.
    """

    name: str
    input_size: int
    forward: Callable[..., np.ndarray]

    def logits(self, gray: np.ndarray) -> np.ndarray:
        valid = np.array([letterbox_valid(gray.shape, self.input_size)], dtype=np.int64)
        out = self.forward(model_input(gray, self.input_size), valid)[0]
        if not np.isfinite(out).all():
            raise NonFiniteModel(f"{self.name} gives {int((~np.isfinite(out)).sum())} non-finite logits (NaN/inf): "
                                 "its training diverged; retrain it with a lower learning rate")
        return out

    def __call__(self, gray: np.ndarray) -> np.ndarray:
        """(H, W) uint8 -> (H, W) uint8 class indices at the image's own size."""
        return label_map(self.logits(gray), gray.shape)


def torch_forward(model: torch.nn.Module, device: str) -> Callable[..., np.ndarray]:
    takes_valid = "valid" in inspect.signature(model.forward).parameters

    def forward(x: np.ndarray, valid: Optional[np.ndarray] = None) -> np.ndarray:
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(x)).to(device)]
            if takes_valid and valid is not None:
                args.append(torch.as_tensor(valid, dtype=torch.long, device=device))
            return model(*args).float().cpu().numpy()
    return forward


def onnx_forward(session) -> Callable[..., np.ndarray]:
    def forward(x: np.ndarray, valid: Optional[np.ndarray] = None) -> np.ndarray:
        return session.run(["logits"], {"image": np.ascontiguousarray(x, dtype=np.float32)})[0]
    return forward


CONFIG_KEYS = ("dataset", "data_root", "n_labeled", "seed", "profile")  # what a run's config.json must hold


def open_run(run):
    """A :class:`tskd_utils.run.Run` from a Run or a run folder; a :class:`DataError` names a non-run folder, and
    the config.json that lacks a key or names an unknown profile or setting."""
    if hasattr(run, "profile") and hasattr(run, "dir"):
        return run
    if not Path(run).is_dir():
        raise DataError(f"run folder not found: {run}")
    cfg_path = Path(run).resolve() / "config.json"
    if cfg_path.is_file():  # (a missing one: load_run says so)
        cfg = read_json(cfg_path)
        missing = [k for k in CONFIG_KEYS if k not in cfg] if isinstance(cfg, dict) else list(CONFIG_KEYS)
        if missing:
            raise DataError(f"{cfg_path}: not a run's config, missing keys {missing} (setup_run, notebook 01, "
                            f"writes it)")
    try:
        return load_run(run)
    except DataError:
        raise
    except (KeyError, TypeError, ValueError) as e:  # an unknown profile or setting, or a value of the wrong type
        raise DataError(f"{cfg_path}: {e.args[0] if isinstance(e, KeyError) and e.args else e}") from None


def trained_model(run, method: str, device: str) -> torch.nn.Module:
    """The trained student of ``method`` (or the LoRA teacher for ``teacher``), in eval mode.

    A method the run has not trained, or an unknown id, is a :class:`DataError` naming the run.
    """
    try:
        if method == "teacher":
            return load_teacher(run, "lora", device=device)
        return load_student(run, method, device=device)
    except KeyError as e:  # an unknown method id
        raise DataError(f"--method {method!r}: {e.args[0] if e.args else e}") from None
    except FileNotFoundError as e:  # this run has no trained model for the method
        raise DataError(f"{run.dir} has no trained {method!r} model: {e}") from None


def _torch_segmenter(run, method: str, device: Optional[str]) -> Segmenter:
    device = device or run.device
    model = trained_model(run, method, device)
    if method == "teacher":  # run live on the image: no prefix cache is read or written
        return Segmenter(f"teacher ({run.profile.teacher.name} + LoRA, torch)", run.profile.teacher.input_size,
                         torch_forward(model, device))
    return Segmenter(f"{method} ({run.profile.student.name}, torch)", run.profile.data.image_size,
                     torch_forward(model, device))


def onnx_session(path, threads: Optional[int] = None):
    """An onnxruntime CPU session with as many intra-op threads as torch uses (a fair comparison)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise DataError(f"{path}: not a loadable ONNX model ({type(e).__name__}: {str(e)[:300]})") from None


def _onnx_segmenter(run, method: str, onnx_file) -> Segmenter:
    if method == "teacher":
        raise DataError("--backend onnx runs an exported student; the teacher runs with --backend torch")
    if onnx_file is None:
        raise DataError("--backend onnx needs --onnx FILE (made by python -m tskd_utils.export)")
    onnx_file = Path(onnx_file)
    if not onnx_file.is_file():
        raise DataError(f"ONNX model not found: {onnx_file}")
    session = onnx_session(onnx_file)
    shape = session.get_inputs()[0].shape
    size = shape[-1] if isinstance(shape[-1], int) else None
    if size is None or shape[-2] != size:
        raise DataError(f"{onnx_file}: input shape {shape} is not (batch, 1, S, S)")
    if run is not None and run.profile.data.image_size != size:
        raise DataError(f"{onnx_file} takes {size} px input but run {run.dir} trained its students at "
                        f"{run.profile.data.image_size} px: is it this run's export?")
    return Segmenter(f"{method} (onnxruntime, {onnx_file.name})", size, onnx_forward(session))


def load_segmenter(run, method: str = "ts_kd", backend: str = "torch", onnx=None,
                   device: Optional[str] = None) -> Segmenter:
    """The model of ``method`` in ``run`` (a Run or run folder) behind the chosen backend."""
    if backend not in ("torch", "onnx"):
        raise DataError(f"unknown backend {backend!r}; choose torch or onnx")
    if backend == "onnx":
        return _onnx_segmenter(open_run(run) if run is not None else None, method, onnx)
    if run is None:
        raise DataError("the torch backend needs the run folder (--run RUN_DIR)")
    return _torch_segmenter(open_run(run), method, device)


# ------------------------------------------------------------------------------ the files


def find_inputs(path) -> tuple[list[Path], list[Path]]:
    """(images, skipped) for a file or a folder (not recursive; hidden files ignored)."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in RASTER_SUFFIXES and not is_dicom(path):
            raise DataError(f"{path}: unsupported format {path.suffix or '(no extension)'}; expected {SUPPORTED}")
        return [path], []
    if not path.is_dir():
        raise DataError(f"input not found: {path}")
    images, skipped = [], []
    for p in sorted(q for q in path.iterdir() if q.is_file() and not q.name.startswith(".")):
        (images if p.suffix.lower() in RASTER_SUFFIXES or is_dicom(p) else skipped).append(p)
    if not images:
        extra = f" (skipped {len(skipped)} other files, e.g. {skipped[0].name})" if skipped else ""
        raise DataError(f"{path}: no images in this folder{extra}; expected {SUPPORTED}")
    return images, skipped


def output_paths(images: Sequence[Path], out) -> list[tuple[Path, Path]]:
    """(mask, overlay) paths per image: ``out/masks/<name>.png``, ``out/overlays/<name>.png``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder")
    seen: dict[str, Path] = {}
    pairs = []
    for p in images:
        if p.stem in seen:
            raise DataError(f"{seen[p.stem]} and {p} would both write masks/{p.stem}.png: rename one of them")
        seen[p.stem] = p
        pairs.append((out / "masks" / f"{p.stem}.png", out / "overlays" / f"{p.stem}.png"))
    return pairs


def refuse_overwrite(pairs: Sequence[tuple[Path, Path]]) -> None:
    existing = [p for pair in pairs for p in pair if p.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more outputs)" if len(existing) > 1 else ""
        raise FileExistsError(f"{existing[0]} already exists{more}; pass --overwrite (overwrite=True) to replace")


# ----------------------------------------------------------------------------- predicting


@dataclass
class PredictionReport:
    """What a call of :func:`predict_files` wrote and what failed (``failures``: (file, message))."""

    model: str
    written: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def describe(self) -> str:
        lines = [f"{self.model}: wrote {len(self.written)} mask(s) and overlay(s)"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s) that are not {SUPPORTED}: "
                         + ", ".join(p.name for p in self.skipped[:10]))
        if self.failures:
            lines.append(f"{len(self.failures)} file(s) failed:")
            lines += [f"  {path}: {message}" for path, message in self.failures]
        return "\n".join(lines)


def write_outputs(pairs: Sequence[tuple[Path, np.ndarray]]) -> None:
    """Write each (path, uint8 array) as a PNG atomically; if one cannot be written, those written before it are
    removed again and a :class:`DataError` names the file and the reason."""
    done = []
    for path, arr in pairs:
        try:
            atomic_write(path, lambda tmp: write_png(tmp, arr))
        except OSError as e:
            for p in done:
                p.unlink(missing_ok=True)
            raise DataError(f"cannot write {path}: {e.strerror or e}") from None
        done.append(path)


def predict_image(segmenter: Segmenter, path: Path, mask_path: Path, overlay_path: Path,
                  max_pixels: int = MAX_PIXELS) -> dict:
    """Read one file, predict, write its mask (original size) and overlay; returns a record."""
    gray, note = to_gray_uint8(path, max_pixels)
    labels = segmenter(gray)
    write_outputs([(mask_path, labels), (overlay_path, overlay_uint8(gray, labels))])
    return {"input": path, "mask": mask_path, "overlay": overlay_path, "height": gray.shape[0],
            "width": gray.shape[1], "note": note}


def predict_files(run, method: str = "ts_kd", inputs=".", out="predictions", overwrite: bool = False,
                  backend: str = "torch", onnx=None, device: Optional[str] = None,
                  progress: bool = True, max_pixels: int = MAX_PIXELS) -> PredictionReport:
    """Masks and overlays for an image file or a folder of images (see the module docstring).

    Everything that can be checked before predicting is checked first (run folder, inputs, output
    names, existing outputs, that ``out`` can be written), so a refusal leaves nothing behind. A single
    bad file raises :class:`DataError`; in a folder, files that cannot be read, predicted or written
    (more than ``max_pixels`` pixels, a full disk, a folder where a PNG goes) are collected in
    ``report.failures`` and the rest go on.
    """
    from tqdm.auto import tqdm

    run = open_run(run) if run is not None else None
    images, skipped = find_inputs(inputs)
    pairs = output_paths(images, out)
    check_writable_dir(out, "--out")
    if not overwrite:
        refuse_overwrite(pairs)
    segmenter = load_segmenter(run, method, backend, onnx, device)
    report = PredictionReport(segmenter.name, skipped=skipped)
    single = Path(inputs).is_file()
    bar = tqdm(list(zip(images, pairs)), desc=f"{method}: predicting", unit="img", dynamic_ncols=True,
               disable=not progress or single)
    for path, (mask_path, overlay_path) in bar:
        try:
            record = predict_image(segmenter, path, mask_path, overlay_path, max_pixels)
        except (DataError, OSError) as e:
            if single:
                raise
            report.failures.append((path, str(e)))
            continue
        report.written.append(record)
        if record["note"]:
            report.notes.append(record["note"])
            tqdm.write(f"note: {record['note']}")
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line; exit status 0 = all written, 1 = some files failed, 2 = refused before starting."""
    ap = argparse.ArgumentParser(prog="python -m tskd_utils.predict",
                                 description="Segment new images with a trained student (or the teacher) of a run.")
    ap.add_argument("--run", type=Path, help="run folder (required for --backend torch)")
    ap.add_argument("--method", default="ts_kd", help="student method id, or 'teacher' (default ts_kd)")
    ap.add_argument("--input", type=Path, required=True, help=f"an image or a folder of images: {SUPPORTED}")
    ap.add_argument("--out", type=Path, required=True, help="output folder (masks/ and overlays/)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    ap.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                    help="torch: the run's weights (default); onnx: an exported model.onnx, no run folder needed")
    ap.add_argument("--onnx", type=Path, help="the exported model.onnx (with --backend onnx)")
    ap.add_argument("--device", default=None, help="torch device (default: the run's)")
    ap.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                    help=f"refuse images with more pixels than this, per file (default {MAX_PIXELS:,}; memory is "
                         f"about 4 K + 6 bytes per pixel for K classes)")
    args = ap.parse_args(argv)
    if args.run is None and args.backend == "torch":
        ap.error("--run is required with --backend torch")
    try:
        report = predict_files(args.run, args.method, args.input, args.out, args.overwrite, args.backend,
                               args.onnx, args.device, max_pixels=args.max_pixels)
    except (DataError, OSError, NonFiniteModel) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.describe(), file=sys.stderr if report.failures else sys.stdout)
    print(f"masks: {Path(args.out) / 'masks'}  overlays: {Path(args.out) / 'overlays'}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
