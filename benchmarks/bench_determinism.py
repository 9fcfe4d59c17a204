#!/usr/bin/env python
"""Does the same command give the same numbers? Twice with the same thread count, and with 1 versus 2 threads.

Runs the small learning configuration of ``tests/test_learning.py`` (toy rings, smoke profile trained longer,
teacher + scratch + ts_kd) in fresh processes with ``--threads`` each (``torch.set_num_threads``, OMP/MKL
variables) and compares their per-case test Dice: identical, or by how much they differ. Also prints the
Dice of every method, the measurement behind the test's thresholds.

    python benchmarks/bench_determinism.py --threads 2,2,1 --out /tmp/determinism
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def one(root: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from test_learning import _pipeline

    root.mkdir(parents=True, exist_ok=True)
    run, summary = _pipeline(root)
    (root / "summary.json").write_text(json.dumps({m: s["dice"] for m, s in summary["methods"].items()}))
    pd.read_csv(run.metrics_dir / "per_case.csv").to_csv(root / "per_case.csv", index=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="2,2,1", help="one process per entry")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return one(args.out, args.child)
    results = []
    for i, t in enumerate(int(x) for x in args.threads.split(",")):
        root = args.out / f"p{i}_t{t}"
        env = {**os.environ, "OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t)}
        subprocess.run([sys.executable, __file__, "--out", str(root), "--child", str(t)], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dice = json.loads((root / "summary.json").read_text())
        per_case = pd.read_csv(root / "per_case.csv")
        results.append((t, dice, per_case))
        print(f"process {i} ({t} threads): " + ", ".join(f"{m} {d:.4f}" for m, d in dice.items()), flush=True)
    t0, _, ref = results[0]
    for i, (t, _, pc) in enumerate(results[1:], 1):
        diff = (pc["dice"] - ref["dice"]).abs()
        print(f"process {i} ({t} threads) vs process 0 ({t0} threads): identical per-case table "
              f"{ref.equals(pc)}, max |per-case Dice difference| {diff.max():.2e}, mean {diff.mean():.2e}")


if __name__ == "__main__":
    main()
