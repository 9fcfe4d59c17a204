"""The sweep keeps finished work whole and says what it does (issue 17, sweep side; issue 10 section 3).

Stand-in notebooks (tests/sweep_fakes.py) make each run take seconds:

* arguments are checked before any kernel starts (exit status 2, the value named, nothing created);
* a run folder is locked while a sweep executes it: a second sweep refuses that run, naming the holder;
* kernel sockets live in a private temporary folder, never in notebooks/;
* a finished run is skipped only when the files it claims are there and whole; a truncated or deleted file makes
  the run re-execute from the notebook that owns it, with the reason printed; a run finished under an older
  definition of its profile is executed again, naming the settings that changed;
* a requested method whose student file is missing after the run fails the run loudly;
* a run folder made with other settings is not reused;
* the report never averages two datasets together, nor runs made under two definitions of a profile, leaves out a
  run that is not finished, and its paired comparisons equal tskd_utils.stats on the runs' per-case tables.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from sweep_fakes import fake_log, make_fake_notebooks, set_knobs, write_fake_run

from tskd_utils import reproduce, runner, stats


def _main(args) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = reproduce.main([str(a) for a in args])
    print(buf.getvalue())
    return code, buf.getvalue()


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    root = tmp_path_factory.mktemp("fakes")
    (root / "data" / "toy").mkdir(parents=True)
    (root / "data" / "toy" / "dataset.json").write_text("{}")
    return make_fake_notebooks(root / "notebooks"), root / "data"


def _args(fakes, out, seeds="0", methods="ts_kd,scratch", *extra):
    notebooks, data_root = fakes
    return ["--profile", "smoke", "--dataset", "toy", "--data-root", data_root, "--n-labeled", "4", "--seeds", seeds,
            "--methods", methods, "--notebooks-dir", notebooks, "--out", out, *extra]


# ------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize("args, message", [
    (["--n-labeled", "0"], "--n-labeled '0': 0 is below 1"),
    (["--n-labeled", ""], "--n-labeled is empty"),
    (["--seeds", "0,,1"], "--seeds '0,,1' has an empty item"),
    (["--seeds", "-1"], "--seeds '-1': -1 is below 0"),
    (["--seeds", "0,0"], "0 is given twice"),
    (["--dataset", "nope"], "nope/dataset.json not found"),
    (["--dataset", "../x"], "a dataset is a folder name"),
    (["--grid", "teacher.lora_rank=4,,8"], "has an empty item"),
    (["--grid", "teacher.lora_rnk=4"], "unknown profile setting 'teacher.lora_rnk'"),
    (["--set", "teacher.epochs=many"], "expected an integer"),
])
def test_bad_arguments_stop_before_any_work(tmp_path, capsys, args, message):
    (tmp_path / "data" / "toy").mkdir(parents=True)
    (tmp_path / "data" / "toy" / "dataset.json").write_text("{}")
    base = ["--profile", "smoke", "--dataset", "toy", "--data-root", str(tmp_path / "data"), "--out",
            str(tmp_path / "runs")]
    with pytest.raises(SystemExit) if args[0] in ("--n-labeled", "--seeds") else contextlib.nullcontext() as exit_:
        code = reproduce.main(base + args)
    code = exit_.value.code if exit_ is not None else code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_out_must_be_a_writable_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert reproduce.main(["--profile", "smoke", "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert reproduce.main(["--profile", "smoke", "--out", str(tmp_path / "file" / "runs")]) == 2
    assert "cannot be made: " in capsys.readouterr().err


def test_executor_options_need_their_executor(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--profile", "smoke", "--slurm-partition", "gpu", "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and "--slurm-partition needs --executor slurm" in capsys.readouterr().err


def test_unreachable_ray_address_stops_before_any_work(tmp_path, capsys):
    pytest.importorskip("ray", reason="the cluster extra is not installed")
    code = reproduce.main(["--profile", "smoke", "--executor", "ray", "--ray-address", "127.0.0.1:1", "--out",
                           str(tmp_path / "runs")])
    assert code == 2 and "--ray-address 127.0.0.1:1: nothing answers there" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------ locks and sockets


@pytest.mark.slow
def test_second_sweep_on_a_locked_run_refuses(tmp_path, fakes):
    out = tmp_path / "runs"
    run = out / "toy_n4_s0"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom tskd_utils.reproduce import run_lock\n"
         f"with run_lock({str(run)!r}, command='the other sweep'):\n    print('held', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, log = _main(_args(fakes, out, "0,1"))
        assert code == 1
        assert f"[1/2] toy n_labeled=4 seed=0: FAILED in lock: {run} is being executed by another sweep (host " in log
        assert f"pid {holder.pid} since" in log and "this run was refused and left untouched" in log
        assert "[2/2] toy n_labeled=4 seed=1: done in" in log  # the other runs go on
        assert sorted(p.name for p in run.iterdir()) == [".sweep.lock", ".sweep.lock.json"]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    code, log = _main(_args(fakes, out, "0,1"))
    assert code == 0 and "[2/2] toy n_labeled=4 seed=1: finished earlier, skipped" in log
    assert not (run / ".sweep.lock.json").exists()


def test_kernel_sockets_in_a_private_folder(monkeypatch):
    base = Path(tempfile.mkdtemp(prefix="ipc-test-", dir="/tmp"))  # short: socket paths are limited to ~107 bytes
    monkeypatch.setattr(runner.tempfile, "tempdir", str(base))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = base / f"{reproduce.IPC_PREFIX}{int(dead.stdout)}-abc"  # left by a killed sweep
    stale.mkdir()
    (stale / "kernel-1").write_text("")
    try:
        with runner._kernel_ipc_dir() as a, runner._kernel_ipc_dir() as b:
            assert a != b and a.is_dir() and b.is_dir() and a.parent == base
            assert a.name.startswith(f"{reproduce.IPC_PREFIX}{os.getpid()}-")
            km = runner._kernel_manager_class(a)(kernel_name="python3")
            assert km.transport == "ipc" and km.ip == str(a / "kernel")
            assert len(km.ip) < 90  # room for "-<port>" within a Unix socket path
            assert not stale.exists()
        assert not a.exists() and not b.exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_no_sockets_left_beside_the_notebooks(tmp_path, fakes):
    code, log = _main(_args(fakes, tmp_path / "runs"))
    assert code == 0, log
    notebooks = fakes[0]
    assert sorted(p.name for p in notebooks.iterdir()) == [f"{nb}.ipynb" for nb in reproduce.NOTEBOOKS]


# ------------------------------------------------------------------------------------ what a finished run claims


@pytest.mark.slow
def test_truncated_or_deleted_files_reexecute_from_their_notebook(tmp_path, fakes):
    out = tmp_path / "runs"
    run = out / "toy_n4_s0"
    assert _main(_args(fakes, out))[0] == 0
    code, log = _main(_args(fakes, out))
    assert code == 0 and "finished earlier, skipped" in log
    assert len(fake_log(run)) == 5

    # a student file cut short: notebook 04 (and 05 after it) again, the truncated file kept aside
    student = run / "students" / "ts_kd" / "student.safetensors"
    whole = student.read_bytes()
    student.write_bytes(whole[:-20])  # the header is whole, the tensor data is not
    code, log = _main(_args(fakes, out))
    assert code == 0, log
    assert (f"[1/1] toy n_labeled=4 seed=0: students/ts_kd/student.safetensors is not a whole safetensors file "
            f"({len(whole) - 20} bytes; Error while deserializing header: incomplete metadata, file not fully "
            f"covered) (kept as student.safetensors.corrupt-") in log
    assert "re-executing from 04_distillation" in log
    assert fake_log(run)[5:] == ["04_distillation force=False", "05_evaluation force=False"]
    assert reproduce.check_run(run, ["ts_kd", "scratch"]) == []
    assert len(list(student.parent.glob("student.safetensors.corrupt-*"))) == 1

    # a deleted teacher file: notebook 02 again (its finished stages write it again), and every notebook after it
    (run / "teacher" / "head.safetensors").unlink()
    code, log = _main(_args(fakes, out))
    assert code == 0, log
    assert "teacher/head.safetensors is missing: re-executing from 02_teacher_lora_finetuning" in log
    assert fake_log(run)[7:] == ["02_teacher_lora_finetuning force=False", "03_diffusion_synthesis force=False",
                                 "04_distillation force=False", "05_evaluation force=False"]

    # a results table without a requested method's row: notebook 05 again
    results = pd.read_csv(run / "results.csv")
    results[results["method"] != "scratch"].to_csv(run / "results.csv", index=False)
    code, log = _main(_args(fakes, out))
    assert code == 0 and "results.csv has no row for scratch: re-executing from 05_evaluation" in log

    # a method asked for later that the finished run never trained: notebooks 04 and 05 for it
    code, log = _main(_args(fakes, out, "0", "ts_kd,scratch,mae"))
    assert code == 0 and "students/mae/student.safetensors is missing: re-executing from 04_distillation" in log
    assert set(pd.read_csv(run / "results.csv")["method"]) == {"teacher", "ts_kd", "scratch", "mae"}

    # a run finished under an older definition of its profile (a pull changed a schedule): every notebook again
    # (inside, the stages the change does not touch are reused), then skipped again, not executed forever
    cfg = json.loads((run / "config.json").read_text())
    epochs = cfg["resolved_profile"]["teacher"]["epochs"]
    cfg["resolved_profile"]["teacher"]["epochs"] = epochs + 7
    (run / "config.json").write_text(json.dumps(cfg))
    n = len(fake_log(run))
    code, log = _main(_args(fakes, out, "0", "ts_kd,scratch,mae"))
    assert code == 0, log
    assert (f"config.json records settings of profile 'smoke' that this version changed (teacher.epochs {epochs + 7} "
            f"-> {epochs})") in log and "re-executing from 01_data_preparation" in log
    assert [line.split()[0] for line in fake_log(run)[n:]] == list(reproduce.NOTEBOOKS)
    code, log = _main(_args(fakes, out, "0", "ts_kd,scratch,mae"))
    assert code == 0 and "finished earlier, skipped" in log

    # the profile's words are not its settings: an edited description (or name spelling) re-runs nothing
    cfg = json.loads((run / "config.json").read_text())
    cfg["resolved_profile"]["description"] = "an older wording of the profile's description"
    (run / "config.json").write_text(json.dumps(cfg))
    n = len(fake_log(run))
    code, log = _main(_args(fakes, out, "0", "ts_kd,scratch,mae"))
    assert code == 0 and "finished earlier, skipped" in log and len(fake_log(run)) == n, log


@pytest.mark.slow
def test_missing_student_after_the_run_fails_loudly(tmp_path, fakes):
    out = tmp_path / "runs"
    set_knobs(out, skip_student="scratch")  # notebook 04 "finishes" without the scratch student
    code, log = _main(_args(fakes, out))
    assert code == 1
    assert ("FAILED in 04_distillation: 04_distillation finished but students/scratch/student.safetensors is "
            "missing (method 'scratch' was requested)") in log
    status = json.loads((out / "toy_n4_s0" / "status.json").read_text())
    assert status["state"] == "failed" and status["notebooks"]["04_distillation"]["state"] == "failed"
    set_knobs(out)
    code, log = _main(_args(fakes, out))
    assert code == 0, log  # the next sweep executes notebook 04 again


def test_a_full_disk_fails_the_run_naming_the_path_and_the_next_sweep_resumes(tmp_path, fakes, monkeypatch):
    import errno

    out, real = tmp_path / "runs", runner.write_json

    def full_disk(path, obj):  # the status write after notebook 02 finished hits a full disk
        if Path(path).name == "status.json" and obj["notebooks"].get("02_teacher_lora_finetuning", {}).get(
                "state") == "done":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, obj)

    monkeypatch.setattr(runner, "write_json", full_disk)
    code, log = _main(_args(fakes, out))
    assert code == 1 and "Traceback" not in log
    status_path = out / "toy_n4_s0" / "status.json"
    assert (f"FAILED in 02_teacher_lora_finetuning: OSError: No space left on device writing {status_path} (the disk "
            f"is full: free space, then re-run the same command to resume)") in log
    assert json.loads(status_path.read_text())["state"] == "failed"
    assert not list(status_path.parent.glob(".status.json.tmp*"))
    monkeypatch.setattr(runner, "write_json", real)
    code, log = _main(_args(fakes, out))
    assert code == 0, log


@pytest.mark.slow
def test_run_folder_made_with_other_settings_is_not_reused(tmp_path, fakes):
    out = tmp_path / "runs"
    assert _main(_args(fakes, out))[0] == 0
    before = {p: p.stat().st_mtime_ns for p in (out / "toy_n4_s0").rglob("*") if p.is_file()}
    code, log = _main(_args(fakes, out, "0", "ts_kd,scratch", "--set", "teacher.epochs=3"))
    assert code == 1
    assert "config.json was made with overrides={}, not {'teacher.epochs': 3}" in log and "Use another --out" in log
    assert {p: p.stat().st_mtime_ns for p in before} == before


# ------------------------------------------------------------------------------------ the report


def test_report_never_averages_two_datasets(tmp_path):
    out = tmp_path / "runs"
    for seed in (0, 1):
        write_fake_run(out, "alpha", 10, seed, shift=-0.4)
        write_fake_run(out, "beta", 10, seed, shift=+0.1)
    write_fake_run(out, "beta", 10, 0, {"teacher.epochs": 3}, shift=0.05)  # an earlier sweep's --set
    reproduce.aggregate(out, profile="smoke")
    report = (out / "report.md").read_text()
    assert "## alpha · profile smoke" in report and "## beta · profile smoke" in report
    assert (out / "dice_vs_n_labeled_alpha_smoke.png").is_file() and (out / "dice_vs_n_labeled_beta_smoke.png").is_file()
    results = pd.read_csv(out / "results.csv")
    assert "teacher.epochs" in results.columns  # the setting that differs is a column, not averaged away
    alpha = report.split("## alpha")[1].split("## beta")[0].split("### Dice\n")[1].split("###")[0]
    teacher = results[(results["dataset"] == "alpha") & (results["method"] == "teacher")]["dice"]
    assert f"| teacher | {teacher.mean():.3f} ± {teacher.std():.3f} |" in alpha
    beta = report.split("## beta")[1].split("### Dice\n")[1].split("###")[0]
    assert "| 2 | teacher |" in beta and "| 3 | teacher |" in beta  # the smoke profile's 2 epochs, and 3


def test_report_never_pools_an_older_profile_definition_or_an_unfinished_run(tmp_path):
    out = tmp_path / "runs"
    write_fake_run(out, "alpha", 10, 0)
    old = write_fake_run(out, "alpha", 10, 1, shift=-0.3)  # seed 1 made when the profile trained 7 teacher epochs
    cfg = json.loads((old / "config.json").read_text())
    epochs = cfg["resolved_profile"]["teacher"]["epochs"]
    cfg["resolved_profile"]["teacher"]["epochs"] = 7
    (old / "config.json").write_text(json.dumps(cfg))
    busy = write_fake_run(out, "alpha", 10, 2, shift=-0.5)  # executing again: its results.csv is an earlier one
    status = json.loads((busy / "status.json").read_text())
    (busy / "status.json").write_text(json.dumps(dict(status, state="stale")))
    reproduce.aggregate(out, profile="smoke")
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["seed"].unique()) == [0, 1]  # seed 2 left out
    assert "alpha_n10_s2 left out: not finished (state stale)" in (out / "report.md").read_text()
    assert "teacher.epochs" in results.columns
    assert dict(results.groupby("seed")["teacher.epochs"].first()) == {0: epochs, 1: 7}
    paired = pd.read_csv(out / "paired.csv")
    assert set(paired["n_seeds"]) == {1}  # never pooled over the two definitions


def test_paired_comparisons_in_the_report_equal_stats(tmp_path):
    out = tmp_path / "runs"
    for seed in (0, 1, 2):
        write_fake_run(out, "toy", 10, seed, methods=("ts_kd", "mae", "scratch"))
    reproduce.aggregate(out, profile="smoke")
    per_case = []
    for seed in (0, 1, 2):
        pc = pd.read_csv(out / f"toy_n10_s{seed}" / "metrics" / "per_case.csv")
        pc["seed"] = seed
        per_case.append(pc)
    want = stats.paired_comparisons(stats.case_scores(pd.concat(per_case)), others=["teacher", "mae", "scratch"])
    got = pd.read_csv(out / "paired.csv")
    assert list(got["comparison"]) == ["ts_kd - teacher", "ts_kd - mae", "ts_kd - scratch"]
    pd.testing.assert_frame_equal(got[list(want.columns)], want, check_dtype=False)
    assert set(got["n_seeds"]) == {3} and set(got["n_cases"]) == {12}
    report = (out / "report.md").read_text()
    section = report.split("### Paired comparisons: ts_kd against every other method")[1].split("###")[0]
    for _, r in want.iterrows():
        cell = stats.format_interval(r["mean_diff"], r["ci_low"], r["ci_high"])
        assert f"| {r['comparison']} | {cell} |" in section
    mae = want[want["other"] == "mae"].iloc[0]
    assert mae["ci_low"] < 0 < mae["ci_high"] and "| within noise |" in section  # ts_kd vs mae: +1 point, noise
    assert "| ts_kd better |" in section and "| teacher better |" in section
