"""The `colab` profile's speed and memory on a GPU, stage by stage (docs/benchmarks.md, "The colab profile on a GPU").

Runs the profile's stages in order on the phantom (the profile's 300 cases, n_labeled 20) with every setting of the
profile except the number of epochs (--epochs: a few of each, so that the whole script fits a short lease), reads each
epoch's seconds from the stage's own log and the GPU's peak memory per stage, and projects each stage to the
profile's full epochs: wall time of the shortened stage + (profile epochs - epochs run) x median epoch time (the
first epoch, with its warm-up, left out of the median). Sampling the profile's synthetic images is done in full.

SAM ViT-B runs with random weights where Meta's are not on the machine (speed and memory do not depend on the
values): a random checkpoint is written and passed as teacher.weights. Writes OUT/colab_gpu.json and prints a table.

    python benchmarks/bench_colab_gpu.py --out /tmp/colab_gpu            # a CUDA machine; an empty --out (a finished
    #                                                                        stage is reused and its wall time is not)
    python benchmarks/bench_colab_gpu.py --out /tmp/colab_cpu --tiny     # the same code path on a CPU (minutes)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tskd_utils import distill, evaluate, generation, teacher  # noqa: E402
from tskd_utils.config import get_profile  # noqa: E402
from tskd_utils.run import setup_run  # noqa: E402
from tskd_utils.training import history_of  # noqa: E402


def _peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> dict:
    if not torch.cuda.is_available():
        return {}
    torch.cuda.synchronize()
    return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def _epochs(stage_dir: Path, full: int) -> dict:
    rows = history_of(stage_dir)
    secs = [r["seconds"] for r in rows if r.get("seconds") is not None]
    steady = sorted(secs[1:] or secs)
    median = steady[len(steady) // 2] if steady else None
    return {"stage": str(stage_dir.relative_to(stage_dir.parents[1])), "epochs_run": len(secs),
            "first_epoch_s": round(secs[0], 2) if secs else None,
            "median_epoch_s": round(median, 3) if median is not None else None, "profile_epochs": full}


def _timed(name: str, fn, stage_dirs, results: list) -> None:
    """Run ``fn``; its wall time, the GPU's peak memory and each stage's epochs projected to the profile's.
    ``stage_dirs()`` gives (stage folder, the profile's epochs) once ``fn`` has run."""
    _peak_reset()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    stages = [_epochs(d, full) for d, full in stage_dirs()]
    extra = sum((s["profile_epochs"] - s["epochs_run"]) * (s["median_epoch_s"] or 0.0) for s in stages if s["epochs_run"])
    row = {"what": name, "wall_s": round(wall, 1), "projected_s": round(wall + extra, 1), "stages": stages, **_peak_gb()}
    results.append(row)
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each training stage actually run")
    ap.add_argument("--methods", default="ts_kd,unet_supervised")
    ap.add_argument("--n-labeled", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="64 px, 40 cases, 8 synthetic images: the code path on a CPU")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_root = out / "data"
    n_cases = 40 if args.tiny else 300  # the colab profile's phantom_cases
    if not (data_root / "phantom" / "dataset.json").is_file():
        subprocess.run([sys.executable, str(REPO / "data_scripts" / "prepare_phantom.py"), "--out", str(data_root),
                        "--n-cases", str(n_cases)], check=True)

    import timm
    from safetensors.torch import save_file

    weights = out / "sam_vit_b_random.safetensors"
    if not weights.is_file():
        torch.manual_seed(0)
        vit = timm.create_model("samvit_base_patch16", pretrained=False, num_classes=0)
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
    e = args.epochs
    overrides = {"teacher.weights": str(weights), "teacher.epochs": e, "teacher.head_epochs": e,
                 "teacher.warmup_epochs": 1, "diffusion.epochs": e, "diffusion.warmup_steps": 10,
                 "distill.epochs": e, "distill.warmup_epochs": 1, "finetune.epochs": e, "finetune.warmup_epochs": 1,
                 "supervised.epochs": e, "supervised.warmup_epochs": 1}
    if args.tiny:
        overrides.update({"teacher.input_size": 64, "data.image_size": 64, "data.num_workers": 0,
                          "diffusion.n_synthetic": 8, "diffusion.sample_size": 32, "diffusion.sampling_steps": 5})
    run = setup_run(out / "run", "colab", "phantom", data_root, args.n_labeled, 0, overrides)
    full = get_profile("colab")
    p = run.profile
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    info = {"device": device, "torch": torch.__version__, "run_device": run.device, "epochs_run": e,
            "n_labeled": args.n_labeled, "cases": n_cases, "n_synthetic": p.diffusion.n_synthetic,
            "settings": {"teacher": vars(p.teacher), "diffusion": vars(p.diffusion), "distill": vars(p.distill),
                         "finetune": vars(p.finetune), "supervised": vars(p.supervised)}}
    print(json.dumps({k: v for k, v in info.items() if k != "settings"}), flush=True)
    results: list = []

    t_dir = run.teacher_dir
    _timed("teacher (notebook 02)", lambda: teacher.train_teacher(run),
           lambda: [(t_dir / "frozen", full.teacher.head_epochs), (t_dir / "lora", full.teacher.epochs)], results)
    _timed("diffusion: training and sampling (notebook 03)", lambda: generation.generate(run),
           lambda: [(d.parent, full.diffusion.epochs) for d in run.synthetic_dir.rglob("done.json")], results)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        mdir = distill.method_dir(run, m)
        ft_epochs = full.supervised.epochs if m == "unet_supervised" else full.finetune.epochs
        _timed(f"{m} (notebook 04)", lambda m=m: distill.run_method(run, m),
               lambda mdir=mdir, ft=ft_epochs: [(mdir / "pretrain", full.distill.epochs)] * (mdir / "pretrain").is_dir()
               + [(mdir / "finetune", ft)], results)

    summary = {}
    _timed("evaluation (notebook 05)",
           lambda: summary.update(evaluate.evaluate_run(run, methods, include_frozen=True)), list, results)
    info["latency"] = {m: {k: s.get(k) for k in ("latency_ms", "gpu_latency_ms", "params_m", "dice") if k in s}
                       for m, s in summary.get("methods", {}).items()}
    info["results"] = results
    info["projected_total_min"] = round(sum(r["projected_s"] for r in results) / 60, 1)
    (out / "colab_gpu.json").write_text(json.dumps(info, indent=1, default=str))
    print(f"\n{device}, colab profile, {n_cases} phantom cases, n_labeled {args.n_labeled}, {e} epochs per stage run")
    print(f"{'stage':48s} {'wall s':>8s} {'projected s':>12s} {'peak GB':>8s}")
    for r in results:
        print(f"{r['what']:48s} {r['wall_s']:8.1f} {r['projected_s']:12.1f} {r.get('peak_allocated_gb', 0):8.2f}")
        for s in r["stages"]:
            print(f"    {s['stage']:44s} {s['epochs_run']} epochs run, median {s['median_epoch_s']} s/epoch, "
                  f"profile {s['profile_epochs']}")
    print(f"projected run: {info['projected_total_min']} min; latency: {json.dumps(info['latency'])}")


if __name__ == "__main__":
    main()
