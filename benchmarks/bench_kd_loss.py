#!/usr/bin/env python
"""Which output loss lets TS-KD's student learn the teacher's segmentation? Validation Dice after distillation.

Copies a finished run folder (teacher, synthetic images, cached targets; not its students) once per variant and
pretrains ``ts_kd`` there with that variant's objective, the profile's epochs and everything else unchanged.
The number is the validation Dice of the student straight after distillation (before any label): what the
teacher taught it. Validation split only; the test split is never read.

    python benchmarks/bench_kd_loss.py --run runs/demo/phantom_n20_s0 --out /tmp/kd_loss --seeds 0,1,2

``--seeds``: the distillation's own seeds (student initialisation, batch order, augmentation), the run's split,
labeled cases and teacher staying fixed; one copy of the run per variant and seed.

Variants: ``kl`` feature MSE + T^2 KL (the objective before this benchmark); ``kl+dice`` the package's
(``tskd_utils.losses.kd_loss``: KL + Dice-CE on the teacher's argmax); ``dice`` feature MSE + Dice-CE only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tskd_utils import losses  # noqa: E402


def kl_only(student, align, images, emb, logits_t, w_feat, w_out, temperature):
    features, logits = student.forward_with_features(images)
    feat = losses.feature_loss(align(features), emb)
    t = temperature
    kl = F.kl_div(F.log_softmax(logits.float() / t, 1), F.softmax(logits_t.float() / t, 1),
                  reduction="none").sum(1).mean() * t * t
    return w_feat * feat + w_out * kl, {"feature_loss": feat.item(), "output_loss": kl.item()}


def dice_only(student, align, images, emb, logits_t, w_feat, w_out, temperature):
    features, logits = student.forward_with_features(images)
    feat = losses.feature_loss(align(features), emb)
    seg = losses.segmentation_loss(logits, logits_t.argmax(1))
    return w_feat * feat + w_out * seg, {"feature_loss": feat.item(), "output_loss": seg.item()}


VARIANTS = {"kl": kl_only, "kl+dice": losses.kd_loss, "dice": dice_only}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a run folder whose teacher (and synthetic images) exist")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--epochs", type=int, default=0, help="distillation epochs (0: the profile's)")
    ap.add_argument("--seeds", default="0", help="distillation seeds, e.g. 0,1,2")
    args = ap.parse_args()
    from tskd_utils import distill
    from tskd_utils.run import load_run

    rows = []
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        for seed in (int(x) for x in args.seeds.split(",")):
            dst = args.out / f"{name.replace('+', '_')}_s{seed}"
            if not dst.exists():
                shutil.copytree(args.run, dst, ignore=shutil.ignore_patterns("students", "metrics", "figures"))
            run = load_run(dst)
            run.seed_for = (lambda base: lambda *labels: base(*labels, "kd-bench", seed))(run.seed_for)
            if args.epochs:
                run.profile.distill.epochs = args.epochs
            t0 = time.perf_counter()
            info = distill.pretrain(run, "ts_kd", loss_fn=VARIANTS[name])
            hist = json.loads((distill.method_dir(run, "ts_kd") / "pretrain" / "done.json").read_text())["history"]
            rows.append({"variant": name, "seed": seed, "epochs": run.profile.distill.epochs,
                         "output_weight": run.profile.distill.output_weight,
                         "val_dice_after_distillation": round(info.get("val_dice_after_pretrain", float("nan")), 3),
                         "val_dice_by_epoch": [round(r["val_dice"], 3) for r in hist if "val_dice" in r],
                         "seconds": round(time.perf_counter() - t0)})
            print({k: v for k, v in rows[-1].items() if k != "val_dice_by_epoch"}, flush=True)
    (args.out / "kd_loss.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
