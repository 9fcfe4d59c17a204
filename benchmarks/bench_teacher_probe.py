#!/usr/bin/env python
"""Frozen-encoder probe: how good is the pretrained teacher's embedding under an input convention and a
prefix compute type? A head is trained on the frozen embeddings of a run's labeled cases and scored on its
validation cases (never the test split).

    python benchmarks/bench_teacher_probe.py --run-dir runs/hc18/hc18_n20_s0 \\
        --conventions minmax imagenet --dtypes float32 bfloat16

Prints the best validation Dice per (convention, dtype) and the time. Uses the run's split and profile.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def probe(run, convention: str, dtype: str, epochs: int) -> tuple[float, float]:
    from tskd_utils import features, teacher
    from tskd_utils.models import freeze
    from tskd_utils.training import Stage

    t = replace(run.profile.teacher, head_epochs=epochs, prefix_dtype=dtype, cached_augmentations=0)
    run = replace(run, profile=replace(run.profile, teacher=t))
    t0 = time.perf_counter()
    enc = freeze(teacher.build_encoder(run))
    enc.normalization = convention
    data = teacher.teacher_data(run, enc) if convention == "minmax" else None
    if data is None:  # another convention: its own cache, never mixed with the run's
        data = teacher.teacher_data(replace(run, dir=run.dir / f"probe-{convention}"), enc)
    embs = [teacher.frozen_embeddings(enc, part, prefix, "cpu", t.batch_size)
            for part, prefix in ((data.train, data.train_prefix), (data.val, data.val_prefix))]
    head = teacher.new_head(run, enc)
    with tempfile.TemporaryDirectory() as tmp:
        hist = teacher.fit_head(head, embs[0], data.train["masks"], embs[1], data.val["masks"], t,
                                Stage(Path(tmp) / "probe"), run.seed, "cpu")
    return max(r["val_dice"] for r in hist), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--conventions", nargs="+", default=["minmax", "imagenet"])
    ap.add_argument("--dtypes", nargs="+", default=["float32"])
    args = ap.parse_args()
    from tskd_utils.run import load_run

    run = load_run(args.run_dir)
    print(f"{run.dataset}: {len(run.splits['labeled'])} labeled, {len(run.splits['val'])} validation cases, "
          f"head trained {args.epochs} epochs, {torch.get_num_threads()} threads")
    print("| input convention | prefix dtype | best validation Dice | seconds |\n|---|---|---|---|")
    for convention in args.conventions:
        for dtype in args.dtypes:
            dice, seconds = probe(run, convention, dtype, args.epochs)
            print(f"| {convention} | {dtype} | {dice:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
