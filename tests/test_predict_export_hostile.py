"""predict and export on hostile ground: an --out that cannot be written, write errors half-way through a folder,
a run folder whose config.json is broken, images too large for memory.

None of these needs a trained model: where only the files matter a threshold "model" stands in for the student,
and the refusals come before any model is loaded.
"""

from __future__ import annotations

import errno
import json
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tskd_utils import data, export, predict
from tskd_utils.data import unletterbox
from tskd_utils.io import DataError

UNWRITABLE = Path("/proc/tskd-out")  # nothing can create files in /proc, root included (os.access says it can)


@pytest.fixture
def fake_model(monkeypatch):
    """predict's model: class 1 where the image is brighter than mid-grey, else background (3 classes)."""
    def forward(x, valid=None):
        return np.concatenate([0.5 - x, x - 0.5, np.full_like(x, -1.0)], axis=1)

    monkeypatch.setattr(predict, "load_segmenter", lambda *a, **k: predict.Segmenter("threshold", 16, forward))


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray((rng.random((30, 40)) * 255).astype(np.uint8)).save(folder / f"{name}.png")
    return folder


def predict_cli(images, out, *extra) -> int:
    """predict's command line with the stand-in model (the onnx backend needs no run folder)."""
    return predict.main(["--backend", "onnx", "--onnx", "unused.onnx", "--input", str(images), "--out", str(out),
                         *extra])


def run_folder(tmp_path, **changes) -> Path:
    """A run folder's config.json as setup_run writes it (smoke profile), with ``changes`` (None: key removed)."""
    cfg = {"dataset": "toy", "data_root": str(tmp_path / "data"), "n_labeled": 6, "seed": 0, "profile": "smoke",
           "overrides": {}}
    cfg.update(changes)
    folder = tmp_path / "run"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return folder


# ------------------------------------------------------------------------------ predict


def test_predict_goes_past_files_it_cannot_write_and_lists_them(fake_model, images, tmp_path, monkeypatch, capsys):
    """A folder where a mask goes and a disk that fills up while an overlay is written: the other images are
    written, nothing truncated or temporary is left, the failures are listed, the exit status is 1."""
    out = tmp_path / "out"
    (out / "masks" / "b.png").mkdir(parents=True)
    real = predict.write_png

    def disk_fills_up(path, arr):
        if path.parent.name == "overlays" and path.name.startswith(".c.png"):
            path.write_bytes(b"\x89PNG\r\n\x1a\n half an overlay")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, arr)

    monkeypatch.setattr(predict, "write_png", disk_fills_up)
    status = predict_cli(images, out, "--overwrite")
    err = capsys.readouterr().err
    assert status == 1, err
    assert "2 file(s) failed" in err and "Traceback" not in err
    assert re.search(r"b\.png: cannot write .*masks/b\.png: Is a directory", err), err
    assert re.search(r"c\.png: cannot write .*overlays/c\.png: No space left on device", err), err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "masks/a.png", "overlays/a.png"]  # c's mask went again with its overlay; no temporary is left
    assert np.asarray(Image.open(out / "overlays" / "a.png")).shape == (30, 40, 3)


@pytest.mark.parametrize("kind", ["read-only", "a file", "inside a file"])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(kind, fake_model, images, tmp_path, monkeypatch,
                                                                  capsys):
    if kind == "read-only" and not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    (tmp_path / "file").write_text("x")
    out = {"read-only": UNWRITABLE, "a file": tmp_path / "file", "inside a file": tmp_path / "file" / "sub"}[kind]
    message = {"read-only": "cannot create files in /proc", "a file": "is a file, not a folder",
               "inside a file": f"cannot be made: {tmp_path / 'file'} is a file"}[kind]

    def no_work(*args, **kwargs):
        raise AssertionError("a model was loaded for an --out that cannot be written")

    monkeypatch.setattr(predict, "load_segmenter", no_work)
    monkeypatch.setattr(export, "trained_model", no_work)
    for command in (lambda: predict_cli(images, out),
                    lambda: export.main(["--run", str(run_folder(tmp_path)), "--out", str(out)])):
        status, err = command(), capsys.readouterr().err
        assert status == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: --out {out}") and message in err, err
        assert "dynamo" not in err
    with pytest.raises(DataError, match=re.escape(message)):
        export.export_student(run_folder(tmp_path), "ts_kd", out)


def test_the_dynamo_fallback_is_taken_only_when_the_dynamo_exporter_fails(tmp_path, monkeypatch, capsys):
    """Writing the file is not exporting: its error is raised as it is, without trying the TorchScript exporter."""
    real, calls = torch.onnx.export, []

    class Program:
        def save(self, path, external_data=False):
            raise PermissionError(errno.EACCES, "Permission denied", path)

    def dynamo_cannot_save(model, args, f=None, **kwargs):
        calls.append(kwargs["dynamo"])
        return Program() if kwargs["dynamo"] else real(model, args, f, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_cannot_save)
    model = torch.nn.Conv2d(1, 2, 1).eval()
    with pytest.raises(PermissionError):
        export.export_onnx(model, 8, tmp_path / "m.onnx")
    assert calls == [True] and "dynamo export failed" not in capsys.readouterr().err

    def dynamo_fails(model, args, f=None, **kwargs):
        if kwargs["dynamo"]:
            raise RuntimeError("unsupported op")
        return real(model, args, f, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    record = export.export_onnx(model, 8, tmp_path / "m.onnx")
    assert "TorchScript" in record["exporter"] and "dynamo export failed (RuntimeError: unsupported op)" in \
        capsys.readouterr().err


# --------------------------------------------------------------------------- run config


@pytest.mark.parametrize("changes, problem", [
    ({"profile": "nonexistent"}, "unknown profile 'nonexistent'"),
    ({"seed": None}, "missing keys ['seed']"),
    ({"overrides": {"teacher.no_such_setting": 1}}, "unknown profile setting 'teacher.no_such_setting'"),
    ({"n_labeled": "six"}, "'six'"),
])
def test_a_broken_config_json_is_named_with_what_is_wrong(changes, problem, images, tmp_path, capsys):
    folder = run_folder(tmp_path, **changes)
    where = re.escape(f"{folder.resolve() / 'config.json'}: ")
    with pytest.raises(DataError, match=where + r".*" + re.escape(problem)):
        predict.predict_files(folder, "ts_kd", images, tmp_path / "out")
    with pytest.raises(DataError, match=where + r".*" + re.escape(problem)):
        export.export_student(folder, "ts_kd", tmp_path / "export")
    assert predict.main(["--run", str(folder), "--input", str(images), "--out", str(tmp_path / "out")]) == 2
    assert export.main(["--run", str(folder), "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert err.count(f"error: {folder.resolve() / 'config.json'}: ") == 2 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "export").exists()


# ------------------------------------------------------------------------------- memory


def test_an_image_over_max_pixels_is_a_failure_of_that_file(fake_model, images, tmp_path, capsys):
    Image.fromarray(np.zeros((80, 100), np.uint8)).save(images / "big.png")
    status = predict_cli(images, tmp_path / "out", "--max-pixels", "5000")
    err = capsys.readouterr().err
    assert status == 1 and "1 file(s) failed" in err, err
    assert re.search(r"big\.png: 100x80 = 8,000 pixels, more than the 5,000 predict takes", err), err
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["a.png", "b.png", "c.png"]


def test_the_default_pixel_cap_refuses_a_large_image_before_decoding_it(tmp_path):
    """56 Mpx, over MAX_PIXELS (50 M): a PNG whose pixel data is cut off and a DICOM whose header claims that size
    are refused for their size, so their pixels were never decoded."""
    import pydicom

    from test_predict_export import write_dicom

    Image.new("L", (8000, 7000)).save(tmp_path / "big.png", compress_level=1)
    data = (tmp_path / "big.png").read_bytes()
    (tmp_path / "big.png").write_bytes(data[:len(data) // 2])
    write_dicom(tmp_path / "big.dcm", np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(tmp_path / "big.dcm")
    ds.Rows, ds.Columns = 7000, 8000
    ds.save_as(tmp_path / "big.dcm")
    for name in ("big.png", "big.dcm"):
        with pytest.raises(DataError, match=rf"{name}: 8000x7000 = 56,000,000 pixels, more than the 50,000,000"):
            predict.to_gray_uint8(tmp_path / name)


def peak_bytes_per_pixel(fn, *args) -> float:
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1] / args[0].size
    finally:
        tracemalloc.stop()


def test_overlay_and_windows_hold_no_float_copy_of_the_image_and_give_the_same_results(monkeypatch):
    """4 Mpx: the overlay and the 16-bit window keep under 16 bytes per pixel (a float64 copy alone is 8, the
    overlay computed in float per pixel took about 72); on a small image, computed in many blocks of rows, they
    and the label map are exactly what the whole-image formulas give."""
    from tskd_utils.viz import overlay

    rng = np.random.default_rng(0)
    gray, labels = rng.integers(0, 256, (2000, 2000), dtype=np.uint8), rng.integers(0, 3, (2000, 2000), np.uint8)
    deep = rng.integers(0, 60000, (2000, 2000), dtype=np.uint16)
    assert peak_bytes_per_pixel(predict.overlay_uint8, gray, labels) < 16
    assert peak_bytes_per_pixel(predict.window_percentiles, deep) < 16

    monkeypatch.setattr(data, "BLOCK_PIXELS", 997)  # by_rows: the helper of predict and the label maps
    gray, labels, deep = gray[:90, :70], rng.integers(0, 12, (90, 70), np.uint8), deep[:90, :70]  # 12: past the colours
    assert np.array_equal(predict.overlay_uint8(gray, labels), np.round(overlay(gray, labels) * 255).astype(np.uint8))
    raw = deep.astype(np.float64)
    lo, hi = np.percentile(raw, [0.5, 99.5])
    assert np.array_equal(predict.window_percentiles(deep),
                          np.round(np.clip((raw - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8))
    logits = torch.randn(3, 32, 32)
    assert np.array_equal(predict.label_map(logits, (90, 70)),
                          unletterbox(logits, (90, 70)).argmax(0).numpy().astype(np.uint8))
