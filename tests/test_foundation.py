"""Profiles, the common format's reader, letterboxing, datasets and splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tskd_utils import config
from tskd_utils.data import (SegmentationDataset, letterbox, make_splits, unletterbox)
from tskd_utils.datasets import ensure_dataset, get_converter, main as prepare_main
from tskd_utils.io import DataError, DatasetWriter, load_case, load_dataset, read_image
from tskd_utils.run import check_methods, setup_run

# ------------------------------------------------------------------------------------ profiles


def test_profiles_are_complete_and_overridable():
    for name in config.PROFILES:
        p = config.get_profile(name)
        assert p.name == name and p.data.image_size > 0 and p.finetune.epochs > 0
        assert config.profile_from_dict(config.profile_to_dict(p)) == p
    p = config.get_profile("demo", {"teacher.epochs": "3", "teacher.augment": "false", "teacher.lora_stages": "[2, 3]"})
    assert p.teacher.epochs == 3 and p.teacher.augment is False and p.teacher.lora_stages == (2, 3)
    assert config.get_profile("demo").teacher.epochs == config.PROFILES["demo"]().teacher.epochs != 3


def test_profile_errors_name_the_bad_value():
    with pytest.raises(KeyError, match="unknown profile 'laptop'"):
        config.get_profile("laptop")
    with pytest.raises(KeyError, match="teacher.epoch'.*valid keys"):
        config.get_profile("smoke", {"teacher.epoch": 3})
    with pytest.raises(ValueError, match="teacher.epochs='many'"):
        config.get_profile("smoke", {"teacher.epochs": "many"})


def test_profile_defaults_follow_the_environment(monkeypatch):
    monkeypatch.setenv("TSKD_PROFILE", "smoke")
    assert config.get_profile().name == "smoke"
    monkeypatch.setenv("TSKD_N_LABELED", "7")
    assert config.env_default("n_labeled", 0) == 7
    assert config.env_default("seed", 3) == 3


# ------------------------------------------------------------------------- reading the format


def test_truncated_and_non_image_png_name_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((20, 20), 9, np.uint8)).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:40])
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    for bad in (trunc, fake):
        with pytest.raises(DataError, match=str(bad.name)):
            read_image(bad)
    assert read_image(good).shape == (20, 20)


def _broken_dataset(root, n_classes=3):
    meta = {"name": "bad", "modality": "x", "classes": ["bg", "a", "b"][:n_classes], "license": "x",
            "citation": "x", "source": "x"}
    with DatasetWriter(root / "bad", meta) as w:
        for i in range(3):
            w.add_case(f"c{i}", f"s{i}", np.zeros((10, 12), np.uint8), np.zeros((10, 12), np.uint8))
    return root / "bad"


def test_mask_problems_name_the_mask(tmp_path):
    root = _broken_dataset(tmp_path)
    info = load_dataset(root)
    Image.fromarray(np.zeros((11, 12), np.uint8)).save(root / "masks" / "c0.png")
    with pytest.raises(DataError, match=r"c0\.png: mask size 12x11"):
        load_case(info, info.case("c0"))
    Image.fromarray(np.full((10, 12), 7, np.uint8)).save(root / "masks" / "c1.png")
    with pytest.raises(DataError, match=r"c1\.png: mask values \[7\] are not valid class indices 0..2"):
        load_case(info, info.case("c1"))
    (root / "masks" / "c2.png").unlink()
    with pytest.raises(DataError, match=r"has no mask: .*c2\.png is missing"):
        load_dataset(root)


def test_dataset_json_missing_or_malformed(tmp_path):
    root = _broken_dataset(tmp_path)
    (root / "dataset.json").write_text("{ not json")
    with pytest.raises(DataError, match="dataset.json: malformed JSON"):
        load_dataset(root)
    (root / "dataset.json").write_text(json.dumps({"name": "bad"}))
    with pytest.raises(DataError, match="missing keys"):
        load_dataset(root)
    (root / "dataset.json").unlink()
    with pytest.raises(DataError, match="dataset.json is missing"):
        load_dataset(root)


def test_writer_rejects_bad_cases_and_leaves_nothing(tmp_path):
    meta = {"name": "w", "modality": "x", "classes": ["bg", "fg"], "license": "x", "citation": "x", "source": "x"}
    with pytest.raises(DataError, match="case 'b'.*not valid class indices"):
        with DatasetWriter(tmp_path / "w", meta) as w:
            w.add_case("a", "s", np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))
            w.add_case("b", "s", np.zeros((4, 4), np.uint8), np.full((4, 4), 2, np.uint8))
    assert list(tmp_path.iterdir()) == []
    with DatasetWriter(tmp_path / "w", meta) as w:
        w.add_case("a", "s", np.zeros((4, 4), np.uint8), np.ones((4, 4), np.uint8))
    before = (tmp_path / "w" / "cases.csv").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        with DatasetWriter(tmp_path / "w", meta) as w:
            pass
    assert (tmp_path / "w" / "cases.csv").read_text() == before


def test_unknown_dataset_and_missing_raw_folder(tmp_path, capsys):
    with pytest.raises(KeyError, match="unknown dataset 'hc19'; known converters: phantom, hc18"):
        get_converter("hc19")
    with pytest.raises(DataError, match="dataset 'busi' not found.*prepare_busi.py"):
        ensure_dataset("busi", tmp_path)
    assert prepare_main("hc18", ["--raw", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) != 0
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "out" / "hc18").exists()


# ------------------------------------------------------------------------------- letterboxing


def test_letterbox_round_trip_keeps_geometry():
    mask = np.zeros((60, 90), np.uint8)
    mask[10:30, 20:70] = 1
    boxed = letterbox(mask, 45, is_mask=True)
    assert boxed.shape == (45, 45) and boxed[30:].max() == 0  # padding at the bottom
    back = unletterbox(torch.from_numpy(boxed), (60, 90), is_mask=True).numpy()
    assert back.shape == (60, 90) and (back == mask).mean() > 0.97
    logits = torch.zeros(2, 45, 45)
    logits[1] = torch.from_numpy(boxed).float() * 4 - 2
    assert (unletterbox(logits, (60, 90)).argmax(0).numpy() == mask).mean() > 0.97


def test_segmentation_dataset_items(toy_root):
    info = load_dataset(toy_root / "toy")
    ds = SegmentationDataset(info, [c.case for c in info.cases[:4]], 32, train=True, seed=1)
    item = ds[0]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["mask"].shape == (32, 32) and set(item["mask"].unique().tolist()) <= {0, 1, 2}
    ds.set_epoch(3)
    a = ds[1]["image"]
    ds.set_epoch(3)
    assert torch.equal(a, ds[1]["image"])  # augmentation is reproducible per epoch


# ------------------------------------------------------------------------------------ splits


def test_splits_grouped_seeded_and_nested(toy_root):
    info = load_dataset(toy_root / "toy")
    subject = {c.case: c.subject for c in info.cases}
    s = make_splits(info, n_labeled=4, seed=0)
    parts = [set(s[k]) for k in ("train", "val", "test")]
    assert sum(map(len, parts)) == len(info.cases) and not (parts[0] & parts[1] or parts[0] & parts[2])
    subj = [{subject[c] for c in p} for p in parts]
    assert not (subj[0] & subj[1] or subj[0] & subj[2] or subj[1] & subj[2])  # no subject crosses splits
    assert set(s["labeled"]) | set(s["unlabeled"]) == parts[0] and len(s["labeled"]) == 4
    assert make_splits(info, 4, 0) == s
    s8, s_other = make_splits(info, 8, 0), make_splits(info, 4, 1)
    assert set(s["labeled"]) < set(s8["labeled"]) and s8["test"] == s["test"]
    assert s_other["labeled"] != s["labeled"] and s_other["test"] == s["test"]


def test_n_labeled_larger_than_pool(toy_root):
    info = load_dataset(toy_root / "toy")
    with pytest.raises(DataError, match=r"n_labeled=500 is larger than the train pool"):
        make_splits(info, n_labeled=500, seed=0)


def test_setup_run_writes_config_and_refuses_other_settings(tmp_path, toy_root):
    run = setup_run(tmp_path / "r", "smoke", "toy", toy_root, n_labeled=5, seed=2)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["n_labeled"] == 5
    assert run.splits["counts"]["labeled"] == 5
    setup_run(tmp_path / "r", "smoke", "toy", toy_root, n_labeled=5, seed=2)  # same settings: fine
    with pytest.raises(DataError, match="seed=2, not 3"):
        setup_run(tmp_path / "r", "smoke", "toy", toy_root, n_labeled=5, seed=3)


def test_setup_run_records_a_changed_profile_definition(tmp_path, toy_root, capsys):
    """A folder written under an older definition of its profile gets the definition this code runs with."""
    setup_run(tmp_path / "r", "smoke", "toy", toy_root, n_labeled=5, seed=2)
    cfg_path = tmp_path / "r" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    now = cfg["resolved_profile"]["teacher"]["epochs"]
    cfg["resolved_profile"]["teacher"]["epochs"] = now + 7  # as an older version of the repository wrote it
    cfg_path.write_text(json.dumps(cfg))
    capsys.readouterr()
    setup_run(tmp_path / "r", "smoke", "toy", toy_root, n_labeled=5, seed=2)
    assert "profile 'smoke' changed since" in capsys.readouterr().out
    again = json.loads(cfg_path.read_text())
    assert again["resolved_profile"]["teacher"]["epochs"] == now and again["created"] == cfg["created"]


def test_unknown_method_lists_valid_ones():
    with pytest.raises(KeyError, match="unknown method.*'tskd'.*scratch, ta_kd, ts_kd"):
        check_methods(["ts_kd", "tskd"])
    assert check_methods("all") == ["scratch", "ta_kd", "ts_kd", "ts_kd_nosyn", "mae", "mocov3", "unet_supervised"]
