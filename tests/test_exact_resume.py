"""A run interrupted mid-stage and resumed ends exactly where an uninterrupted run ends.

Every randomly initialised module (LoRA matrices, heads, the student, the feature alignment, the
MAE and MoCo heads, the UNet) is built from a seed derived from (run seed, stage, method), never from
the global random stream, whose state depends on which stages a resumed process skipped. The
"resumed process" below is simulated by consuming the global stream differently before resuming.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tskd_utils import distill, evaluate, teacher, training
from tskd_utils.run import setup_run

pytestmark = pytest.mark.trains  # every test here fits a model (make test-fast leaves them out)

METHODS = ["ts_kd", "ta_kd", "mae", "mocov3"]


def _run(tmp_path, toy_root, name):
    return setup_run(tmp_path / name, profile="smoke", dataset="toy", data_root=toy_root, n_labeled=6, seed=0,
                     overrides={"diffusion.n_synthetic": 0})


def _everything(run):
    teacher.train_teacher(run)
    distill.run_methods(run, METHODS)
    evaluate.evaluate_run(run, METHODS, measure_efficiency=False)


def _weights(run) -> dict:
    files = sorted(p for p in run.dir.rglob("*.safetensors") if "cache" not in p.parts)
    return {p.relative_to(run.dir).as_posix(): load_file(str(p)) for p in files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import make_toy_dataset

    tmp = tmp_path_factory.mktemp("resume")
    make_toy_dataset(tmp / "data")
    run = _run(tmp, tmp / "data", "uninterrupted")
    _everything(run)
    return tmp, run


@pytest.mark.parametrize("stop", ["lora:1", "pretrain:1", "finetune:1"])
def test_a_resumed_run_equals_an_uninterrupted_one(reference, stop, monkeypatch):
    tmp, ref = reference
    run = _run(tmp, tmp / "data", f"cut-{stop.replace(':', '')}")
    monkeypatch.setenv(training.STOP_ENV, stop)
    with pytest.raises(training.StageInterrupted):
        _everything(run)
    monkeypatch.delenv(training.STOP_ENV)
    torch.manual_seed(12345)  # a new process: the global stream is wherever the skipped stages leave it
    torch.rand(777)
    _everything(run)
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}: {key}"
    per_case = [pd.read_csv(r.metrics_dir / "per_case.csv") for r in (ref, run)]
    pd.testing.assert_frame_equal(*per_case)
