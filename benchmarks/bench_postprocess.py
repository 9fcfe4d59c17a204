#!/usr/bin/env python
"""Keep only the largest connected component of each class: does it help, decided on validation?

nnU-Net's rule: a post-processing step is kept for a model only where it raises the mean Dice on validation cases; the
test split is looked at only afterwards, to report what the decision does there. A fetal head is one object, so a
prediction with a second blob (a stray patch on the skull or the placenta) is a gross error that the step removes.

    python benchmarks/bench_postprocess.py --run-dir /tmp/cpu13/hc18_n20_s0 [--run-dir ...] --out /tmp/postproc

For each finished run and model (teacher, frozen-encoder teacher, every student) it predicts the validation cases
(at the model's own input size, through the same code as notebook 05), scores them raw and post-processed (per foreground class, its
largest 8-connected component kept; as a second variant, then its holes filled; scipy.ndimage, since MONAI's
``KeepLargestConnectedComponent`` needs scikit-image, which is not a dependency), and decides per model. It then applies each decision to the run's saved test
predictions (``metrics/predictions``; no inference) and reports the test Dice with and without it, and ts_kd minus
the teacher, paired per test image, both ways. No result of the run is written (the teacher's prefix cache is read,
and gains entries only for validation cases it lacks).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tskd_utils.evaluate import load_model, load_predictions, student_logits, teacher_logits, to_label_map  # noqa: E402
from tskd_utils.io import load_case  # noqa: E402
from tskd_utils.run import load_run  # noqa: E402
from tskd_utils.stats import bootstrap_ci  # noqa: E402

MODELS = ("teacher", "teacher_frozen", "unet_supervised", "ts_kd", "ts_kd_nosyn", "ta_kd", "scratch", "mae", "mocov3")
VARIANTS = ("raw", "largest", "largest+fill")
DISTILLED = "@distilled"  # a KD student before fine-tuning: a candidate for fine-tuning's best-checkpoint choice


def postprocess(labels: np.ndarray, n_classes: int, variant: str) -> np.ndarray:
    """A (H, W) label map after ``variant`` (one of VARIANTS), every foreground class on its own: its largest
    8-connected component kept (the rest set to background), then, for ``largest+fill``, its holes filled."""
    if variant == "raw":
        return labels
    from scipy import ndimage

    out = labels.copy()
    for k in range(1, n_classes):
        comp, n = ndimage.label(labels == k, structure=np.ones((3, 3)))
        if n > 1:
            sizes = np.bincount(comp.ravel())[1:]
            out[(comp > 0) & (comp != 1 + int(np.argmax(sizes)))] = 0
        if variant == "largest+fill":
            out[ndimage.binary_fill_holes(out == k) & (out == 0)] = k
    return out


def dice_of(pred: np.ndarray, mask: np.ndarray, n_classes: int) -> float:
    """Mean foreground Dice of one case: the training loop's fast Dice (tskd_utils.metrics), which follows notebook
    05's rule for empty masks; notebook 05's case_metrics would also compute HD95, the slow part."""
    import torch

    from tskd_utils.metrics import mean_foreground_dice

    return float(mean_foreground_dice(torch.as_tensor(pred)[None], torch.as_tensor(mask)[None], n_classes)[0])


def distilled_student(run, method: str):
    """``method``'s student as distillation left it, before fine-tuning on any label (its pretraining checkpoint)."""
    from tskd_utils.distill import method_dir, new_student
    from tskd_utils.training import load_weights

    student = new_student(run)
    load_weights(method_dir(run, method) / "pretrain" / "final.safetensors", {"student": student})
    return student.to(run.device).eval()


def predict(run, name: str, images: list[np.ndarray], cases: list[str]) -> list[np.ndarray]:
    model = distilled_student(run, name.split("@")[0]) if name.endswith(DISTILLED) else load_model(run, name)[0]
    if name.startswith("teacher"):
        logits = teacher_logits(run, model, images, cases)
    else:
        logits = student_logits(run, model, images)
    return [to_label_map(lg, im.shape[:2]) for lg, im in zip(logits, images)]


def run_rows(run_dir: Path) -> list[dict]:
    run = load_run(run_dir)
    n = run.info.n_classes
    val = [load_case(run.info, run.info.case(c)) for c in run.splits["val"]]
    val_images, val_masks = [p[0] for p in val], [p[1] for p in val]
    test_cases = list(run.splits["test"])
    test = [load_case(run.info, run.info.case(c)) for c in test_cases]
    test_images, test_masks = [p[0] for p in test], [p[1] for p in test]
    rows = []
    names = [m for m in MODELS if m.startswith("teacher") or (run.students_dir / m / "student.safetensors").is_file()]
    names += [m + DISTILLED for m in ("ts_kd", "ts_kd_nosyn") if m in names]
    for name in names:
        t0 = time.perf_counter()
        val_pred = predict(run, name, val_images, list(run.splits["val"]))
        test_pred = predict(run, name, test_images, test_cases) if name.endswith(DISTILLED) else \
            load_predictions(run, name, test_cases)
        for variant in VARIANTS:
            rows.append({"run": run_dir.name, "model": name, "variant": variant,
                         "val": [dice_of(postprocess(p, n, variant), m, n) for p, m in zip(val_pred, val_masks)],
                         "test": [dice_of(postprocess(p, n, variant), m, n) for p, m in zip(test_pred, test_masks)]})
        print(f"{run_dir.name} {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def pts(diff: np.ndarray) -> str:
    m, lo, hi = bootstrap_ci(diff)
    return f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, action="append", required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = [r for d in a.run_dir for r in run_rows(d)]
    long = pd.DataFrame([{"run": r["run"], "model": r["model"], "variant": r["variant"], "split": s, "case": i,
                          "dice": d} for r in rows for s in ("val", "test") for i, d in enumerate(r[s])])
    long.to_csv(a.out / "per_case.csv", index=False)
    mean = long.groupby(["run", "model", "split", "variant"])["dice"].mean().unstack("variant")[list(VARIANTS)]
    # the decision: per run and model, the variant with the best validation mean (raw unless another beats it)
    val = mean.xs("val", level="split")
    chosen = val.idxmax(axis=1).where(val.max(axis=1) > val["raw"], "raw")
    lines = ["| run | model | val raw | val largest | val largest+fill | chosen on val | test raw | test chosen |",
             "|---|---|---|---|---|---|---|---|"]
    for (run, model), v in chosen.items():
        t = mean.loc[(run, model, "test")]
        lines.append(f"| {run} | {model} | " + " | ".join(f"{val.loc[(run, model), k]:.3f}" for k in VARIANTS)
                     + f" | {v} | {t['raw']:.3f} | {t[v]:.3f} |")
    # ts_kd minus teacher on test, paired per image: raw, each model with its own validation choice of
    # post-processing, and fine-tuning's checkpoint choice with the distilled student as one more candidate;
    # per run, and pooled over the seeds of a setting (runs named <dataset>_n<N>_s<seed>; cases and seeds resampled)
    def case_dice(run, model, variant):
        t = long[(long.run == run) & (long.split == "test") & (long.model == model) & (long.variant == variant)]
        return t.sort_values("case")["dice"].to_numpy()

    def student_choice(run):
        d = "ts_kd" + DISTILLED
        return d if (run, d) in val.index and val.loc[(run, d), "raw"] > val.loc[(run, "ts_kd"), "raw"] else "ts_kd"

    diffs = {}
    for run in sorted(long["run"].unique()):
        for ref in ("teacher", "teacher_frozen"):
            diffs.setdefault(("raw", ref), {})[run] = case_dice(run, "ts_kd", "raw") - case_dice(run, ref, "raw")
            diffs.setdefault(("post-processing chosen on validation", ref), {})[run] = \
                case_dice(run, "ts_kd", chosen[(run, "ts_kd")]) - case_dice(run, ref, chosen[(run, ref)])
            diffs.setdefault((f"checkpoint chosen on validation ({student_choice(run)})", ref), {})[run] = \
                case_dice(run, student_choice(run), "raw") - case_dice(run, ref, "raw")
    lines.append("\nts_kd minus the teacher on test, points [95% CI], paired per image:")
    groups = sorted({re.sub(r"_s\d+$", "", r) for r in long["run"].unique()})
    for (how, ref), per_run in diffs.items():
        for run, d in per_run.items():
            lines.append(f"- {run}, minus {ref}, {how}: {pts(d)}")
        for g in groups:
            members = [d for r, d in per_run.items() if re.sub(r"_s\d+$", "", r) == g]
            if len(members) > 1 and len({len(d) for d in members}) == 1:
                lines.append(f"- {g}, {len(members)} seeds pooled, minus {ref}, {how}: {pts(np.stack(members))}")
    text = "\n".join(lines)
    (a.out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
