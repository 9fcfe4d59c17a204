#!/usr/bin/env python
"""Time the HC18 conversion on the real data (``--raw``; default $TSKD_HC18_RAW, else shared/datasets/hc18
beside the checkout).

    python benchmarks/bench_convert_hc18.py                 # the filled copy, as given
    python benchmarks/bench_convert_hc18.py --outlines      # also the official outline layout

``--outlines`` first builds (untimed) an official-layout copy whose annotations are 2-pixel ellipse
outlines taken from the filled masks (cut where the head leaves the image, with a small gap in every
7th outline), then times its conversion (which fills them) and reports how far the filled masks are
from the originals. The target is under 60 s for all 999 cases on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tskd_utils.datasets import hc18  # noqa: E402
from tskd_utils.io import load_dataset  # noqa: E402

DEFAULT_RAW = Path(os.environ.get("TSKD_HC18_RAW") or REPO.parent / "shared" / "datasets" / "hc18")


def make_outline_copy(raw: Path, dst: Path) -> None:
    """Official layout: training_set/ with images and outline annotations, CSV beside it."""
    ts = dst / "training_set"
    ts.mkdir(parents=True)
    shutil.copy(raw / hc18.CSV_NAME, dst / hc18.CSV_NAME)
    for i, mask_path in enumerate(sorted((raw / "masks").glob("*_Annotation.png"))):
        stem = mask_path.stem[: -len("_Annotation")]
        shutil.copy(raw / "images" / f"{stem}.png", ts / f"{stem}.png")
        head = np.array(Image.open(mask_path).convert("L")) > 0
        outline = head & ~ndimage.binary_erosion(head, iterations=2, border_value=1)
        if i % 7 == 0:  # a small gap, as a hand-drawn or resampled outline may have
            ys, xs = np.nonzero(outline)
            k = len(ys) // 3
            outline[ys[k] - 1:ys[k] + 2, xs[k] - 1:xs[k] + 2] = False
        Image.fromarray(outline.astype(np.uint8) * 255).save(ts / f"{stem}_Annotation.png", compress_level=1)


def timed(raw: Path, out: Path, workers) -> tuple[float, float, object]:
    if out.exists():
        shutil.rmtree(out)
    start, cpu = time.perf_counter(), time.process_time()
    folder = hc18.prepare(raw, out, workers=workers)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return seconds, cpu, load_dataset(folder)


def report(label: str, seconds: float, cpu: float, info) -> None:
    subjects = {c.subject for c in info.cases}
    with (info.root / "cases.csv").open() as fh:
        spacing = sum(1 for r in csv.DictReader(fh) if r.get("spacing_mm"))
    print(f"{label}: {len(info.cases)} cases, {len(subjects)} subjects, {spacing} with spacing_mm, "
          f"{seconds:.1f} s wall ({len(info.cases) / seconds:.0f} cases/s), {cpu:.1f} s CPU (all threads)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, default=DEFAULT_RAW, help="the filled HC18 copy")
    ap.add_argument("--workers", type=int, default=None, help="reader threads (default: the converter's)")
    ap.add_argument("--repeat", type=int, default=1, help="time the conversion this many times")
    ap.add_argument("--outlines", action="store_true", help="also time the official outline layout")
    args = ap.parse_args()
    try:
        import os
        load = os.getloadavg()[0]
        print(f"{len(os.sched_getaffinity(0))} usable cores, load average {load:.1f} "
              f"(timings are only meaningful when the load is low)")
    except (AttributeError, OSError):
        pass
    if not args.raw.is_dir():
        print(f"no HC18 copy at {args.raw}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench_hc18_") as tmp:
        tmp = Path(tmp)
        for r in range(args.repeat):
            seconds, cpu, info = timed(args.raw, tmp / "out", args.workers)
            report(f"filled layout, run {r + 1}", seconds, cpu, info)
        if args.outlines:
            t0 = time.perf_counter()
            make_outline_copy(args.raw, tmp / "official")
            print(f"(built the outline copy in {time.perf_counter() - t0:.1f} s, not counted)")
            for r in range(args.repeat):
                seconds, cpu, info = timed(tmp / "official", tmp / "out_official", args.workers)
                report(f"official outline layout, run {r + 1}", seconds, cpu, info)
            diffs = []
            for c in info.cases:
                ours = np.array(Image.open(c.mask)) > 0
                src = np.array(Image.open(args.raw / "masks" / f"{c.case}_Annotation.png").convert("L")) > 0
                diffs.append((ours != src).sum() / max(src.sum(), 1))
            diffs = np.array(diffs)
            print(f"filled outlines vs source masks: differing pixels / head area: median {np.median(diffs):.5f}, "
                  f"max {diffs.max():.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
