"""Teacher cost per image: forward, LoRA training step, peak memory, LoRA trainable fraction.

    python benchmarks/bench_teacher.py [--teachers litemedsam,sam_vit_b,tiny] [--repeats 3]

For each teacher (random weights are enough for timing sam_vit_b, which needs no download here):
* forward time of the whole encoder (batch 1, inference), with and without BatchNorm folding
  (LiteMedSAM only), and of the frozen prefix vs the adapted suffix;
* one LoRA training step (forward + backward + AdamW) per image: the cached-prefix path (adapters in
  the last stage, as in the demo profile) and the full-encoder path (adapters in every block);
* peak memory: resident set size on CPU (measured in a fresh subprocess per teacher), and
  torch.cuda.max_memory_allocated on a GPU when one is present;
* the trainable fraction of LoRA for the profile that uses that teacher.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def _time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def measure(name: str, repeats: int, device: str) -> dict:
    import resource

    from peft import LoraConfig, get_peft_model

    from tskd_utils.config import get_profile
    from tskd_utils.models import SegHead, bn_eval, build_teacher, freeze

    profile = {"litemedsam": "demo", "sam_vit_b": "colab", "tiny": "smoke"}[name]
    tc = get_profile(profile).teacher
    size = tc.input_size
    enc = freeze(build_teacher(name, size, pretrained=(name != "sam_vit_b"))).to(device)
    x = torch.rand(1, 1, size, size, device=device)
    out = {"teacher": name, "profile": profile, "input": size, "device": device,
           "encoder_params_m": sum(p.numel() for p in enc.parameters()) / 1e6}
    with torch.inference_mode():
        out["forward_s"] = _time(lambda: enc(x), repeats)
        if hasattr(enc, "fuse_prefix") and tc.lora_stages:
            enc.set_split(tc.lora_stages)
            t_pre = _time(lambda: enc.prefix(enc.preprocess(x)), repeats)
            enc.fuse_prefix()
            out["prefix_unfused_s"] = t_pre
            out["prefix_fused_s"] = _time(lambda: enc.prefix(enc.preprocess(x)), repeats)
            h = enc.prefix(enc.preprocess(x))
            out["suffix_s"] = _time(lambda: enc.suffix(h), repeats)
    # LoRA training step(s)
    for mode in ("cached_prefix", "full_encoder"):
        if mode == "cached_prefix" and not tc.lora_stages:
            continue
        e = freeze(build_teacher(name, size, pretrained=(name != "sam_vit_b"))).to(device)
        stages = tc.lora_stages if mode == "cached_prefix" else None
        e.set_split(stages)
        pm = get_peft_model(e, LoraConfig(r=tc.lora_rank, lora_alpha=tc.lora_alpha,
                                          target_modules=e.lora_target_regex(tc.lora_targets, stages)))
        head = SegHead(e.embed_dim, 3, e.grid, size, tc.head_channels).to(device)
        params = [p for p in pm.parameters() if p.requires_grad] + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)
        with torch.inference_mode():
            h = e.prefix(e.preprocess(x))
        h = h.clone()  # a normal tensor (inference tensors cannot take part in autograd)

        def step():
            pm.train()
            bn_eval(e)
            loss = head(e.suffix(h)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        out[f"train_step_{mode}_s"] = _time(step, repeats)
        lora = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
        base = sum(p.numel() for n, p in pm.named_parameters() if "lora_" not in n)
        out[f"lora_fraction_{mode}"] = lora / base
        if torch.cuda.is_available():
            out[f"gpu_peak_mb_{mode}"] = torch.cuda.max_memory_allocated() / 2 ** 20
    out["cpu_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teachers", default="litemedsam,sam_vit_b,tiny")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 16))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        print(json.dumps(measure(args.one, args.repeats, device)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    for name in args.teachers.split(","):
        res = subprocess.run([sys.executable, __file__, "--one", name, "--repeats", str(args.repeats)],
                             capture_output=True, text=True)
        if res.returncode:
            print(f"{name}: failed\n{res.stderr[-2000:]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))


if __name__ == "__main__":
    main()
