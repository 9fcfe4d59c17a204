"""CHAOS challenge training set -> the common format (folders ``chaos_ct`` and ``chaos_mr``).

Source: Kavur et al., "CHAOS Challenge - combined (CT-MR) healthy abdominal organ segmentation",
Medical Image Analysis 69 (2021) 101950; data doi:10.5281/zenodo.3431873 (``CHAOS_Train_Sets.zip``,
v1.03). Licence: CC BY-NC-SA 4.0 as stated in the challenge rules (chaos.grand-challenge.org/Rules)
- non-commercial use only, share alike, cite the data DOI and the paper.

Raw layout (as published; ``python data_scripts/download_chaos.py --out RAW`` produces it)::

    RAW/[CHAOS_Train_Sets/]Train_Sets/CT/<id>/DICOM_anon/*.dcm          (i0000,0000b.dcm, ...)
    RAW/[CHAOS_Train_Sets/]Train_Sets/CT/<id>/Ground/*.png              (liver_GT_000.png, ...)
    RAW/[CHAOS_Train_Sets/]Train_Sets/MR/<id>/T2SPIR/DICOM_anon/*.dcm   (IMG-0002-00001.dcm, ...)
    RAW/[CHAOS_Train_Sets/]Train_Sets/MR/<id>/T2SPIR/Ground/*.png       (IMG-0002-00001.png, ...)

``--raw`` may point at the folder holding ``Train_Sets``, at ``Train_Sets`` itself, or at the
folder holding ``CHAOS_Train_Sets/Train_Sets``. Only T2-SPIR is converted for MR (T1-DUAL is not).

Cases and subjects: every axial slice becomes a case ``<mod>_<id>_<slice:03d>`` (slice = position
in the patient's sorted series, from 0) and the patient is its subject (``<mod>_<id>``), so grouped
splits never put slices of one patient on both sides. ``--skip-empty`` drops slices whose mask is
empty (off by default: the prepared dataset holds every slice).

Slice/mask pairing (what we verified, and how sure we are):

* The organisers' evaluation code (github.com/emrekavur/CHAOS-evaluation, ``CHAOSmetrics.py``)
  reads the Ground PNGs in sorted file-name order as the reference volume and states: "In CHAOS
  challenge the orientation of the slices is determined by order of image names NOT by position
  tags in DICOM files". We therefore pair by file-name order by default: DICOMs and Ground PNGs are
  each sorted by the numbers in their names (``i0000,0000b.dcm`` <-> ``liver_GT_000.png``). Where
  every Ground PNG has the same stem as a DICOM (MR: ``IMG-0002-00001.png`` <->
  ``IMG-0002-00001.dcm``) the pairing is by stem. ``--slice-order instance|position`` sorts the
  DICOMs by InstanceNumber or ImagePositionPatient z instead (not the organisers' convention).
  The counts must match, else a DataError names the patient folder.
* No in-plane flip: the PNGs overlay ``pydicom``'s ``pixel_array`` row for row. Public converters
  that read the DICOM pixels directly (torch-em, the CHAOS MR/CT converters by J. Teuwen and
  S. Chatterjee) use the PNGs unflipped; the one flip we found (in an MR pipeline) compensates for a
  DICOM->NIfTI conversion, not for the PNGs. We could not open the data here, so this rests on those
  sources: high confidence for the order (organisers' own code), good but indirect confidence for
  "no flip". Look at a few overlays (notebook 01) after converting.

Intensities:

* CT: Hounsfield units from RescaleSlope/RescaleIntercept, abdominal window level 40 HU / width
  400 HU ([-160, 240] HU -> 0..255, clipped) -> uint8.
* MR (T2-SPIR): per patient volume, the 0.5th and 99.5th percentiles of all its voxels map to
  0 and 255 (clipped) -> uint8.
* ``spacing_mm``: DICOM PixelSpacing (the mean of row and column spacing; they are equal in CHAOS).

Labels (Ground PNGs): CT 0 / 255 -> background / liver. MR 63 liver, 126 right kidney, 189 left
kidney, 252 spleen. A value within +-LABEL_TOLERANCE of a class value maps to that class (0..5 is
background); any other value raises a DataError naming the file and the values, since it means a
file that is not a CHAOS ground truth (or a resampled one). A CT mask stored as 0/1 (e.g. a 1-bit
PNG) is read as background/liver; for MR, 0/1 is ambiguous and refused. A mask that looks inverted
(foreground over most of the slice or of its borders) is refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from ..io import DataError, DatasetWriter, check_plausible_mask, mask_values, read_label_array, safe_join

DESCRIPTION = ("CHAOS challenge training set (Zenodo 3431873): CT liver or MR T2-SPIR liver/kidneys/spleen, "
               "every DICOM slice a case, grouped by patient")

CITATION = ("Kavur AE, Gezer NS, Baris M, et al. CHAOS Challenge - combined (CT-MR) healthy abdominal organ "
            "segmentation. Medical Image Analysis 69 (2021) 101950. doi:10.1016/j.media.2020.101950. "
            "Data: Kavur AE, Selver MA, Dicle O, Baris M, Gezer NS. CHAOS - Combined (CT-MR) Healthy Abdominal "
            "Organ Segmentation Challenge Data (v1.03), Zenodo, 2019. doi:10.5281/zenodo.3431873")
LICENSE = "CC BY-NC-SA 4.0 (non-commercial; chaos.grand-challenge.org/Rules)"
SOURCE = "https://doi.org/10.5281/zenodo.3431873"

CT_WINDOW_LEVEL, CT_WINDOW_WIDTH = 40.0, 400.0  # HU: the usual abdominal soft-tissue window
MR_PERCENTILES = (0.5, 99.5)
LABEL_TOLERANCE = 5  # grey levels around each published label value

MODALITIES = {
    "ct": {
        "folder": "CT",
        "series": ("DICOM_anon",),
        "ground": ("Ground",),
        "classes": ["background", "liver"],
        "values": [0, 255],
        "modality": "CT (abdomen, portal venous phase)",
    },
    "mr": {
        "folder": "MR",
        "series": ("T2SPIR", "DICOM_anon"),
        "ground": ("T2SPIR", "Ground"),
        "classes": ["background", "liver", "right kidney", "left kidney", "spleen"],
        "values": [0, 63, 126, 189, 252],
        "modality": "MR (T2-SPIR, abdomen)",
    },
}
SLICE_ORDERS = ("name", "instance", "position")


def add_arguments(parser) -> None:
    parser.add_argument("--modality", choices=sorted(MODALITIES), default="ct",
                        help="ct: liver on CT (chaos_ct); mr: liver, kidneys, spleen on T2-SPIR MR (chaos_mr)")
    parser.add_argument("--skip-empty", action="store_true",
                        help="drop slices whose mask is empty (kept by default)")
    parser.add_argument("--slice-order", choices=SLICE_ORDERS, default="name",
                        help="how DICOM slices are ordered before pairing with the Ground PNGs; 'name' is "
                             "the organisers' convention")


# ------------------------------------------------------------------------------------- finding
def natural_key(name: str) -> list:
    """Sort key that orders the numbers inside a file name numerically (``a2`` before ``a10``)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def find_modality_root(raw: Optional[Path], modality: str) -> Path:
    if raw is None:
        raise DataError("CHAOS needs --raw: the folder holding Train_Sets (from CHAOS_Train_Sets.zip)")
    raw = Path(raw)
    if not raw.is_dir():
        raise DataError(f"raw folder not found: {raw}")
    folder = MODALITIES[modality]["folder"]
    candidates = [raw / "Train_Sets" / folder, raw / folder, raw / "CHAOS_Train_Sets" / "Train_Sets" / folder]
    if raw.name.upper() == folder:
        candidates.insert(0, raw)
    for c in candidates:
        if c.is_dir():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise DataError(f"{raw}: no CHAOS {folder} training data found (looked for {tried}). Point --raw at the "
                    f"folder holding Train_Sets, as unpacked from CHAOS_Train_Sets.zip")


def list_patients(root: Path) -> list:
    patients = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not patients:
        raise DataError(f"{root}: no patient folders (numbered sub-folders such as 1, 2, 5, ...)")
    return patients


def _files(folder: Path, suffix: str, what: str) -> list:
    if not folder.is_dir():
        raise DataError(f"{what} folder missing: {folder}")
    files = [p for p in folder.iterdir()  # hidden files (e.g. macOS "._" forks) are not slices
             if p.is_file() and p.suffix.lower() == suffix and not p.name.startswith(".")]
    if not files:
        raise DataError(f"{folder}: no {suffix} files ({what})")
    return files


# ---------------------------------------------------------------------------------- reading
def _read_dicom(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            # No preamble/file meta (some anonymisers drop it): read the bare data set, which then
            # uses the DICOM default transfer syntax, implicit VR little endian.
            ds = pydicom.dcmread(path, force=True)
            if "PixelData" not in ds:
                raise
            if not getattr(ds.file_meta, "TransferSyntaxUID", None):
                ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    except Exception as e:  # InvalidDicomError, truncated files, ...
        raise DataError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e})") from None
    try:
        arr = ds.pixel_array
    except Exception as e:
        raise DataError(f"{path}: cannot decode the pixel data ({type(e).__name__}: {e}); if it is compressed, "
                        f"install a pydicom pixel handler (pip install pylibjpeg pylibjpeg-libjpeg)") from None
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise DataError(f"{path}: expected one 2-D grayscale slice, got pixel data of shape {arr.shape}")
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    spacing = getattr(ds, "PixelSpacing", None)
    try:
        spacing = float(np.mean([float(v) for v in spacing])) if spacing else None
    except (TypeError, ValueError):
        raise DataError(f"{path}: PixelSpacing {spacing!r} is not numeric") from None
    instance = getattr(ds, "InstanceNumber", None)
    position = getattr(ds, "ImagePositionPatient", None)
    return {
        "path": path,
        "values": arr.astype(np.float32) * np.float32(slope) + np.float32(intercept),
        "spacing": spacing,
        "instance": int(instance) if instance not in (None, "") else None,
        "z": float(position[2]) if position is not None and len(position) == 3 else None,
    }


def _order_slices(slices: list, order: str, patient: Path) -> list:
    if order == "name":
        return sorted(slices, key=lambda s: natural_key(s["path"].name))
    field = "instance" if order == "instance" else "z"
    tag = "InstanceNumber" if order == "instance" else "ImagePositionPatient"
    missing = [s["path"] for s in slices if s[field] is None]
    if missing:
        raise DataError(f"{missing[0]}: no {tag}, needed for --slice-order {order} (patient folder {patient})")
    return sorted(slices, key=lambda s: (s[field], natural_key(s["path"].name)))


def read_ground(path: Path, shape: tuple) -> np.ndarray:
    """A Ground PNG as an integer array (no casting, so stray 16-bit values stay visible)."""
    arr = read_label_array(path, what="Ground PNG")
    if tuple(arr.shape) != tuple(shape):
        raise DataError(f"{path}: mask size {arr.shape[1]}x{arr.shape[0]} (WxH) differs from its DICOM slice's "
                        f"{shape[1]}x{shape[0]}")
    return arr.astype(np.int64)


def map_labels(arr: np.ndarray, values: list, path: Path) -> np.ndarray:
    """Published grey values (+-LABEL_TOLERANCE) -> class indices; anything else is a DataError."""
    if set(mask_values(arr)) == {0, 1}:  # a binary mask (e.g. a 1-bit PNG): 1 is not "0 +- tolerance"
        if len(values) == 2:
            return np.asarray(arr).astype(np.uint8)
        raise DataError(f"{path}: mask values 0/1 form a binary mask, but this CHAOS ground truth has "
                        f"{len(values) - 1} organs ({', '.join(map(str, values[1:]))}); which organ is 1?")
    arr = np.asarray(arr).astype(np.int64)
    out = np.zeros(arr.shape, np.uint8)
    known = np.zeros(arr.shape, bool)
    for index, value in enumerate(values):
        hit = np.abs(arr - value) <= LABEL_TOLERANCE
        out[hit] = index
        known |= hit
    if not known.all():
        bad = np.unique(arr[~known])[:10].tolist()
        allowed = ", ".join(f"{v}" for v in values)
        raise DataError(f"{path}: mask values {bad} are not CHAOS label values ({allowed}, "
                        f"+-{LABEL_TOLERANCE})")
    return out


def window_ct(hu: np.ndarray, level: float = CT_WINDOW_LEVEL, width: float = CT_WINDOW_WIDTH) -> np.ndarray:
    lo = level - width / 2.0
    scaled = (np.asarray(hu, np.float64) - lo) / width * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def normalise_mr(volume: list, percentiles=MR_PERCENTILES) -> list:
    """Map the volume's low/high percentiles to 0/255 (clipped); returns uint8 slices."""
    lo, hi = np.percentile(np.stack(volume), percentiles)
    if hi <= lo:
        return [np.zeros(v.shape, np.uint8) for v in volume]
    return [np.clip(np.round((v - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8) for v in volume]


def _pair(patient: Path, dicoms: list, pngs: list, series_dir: Path, ground_dir: Path, order: str) -> list:
    if len(dicoms) != len(pngs):
        raise DataError(f"patient folder {patient}: {len(dicoms)} DICOM slices in {series_dir} but {len(pngs)} "
                        f"Ground PNGs in {ground_dir}; cannot pair slices with masks")
    slices = _order_slices([_read_dicom(p) for p in dicoms], order, patient)
    png_by_stem = {p.stem: p for p in pngs}
    if set(png_by_stem) == {s["path"].stem for s in slices}:  # MR: Ground PNGs named after their DICOMs
        masks = [png_by_stem[s["path"].stem] for s in slices]
    else:  # CT: i0000,0000b.dcm <-> liver_GT_000.png, by order
        masks = sorted(pngs, key=lambda p: natural_key(p.name))
    return list(zip(slices, masks))


# -------------------------------------------------------------------------------- conversion
def prepare(raw, out, overwrite: bool = False, modality: str = "ct", skip_empty: bool = False,
            slice_order: str = "name") -> Path:
    """Convert the CHAOS training set (one modality) into ``out/chaos_<modality>``."""
    from tqdm.auto import tqdm

    modality = str(modality).lower()
    if modality not in MODALITIES:
        raise DataError(f"unknown modality {modality!r} for CHAOS; choose one of {sorted(MODALITIES)}")
    if slice_order not in SLICE_ORDERS:
        raise DataError(f"unknown slice order {slice_order!r}; choose one of {list(SLICE_ORDERS)}")
    spec = MODALITIES[modality]
    root = find_modality_root(raw, modality)
    patients = list_patients(root)

    meta = {
        "name": f"chaos_{modality}",
        "modality": spec["modality"],
        "classes": spec["classes"],
        "license": LICENSE,
        "citation": CITATION,
        "source": SOURCE,
        "preprocessing": (
            f"CT: HU window level {CT_WINDOW_LEVEL:g} / width {CT_WINDOW_WIDTH:g} -> 0..255"
            if modality == "ct" else
            f"MR T2-SPIR: per-volume {MR_PERCENTILES[0]}-{MR_PERCENTILES[1]} percentile -> 0..255"
        ) + f"; slices paired with Ground PNGs by {slice_order} order"
            + ("; empty-mask slices dropped" if skip_empty else "; all slices kept"),
    }
    target = safe_join(out, meta["name"])
    with DatasetWriter(target, meta, overwrite=overwrite) as writer:
        for patient in tqdm(patients, desc=f"CHAOS {modality.upper()}", unit="patient"):
            series_dir, ground_dir = patient.joinpath(*spec["series"]), patient.joinpath(*spec["ground"])
            dicoms = _files(series_dir, ".dcm", "DICOM series")
            pngs = _files(ground_dir, ".png", "Ground truth")
            pairs = _pair(patient, dicoms, pngs, series_dir, ground_dir, slice_order)
            if modality == "ct":
                images = [window_ct(s["values"]) for s, _ in pairs]
            else:
                images = normalise_mr([s["values"] for s, _ in pairs])
            subject = f"{modality}_{patient.name}"
            for index, ((s, png), image) in enumerate(zip(pairs, images)):
                mask = map_labels(read_ground(png, image.shape), spec["values"], png)
                check_plausible_mask(mask, png)
                if skip_empty and not mask.any():
                    continue
                writer.add_case(f"{subject}_{index:03d}", subject, image, mask, spacing_mm=s["spacing"],
                                source=f"{s['path']} + {png}")
    return target
