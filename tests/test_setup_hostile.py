"""setup_run against hostile arguments and data: each is refused, with its name, before anything is written."""

from __future__ import annotations

import json
import os

import pytest

from tskd_utils import environment
from tskd_utils.io import DataError
from tskd_utils.run import load_run, setup_run


def _setup(run_dir, toy_root, **kw):
    return setup_run(run_dir, **{"profile": "smoke", "dataset": "toy", "data_root": toy_root, "n_labeled": 6,
                                 "seed": 0, **kw})


def test_a_declared_class_that_no_mask_contains_is_refused(tmp_path, toy_root):
    """A 4th class in dataset.json that no mask has would score Dice 1 on every case for every method."""
    meta_path = toy_root / "toy" / "dataset.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, classes=meta["classes"] + ["ghost"])))
    run_dir = tmp_path / "runs" / "ghost"
    with pytest.raises(DataError, match=r"(?s)dataset\.json.*'ghost' \(mask value 3\).*remove them from 'classes'"
                                        r".*add labelled cases"):
        _setup(run_dir, toy_root)
    assert not run_dir.exists()  # checked before the run folder is made
    meta_path.write_text(json.dumps(meta))  # every class present again: the same folder is fine
    assert _setup(run_dir, toy_root).splits["counts"]["labeled"] == 6


@pytest.mark.parametrize("arg, value", [("n_labeled", "abc"), ("n_labeled", -1), ("n_labeled", 2.5),
                                        ("n_labeled", True), ("seed", -5), ("seed", "abc"), ("seed", 1.5),
                                        ("profile", "laptop"), ("profile", ""), ("dataset", "../toy"),
                                        ("dataset", "")])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, toy_root, arg, value):
    run_dir = tmp_path / "runs" / "r"
    with pytest.raises(DataError, match=f"{arg}|dataset name") as err:
        _setup(run_dir, toy_root, **{arg: value})
    assert repr(value) in str(err.value)
    assert not run_dir.exists()


def test_an_empty_run_dir_or_data_root_is_refused(tmp_path, toy_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for kw in ({"run_dir": ""}, {"run_dir": "  "}, {"run_dir": None}, {"data_root": ""}):
        with pytest.raises(DataError, match=f"{next(iter(kw))}=.* is empty"):
            _setup(**{"run_dir": tmp_path / "r", "toy_root": toy_root, **kw})
    assert sorted(os.listdir(tmp_path)) == ["data"]  # nothing written in the working directory
    # the notebooks' parameters cell: "" (also papermill's -p run_dir '') is the default folder, never the cwd
    run_dir, data_root = environment.resolve_dirs("smoke", False, "", "")
    assert (run_dir, data_root) == (environment.default_run_dir("smoke"), environment.default_data_root())
    assert os.path.isabs(run_dir) and os.path.isabs(data_root)


def test_a_folder_of_other_files_or_a_file_is_not_a_run_folder(tmp_path, toy_root):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")
    with pytest.raises(DataError, match=r"run_dir .*mine holds other files \(thesis\.tex\).*not a run folder"):
        _setup(other, toy_root)
    assert os.listdir(other) == ["thesis.tex"]
    with pytest.raises(DataError, match=r"run_dir=.*thesis\.tex.* is a file, not a folder"):
        _setup(other / "thesis.tex", toy_root)
    with pytest.raises(DataError, match=r"data_root=.*thesis\.tex.* is a file, not a folder"):
        _setup(tmp_path / "r", other / "thesis.tex")
    assert not (tmp_path / "r").exists()


def test_new_empty_sweep_made_and_earlier_run_folders_are_fine(tmp_path, toy_root):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _setup(empty, toy_root).splits["counts"]["labeled"] == 6
    sweep = tmp_path / "sweep_run"  # what a sweep writes before notebook 01: its lock, status.json, notebooks/
    (sweep / "notebooks").mkdir(parents=True)
    for name in (".sweep.lock", "status.json", "notebooks/01_data_preparation.ipynb"):
        (sweep / name).write_text("{}")
    _setup(sweep, toy_root)
    (empty / "use_your_student").mkdir()  # a run folder (config.json) may hold anything
    again = _setup(empty, toy_root)  # re-running a notebook on its own run folder
    assert again.splits == load_run(empty).splits
