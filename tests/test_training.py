"""The resumable epoch loop shared by every stage, and what makes a finished stage reusable."""

from __future__ import annotations

import pytest
import torch

from tskd_utils import training
from tskd_utils.training import Stage, StageInterrupted, warmup_cosine


def _make(tmp_path, force=False, inputs=None):
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

    stage = Stage(tmp_path / "stage", inputs or {"settings": {"lr": 0.05}}, force=force)

    def train(train_epoch=epoch):
        return stage.train({"model": model}, opt, 5, train_epoch, val, seed=3, scheduler=sched, monitor="val")

    return stage, model, train, val


@pytest.mark.trains
def test_interrupted_stage_resumes_to_the_same_result(tmp_path, monkeypatch):
    _, ref_model, ref_train, _ = _make(tmp_path / "ref")
    ref_hist = ref_train()
    monkeypatch.setenv(training.STOP_ENV, "stage:2")
    stage, model, train, _ = _make(tmp_path / "cut")
    with pytest.raises(StageInterrupted):
        train()
    assert [r["epoch"] for r in training.history_of(tmp_path / "cut" / "stage")] == [1, 2]
    monkeypatch.delenv(training.STOP_ENV)
    stage, model, train, _ = _make(tmp_path / "cut")  # a new process would rebuild everything like this
    hist = train()
    assert stage.start_epoch == 2 and [r["epoch"] for r in hist] == [1, 2, 3, 4, 5]
    assert [round(r["loss"], 6) for r in hist] == [round(r["loss"], 6) for r in ref_hist]
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    assert not (tmp_path / "cut" / "stage" / "checkpoint").exists()  # removed once finished


@pytest.mark.trains
def test_finished_stage_is_reused_and_best_is_loaded(tmp_path):
    stage, model, train, val = _make(tmp_path)
    hist = train()
    best = max(r["val"] for r in hist)
    assert best > hist[0]["val"] + 0.01  # it learned, and the best epoch is not the first
    calls = []
    stage2, model2, train2, val2 = _make(tmp_path)
    assert stage2.finished
    train2(lambda ep: calls.append(ep) or {"loss": 0.0})
    assert calls == []  # not retrained
    assert val2()["val"] == pytest.approx(best, abs=1e-6)
    stage3, _, _, _ = _make(tmp_path, force=True)
    assert not stage3.finished  # force starts over


@pytest.mark.trains
def test_changed_inputs_reset_the_stage_and_say_why(tmp_path, capsys):
    _, _, train, _ = _make(tmp_path)
    train()
    capsys.readouterr()
    same, _, _, _ = _make(tmp_path)
    assert same.finished and "recomputing" not in capsys.readouterr().out
    changed, _, _, _ = _make(tmp_path, inputs={"settings": {"lr": 0.01}})
    out = capsys.readouterr().out
    assert not changed.finished and "settings.lr (0.05 -> 0.01)" in out and "recomputing" in out
    assert not (tmp_path / "stage" / "final.safetensors").exists()


@pytest.mark.trains
def test_a_damaged_weights_file_is_an_error_naming_it(tmp_path):
    _, model, train, _ = _make(tmp_path)
    train()
    path = tmp_path / "stage" / "best.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(training.DataError, match="best.safetensors"):
        training.load_weights(path, {"model": model})


def test_derived_seeds_are_distinct_and_stable():
    a = training.derive_seed(0, "teacher", "lora")
    assert a == training.derive_seed(0, "teacher", "lora")
    assert len({a, training.derive_seed(1, "teacher", "lora"), training.derive_seed(0, "teacher", "head"),
                training.derive_seed(0, "lora", "teacher")}) == 4
    with training.seeded(a):
        x = torch.rand(3)
    state = torch.get_rng_state()
    with training.seeded(a):
        assert torch.equal(torch.rand(3), x)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is left as it was


def test_source_digest_follows_the_code():
    def loss(a, b):
        return (a - b).abs().mean()

    def loss_edited(a, b):
        return (a - b).square().mean()

    assert training.source_digest(loss) != training.source_digest(loss_edited)
    assert training.source_digest(loss) == training.source_digest(loss)


def test_warmup_then_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = warmup_cosine(opt, 4, 20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs[0] < lrs[3] < lrs[4] and lrs[4] == pytest.approx(1.0) and lrs[-1] < 0.05


@pytest.mark.trains
def test_a_diverging_stage_stops_naming_stage_epoch_and_learning_rate(tmp_path):
    """lr far too high: the weights turn non-finite; the stage stops with an error, keeps its last good
    checkpoint and writes no final weights (a NaN student never reaches the report)."""
    stage, model, train, _ = _make(tmp_path)

    def epoch_then_blow_up(e):
        if e < 2:
            return {"loss": 0.5}
        with torch.no_grad():
            model[0].weight.mul_(1e39)  # what lr=1e12 does after a few steps: inf, then NaN
            model[0].weight[0, 0] = float("nan")
        return {"loss": float("nan")}

    with pytest.raises(training.DivergedError, match=r"diverged in epoch 3/5: loss = nan.*learning rate.*lr "):
        train(epoch_then_blow_up)
    assert not stage.final_path.exists() and not stage.finished
    assert stage.ckpt.is_dir()  # epoch 2's checkpoint: a rerun with a lower lr starts over or resumes from it

    # the weights alone are enough to notice (a loss that stayed finite by luck)
    stage2, model2, train2, _ = _make(tmp_path / "b")

    def nan_weights(e):
        with torch.no_grad():
            model2[2].bias.fill_(float("inf"))
        return {"loss": 0.1}

    with pytest.raises(training.DivergedError, match=r"epoch 1/5: parameter model\.2\.bias holds 1 non-finite"):
        train2(nan_weights)
    assert not stage2.final_path.exists()


def test_adapter_weights_are_checked_and_fp16_overflow_batches_are_not_divergence():
    from tskd_utils.training import StateOf, non_finite

    lora = {"w": torch.zeros(3)}
    state = StateOf(lambda: lora, lambda sd: lora.update(sd))  # what the LoRA stage passes for its adapters
    assert non_finite({"loss": 0.1}, {"lora": state}) is None
    lora["w"][1] = float("nan")
    assert non_finite({"loss": 0.1}, {"lora": state}) == "parameter lora.w holds 1 non-finite values"
    assert non_finite({"loss": float("inf")}, {}) == "loss = inf"
