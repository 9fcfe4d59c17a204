"""Which teacher head? The light conv decoder versus LiteMedSAM's own pretrained mask decoder.

    python benchmarks/bench_teacher_head.py --run-dir RUNS/hc18_n20_s0 [--out DIR]

RUN is a finished demo-profile run (notebooks 02 and 05 done) with the default ``teacher.head="conv"``.
The script makes a run with the same dataset, split, seed and schedule in ``DIR`` (default: a folder
``<RUNS>-heads`` beside it, so that the sweep's report never picks it up), with
``teacher.head="sam_decoder"``, trains both of its teachers (frozen encoder + head, then LoRA) and
evaluates them on the test split. The frozen prefix features are reused from RUN's shared cache.
It prints validation and test Dice, training time and CPU latency of both heads.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from tskd_utils.evaluate import evaluate_run
    from tskd_utils.io import read_json
    from tskd_utils.run import load_run, setup_run
    from tskd_utils.teacher import train_teacher

    base = load_run(args.run_dir)
    summary_path = base.metrics_dir / "summary.json"
    if not (base.teacher_dir / "metrics.json").is_file() or not summary_path.is_file():
        raise SystemExit(f"{base.dir}: run notebooks 02 and 05 first (teacher/metrics.json, metrics/summary.json)")
    if base.profile.teacher.head != "conv" or base.profile.teacher.name != "litemedsam":
        raise SystemExit(f"{base.dir}: expected a litemedsam run with the conv head")
    out = (args.out or base.dir.parent.with_name(base.dir.parent.name + "-heads")).resolve()
    cache = out / "_shared_cache" / base.dataset
    if not cache.exists():  # share the frozen prefix features computed for RUN
        cache.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(base.shared_cache_dir, cache, target_is_directory=True)
    overrides = dict(base.overrides, **{"teacher.head": "sam_decoder"})
    run = setup_run(out / f"{base.name}_sam_decoder", base.profile.name, base.dataset, base.data_root, base.n_labeled,
                    base.seed, overrides, prepare=False)
    t0 = time.perf_counter()
    res = train_teacher(run)
    train_s = time.perf_counter() - t0
    summary = evaluate_run(run, methods=[], include_teacher=True, include_frozen=True)
    rows = [("conv", read_json(base.teacher_dir / "metrics.json"), read_json(summary_path)),
            ("sam_decoder", res, summary)]
    print(f"\n{base.dataset}, n_labeled {base.n_labeled}, seed {base.seed}; sam_decoder training {train_s:.0f} s")
    print("| head | frozen val Dice | LoRA val Dice | frozen test Dice | LoRA test Dice | frozen + LoRA training (s) "
          "| teacher latency (ms) |")
    print("|---|---|---|---|---|---|---|")
    for head, tm, sm in rows:
        m = sm["methods"]
        secs = tm["timings"]["frozen_seconds"] + tm["timings"]["lora_seconds"]
        frozen_test = m.get("teacher_frozen", {}).get("dice", float("nan"))
        print(f"| {head} | {tm['frozen_val_dice']:.3f} | {tm['lora_val_dice']:.3f} | {frozen_test:.3f} | "
              f"{m['teacher']['dice']:.3f} | {secs:.0f} | {m['teacher'].get('latency_ms', float('nan')):.0f} |")


if __name__ == "__main__":
    main()
