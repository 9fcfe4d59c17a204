#!/usr/bin/env python
"""Student schedules on validation: which distillation length and fine-tuning learning rate let a student keep what
its teacher taught it? Scored on a finished run's validation cases only (never the test split).

    python benchmarks/bench_student_schedule.py --run-dir /tmp/cpu12/hc18_n20_s0 --out /tmp/schedule \\
        --methods ts_kd,ta_kd --variant ft_lr_2e-4:finetune.lr=2e-4 --variant ft_lr_1e-4:finetune.lr=1e-4 \\
        --variant distill_20ep:distill.epochs=20

Each variant is a profile override on top of the run's own settings. It runs in its own folder under ``--out``:
the run's config, split, teacher, synthetic images, cached teacher targets and the methods' pretrained students
are copied there, so the finished run is never written to. Stages whose inputs a variant does not change are
reused (a fine-tuning variant reuses the pretrained student; a distillation variant re-pretrains from the cached
targets). The first row of each method is the run as it was, read from its logs.

For ts_kd and ts_kd_nosyn the table also gives the student's agreement with its teacher (Dice between their masks) on
the transfer set's real unlabeled and synthetic images, after distillation and after fine-tuning: whether the
student underfits its teacher on its own training images, and what fine-tuning on the labels does to that.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` -> (name, overrides). A value may be a JSON list (``teacher.lora_stages=[2,3]``):
    only a comma followed by the next ``section.key=`` separates two settings."""
    name, sep, body = text.partition(":")
    pairs = [kv.split("=", 1) for kv in re.split(r",(?=[A-Za-z_]+\.[A-Za-z_]+=)", body) if kv]
    if not sep or not name or not pairs or any(len(p) != 2 or not p[0] for p in pairs):
        raise SystemExit(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...], e.g. ft_lr_1e-4:finetune.lr=1e-4")
    return name, {k: v for k, v in pairs}


def copy_run(src: Path, dst: Path, methods: list[str]) -> None:
    """What a student variant reads, copied (never linked) so the source run stays as it was."""
    if (dst / "config.json").is_file():
        return
    dst.mkdir(parents=True)
    for name in ("config.json", "splits.json"):
        shutil.copy2(src / name, dst / name)
    for sub in ["teacher", "synthetic", "cache/targets"] + [f"students/{m}/pretrain" for m in methods if m != "scratch"]:
        if (src / sub).is_dir():
            shutil.copytree(src / sub, dst / sub)


def after_distill(log: Path):
    """ts_kd's validation Dice at the end of distillation (None for methods that log none)."""
    df = pd.read_csv(log) if log.is_file() else None
    return df["val_dice"].iloc[-1] if df is not None and "val_dice" in df else None


def teacher_agreement(run, weights: Path) -> dict:
    """Dice between the student's masks and its teacher's (the cached targets' argmax) on the transfer set it was
    distilled on, real unlabeled and synthetic images apart: a student that cannot reproduce its teacher on its own
    training images underfits (capacity, schedule); one that does but loses on validation does not generalise."""
    import numpy as np
    import torch

    from tskd_utils.distill import new_student, teacher_targets
    from tskd_utils.features import images_to_tensor
    from tskd_utils.metrics import mean_foreground_dice
    from tskd_utils.training import load_weights

    tg = teacher_targets(run, synthetic=True, kinds=("ts",))
    student = new_student(run)
    load_weights(weights, {"student": student})
    student.eval()
    x, bs = images_to_tensor(tg["images"], run.device), run.profile.finetune.batch_size
    with torch.inference_mode():
        pred = torch.cat([student(x[i:i + bs]).argmax(1).cpu() for i in range(0, len(x), bs)])
    dice = mean_foreground_dice(pred, tg["logits_ts"].float().argmax(1), run.info.n_classes).numpy()
    synthetic = np.array(tg["synthetic"], dtype=bool)
    unlabeled = ~synthetic & np.array([n not in set(run.splits["labeled"]) for n in tg["names"]])
    return {"agree_unlabeled": float(dice[unlabeled].mean()),
            "agree_synthetic": float(dice[synthetic].mean()) if synthetic.any() else float("nan")}


def agreements(run, weights_dir: Path, method: str) -> dict:
    """teacher_agreement after distillation and after fine-tuning (methods that learn the teacher's masks)."""
    if method not in ("ts_kd", "ts_kd_nosyn"):
        return {}
    out = {}
    for when, path in (("distilled", weights_dir / "pretrain" / "final.safetensors"),
                       ("finetuned", weights_dir / "student.safetensors")):
        out.update({f"{k}_{when}": v for k, v in teacher_agreement(run, path).items()})
    return out


def curve(log: Path) -> dict:
    df = pd.read_csv(log)
    return {"best_val": df["val_dice"].max(), "final_val": df["val_dice"].iloc[-1],
            "worst_val": df["val_dice"].min(), "seconds": df["seconds"].sum()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="a finished run (read only)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--methods", default="ts_kd")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]")
    args = ap.parse_args()
    from tskd_utils.distill import method_dir, run_method
    from tskd_utils.run import check_methods, load_run, setup_run

    variants = [parse_variant(v) for v in args.variant]
    methods = check_methods(args.methods.split(","))
    base = load_run(args.run_dir)
    ref = args.out / "as_run"  # a copy: the agreement reads the cached targets, and the run is never written to
    copy_run(base.dir, ref, methods)
    ref_run = setup_run(ref, base.profile.name, base.dataset, base.data_root, base.n_labeled, base.seed, base.overrides)
    rows = []
    for m in methods:
        rows.append({"variant": "as run", "method": m,
                     "val_after_distill": after_distill(method_dir(base, m) / "pretrain" / "log.csv"),
                     **curve(method_dir(base, m) / "finetune" / "log.csv"),
                     **agreements(ref_run, method_dir(base, m), m)})
        print(rows[-1], flush=True)
    for name, overrides in variants:
        dst = args.out / name
        copy_run(base.dir, dst, methods)
        run = setup_run(dst, base.profile.name, base.dataset, base.data_root, base.n_labeled, base.seed,
                        {**base.overrides, **overrides})
        for m in methods:
            t0 = time.perf_counter()
            run_method(run, m)
            rows.append({"variant": name, "method": m,
                         "val_after_distill": after_distill(method_dir(run, m) / "pretrain" / "log.csv"),
                         **curve(method_dir(run, m) / "finetune" / "log.csv"),
                         "wall_seconds": time.perf_counter() - t0, **agreements(run, method_dir(run, m), m)})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "schedule.csv", index=False)
    print(f"{base.dataset}, n_labeled {base.n_labeled}, seed {base.seed}: validation Dice ({len(base.splits['val'])} cases)")
    cols = ["variant", "method", "val_after_distill", "best_val", "final_val", "worst_val", "seconds"] + [
        c for c in ("agree_unlabeled_distilled", "agree_synthetic_distilled", "agree_unlabeled_finetuned",
                    "agree_synthetic_finetuned") if c in table]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for _, r in table.iterrows():
        print("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) and c != "seconds" else
                                f"{r[c]:.0f}" if c == "seconds" else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
