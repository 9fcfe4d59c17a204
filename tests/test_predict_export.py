"""Using a trained student: prediction on new image files, ONNX export with its parity check, the model card.

One smoke-profile run on the toy dataset is trained once for the module (a student that really
segments: fine-tuned long enough for test Dice near 0.8, so that mask comparisons are not between
two all-background maps) and exported once.
"""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from tskd_utils import evaluate, predict
from tskd_utils.export import CARD_NAME, FAILED_NAME, ONNX_NAME, PARITY_NAME, ParityError, export_student, \
    onnx_session
from tskd_utils.io import DataError, read_image, read_mask

from conftest import make_toy_dataset

OVERRIDES = {"diffusion.n_synthetic": 0, "teacher.head_epochs": 1, "teacher.epochs": 1,
             "teacher.cached_augmentations": 0, "finetune.epochs": 12, "finetune.steps_per_epoch": 3,
             "finetune.lr": 0.005, "finetune.augment": False}


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A smoke run with a trained teacher, a trained ts_kd student and test metrics."""
    from tskd_utils import distill, teacher
    from tskd_utils.run import setup_run

    root = tmp_path_factory.mktemp("use")
    make_toy_dataset(root / "data")
    r = setup_run(root / "runs" / "r0", profile="smoke", dataset="toy", data_root=root / "data", n_labeled=6,
                  seed=0, overrides=OVERRIDES)
    teacher.train_teacher(r)
    distill.run_method(r, "ts_kd")
    evaluate.evaluate_run(r, methods=["ts_kd"], measure_efficiency=False)
    return r


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    record = export_student(run, "ts_kd", out)
    return out, record


def toy_image(run, k: int = 0) -> np.ndarray:
    return read_image(run.info.case(run.splits["test"][k]).image)


def write_dicom(path, stored: np.ndarray, photometric: str = "MONOCHROME2", window: bool = True,
                slope: float = 4.0, intercept: float = -1000.0) -> None:
    """A 12-bit CT-like slice: value = stored * slope + intercept, with a window that maps the values of
    stored 0..255 back onto 0..255 exactly (DICOM linear window: width 1021, center -489.5)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "OT", stored.shape[0], stored.shape[1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = -489.5, 1021
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def inputs(run, tmp_path_factory):
    """One folder with a portrait and a landscape PNG, an RGB JPEG, a 16-bit TIFF and a DICOM slice."""
    d = tmp_path_factory.mktemp("inputs")
    im = toy_image(run)
    files = {"portrait.png": cv2.resize(im, (45, 70), interpolation=cv2.INTER_LINEAR),
             "landscape.png": cv2.resize(toy_image(run, 1), (70, 45), interpolation=cv2.INTER_LINEAR),
             "small.png": cv2.resize(toy_image(run, 2), (28, 20), interpolation=cv2.INTER_AREA)}
    for name, arr in files.items():
        Image.fromarray(arr).save(d / name)
    rgb = np.stack([im, np.clip(im.astype(int) + 20, 0, 255), im // 2], -1).astype(np.uint8)
    Image.fromarray(rgb).save(d / "colour.jpg", quality=95)
    deep = im.astype(np.uint16) * 40 + 1000  # 12-bit-like values in a 16-bit file
    deep[0, 0] = 65535  # one hot pixel: a min/max window would crush the contrast
    Image.fromarray(deep).save(d / "deep.tif")
    write_dicom(d / "slice.dcm", im.astype(np.uint16))
    return d


@pytest.fixture(scope="module")
def predicted(run, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred")
    report = predict.predict_files(run, "ts_kd", inputs, out, progress=False)
    return out, report


def masks_of(out) -> dict:
    return {p.stem: read_mask(p) for p in sorted((out / "masks").glob("*.png"))}


# ----------------------------------------------------------------------- reading formats


def test_every_format_gives_a_mask_and_overlay_at_its_original_size(run, inputs, predicted):
    out, report = predicted
    assert report.ok and len(report.written) == 6
    sizes = {"portrait": (70, 45), "landscape": (45, 70), "small": (20, 28), "colour": (40, 40), "deep": (40, 40),
             "slice": (40, 40)}
    masks = masks_of(out)
    assert set(masks) == set(sizes)
    for name, hw in sizes.items():
        assert masks[name].shape == hw, name
        assert set(np.unique(masks[name])) <= {0, 1, 2}
        overlay = np.asarray(Image.open(out / "overlays" / f"{name}.png"))
        assert overlay.shape == hw + (3,) and overlay.dtype == np.uint8
    assert all((m > 0).mean() > 0.1 for m in masks.values())  # a student that segments, not all background
    assert any("deep.tif" in n and "percentile" in n for n in report.notes)


def test_colour_jpeg_is_read_as_the_dataset_reads_images(inputs):
    gray, note = predict.to_gray_uint8(inputs / "colour.jpg")
    assert note is None and np.array_equal(gray, read_image(inputs / "colour.jpg"))


def test_16_bit_tiff_is_windowed_by_percentiles_not_min_max(inputs, tmp_path):
    raw = np.asarray(Image.open(inputs / "deep.tif")).astype(np.float64)
    gray, note = predict.to_gray_uint8(inputs / "deep.tif")
    lo, hi = np.percentile(raw, [0.5, 99.5])
    assert np.array_equal(gray, np.round(np.clip((raw - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8))
    assert "percentile" in note and gray[0, 0] == 255
    assert np.array_equal(gray, read_image(inputs / "deep.tif"))  # as the dataset converters read it
    min_max = np.round((raw - raw.min()) / (raw.max() - raw.min()) * 255)
    assert np.median(gray) - np.median(min_max) > 40  # the hot pixel did not crush the contrast
    rgb16 = np.stack([raw, raw, raw], -1).astype(np.uint16)  # 16-bit colour: PIL alone would cut it to 8 bit
    for name in ("rgb16.tif", "rgb16.png"):
        cv2.imwrite(str(tmp_path / name), rgb16)
        gray_rgb, note = predict.to_gray_uint8(tmp_path / name)
        assert "16-bit colour" in note and np.abs(gray_rgb.astype(int) - gray).max() <= 1, name


def test_dicom_gets_rescale_slope_intercept_then_its_window(run, inputs, tmp_path):
    im = toy_image(run)
    gray, note = predict.to_gray_uint8(inputs / "slice.dcm")
    assert note is None and np.array_equal(gray, im)  # slope 4, intercept -1000 and the window undo each other
    write_dicom(tmp_path / "inverted", im.astype(np.uint16), photometric="MONOCHROME1")  # no extension: magic
    assert np.array_equal(predict.to_gray_uint8(tmp_path / "inverted")[0], 255 - im)
    write_dicom(tmp_path / "nowindow.dcm", im.astype(np.uint16), window=False)
    gray, note = predict.to_gray_uint8(tmp_path / "nowindow.dcm")
    assert "percentile" in note and gray.min() == 0 and gray.max() == 255


# ------------------------------------------------------------------- same as evaluation


def test_masks_equal_the_evaluation_path(run, tmp_path):
    cases = run.splits["test"]
    folder = tmp_path / "cases"
    folder.mkdir()
    for c in cases:
        (folder / f"{c}.png").write_bytes(run.info.case(c).image.read_bytes())
    predict.predict_files(run, "ts_kd", folder, tmp_path / "out", progress=False)
    ours = masks_of(tmp_path / "out")
    for c, theirs in zip(cases, evaluate.load_predictions(run, "ts_kd", cases)):  # written by evaluate_run
        assert np.array_equal(ours[c], theirs), c
    model = evaluate.load_model(run, "ts_kd")[0]
    portrait = cv2.resize(toy_image(run), (45, 70), interpolation=cv2.INTER_LINEAR)
    expected = evaluate.to_label_map(evaluate.student_logits(run, model, [portrait])[0], portrait.shape)
    segmenter = predict.load_segmenter(run, "ts_kd")
    assert np.array_equal(segmenter(portrait), expected) and (expected > 0).any()


def test_teacher_runs_live_and_leaves_the_feature_caches_alone(run, inputs, tmp_path):
    def snapshot():
        return {p: p.stat().st_mtime_ns for base in (run.dir, run.shared_cache_dir) for p in base.rglob("*")}

    before = snapshot()
    report = predict.predict_files(run, "teacher", inputs / "portrait.png", tmp_path / "t", progress=False)
    assert snapshot() == before
    assert report.ok and read_mask(tmp_path / "t" / "masks" / "portrait.png").shape == (70, 45)
    assert "teacher" in report.model


# ------------------------------------------------------------------------------ bad input


def test_a_folder_run_goes_past_bad_files_and_lists_them(run, inputs, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.png").write_bytes((inputs / "portrait.png").read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\1\2\3")
    (folder / "readme.txt").write_text("not an image")
    status = predict.main(["--run", str(run.dir), "--input", str(folder), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == 1, err
    assert "2 file(s) failed" in err and "broken.png" in err and "corrupt.dcm" in err and "readme.txt" in err
    assert masks_of(tmp_path / "o").keys() == {"good"}


@pytest.mark.parametrize("content, name, message", [
    (b"garbage", "bad.png", "not a readable image"),
    (b"\0" * 128 + b"DICM" + b"\1\2", "bad.dcm", "DICOM file has no pixel data"),
    (b"GIF89a", "anim.gif", "unsupported format .gif"),
])
def test_a_single_bad_file_raises_naming_it(run, tmp_path, content, name, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"{re.escape(name)}.*{message}|{message}.*{re.escape(name)}"):
        predict.predict_files(run, "ts_kd", tmp_path / name, tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "masks").exists()


def test_bad_folders_runs_and_methods_are_refused_naming_them(run, inputs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=rf"{re.escape(str(empty))}: no images.*notes.txt"):
        predict.predict_files(run, "ts_kd", empty, tmp_path / "o")
    twins = tmp_path / "twins"
    twins.mkdir()
    for name in ("x.png", "x.tif"):
        Image.open(inputs / "portrait.png").save(twins / name)
    with pytest.raises(DataError, match=r"x\.png and .*x\.tif would both write masks/x\.png"):
        predict.predict_files(run, "ts_kd", twins, tmp_path / "o")
    with pytest.raises(DataError, match=r"input not found: .*missing\.png"):
        predict.predict_files(run, "ts_kd", tmp_path / "missing.png", tmp_path / "o")
    with pytest.raises(DataError, match=r"no trained 'mae' model.*students/mae/student.safetensors"):
        predict.predict_files(run, "mae", inputs, tmp_path / "o")
    with pytest.raises(DataError, match=r"'nonsense'"):
        predict.predict_files(run, "nonsense", inputs, tmp_path / "o")
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path))}/config.json is missing.*not a run folder"):
        predict.predict_files(tmp_path, "ts_kd", inputs, tmp_path / "o")
    with pytest.raises(DataError, match="needs --onnx"):
        predict.predict_files(run, "ts_kd", inputs, tmp_path / "o", backend="onnx")
    assert not (tmp_path / "o").exists()
    assert predict.main(["--run", str(tmp_path), "--input", str(inputs), "--out", str(tmp_path / "o")]) == 2


def test_existing_outputs_are_never_overwritten_without_overwrite(run, inputs, tmp_path, capsys):
    out = tmp_path / "o"
    predict.predict_files(run, "ts_kd", inputs / "portrait.png", out, progress=False)
    mask = out / "masks" / "portrait.png"
    mask.write_bytes(b"sentinel")
    with pytest.raises(FileExistsError, match=re.escape(str(mask))):
        predict.predict_files(run, "ts_kd", inputs, out, progress=False)
    assert mask.read_bytes() == b"sentinel"  # refused before any work: no other image was predicted
    assert [p.name for p in (out / "masks").iterdir()] == ["portrait.png"]
    status = predict.main(["--run", str(run.dir), "--input", str(inputs), "--out", str(out)])
    assert status == 2 and "--overwrite" in capsys.readouterr().err
    assert predict.main(["--run", str(run.dir), "--input", str(inputs), "--out", str(out), "--overwrite"]) == 0
    assert read_mask(mask).shape == (70, 45) and len(masks_of(out)) == 6


# --------------------------------------------------------------------------------- export


def test_onnx_export_passes_its_parity_check_on_the_test_images(run, exported):
    out, record = exported
    parity = json.loads((out / PARITY_NAME).read_text())["parity"]
    assert parity["passed"] and parity["n_images"] == len(run.splits["test"])
    assert parity["max_abs_diff"] <= 1e-4 * max(1.0, parity["logit_scale"]) == parity["tolerance"]
    assert parity["pixel_agreement"] >= 0.999
    session = onnx_session(out / ONNX_NAME)  # independently: dynamic batch, other images, same logits
    model = evaluate.load_model(run, "ts_kd")[0]
    size = run.profile.data.image_size
    assert [i.name for i in session.get_inputs()] == ["image"] and session.get_outputs()[0].name == "logits"
    for batch in (1, 5):
        x = np.random.default_rng(batch).random((batch, 1, size, size), dtype=np.float32)
        got = session.run(["logits"], {"image": x})[0]
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy()
        assert got.shape == ref.shape and np.abs(got - ref).max() <= parity["tolerance"]


def test_parity_falls_back_to_the_given_images_without_test_images(run, inputs):
    import dataclasses

    from tskd_utils.export import parity_images

    images, source = parity_images(run)
    assert len(images) == len(run.splits["test"]) and "test split" in source
    no_test = dataclasses.replace(run, _splits={**run.splits, "test": []})
    images, source = parity_images(no_test, [inputs])
    assert len(images) == 6 and "6 given images" in source and images[0].dtype == np.uint8
    with pytest.raises(DataError, match="--inputs"):
        parity_images(no_test)


def test_onnx_backend_gives_the_same_masks(run, inputs, exported, predicted, tmp_path):
    out, _ = exported
    report = predict.predict_files(run, "ts_kd", inputs, tmp_path / "onnx", backend="onnx", onnx=out / ONNX_NAME,
                                   progress=False)
    assert "onnxruntime" in report.model
    torch_masks, onnx_masks = masks_of(predicted[0]), masks_of(tmp_path / "onnx")
    assert torch_masks.keys() == onnx_masks.keys()
    same = sum((torch_masks[k] == onnx_masks[k]).sum() for k in torch_masks)
    assert same / sum(m.size for m in torch_masks.values()) >= 0.999


def test_the_model_card_contract_runs_without_tskd(run, inputs, exported, predicted, monkeypatch):
    out, _ = exported
    code = re.search(r"```python\n(.*?)```", (out / CARD_NAME).read_text(), re.S).group(1)
    monkeypatch.chdir(out)
    Image.open(inputs / "portrait.png").save(out / "image.png")
    scope: dict = {}
    exec(compile(code, "MODEL_CARD.md", "exec"), scope)  # numpy + OpenCV + Pillow + onnxruntime only
    expected = masks_of(predicted[0])["portrait"]
    assert scope["mask"].shape == expected.shape and (scope["mask"] == expected).mean() >= 0.999


def test_the_model_card_states_data_licence_metrics_speed_and_use(run, exported):
    from tskd_utils.stats import bootstrap_ci

    out, record = exported
    card = (out / CARD_NAME).read_text()
    for text in ("not for clinical use", "**toy**", "**CC0-1.0**", "n_labeled 6", "seed 0", "profile `smoke`",
                 "`tiny` image encoder", "LoRA r=4", "`unet_xs`", f"{record['params']:,} parameters",
                 "0 = background, 1 = ring, 2 = core", "SIZE = 32"):
        assert text in card, text
    summary = json.loads((run.metrics_dir / "summary.json").read_text())["methods"]["ts_kd"]
    import pandas as pd

    rows = pd.read_csv(run.metrics_dir / "per_case.csv")
    dice = rows[rows.method == "ts_kd"].groupby("case", sort=False)["dice"].mean().to_numpy()
    mean, low, high = bootstrap_ci(dice)
    assert abs(mean - summary["dice"]) < 1e-9 and low <= mean <= high
    assert f"| Dice | {mean:.3f} | [{low:.3f}, {high:.3f}] |" in card
    lat = record["latency"]
    assert lat["torch_ms"] > 0 and lat["onnxruntime_ms"] > 0
    assert f"| onnxruntime {lat['onnxruntime']} | {lat['onnxruntime_ms']:.2f} |" in card
    assert f"{record['parity']['max_abs_diff']:.2e}" in card and "Passed." in card


def test_export_refuses_to_overwrite_and_keeps_no_unverified_model(run, exported, tmp_path, monkeypatch):
    out, _ = exported
    with pytest.raises(FileExistsError, match=re.escape(str(out / ONNX_NAME))):
        export_student(run, "ts_kd", out)
    with pytest.raises(DataError, match=r"no trained 'mae' model"):
        export_student(run, "mae", tmp_path / "mae")
    real = predict.onnx_forward

    def broken(session):  # an exporter bug: a wrong op would look like this to the parity check
        forward = real(session)
        return lambda x: forward(x) + 0.05 * np.sign(forward(x))

    monkeypatch.setattr("tskd_utils.export.onnx_forward", broken)
    with pytest.raises(ParityError, match="fails the parity check"):
        export_student(run, "ts_kd", tmp_path / "bad", measure=False)
    assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == [FAILED_NAME]  # no model, no temporary
    assert json.loads((tmp_path / "bad" / FAILED_NAME).read_text())["parity"]["passed"] is False


def test_a_failed_export_leaves_the_previous_one_as_it_was(run, exported, tmp_path, monkeypatch, capsys):
    """--overwrite over a good export when the parity check fails (here: NaN logits): model.onnx, parity.json and
    MODEL_CARD.md stay as they were and no temporary is left; the failed check is in parity.failed.json, standard
    JSON (NaN as null). The next good export replaces the files and removes parity.failed.json."""
    import shutil

    from tskd_utils.export import main as export_main

    out = tmp_path / "export"
    shutil.copytree(exported[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = predict.onnx_forward
    monkeypatch.setattr("tskd_utils.export.onnx_forward", lambda session: lambda x: real(session)(x) * np.nan)
    status = export_main(["--run", str(run.dir), "--out", str(out), "--overwrite", "--no-latency"])
    err = capsys.readouterr().err
    assert status == 2 and "fails the parity check" in err and str(out / FAILED_NAME) in err, err
    failed = json.loads((out / FAILED_NAME).read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {FAILED_NAME}"))
    assert failed["parity"]["passed"] is False and failed["parity"]["max_abs_diff"] is None
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != FAILED_NAME} == before
    monkeypatch.undo()
    export_student(run, "ts_kd", out, overwrite=True, measure=False)
    assert not (out / FAILED_NAME).exists() and json.loads((out / PARITY_NAME).read_text())["parity"]["passed"]


def test_a_diverged_student_is_refused_by_predict_and_export(run, inputs, tmp_path, capsys):
    """Weights with NaN (what distill.lr=1e12 used to leave): no all-background masks, no ONNX file."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "run"
    shutil.copytree(run.dir, copy, ignore=shutil.ignore_patterns("cache", "_shared_cache"))
    weights = copy / "students" / "ts_kd" / "student.safetensors"
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    state = load_file(str(weights))
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 4)
    state[key][0] = float("nan")
    save_file(state, str(weights), metadata=meta)
    with pytest.raises(predict.NonFiniteModel, match=r"ts_kd .*non-finite logits.*diverged"):
        predict.predict_files(copy, "ts_kd", inputs, tmp_path / "o")
    assert not any((tmp_path / "o").rglob("*.png"))
    assert predict.main(["--run", str(copy), "--input", str(inputs), "--out", str(tmp_path / "o2")]) == 2
    assert "non-finite logits" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"ts_kd of .*: parameter ts_kd\..* holds \d+ non-finite values.*nothing was exported"):
        export_student(copy, "ts_kd", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_the_readmes_predict_and_export_commands_run_as_written(run, inputs, tmp_path):
    """README, "Use a trained student on your own images": the three commands, on this smoke run."""
    import shlex
    import subprocess
    import sys

    from test_readme_commands import readme_commands

    cmds = [c for c in readme_commands() if c.startswith(("python -m tskd_utils.predict", "python -m tskd_utils.export"))]
    assert len(cmds) == 3
    for cmd in cmds:
        argv = [sys.executable] + shlex.split(cmd)[1:]
        argv = [str(run.dir) if a == "runs/demo/phantom_n20_s0" else str(inputs) if a == "my_images/" else a
                for a in argv]
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr[-3000:]}"
    assert (tmp_path / "export" / "ts_kd" / "model.onnx").is_file()
    for out in ("predictions", "predictions_onnx"):
        assert len(list((tmp_path / out / "masks").glob("*.png"))) >= 3
