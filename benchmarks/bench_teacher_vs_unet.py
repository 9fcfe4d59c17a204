#!/usr/bin/env python
"""Does the foundation model earn its place? The LoRA teacher against the practitioner's U-Net, nothing else trained.

    python benchmarks/bench_teacher_vs_unet.py --data-root /tmp/hc18/data --out /tmp/tvu \
        --profile cpu --dataset hc18 --runs 20:0 20:1 50:0 50:1

For every run N:SEED (n_labeled N, seed SEED; trained in the order given) this opens the run folder ``OUT/<dataset>_n<N>_s<seed>`` (the sweep's name, so a sweep
with the same --out reuses what is trained here), trains the teacher as notebook 02 does (``ensure_teacher``) and
``unet_supervised`` as notebook 04 does, and scores both as notebook 05 does (``evaluate_run``: test split, the
original size; metrics/ of the run). Validation Dice is scored the same way on the validation split. Printed: each
model's Dice per run, and teacher minus U-Net as paired per-case differences with 95% bootstrap intervals, per run
and pooled over the seeds of each n_labeled (cases and seeds resampled). No synthetic images, no distillation: this
is the cheap half of a sweep, the question "does the teacher beat the U-Net", answered on its own. Run again, it
trains nothing that is there and re-scores only runs whose models changed (validation scores are kept in
``<run>/metrics/teacher_vs_unet_val.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_val_paired, also when loaded from elsewhere

from bench_val_paired import validation_dice  # noqa: E402

MODELS = ("teacher", "unet_supervised")


def one_run(args, n_labeled: int, seed: int) -> dict:
    """Train (or reuse) the teacher and the U-Net of one run; their per-case Dice on validation and test."""
    import pandas as pd

    from tskd_utils.evaluate import evaluate_run
    from tskd_utils.run import setup_run
    from tskd_utils.stages import ensure_students, ensure_teacher

    run = setup_run(args.out / f"{args.dataset}_n{n_labeled}_s{seed}", profile=args.profile, dataset=args.dataset,
                    data_root=args.data_root, n_labeled=n_labeled, seed=seed)
    times, t0 = {}, time.time()
    trained = ensure_teacher(run)
    times["teacher s"], t0 = time.time() - t0, time.time()
    trained = bool(ensure_students(run, ["unet_supervised"])) or trained
    times["unet_supervised s"], t0 = time.time() - t0, time.time()
    per_case_path, val_path = run.metrics_dir / "per_case.csv", run.metrics_dir / "teacher_vs_unet_val.json"
    per_case = pd.read_csv(per_case_path) if per_case_path.is_file() else None
    if trained or per_case is None or not set(MODELS) <= set(per_case["method"]) or not val_path.is_file():
        evaluate_run(run, ["unet_supervised"], measure_efficiency=False)
        per_case = pd.read_csv(per_case_path)
        val_path.write_text(json.dumps({m: validation_dice(run, m).tolist() for m in MODELS}))
        times["evaluate s"] = time.time() - t0
    test = per_case.groupby(["method", "case"], sort=False)["dice"].mean().unstack(0)
    val = json.loads(val_path.read_text())
    print(f"{run.dir}: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), flush=True)
    return {"test": {m: test[m].to_numpy() for m in MODELS}, "val": {m: np.array(val[m]) for m in MODELS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--dataset", default="hc18")
    ap.add_argument("--runs", nargs="+", default=["20:0", "20:1", "50:0", "50:1"],
                    help="N:SEED for each run (n_labeled N, seed SEED), trained in this order")
    args = ap.parse_args()

    from tskd_utils.stats import bootstrap_ci, format_interval

    runs = [tuple(int(x) for x in r.split(":")) for r in args.runs]
    results = {r: one_run(args, *r) for r in runs}
    print(f"\n{args.dataset}, profile {args.profile}: Dice (mean over cases) and teacher - unet_supervised, "
          "points [95% bootstrap CI]")
    for split in ("val", "test"):
        for n in sorted({n for n, _ in runs}):
            seeds = sorted(s for m, s in runs if m == n)
            for s in seeds:
                sc = results[(n, s)][split]
                print(f"{split:4s} n{n} seed {s}: teacher {sc['teacher'].mean():.3f}, unet_supervised "
                      f"{sc['unet_supervised'].mean():.3f}, teacher - unet_supervised "
                      f"{format_interval(*bootstrap_ci(sc['teacher'] - sc['unet_supervised']))} "
                      f"({len(sc['teacher'])} cases)")
            if len(seeds) > 1:
                diff = np.stack([results[(n, s)][split]["teacher"] - results[(n, s)][split]["unet_supervised"]
                                 for s in seeds])
                print(f"{split:4s} n{n} seeds {','.join(map(str, seeds))} pooled: teacher - unet_supervised "
                      f"{format_interval(*bootstrap_ci(diff))}")


if __name__ == "__main__":
    main()
