"""Segmentation metrics: Dice, IoU and HD95 per case and per foreground class, via MONAI.

How empty masks are counted (the same rule for every method):

* ground truth and prediction both empty for a class: Dice = IoU = 1, HD95 = 0 (a correct "absent");
* exactly one of them empty: Dice = IoU = 0, HD95 undefined (NaN); it is left out of the HD95
  mean and the number of such cases is reported next to it (``hd95_undefined``).

A case's score is the mean over foreground classes; a method's score is the mean over cases.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(B, H, W) int -> (B, K, H, W) float one-hot."""
    return F.one_hot(labels.long(), n_classes).permute(0, 3, 1, 2).float()


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Fast Dice for validation during training: (B, H, W) labels -> (B, K-1) Dice per foreground class.

    Agrees with MONAI's DiceMetric(include_background=False, ignore_empty=False) (tested).
    """
    p, t = _one_hot(pred, n_classes)[:, 1:], _one_hot(target, n_classes)[:, 1:]
    inter = (p * t).sum(dim=(2, 3))
    denom = p.sum(dim=(2, 3)) + t.sum(dim=(2, 3))
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1e-8), torch.ones_like(denom))


def mean_foreground_dice(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(B,) Dice per case, averaged over foreground classes."""
    return dice_per_class(pred, target, n_classes).mean(dim=1)


def validation_dice(logits_of: Callable[[list], torch.Tensor], masks: torch.Tensor, n_classes: int,
                    batch_size: int) -> float:
    """Mean foreground Dice over validation cases, the score every stage keeps its best epoch by; ``logits_of(indices)``
    predicts a batch of them (consecutive indices, ``batch_size`` at a time)."""
    scores = []
    with torch.inference_mode():
        for i in range(0, len(masks), batch_size):
            idx = list(range(i, min(i + batch_size, len(masks))))
            scores.append(mean_foreground_dice(logits_of(idx).argmax(1).cpu(), masks[idx], n_classes))
    return float(torch.cat(scores).mean())


def case_metrics(pred: np.ndarray, target: np.ndarray, n_classes: int,
                 spacing: Optional[float] = None) -> dict:
    """Dice, IoU and HD95 of one case (label maps at the original image size), per foreground class.

    Uses MONAI's ``compute_dice``, ``compute_iou`` and ``compute_hausdorff_distance`` (percentile 95);
    HD95 is in pixels, or in mm when ``spacing`` (mm per pixel, isotropic) is given.
    """
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

    p = _one_hot(torch.as_tensor(np.asarray(pred))[None], n_classes)
    t = _one_hot(torch.as_tensor(np.asarray(target))[None], n_classes)
    dice = compute_dice(p, t, include_background=False, ignore_empty=False)[0]
    iou = compute_iou(p, t, include_background=False, ignore_empty=False)[0]
    out = {"dice": [], "iou": [], "hd95": []}
    for k in range(1, n_classes):
        pk, tk = p[:, k].sum().item() > 0, t[:, k].sum().item() > 0
        out["dice"].append(float(dice[k - 1]))
        out["iou"].append(float(iou[k - 1]))
        if not pk and not tk:
            out["hd95"].append(0.0)
        elif pk != tk:
            out["hd95"].append(float("nan"))
        else:
            hd = compute_hausdorff_distance(p[:, k:k + 1], t[:, k:k + 1], include_background=True,
                                            percentile=95, spacing=spacing)
            out["hd95"].append(float(hd.reshape(-1)[0]))
    return out


def nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def median_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3, budget_s: float = 8.0,
              min_repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in ms after ``warmup`` calls. Slow calls get fewer repeats (at least
    ``min_repeats``) so that one measurement takes about ``budget_s``."""
    def once() -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000

    first = min(once() for _ in range(max(1, warmup)))
    repeats = max(min_repeats, min(repeats, int(budget_s * 1000 / max(first, 1e-3))))
    return float(np.median([once() for _ in range(repeats)]))
