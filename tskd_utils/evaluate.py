"""Stage 5: evaluate the teacher and every student of a run on its test split.

Each model predicts on the letterboxed test image at its own input size; the class logits are
mapped back to the original image (padding cropped, bilinear resize) before the argmax, and
Dice / IoU / HD95 are computed per case and per foreground class against the original mask with
MONAI (see :mod:`tskd_utils.metrics` for how empty masks count). HD95 is in mm when every test
case has a pixel spacing, else in pixels.

Writes ``metrics/per_case.csv`` (one row per method, case and class), ``metrics/summary.json``,
``metrics/predictions/<method>/<case>.png`` and the run's rows of the results table,
``results.csv`` (conventions.md).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import letterbox, unletterbox
from .io import load_case, read_mask, write_json, write_png
from .metrics import case_metrics, nanmean
from .run import Run, check_methods

RESULT_COLUMNS = ["dataset", "n_labeled", "seed", "method", "dice", "iou", "hd95", "params_m", "latency_ms",
                  "profile"]


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
    """Median wall time of a batch-1 forward pass, after warm-up (CUDA: synchronised).

    Slow models get fewer repeats (at least 5) so that one measurement takes about ``budget_s``.
    """
    cuda = example.device.type == "cuda"

    def once() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(example)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1000

    with torch.inference_mode():
        first = min(once() for _ in range(max(1, warmup)))
        repeats = max(5, min(repeats, int(budget_s * 1000 / max(first, 1e-3))))
        times = [once() for _ in range(repeats)]
    return float(np.median(times))


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


# ------------------------------------------------------------------------------ predictions


def teacher_logits(run: Run, model, images: list[np.ndarray], names: list[str]) -> list[torch.Tensor]:
    """Teacher logits through the shared prefix cache (the frozen stages are never recomputed)."""
    from .teacher import teacher_prefix

    size = run.profile.teacher.input_size
    boxed = [letterbox(im, size) for im in images]
    prefix = teacher_prefix(run, model.encoder, names, boxed)
    out = []
    with torch.inference_mode():
        for h in prefix:
            out.append(model.from_prefix(h[None].float().to(run.device))[1][0].float().cpu())
    return out


def student_logits(run: Run, model, images: list[np.ndarray], batch_size: int = 8) -> list[torch.Tensor]:
    size = run.profile.data.image_size
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.stack([letterbox(im, size) for im in images[i:i + batch_size]]))
            x = x.float().div_(255.0)[:, None].to(run.device)
            out += list(model(x).float().cpu())
    return out


def to_label_map(logits: torch.Tensor, original_hw: tuple[int, int]) -> np.ndarray:
    """(K, S, S) letterboxed logits -> (H, W) uint8 labels at the original size."""
    return unletterbox(logits, original_hw).argmax(0).numpy().astype(np.uint8)


def load_model(run: Run, method: str):
    """(model, input size) of a method id; ``teacher`` is the LoRA teacher, ``teacher_frozen`` the baseline."""
    if method in ("teacher", "teacher_frozen"):
        from .teacher import load_teacher

        return load_teacher(run, "lora" if method == "teacher" else "frozen"), run.profile.teacher.input_size
    from .distill import load_student

    return load_student(run, method), run.profile.data.image_size


# ------------------------------------------------------------------------------- evaluation


def evaluate_run(run: Run, methods: Optional[Sequence[str]] = None, include_teacher: bool = True,
                 include_frozen: bool = False, measure_efficiency: bool = True) -> dict:
    """Evaluate every finished model of the run on the test split; write the metric files."""
    methods = check_methods(methods)
    present = [m for m in methods if (run.students_dir / m / "student.safetensors").is_file()]
    missing = sorted(set(methods) - set(present))
    if missing:
        print(f"not evaluated (not trained in this run): {', '.join(missing)}")
    names = (["teacher"] if include_teacher else []) + (["teacher_frozen"] if include_frozen else []) + present
    info, n_classes = run.info, run.info.n_classes
    test = run.splits["test"]
    records = [info.case(c) for c in test]
    images, masks, spacings = [], [], []
    for rec in records:
        im, mk = load_case(info, rec)
        images.append(im)
        masks.append(mk)
        spacings.append(rec.spacing_mm)
    use_mm = all(s is not None for s in spacings)
    pred_dir = run.metrics_dir / "predictions"
    rows, summary = [], {"hd95_unit": "mm" if use_mm else "px", "n_test": len(test), "methods": {},
                         "empty_mask_rule": "both empty: Dice=IoU=1, HD95=0; one empty: Dice=IoU=0, HD95 undefined"
                                            " (left out of the mean, counted in hd95_undefined)"}
    for name in tqdm(names, desc="evaluating", dynamic_ncols=True):
        model, size = load_model(run, name)
        logits = teacher_logits(run, model, images, test) if name.startswith("teacher") else \
            student_logits(run, model, images)
        case_dice, case_iou, case_hd, undefined = [], [], [], 0
        (pred_dir / name).mkdir(parents=True, exist_ok=True)
        for rec, lg, mk, sp in zip(records, logits, masks, spacings):
            pred = to_label_map(lg, mk.shape)
            write_png(pred_dir / name / f"{rec.case}.png", pred)
            m = case_metrics(pred, mk, n_classes, spacing=sp if use_mm else None)
            for k in range(n_classes - 1):
                rows.append({"method": name, "case": rec.case, "class": info.classes[k + 1],
                             "dice": m["dice"][k], "iou": m["iou"][k], "hd95": m["hd95"][k]})
            undefined += sum(np.isnan(m["hd95"]))
            case_dice.append(float(np.mean(m["dice"])))
            case_iou.append(float(np.mean(m["iou"])))
            case_hd.append(nanmean(m["hd95"]))
        s = {"dice": float(np.mean(case_dice)), "dice_std": float(np.std(case_dice)),
             "iou": float(np.mean(case_iou)), "hd95": nanmean(case_hd), "hd95_undefined": int(undefined),
             "per_class_dice": {info.classes[k + 1]: float(np.mean([r["dice"] for r in rows if r["method"] == name
                                                                     and r["class"] == info.classes[k + 1]]))
                                for k in range(n_classes - 1)}}
        if measure_efficiency:
            s.update(efficiency(model, size, run))
        summary["methods"][name] = s
        del model
    run.metrics_dir.mkdir(parents=True, exist_ok=True)
    with (run.metrics_dir / "per_case.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["method", "case", "class", "dice", "iou", "hd95"])
        w.writeheader()
        w.writerows(rows)
    teacher_latency = summary["methods"].get("teacher", {}).get("latency_ms")
    for name, s in summary["methods"].items():
        if teacher_latency and s.get("latency_ms"):
            s["speedup_vs_teacher"] = teacher_latency / s["latency_ms"]
    write_json(run.metrics_dir / "summary.json", summary)
    write_results(run, summary)
    return summary


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
    return [read_mask(run.metrics_dir / "predictions" / method / f"{c}.png") for c in cases]


def predict(run: Run, method: str, cases: Sequence[str]) -> list[np.ndarray]:
    """Label maps of ``method`` (a student id, ``teacher`` or ``teacher_frozen``) at the original size."""
    model, _ = load_model(run, method)
    images = [load_case(run.info, run.info.case(c))[0] for c in cases]
    logits = teacher_logits(run, model, images, list(cases)) if method.startswith("teacher") else \
        student_logits(run, model, images)
    return [to_label_map(lg, im.shape) for lg, im in zip(logits, images)]


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
    from .metrics import mean_foreground_dice

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
