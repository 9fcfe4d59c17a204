"""Data-side safety (issue 17): names that would leave their folder, concurrent conversions, stale
temporary folders, 16-bit windowing and mask forms in io.py. Converter-specific checks live in the
converter test files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tskd_utils.io import (DataError, DatasetWriter, check_name, load_dataset, read_image, read_label_array,
                           safe_join)

REPO = Path(__file__).resolve().parents[1]
META = {"name": "ds", "modality": "x", "classes": ["background", "fg"], "license": "x", "citation": "x",
        "source": "x"}


def write_dataset(target: Path, n: int = 3, overwrite: bool = False, marker: int = 0) -> Path:
    with DatasetWriter(target, META, overwrite=overwrite) as w:
        for i in range(n):
            mask = np.zeros((8, 8), np.uint8)
            mask[2:5, 2:5] = 1
            w.add_case(f"c{i}", f"s{i}", np.full((8, 8), marker, np.uint8), mask)
    return target


def snapshot(root: Path) -> dict:
    """Every path under root with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------------------------- the name rule
@pytest.mark.parametrize("bad", ["", "../x", "..", ".hidden", "a/b", "a\\b", "/etc/passwd", "C:x", "a\x00b",
                                 "tab\there", "line\n", "del\x7f", "x" * 201, "é" * 101])
def test_check_name_refuses_names_that_are_not_one_plain_path_component(bad):
    with pytest.raises(DataError, match=r"cases\.csv line 7: case name .*") as e:
        check_name(bad, "case name", "cases.csv line 7")
    assert repr(bad) in str(e.value)


@pytest.mark.parametrize("good", ["000_HC", "benign_0001", "fetal head", "130_IM-0650-0033_anon", "a.b", "x..y"])
def test_check_name_accepts_plain_names(good):
    assert check_name(good, "case name", "here") == good


def test_safe_join_stays_inside_its_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    assert safe_join(root, "images", "c0.png") == root / "images" / "c0.png"
    assert safe_join(root, "students/ts_kd", ".weights.tmp-1") == root / "students" / "ts_kd" / ".weights.tmp-1"
    for parts in (("..", "x"), ("a/../../x",), ("/etc/passwd",), ("",), (".",), ("a", "b\x00")):
        with pytest.raises(DataError, match=str(root)):
            safe_join(root, *parts)
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")  # a symlink inside the root that leads out of it
    with pytest.raises(DataError, match="outside"):
        safe_join(root, "link", "x.png")


# ------------------------------------------------------------------------ names checked on load
def _rewrite_cases(root: Path, line: int, case: str) -> None:
    path = root / "cases.csv"
    rows = list(csv.reader(path.open(newline="")))
    rows[line - 1][0] = case
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)


@pytest.mark.parametrize("evil", ["../../elsewhere/x", "ABSOLUTE", "sub/x", ".x"])
def test_case_names_that_leave_the_dataset_are_refused_on_load(tmp_path, evil):
    root = write_dataset(tmp_path / "data" / "ds")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(elsewhere / "x.png")  # the files it points at exist
    if evil == "ABSOLUTE":
        evil = str(elsewhere / "x")
    _rewrite_cases(root, 3, evil)
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=r"cases\.csv line 3: case name") as e:
        load_dataset(root)
    assert str(root / "cases.csv") in str(e.value) and repr(evil) in str(e.value)
    assert snapshot(tmp_path) == before  # nothing written anywhere


@pytest.mark.parametrize("key, value, what", [("classes", ["background", "a/b"], "class name"),
                                              ("classes", ["background", "../x"], "class name"),
                                              ("name", "../../x", "dataset name")])
def test_class_and_dataset_names_are_checked_on_load(tmp_path, key, value, what):
    root = write_dataset(tmp_path / "ds")
    meta = json.loads((root / "dataset.json").read_text())
    meta[key] = value
    (root / "dataset.json").write_text(json.dumps(meta))
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=rf"dataset\.json: {what} "):
        load_dataset(root)
    assert snapshot(tmp_path) == before


def test_writer_applies_the_same_rule(tmp_path):
    bad_names = ["a\x01b", "../x", ".x", "a/b"]
    for bad in bad_names:
        with pytest.raises(DataError, match="case name"):
            with DatasetWriter(tmp_path / "w", META) as w:
                w.add_case(bad, "s", np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="class name"):
        DatasetWriter(tmp_path / "w", dict(META, classes=["background", "a/b"]))
    with pytest.raises(DataError, match="differ only in letter case"):  # one file on macOS/Windows
        with DatasetWriter(tmp_path / "w", META) as w:
            w.add_case("Case1", "s", np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))
            w.add_case("case1", "s", np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- one conversion at a time
def test_second_conversion_into_the_same_target_refuses_at_once(tmp_path):
    target = tmp_path / "data" / "ds"
    entered, finish, errors = threading.Event(), threading.Event(), []

    def first():
        try:
            with DatasetWriter(target, META) as w:
                w.add_case("c0", "s0", np.full((8, 8), 1, np.uint8), np.zeros((8, 8), np.uint8))
                entered.set()
                assert finish.wait(30)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
            entered.set()

    thread = threading.Thread(target=first)
    thread.start()
    assert entered.wait(30)
    tmp = [p for p in target.parent.iterdir() if p.name.startswith(".ds.tmp-")]
    start = time.monotonic()
    with pytest.raises(DataError, match="another conversion") as e:
        write_dataset(target, marker=2)
    assert time.monotonic() - start < 5  # refuses, does not wait
    assert str(target) in str(e.value) and ".ds.lock" in str(e.value)
    assert tmp and all(p.is_dir() for p in tmp)  # the running conversion's work is untouched
    finish.set()
    thread.join(30)
    assert not errors, errors
    info = load_dataset(target)
    assert len(info.cases) == 1 and read_image(info.cases[0].image).max() == 1  # the first one's data
    assert sorted(p.name for p in target.parent.iterdir()) == ["ds"]  # no lock file, no temp folder
    write_dataset(target, overwrite=True, marker=3)  # the lock is free again
    assert len(load_dataset(target).cases) == 3


def test_target_that_appears_meanwhile_is_never_replaced_without_overwrite(tmp_path):
    target = tmp_path / "ds"
    with pytest.raises(FileExistsError, match="appeared while"):
        with DatasetWriter(target, META) as w:
            w.add_case("c0", "s0", np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
            write_dataset(tmp_path / "other")  # a finished dataset lands at the target meanwhile
            (tmp_path / "other").rename(target)  # (by a tool that does not take the lock)
    assert len(load_dataset(target).cases) == 3  # the other dataset stands
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


HOLDER = """
import sys, numpy as np
from tskd_utils.io import DatasetWriter
meta = {"name": "ds", "modality": "x", "classes": ["background", "fg"], "license": "x", "citation": "x",
        "source": "x"}
with DatasetWriter(sys.argv[1], meta) as w:
    w.add_case("held", "s", np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
    print("ready", flush=True)
    sys.stdin.readline()
"""


def test_two_processes_converting_into_one_target(tmp_path):
    target = tmp_path / "ds"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(DataError, match=r"another conversion is writing .*ds.*lock file .*\.ds\.lock"):
            write_dataset(target)
        assert not target.exists()
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    assert [c.case for c in load_dataset(target).cases] == ["held"]


# ------------------------------------------------------------- leftovers of a killed conversion
def test_a_conversion_killed_with_sigkill_is_cleaned_up_by_the_next_one(tmp_path):
    target = tmp_path / "ds"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "ready"
    holder.kill()  # SIGKILL: no cleanup runs; its temporary folder and lock file stay behind
    holder.wait(60)
    holder.stdin.close()
    holder.stdout.close()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert ".ds.lock" in left and any(n.startswith(".ds.tmp-") for n in left)
    write_dataset(target)  # the dead process holds no lock: this one goes ahead and cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert len(load_dataset(target).cases) == 3


def _leftover(parent: Path, name: str) -> Path:
    folder = parent / name
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "half.png").write_bytes(b"half-written")
    return folder


def test_stale_temporary_folders_are_removed_on_the_next_run(tmp_path):
    write_dataset(tmp_path / "ds")
    _leftover(tmp_path, ".ds.tmp-deadbeef")
    _leftover(tmp_path, ".ds.old-cafe0123")
    _leftover(tmp_path, ".other.tmp-12345678")  # another target's: not ours to remove
    write_dataset(tmp_path / "ds", overwrite=True, marker=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-12345678", "ds"]
    assert read_image(load_dataset(tmp_path / "ds").cases[0].image).max() == 5


def test_a_finished_dataset_moved_aside_by_a_killed_swap_is_restored_not_deleted(tmp_path, capsys):
    write_dataset(tmp_path / "ds", marker=7)
    (tmp_path / "ds").rename(tmp_path / ".ds.old-0badc0de")  # killed between the two renames of a swap
    _leftover(tmp_path, ".ds.tmp-0badc0de")
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_dataset(tmp_path / "ds", marker=8)
    assert "restored" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert read_image(load_dataset(tmp_path / "ds").cases[0].image).max() == 7


# ----------------------------------------------------------------------- 16-bit images, masks
def test_16_bit_image_is_windowed_by_percentiles_not_by_one_outlier(tmp_path, capsys, monkeypatch):
    from tskd_utils import io

    monkeypatch.setattr(io, "_notes_seen", set())  # no note printed yet in this "conversion"
    arr = np.tile(np.linspace(1000, 3000, 64), (48, 1)).astype(np.uint16)
    arr[5, 5] = 65000  # one bright outlier
    Image.fromarray(arr).save(tmp_path / "wide.png")
    image = read_image(tmp_path / "wide.png")
    assert image.dtype == np.uint8 and image[5, 5] == 255
    body = np.delete(image.ravel(), 5 * 64 + 5)
    assert body.min() <= 2 and body.max() >= 250 and 100 <= np.median(body) <= 155  # the full range is used
    assert "percentile" in capsys.readouterr().out


def test_16_bit_note_is_printed_once_per_conversion(tmp_path, capsys):
    from tskd_utils.datasets import folder

    for i in range(3):
        arr = np.tile(np.linspace(100 * i, 4000, 16), (12, 1)).astype(np.uint16)
        (tmp_path / "raw" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "raw" / "masks").mkdir(exist_ok=True)
        Image.fromarray(arr).save(tmp_path / "raw" / "images" / f"im{i}.png")
        mask = np.zeros((12, 16), np.uint8)
        mask[3:8, 4:10] = 1
        Image.fromarray(mask).save(tmp_path / "raw" / "masks" / f"im{i}.png")
    for run in ("a", "b"):
        folder.prepare(tmp_path / "raw", tmp_path / run, classes="background,fg", workers=1)
        assert capsys.readouterr().out.count("16-bit") == 1


def test_mask_forms_read_as_what_they_show(tmp_path):
    fg = np.zeros((6, 8), bool)
    fg[1:4, 2:6] = True
    one_bit = Image.fromarray(fg)  # mode "1"
    one_bit.save(tmp_path / "one.png")
    assert set(np.unique(read_label_array(tmp_path / "one.png")).tolist()) == {0, 1}
    # a grey palette whose index 0 is white: the values shown (0/255), not the indices, count
    pal = Image.fromarray((~fg).astype(np.uint8), mode="P")
    pal.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(read_label_array(tmp_path / "pal.png"), fg * 255)
    # a coloured palette (VOC style): the indices are the classes
    voc = Image.fromarray(fg.astype(np.uint8) * 2, mode="P")
    voc.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    voc.save(tmp_path / "voc.png")
    np.testing.assert_array_equal(read_label_array(tmp_path / "voc.png"), fg * 2)


def test_ensure_dataset_waits_for_a_phantom_another_process_is_generating(tmp_path, capsys):
    from tskd_utils.datasets import ensure_dataset, get_converter

    get_converter("phantom")  # imported before the race starts: a slow import on a loaded machine lost it
    entered, errors = threading.Event(), []

    def other():  # stands in for a second sweep that started generating the phantom first
        try:
            with DatasetWriter(tmp_path / "phantom", dict(META, name="phantom")) as w:
                entered.set()
                time.sleep(2.0)
                w.add_case("p0", "s0", np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
            entered.set()

    thread = threading.Thread(target=other)
    thread.start()
    assert entered.wait(30)
    root = ensure_dataset("phantom", tmp_path, phantom_cases=1, wait_s=60)
    thread.join(30)
    assert not errors and root == tmp_path / "phantom"
    assert "waiting for it" in capsys.readouterr().out
    assert [c.case for c in load_dataset(root).cases] == ["p0"]  # the other process's dataset, not a second one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phantom"]


def test_ensure_dataset_refuses_a_dataset_name_that_leaves_the_data_root(tmp_path):
    from tskd_utils.datasets import ensure_dataset

    for bad in ("../elsewhere", "/abs/phantom", ".hidden"):
        with pytest.raises(DataError, match=r"the dataset argument: dataset name"):
            ensure_dataset(bad, tmp_path / "data")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- loud load errors
def test_cases_csv_saved_by_excel_with_a_bom_loads(tmp_path):
    root = write_dataset(tmp_path / "ds")
    want = [(c.case, c.subject) for c in load_dataset(root).cases]
    path = root / "cases.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [(c.case, c.subject) for c in load_dataset(root).cases] == want


def test_load_errors_name_the_file(tmp_path):
    from tskd_utils.io import load_case

    root = write_dataset(tmp_path / "ds")
    (root / "cases.csv").write_bytes(b"case,subject\n\xff\xfe\x00bad,s\n")
    with pytest.raises(DataError, match=r"cases\.csv: not a readable CSV"):
        load_dataset(root)
    root = write_dataset(tmp_path / "ds2")
    mask = root / "masks" / "c1.png"
    mask.write_bytes(mask.read_bytes()[:30])  # truncated
    info = load_dataset(root)
    with pytest.raises(DataError, match=r"c1\.png: not a readable mask image"):
        load_case(info, info.case("c1"))
    (root / "dataset.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(DataError, match=r"dataset\.json: malformed JSON"):
        load_dataset(root)
    from tskd_utils.data import dataset_summary

    root = write_dataset(tmp_path / "ds3")
    (root / "images" / "c1.png").write_bytes(b"")  # a 0-byte image: the summary of notebook 01 names it
    with pytest.raises(DataError, match=r"c1\.png: not a readable image"):
        dataset_summary(load_dataset(root))


def test_weights_get_the_mode_of_every_other_file_and_failed_writes_leave_no_temporary(tmp_path):
    """safetensors writes 0600: collaborators on a shared cluster folder could not read the models."""
    import torch

    from tskd_utils.io import FILE_MODE, atomic_write, write_json
    from tskd_utils.training import save_weights

    save_weights(tmp_path / "w.safetensors", {"m": torch.nn.Linear(2, 2)})
    write_json(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == FILE_MODE
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == FILE_MODE
    before = (tmp_path / "a.json").read_text()

    def fails(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(tmp_path / "a.json", fails)
    assert (tmp_path / "a.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "w.safetensors"]  # no temporary left


def test_augmentation_makes_no_network_call():
    """albumentations asks PyPI for a newer release when imported, unless told not to: the project tells it."""
    code = ("import socket\n"
            "calls = []\n"
            "def connect(self, *a, **k):\n"
            "    calls.append(a)\n"
            "    raise OSError('no network in this test')\n"
            "socket.socket.connect = connect\n"
            "from tskd_utils.data import build_transform\n"
            "build_transform(True, 0)\n"
            "assert not calls, calls\n")
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
