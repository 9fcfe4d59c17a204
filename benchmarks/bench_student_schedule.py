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
    rows = []
    for m in methods:
        rows.append({"variant": "as run", "method": m,
                     "val_after_distill": after_distill(method_dir(base, m) / "pretrain" / "log.csv"),
                     **curve(method_dir(base, m) / "finetune" / "log.csv")})
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
                         "wall_seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "schedule.csv", index=False)
    print(f"{base.dataset}, n_labeled {base.n_labeled}, seed {base.seed}: validation Dice ({len(base.splits['val'])} cases)")
    cols = ["variant", "method", "val_after_distill", "best_val", "final_val", "worst_val", "seconds"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for _, r in table.iterrows():
        print("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) and c != "seconds" else
                                f"{r[c]:.0f}" if c == "seconds" else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
