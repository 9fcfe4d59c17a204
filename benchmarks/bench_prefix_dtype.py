#!/usr/bin/env python
"""The cost of the teacher's frozen prefix in float32 and in bfloat16 on this CPU (docs/benchmarks.md, 2026-12-02).

    python benchmarks/bench_prefix_dtype.py [--size 256] [--split 3] [--threads 2]

bfloat16 is measured as such even where the CPU has no bf16 instructions (there it is emulated, and
``features.effective_prefix_dtype`` would fall back to float32): that cost is what the fallback avoids.
"""
import argparse
import time

import numpy as np
import torch

from tskd_utils import features, training
from tskd_utils.models import build_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="teacher input size (the demo: 256)")
    ap.add_argument("--split", type=int, default=3, help="first LoRA stage: the prefix is the stages before it")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    training.cpu_bf16_supported = lambda: True  # bf16 itself, not the fallback
    enc = build_teacher("litemedsam", args.size, pretrained=True).eval()
    enc.set_split([args.split])
    imgs = np.random.default_rng(0).integers(0, 255, (2, args.size, args.size), dtype=np.uint8)
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, bf16 instructions "
          f"{torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()}")
    for dtype, n in (("float32", 2), ("bfloat16", 1)):
        f = features.compute_prefix(enc, "cpu", dtype)
        f(imgs[:1])  # warm-up
        t0 = time.perf_counter()
        f(imgs[:n])
        print(f"{dtype}: {(time.perf_counter() - t0) / n:.3f} s per image", flush=True)


if __name__ == "__main__":
    main()
