"""The resumable epoch loop shared by every stage."""

from __future__ import annotations

import pytest
import torch

from tskd_utils import training
from tskd_utils.training import Stage, StageInterrupted, warmup_cosine


def _make(tmp_path, force=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = warmup_cosine(opt, 2, 20)
    x, y = torch.randn(32, 4), torch.randn(32, 1)

    def epoch(e):
        total = 0.0
        for idx in torch.randperm(32).split(8):  # shuffling follows the per-epoch seed
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        return {"loss": total / 4}

    def val():
        with torch.no_grad():
            return {"val": -torch.nn.functional.mse_loss(model(x), y).item()}

    stage = Stage(tmp_path / "stage", {"model": model}, opt, epochs=5, seed=3, scheduler=sched, monitor="val",
                  force=force)
    return stage, model, epoch, val


def test_interrupted_stage_resumes_to_the_same_result(tmp_path, monkeypatch):
    ref_stage, ref_model, e, v = _make(tmp_path / "ref")
    ref_hist = ref_stage.run(e, v)
    monkeypatch.setenv(training.STOP_ENV, "stage:2")
    stage, model, e, v = _make(tmp_path / "cut")
    with pytest.raises(StageInterrupted):
        stage.run(e, v)
    assert [r["epoch"] for r in training.history_of(tmp_path / "cut" / "stage")] == [1, 2]
    monkeypatch.delenv(training.STOP_ENV)
    stage, model, e, v = _make(tmp_path / "cut")  # a new process would rebuild everything like this
    hist = stage.run(e, v)
    assert stage.start_epoch == 2 and [r["epoch"] for r in hist] == [1, 2, 3, 4, 5]
    assert [round(r["loss"], 6) for r in hist] == [round(r["loss"], 6) for r in ref_hist]
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_finished_stage_is_reused_and_best_is_loaded(tmp_path):
    stage, model, e, v = _make(tmp_path)
    hist = stage.run(e, v)
    best_epoch = max(hist, key=lambda r: r["val"])["epoch"]
    calls = []
    stage2, model2, _, v2 = _make(tmp_path)
    stage2.run(lambda ep: calls.append(ep) or {"loss": 0.0}, v2)
    assert calls == []  # not retrained
    assert pytest.approx(v2()["val"], abs=1e-6) == max(r["val"] for r in hist)
    assert stage2.done and best_epoch >= 1
    stage3, _, e3, v3 = _make(tmp_path, force=True)
    assert not stage3.done  # force starts over


def test_warmup_then_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = warmup_cosine(opt, 4, 20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs[0] < lrs[3] < lrs[4] and lrs[4] == pytest.approx(1.0) and lrs[-1] < 0.05
