#!/usr/bin/env python
"""Time the DDPM of stage 3 (tskd_utils.generation) on this machine.

    python benchmarks/bench_diffusion.py                                  # micro-benchmark, demo profile
    python benchmarks/bench_diffusion.py --data-root /tmp/tskd_data --dataset hc18 --run-dir /tmp/runs/bench
                                                                          # + the real train + sample + quality

Micro-benchmark (random data, the profile's DiffusionConfig): one training step (forward,
backward, clipping, AdamW, EMA) at the profile's batch size, and sampling one batch of
``sample_batch_size`` images with the profile's sampler and steps; wall time and process CPU
time, with the load average (the machine may be shared). From these it estimates the profile's
total training time for ``--n-train`` images (default: the profile's ``data.max_train``).

With ``--data-root`` it also runs the stage for real on a fresh run folder (train_diffusion,
generate, quality_report) and reports the wall times and the quality numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tskd_utils import generation as S  # noqa: E402
from tskd_utils import quality as Q  # noqa: E402
from tskd_utils.losses import diffusion_loss  # noqa: E402
from tskd_utils.config import get_profile  # noqa: E402


def timed(fn, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    walls.sort()
    return {"wall_median_s": walls[len(walls) // 2], "wall_min_s": walls[0],
            "cpu_median_s": sorted(cpus)[len(cpus) // 2]}


def micro(profile: str, overrides: dict, repeats: int, warmup: int, n_train) -> dict:
    from diffusers.training_utils import EMAModel

    prof = get_profile(profile, overrides)
    cfg = prof.diffusion
    torch.manual_seed(0)
    unet, sched = S.build_unet(cfg), S.build_scheduler(cfg)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr)
    x = torch.rand(cfg.batch_size, 1, cfg.sample_size, cfg.sample_size) * 2 - 1

    def step():
        loss = diffusion_loss(unet, sched, x)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
        opt.step()
        ema.step(unet.parameters())

    train = timed(step, repeats, warmup)
    unet.eval()
    batch = list(range(cfg.sample_batch_size))
    samp = timed(lambda: S.sample(unet, sched.config, cfg.sampler, cfg.sampling_steps, 0, batch),
                 max(2, repeats // 4), 1)
    n_train = n_train or prof.data.max_train or 200
    steps = cfg.epochs * math.ceil(n_train / cfg.batch_size)
    per_image_sample = samp["wall_median_s"] / cfg.sample_batch_size
    est_train = cfg.epochs * n_train * train["wall_median_s"] / cfg.batch_size  # a partial last batch costs less
    return {
        "profile": profile, "overrides": overrides, "diffusion": {k: (list(v) if isinstance(v, tuple) else v)
                                                                  for k, v in vars(cfg).items()},
        "parameters": sum(p.numel() for p in unet.parameters()),
        "train_step": {**train, "batch": cfg.batch_size, "per_image_s": train["wall_median_s"] / cfg.batch_size},
        "sample_batch": {**samp, "batch": cfg.sample_batch_size, "per_image_s": per_image_sample},
        "estimate": {"n_train": n_train, "steps": steps, "train_s": round(est_train, 1),
                     "sample_s": round(per_image_sample * cfg.n_synthetic, 1),
                     "total_s": round(est_train + per_image_sample * cfg.n_synthetic, 1)},
    }


def real(profile: str, overrides: dict, dataset: str, data_root: str, run_dir: str, n_labeled: int, seed: int) -> dict:
    from tskd_utils.run import setup_run

    run = setup_run(run_dir, profile, dataset, data_root, n_labeled, seed, overrides)
    out = {"run": str(run.dir), "n_train": len(run.splits["train"])}
    t = time.perf_counter()
    summary = S.train_diffusion(run)
    out["train_wall_s"] = round(time.perf_counter() - t, 1)
    out["train_stage_s"] = summary.get("train_seconds")
    out["final_loss"] = summary.get("final_loss")
    t = time.perf_counter()
    S.generate(run)
    out["sample_wall_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    q = Q.quality_report(run)
    out["quality_wall_s"] = round(time.perf_counter() - t, 1)
    out["quality"] = {k: v for k, v in q.items() if k not in ("nearest",)}
    for k in ("fd_real_vs_synthetic", "fd_floor_real_vs_real"):
        out["quality"][k] = {kk: vv for kk, vv in q[k].items() if kk != "values"}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="demo")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a profile override, e.g. diffusion.epochs=10 (repeatable)")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--data-root")
    p.add_argument("--dataset", default="hc18")
    p.add_argument("--run-dir", default="/tmp/tskd_runs/bench_diffusion")
    p.add_argument("--n-labeled", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-micro", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = dict(kv.split("=", 1) for kv in args.override)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "load_before": os.getloadavg()}}
    if not args.skip_micro:
        result["micro"] = micro(args.profile, overrides, args.repeats, args.warmup, args.n_train)
    if args.data_root:
        result["real"] = real(args.profile, overrides, args.dataset, args.data_root, args.run_dir, args.n_labeled,
                              args.seed)
    result["machine"]["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
