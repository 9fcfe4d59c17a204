#!/usr/bin/env python
"""Which teacher? Teacher settings (head, LoRA placement and rank, learning rates, schedule) scored on a finished run's
validation cases only (never the test split).

    python benchmarks/bench_teacher_variants.py --run-dir /tmp/cpu12/hc18_n20_s0 --out /tmp/teachers \\
        --variant sam_decoder:teacher.head=sam_decoder,teacher.head_lr=1e-4 \\
        --variant rank16:teacher.lora_rank=16,teacher.lora_alpha=32 \\
        --variant stages23:teacher.lora_stages=[2,3]

Each variant is a profile override on top of the run's own settings and trains both teachers of notebook 02 (the
frozen encoder + head, then LoRA from it) in its own folder under ``--out``, with the run's split and seed. The run
is only read: its split and frozen-head stage are copied (the frozen head is reused when a variant leaves its inputs
as they were, e.g. a LoRA rank), and the frozen prefix features come from the run's shared cache (``--out`` links to
it; a variant with another prefix, e.g. LoRA from an earlier stage, adds its own entries there, keyed by content).
The first row is the run as it was, read from ``teacher/metrics.json``. Results go to ``--out``/teachers.csv, which
keeps the variants of earlier invocations with the same ``--out`` (a variant given again replaces its row).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_student_schedule import parse_variant  # noqa: E402


def copy_teacher_inputs(src: Path, dst: Path) -> None:
    """The split and the frozen-head stage, copied (never linked) so the source run stays as it was."""
    if (dst / "splits.json").is_file():
        return
    dst.mkdir(parents=True)
    shutil.copy2(src / "splits.json", dst / "splits.json")
    if (src / "teacher" / "frozen").is_dir():
        shutil.copytree(src / "teacher" / "frozen", dst / "teacher" / "frozen")
        shutil.copy2(src / "teacher" / "frozen_head.safetensors", dst / "teacher" / "frozen_head.safetensors")


def row(name: str, metrics: dict, wall: float = float("nan")) -> dict:
    """One line of the table from a ``teacher/metrics.json``."""
    lora = next((p for p in metrics.get("parameters", []) if p.get("trainable_encoder")), {})
    return {"variant": name, "frozen_val": metrics["frozen_val_dice"], "lora_val": metrics["lora_val_dice"],
            "selected": metrics.get("selected", "lora"), "frozen_s": metrics["timings"]["frozen_seconds"],
            "lora_s": metrics["timings"]["lora_seconds"], "trainable": lora.get("trainable_total", ""), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="a run whose notebook 02 has finished (read only)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]")
    args = ap.parse_args()
    from tskd_utils.io import read_json
    from tskd_utils.run import load_run, setup_run
    from tskd_utils.teacher import train_teacher

    variants = [parse_variant(v) for v in args.variant]
    if not variants:
        raise SystemExit("give at least one --variant NAME:KEY=VALUE, e.g. sam_decoder:teacher.head=sam_decoder")
    base = load_run(args.run_dir)
    metrics_path = base.teacher_dir / "metrics.json"
    if not metrics_path.is_file():
        raise SystemExit(f"{metrics_path}: missing; run notebook 02 on {base.dir} first")
    out = args.out.resolve()
    cache = out / "_shared_cache" / base.dataset
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(base.shared_cache_dir, cache, target_is_directory=True)
    rows = [row("as run", read_json(metrics_path))]
    for name, overrides in variants:
        dst = out / name
        copy_teacher_inputs(base.dir, dst)
        run = setup_run(dst, base.profile.name, base.dataset, base.data_root, base.n_labeled, base.seed,
                        {**base.overrides, **overrides}, prepare=False)
        t0 = time.perf_counter()
        rows.append(row(name, train_teacher(run), time.perf_counter() - t0))
        print(rows[-1], flush=True)
    csv = out / "teachers.csv"  # variants of earlier invocations with the same --out are kept
    if csv.is_file():
        now = {r["variant"] for r in rows}
        rows = [r for r in pd.read_csv(csv).to_dict("records") if r["variant"] not in now] + rows
        rows.sort(key=lambda r: r["variant"] != "as run")
    pd.DataFrame(rows).to_csv(csv, index=False)
    print(f"\n{base.dataset}, n_labeled {base.n_labeled}, seed {base.seed}: best validation Dice "
          f"({len(base.splits['val'])} cases)")
    print("| variant | frozen encoder + head | LoRA | selected | frozen s | LoRA s | trainable |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['frozen_val']:.3f} | {r['lora_val']:.3f} | {r['selected']} | {r['frozen_s']:.0f} | "
              f"{r['lora_s']:.0f} | {r['trainable']} |")


if __name__ == "__main__":
    main()
