#!/usr/bin/env python
"""Benchmark the embedded phantom: generation speed and how hard it is for intensity thresholds.

    python benchmarks/bench_phantom.py [--n-cases 300] [--size 256] [--seed 0]

Prints the time to generate the cases in memory, the time to write the whole dataset
(``phantom.prepare``: generation + PNG encoding + checks), and the threshold baselines of
:func:`tskd_utils.datasets.phantom.threshold_baseline` (mean per-case foreground Dice).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tskd_utils.datasets import phantom  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cases", type=int, default=300)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"phantom: {args.n_cases} cases at {args.size}x{args.size}, seed {args.seed}, {os.cpu_count()} CPUs")

    start = time.perf_counter()
    for index in range(args.n_cases):
        phantom.generate_case(args.seed, index, args.size)
    generate_s = time.perf_counter() - start
    print(f"generate (in memory): {generate_s:6.2f} s  {args.n_cases / generate_s:6.1f} cases/s")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = phantom.prepare(None, tmp, n_cases=args.n_cases, seed=args.seed, size=args.size)
        prepare_s = time.perf_counter() - start
        print(f"prepare (to disk):    {prepare_s:6.2f} s  {args.n_cases / prepare_s:6.1f} cases/s")
        start = time.perf_counter()
        baseline = phantom.threshold_baseline(root)
        print(f"threshold baseline computed in {time.perf_counter() - start:.2f} s")

    print(f"best global threshold: image {baseline['best_global_direction']} {baseline['best_global_threshold']}"
          f"  foreground Dice {baseline['best_global_dice']:.3f}")
    print(f"per-image oracle threshold:            foreground Dice {baseline['oracle_dice']:.3f}")
    lo, hi = baseline["best_global_window"]
    print(f"best global window: {lo} <= image <= {hi}  foreground Dice {baseline['best_global_window_dice']:.3f}")
    print(f"per-image oracle window:               foreground Dice {baseline['oracle_window_dice']:.3f}")
    print(json.dumps(dict(baseline, generate_s=round(generate_s, 2), prepare_s=round(prepare_s, 2))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
