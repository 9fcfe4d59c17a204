"""Stage 5: evaluate the teacher and every student of a run on its test split.

Each model predicts on the letterboxed test image at its own input size; the class logits are
mapped back to the original image (padding cropped, bilinear resize) before the argmax, and
Dice / IoU / HD95 are computed per case and per foreground class against the original mask with
MONAI (see :mod:`tskd_utils.metrics` for how empty masks count). HD95 is in mm when every test
case has a pixel spacing, else in pixels.

Writes ``metrics/per_case.csv`` (one row per method, case and class), ``metrics/summary.json``,
``metrics/predictions/<method>/<case>.png`` and the run's rows of the results table,
``results.csv`` (the layout in README, "Repository layout").
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

# the prediction helpers live in checkpoints.py; named here too for notebook 05 and older callers
from .checkpoints import load_model, selected_variant, student_logits, teacher_logits, to_label_map  # noqa: F401
from .io import RESULT_COLUMNS, load_case, read_mask, safe_join, write_json, write_png
from .metrics import case_metrics, mean_foreground_dice, median_ms, nanmean
from .run import Run, check_methods
from .stats import case_scores, format_interval, paired_comparisons



# ------------------------------------------------------------------------------- efficiency


def count_flops(model: torch.nn.Module, example: torch.Tensor) -> Optional[int]:
    """FLOPs of one forward pass (matmuls and convolutions, as torch.utils.flop_counter counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(example)
        return int(counter.get_total_flops())
    except Exception:  # an op the counter cannot trace: report unknown rather than fail the evaluation
        return None


def latency_ms(model: torch.nn.Module, example: torch.Tensor, repeats: int = 20, warmup: int = 3,
               budget_s: float = 8.0) -> float:
    """Median wall time of a batch-1 forward pass, after warm-up (CUDA: synchronised); slow models get fewer
    repeats (at least 5) so that one measurement takes about ``budget_s`` (:func:`tskd_utils.metrics.median_ms`)."""
    sync = torch.cuda.synchronize if example.device.type == "cuda" else (lambda: None)

    def forward() -> None:
        model(example)
        sync()

    with torch.inference_mode():
        sync()
        return median_ms(forward, repeats, warmup, budget_s)


def efficiency(model: torch.nn.Module, input_size: int, run: Run) -> dict:
    e = run.profile.eval
    model = model.eval()
    example = torch.rand(1, 1, input_size, input_size)
    cpu_model = model.to("cpu")
    out = {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": (lambda f: f / 1e9 if f is not None else None)(count_flops(cpu_model, example)),
        "latency_ms": latency_ms(cpu_model, example, e.latency_repeats, e.latency_warmup),
        "input_size": input_size,
    }
    if torch.cuda.is_available():
        gpu_model = model.to("cuda")
        out["gpu_latency_ms"] = latency_ms(gpu_model, example.to("cuda"), e.latency_repeats * 5, e.latency_warmup * 3)
    model.to(run.device)
    return out


# ------------------------------------------------------------------------------- evaluation


def _test_cases(run: Run) -> dict:
    records = [run.info.case(c) for c in run.splits["test"]]
    pairs = [load_case(run.info, rec) for rec in records]
    spacings = [rec.spacing_mm for rec in records]
    return {"records": records, "images": [p[0] for p in pairs], "masks": [p[1] for p in pairs],
            "spacings": spacings, "use_mm": all(sp is not None for sp in spacings)}


def score_model(run: Run, name: str, model, test: dict) -> tuple[list[dict], dict]:
    """Predict the test cases with one model, write its label maps, and score them: (per-case rows, summary)."""
    info, n_classes = run.info, run.info.n_classes
    names = [rec.case for rec in test["records"]]
    logits = teacher_logits(run, model, test["images"], names) if name.startswith("teacher") else \
        student_logits(run, model, test["images"])
    rows, case_scores, undefined = [], [], 0
    for rec, lg, mk, sp in zip(test["records"], logits, test["masks"], test["spacings"]):
        pred = to_label_map(lg, mk.shape)
        path = safe_join(run.metrics_dir, "predictions", name, f"{rec.case}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(path, pred)
        m = case_metrics(pred, mk, n_classes, spacing=sp if test["use_mm"] else None)
        rows += [{"method": name, "case": rec.case, "class": info.classes[k + 1], "dice": m["dice"][k],
                  "iou": m["iou"][k], "hd95": m["hd95"][k]} for k in range(n_classes - 1)]
        undefined += int(np.isnan(m["hd95"]).sum())
        case_scores.append((float(np.mean(m["dice"])), float(np.mean(m["iou"])), nanmean(m["hd95"])))
    dice, iou, hd = (list(c) for c in zip(*case_scores))
    summary = {"dice": float(np.mean(dice)), "dice_std": float(np.std(dice)), "iou": float(np.mean(iou)),
               "hd95": nanmean(hd), "hd95_undefined": undefined,
               "per_class_dice": {c: float(np.mean([r["dice"] for r in rows if r["class"] == c]))
                                  for c in info.classes[1:]}}
    return rows, summary


def evaluate_run(run: Run, methods: Optional[Sequence[str]] = None, include_teacher: bool = True,
                 include_frozen: bool = False, measure_efficiency: bool = True) -> dict:
    """Evaluate the teacher(s) and the students of ``methods`` on the test split; write the metric files.

    A requested student that was not trained is an error naming its missing file (train it in
    notebook 04), never a silently shorter table.
    """
    methods = check_methods(methods)
    missing = [run.students_dir / m / "student.safetensors" for m in methods
               if not (run.students_dir / m / "student.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"not trained in this run: {', '.join(str(p) for p in missing)}: run notebook 04 "
                                f"(tskd_utils.distill.run_methods) for them first")
    names = (["teacher"] if include_teacher else []) + (["teacher_frozen"] if include_frozen else []) + methods
    test = _test_cases(run)
    rows, summary = [], {"hd95_unit": "mm" if test["use_mm"] else "px", "n_test": len(test["records"]),
                         "methods": {}, "empty_mask_rule": "both empty: Dice=IoU=1, HD95=0; one empty: Dice=IoU=0, "
                                                           "HD95 undefined (left out of the mean, counted in "
                                                           "hd95_undefined)"}
    if include_teacher:

        summary["selected_teacher"] = selected_variant(run)
    for name in tqdm(names, desc="evaluating", dynamic_ncols=True):
        model, size = load_model(run, name)
        model_rows, summary["methods"][name] = score_model(run, name, model, test)
        rows += model_rows
        if measure_efficiency:
            summary["methods"][name].update(efficiency(model, size, run))
        del model
    _write_per_case(run, rows)
    teacher_latency = summary["methods"].get("teacher", {}).get("latency_ms")
    for s in summary["methods"].values():
        if teacher_latency and s.get("latency_ms"):
            s["speedup_vs_teacher"] = teacher_latency / s["latency_ms"]
    write_json(run.metrics_dir / "summary.json", summary)
    write_results(run, summary)
    if "ts_kd" in names:
        paired_table(run).to_csv(run.metrics_dir / "paired.csv", index=False)
    return summary


def _write_per_case(run: Run, rows: list[dict]) -> None:
    run.metrics_dir.mkdir(parents=True, exist_ok=True)
    with (run.metrics_dir / "per_case.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["method", "case", "class", "dice", "iou", "hd95"])
        w.writeheader()
        w.writerows(rows)


def paired_table(run: Run, reference: str = "ts_kd", metric: str = "dice"):
    """``reference`` against every other model of the run on the same test cases: mean paired difference,
    95% bootstrap interval over cases, Wilcoxon p-value, verdict (see :mod:`tskd_utils.stats`)."""
    import pandas as pd

    per_case = pd.read_csv(run.metrics_dir / "per_case.csv")
    return paired_comparisons(case_scores(per_case, metric), reference=reference, metric=metric)


def result_rows(run: Run, summary: dict) -> list[dict]:
    return [{"dataset": run.dataset, "n_labeled": run.n_labeled, "seed": run.seed, "method": name,
             "dice": round(s["dice"], 5), "iou": round(s["iou"], 5), "hd95": round(s["hd95"], 4),
             "params_m": round(s["params_m"], 4) if s.get("params_m") is not None else "",
             "latency_ms": round(s["latency_ms"], 3) if s.get("latency_ms") is not None else "",
             "profile": run.profile.name}
            for name, s in summary["methods"].items() if name != "teacher_frozen"]


def write_results(run: Run, summary: dict) -> Path:
    path = run.dir / "results.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        w.writerows(result_rows(run, summary))
    return path


def load_predictions(run: Run, method: str, cases: Sequence[str]) -> list[np.ndarray]:
    """Label maps written by :func:`evaluate_run` (original image size)."""
    return [read_mask(safe_join(run.metrics_dir, "predictions", method, f"{c}.png")) for c in cases]


def summary_table(summary: dict):
    """The results table of a run (one row per model) as a pandas DataFrame."""
    import pandas as pd

    rows = []
    for name, s in summary["methods"].items():
        per_class = {f"dice {k}": v for k, v in s["per_class_dice"].items()} if len(s["per_class_dice"]) > 1 else {}
        rows.append({"method": name, "dice": s["dice"], "dice_sd": s["dice_std"], "iou": s["iou"],
                     f"hd95 ({summary['hd95_unit']})": s["hd95"], "hd95 undefined": s["hd95_undefined"], **per_class})
    return pd.DataFrame(rows).set_index("method")


def efficiency_table(summary: dict):
    import pandas as pd

    rows = []
    for name, s in summary["methods"].items():
        if "params_m" not in s:
            continue
        rows.append({"model": name, "input": f"{s['input_size']}x{s['input_size']}", "params (M)": s["params_m"],
                     "GFLOPs": s.get("gflops"), "CPU latency (ms)": s["latency_ms"],
                     "GPU latency (ms)": s.get("gpu_latency_ms"), "speed-up vs teacher": s.get("speedup_vs_teacher")})
    return pd.DataFrame(rows).set_index("model").dropna(axis=1, how="all")


def comparison_rows(run: Run, cases: Sequence[str], predictions: dict) -> list[dict]:
    """Rows for :func:`tskd_utils.viz.comparison_grid`: image, ground truth and each model's labels
    with its Dice in the panel title. ``predictions = {label: [label map per case]}``."""
    rows = []
    for i, c in enumerate(cases):
        image, mask = load_case(run.info, run.info.case(c))
        row = {"title": c, "image": image, "ground truth": mask}
        for label, preds in predictions.items():
            row[label] = preds[i]
            d = mean_foreground_dice(torch.from_numpy(preds[i])[None], torch.from_numpy(mask)[None], run.info.n_classes)
            row[f"{label}_title"] = f"Dice {float(d):.3f}"
        rows.append(row)
    return rows


def interpretation(summary: dict, paired, reference: str = "ts_kd") -> str:
    """The run's results in plain words, computed from them (notebook 05 prints it; nothing is typed in)."""
    m = summary["methods"]
    lines = []
    if "teacher" in m:
        sel = summary.get("selected_teacher", "lora")
        frozen = f", the frozen-encoder baseline {m['teacher_frozen']['dice']:.3f}" if "teacher_frozen" in m else ""
        lines.append(f"The LoRA teacher reaches a test Dice of {m['teacher']['dice']:.3f}{frozen}; the teacher that "
                     f"was distilled is the {sel} one (better on validation).")
    if reference in m:
        own = m["teacher" if summary.get("selected_teacher", "lora") == "lora" else "teacher_frozen"] \
            if "teacher" in m else None
        speed = m[reference].get("speedup_vs_teacher")
        text = f"The {reference} student reaches {m[reference]['dice']:.3f}"
        if own is not None:
            text += f", {100 * (m[reference]['dice'] - own['dice']):+.1f} points against its own teacher"
        if speed and own is not None and own.get("params_m"):
            text += (f", with {own['params_m'] / m[reference]['params_m']:.0f}x fewer parameters and {speed:.0f}x "
                     f"the speed on this machine's CPU")
        lines.append(text + ".")
    if "unet_supervised" in m:
        lines.append(f"What a practitioner would train instead, MONAI's U-Net on the labeled images alone "
                     f"(unet_supervised), reaches {m['unet_supervised']['dice']:.3f}: a method is better than it only "
                     f"where the paired interval below excludes 0.")
    for _, row in paired.iterrows() if paired is not None else []:
        verdict = "better" if row["verdict"].endswith("better") and row["verdict"].startswith(reference) else \
            ("worse" if row["verdict"].endswith("better") else "within noise")
        lines.append(f"Against {row['other']}: {format_interval(row['mean_diff'], row['ci_low'], row['ci_high'])} "
                     f"(paired, 95% interval over {row['n_cases']} test cases; Wilcoxon p = {row['p_wilcoxon']:.2g}): "
                     f"{reference} is {verdict}.")
    lines.append(f"This is one seed and {summary['n_test']} test cases: an interval that includes 0 is within noise, "
                 f"and a claim holds only when it holds over seeds (the sweep's report pools them).")
    return "\n".join(lines)
