"""Metrics against hand-computed cases, including empty masks and a one-pixel object."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tskd_utils.metrics import case_metrics, dice_per_class


def test_hand_computed_overlap():
    gt = np.zeros((10, 10), np.uint8)
    gt[2:6, 2:6] = 1  # 16 px
    pred = np.zeros((10, 10), np.uint8)
    pred[2:6, 4:8] = 1  # 16 px, 8 overlapping
    m = case_metrics(pred, gt, 2)
    assert m["dice"][0] == pytest.approx(2 * 8 / 32)
    assert m["iou"][0] == pytest.approx(8 / 24)
    assert m["hd95"][0] == pytest.approx(2.0)  # the farthest boundary points are two columns apart


def test_one_pixel_object():
    gt = np.zeros((9, 9), np.uint8)
    gt[4, 4] = 1
    hit = case_metrics(gt.copy(), gt, 2)
    assert hit["dice"][0] == 1 and hit["iou"][0] == 1 and hit["hd95"][0] == 0
    off = np.zeros_like(gt)
    off[4, 7] = 1
    miss = case_metrics(off, gt, 2)
    assert miss["dice"][0] == 0 and miss["hd95"][0] == pytest.approx(3.0)


def test_empty_masks_rule():
    empty = np.zeros((8, 8), np.uint8)
    both = case_metrics(empty, empty, 2)
    assert both["dice"] == [1.0] and both["iou"] == [1.0] and both["hd95"] == [0.0]
    some = empty.copy()
    some[1:3, 1:3] = 1
    fp = case_metrics(some, empty, 2)  # a false positive on an empty ground truth
    fn = case_metrics(empty, some, 2)  # a missed object
    for m in (fp, fn):
        assert m["dice"] == [0.0] and m["iou"] == [0.0] and math.isnan(m["hd95"][0])


def test_spacing_scales_hd95_and_classes_are_separate():
    gt = np.zeros((12, 12), np.uint8)
    gt[2:5, 2:5], gt[7:10, 7:10] = 1, 2
    pred = gt.copy()
    pred[7:10, 7:10] = 0
    m = case_metrics(pred, gt, 3, spacing=0.5)
    assert m["dice"] == [1.0, 0.0] and m["hd95"][0] == 0.0 and math.isnan(m["hd95"][1])
    shifted = np.roll(gt, 2, axis=1)
    assert case_metrics(shifted, gt, 3, spacing=0.5)["hd95"][0] == pytest.approx(1.0)


def test_fast_dice_agrees_with_monai():
    from monai.metrics import DiceMetric

    rng = np.random.default_rng(0)
    pred = torch.from_numpy(rng.integers(0, 3, (4, 16, 16)))
    target = torch.from_numpy(rng.integers(0, 3, (4, 16, 16)))
    target[0] = 0  # an empty ground truth
    pred[0] = 0
    oh = lambda t: torch.nn.functional.one_hot(t, 3).permute(0, 3, 1, 2).float()  # noqa: E731
    ref = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(oh(pred), oh(target))
    assert torch.allclose(dice_per_class(pred, target, 3), ref)
