#!/usr/bin/env python
"""Paired comparison of a run's models on its **validation** cases (never the test split): does the foundation-model
teacher beat the practitioner's U-Net, and where does the distilled student stand, before anyone looks at the test set?

    python benchmarks/bench_val_paired.py --run-dir /tmp/fresh-hc18/hc18_n20_s0 --methods teacher unet_supervised ts_kd
    # --csv docs/results/hc18_n20_s0_val.csv keeps the per-case scores (benchmarks/pool_per_case.py pools seeds)

Each model predicts the validation images as the evaluation stage predicts the test images (the teacher through the
run's prefix cache, the students at their input size), the label maps are scored at the original size with the
project's metrics, and every pair of methods gets its paired per-case Dice difference with a 95% bootstrap interval
(``tskd_utils.stats``). Only the teacher's prefix cache is written to (it already holds the validation images).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def validation_dice(run, method: str) -> np.ndarray:
    """Per-case mean foreground Dice of one model of ``run`` on its validation split, at the original size."""
    from tskd_utils.checkpoints import load_model, student_logits, teacher_logits
    from tskd_utils.io import load_case

    records = [run.info.case(c) for c in run.splits["val"]]
    pairs = [load_case(run.info, rec) for rec in records]
    images, masks = [p[0] for p in pairs], [p[1] for p in pairs]
    model, _ = load_model(run, method)
    logits = teacher_logits(run, model, images, [r.case for r in records]) if method.startswith("teacher") \
        else student_logits(run, model, images)
    return case_dice(run, logits, masks)


def case_dice(run, logits, masks) -> np.ndarray:
    """Per-case mean foreground Dice of letterboxed logits against original-size masks."""
    from tskd_utils.checkpoints import to_label_map
    from tskd_utils.metrics import case_metrics

    return np.array([np.mean(case_metrics(to_label_map(lg, mk.shape), mk, run.info.n_classes)["dice"])
                     for lg, mk in zip(logits, masks)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--methods", nargs="+", default=["teacher", "unet_supervised", "ts_kd"])
    ap.add_argument("--csv", type=Path, help="also write the per-case validation Dice here (method, case, dice, and the "
                                             "run's dataset, n_labeled and seed), for benchmarks/pool_per_case.py")
    args = ap.parse_args()

    import pandas as pd

    from tskd_utils.run import load_run
    from tskd_utils.stats import bootstrap_ci, format_interval

    run = load_run(args.run_dir)
    scores = {method: validation_dice(run, method) for method in args.methods}
    print(f"{args.run_dir}: {len(run.splits['val'])} validation images, Dice at the original size")
    print(pd.Series({m: s.mean() for m, s in scores.items()}, name="validation Dice").round(4).to_string())
    for a, b in itertools.combinations(args.methods, 2):
        mean, low, high = bootstrap_ci(scores[a] - scores[b])
        print(f"{a} - {b}: {format_interval(mean, low, high)}")
    if args.csv:
        rows = [{"dataset": run.dataset, "n_labeled": run.n_labeled, "seed": run.seed, "split": "val", "method": m,
                 "case": c, "dice": float(d)} for m, s in scores.items() for c, d in zip(run.splits["val"], s)]
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(args.csv, index=False)
        print(f"per-case validation Dice: {args.csv}")


if __name__ == "__main__":
    main()
