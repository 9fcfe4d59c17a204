"""The embedded phantom: format, determinism, subjects, fan, difficulty, overwrite rules, CLI."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest

from tskd_utils.datasets import main as prepare_main
from tskd_utils.datasets import phantom
from tskd_utils.io import DataError, load_case, load_dataset

SMALL = dict(n_cases=8, size=64)  # enough for format and determinism checks, and quick


def _digest(folder: Path) -> dict:
    """SHA-256 of every PNG and of cases.csv, by relative path."""
    files = sorted(folder.glob("*/*.png")) + [folder / "cases.csv"]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _fan(subject: phantom.Subject, size: int) -> np.ndarray:
    """The subject's field of view on the pixel grid, recomputed independently of render_case."""
    fan = subject.fan
    centres = (np.arange(size) + 0.5) / size
    x, y = np.meshgrid(centres, centres)
    r = np.hypot(x - fan.apex_x, y - fan.apex_y)
    theta = np.arctan2(x - fan.apex_x, y - fan.apex_y)
    return (r >= fan.r_min) & (r <= fan.r_max) & (np.abs(theta) <= fan.half_angle)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return phantom.prepare(None, tmp_path_factory.mktemp("small"), seed=0, **SMALL)


def test_written_dataset_loads_with_valid_masks_and_both_classes(small):
    info = load_dataset(small)
    assert info.name == "phantom" and info.classes == ["background", "capsule", "inner"]
    assert info.meta["n_cases"] == len(info.cases) == SMALL["n_cases"]
    assert "seed=0" in info.meta["source"] and info.meta["license"] == "CC0-1.0"
    assert [c.case for c in info.cases] == [f"ph{i:04d}" for i in range(SMALL["n_cases"])]
    for record in info.cases:
        image, mask = load_case(info, record)
        assert image.dtype == mask.dtype == np.uint8
        assert image.shape == mask.shape == (SMALL["size"],) * 2
        assert set(np.unique(mask)) == {0, 1, 2}  # both foreground classes in every case
        assert image.std() > 10  # an image, not a blank


def test_same_seed_is_byte_identical_and_another_seed_differs(small, tmp_path):
    again = phantom.prepare(None, tmp_path / "again", seed=0, **SMALL)
    other = phantom.prepare(None, tmp_path / "other", seed=1, **SMALL)
    assert _digest(again) == _digest(small)
    different = [k for k, v in _digest(other).items() if v != _digest(small)[k]]
    assert any(k.startswith("images/") for k in different) and any(k.startswith("masks/") for k in different)


def test_fewer_cases_are_a_prefix_of_more(small, tmp_path):
    fewer = _digest(phantom.prepare(None, tmp_path, seed=0, n_cases=3, size=SMALL["size"]))
    more = _digest(small)
    assert all(more[k] == v for k, v in fewer.items() if k != "cases.csv")


def test_frames_share_a_subject_and_differ_slightly(tmp_path):
    n_cases, per_subject = 10, 4
    root = phantom.prepare(None, tmp_path, n_cases=n_cases, size=64, frames_per_subject=per_subject)
    with (root / "cases.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    subjects = [r["subject"] for r in rows]
    assert subjects == [f"s{i // per_subject:03d}" for i in range(n_cases)]
    assert len(set(subjects)) == -(-n_cases // per_subject)  # ceil: the last subject has 2 frames
    info = load_dataset(root)
    first, second, other = (load_case(info, info.cases[i]) for i in (0, 1, per_subject))

    def overlap(m1, m2):
        a, b = m1 > 0, m2 > 0
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert not np.array_equal(first[0], second[0])  # new speckle, new position
    assert overlap(first[1], second[1]) > overlap(first[1], other[1])  # same organ, moved a little
    assert overlap(first[1], second[1]) > 0.7


@pytest.mark.parametrize("size", [64, 96])
def test_outside_the_fan_image_and_mask_are_zero(size):
    for index in range(0, 12, 3):
        image, mask, _ = phantom.generate_case(7, index, size=size, frames_per_subject=3)
        fan = _fan(phantom.sample_subject(7, index // 3), size)
        assert 0.25 < fan.mean() < 0.75  # a sector, not the whole square
        assert not image[~fan].any() and not mask[~fan].any()
        assert image[fan].mean() > 20  # the fan itself is not black


def test_no_global_threshold_segments_the_foreground(tmp_path):
    root = phantom.prepare(None, tmp_path, n_cases=60, size=96)
    baseline = phantom.threshold_baseline(root)
    assert baseline["n_cases"] == 60
    assert baseline["best_global_dice"] < 0.6
    assert baseline["best_global_window_dice"] < 0.6
    # the per-image oracle is an upper bound of the global threshold, itself bounded by 1
    assert baseline["best_global_dice"] <= baseline["oracle_dice"] <= baseline["oracle_window_dice"] <= 1


def test_threshold_baseline_finds_a_perfect_threshold(tmp_path):
    """On a dataset that a threshold does segment, the baseline reports it."""
    from tskd_utils.io import DatasetWriter

    meta = dict(name="toy", modality="x", classes=["bg", "fg"], license="-", citation="-", source="-")
    with DatasetWriter(tmp_path / "toy", meta) as w:
        for i in range(3):
            image = np.full((16, 16), 40, np.uint8)
            mask = np.zeros((16, 16), np.uint8)
            mask[4:10, 3:12] = 1
            image[mask > 0] = 200
            w.add_case(f"c{i}", f"s{i}", image, mask)
    baseline = phantom.threshold_baseline(tmp_path / "toy")
    assert baseline["best_global_dice"] == pytest.approx(1.0)
    assert baseline["best_global_direction"] == ">" and 40 <= baseline["best_global_threshold"] < 200


def test_existing_dataset_is_kept_unless_overwrite(tmp_path):
    first = phantom.prepare(None, tmp_path, n_cases=4, size=48, seed=0)
    before = _digest(first)
    with pytest.raises(FileExistsError):
        phantom.prepare(None, tmp_path, n_cases=4, size=48, seed=1)
    assert _digest(first) == before
    replaced = phantom.prepare(None, tmp_path, n_cases=6, size=48, seed=1, overwrite=True)
    assert replaced == first and len(load_dataset(replaced).cases) == 6
    assert _digest(replaced) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phantom"]  # no temporary folders left


def test_bad_options_raise_a_clear_error(tmp_path):
    for options in (dict(n_cases=0), dict(size=8), dict(frames_per_subject=0), dict(seed=-1)):
        with pytest.raises(DataError, match=next(iter(options))):
            phantom.prepare(None, tmp_path, **options)
    assert not (tmp_path / "phantom").exists()


def test_cli_writes_the_requested_cases(tmp_path, capsys):
    assert prepare_main("phantom", ["--out", str(tmp_path), "--n-cases", "8"]) == 0
    info = load_dataset(tmp_path / "phantom")
    assert len(info.cases) == 8 and len({c.subject for c in info.cases}) == 2
    assert load_case(info, info.cases[0])[0].shape == (256, 256)
    assert "wrote 8 cases" in capsys.readouterr().out
    assert prepare_main("phantom", ["--out", str(tmp_path), "--n-cases", "8"]) == 2  # exists, no --overwrite


def test_cli_defaults_match_prepare():
    import argparse

    parser = argparse.ArgumentParser()
    phantom.add_arguments(parser)
    assert vars(parser.parse_args([])) == dict(n_cases=300, seed=0, size=256, frames_per_subject=4)
