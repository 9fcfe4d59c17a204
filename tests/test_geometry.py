"""Geometry: letterboxing keeps images and label maps aligned; the teachers' input conventions."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from tskd_utils.data import letterbox, letterbox_valid, resize_labels, unletterbox


def _disk(h: int, w: int, cy: float, cx: float, r: float) -> tuple[np.ndarray, np.ndarray]:
    """A bright disk: the image anti-aliased by 4x supersampling, the mask sampled at pixel centres."""
    ss = 4
    yy, xx = np.mgrid[0:h * ss, 0:w * ss]
    inside = (((yy + 0.5) / ss - cy) ** 2 + ((xx + 0.5) / ss - cx) ** 2) < r * r
    image = inside.reshape(h, ss, w, ss).mean(axis=(1, 3))
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2) < r * r
    return np.round(image * 255).astype(np.uint8), mask.astype(np.uint8)


def _centroid(weights: np.ndarray) -> np.ndarray:
    w = weights.astype(np.float64)
    yy, xx = np.mgrid[0:w.shape[0], 0:w.shape[1]]
    return np.array([(w * (yy + 0.5)).sum(), (w * (xx + 0.5)).sum()]) / w.sum()


def _offsets(h: int, w: int, size: int, resize_mask, draws: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Mean centroid offset (rows, cols) over disks at random sub-pixel positions, in pixels of the
    coarser grid: mask vs image in the letterboxed frame, and the mask after letterbox and back vs
    the original mask."""
    rng = np.random.default_rng([h, w, size])
    rows, cols = letterbox_valid((h, w), size)
    coarse = max(1.0, max(h, w) / size)  # original pixels per frame pixel
    in_frame, round_trip = [], []
    for _ in range(draws):
        image, mask = _disk(h, w, rng.uniform(0.35, 0.6) * h, rng.uniform(0.35, 0.6) * w, 0.2 * min(h, w))
        boxed_image = letterbox(image, size)[:rows, :cols]
        boxed_mask = resize_mask(mask, rows, cols)
        back = unletterbox(torch.from_numpy(np.pad(boxed_mask, ((0, size - rows), (0, size - cols)))), (h, w),
                           is_mask=True).numpy()
        in_frame.append(_centroid(boxed_mask) - _centroid(boxed_image))
        round_trip.append((_centroid(back) - _centroid(mask)) / coarse)
    return np.abs(np.mean(in_frame, 0)).max(), np.abs(np.mean(round_trip, 0)).max()


SHAPES = {"portrait": (300, 200), "landscape": (540, 800), "square": (250, 250), "odd": (97, 131),
          "factor 2": (512, 384)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("size", [64, 128, 256])
def test_image_and_mask_keep_one_centroid_through_letterbox_and_back(shape, size):
    h, w = shape
    image, mask = _disk(h, w, 0.43 * h + 0.3, 0.56 * w + 0.2, 0.2 * min(h, w))
    assert np.abs(_centroid(image) - _centroid(mask)).max() < 0.1  # the drawing itself agrees
    boxed = letterbox(mask, size, is_mask=True)
    rows, cols = letterbox_valid((h, w), size)
    assert boxed.shape == (size, size) and not boxed[rows:].any() and not boxed[:, cols:].any()
    in_frame, round_trip = _offsets(h, w, size, lambda m, r, c: letterbox(m, size, is_mask=True)[:r, :c])
    assert in_frame < 0.1 and round_trip < 0.1  # pixels (of the coarser grid)


@pytest.mark.parametrize("interpolation", [cv2.INTER_NEAREST, cv2.INTER_NEAREST_EXACT])
def test_nearest_neighbour_sampling_would_shift_the_mask(interpolation):
    """What the check above catches: plain nearest neighbour (what letterbox used before) shifts a mask
    by up to half a pixel; even centre-aligned nearest neighbour shifts it a quarter pixel at factor 2."""
    in_frame, _ = _offsets(512, 384, 256, lambda m, r, c: cv2.resize(m, (c, r), interpolation=interpolation))
    assert in_frame > 0.2


def test_resize_labels_keeps_classes_and_area():
    labels = np.zeros((200, 300), np.uint8)
    labels[40:160, 50:250] = 1
    labels[80:120, 100:200] = 7
    small = resize_labels(labels, (100, 150))
    assert set(np.unique(small)) == {0, 1, 7}
    assert abs((small == 7).sum() * 4 - (labels == 7).sum()) <= 0.02 * (labels == 7).sum()
    assert np.array_equal(resize_labels(small, (200, 300))[::2, ::2], small)


def test_letterbox_valid_is_the_image_part():
    assert letterbox_valid((300, 200), 128) == (128, 85)
    assert letterbox_valid((200, 300), 128) == (85, 128)
    assert letterbox_valid((64, 64), 128) == (128, 128)


# ------------------------------------------------------------------------------ teacher inputs


def _medsam_reference(raw: np.ndarray, size: int = 256) -> np.ndarray:
    """MedSAM's documented LiteMedSAM preprocessing, written out independently: resize the longest side to
    ``size`` (INTER_AREA, sizes rounded half up), min-max normalise the resized image itself, then zero-pad
    bottom/right to ``size x size`` and repeat to 3 channels."""
    h, w = raw.shape
    scale = size / max(h, w)
    newh, neww = int(h * scale + 0.5), int(w * scale + 0.5)
    img = cv2.resize(raw, (neww, newh), interpolation=cv2.INTER_AREA).astype(np.float64)
    norm = (img - img.min()) / max(img.max() - img.min(), 1e-8)
    out = np.zeros((size, size))
    out[:newh, :neww] = norm
    return np.repeat(out[None], 3, axis=0)


def _ours(raw: np.ndarray, normalization: str, size: int = 256) -> np.ndarray:
    from tskd_utils.features import images_to_tensor, teacher_inputs, valid_tensor
    from tskd_utils.models import TeacherEncoder

    boxed, valid = teacher_inputs([raw], size)
    enc = TeacherEncoder(size, normalization)
    return enc.preprocess(images_to_tensor(np.stack(boxed), "cpu"), valid_tensor(valid, "cpu"))[0].double().numpy()


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (256, 256), (97, 131)])
def test_litemedsam_input_is_medsams_resize_normalise_pad(shape):
    raw = np.random.default_rng(0).integers(40, 200, shape).astype(np.uint8)  # darkest pixel 40: padding must not count
    ref = _medsam_reference(raw)
    ours = _ours(raw, "minmax")
    assert np.abs(ours - ref).max() < 1e-6
    if shape != (256, 256):  # normalising after the zero padding (as before) differs
        from tskd_utils.models import TeacherEncoder
        padded = torch.from_numpy(letterbox(raw, 256)).float().div(255)[None, None]
        assert np.abs(TeacherEncoder(256, "minmax").preprocess(padded)[0].double().numpy() - ref).max() > 0.1


def test_sam_input_is_normalised_then_padded_with_zeros():
    raw = np.random.default_rng(1).integers(0, 255, (300, 200)).astype(np.uint8)
    ours = _ours(raw, "imagenet")
    rows, cols = letterbox_valid(raw.shape, 256)
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])  # SAM's, on 0-255
    resized = letterbox(raw, 256)[:rows, :cols].astype(np.float64)
    assert np.abs(ours[:, :rows, :cols] - (resized[None] - mean[:, None, None]) / std[:, None, None]).max() < 1e-4
    assert not ours[:, rows:].any() and not ours[:, :, cols:].any()  # SAM pads after normalising
