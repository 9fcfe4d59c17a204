"""Loading, letterboxing, augmenting and splitting datasets in the common format.

Geometry convention (the same for every model, so that their outputs line up):
the longest side of an image is resized to ``size`` and the result is zero-padded at the
bottom/right to ``size x size`` (as SAM and MedSAM do). A teacher at 256 px and a student at
128 px therefore see the same frame at two scales, and a prediction is mapped back to the
original image by cropping the padding and resizing (:func:`unletterbox`).

Every resize is centre-aligned (pixel centres map onto pixel centres), for images and label maps
alike, so a mask never shifts against its image (:func:`resize_labels`): images use OpenCV's
``INTER_AREA`` (as MedSAM's preprocessing does, enlarging too); label maps use *exact* nearest neighbour when enlarged
(OpenCV ``INTER_NEAREST_EXACT``) and class-wise area averaging when shrunk. Plain nearest
neighbour samples at ``floor(x * scale)`` and shifts a mask by up to half a pixel; even exact
nearest neighbour shifts it by a quarter pixel at a factor of 2 (no source pixel centre lies on a
target pixel centre), which area averaging does not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .io import DataError, DatasetInfo, image_size, load_case, read_image, read_mask

# ---------------------------------------------------------------------------- letterbox geometry


@dataclass(frozen=True)
class Letterbox:
    """Where an (h, w) image sits inside the ``size x size`` square."""

    h: int
    w: int
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.h, self.w)

    @property
    def inner(self) -> tuple[int, int]:
        """(rows, cols) of the resized image inside the square (rounded half up, as SAM and MedSAM do)."""
        return (max(1, int(self.h * self.scale + 0.5)), max(1, int(self.w * self.scale + 0.5)))


def letterbox(arr: np.ndarray, size: int, is_mask: bool = False) -> np.ndarray:
    """Resize the longest side to ``size`` (aspect kept) and zero-pad bottom/right to a square."""
    box = Letterbox(arr.shape[0], arr.shape[1], size)
    rows, cols = box.inner
    if (rows, cols) != arr.shape[:2]:
        if is_mask:
            arr = resize_labels(arr, (rows, cols))
        else:
            arr = cv2.resize(arr, (cols, rows), interpolation=cv2.INTER_AREA)  # as MedSAM, up and down
    out = np.zeros((size, size) + arr.shape[2:], dtype=arr.dtype)
    out[:rows, :cols] = arr
    return out


def resize_labels(labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 label map to ``hw`` = (rows, cols) without shifting it against its image.

    Enlarging: exact (centre-aligned) nearest neighbour. Shrinking: each class's indicator is area
    averaged like the image's pixels and the largest fraction wins; a tie (frequent at integer
    factors) goes to the class with more of a Gaussian-weighted neighbourhood, which is symmetric
    and so does not move the boundary either.
    """
    rows, cols = int(hw[0]), int(hw[1])
    if rows >= labels.shape[0] and cols >= labels.shape[1]:
        return cv2.resize(labels, (cols, rows), interpolation=cv2.INTER_NEAREST_EXACT)
    sigma = max(labels.shape[0] / rows, labels.shape[1] / cols)
    fractions = []
    for k in np.unique(labels):
        indicator = (labels == k).astype(np.float32)
        tie_break = 1e-3 * cv2.GaussianBlur(indicator, (0, 0), sigma)
        fractions.append(cv2.resize(indicator + tie_break, (cols, rows), interpolation=cv2.INTER_AREA))
    classes = np.unique(labels).astype(labels.dtype)
    return classes[np.stack(fractions).argmax(0)]


def letterbox_valid(shape: tuple, size: int) -> tuple[int, int]:
    """(rows, cols) of the image part of a letterboxed ``size x size`` frame for an image of ``shape``."""
    return Letterbox(int(shape[0]), int(shape[1]), size).inner


BLOCK_PIXELS = 1 << 20  # float64 / int64 temporaries are made for blocks of rows of about this many pixels


def by_rows(fn: Callable[..., np.ndarray], *arrays: np.ndarray, dtype=np.uint8) -> np.ndarray:
    """``fn(*arrays)`` as ``dtype``, computed on blocks of their rows (about BLOCK_PIXELS values each): the same
    result for a ``fn`` that works row by row, without its float64 / int64 temporaries at the full image size."""
    out, step = None, max(1, BLOCK_PIXELS // max(1, arrays[0][:1].size))
    for r in range(0, len(arrays[0]), step):
        block = fn(*(a[r:r + step] for a in arrays))
        if out is None:
            out = np.empty((len(arrays[0]),) + block.shape[1:], dtype)
        out[r:r + step] = block
    return out


def unletterbox(arr: np.ndarray | torch.Tensor, original_hw: tuple[int, int], is_mask: bool = False):
    """Map a square letterboxed map back to the original image size.

    ``arr`` is (size, size) for a label map, or (C, size, size) for probabilities / logits
    (resized bilinearly; take the argmax afterwards).
    """
    t = torch.as_tensor(arr)
    size = t.shape[-1]
    rows, cols = Letterbox(original_hw[0], original_hw[1], size).inner
    t = t[..., :rows, :cols]
    if is_mask or t.ndim == 2:
        out = resize_labels(np.ascontiguousarray(t.numpy().astype(np.uint8)), tuple(original_hw))
        return torch.from_numpy(out).to(torch.as_tensor(arr).dtype)
    out = torch.nn.functional.interpolate(t[None].float(), size=tuple(original_hw), mode="bilinear",
                                          align_corners=False)[0]
    return out


# ------------------------------------------------------------------------------- augmentation


def build_transform(train: bool, seed: Optional[int] = None):
    """Albumentations pipeline applied to an already letterboxed uint8 image (+ mask).

    Train: horizontal flip, mild affine (scale, shift, rotation; zero fill), brightness/contrast,
    gamma and a little blur or noise. These are safe for ultrasound, CT and MR slices: no vertical
    flip (ultrasound depth and anatomy have a direction), no colour transforms.
    Eval: nothing (letterboxing is done when the case is loaded).
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI for a newer release on import
    import albumentations as A

    if not train:
        return None
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(scale=(0.85, 1.15), translate_percent=(-0.06, 0.06), rotate=(-15, 15),
                     border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.7),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.RandomGamma(gamma_limit=(80, 125), p=0.3),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(std_range=(0.02, 0.06))], p=0.2),
        ],
        seed=seed,
    )


# --------------------------------------------------------------------------------- datasets


class _Epoched:
    """Mixin: reseed the augmentation pipeline at every epoch (deterministic resume)."""

    transform = None
    seed = 0

    def set_epoch(self, epoch: int) -> None:
        if self.transform is not None:
            self.transform.set_random_seed(self.seed * 100_003 + epoch)


class SegmentationDataset(_Epoched, Dataset):
    """Image + mask pairs of some cases, letterboxed to ``size`` and held in memory.

    Items: ``{"image": float32 (1, S, S) in [0, 1], "mask": int64 (S, S), "valid": int64 (2,), "index": int,
    "case": str}``.
    Every case is read and checked when the dataset is built, so a bad file fails early with
    its name in the error.
    """

    def __init__(self, info: DatasetInfo, cases: Sequence[str], size: int, train: bool = False,
                 augment: bool = True, seed: int = 0):
        self.info, self.cases, self.size, self.seed = info, list(cases), size, seed
        self.images, self.masks, self.original_hw, self.valid = [], [], [], []
        for name in self.cases:
            image, mask = load_case(info, info.case(name))
            self.original_hw.append(image.shape)
            self.valid.append(letterbox_valid(image.shape, size))
            self.images.append(letterbox(image, size))
            self.masks.append(letterbox(mask, size, is_mask=True))
        self.transform = build_transform(train and augment, seed)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict:
        image, mask = self.images[i], self.masks[i]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)).float().div_(255.0)[None],
            "mask": torch.from_numpy(np.ascontiguousarray(mask)).long(),
            "valid": torch.tensor(self.valid[i]),  # (rows, cols) of the image inside the padding
            "index": i,
            "case": self.cases[i],
        }


class ImageDataset(_Epoched, Dataset):
    """Images only (the transfer set: real train images and synthetic ones), letterboxed, in memory."""

    def __init__(self, paths: Sequence[Path], size: int, names: Optional[Sequence[str]] = None,
                 transform=None, seed: int = 0):
        self.paths = [Path(p) for p in paths]
        self.names = list(names) if names is not None else [p.stem for p in self.paths]
        self.size, self.seed, self.transform = size, seed, transform
        self.images = [letterbox(read_image(p), size) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        image = self.images[i]
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return {"image": torch.from_numpy(np.ascontiguousarray(image)).float().div_(255.0)[None],
                "index": i, "case": self.names[i]}


def loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0, drop_last: bool = False,
           steps: int = 0):
    """A DataLoader whose shuffling follows the global torch seed (set per epoch by the trainer).

    ``steps > 0`` makes an epoch exactly ``steps`` batches drawn from repeated random permutations
    (nnU-Net-style fixed-length epochs), so a handful of labeled cases still gets enough updates.
    """
    sampler = None
    if steps and shuffle:
        sampler = torch.utils.data.RandomSampler(dataset, replacement=False, num_samples=steps * batch_size)
        shuffle, drop_last = False, True
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=num_workers,
        drop_last=drop_last, persistent_workers=False,
        worker_init_fn=_worker_init if num_workers else None,
    )


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    ds = info.dataset
    if getattr(ds, "transform", None) is not None:
        ds.transform.set_random_seed(int(info.seed % (2 ** 31)))


# ---------------------------------------------------------------------------------- splits


def _subject_split(info: DatasetInfo, by_subject: dict, split_seed: int, val_fraction: float,
                   test_fraction: float) -> tuple[list, list, list]:
    """(test, val, train) subjects: a seeded permutation of the subjects, cut where the test and then the validation
    subjects hold their fraction of the cases (at least one subject each)."""
    subjects = sorted(by_subject)
    if len(subjects) < 3:
        raise DataError(f"dataset {info.root} has {len(subjects)} subject(s); at least 3 are needed to split "
                        f"into train, val and test")
    order = [subjects[i] for i in np.random.default_rng(split_seed).permutation(len(subjects))]
    n_cases = len(info.cases)

    def take(pool: list[str], fraction: float) -> list[str]:
        chosen, count = [], 0
        while pool and (count < fraction * n_cases or not chosen):
            s = pool.pop(0)
            chosen.append(s)
            count += len(by_subject[s])
        return chosen

    test_s = take(order, test_fraction)
    val_s = take(order, val_fraction)
    if not order:
        raise DataError(f"dataset {info.root}: no subjects left for training after val/test")
    return test_s, val_s, order


def make_splits(info: DatasetInfo, n_labeled: int, seed: int, val_fraction: float = 0.15,
                test_fraction: float = 0.2, split_seed: int = 0, max_train: Optional[int] = None,
                max_val: Optional[int] = None, max_test: Optional[int] = None) -> dict:
    """Split by subject into train / val / test, then draw ``n_labeled`` cases from train.

    * Subjects (not cases) are assigned to splits, so frames of one subject never cross splits.
    * The train/val/test split depends only on ``split_seed`` (fixed per dataset by default), so
      every seed and every ``n_labeled`` of a sweep is tested on the same cases; the labeled draw
      depends on ``seed``, and for one seed a smaller labeled set is a subset of a larger one.
    * Caps (``max_*``) keep CPU profiles affordable; they drop whole subjects where possible.
    * numpy's PCG64 generator is used, so the same seeds give the same split on any machine.
    """
    if n_labeled is None or int(n_labeled) < 1:
        raise DataError(f"n_labeled must be a positive integer, got {n_labeled!r}")
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < frac < 1:
            raise DataError(f"{name} must be in (0, 1), got {frac}")
    by_subject: dict[str, list[str]] = {}
    for c in info.cases:
        by_subject.setdefault(c.subject, []).append(c.case)
    test_s, val_s, train_s = _subject_split(info, by_subject, split_seed, val_fraction, test_fraction)

    def cases_of(subj: list[str], cap: Optional[int]) -> list[str]:
        out = [case for s in subj for case in sorted(by_subject[s])]
        return out[:cap] if cap else out

    split = {
        "train": sorted(cases_of(train_s, max_train)),
        "val": sorted(cases_of(val_s, max_val)),
        "test": sorted(cases_of(test_s, max_test)),
    }
    if int(n_labeled) > len(split["train"]):
        raise DataError(f"n_labeled={n_labeled} is larger than the train pool of dataset {info.name!r} "
                        f"({len(split['train'])} cases after the split); choose at most {len(split['train'])}")
    pool = split["train"]
    perm = np.random.default_rng([seed, 7919]).permutation(len(pool))
    labeled = sorted(pool[i] for i in perm[: int(n_labeled)])
    unlabeled = sorted(set(pool) - set(labeled))
    subject_of = {c.case: c.subject for c in info.cases}
    return {
        "dataset": info.name,
        "seed": int(seed),
        "split_seed": int(split_seed),
        "n_labeled": int(n_labeled),
        **split,
        "labeled": labeled,
        "unlabeled": unlabeled,
        "counts": {k: len(v) for k, v in {**split, "labeled": labeled, "unlabeled": unlabeled}.items()},
        "subjects": {k: len({subject_of[c] for c in split[k]}) for k in split},
    }


def _class_pixels(info: DatasetInfo, cases: Optional[Sequence[str]] = None):
    """(pixels, pixels per class) of each case's mask (of ``cases``, else all), reading masks only."""
    names = set(cases) if cases is not None else None
    for rec in info.cases:
        if names is None or rec.case in names:
            mask = read_mask(rec.mask, n_classes=info.n_classes)
            yield mask.size, np.bincount(mask.ravel(), minlength=info.n_classes)


def class_balance(info: DatasetInfo, cases: Optional[Sequence[str]] = None) -> dict:
    """Fraction of pixels per class and the fraction of cases in which each class appears."""
    pix = np.zeros(info.n_classes, dtype=np.float64)
    present = np.zeros(info.n_classes, dtype=np.int64)
    n = 0
    for size, counts in _class_pixels(info, cases):
        pix += counts / size
        present += counts > 0
        n += 1
    return {"class": info.classes, "pixel_fraction": (pix / max(n, 1)).tolist(),
            "cases_with_class": (present / max(n, 1)).tolist()}


def check_classes_present(info: DatasetInfo, cases: Sequence[str]) -> None:
    """Refuse a class of dataset.json that no mask of ``cases`` contains: every case would score its Dice as 1
    (empty prediction against empty mask) and lift every method's mean alike."""
    total = sum((counts for _, counts in _class_pixels(info, cases)), np.zeros(info.n_classes, dtype=np.int64))
    missing = [f"{name!r} (mask value {k})" for k, name in enumerate(info.classes) if not total[k]]
    if missing:
        raise DataError(f"{info.root / 'dataset.json'} declares class(es) {', '.join(missing)} that no mask of this "
                        f"run's {len(cases)} train, val and test cases contains (their Dice would be 1 on every case); "
                        f"remove them from 'classes' in dataset.json (renumbering the masks if one is not the last), "
                        f"or add labelled cases that contain them")


def dataset_summary(info: DatasetInfo) -> dict:
    """Counts and image sizes of a dataset (reads image headers only)."""
    from collections import Counter

    sizes = Counter(image_size(rec.image) for rec in info.cases)
    per_subject = Counter(c.subject for c in info.cases)
    frames = sorted(per_subject.values())
    return {
        "dataset": info.name, "modality": info.meta.get("modality"), "classes": info.classes,
        "cases": len(info.cases), "subjects": len(per_subject),
        "cases_per_subject": {"min": frames[0], "median": frames[len(frames) // 2], "max": frames[-1]},
        "image_sizes_wxh": {f"{w}x{h}": n for (w, h), n in sizes.most_common(5)},
        "distinct_sizes": len(sizes),
        "spacing_mm": "yes" if all(c.spacing_mm is not None for c in info.cases) else "no",
        "license": info.meta.get("license"),
    }


def split_table(splits: dict) -> list[dict]:
    rows = []
    for key in ("train", "labeled", "unlabeled", "val", "test"):
        rows.append({"split": key, "cases": splits["counts"][key],
                     "subjects": splits["subjects"].get(key, "") if key in splits["subjects"] else ""})
    return rows
