"""The notebooks end to end (papermill, smoke profile) through the reproduction sweep.

One sweep of one run exercises, in a few minutes: every notebook 01-05 executed with papermill; a run interrupted
mid-way (fault injection after the first fine-tuning epoch), listed as failed with a non-zero exit status, and
resumed by re-running the sweep; the aggregated results.csv and report.md. (An impossible ``--n-labeled`` is refused
before any work: tests/test_settings_schema.py; pooling over seeds and failing runs beside finished ones:
tests/test_sweep_safety.py and tests/test_sweep_cluster.py, with stand-in notebooks.)
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tskd_utils import REPO_ROOT, reproduce, training
from tskd_utils.evaluate import RESULT_COLUMNS
from tskd_utils.run import ALL_METHODS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sweep")


def _sweep(out, data_root, capsys):
    code = reproduce.main(["--profile", "smoke", "--dataset", "phantom", "--data-root", str(data_root),
                           "--n-labeled", "4", "--seeds", "0", "--out", str(out)])
    return code, capsys.readouterr().out


def test_sweep_interrupted_failing_and_resumed(sweep_dir, monkeypatch, capsys):
    out, data_root = sweep_dir / "runs", sweep_dir / "data"
    # 1st sweep: the run is cut after one fine-tuning epoch
    monkeypatch.setenv(training.STOP_ENV, "finetune:1")
    code, log = _sweep(out, data_root, capsys)
    assert code == 1
    assert "n_labeled=4 seed=0: FAILED in 04_distillation" in log and "Failed runs" in log
    status = json.loads((out / "phantom_n4_s0" / "status.json").read_text())
    assert status["notebooks"]["03_diffusion_synthesis"]["state"] == "done"
    assert status["notebooks"]["04_distillation"]["state"] == "failed"
    assert "StageInterrupted" in status["notebooks"]["04_distillation"]["error"]
    executed = {p: p.stat().st_mtime_ns for p in (out / "phantom_n4_s0" / "notebooks").glob("0[123]_*.ipynb")}
    assert len(executed) == 3
    # 2nd sweep: the interrupted run resumes (01-03 are not executed again) and finishes
    monkeypatch.delenv(training.STOP_ENV)
    code, log = _sweep(out, data_root, capsys)
    assert code == 0 and "Failed runs" not in log
    assert {p: p.stat().st_mtime_ns for p in executed} == executed
    for seed in (0,):
        run = out / f"phantom_n4_s{seed}"
        assert json.loads((run / "status.json").read_text())["state"] == "done"
        assert sorted(p.name for p in (run / "notebooks").glob("*.ipynb")) == [f"{n}.ipynb" for n in reproduce.NOTEBOOKS]
        log_csv = (run / "students" / "ts_kd" / "finetune" / "log.csv").read_text().splitlines()
        assert len(log_csv) == 1 + 2  # every fine-tuning epoch once: resumed, not restarted
    results = pd.read_csv(out / "results.csv")
    assert list(results.columns) == RESULT_COLUMNS
    assert len(results) == len(ALL_METHODS) and set(results["method"]) == set(ALL_METHODS)
    assert results["dice"].between(0, 1).all() and (results["profile"] == "smoke").all()
    report = (out / "report.md").read_text()
    assert "| ts_kd |" in report and "Failed runs" not in report and (out / "dice_vs_n_labeled.png").is_file()
    # ts_kd against every other method, paired over the test cases (issue 10, section 3)
    paired = pd.read_csv(out / "paired.csv")
    assert set(paired["other"]) == (set(ALL_METHODS) | {"teacher_frozen"}) - {"ts_kd"}
    assert (paired["n_seeds"] == 1).all() and (paired["ci_low"] <= paired["mean_diff"]).all()
    assert "### Paired comparisons: ts_kd against every other method" in report
    assert not list((REPO_ROOT / "notebooks").glob("kernel-ipc*"))  # kernel sockets live in a private folder
    # 3rd sweep: finished runs are skipped
    code, log = _sweep(out, data_root, capsys)
    assert "n_labeled=4 seed=0: finished earlier, skipped" in log


def test_executed_notebooks_show_their_figures(sweep_dir):
    run = sweep_dir / "runs" / "phantom_n4_s0"
    if not (run / "status.json").is_file():
        pytest.skip("needs the sweep of the previous test")
    figures = {p.name for p in (run / "figures").glob("*.png")}
    for expected in ("01_cases.png", "02_curves.png", "02_val_predictions.png", "04_pca.png", "05_test_cases.png"):
        assert expected in figures
    nb = json.loads((run / "notebooks" / "05_evaluation.ipynb").read_text())
    images = sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))
    assert images >= 3


def test_unknown_method_or_profile_stops_before_any_work(tmp_path, capsys):
    assert reproduce.main(["--profile", "smoke", "--methods", "ts_kd,magic", "--out", str(tmp_path / "r")]) == 2
    assert "valid methods" in capsys.readouterr().err
    assert reproduce.main(["--profile", "tiny", "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
