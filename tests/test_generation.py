"""Stage 3 (tskd_utils.generation, tskd_utils.quality): the DDPM, its resumable training, sampling and
quality checks.

Smoke profile on the toy dataset: a 16 px UNet, 2 epochs, 4 DDIM steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_toy_dataset
from tskd_utils import generation as S
from tskd_utils import quality as Q
from tskd_utils.losses import diffusion_loss
from tskd_utils.config import get_profile
from tskd_utils.io import read_image, read_json
from tskd_utils.run import setup_run
from tskd_utils.training import STOP_ENV, StageInterrupted, load_weights


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthesis") / "data"
    make_toy_dataset(root)
    return root


@pytest.fixture(scope="module")
def trained_run(toy_data):
    """A smoke run with a trained DDPM and its synthetic images (shared by several tests)."""
    run = setup_run(toy_data.parent / "runs" / "full", profile="smoke", dataset="toy", data_root=toy_data,
                    n_labeled=6, seed=0)
    summary = S.train_diffusion(run)
    paths = S.generate(run)
    return run, summary, paths


def _pixels(paths):
    return np.stack([read_image(p) for p in paths])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(prediction_type):
    cfg = get_profile("smoke", {"diffusion.prediction_type": prediction_type}).diffusion
    torch.manual_seed(0)
    unet, scheduler = S.build_unet(cfg), S.build_scheduler(cfg)
    assert unet.config.in_channels == 1 and unet.config.out_channels == 1
    assert scheduler.config.prediction_type == prediction_type
    x0 = torch.rand(4, 1, cfg.sample_size, cfg.sample_size) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([10, 200, 500, 900])
    opt = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = diffusion_loss(unet, scheduler, x0, noise, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_training_data_and_samples_have_the_right_format(trained_run):
    run, summary, paths = trained_run
    cfg, size = run.profile.diffusion, run.profile.data.image_size
    data = S.training_images(run)
    assert data.shape == (len(run.splits["train"]), 1, cfg.sample_size, cfg.sample_size)
    assert data.min() >= -1 and data.max() <= 1 and data.dtype == torch.float32
    assert summary["n_train_images"] == len(run.splits["train"]) and summary["epochs"] == cfg.epochs
    assert len(paths) == cfg.n_synthetic == len(S.synthetic_paths(run))
    assert [p.name for p in paths] == [f"syn_{i:04d}.png" for i in range(cfg.n_synthetic)]
    images = _pixels(paths)
    assert images.shape == (cfg.n_synthetic, size, size) and images.dtype == np.uint8
    assert images.std() > 0  # not blank
    record = read_json(run.synthetic_dir / "synthetic.json")
    assert record["complete"] and record["count"] == cfg.n_synthetic and record["seed"] == run.seed
    assert record["sampler"] == cfg.sampler and record["sampling_steps"] == cfg.sampling_steps
    # a finished stage is reused, not retrained
    again = S.train_diffusion(run)
    assert again["history"] == summary["history"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")  # numpy 2 copy keyword in DPM-Solver
def test_saved_pipeline_reloads_and_gives_identical_samples(trained_run):
    run, _, paths = trained_run
    cfg = run.profile.diffusion
    pipe = S.load_pipeline(run)  # DDPMPipeline.from_pretrained, offline: the EMA UNet
    raw = S.build_unet(cfg)
    load_weights(run.synthetic_dir / S.STAGE_DIR / "final.safetensors", {"unet": raw})
    assert any(not torch.equal(p, dict(raw.named_parameters())[n]) for n, p in pipe.unet.named_parameters())
    batch = list(range(min(cfg.sample_batch_size, cfg.n_synthetic)))
    a = S.sample(pipe.unet, pipe.scheduler.config, cfg.sampler, cfg.sampling_steps, run.seed, batch)
    b = S.sample(S.load_pipeline(run).unet, pipe.scheduler.config, cfg.sampler, cfg.sampling_steps, run.seed, batch)
    assert a.shape == (len(batch), cfg.sample_size, cfg.sample_size) and a.min() >= 0 and a.max() <= 1
    assert np.array_equal(a, b)
    written = _pixels(paths[:len(batch)])
    assert np.array_equal(np.stack([S.to_uint8(x, run.profile.data.image_size) for x in b]), written)
    # image i depends on (seed, i) only: alone or in a batch, the same image
    alone = S.sample(pipe.unet, pipe.scheduler.config, cfg.sampler, cfg.sampling_steps, run.seed, batch[1:2])
    assert np.allclose(alone[0], a[1], atol=1e-5)
    # another seed gives other images; the DPM-Solver sampler also runs
    c = S.sample(pipe.unet, pipe.scheduler.config, cfg.sampler, cfg.sampling_steps, run.seed + 1, batch)
    assert not np.array_equal(b, c)
    d = S.sample(pipe.unet, pipe.scheduler.config, "dpm", cfg.sampling_steps, run.seed, batch[:2])
    assert d.shape == (2, cfg.sample_size, cfg.sample_size) and np.isfinite(d).all()


def test_generation_resumes_with_the_same_images(trained_run):
    run, _, paths = trained_run
    before = _pixels(paths)
    for p in (paths[1], paths[-1]):
        p.unlink()
    (paths[0].parent / ".syn_0002.png.tmp").write_bytes(b"half-written")
    again = S.generate(run)
    assert again == paths and np.array_equal(_pixels(again), before)
    assert not list(paths[0].parent.glob(".*.tmp"))
    record = read_json(run.synthetic_dir / "synthetic.json")
    assert record["generated_now"] == 2 and record["kept"] == len(paths) - 2
    # nothing missing: nothing regenerated
    S.generate(run)
    assert read_json(run.synthetic_dir / "synthetic.json")["generated_now"] == 2


@pytest.mark.trains
def test_training_resumes_after_an_interruption(trained_run, toy_data, monkeypatch, capsys):
    full_run = trained_run[0]
    run = setup_run(toy_data.parent / "runs" / "interrupted", profile="smoke", dataset="toy", data_root=toy_data,
                    n_labeled=6, seed=0)
    monkeypatch.setenv(STOP_ENV, f"{S.STAGE_DIR}:1")
    with pytest.raises(StageInterrupted):
        S.train_diffusion(run)
    assert not (run.synthetic_dir / S.PIPELINE_DIR).exists()
    assert [r["epoch"] for r in S.training_history(run)] == [1]
    monkeypatch.delenv(STOP_ENV)
    capsys.readouterr()
    summary = S.train_diffusion(run)
    assert "resuming after epoch 1/2" in capsys.readouterr().out
    assert [r["epoch"] for r in summary["history"]] == [1, 2]
    # the resumed run ends where an uninterrupted one ends: raw weights, and the EMA weights of the pipeline
    a = load_file(str(run.synthetic_dir / S.STAGE_DIR / "final.safetensors"))
    b = load_file(str(full_run.synthetic_dir / S.STAGE_DIR / "final.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    pa = load_file(str(run.synthetic_dir / S.PIPELINE_DIR / "unet" / "diffusion_pytorch_model.safetensors"))
    pb = load_file(str(full_run.synthetic_dir / S.PIPELINE_DIR / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_zero_synthetic_images_skip_the_stage(toy_data, capsys):
    run = setup_run(toy_data.parent / "runs" / "nosyn", profile="smoke", dataset="toy", data_root=toy_data,
                    n_labeled=6, seed=0, overrides={"diffusion.n_synthetic": 0})
    assert S.train_diffusion(run)["skipped"]
    assert "skipped" in capsys.readouterr().out
    assert S.generate(run) == [] and S.synthetic_paths(run) == []
    assert Q.quality_report(run)["skipped"]
    record = read_json(run.synthetic_dir / "synthetic.json")
    assert record["n_synthetic"] == 0 and record["skipped"]
    assert not (run.synthetic_dir / S.STAGE_DIR).exists() and not (run.synthetic_dir / S.PIPELINE_DIR).exists()


def test_missing_synthetic_images_raise_a_clear_error(toy_data):
    run = setup_run(toy_data.parent / "runs" / "untrained", profile="smoke", dataset="toy", data_root=toy_data,
                    n_labeled=6, seed=0)
    with pytest.raises(FileNotFoundError, match="generate"):
        S.synthetic_paths(run)
    with pytest.raises(FileNotFoundError, match="train_diffusion"):
        S.load_pipeline(run)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 4)), rng.normal(size=(400, 4))
    assert Q.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    assert Q.frechet_distance(a, b) < 0.2
    assert Q.frechet_distance(a, b + 3) == pytest.approx(4 * 9, rel=0.05)  # ||mu shift||^2 dominates
    few = rng.normal(size=(5, 16))  # fewer samples than dimensions: singular covariances
    assert np.isfinite(Q.frechet_distance(few, rng.normal(size=(5, 16))))


def test_quality_report(trained_run):
    run, _, paths = trained_run
    report = Q.quality_report(run)
    assert (run.synthetic_dir / "quality.json").is_file()
    k = min(len(paths), len(run.splits["train"]) // 2)
    assert report["fd_set_size"] == k and len(report["fd_real_vs_synthetic"]["values"]) == report["draws"]
    assert np.isfinite(report["fd_real_vs_synthetic"]["mean"]) and report["fd_floor_real_vs_real"]["mean"] >= 0
    assert len(report["nearest"]) == len(paths)
    for space in ("embedding", "pixels"):
        m = report[f"memorisation_{space}"]
        assert m["synthetic_to_train"]["n"] == len(paths) and m["heldout_real_to_train"]["n"] == len(run.splits["val"])
    assert Q.fd_table(report).shape[0] == 3 and not Q.memorisation_table(report).empty
    assert Q.quality_report(run) == report  # reused


@pytest.mark.parametrize("profile", ["demo", "colab"])
def test_profile_unets_build_with_attention_at_the_lowest_resolution(profile):
    cfg = get_profile(profile).diffusion
    unet = S.build_unet(cfg)
    assert unet.config.sample_size == cfg.sample_size and unet.config.in_channels == 1
    assert list(unet.config.block_out_channels) == list(cfg.block_out_channels)
    attn = [type(b).__name__ for b in unet.down_blocks].count("AttnDownBlock2D")
    assert attn == (1 if cfg.attention else 0)
    assert (type(unet.down_blocks[-1]).__name__ == "AttnDownBlock2D") == cfg.attention
    if profile == "demo":  # one denoising call at the demo size
        with torch.no_grad():
            out = unet(torch.zeros(1, 1, cfg.sample_size, cfg.sample_size), torch.tensor([10])).sample
        assert out.shape == (1, 1, cfg.sample_size, cfg.sample_size)


@pytest.mark.trains
def test_a_run_that_records_removed_settings_at_their_old_values_is_reused_whole(trained_run, tmp_path, capsys):
    """Latent diffusion's settings were removed (config.RETIRED): a run folder written before, which records them at
    the values every run had, is the same run (no drift, the DDPM stage reused); at another value it is not, and an
    override naming one says what was removed."""
    import shutil

    from tskd_utils.config import RETIRED
    from tskd_utils.io import write_json
    from tskd_utils.runner import profile_drift
    from tskd_utils.training import Stage

    run, summary, _ = trained_run
    old = tmp_path / "old_run"
    shutil.copytree(run.dir, old)
    retired = {k.split(".", 1)[1]: v for k, (v, _) in RETIRED.items()}
    cfg, inputs_path = read_json(old / "config.json"), old / "synthetic" / "ddpm" / "inputs.json"
    cfg["resolved_profile"]["diffusion"].update(retired)
    write_json(old / "config.json", cfg)
    inputs = read_json(inputs_path)
    write_json(inputs_path, {**inputs, "diffusion": {**inputs["diffusion"], **retired}})
    assert profile_drift(old, "smoke", {}) is None
    again = setup_run(old, profile="smoke", dataset="toy", data_root=run.data_root, n_labeled=6, seed=0)
    assert S.diffusion_training(again) == summary  # the finished model, reused: nothing retrained

    cfg["resolved_profile"]["diffusion"]["latent"] = True  # a run that used the removed option is not this run
    write_json(old / "config.json", cfg)
    assert "diffusion.latent true -> null" in profile_drift(old, "smoke", {}).what
    write_json(inputs_path, {**inputs, "diffusion": {**inputs["diffusion"], **retired, "latent": True}})
    stage = Stage(inputs_path.parent, S._training_inputs(again, diffusion_loss), ignore=("loss",))
    assert not stage.finished and "diffusion.latent (True -> None)" in capsys.readouterr().out
    with pytest.raises(KeyError, match="diffusion.latent.*no longer exists.*latent diffusion"):
        get_profile("smoke", {"diffusion.latent": True})
