"""Stage 3: synthetic transfer images from an unconditional DDPM (diffusers).

An unconditional denoising diffusion model (Ho et al. 2020) is trained on *all* train images of
the run (labeled and unlabeled; masks are not used) and then sampled with a fast deterministic
sampler (DDIM or DPM-Solver++) to enlarge the transfer set of the distillation stage.

* Model: diffusers ``UNet2DModel``, 1 channel in and out (grayscale, no RGB conversion), sizes from
  :class:`tskd_utils.config.DiffusionConfig`; self-attention at the lowest resolution only when
  ``attention`` is set (CPU profiles leave it off).
* Training: epsilon prediction with an MSE loss (``prediction_type``; v-prediction is available),
  ``DDPMScheduler`` noise schedule (``beta_schedule``), AdamW with
  linear warm-up and cosine decay, gradient clipping, EMA weights (diffusers ``EMAModel``), fp16
  autocast + GradScaler on CUDA only. The loop is :class:`tskd_utils.training.Stage` in
  ``<run>/synthetic/ddpm`` (a checkpoint every epoch, EMA included; resumes after an interruption).
  The EMA UNet and the scheduler are saved with ``save_pretrained`` to ``<run>/synthetic/pipeline``
  (a ``DDPMPipeline``, reloadable offline with ``DDPMPipeline.from_pretrained``).
* Data: each train image is letterboxed to ``data.image_size`` (:func:`tskd_utils.data.letterbox`),
  resized to ``sample_size`` (area interpolation) and scaled to [-1, 1]; random horizontal flips.
  The DDPM therefore learns the whole letterboxed frame, zero padding included, and its samples are
  square frames in the same convention.
* Sampling: image ``i`` starts from noise drawn with its own generator seeded from (run seed, i),
  in fixed batches ``[k*B, (k+1)*B)``, so the images do not depend on how often generation was
  interrupted. Samples are upsampled from ``sample_size`` to ``data.image_size`` with **bicubic**
  interpolation (OpenCV ``INTER_CUBIC`` on the [0, 255] float image, then clipped and rounded) and
  written as 8-bit grayscale PNGs ``<run>/synthetic/images/syn_0000.png`` ...
* Quality, offline (no Inception network here): a Frechet distance in the pooled embedding space
  of the pretrained teacher encoder, always next to the same distance between two disjoint sets of
  real train images of the same size (the floor); and a memorisation check (nearest train image of
  every synthetic image, in embedding and in pixel space, compared with the nearest-train distance
  of held-out real images). See :func:`quality_report`.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import viz
from .config import DiffusionConfig, get_profile
from .data import ImageDataset, letterbox
from .io import read_image, read_json, write_json, write_png
from .run import Run
from .training import StateOf, Stage, autocast, count_parameters, grad_scaler, warmup_cosine

STAGE_DIR = "ddpm"
PIPELINE_DIR = "pipeline"
IMAGES_DIR = "images"
SAMPLERS = ("ddim", "dpm")
UPSAMPLE_INTERPOLATION = cv2.INTER_CUBIC  # sample_size -> data.image_size (documented in the module docstring)
FD_DRAWS = 10  # random draws of the real subsets for the Frechet distances (mean and std reported)
QUALITY_VERSION = 2  # bump when quality_report's contents change (an older quality.json is recomputed)


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


def diffusion_loss(unet, scheduler, x0: torch.Tensor, noise: Optional[torch.Tensor] = None,
                   timesteps: Optional[torch.Tensor] = None, amp: bool = False) -> torch.Tensor:
    """The denoising loss on clean images ``x0`` in [-1, 1] (noise and t drawn if not given): MSE between
    the UNet's output and the noise (``prediction_type`` epsilon) or the velocity (v_prediction)."""
    if noise is None:
        noise = torch.randn_like(x0)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
    xt = scheduler.add_noise(x0, noise, timesteps)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, timesteps)
    with autocast(x0.device.type, amp):
        pred = unet(xt, timesteps).sample
    return F.mse_loss(pred.float(), target.float())


# ======================================================================================= data


def _to_sample_size(image: np.ndarray, sample_size: int) -> np.ndarray:
    if image.shape[0] == sample_size:
        return image
    interp = cv2.INTER_AREA if sample_size < image.shape[0] else cv2.INTER_CUBIC
    return cv2.resize(image, (sample_size, sample_size), interpolation=interp)


def train_paths(run: Run) -> list[Path]:
    return [run.info.case(c).image for c in run.splits["train"]]


def training_images(run: Run) -> torch.Tensor:
    """All train images of the run as (N, 1, S, S) float32 in [-1, 1] at the DDPM's ``sample_size``."""
    size, s = run.profile.data.image_size, run.profile.diffusion.sample_size
    ds = ImageDataset(train_paths(run), size, names=run.splits["train"])
    arr = np.stack([_to_sample_size(im, s) for im in ds.images]).astype(np.float32)
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


def _pipeline_ready(run: Run) -> bool:
    return (run.synthetic_dir / PIPELINE_DIR / "model_index.json").is_file()


def train_diffusion(run: Run, force: bool = False) -> dict:
    """Train the DDPM on the run's train images (resumable) and save the EMA pipeline.

    Returns a summary (epochs, steps, parameters, seconds, final loss, the per-epoch history),
    also written to ``<run>/synthetic/train.json``. A finished stage is reused unless ``force``.
    """
    cfg = run.profile.diffusion
    if cfg.n_synthetic <= 0:
        return _skipped(run)
    out = run.synthetic_dir
    summary_path = out / "train.json"
    if not force and _pipeline_ready(run) and summary_path.is_file() and (out / STAGE_DIR / "done.json").is_file():
        print(f"diffusion model finished earlier: reusing {out / PIPELINE_DIR} (force=True retrains)")
        return read_json(summary_path)
    from diffusers import DDPMPipeline
    from diffusers.training_utils import EMAModel

    device = run.device
    t0 = time.perf_counter()
    data = training_images(run)
    torch.manual_seed(run.seed)  # the UNet's initial weights follow the run seed
    unet = build_unet(cfg).to(device)
    scheduler = build_scheduler(cfg)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    # the EMA weights go into the stage's safetensors checkpoints (as "ema.<parameter>", loaded in place, so
    # they stay on the device); the rest of the EMA state (its step count for the decay warm-up) via extra_state
    names = [n for n, _ in unet.named_parameters()]
    ema_weights = StateOf(lambda: dict(zip(names, ema.shadow_params)),
                          lambda sd: [s.copy_(sd[n]) for n, s in zip(names, ema.shadow_params)])
    ema_counters = StateOf(lambda: {k: v for k, v in ema.state_dict().items() if k != "shadow_params"},
                           ema.load_state_dict)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n, bs = data.shape[0], cfg.batch_size
    steps_per_epoch = math.ceil(n / bs)
    sched = warmup_cosine(opt, cfg.warmup_steps, cfg.epochs * steps_per_epoch)
    scaler = grad_scaler(device, cfg.amp)

    def train_epoch(epoch: int) -> dict:
        unet.train()
        order = torch.randperm(n)
        total = 0.0
        for i in range(0, n, bs):
            x0 = data[order[i:i + bs]].to(device)
            if cfg.flip:
                flip = (torch.rand(x0.shape[0]) < 0.5).to(device)
                x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            loss = diffusion_loss(unet, scheduler, x0, amp=cfg.amp)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            sched.step()
            ema.step(unet.parameters())
            total += loss.item() * x0.shape[0]
        return {"loss": total / n}

    stage = Stage(out / STAGE_DIR, {"unet": unet, "ema": ema_weights}, opt, cfg.epochs, seed=run.seed,
                  scheduler=sched, scaler=scaler, desc="DDPM", force=force, extra_state={"ema": ema_counters})
    history = stage.run(train_epoch)

    ema_unet = build_unet(cfg)
    ema.copy_to(ema_unet.parameters())
    tmp = out / f".{PIPELINE_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    DDPMPipeline(unet=ema_unet.eval(), scheduler=scheduler).save_pretrained(str(tmp))
    shutil.rmtree(out / PIPELINE_DIR, ignore_errors=True)
    tmp.rename(out / PIPELINE_DIR)
    done = read_json(stage.done_path)
    summary = {
        "n_train_images": n, "sample_size": cfg.sample_size, "epochs": cfg.epochs, "batch_size": bs,
        "steps": cfg.epochs * steps_per_epoch, "parameters": count_parameters(unet), "device": device,
        "train_seconds": done.get("seconds"), "wall_seconds": round(time.perf_counter() - t0, 2),
        "final_loss": history[-1]["loss"] if history else None, "history": history,
        "pipeline": str(out / PIPELINE_DIR),
    }
    write_json(summary_path, summary)
    return summary


def load_pipeline(run: Run):
    """The saved ``DDPMPipeline`` (EMA UNet + training scheduler), loaded offline from the run folder."""
    from diffusers import DDPMPipeline

    path = run.synthetic_dir / PIPELINE_DIR
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no diffusion pipeline in {path}: run tskd_utils.synthesis.train_diffusion "
                                f"(notebook 03) first")
    pipe = DDPMPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.unet.eval()
    return pipe


def training_history(run: Run) -> list[dict]:
    from .training import history_of

    return history_of(run.synthetic_dir / STAGE_DIR)


# =================================================================================== sampling


def image_seed(seed: int, index: int) -> int:
    """The seed of synthetic image ``index`` of a run with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(index), 3]).generate_state(1)[0])


def initial_noise(seed: int, indices: Sequence[int], size: int) -> torch.Tensor:
    """x_T of the given images, (B, 1, S, S), each from its own CPU generator."""
    return torch.cat([torch.randn((1, 1, size, size), generator=torch.Generator().manual_seed(image_seed(seed, i)))
                      for i in indices])


@torch.inference_mode()
def sample(unet, scheduler_config, sampler: str, steps: int, seed: int, indices: Sequence[int],
           device: str = "cpu", keep: Optional[Sequence[int]] = None) -> tuple[np.ndarray, list]:
    """Sample the images ``indices`` in ONE batch; returns float32 (B, S, S) in [0, 1] and the
    trajectory ``[(t, x_t as (B, S, S) in [0, 1]), ...]`` at the step numbers in ``keep``
    (0 = the initial noise x_T; ``steps`` = the final image, labelled t = -1)."""
    sched = sampling_scheduler(sampler, scheduler_config)  # fresh: multistep samplers keep state
    sched.set_timesteps(steps)
    size = unet.config.sample_size
    x = initial_noise(seed, indices, size).to(device)
    keep = set(keep or [])
    traj = []

    def snap(label, z):
        traj.append((label, ((z.float().clamp(-1, 1) + 1) / 2)[:, 0].cpu().numpy()))

    if 0 in keep:
        snap(int(sched.timesteps[0]), x)
    for k, t in enumerate(sched.timesteps):
        eps = unet(x, t.to(device)).sample
        x = sched.step(eps, t, x).prev_sample
        if k + 1 in keep:
            snap(int(sched.timesteps[k + 1]) if k + 1 < len(sched.timesteps) else -1, x)
    return ((x.float().clamp(-1, 1) + 1) / 2)[:, 0].cpu().numpy(), traj


def to_uint8(image01: np.ndarray, size: int) -> np.ndarray:
    """A sample in [0, 1] at sample_size -> uint8 (size, size), bicubic upsampling."""
    arr = image01.astype(np.float32) * 255.0
    if arr.shape[0] != size:
        arr = cv2.resize(arr, (size, size), interpolation=UPSAMPLE_INTERPOLATION)
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def _file_name(index: int, n: int) -> str:
    return f"syn_{index:0{max(4, len(str(n - 1)))}d}.png"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _settings(run: Run) -> dict:
    cfg = run.profile.diffusion
    if cfg.sampler not in SAMPLERS:
        raise KeyError(f"unknown diffusion.sampler {cfg.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    return {"n_synthetic": cfg.n_synthetic, "seed": run.seed, "sampler": cfg.sampler,
            "sampling_steps": cfg.sampling_steps, "sample_batch_size": cfg.sample_batch_size,
            "sample_size": cfg.sample_size, "image_size": run.profile.data.image_size,
            "interpolation": "bicubic (cv2.INTER_CUBIC), clipped, rounded",
            "model_sha256": _sha256(run.synthetic_dir / PIPELINE_DIR / "unet" / "diffusion_pytorch_model.safetensors")}


def generate(run: Run, force: bool = False) -> list[Path]:
    """Sample ``n_synthetic`` images into ``<run>/synthetic/images`` (resumable) and record them.

    Trains the DDPM first if it is not there yet (reusing a finished one). Images already written
    for the same model and settings are kept; the missing ones are generated in the same fixed
    batches as an uninterrupted run, so the same files result. ``force`` regenerates all.
    """
    cfg = run.profile.diffusion
    if cfg.n_synthetic <= 0:
        _skipped(run)
        return []
    if not _pipeline_ready(run):
        print("no trained diffusion model yet: training it first")
        train_diffusion(run)
    out, n, size = run.synthetic_dir / IMAGES_DIR, cfg.n_synthetic, run.profile.data.image_size
    record_path = run.synthetic_dir / "synthetic.json"
    settings = _settings(run)
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
    batches = [list(range(s, min(s + bs, n))) for s in range(0, n, bs)]
    todo = [b for b in batches if not all(paths[i].is_file() for i in b)]
    kept = n - sum(not paths[i].is_file() for b in todo for i in b)
    t0 = time.perf_counter()
    if todo:
        pipe = load_pipeline(run)
        unet = pipe.unet.to(run.device)
        bar = tqdm(total=n, initial=n - sum(len(b) for b in todo), desc=f"sampling ({cfg.sampler}, "
                   f"{cfg.sampling_steps} steps)", unit="img", dynamic_ncols=True)
        for b in todo:
            images, _ = sample(unet, pipe.scheduler.config, cfg.sampler, cfg.sampling_steps, run.seed, b, run.device)
            for i, im in zip(b, images):
                if not paths[i].is_file():
                    tmp = paths[i].with_name(f".{paths[i].name}.tmp")
                    write_png(tmp, to_uint8(im, size))
                    tmp.replace(paths[i])
            bar.update(len(b))
        bar.close()
    seconds = time.perf_counter() - t0
    generated = n - kept
    record = {**settings, "complete": True, "count": n, "generated_now": generated, "kept": kept,
              "sampling_seconds": round(seconds, 2),
              "seconds_per_image": round(seconds / generated, 4) if generated else None,
              "train_seconds": (read_json(run.synthetic_dir / "train.json").get("train_seconds")
                                if (run.synthetic_dir / "train.json").is_file() else None),
              "files": [p.name for p in paths]}
    if previous.get("complete") and not generated:  # nothing new: keep the timings of the run that made them
        for k in ("sampling_seconds", "seconds_per_image", "generated_now", "kept"):
            record[k] = previous.get(k, record[k])
    write_json(record_path, record)
    print(f"{n} synthetic images in {out} ({generated} generated now in {seconds:.1f} s, {kept} kept)")
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
                                f"tskd_utils.synthesis.generate (notebook 03) first")
    return paths


def denoising_trajectory(run: Run, n_steps_shown: int = 8, index: int = 0) -> dict:
    """x_t of synthetic image ``index`` at ``n_steps_shown`` evenly spaced sampler steps (first = the
    initial noise, last = the final sample), for the notebook's figure."""
    cfg = run.profile.diffusion
    pipe = load_pipeline(run)
    steps = cfg.sampling_steps
    keep = sorted({int(round(k)) for k in np.linspace(0, steps, max(2, min(n_steps_shown, steps + 1)))})
    _, traj = sample(pipe.unet.to(run.device), pipe.scheduler.config, cfg.sampler, steps, run.seed, [index],
                     run.device, keep=keep)
    return {"step": keep, "timestep": [t for t, _ in traj], "images": [x[0] for _, x in traj],
            "sampler": cfg.sampler, "sampling_steps": steps}


# ============================================================================ the noise schedule


def noise_schedule(run: Run) -> np.ndarray:
    """alpha-bar_t (the signal fraction kept at step t) of the training schedule."""
    return build_scheduler(run.profile.diffusion).alphas_cumprod.numpy()


def noised_examples(run: Run, timesteps: Sequence[int], case_index: int = 0, seed: int = 0) -> list[np.ndarray]:
    """One real train image (at sample_size) noised to each t in ``timesteps``: images in [0, 1]."""
    cfg = run.profile.diffusion
    size = run.profile.data.image_size
    x0 = _to_sample_size(letterbox(read_image(train_paths(run)[case_index]), size), cfg.sample_size)
    x0 = torch.from_numpy(x0.astype(np.float32) / 127.5 - 1.0)[None, None]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    sched = build_scheduler(cfg)
    out = []
    for t in timesteps:
        xt = sched.add_noise(x0, noise, torch.tensor([int(t)]))
        out.append(((xt.clamp(-1, 1) + 1) / 2)[0, 0].numpy())
    return out


# ====================================================================================== quality


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: Optional[float] = None) -> float:
    """Frechet distance between Gaussians fitted to two sets of embeddings (N, D) and (M, D).

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with ``scipy.linalg.sqrtm``. With fewer
    samples than dimensions a covariance is singular and its square root ill-defined, so ``eps``
    times the identity is added to both covariances (default: 1e-6 times the mean variance,
    small against the distances reported; applied whenever N or M <= D, or when sqrtm fails).
    Like FID, the estimate is biased upwards for small N: compare only distances computed from
    the same numbers of samples.
    """
    from scipy import linalg

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"the Frechet distance needs at least 2 samples per set (got {len(a)} and {len(b)})")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    d = a.shape[1]
    if eps is None:
        eps = 1e-6 * max(float(np.mean(np.diag(s_a) + np.diag(s_b)) / 2), 1e-12)
    regularise = min(len(a), len(b)) <= d
    for attempt in range(2):
        if regularise or attempt:
            s_a_, s_b_ = s_a + eps * np.eye(d), s_b + eps * np.eye(d)
        else:
            s_a_, s_b_ = s_a, s_b
        covmean = linalg.sqrtm(s_a_ @ s_b_)
        if np.all(np.isfinite(covmean)):
            break
    covmean = np.real(covmean)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a_) + np.trace(s_b_) - 2 * np.trace(covmean))


def _nearest(query: np.ndarray, ref: np.ndarray, exclude: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """L2 distance of each query row to its nearest ref row (and its index); ``exclude[i, j]`` masks pairs."""
    q, r = torch.from_numpy(np.asarray(query, np.float64)), torch.from_numpy(np.asarray(ref, np.float64))
    dist = torch.cdist(q, r)
    if exclude is not None:
        dist[torch.from_numpy(exclude)] = float("inf")
    d, i = dist.min(dim=1)
    return d.numpy(), i.numpy()


def _stats(x: np.ndarray) -> dict:
    x = np.asarray(x, dtype=np.float64)
    return {"n": int(x.size), "min": float(x.min()), "p05": float(np.percentile(x, 5)), "median": float(np.median(x)),
            "mean": float(x.mean()), "max": float(x.max())}


def _teacher_images(paths: Sequence[Path], size: int) -> list[np.ndarray]:
    return [letterbox(read_image(p), size) for p in paths]


def through_sample_size(image: np.ndarray, sample_size: int) -> np.ndarray:
    """A letterboxed uint8 image sent through the DDPM's resolution: down to ``sample_size`` as for
    training, back up as samples are (what a perfect generator at that resolution could produce)."""
    small = _to_sample_size(image, sample_size).astype(np.float32) / 255.0
    return to_uint8(small, image.shape[0])


def quality_report(run: Run, force: bool = False, draws: int = FD_DRAWS) -> dict:
    """Frechet distances and the memorisation check; saved to ``<run>/synthetic/quality.json``.

    *Frechet distance* (FD) in the pooled embedding space of the pretrained teacher encoder (the
    same network that will produce the distillation targets). FD is biased by sample size, so
    every FD here is computed from two sets of the same size ``k = min(n_synthetic, n_train // 2)``:
    ``fd_real_vs_synthetic`` between k random real train images and k synthetic ones,
    ``fd_floor`` between two disjoint random sets of k real train images (what a perfect generator
    would score), and ``fd_real_vs_resized_real`` between k real train images and k *other* train
    images sent through the DDPM's resolution (down to ``sample_size``, bicubic back up): the score
    of a generator that is perfect except for its resolution. All as mean and std over ``draws``
    random draws of the real sets (the synthetic and resized sets are fixed).

    *Memorisation*: for every synthetic image, the distance to its nearest train image, in the
    embedding space and in pixel space (RMS difference of [0, 1] images at the DDPM's sample size,
    the nearer of the train image and its mirror image, since training used flips). The reference is
    the same distance for held-out real images (the val split: other subjects), i.e. how close a
    genuinely new image comes to the train set. Synthetic images much closer than that are copies.
    """
    path = run.synthetic_dir / "quality.json"
    cfg = run.profile.diffusion
    if cfg.n_synthetic <= 0:
        report = {"skipped": True, "reason": "n_synthetic = 0"}
        run.synthetic_dir.mkdir(parents=True, exist_ok=True)
        write_json(path, report)
        return report
    if not force and path.is_file():
        report = read_json(path)
        if (report.get("model_sha256") == _settings(run)["model_sha256"] and report.get("draws") == draws
                and report.get("version") == QUALITY_VERSION):
            print(f"quality report computed earlier: reusing {path} (force=True recomputes)")
            return report
    from .teacher import pooled_embeddings

    t0 = time.perf_counter()
    syn_paths = synthetic_paths(run)
    train_names, val_names = list(run.splits["train"]), list(run.splits["val"])
    real_paths = train_paths(run) + [run.info.case(c).image for c in val_names]
    ts = run.profile.teacher.input_size
    emb_real = pooled_embeddings(run, train_names + val_names, _teacher_images(real_paths, ts)).numpy()
    emb_syn = pooled_embeddings(run, [p.stem for p in syn_paths], _teacher_images(syn_paths, ts),
                                synthetic=True).numpy()
    emb_train, emb_val = emb_real[:len(train_names)], emb_real[len(train_names):]
    n_train, n_syn = len(emb_train), len(emb_syn)
    k = min(n_syn, n_train // 2)
    rng = np.random.default_rng([run.seed, 11])
    resized_idx = np.sort(rng.permutation(n_train)[:k])
    size, s = run.profile.data.image_size, cfg.sample_size
    resized = [letterbox(through_sample_size(letterbox(read_image(real_paths[i]), size), s), ts) for i in resized_idx]
    emb_resized = pooled_embeddings(run, [f"resized{s}_{train_names[i]}" for i in resized_idx], resized,
                                    synthetic=True).numpy()
    t_embed = time.perf_counter() - t0

    # Frechet distances, equal set sizes
    others = np.setdiff1d(np.arange(n_train), resized_idx)
    fd_syn, fd_floor, fd_resized = [], [], []
    for _ in range(draws):
        perm = rng.permutation(n_train)
        syn_idx = rng.permutation(n_syn)[:k]
        fd_syn.append(frechet_distance(emb_train[perm[:k]], emb_syn[syn_idx]))
        fd_floor.append(frechet_distance(emb_train[perm[:k]], emb_train[perm[k:2 * k]]))
        fd_resized.append(frechet_distance(emb_train[rng.permutation(others)[:k]], emb_resized))

    # memorisation: nearest train image in embedding and pixel space
    train01 = (training_images(run)[:, 0] + 1) / 2
    pix_train = train01.numpy().reshape(n_train, -1)
    pix_train_flip = train01.flip(-1).numpy().reshape(n_train, -1)
    pix_syn = np.stack([_to_sample_size(read_image(p), s) for p in syn_paths]).astype(np.float32)
    pix_syn = pix_syn.reshape(n_syn, -1) / 255
    pix_val = np.stack([_to_sample_size(letterbox(read_image(run.info.case(c).image), size), s)
                        for c in val_names]).astype(np.float32).reshape(len(val_names), -1) / 255
    rms = 1 / math.sqrt(s * s)

    def pixel_nn(q):
        d1, i1 = _nearest(q, pix_train)
        d2, i2 = _nearest(q, pix_train_flip)
        return np.minimum(d1, d2) * rms, np.where(d2 < d1, i2, i1), d2 < d1

    syn_emb_d, syn_emb_i = _nearest(emb_syn, emb_train)
    val_emb_d, _ = _nearest(emb_val, emb_train) if len(emb_val) else (np.zeros(0), None)
    syn_pix_d, syn_pix_i, syn_pix_flip = pixel_nn(pix_syn)
    val_pix_d, _, _ = pixel_nn(pix_val) if len(pix_val) else (np.zeros(0), None, None)

    def memo(syn_d, val_d) -> dict:
        out = {"synthetic_to_train": _stats(syn_d)}
        if len(val_d):
            out["heldout_real_to_train"] = _stats(val_d)
            out["ratio_median"] = float(np.median(syn_d) / max(np.median(val_d), 1e-12))
            out["fraction_closer_than_p05_heldout"] = float(np.mean(syn_d < np.percentile(val_d, 5)))
            out["fraction_closer_than_any_heldout"] = float(np.mean(syn_d < val_d.min()))
        return out

    report = {
        "version": QUALITY_VERSION, "n_synthetic": n_syn, "n_train": n_train, "n_heldout": len(val_names),
        "draws": draws, "fd_set_size": k,
        "embedding": f"pooled embedding of the pretrained {run.profile.teacher.name} encoder "
                     f"({emb_real.shape[1]}-d, input {ts} px)",
        "fd_real_vs_synthetic": {"mean": float(np.mean(fd_syn)), "std": float(np.std(fd_syn)), "values": fd_syn},
        "fd_floor_real_vs_real": {"mean": float(np.mean(fd_floor)), "std": float(np.std(fd_floor)),
                                  "values": fd_floor},
        "fd_real_vs_resized_real": {"mean": float(np.mean(fd_resized)), "std": float(np.std(fd_resized)),
                                    "values": fd_resized, "resolution": s},
        "fd_ratio": float(np.mean(fd_syn) / max(np.mean(fd_floor), 1e-12)),
        "memorisation_embedding": memo(syn_emb_d, val_emb_d),
        "memorisation_pixels": memo(syn_pix_d, val_pix_d),
        "pixel_space": f"RMS difference of [0, 1] images at {s} px, nearest of the train image and its mirror",
        "nearest": [{"synthetic": p.name, "train_pixels": train_names[int(i)], "mirrored": bool(f),
                     "pixel_distance": float(d), "train_embedding": train_names[int(j)], "embedding_distance": float(e)}
                    for p, i, f, d, j, e in zip(syn_paths, syn_pix_i, syn_pix_flip, syn_pix_d, syn_emb_i, syn_emb_d)],
        "model_sha256": _settings(run)["model_sha256"],
        "seconds": {"embeddings": round(t_embed, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    write_json(path, report)
    return report


# ====================================================================================== figures


def _savefig(fig, save: Optional[Path]):
    if save is not None:
        fig.savefig(save, dpi=110, bbox_inches="tight")
    return fig


def plot_noise_schedule(run: Run, timesteps: Sequence[int] = (0, 50, 150, 300, 500, 750, 999), case_index: int = 0):
    """alpha-bar over t, and one real image noised at a few t (saved to figures/)."""
    import matplotlib.pyplot as plt

    abar = noise_schedule(run)
    timesteps = [t for t in timesteps if t < len(abar)]
    images = noised_examples(run, timesteps, case_index)
    fig = plt.figure(figsize=(2.0 * len(timesteps), 4.6))
    grid = fig.add_gridspec(2, len(timesteps), height_ratios=[1.3, 1])
    ax = fig.add_subplot(grid[0, :])
    ax.plot(abar, label=r"$\bar\alpha_t$ (signal kept)")
    ax.plot(np.sqrt(1 - abar), label=r"$\sqrt{1-\bar\alpha_t}$ (noise std)")
    ax.set_xlabel("t")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{run.profile.diffusion.beta_schedule} schedule, T = {len(abar)}")
    for k, (t, im) in enumerate(zip(timesteps, images)):
        a = fig.add_subplot(grid[1, k])
        a.imshow(im, cmap="gray", vmin=0, vmax=1)
        a.set_title(f"t = {t}", fontsize=8)
        a.axis("off")
    fig.tight_layout()
    return _savefig(fig, run.figures_dir / "diffusion_noise_schedule.png")


def plot_loss(run: Run):
    return viz.curves({"DDPM": training_history(run)}, keys=("loss", "lr"), title="DDPM training",
                      save=run.figures_dir / "diffusion_loss.png")


def plot_trajectory(run: Run, traj: dict):
    titles = [f"step {s}: " + (f"x_t, t={t}" if t >= 0 else "final") for s, t in zip(traj["step"], traj["timestep"])]
    return viz.image_grid(traj["images"], titles=titles, cols=len(titles), size=1.8,
                          suptitle=f"denoising one sample ({traj['sampler']}, {traj['sampling_steps']} steps)",
                          save=run.figures_dir / "diffusion_trajectory.png")


def plot_real_vs_synthetic(run: Run, n: int = 8):
    """A row block of real train images above one of synthetic images, at the run's image size."""
    size = run.profile.data.image_size
    syn = synthetic_paths(run)[:n]
    rng = np.random.default_rng(run.seed)
    real = [train_paths(run)[i] for i in sorted(rng.permutation(len(run.splits["train"]))[:len(syn)])]
    images = [letterbox(read_image(p), size) for p in real] + [read_image(p) for p in syn]
    titles = [f"real {p.stem}" for p in real] + [f"synthetic {p.stem}" for p in syn]
    cols = min(8, len(syn))
    return viz.image_grid(images, titles=titles, cols=cols, size=1.8, suptitle="real (top) vs synthetic (bottom)",
                          save=run.figures_dir / "diffusion_real_vs_synthetic.png")


def plot_fd(run: Run, report: dict):
    keys = {"real vs real\n(floor)": "fd_floor_real_vs_real",
            f"real vs real\nthrough {report['fd_real_vs_resized_real']['resolution']} px": "fd_real_vs_resized_real",
            "real vs\nsynthetic": "fd_real_vs_synthetic"}
    values = {label: report[key]["mean"] for label, key in keys.items()}
    errors = {label: report[key]["std"] for label, key in keys.items()}
    return viz.bars(values, errors, ylabel="Frechet distance", highlight="real vs\nsynthetic",
                    title=f"teacher-embedding FD, {report['fd_set_size']} vs {report['fd_set_size']} images",
                    save=run.figures_dir / "diffusion_fd.png")


def plot_memorisation(run: Run, report: dict):
    """Histograms: nearest-train distance of synthetic vs held-out real images (embedding, pixels)."""
    import matplotlib.pyplot as plt

    syn_e = [r["embedding_distance"] for r in report["nearest"]]
    syn_p = [r["pixel_distance"] for r in report["nearest"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, syn, label in ((axes[0], "memorisation_embedding", syn_e, "embedding L2"),
                                (axes[1], "memorisation_pixels", syn_p, "pixel RMS")):
        held = report[key].get("heldout_real_to_train")
        ax.hist(syn, bins=15, alpha=0.6, label=f"synthetic (n={len(syn)})", density=True)
        if held:
            ax.axvline(held["median"], color="tab:orange", ls="--", label=f"held-out real median (n={held['n']})")
            ax.axvline(held["p05"], color="tab:orange", ls=":", label="held-out real 5th pct")
        ax.set_xlabel(f"distance to nearest train image ({label})")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _savefig(fig, run.figures_dir / "diffusion_memorisation.png")


def plot_nearest_pairs(run: Run, report: dict, n_pairs: int = 6):
    """The synthetic images closest to a train image (pixel space) beside that train image."""
    size = run.profile.data.image_size
    rows = sorted(report["nearest"], key=lambda r: r["pixel_distance"])[:n_pairs]
    images, titles = [], []
    for r in rows:
        train = letterbox(read_image(run.info.case(r["train_pixels"]).image), size)
        images += [read_image(run.synthetic_dir / IMAGES_DIR / r["synthetic"]),
                   train[:, ::-1] if r["mirrored"] else train]
        mirrored = " (mirrored)" if r["mirrored"] else ""
        titles += [Path(r["synthetic"]).stem, f"nearest: {r['train_pixels']}{mirrored}\nRMS {r['pixel_distance']:.3f}"]
    return viz.image_grid(images, titles=titles, cols=4, size=2.0,
                          suptitle="closest synthetic / train pairs (pixel space)",
                          save=run.figures_dir / "diffusion_nearest_pairs.png")


def fd_table(report: dict):
    """The Frechet distances as a pandas table (mean, std over the draws; set sizes)."""
    import pandas as pd

    k = report["fd_set_size"]
    rows = {"real vs real (floor)": "fd_floor_real_vs_real",
            f"real vs real through {report['fd_real_vs_resized_real']['resolution']} px": "fd_real_vs_resized_real",
            "real vs synthetic": "fd_real_vs_synthetic"}
    return pd.DataFrame([{"comparison": label, "FD mean": report[key]["mean"], "FD std": report[key]["std"],
                          "images per set": k, "draws": report["draws"]} for label, key in rows.items()]
                        ).set_index("comparison")


def memorisation_table(report: dict):
    """A small pandas table of the memorisation numbers."""
    import pandas as pd

    rows = []
    for space in ("embedding", "pixels"):
        m = report[f"memorisation_{space}"]
        for who in ("synthetic_to_train", "heldout_real_to_train"):
            if who in m:
                rows.append({"space": space, "images": who, **{k: m[who][k] for k in ("n", "min", "p05", "median")}})
    return pd.DataFrame(rows)


def notebook_overrides(profile: str, overrides: dict, **values) -> dict:
    """``overrides`` plus ``diffusion.<key>: value`` for every value >= 0 that differs from the profile's."""
    base = get_profile(profile, overrides).diffusion
    out = dict(overrides)
    for key, value in values.items():
        if value is not None and value >= 0 and value != getattr(base, key):
            out[f"diffusion.{key}"] = value
    return out
