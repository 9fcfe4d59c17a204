#!/usr/bin/env python
"""Test-time flip averaging for the teacher: does averaging the class probabilities of an image and of its
mirror image raise the trained teacher's Dice? Scored on a run's validation cases (never the test split).

    python benchmarks/bench_teacher_tta.py --run-dir /tmp/cpu12/hc18_n20_s0

Both teachers of the run (frozen encoder + head, LoRA) are scored with one forward pass per image and with the
average of two (image, horizontal mirror; the mirror's probabilities are mirrored back), at the original image
size. Both use a plain fp32 forward of the whole encoder, so the comparison is paired and exact; the run's own
numbers use its cached prefix (``teacher.prefix_dtype``) and may differ in the third decimal.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def probabilities(run, model, image: np.ndarray) -> torch.Tensor:
    """(K, H, W) class probabilities of one original-size image."""
    from tskd_utils.data import unletterbox
    from tskd_utils.features import images_to_tensor, teacher_inputs, valid_tensor

    boxed, valid = teacher_inputs([image], run.profile.teacher.input_size)
    with torch.inference_mode():
        logits = model(images_to_tensor(np.stack(boxed), run.device), valid_tensor(valid, run.device))[0]
    return torch.as_tensor(unletterbox(logits.float().cpu(), image.shape)).softmax(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--variants", nargs="+", default=["frozen", "lora"])
    args = ap.parse_args()
    from tskd_utils.io import load_case
    from tskd_utils.metrics import mean_foreground_dice
    from tskd_utils.run import load_run
    from tskd_utils.stats import bootstrap_ci, format_interval
    from tskd_utils.teacher import load_teacher

    run = load_run(args.run_dir)
    cases = [load_case(run.info, run.info.case(c)) for c in run.splits["val"]]
    print(f"{run.dataset}: {len(cases)} validation cases, {torch.get_num_threads()} threads")
    print("| teacher | one pass | flip-averaged | difference, 95% bootstrap interval | seconds |\n|---|---|---|---|---|")
    for variant in args.variants:
        model, t0, plain, tta = load_teacher(run, variant), time.perf_counter(), [], []
        for image, mask in cases:
            p = probabilities(run, model, image)
            p_flip = probabilities(run, model, np.ascontiguousarray(image[:, ::-1])).flip(-1)
            target = torch.as_tensor(mask)[None].long()
            for scores, probs in ((plain, p), (tta, (p + p_flip) / 2)):
                scores.append(float(mean_foreground_dice(probs.argmax(0)[None], target, run.info.n_classes)[0]))
        diff = np.array(tta) - np.array(plain)
        print(f"| {variant} | {np.mean(plain):.4f} | {np.mean(tta):.4f} | "
              f"{format_interval(*bootstrap_ci(diff))} | {time.perf_counter() - t0:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
