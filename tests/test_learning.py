"""The pipeline learns, and does so deterministically: a small configuration (seconds, not minutes).

The toy dataset (noisy bright rings around a darker core, 40 cases), 6 labeled cases, the smoke
profile's tiny random-weight teacher trained longer. Thresholds from measurement on this configuration
(benchmarks/bench_determinism.py, which runs it): the teacher reached 0.81 test Dice and ts_kd 0.65, while
scratch (the same student on the 6 labels alone) reached 0.22. A broken teacher stage (wrong labels, preprocessing or head) stays near an
untrained head's ~0.1, and a distillation stage whose targets do not arrive stays at scratch's level, so
"teacher >= 0.7" and "ts_kd >= scratch + 0.15" separate working from broken with a wide margin.
"""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import make_toy_dataset
from tskd_utils import distill, evaluate, teacher
from tskd_utils.run import setup_run

LEARNING = {"diffusion.n_synthetic": 0, "teacher.head_epochs": 20, "teacher.epochs": 6, "distill.epochs": 10,
            "finetune.epochs": 12}
METHODS = ["scratch", "ts_kd"]


def _pipeline(root):
    make_toy_dataset(root / "data", n_cases=40)
    run = setup_run(root / "runs" / "r0", profile="smoke", dataset="toy", data_root=root / "data", n_labeled=6,
                    seed=0, overrides=LEARNING)
    teacher.train_teacher(run)
    distill.run_methods(run, METHODS)
    summary = evaluate.evaluate_run(run, METHODS, measure_efficiency=False)
    return run, summary


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    return [_pipeline(tmp_path_factory.mktemp(f"learning{i}")) for i in range(2)]


def test_the_teacher_and_the_distilled_student_learn(two_runs):
    _, summary = two_runs[0]
    dice = {m: s["dice"] for m, s in summary["methods"].items()}
    assert dice["teacher"] >= 0.7, dice
    assert dice["ts_kd"] >= dice["scratch"] + 0.15, dice


def test_the_same_command_twice_gives_identical_results(two_runs):
    (a, sa), (b, sb) = two_runs
    assert {m: s["dice"] for m, s in sa["methods"].items()} == {m: s["dice"] for m, s in sb["methods"].items()}
    pd.testing.assert_frame_equal(pd.read_csv(a.metrics_dir / "per_case.csv"),
                                  pd.read_csv(b.metrics_dir / "per_case.csv"))
