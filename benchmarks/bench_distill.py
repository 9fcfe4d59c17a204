"""A distillation epoch with cached teacher targets versus with the live teacher.

    python benchmarks/bench_distill.py [--images 16] [--profile demo]

Both variants do the same student work (TS-KD feature + output loss, AdamW) on the same images at
the profile's sizes; the live variant also runs the teacher (whole encoder + head, inference mode)
on every batch, which is what caching avoids. The pretrained LiteMedSAM encoder with freshly
initialised adapters and head stands in for the fine-tuned teacher: the cost is the same.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--profile", default="demo")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model

    from tskd_utils.config import get_profile
    from tskd_utils.distill import FeatureAlign
    from tskd_utils.losses import kd_loss
    from tskd_utils.models import TeacherSegmenter, build_student, build_teacher, freeze

    prof = get_profile(args.profile)
    t, d, size_s = prof.teacher, prof.distill, prof.data.image_size
    enc = freeze(build_teacher(t.name, t.input_size))
    enc.set_split(t.lora_stages)
    get_peft_model(enc, LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha,
                                   target_modules=enc.lora_target_regex(t.lora_targets, t.lora_stages)))
    teacher = freeze(TeacherSegmenter(enc, 3, t.head_channels))
    student = build_student(prof.student.name, size_s, 3, prof.student.decoder_channels)
    align = FeatureAlign(student.embed_dim, enc.embed_dim)
    grid = student.grid
    opt = torch.optim.AdamW(list(student.parameters()) + list(align.parameters()), lr=d.lr)
    x_t = torch.rand(args.images, 1, t.input_size, t.input_size)
    x_s = F.interpolate(x_t, size=(size_s, size_s), mode="area")
    bs = min(d.batch_size, args.images)

    def teacher_targets(xt):
        with torch.inference_mode():
            emb = teacher.encoder(xt)
            logits = F.interpolate(teacher.head(emb), size=(size_s, size_s), mode="area")
        return F.adaptive_avg_pool2d(emb, grid).half().clone(), logits.half().clone()  # pooled as the cache is

    t0 = time.perf_counter()
    cache = [teacher_targets(x_t[i:i + 1]) for i in range(args.images)]
    fill = time.perf_counter() - t0
    emb_all = torch.cat([c[0] for c in cache])
    logit_all = torch.cat([c[1] for c in cache])

    def epoch(live: bool) -> float:
        t0 = time.perf_counter()
        for i in range(0, args.images, bs):
            if live:
                emb, logits = teacher_targets(x_t[i:i + bs])
            else:
                emb, logits = emb_all[i:i + bs], logit_all[i:i + bs]
            loss, _ = kd_loss(student, align, x_s[i:i + bs], emb, logits, d.feature_weight, d.output_weight,
                              d.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    epoch(False)  # warm-up
    cached = min(epoch(False) for _ in range(3))
    live = epoch(True)
    n = args.images
    print(f"profile {args.profile}: teacher {t.name} {t.input_size}px, student {prof.student.name} {size_s}px, "
          f"{n} images, batch {bs}, {torch.get_num_threads()} threads")
    print(f"filling the cache once: {fill / n * 1000:.0f} ms/image")
    print(f"epoch with cached targets: {cached / n * 1000:.1f} ms/image")
    print(f"epoch with the live teacher: {live / n * 1000:.1f} ms/image")
    print(f"speed-up of a distillation epoch from caching: {live / cached:.1f}x")


if __name__ == "__main__":
    main()
