#!/usr/bin/env python
"""Fine-tuning with the teacher kept: does distillation's knowledge survive the labels? (validation only)

    python benchmarks/bench_joint_finetune.py --run-dir RUNS/phantom_n20_s0 --weights 0 0.5 1

TS-KD fine-tunes the distilled student on the labeled images alone, and with 20 labels it ends where the practitioner's
U-Net ends (docs/benchmarks.md): the labels may overwrite what the teacher taught. This benchmark fine-tunes the same
distilled student (``students/ts_kd/pretrain/final.safetensors`` of a finished run) for the profile's fine-tuning
budget with, at every step, the labeled batch's Dice-CE plus ``weight`` times TS-KD's output loss
(``losses.output_loss``: KL to the teacher's softened logits plus class-balanced CE and Dice on its labels) on a batch
of transfer images with their cached teacher logits. ``weight`` 0 is the control: the same loop without the teacher.
Each model is the best of its epochs by validation Dice (as notebook 04 selects), then scored on the validation
images at the original size and compared, paired per case, with the run's own ``ts_kd`` and ``unet_supervised``.
The test split is never read. Nothing in the run folder is written.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_val_paired import case_dice, validation_dice  # noqa: E402 (benchmarks/ is not a package)


def joint_finetune(run, weight: float, log=print) -> tuple:
    """The distilled student fine-tuned with ``weight`` x the output loss on transfer images; (best model, history)."""
    import torch

    from tskd_utils.checkpoints import method_dir, new_student
    from tskd_utils.data import SegmentationDataset, loader
    from tskd_utils.distill import flip_photometric, student_val_dice, teacher_targets
    from tskd_utils.losses import output_loss, segmentation_loss
    from tskd_utils.training import (autocast, compute_dtype, grad_scaler, load_weights, optimizer_step, seeded,
                                     warmup_cosine)

    prof, device, f, d = run.profile, run.device, run.profile.finetune, run.profile.distill
    with seeded(run.seed_for("finetune", "ts_kd")):
        student = new_student(run, method="ts_kd")
        load_weights(method_dir(run, "ts_kd") / "pretrain" / "final.safetensors", {"student": student})
        tg = teacher_targets(run, synthetic=True, kinds=("ts",))
        images = torch.from_numpy(tg["images"]).float().div_(255.0)[:, None]
        logits = tg["logits_ts"]
        train_ds = SegmentationDataset(run.info, run.splits["labeled"], prof.data.image_size, train=True,
                                       augment=f.augment, seed=run.seed)
        val_ds = SegmentationDataset(run.info, run.splits["val"], prof.data.image_size)
        dl = loader(train_ds, f.batch_size, shuffle=True, num_workers=0, drop_last=len(train_ds) > f.batch_size,
                    steps=f.steps_per_epoch)
        opt = torch.optim.AdamW(student.parameters(), lr=f.lr, weight_decay=f.weight_decay)
        sched = warmup_cosine(opt, f.warmup_epochs * max(1, len(dl)), f.epochs * max(1, len(dl)))
        scaler, dtype = grad_scaler(device), compute_dtype(device, prof.student.cpu_dtype)
        best, best_dice, history = None, -1.0, []
        for epoch in range(f.epochs):
            t0 = time.perf_counter()
            student.train()
            train_ds.set_epoch(epoch)
            sums = {"label": 0.0, "teacher": 0.0}
            for batch in dl:
                with autocast(device, cpu_dtype=dtype):
                    loss = segmentation_loss(student(batch["image"].to(device)), batch["mask"].to(device))
                    sums["label"] += loss.item()
                    if weight > 0:
                        idx = torch.randint(len(images), (d.batch_size,))
                        x, t = flip_photometric(images[idx].to(device), logits[idx].to(device), flip=d.flip)
                        kd = output_loss(student(x), t, d.temperature)
                        sums["teacher"] += kd.item()
                        loss = loss + weight * kd
                optimizer_step(loss, opt, scaler, sched)
            val = student_val_dice(student, val_ds, device, f.batch_size)
            history.append({"epoch": epoch, **{k: v / max(1, len(dl)) for k, v in sums.items()}, "val_dice": val,
                            "seconds": round(time.perf_counter() - t0, 1)})
            log(f"weight {weight}: epoch {epoch + 1}/{f.epochs} " + json.dumps(history[-1]))
            if val > best_dice:
                best, best_dice = copy.deepcopy(student).eval(), val
    return best, history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="a finished run folder with ts_kd and unet_supervised")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0],
                    help="weights of the teacher's output loss during fine-tuning (0: the control, labels only)")
    ap.add_argument("--out", type=Path, default=None, help="a JSON file for the per-case validation Dice")
    args = ap.parse_args()

    import torch

    from tskd_utils.checkpoints import student_logits
    from tskd_utils.io import load_case
    from tskd_utils.run import load_run
    from tskd_utils.stats import bootstrap_ci, format_interval

    torch.set_num_threads(min(2, torch.get_num_threads()))
    run = load_run(args.run_dir)
    records = [run.info.case(c) for c in run.splits["val"]]
    pairs = [load_case(run.info, rec) for rec in records]
    scores = {m: validation_dice(run, m) for m in ("unet_supervised", "ts_kd")}
    for w in args.weights:
        model, _ = joint_finetune(run, w)
        scores[f"joint_{w:g}"] = case_dice(run, student_logits(run, model, [p[0] for p in pairs]),
                                            [p[1] for p in pairs])
    print(f"{args.run_dir}: {len(records)} validation images, Dice at the original size")
    for name, s in scores.items():
        print(f"{name:>16} {s.mean():.4f}")
    for name in [k for k in scores if k.startswith("joint_")]:
        for other in ("ts_kd", "unet_supervised"):
            print(f"{name} - {other}: {format_interval(*bootstrap_ci(scores[name] - scores[other]))}")
    if args.out:
        args.out.write_text(json.dumps({k: v.tolist() for k, v in scores.items()}, indent=1))


if __name__ == "__main__":
    main()
