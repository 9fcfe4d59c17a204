"""Distillation and the baselines: cached targets, losses, invariants, every method end to end."""

from __future__ import annotations

import pytest
import torch

from tskd_utils import distill, pretrain, training
from tskd_utils.io import sha256sum
from tskd_utils.models import build_student
from tskd_utils.teacher import load_teacher, train_teacher

pytestmark = pytest.mark.trains  # every test here fits a model (make test-fast leaves them out)


@pytest.fixture
def trained_run(tmp_path, toy_root):
    from tskd_utils.run import setup_run

    run = setup_run(tmp_path / "runs" / "r0", profile="smoke", dataset="toy", data_root=toy_root, n_labeled=6,
                    seed=0, overrides={"diffusion.n_synthetic": 0, "student.cpu_dtype": "bfloat16"})
    train_teacher(run)
    return run


def test_cached_targets_equal_the_live_teacher(trained_run):
    import numpy as np
    import torch.nn.functional as F

    from tskd_utils.features import images_to_tensor, teacher_inputs, valid_tensor
    from tskd_utils.io import read_image

    run = trained_run
    tg = distill.teacher_targets(run, synthetic=False)
    names, paths, _ = distill.transfer_set(run, synthetic=False)
    assert tg["names"] == names and tg["emb_ts"].dtype == torch.float16
    ts, ta = load_teacher(run, "selected"), load_teacher(run, "pretrained")
    size_s, grid = run.profile.data.image_size, distill.student_grid(run)
    boxed, valid = teacher_inputs([read_image(p) for p in paths[:4]], run.profile.teacher.input_size)
    x, v = images_to_tensor(np.stack(boxed), "cpu"), valid_tensor(valid, "cpu")
    with torch.inference_mode():  # the live teacher on the raw images, no cache involved
        emb = ts.encoder(x, v)
        logits = F.interpolate(ts.head(emb), size=(size_s, size_s), mode="area")
        emb_ta = ta.encoder(x, v)
    for cached, live in ((tg["emb_ts"][:4], F.adaptive_avg_pool2d(emb, grid)), (tg["logits_ts"][:4], logits),
                         (tg["emb_ta"][:4], F.adaptive_avg_pool2d(emb_ta, grid))):
        assert cached.shape == live.shape
        assert torch.allclose(cached.float(), live, atol=2e-2, rtol=1e-2)  # fp16 storage (+ fp16 prefix)
    assert tg["emb_ts"].shape[-1] == grid  # pooled to the student's token grid


def test_the_transfer_set_is_labeled_plus_a_seeded_unlabeled_subset(tmp_path, toy_root):
    from tskd_utils.run import setup_run

    def composition(n_unlabeled, seed=0):
        run = setup_run(tmp_path / f"r{n_unlabeled}-{seed}", profile="smoke", dataset="toy", data_root=toy_root,
                        n_labeled=6, seed=seed, overrides={"diffusion.n_synthetic": 0,
                                                           "distill.n_unlabeled": n_unlabeled})
        names, _, _ = distill.transfer_set(run, synthetic=False)
        return run, names

    run, everything = composition(None)
    assert sorted(everything) == sorted(run.splits["train"])
    _, none = composition(0)
    assert sorted(none) == sorted(run.splits["labeled"])
    _, four = composition(4)
    _, eight = composition(8)
    assert len(four) == 6 + 4 and set(four) < set(eight) and set(run.splits["labeled"]) < set(four)
    assert composition(4)[1] == four and composition(4, seed=1)[1] != four  # seeded
    assert distill.transfer_composition(run, synthetic=False)["unlabeled"] == len(run.splits["unlabeled"])


def test_the_teacher_never_runs_inside_a_student_epoch(trained_run, monkeypatch):
    from tskd_utils.models import TeacherEncoder, TeacherSegmenter

    distill.teacher_targets(run := trained_run, synthetic=False)  # the cache is filled once, here

    def forbidden(*args, **kwargs):
        raise AssertionError("a teacher ran during student training")

    for cls, names in ((TeacherEncoder, ("forward", "prefix", "suffix", "preprocess")),
                       (TeacherSegmenter, ("forward", "from_prefix", "logits"))):
        for name in names:
            monkeypatch.setattr(cls, name, forbidden)
    monkeypatch.setattr("tskd_utils.distill.load_teacher", forbidden)
    for method in ("ts_kd_nosyn", "ta_kd"):
        assert distill.pretrain(run, method)["final_loss"] > 0


def _kd_batch():
    """A micro student, its feature aligner, one fixed batch with teacher targets, and an optimizer."""
    torch.manual_seed(0)
    student = build_student("vit_micro", 32, 3)
    align = distill.FeatureAlign(student.embed_dim, 16)
    x = torch.rand(4, 1, 32, 32)
    emb, logits_t = torch.randn(4, 16, 8, 8), torch.randn(4, 3, 32, 32) * 3
    opt = torch.optim.AdamW(list(student.parameters()) + list(align.parameters()), lr=3e-3)
    return student, align, x, emb, logits_t, opt


def test_kd_loss_falls_on_a_fixed_batch():
    student, align, x, emb, logits_t, opt = _kd_batch()
    losses = []
    for _ in range(60):
        loss, parts = distill.kd_loss(student, align, x, emb, logits_t, 1.0, 1.0, 2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0] and {"feature_loss", "output_loss"} <= set(parts)


def test_kd_loss_falls_under_cpu_bf16_autocast_with_float32_weights():
    student, align, x, emb, logits_t, opt = _kd_batch()
    losses = []
    for _ in range(60):
        with training.autocast("cpu", cpu_dtype="bfloat16"):
            assert torch.nn.functional.linear(x[0, 0], x[0, 0]).dtype == torch.bfloat16  # autocast is on
            loss, _ = distill.kd_loss(student, align, x, emb, logits_t, 1.0, 1.0, 2.0)
        training.optimizer_step(loss, opt, training.grad_scaler("cpu"))
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]
    assert all(p.dtype == torch.float32 for p in student.parameters())  # the weights stay float32


def test_compute_dtype_names_a_bad_value_and_falls_back_where_bf16_is_missing(monkeypatch):
    with pytest.raises(ValueError, match="student.cpu_dtype 'float16'"):
        training.compute_dtype("cpu", "float16")
    assert training.compute_dtype("cuda", "bfloat16") == "float16"
    monkeypatch.setattr(training, "cpu_bf16_supported", lambda: False)
    monkeypatch.setattr(training, "_BF16_WARNED", set())
    with pytest.warns(UserWarning, match="no bfloat16 instructions"):
        assert training.compute_dtype("cpu", "bfloat16") == "float32"
    assert training.compute_dtype("cpu", "float32") == "float32"


def test_flip_is_applied_to_image_and_targets_together():
    torch.manual_seed(1)
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(8, 1, 1, 1) / 16
    t = x.clone().repeat(1, 2, 1, 1)
    xa, ta = distill.flip_photometric(x, t)
    flipped = (ta[:, 0, 0, 0] > ta[:, 0, 0, -1])
    assert 0 < flipped.sum() < 8  # some flipped, some not
    assert torch.equal((xa[:, 0, 0, 0] > xa[:, 0, 0, -1]), flipped)  # the image follows its targets
    assert torch.equal(ta, torch.where(flipped.view(-1, 1, 1, 1), t.flip(-1), t))  # targets: no photometric


def test_mae_masks_the_stated_ratio_and_learns():
    ids_keep, mask = pretrain.random_masking(3, 64, 0.75)
    assert ids_keep.shape == (3, 16) and torch.all(mask.sum(1) == 48)
    assert all(mask[i, ids_keep[i]].sum() == 0 for i in range(3))
    torch.manual_seed(0)
    mae = pretrain.MAE(build_student("vit_micro", 32, 2), 0.75, 16, 1)
    x = torch.rand(4, 1, 32, 32)
    loss, pred, m = mae(x)
    assert pred.shape == (4, 64, 16) and m.shape == (4, 64) and loss.item() > 0


@pytest.mark.parametrize("name", ["vit_micro", "unet_xs"])
def test_mocov3_momentum_encoder_gets_no_gradients_and_follows_ema(name):
    torch.manual_seed(0)
    moco = pretrain.MoCoV3(build_student(name, 32, 2), dim=8, hidden=16)
    v1, v2 = torch.rand(4, 1, 32, 32), torch.rand(4, 1, 32, 32)
    loss = moco(v1, v2)
    loss.backward()
    assert all(p.grad is None for p in moco.momentum_encoder.parameters())
    assert any(p.grad is not None for p in moco.student.encoder.parameters())
    key_before = [p.clone() for p in moco.momentum_encoder.parameters()]
    with torch.no_grad():
        for p in moco.student.encoder.parameters():
            p.add_(0.1)
    moco.update_momentum(0.9)
    for kb, k, q in zip(key_before, moco.momentum_encoder.parameters(), moco.student.encoder.parameters()):
        assert torch.allclose(k, 0.9 * kb + 0.1 * q, atol=1e-6)


def test_every_method_end_to_end_and_the_teacher_is_never_updated(trained_run):
    run = trained_run
    teacher_files = sorted(run.teacher_dir.rglob("*.safetensors"))
    before = {f: sha256sum(f) for f in teacher_files}
    results = distill.run_methods(run, "all")
    assert [r["method"] for r in results] == list(distill.METHODS)
    for r in results:
        assert 0 <= r["best_val_dice"] <= 1
        assert (run.students_dir / r["method"] / "student.safetensors").is_file()
    assert {f: sha256sum(f) for f in teacher_files} == before
    ts = next(r for r in results if r["method"] == "ts_kd")
    assert "val_dice_after_pretrain" in ts and ts["transfer_set"] == run.splits["counts"]["train"]
    assert (run.cache_dir / "targets" / "transfer_set.json").is_file()
    # the students trained in what the profile asked for (bf16 where this CPU has it) and say so
    assert {r["compute_dtype"] for r in results} == {training.compute_dtype("cpu", "bfloat16")}
    student = distill.load_student(run, "ts_kd")
    with torch.inference_mode():
        assert student(torch.rand(1, 1, 32, 32)).shape == (1, run.info.n_classes, 32, 32)


def test_a_resumed_pretraining_stage_continues_where_it_stopped(trained_run, monkeypatch):
    run = trained_run
    monkeypatch.setenv(training.STOP_ENV, "pretrain:1")
    with pytest.raises(training.StageInterrupted):
        distill.pretrain(run, "mae")
    monkeypatch.delenv(training.STOP_ENV)
    info = distill.pretrain(run, "mae")
    hist = training.history_of(distill.method_dir(run, "mae") / "pretrain")
    assert [r["epoch"] for r in hist] == list(range(1, run.profile.distill.epochs + 1))
    assert info["final_loss"] == hist[-1]["loss"]


def test_unknown_method_is_refused(trained_run):
    with pytest.raises(KeyError, match="valid methods: scratch, ta_kd, ts_kd, ts_kd_nosyn, mae, mocov3, unet_supervised"):
        distill.run_method(trained_run, "distill_all")


def _old_output_loss(student_logits, teacher_logits, temperature):
    """The output loss before the class-keeping terms: KL + Dice-CE pooled over the batch on the teacher's labels."""
    import torch.nn.functional as F

    from tskd_utils.losses import segmentation_loss

    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, 1), F.softmax(teacher_logits / t, 1), reduction="none")
    return kl.sum(1).mean() * t * t + segmentation_loss(student_logits, teacher_logits.argmax(1))


def test_the_output_loss_keeps_a_minority_class_that_the_old_loss_drops():
    """A student that cannot tell apart the pixels of a thin class from the background around them (one input
    value for both, 30 % of them the class): pixel-mean losses are lowest calling them all background, and the
    class is lost; with class-balanced CE and per-image Dice the student draws it (and keeps the other class)."""
    import torch.nn.functional as F

    from tskd_utils.losses import output_loss

    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(4, 32, 32, dtype=torch.long)
    ids[:, :8] = 1  # class 1: its own input value, easy
    ambiguous = torch.rand(4, 32, 32, generator=g) < 0.4
    ambiguous[:, :8] = False
    ids[ambiguous] = 2
    labels = (ids == 1).long()
    labels[(torch.rand(4, 32, 32, generator=g) < 0.3) & ambiguous] = 2  # the teacher's minority class
    teacher_logits = F.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 6.0
    x = F.one_hot(ids, 3).permute(0, 3, 1, 2).float()

    def train(loss_fn):
        torch.manual_seed(0)
        model = torch.nn.Conv2d(3, 3, 1)  # a per-pixel student: it sees only the input value
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(300):
            loss = loss_fn(model(x), teacher_logits, 2.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return model(x).argmax(1)

    old, new = train(_old_output_loss), train(output_loss)
    assert int((old == 2).sum()) == 0  # the old loss lost the class
    dice = 2 * float(((new == 2) & (labels == 2)).sum()) / float((new == 2).sum() + (labels == 2).sum())
    assert dice > 0.4  # the best a per-pixel student can do here: 2 * 0.3 / 1.3 = 0.46
    assert torch.equal(new == 1, labels == 1)


def test_class_terms_ignore_a_class_the_teacher_does_not_find():
    from tskd_utils.losses import balanced_cross_entropy, class_dice_loss

    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, 2:5, 2:5] = 1  # class 2 nowhere
    perfect = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 20
    assert class_dice_loss(perfect, labels).item() < 1e-3
    assert balanced_cross_entropy(perfect, labels).item() < 1e-3
    assert class_dice_loss(perfect, torch.zeros_like(labels)).item() == 0.0  # nothing to ask of the student


def test_the_unet_student_is_a_third_of_the_teacher_and_matches_it_at_its_stride():
    from tskd_utils.models import SegHead, build_teacher, student_feature_grid

    teacher = build_teacher("litemedsam", 256, pretrained=False)
    head = SegHead(teacher.embed_dim, 3, teacher.grid, 256, 64)
    n_teacher = sum(p.numel() for m in (teacher, head) for p in m.parameters())
    for size in (128, 256):  # demo and cpu
        grid = student_feature_grid("unet_s", size, "litemedsam", 256)
        assert grid == teacher.grid  # the teacher's 64x64 embedding, in the student's frame
        student = build_student("unet_s", size, 3, feature_grid=grid)
        assert sum(p.numel() for p in student.parameters()) <= n_teacher / 3
        features, logits = student.forward_with_features(torch.rand(2, 1, size, size))
        assert features.shape == (2, student.embed_dim, 64, 64) and logits.shape == (2, 3, size, size)
    with pytest.raises(ValueError, match="no decoder level has a 24x24 map"):
        build_student("unet_s", 256, 3, feature_grid=24)


def test_masked_image_modelling_of_the_unet_student_masks_the_ratio_and_learns():
    torch.manual_seed(0)
    student = build_student("unet_xs", 32, 2)
    mim = pretrain.build_mim(student, 0.5, 16, 1)
    assert isinstance(mim, pretrain.MaskedUNet)
    x = torch.rand(4, 1, 32, 32)
    loss, recon, pix = mim(x)
    assert recon.shape == (4, 1, 32, 32) and torch.all(pix.mean((1, 2, 3)) == 0.5)
    opt = torch.optim.Adam(mim.parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(40):
        torch.manual_seed(1)  # the same mask every step: the loss can only fall by learning
        loss = mim(x)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_a_class_lost_in_distillation_stops_the_stage(trained_run):
    import json

    run = trained_run
    student = distill.new_student(run)
    with torch.no_grad():  # a student that calls everything background
        student.classifier.bias.copy_(torch.tensor([50.0] + [-50.0] * (run.info.n_classes - 1)))
    run.profile.distill.lost_class = "error"
    (distill.method_dir(run, "ts_kd") / "pretrain").mkdir(parents=True, exist_ok=True)
    teacher_labels = distill.teacher_val_labels(run)
    found = [c for k, c in enumerate(run.info.classes) if k > 0 and bool((teacher_labels == k).any())]
    assert found  # the (smoke-trained) teacher finds at least one class on validation
    with pytest.raises(distill.LostClassError, match=f"never predicts {', '.join(found)} on the"):
        distill.check_classes(run, "ts_kd", student)
    record = json.loads((distill.method_dir(run, "ts_kd") / "pretrain" / "class_check.json").read_text())
    assert record["lost"] == found
    run.profile.distill.lost_class = "warn"
    assert distill.check_classes(run, "ts_kd", student)["lost"] == found


def test_unet_supervised_keeps_its_architecture_whatever_the_student(tmp_path, toy_root):
    from tskd_utils.models import SupervisedUNet
    from tskd_utils.run import setup_run

    for name in ("vit_micro", "unet_xs"):
        run = setup_run(tmp_path / name, profile="smoke", dataset="toy", data_root=toy_root, n_labeled=6, seed=0,
                        overrides={"student.name": name})
        info = distill.run_method(run, "unet_supervised")
        assert info["pretrain_seconds"] == 0 and info["steps"] == 6  # profile.supervised: 2 epochs x 3 batches
        model = distill.load_student(run, "unet_supervised")
        assert isinstance(model, SupervisedUNet) and model.net.channels == SupervisedUNet.CHANNELS
