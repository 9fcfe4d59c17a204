"""Stage 3: synthetic transfer images from an unconditional DDPM (diffusers).

An unconditional denoising diffusion model (Ho et al. 2020) is trained on *all* train images of
the run (labeled and unlabeled; masks are not used) and sampled with a fast deterministic sampler
to enlarge the transfer set of the distillation stage. Notebook 03 shows the method's core (the
noise-prediction loss and a sampling loop); this module keeps the bookkeeping.

* Model: diffusers ``UNet2DModel``, 1 channel in and out, sizes from
  :class:`tskd_utils.config.DiffusionConfig`; self-attention at the lowest resolution when
  ``attention`` is set.
* Training: the loss of :func:`tskd_utils.losses.diffusion_loss` (or the notebook's),
  ``DDPMScheduler`` noise schedule, AdamW with warm-up and cosine decay, gradient clipping, EMA
  weights (diffusers ``EMAModel``, checkpointed with its own ``state_dict``), fp16 on CUDA only. The
  loop is a :class:`tskd_utils.training.Stage` in ``<run>/synthetic/ddpm``. The EMA UNet and the
  scheduler are saved with ``save_pretrained`` to ``<run>/synthetic/pipeline``.
* Data: the real images of the transfer set (the labeled cases and the unlabeled ones the run uses:
  the generator sees no image the student does not), letterboxed to ``data.image_size``, resized to
  ``sample_size`` (area), scaled to [-1, 1]; random horizontal flips. It learns the letterboxed frame.
* Sampling: diffusers' ``DDIMPipeline`` (eta 0; or DPM-Solver++ through ``DDPMPipeline``) with one
  generator per image seeded from (run seed, image index), in fixed batches, so the images do not
  depend on how often generation was interrupted. Samples are upsampled to ``data.image_size``
  (bicubic) and written as 8-bit PNGs ``<run>/synthetic/images/syn_0000.png`` ...
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch

from .config import DiffusionConfig, get_profile
from .data import ImageDataset, letterbox
from .io import read_image, read_json, sha256sum, write_json, write_png
from .losses import diffusion_loss
from .run import Run
from .training import (Stage, StateOf, autocast, count_parameters, grad_scaler, history_of, optimizer_step, seeded,
                       source_digest, value_digest, warmup_cosine)

STAGE_DIR, PIPELINE_DIR, IMAGES_DIR = "ddpm", "pipeline", "images"
SAMPLERS = ("ddim", "dpm")


# ===================================================================================== models


def norm_groups(channels: Sequence[int]) -> int:
    """GroupNorm groups for the UNet: at least 4 channels per group, at most 32 groups."""
    return max(1, min(32, math.gcd(*channels) // 4))


def build_unet(cfg: DiffusionConfig):
    """A 1-channel ``UNet2DModel`` sized by the profile (attention at the lowest resolution if asked)."""
    from diffusers import UNet2DModel

    n = len(cfg.block_out_channels)
    down, up = ["DownBlock2D"] * n, ["UpBlock2D"] * n
    if cfg.attention:  # the last down block and the first up block work at the lowest resolution
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=cfg.sample_size, in_channels=1, out_channels=1, layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels), down_block_types=tuple(down), up_block_types=tuple(up),
        add_attention=cfg.attention, norm_num_groups=norm_groups(cfg.block_out_channels),
    )


def build_scheduler(cfg: DiffusionConfig):
    """The training noise schedule (also saved with the pipeline; samplers are built from its config)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type)


def sampling_scheduler(name: str, config):
    """A fresh fast sampler ("ddim": DDIM with eta 0; "dpm": DPM-Solver++ multistep) from a scheduler config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(config)
    raise KeyError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")


# ======================================================================================= data


def to_sample_size(image: np.ndarray, sample_size: int) -> np.ndarray:
    if image.shape[0] == sample_size:
        return image
    interp = cv2.INTER_AREA if sample_size < image.shape[0] else cv2.INTER_CUBIC
    return cv2.resize(image, (sample_size, sample_size), interpolation=interp)


def train_paths(run: Run) -> list[Path]:
    """The images the generator learns from: the real images of the run's transfer set."""
    return [run.info.case(c).image for c in run.real_transfer_cases()]


def training_images(run: Run) -> torch.Tensor:
    """The generator's training images as (N, 1, S, S) float32 in [-1, 1] at ``sample_size``."""
    size, s = run.profile.data.image_size, run.profile.diffusion.sample_size
    ds = ImageDataset(train_paths(run), size, names=run.real_transfer_cases())
    arr = np.stack([to_sample_size(im, s) for im in ds.images]).astype(np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0)[:, None]


# =================================================================================== training


def _skipped(run: Run) -> dict:
    info = {"n_synthetic": 0, "skipped": True,
            "reason": "diffusion.n_synthetic = 0: no DDPM is trained and no images are generated; the transfer "
                      "set is the real train images only"}
    run.synthetic_dir.mkdir(parents=True, exist_ok=True)
    write_json(run.synthetic_dir / "synthetic.json", info)
    print(f"n_synthetic = 0: the diffusion stage is skipped ({run.synthetic_dir / 'synthetic.json'})")
    return info


def _training_inputs(run: Run, loss_fn: Callable) -> dict:
    d = run.settings("diffusion")["diffusion"]
    for k in ("n_synthetic", "sampler", "sampling_steps", "sample_batch_size"):  # sampling only
        d.pop(k)
    return {"images": value_digest(run.real_transfer_cases()), "diffusion": d, "seed": run.seed,
            "image_size": run.profile.data.image_size, "loss": source_digest(loss_fn)}


@dataclass
class DiffusionTraining:
    """The DDPM stage ready for its loop: notebook 03 writes the loop out, :func:`train_diffusion` runs the same one
    (:func:`fit_diffusion`). ``noise_scheduler`` adds noise and defines the targets; ``ema`` holds the averaged
    weights that are sampled from; :meth:`batches` is one shuffled pass over the training images, a random half
    mirrored; :meth:`finish` saves the EMA pipeline and ``train.json``."""

    run: Run
    stage: Stage
    unet: torch.nn.Module
    noise_scheduler: object
    ema: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    scaler: object
    data: torch.Tensor  # (N, 1, S, S) in [-1, 1]
    started: float = 0.0

    @property
    def n_images(self) -> int:
        return len(self.data)

    @property
    def loop(self) -> dict:
        device = self.run.device
        ema_state = StateOf(self.ema.state_dict, lambda sd: (self.ema.load_state_dict(sd), self.ema.to(device)))
        return {"modules": {"unet": self.unet}, "optimizer": self.optimizer, "epochs": self.run.profile.diffusion.epochs,
                "seed": self.run.seed_for("ddpm"), "scheduler": self.lr_scheduler, "scaler": self.scaler,
                "extra_state": {"ema": ema_state}}  # the EMA is checkpointed with the weights (back on the device)

    def autocast(self):
        """fp16 autocast on CUDA (``diffusion.amp``), else a no-op."""
        return autocast(self.run.device, self.run.profile.diffusion.amp)

    def batches(self):
        cfg, device, n = self.run.profile.diffusion, self.run.device, len(self.data)
        order = torch.randperm(n)
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x0 = self.data[idx].to(device)
            if cfg.flip:
                flip = (torch.rand(x0.shape[0]) < 0.5).to(device)[:, None, None, None]
                x0 = torch.where(flip, x0.flip(-1), x0)
            yield x0

    def finish(self) -> dict:
        """Save the pipeline of the EMA weights (``DDPMPipeline``) and the stage's summary (``train.json``,
        returned)."""
        from diffusers import DDPMPipeline

        cfg, out, history = self.run.profile.diffusion, self.run.synthetic_dir, self.stage.history
        ema_unet = build_unet(cfg)
        self.ema.copy_to(ema_unet.parameters())
        tmp = out / f".{PIPELINE_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        DDPMPipeline(unet=ema_unet.eval(), scheduler=self.noise_scheduler).save_pretrained(str(tmp))
        shutil.rmtree(out / PIPELINE_DIR, ignore_errors=True)
        tmp.rename(out / PIPELINE_DIR)
        done = read_json(self.stage.done_path)
        summary = {"n_train_images": len(self.data), "sample_size": cfg.sample_size,
                   "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                   "steps": cfg.epochs * math.ceil(len(self.data) / cfg.batch_size),
                   "parameters": count_parameters(self.unet), "device": self.run.device,
                   "train_seconds": done.get("seconds"), "wall_seconds": round(time.perf_counter() - self.started, 2),
                   "history": history, "final_loss": history[-1]["loss"] if history else None,
                   "pipeline": str(out / PIPELINE_DIR)}
        write_json(out / "train.json", summary)
        return summary


def diffusion_training(run: Run, force: bool = False, loss_fn: Optional[Callable] = None):
    """Set the DDPM stage up on the run's train images: a :class:`DiffusionTraining`, or the summary (a dict) of a
    finished model that is reused, or of a skipped stage (``diffusion.n_synthetic = 0``).

    ``loss_fn(unet, scheduler, x0) -> loss`` is the objective the loop will use (default
    :func:`tskd_utils.losses.diffusion_loss`); its source is part of the stage's inputs (None: any finished model
    will do)."""
    from diffusers.training_utils import EMAModel

    cfg, out = run.profile.diffusion, run.synthetic_dir
    if cfg.n_synthetic <= 0:
        return _skipped(run)
    stage = Stage(out / STAGE_DIR, _training_inputs(run, loss_fn or diffusion_loss), desc="DDPM", force=force,
                  ignore=("loss",) if loss_fn is None else ())
    if stage.finished:
        if (out / PIPELINE_DIR / "model_index.json").is_file() and (out / "train.json").is_file():
            print(f"[DDPM] finished earlier with the same inputs: reusing {out / PIPELINE_DIR} (force=True retrains)")
            return read_json(out / "train.json")
        print(f"[DDPM] {out / PIPELINE_DIR} is missing: retraining")  # the EMA weights live in the pipeline only
        stage.reset()
    started = time.perf_counter()
    with seeded(run.seed_for("ddpm", "init")):
        unet = build_unet(cfg).to(run.device)
    data = training_images(run)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, cfg.warmup_steps, cfg.epochs * math.ceil(len(data) / cfg.batch_size))
    return DiffusionTraining(run, stage, unet, build_scheduler(cfg), EMAModel(unet.parameters(), decay=cfg.ema_decay),
                             opt, sched, grad_scaler(run.device, cfg.amp), data, started)


def fit_diffusion(ddpm: DiffusionTraining, loss_fn: Optional[Callable] = None) -> dict:
    """The DDPM loop (the one notebook 03 writes out), then the saved pipeline; returns the summary."""
    loss_fn = loss_fn or diffusion_loss
    for epoch in ddpm.stage.epochs(**ddpm.loop):
        ddpm.unet.train()
        total = 0.0
        for x0 in ddpm.batches():
            with ddpm.autocast():
                loss = loss_fn(ddpm.unet, ddpm.noise_scheduler, x0)
            optimizer_step(loss, ddpm.optimizer, ddpm.scaler, ddpm.lr_scheduler, ddpm.unet.parameters(),
                           ddpm.run.profile.diffusion.max_grad_norm)  # backward, clipping, AdamW, schedule
            ddpm.ema.step(ddpm.unet.parameters())
            total += loss.item() * len(x0)
        epoch.log(loss=total / ddpm.n_images)
    return ddpm.finish()


def train_diffusion(run: Run, force: bool = False, loss_fn: Optional[Callable] = None) -> dict:
    """Train the DDPM on the run's train images (resumable) and save the EMA pipeline.

    ``loss_fn(unet, scheduler, x0) -> loss`` (default :func:`tskd_utils.losses.diffusion_loss`). Returns a
    summary, also written to ``<run>/synthetic/train.json``.
    """
    ddpm = diffusion_training(run, force, loss_fn)
    return ddpm if isinstance(ddpm, dict) else fit_diffusion(ddpm, loss_fn)


def load_pipeline(run: Run):
    """The saved pipeline (EMA UNet + training scheduler), loaded offline from the run folder."""
    from diffusers import DiffusionPipeline

    path = run.synthetic_dir / PIPELINE_DIR
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no diffusion pipeline in {path}: run tskd_utils.generation.train_diffusion "
                                f"(notebook 03) first")
    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.unet.eval()
    return pipe


def to_pixels(pipe, x: torch.Tensor) -> np.ndarray:
    """A sample (or an intermediate x_t) of ``pipe`` as (B, S, S) images in [0, 1] (mapped from [-1, 1])."""
    return ((x.float().clamp(-1, 1) + 1) / 2)[:, 0].cpu().numpy()


# =================================================================================== sampling


def image_seed(seed: int, index: int) -> int:
    """The seed of synthetic image ``index`` of a run with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(index), 3]).generate_state(1)[0])


def generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: x_T of image i depends on (seed, i) only."""
    return [torch.Generator().manual_seed(image_seed(seed, i)) for i in indices]


def initial_noise(seed: int, indices: Sequence[int], size: int) -> torch.Tensor:
    """x_T of the given images, (B, 1, S, S), as the pipelines draw it from :func:`generators`."""
    return torch.cat([torch.randn((1, 1, size, size), generator=g) for g in generators(seed, indices)])


@torch.inference_mode()
def sample(unet, scheduler_config, sampler: str, steps: int, seed: int, indices: Sequence[int],
           device: str = "cpu") -> np.ndarray:
    """Images ``indices`` in one batch through diffusers' pipeline: float32 (B, S, S) in [0, 1]."""
    from diffusers import DDIMPipeline, DDPMPipeline

    sched = sampling_scheduler(sampler, scheduler_config)
    kwargs = {"eta": 0.0} if sampler == "ddim" else {}
    gens = generators(seed, indices)
    pipe = (DDIMPipeline if sampler == "ddim" else DDPMPipeline)(unet=unet, scheduler=sched).to(device)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=len(indices), generator=gens, num_inference_steps=steps, output_type="pt",
                  **kwargs).images
    return images[:, 0].float().cpu().numpy()


def to_uint8(image01: np.ndarray, size: int) -> np.ndarray:
    """A sample in [0, 1] at sample_size -> uint8 (size, size), bicubic upsampling."""
    arr = image01.astype(np.float32) * 255.0
    if arr.shape[0] != size:
        arr = cv2.resize(arr, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def _file_name(index: int, n: int) -> str:
    return f"syn_{index:0{max(4, len(str(n - 1)))}d}.png"


def sampling_settings(run: Run) -> dict:
    cfg = run.profile.diffusion
    if cfg.sampler not in SAMPLERS:
        raise KeyError(f"unknown diffusion.sampler {cfg.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    return {"n_synthetic": cfg.n_synthetic, "seed": run.seed, "sampler": cfg.sampler,
            "sampling_steps": cfg.sampling_steps, "sample_batch_size": cfg.sample_batch_size,
            "sample_size": cfg.sample_size, "image_size": run.profile.data.image_size,
            "interpolation": "bicubic (cv2.INTER_CUBIC), clipped, rounded",
            "model_sha256": value_digest([sha256sum(p) for p in sorted((run.synthetic_dir / PIPELINE_DIR).glob(
                "*/diffusion_pytorch_model.safetensors"))])}


def _sample_missing(run: Run, paths: list[Path], batches: list[list[int]]) -> None:
    cfg, size = run.profile.diffusion, run.profile.data.image_size
    pipe = load_pipeline(run)
    unet = pipe.unet.to(run.device)
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(b) for b in batches), desc=f"sampling ({cfg.sampler}, {cfg.sampling_steps} steps)",
               unit="img", dynamic_ncols=True)
    for b in batches:
        for i, im in zip(b, sample(unet, pipe.scheduler.config, cfg.sampler, cfg.sampling_steps, run.seed, b,
                                   run.device)):
            if paths[i].is_file():  # the batch is sampled whole (same images); only missing files are written
                continue
            tmp = paths[i].with_name(f".{paths[i].name}.tmp")
            write_png(tmp, to_uint8(im, size))
            tmp.replace(paths[i])
        bar.update(len(b))
    bar.close()


def generate(run: Run, force: bool = False) -> list[Path]:
    """Sample ``n_synthetic`` images into ``<run>/synthetic/images`` (resumable) and record them.

    Trains the DDPM first if it is not there yet. Images already written for the same model and
    settings are kept; the missing ones are generated in the same fixed batches as an uninterrupted
    run, so the same files result. ``force`` regenerates all.
    """
    cfg = run.profile.diffusion
    if cfg.n_synthetic <= 0:
        _skipped(run)
        return []
    train_diffusion(run)  # reuses a finished model with the same inputs, else (re)trains it
    out, n = run.synthetic_dir / IMAGES_DIR, cfg.n_synthetic
    record_path, settings = run.synthetic_dir / "synthetic.json", sampling_settings(run)
    previous = read_json(record_path) if record_path.is_file() else {}
    if force or {k: previous.get(k) for k in settings} != settings:
        if out.exists() and any(out.iterdir()):
            print("regenerating all synthetic images" + (" (force)" if force else " (model or settings changed)"))
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):
        stale.unlink()
    paths = [out / _file_name(i, n) for i in range(n)]
    write_json(record_path, {**settings, "complete": False})
    bs = cfg.sample_batch_size
    todo = [b for b in ([list(range(s, min(s + bs, n))) for s in range(0, n, bs)])
            if not all(paths[i].is_file() for i in b)]
    t0, generated = time.perf_counter(), sum(not p.is_file() for p in paths)
    if todo:
        _sample_missing(run, paths, todo)
    seconds = time.perf_counter() - t0
    record = {**settings, "complete": True, "count": n, "generated_now": generated, "kept": n - generated,
              "sampling_seconds": round(seconds, 2),
              "seconds_per_image": round(seconds / generated, 4) if generated else None,
              "files": [p.name for p in paths]}
    if previous.get("complete") and not generated:  # nothing new: keep the timings of the run that made them
        for k in ("sampling_seconds", "seconds_per_image", "generated_now", "kept"):
            record[k] = previous.get(k, record[k])
    write_json(record_path, record)
    print(f"{n} synthetic images in {out} ({generated} generated now in {seconds:.1f} s, {n - generated} kept)")
    return paths


def synthetic_paths(run: Run) -> list[Path]:
    """The run's synthetic images ([] when n_synthetic = 0); an error if they were not generated yet."""
    n = run.profile.diffusion.n_synthetic
    if n <= 0:
        return []
    record_path = run.synthetic_dir / "synthetic.json"
    record = read_json(record_path) if record_path.is_file() else {}
    paths = [run.synthetic_dir / IMAGES_DIR / _file_name(i, n) for i in range(n)]
    if not record.get("complete") or record.get("count") != n or not all(p.is_file() for p in paths):
        raise FileNotFoundError(f"the {n} synthetic images of {run.dir} are not (all) generated: run "
                                f"tskd_utils.generation.generate (notebook 03) first")
    return paths


def training_history(run: Run) -> list[dict]:
    return history_of(run.synthetic_dir / STAGE_DIR)


# ============================================================================ the noise schedule


def alphas_cumprod(run: Run) -> np.ndarray:
    """alpha-bar_t (the signal fraction kept at step t) of the training schedule."""
    return build_scheduler(run.profile.diffusion).alphas_cumprod.numpy()


def noised_examples(run: Run, timesteps: Sequence[int], case_index: int = 0, seed: int = 0) -> list[np.ndarray]:
    """One real train image (at sample_size) noised to each t in ``timesteps``: images in [0, 1]."""
    cfg, size = run.profile.diffusion, run.profile.data.image_size
    x0 = to_sample_size(letterbox(read_image(train_paths(run)[case_index]), size), cfg.sample_size)
    x0 = torch.from_numpy(x0.astype(np.float32) / 127.5 - 1.0)[None, None]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    sched = build_scheduler(cfg)
    return [((sched.add_noise(x0, noise, torch.tensor([int(t)])).clamp(-1, 1) + 1) / 2)[0, 0].numpy()
            for t in timesteps]


def notebook_overrides(profile: str, overrides: dict, **values) -> dict:
    """``overrides`` plus ``diffusion.<key>: value`` for every value >= 0 that differs from the profile's."""
    base = get_profile(profile, overrides).diffusion
    out = dict(overrides)
    for key, value in values.items():
        if value is not None and value >= 0 and value != getattr(base, key):
            out[f"diffusion.{key}"] = value
    return out
