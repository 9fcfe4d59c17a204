"""Does LiteMedSAM's input convention matter? A frozen-encoder probe fed both ways.

    python benchmarks/bench_input_convention.py --run-dir RUN [--epochs 15]

RUN is a demo-profile run folder on a real dataset (its labeled and validation cases are used).
The pretrained LiteMedSAM encoder stays frozen; a segmentation head is trained on its embeddings
(the notebook-02 baseline) once with the input its weights expect (per-image min-max to [0, 1])
and once with ImageNet mean/std normalisation, which runs without error but is not what MedSAM was
trained with. The validation Dice of the two probes is printed. tests/test_teacher.py pins the
right convention.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args()
    from tskd_utils import teacher
    from tskd_utils.data import SegmentationDataset
    from tskd_utils.models import SegHead, freeze
    from tskd_utils.run import load_run

    run = load_run(args.run_dir)
    t = replace(run.profile.teacher, head_epochs=args.epochs)
    train = SegmentationDataset(run.info, run.splits["labeled"], t.input_size)
    val = SegmentationDataset(run.info, run.splits["val"], t.input_size)
    masks = [torch.from_numpy(np.stack(d.masks)).long() for d in (train, val)]
    print(f"{run.dataset}: {len(train)} labeled, {len(val)} validation cases, head trained {t.head_epochs} epochs")
    for convention in ("minmax", "imagenet"):
        t0 = time.perf_counter()
        enc = freeze(teacher.build_encoder(run))
        enc.normalization = convention
        enc.fuse_prefix()
        cache = teacher.prefix_cache(run, enc) if convention == "minmax" else \
            teacher.FeatureCache(run.shared_cache_dir / f"probe-{convention}-prefix{enc.suffix_start}")
        compute = teacher.compute_prefix(enc, "cpu")
        embs = [teacher.frozen_embeddings(enc, cache.get_many(d.cases, d.images, compute), d.images, "cpu",
                                          t.batch_size) for d in (train, val)]
        torch.manual_seed(0)
        head = SegHead(enc.embed_dim, run.info.n_classes, enc.grid, enc.input_size, t.head_channels)
        with tempfile.TemporaryDirectory() as tmp:
            hist = teacher.fit_head(head, embs[0], masks[0], embs[1], masks[1], t, Path(tmp), run.seed, "cpu",
                                    desc=f"probe ({convention})")
        print(f"{convention:>9}: best validation Dice {max(r['val_dice'] for r in hist):.3f} "
              f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
