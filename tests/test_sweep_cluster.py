"""Sweeps beyond one machine: any profile setting as a grid axis, runs as Ray tasks or a SLURM array job.

* The real smoke pipeline over a grid of two runs (``--grid teacher.lora_rank=2,4``) executed here and on a real local
  Ray runtime with 2 workers gives the same aggregate (the smoke runs are deterministic; both with one BLAS thread).
* A killed Ray worker's run is reported like a failing run and resumed by the next sweep (stand-in notebooks,
  tests/sweep_fakes.py, so that this costs seconds).
* The SLURM path runs through submitit's local executor (stand-in notebooks): same results as the local executor,
  a failing job is reported and resumed.
* A grid over two settings gives the right run names, results columns and report sections (run folders written
  directly, no kernels).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import threading
import time

import pandas as pd
import pytest
from sweep_fakes import fake_log, make_fake_notebooks, set_knobs, write_fake_run

from tskd_utils import reproduce, stats
from tskd_utils.evaluate import RESULT_COLUMNS

SMOKE = ["--profile", "smoke", "--dataset", "phantom", "--n-labeled", "4", "--seeds", "0", "--methods", "ts_kd,scratch",
         "--set", "diffusion.n_synthetic=0", "--grid", "teacher.lora_rank=2,4"]
RANKS = {2: "phantom_n4_s0_teacher.lora_rank-2", 4: "phantom_n4_s0_teacher.lora_rank-4"}


def _main(args) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = reproduce.main([str(a) for a in args])
    print(buf.getvalue())  # shown by pytest when a test fails
    return code, buf.getvalue()


@pytest.fixture(scope="module")
def one_thread():
    """One BLAS/OpenMP thread in every kernel (local and Ray): the same arithmetic, so the same Dice."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def ray_runtime(one_thread):
    ray = pytest.importorskip("ray", reason="the cluster extra is not installed: pip install -e '.[cluster]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def fake_notebooks(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake")
    (root / "data" / "toy").mkdir(parents=True)
    (root / "data" / "toy" / "dataset.json").write_text("{}")  # stand-in notebooks never read the dataset
    return make_fake_notebooks(root / "notebooks"), root / "data"


def _fake_args(notebooks, data_root, out, seeds="0,1"):
    return ["--profile", "smoke", "--dataset", "toy", "--data-root", data_root, "--n-labeled", "4", "--seeds", seeds,
            "--methods", "ts_kd,scratch", "--notebooks-dir", notebooks, "--out", out]


# ------------------------------------------------------------------- the real pipeline, local and on Ray


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke_data")


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, smoke_data, one_thread):
    out = tmp_path_factory.mktemp("local") / "runs"
    t0 = time.perf_counter()
    code, log = _main(SMOKE + ["--data-root", smoke_data, "--out", out])
    return out, code, log, time.perf_counter() - t0


@pytest.fixture(scope="module")
def ray_sweep(tmp_path_factory, smoke_data, ray_runtime, local_sweep):
    out = tmp_path_factory.mktemp("ray") / "runs"
    t0 = time.perf_counter()
    code, log = _main(SMOKE + ["--data-root", smoke_data, "--out", out, "--executor", "ray"])
    return out, code, log, time.perf_counter() - t0


@pytest.mark.slow
def test_grid_sweep_names_columns_and_report(local_sweep):
    out, code, log, _ = local_sweep
    assert code == 0, log
    assert "[1/2] phantom n_labeled=4 seed=0 teacher.lora_rank=2: 01_data_preparation (elapsed" in log
    assert {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("_")} == set(RANKS.values())
    for rank, name in RANKS.items():
        cfg = json.loads((out / name / "config.json").read_text())
        assert cfg["overrides"] == {"diffusion.n_synthetic": 0, "teacher.lora_rank": rank}
        assert cfg["resolved_profile"]["teacher"]["lora_rank"] == rank
    results = pd.read_csv(out / "results.csv")
    assert list(results.columns) == RESULT_COLUMNS + ["teacher.lora_rank"]
    assert sorted(results["teacher.lora_rank"].unique()) == [2, 4] and len(results) == 2 * 3
    report = (out / "report.md").read_text()
    assert "### Dice against teacher.lora_rank" in report and (out / "dice_vs_teacher.lora_rank.png").is_file()
    assert "### Paired comparisons: ts_kd against every other method" in report
    # the sweep ends with the report's tables printed, not only its path
    tail = log.split("runs finished in", 1)[1]
    assert "\n### Dice\n" in tail and "### Paired comparisons: ts_kd" in tail and "| ts_kd |" in tail.replace("**", "")
    paired = pd.read_csv(out / "paired.csv")
    assert set(paired["other"]) >= {"teacher", "scratch"} and set(paired["teacher.lora_rank"]) == {2, 4}


@pytest.mark.slow
def test_ray_sweep_equals_local(ray_sweep, local_sweep):
    out, code, log, seconds = ray_sweep
    assert code == 0, log
    assert "ray: 2 run(s) submitted (1 CPU, 0 GPU each; cluster 2 CPU" in log
    for rank in RANKS:  # the driver prints the same progress lines as a local sweep
        for nb in reproduce.NOTEBOOKS:
            assert f"seed=0 teacher.lora_rank={rank}: {nb} (elapsed" in log
        assert f"seed=0 teacher.lora_rank={rank}: done in" in log
    key = ["dataset", "n_labeled", "seed", "method", "teacher.lora_rank"]
    ray_res = pd.read_csv(out / "results.csv").sort_values(key).reset_index(drop=True)
    local_res = pd.read_csv(local_sweep[0] / "results.csv").sort_values(key).reset_index(drop=True)
    assert list(ray_res.columns) == list(local_res.columns)
    pd.testing.assert_frame_equal(ray_res[key + ["dice", "iou", "hd95", "params_m"]],
                                  local_res[key + ["dice", "iou", "hd95", "params_m"]])
    pd.testing.assert_frame_equal(pd.read_csv(out / "paired.csv"), pd.read_csv(local_sweep[0] / "paired.csv"))
    # the two runs were Ray tasks on two workers at the same time
    spans = []
    for name in RANKS.values():
        s = json.loads((out / name / "status.json").read_text())
        spans.append((s["started"], s["started"] + s["seconds"]))
    assert max(a for a, _ in spans) < min(b for _, b in spans), f"runs did not overlap: {spans}"
    print(f"wall time: local {local_sweep[3]:.0f} s, ray {seconds:.0f} s (2 smoke runs, 2 cores)")


# ------------------------------------------------------------------- failures on Ray and SLURM (stand-in notebooks)


@pytest.mark.slow
def test_killed_ray_worker_is_reported_and_resumed(tmp_path, fake_notebooks, ray_runtime):
    notebooks, data_root = fake_notebooks
    out = tmp_path / "runs"
    victim = out / "toy_n4_s0"
    set_knobs(out, sleep_02=8)  # notebook 02 of every run lasts long enough to be killed in
    killed = {}

    def kill_worker():
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                s = json.loads((victim / "status.json").read_text())
            except (OSError, ValueError):
                s = {}
            if s.get("notebooks", {}).get("02_teacher_lora_finetuning", {}).get("state") == "running":
                killed["pid"] = s["pid"]
                os.kill(s["pid"], signal.SIGKILL)  # the Ray worker process executing the run
                return
            time.sleep(0.1)

    thread = threading.Thread(target=kill_worker, daemon=True)
    thread.start()
    code, log = _main(_fake_args(notebooks, data_root, out) + ["--executor", "ray"])
    thread.join()
    assert killed["pid"] != os.getpid()
    assert code == 1
    assert ("[1/2] toy n_labeled=4 seed=0: FAILED in 02_teacher_lora_finetuning: the Ray worker executing it died "
            "(WorkerCrashedError") in log
    assert "Failed runs (re-run the same command to resume them)" in log
    assert "[2/2] toy n_labeled=4 seed=1: done in" in log  # the other run went on
    status = json.loads((victim / "status.json").read_text())
    assert status["state"] == "failed" and status["notebooks"]["01_data_preparation"]["state"] == "done"
    assert "died" in status["notebooks"]["02_teacher_lora_finetuning"]["error"]
    assert "| toy_n4_s0 | failed |" in (out / "report.md").read_text()

    set_knobs(out)
    code, log = _main(_fake_args(notebooks, data_root, out) + ["--executor", "ray"])
    assert code == 0, log
    assert "[2/2] toy n_labeled=4 seed=1: finished earlier, skipped" in log
    assert "[1/2] toy n_labeled=4 seed=0: 02_teacher_lora_finetuning (elapsed" in log
    assert "[1/2] toy n_labeled=4 seed=0: 01_data_preparation" not in log  # resumed, not restarted
    assert [line.split()[0] for line in fake_log(victim)].count("01_data_preparation") == 1
    assert json.loads((victim / "status.json").read_text())["state"] == "done"
    assert len(pd.read_csv(out / "results.csv")) == 2 * 3


@pytest.mark.slow
def test_slurm_path_with_submitit_local_executor(tmp_path, fake_notebooks):
    pytest.importorskip("submitit", reason="the cluster extra is not installed: pip install -e '.[cluster]'")
    notebooks, data_root = fake_notebooks
    slurm = ["--executor", "slurm", "--slurm-cluster", "local", "--slurm-time", "10"]
    code, log = _main(_fake_args(notebooks, data_root, tmp_path / "local"))
    assert code == 0, log
    # a job that fails in notebook 04 is reported; the next sweep resumes it from there
    set_knobs(tmp_path / "slurm", fail="04_distillation")
    code, log = _main(_fake_args(notebooks, data_root, tmp_path / "slurm") + slurm)
    assert code == 1
    assert "slurm: 2 run(s) submitted as job" in log
    assert "[1/2] toy n_labeled=4 seed=0: 03_diffusion_synthesis (elapsed" in log
    assert "[2/2] toy n_labeled=4 seed=1: FAILED in 04_distillation: RuntimeError: injected failure" in log
    set_knobs(tmp_path / "slurm")
    code, log = _main(_fake_args(notebooks, data_root, tmp_path / "slurm") + slurm)
    assert code == 0, log
    for run in ("toy_n4_s0", "toy_n4_s1"):
        executed = [line.split()[0] for line in fake_log(tmp_path / "slurm" / run)]
        assert executed.count("01_data_preparation") == 1 and executed.count("05_evaluation") == 1
    assert (tmp_path / "slurm" / "_slurm").is_dir()  # submitit's job folders, beside the runs
    local = pd.read_csv(tmp_path / "local" / "results.csv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "slurm" / "results.csv"), local)


# ------------------------------------------------------------------- a grid over two settings (no kernels)


def test_grid_over_two_settings_names_columns_and_report(tmp_path):
    combos = reproduce.validate("smoke", "phantom", tmp_path / "data", [10], [0, 1], tmp_path / "runs", {},
                                {"teacher.lora_rank": [4, 8], "diffusion.n_synthetic": [0, 200]},
                                reproduce.REPO_ROOT / "notebooks")
    assert combos == [{"teacher.lora_rank": 4, "diffusion.n_synthetic": 0},
                      {"teacher.lora_rank": 4, "diffusion.n_synthetic": 200},
                      {"teacher.lora_rank": 8, "diffusion.n_synthetic": 0},
                      {"teacher.lora_rank": 8, "diffusion.n_synthetic": 200}]
    assert reproduce.run_name("phantom", 10, 1, combos[1]) == \
        "phantom_n10_s1_teacher.lora_rank-4_diffusion.n_synthetic-200"
    out = tmp_path / "runs"
    for seed in (0, 1):
        for c in combos:
            write_fake_run(out, "phantom", 10, seed, c,
                           shift=0.02 * (c["teacher.lora_rank"] == 8) + 0.01 * (c["diffusion.n_synthetic"] > 0))
    rows = reproduce.aggregate(out, profile="smoke", axes=["teacher.lora_rank", "diffusion.n_synthetic"])
    assert rows == 2 * 4 * 4
    results = pd.read_csv(out / "results.csv")
    assert list(results.columns) == RESULT_COLUMNS + ["teacher.lora_rank", "diffusion.n_synthetic"]
    assert results.groupby(["teacher.lora_rank", "diffusion.n_synthetic"]).size().tolist() == [8, 8, 8, 8]
    report = (out / "report.md").read_text()
    assert "Grid: `teacher.lora_rank` = 4, 8; `diffusion.n_synthetic` = 0, 200" in report
    for axis, other in (("teacher.lora_rank", "diffusion.n_synthetic"), ("diffusion.n_synthetic", "teacher.lora_rank")):
        assert f"### Dice against {axis}" in report and (out / f"dice_vs_{axis}.png").is_file()
        section = report.split(f"### Dice against {axis}")[1].split("###")[0]
        assert f"| n_labeled | {other} | method |" in section
    # Dice of ts_kd against lora_rank with n_synthetic=0 held fixed: mean and t-interval over the two seeds
    ts = results[(results["method"] == "ts_kd") & (results["diffusion.n_synthetic"] == 0)]
    m4, m8 = (ts[ts["teacher.lora_rank"] == r]["dice"].mean() for r in (4, 8))
    section = report.split("### Dice against teacher.lora_rank")[1].split("###")[0]
    assert f"| 10 | 0 | ts_kd | {m4:.3f} [" in section and f"| {m8:.3f} [" in section
    paired = pd.read_csv(out / "paired.csv")
    assert len(paired) == 4 * 3 and set(paired["n_seeds"]) == {2}  # 4 settings x (teacher, mae, scratch)
    assert list(paired.columns[:5]) == ["dataset", "profile", "n_labeled", "teacher.lora_rank", "diffusion.n_synthetic"]
    assert "ts_kd - mae" in report and "within noise" in report and "ts_kd better" in report


def test_grid_arguments_are_checked(tmp_path):
    root = reproduce.REPO_ROOT / "notebooks"

    def check(grid, overrides=None):
        return reproduce.validate("smoke", "phantom", tmp_path, [4], [0], tmp_path / "r", overrides or {}, grid, root)

    with pytest.raises(reproduce.SweepError, match="unknown profile setting 'teacher.rank'"):
        check({"teacher.rank": [4, 8]})
    with pytest.raises(reproduce.SweepError, match="expected an integer"):
        check({"teacher.lora_rank": ["many"]})
    with pytest.raises(reproduce.SweepError, match="both a --set override and a --grid axis"):
        check({"teacher.lora_rank": [4]}, {"teacher.lora_rank": 8})
    with pytest.raises(reproduce.SweepError, match="repeats a value"):
        check({"teacher.lora_rank": [4, 4]})
    with pytest.raises(reproduce.SweepError, match="repeats a value"):  # --grid teacher.epochs=1,1.0: one experiment
        check({"teacher.epochs": reproduce.parse_grid(["teacher.epochs=1,1.0"])["teacher.epochs"]})
    assert len(check({"teacher.lr": [0.001, 0.0015]})) == 2
    with pytest.raises(reproduce.SweepError, match="empty item"):
        reproduce.parse_grid(["teacher.lora_rank=4,,8"])
    assert reproduce.parse_grid(["teacher.lora_stages=[1,2],[3]", "teacher.name=tiny"]) == \
        {"teacher.lora_stages": [[1, 2], [3]], "teacher.name": ["tiny"]}
    assert stats.format_interval(0.01, -0.005, 0.02) == "+1.0 points [-0.5, +2.0]"


def test_progress_line_says_which_cell_and_its_latest_output():
    """make demo / reproduce print where a notebook is (cell, tqdm bar), read from papermill's saved notebook."""
    pm = {"papermill": {"start_time": "2026-12-02T12:00:00"}}
    nb = {"cells": [{"cell_type": "markdown", "source": "# x"},
                    {"cell_type": "code", "metadata": pm, "outputs": [{"text": "run ... | seed 0\n"}]},
                    {"cell_type": "code", "metadata": pm,
                     "outputs": [{"text": ["teacher prefix:  10%| | 6/60\r", "teacher prefix:  50%| | 30/60\r"]}]},
                    {"cell_type": "code", "metadata": {}, "outputs": []}]}
    assert reproduce.progress_line(nb) == "cell 2/3: teacher prefix:  50%| | 30/60"
    assert reproduce.progress_line({"cells": [{"cell_type": "code", "metadata": {}, "outputs": []}]}) is None


def test_report_table_takes_only_the_sections_own_tables(tmp_path):
    report = tmp_path / "report.md"
    report.write_text("# r\n\n### Dice\n\nmean over seeds\n\n| method | dice |\n|---|---|\n| ts_kd | 0.9 |\n\n"
                      "### IoU\n\n| method | iou |\n\n### Paired comparisons: ts_kd against every other method\n\n"
                      "None: ts_kd is not among this section's methods.\n\n### Efficiency (CPU, batch 1, median)\n\n"
                      "| model | ms |\n|---|---|\n| ts_kd | 7 |\n")
    table = reproduce.report_table(report)
    assert "| ts_kd | 0.9 |" in table and "mean over seeds" in table and "| method | iou |" not in table
    assert "None: ts_kd is not among" in table and "| ts_kd | 7 |" not in table and "Efficiency" not in table
    assert reproduce.report_table(tmp_path / "missing.md") == ""
