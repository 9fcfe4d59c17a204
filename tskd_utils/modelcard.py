"""The model card written next to an ONNX export: what the model is, how good, how fast, what for.

Everything in it is read from the run folder (config, split, dataset.json, ``metrics/``) and from
what the export measured (``parity.json``); nothing is typed in by hand. Test Dice and IoU carry a
95% bootstrap interval over test cases (:func:`tskd_utils.stats.bootstrap_ci`: 10,000 resamples,
fixed seed, so the card is the same every time it is written).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from .stats import bootstrap_ci

METHOD_TEXT = {
    "ts_kd": "task-specific KD: pretrained on the transfer set (real + synthetic images) to match the LoRA "
             "teacher's embedding and per-pixel class probabilities, then fine-tuned on the labeled images",
    "ts_kd_nosyn": "task-specific KD with real transfer images only, then fine-tuned on the labeled images",
    "ta_kd": "task-agnostic KD: pretrained to match the pretrained teacher's embedding, then fine-tuned",
    "mae": "masked-autoencoder pretraining on the transfer set, then fine-tuned on the labeled images",
    "mocov3": "MoCo v3 contrastive pretraining on the transfer set, then fine-tuned on the labeled images",
    "scratch": "random initialisation, trained on the labeled images only",
    "unet_supervised": "the practitioner's baseline: MONAI's UNet (1.6 M parameters, not the student's architecture) "
                       "trained from scratch on the labeled images only",
}

CONTRACT_CODE = '''\
import cv2, numpy as np, onnxruntime as ort
from PIL import Image

SIZE = {size}
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])


def segment(gray: np.ndarray) -> np.ndarray:
    """(H, W) uint8 grayscale image -> (H, W) uint8 class indices."""
    h, w = gray.shape
    scale = SIZE / max(h, w)
    rows, cols = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    inner = gray if (rows, cols) == (h, w) else cv2.resize(
        gray, (cols, rows), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    x = np.zeros((1, 1, SIZE, SIZE), np.float32)
    x[0, 0, :rows, :cols] = inner.astype(np.float32) / 255.0
    logits = session.run(["logits"], {{"image": x}})[0][0]          # (K, SIZE, SIZE)
    inner_logits = np.ascontiguousarray(logits[:, :rows, :cols].transpose(1, 2, 0))
    up = cv2.resize(inner_logits, (w, h), interpolation=cv2.INTER_LINEAR)
    return up.reshape(h, w, -1).argmax(-1).astype(np.uint8)


gray = np.array(Image.open("image.png").convert("L"))  # 8-bit; see step 1 for 16-bit and DICOM
mask = segment(gray)
'''


def _fmt(v: Optional[float], digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _case_means(class_rows: list) -> list:
    """One case's (dice, iou, hd95) over its foreground classes; HD95 over the classes where it is defined."""
    v = np.asarray(class_rows, dtype=np.float64)
    hd = v[:, 2][np.isfinite(v[:, 2])]
    return [float(v[:, 0].mean()), float(v[:, 1].mean()), float(hd.mean()) if hd.size else float("nan")]


def card_metrics(run, method: str) -> Optional[dict]:
    """Test-split metrics of ``method`` with 95% bootstrap intervals over cases; None if not evaluated."""
    summary_path, per_case_path = run.metrics_dir / "summary.json", run.metrics_dir / "per_case.csv"
    if not summary_path.is_file() or not per_case_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    if method not in summary.get("methods", {}):
        return None
    cases: dict = {}
    with per_case_path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["method"] == method:
                cases.setdefault(row["case"], []).append([float(row[k]) for k in ("dice", "iou", "hd95")])
    per_case = np.array([_case_means(v) for v in cases.values()]).reshape(-1, 3)
    out = {"n_cases": len(cases), "hd95_unit": summary.get("hd95_unit", "px"), "summary": summary["methods"][method],
           "teacher": summary["methods"].get("teacher")}
    for j, name in enumerate(("dice", "iou", "hd95")):
        values = per_case[:, j] if len(per_case) else np.array([])
        values = values[np.isfinite(values)]
        out[name] = bootstrap_ci(values) if values.size else (float("nan"),) * 3
    return out


def _metrics_section(run, method: str) -> list[str]:
    m = card_metrics(run, method)
    if m is None:
        return ["Not evaluated yet: run notebook 05 (`tskd_utils.evaluate.evaluate_run`) and export again."]
    lines = [f"{m['n_cases']} test cases of `{run.dataset}` (the run's held-out split, grouped by subject). Mean over "
             f"cases of the mean over foreground classes; [95% bootstrap interval over test cases, 10,000 "
             f"resamples, seed 0]. The interval covers the choice of test cases only, not a new seed or labeled set.",
             "", "| metric | value | 95% interval |", "|---|---|---|"]
    for name, label in (("dice", "Dice"), ("iou", "IoU"), ("hd95", f"HD95 ({m['hd95_unit']})")):
        mean, low, high = m[name]
        digits = 3 if name != "hd95" else 2
        lines.append(f"| {label} | {_fmt(mean, digits)} | [{_fmt(low, digits)}, {_fmt(high, digits)}] |")
    t = m["teacher"]
    if t:
        lines += ["", f"The LoRA teacher on the same cases: Dice {_fmt(t.get('dice'))}, IoU {_fmt(t.get('iou'))}."]
    per_class = m["summary"].get("per_class_dice") or {}
    if len(per_class) > 1:
        lines += ["", "Per-class Dice: " + ", ".join(f"{k} {_fmt(v)}" for k, v in per_class.items()) + "."]
    return lines


def _model_section(run, method: str, rec: dict) -> list[str]:
    t, p = run.profile.teacher, run.profile
    lora = f"LoRA r={t.lora_rank}, alpha {t.lora_alpha} on {', '.join(t.lora_targets)}" + (
        f" of stage(s) {', '.join(map(str, t.lora_stages))}" if t.lora_stages else " of every block")
    classes = ", ".join(f"{i} = {c}" for i, c in enumerate(rec["classes"]))
    return [
        "| | |", "|---|---|",
        f"| file | `{rec['file']}` ({rec['bytes'] / 1e6:.2f} MB, sha256 `{rec['sha256'][:16]}...`), {rec['exporter']}, "
        f"opset {rec['opset']}, torch {rec['torch']} |",
        f"| student | `{rec['student']}`: {rec.get('architecture', 'timm ViT + conv decoder')}; "
        f"{rec['params']:,} parameters ({rec['params'] / 1e6:.2f} M) |",
        f"| input / output | {rec['image_size']} x {rec['image_size']} grayscale; {len(rec['classes'])} classes: "
        f"{classes} |",
        f"| method | `{method}`: {METHOD_TEXT.get(method, method)} |",
        f"| teacher | `{t.name}` image encoder at {t.input_size} px with {lora}, `{t.head}` head (not in this file) |",
        f"| training | profile `{p.name}`, n_labeled {run.n_labeled}, seed {run.seed}, run `{run.name}` |",
    ]


def _data_section(run) -> list[str]:
    meta, counts = run.info.meta, run.splits.get("counts", {})
    split = ", ".join(f"{k} {v}" for k, v in counts.items())
    return [f"- dataset: **{meta['name']}** ({meta.get('modality', '?')}), {meta.get('n_cases', '?')} cases; "
            f"source: {meta.get('source', '?')}",
            f"- licence: **{meta.get('license', 'not stated')}**; cite: {meta.get('citation', 'not stated')}",
            f"- this run's split (by subject): {split}"]


def _speed_section(run, method: str, rec: dict) -> list[str]:
    lat = rec.get("latency")
    if not lat:
        return ["Not measured (exported with --no-latency)."]
    mc = lat["machine"]
    lines = [f"Median of repeated batch-{lat['batch']} forward passes after warm-up, on CPU ({mc['cpu']}, "
             f"{mc['cores']} cores, {mc['torch_threads']} threads for both runtimes; 1-minute load {mc['load_1min']} "
             f"when measured: on a shared machine the ratio says more than the milliseconds).", "",
             "| runtime | batch 1 (ms) |", "|---|---|",
             f"| torch {rec['torch']} | {lat['torch_ms']:.2f} |",
             f"| onnxruntime {lat['onnxruntime']} | {lat['onnxruntime_ms']:.2f} |"]
    teacher = (card_metrics(run, method) or {}).get("teacher") or {}
    if teacher.get("latency_ms"):
        lines += ["", f"The LoRA teacher took {teacher['latency_ms']:.1f} ms per image in torch when the run was "
                      f"evaluated (notebook 05), at {teacher.get('input_size', '?')} px."]
    return lines


def _parity_section(rec: dict) -> list[str]:
    p = rec["parity"]
    return [f"Checked right after export on {p['source']}, batch sizes {p['batch_sizes']}: max |logits difference| "
            f"{p['max_abs_diff']:.2e} (logits up to {p['logit_scale']:.3g}; tolerance {p['tolerance']:.1e}), "
            f"identical mask pixels {p['pixel_agreement']:.4%} of {p['n_pixels']:,}. Rule: {p['rule']}. "
            f"{'Passed' if p['passed'] else 'FAILED'}."]


def _use_section(run) -> list[str]:
    meta = run.info.meta
    return [
        "- **Research and teaching, not for clinical use.** Not a medical device; no regulatory review; "
        "never use it to diagnose, treat or triage anyone.",
        f"- Trained on {run.n_labeled} labeled {meta.get('modality', '')} images of one dataset "
        f"({meta['name']}). Other modalities, views, scanners, populations or image sizes far from these are "
        f"outside what it has seen; it has no out-of-distribution detection and always returns a mask.",
        "- The test metrics come from one split and one seed: a new labeled set or seed may move them more than the "
        "interval suggests. The class scores are uncalibrated logits, not probabilities of disease.",
        f"- It sees a {run.profile.data.image_size} px letterboxed copy of each 2-D image: detail finer than "
        f"(longest side / {run.profile.data.image_size}) pixels is lost; no 3-D context.",
    ]


def _contract_section(rec: dict) -> list[str]:
    size = rec["image_size"]
    return [
        "1. **Read** the image as 8-bit grayscale (H, W). Colour: ITU-R 601 luma `0.299 R + 0.587 G + 0.114 B` "
        "(PIL `convert(\"L\")`). 16-bit or float images: map the 0.5 and 99.5 percentiles of the image to 0 and "
        "255, clip. DICOM: apply RescaleSlope/RescaleIntercept, then the file's WindowCenter/WindowWidth (DICOM "
        "linear window) when present, else the percentile window; invert MONOCHROME1.",
        f"2. **Letterbox** to {size} x {size}: scale = {size} / max(H, W); resize to "
        f"(round(H * scale), round(W * scale)) with OpenCV `INTER_AREA` when shrinking, `INTER_LINEAR` when "
        "enlarging; put it at the top-left of a zero image (padding at the bottom/right).",
        f"3. **Run**: input `image`, float32 (B, 1, {size}, {size}), pixel / 255 (range [0, 1], no mean/std: the "
        "model normalises inside). Output `logits`, float32 (B, K, "
        f"{size}, {size}). The batch size B is free.",
        "4. **Back to the image**: crop the logits to the resized area (rows, cols), resize them bilinearly "
        "(half-pixel centres) to (H, W), argmax over K: the class index per pixel (0 = background).",
        "", "The same in Python, with numpy, OpenCV, Pillow and onnxruntime only:", "",
        "```python", CONTRACT_CODE.format(size=size).rstrip(), "```",
        "", "The ONNX file's `metadata_props` repeat the class names and this contract (`tskd.*` keys).",
    ]


def model_card(run, method: str, rec: dict) -> str:
    """The Markdown model card of an exported student (``rec``: what :func:`export_student` recorded)."""
    warn = ["", f"> The `{run.profile.name}` profile trains toy-sized models for tests: this model is not "
                f"meant to segment anything."] if run.profile.name == "smoke" else []
    sections = [
        [f"# Model card: `{method}` student, {run.info.meta['name']} segmentation", "",
         "> Research and teaching only, **not for clinical use**.", *warn],
        ["## Model", "", *_model_section(run, method, rec)],
        ["## Training data", "", *_data_section(run)],
        ["## Test results", "", *_metrics_section(run, method)],
        ["## Speed", "", *_speed_section(run, method, rec)],
        ["## ONNX parity with torch", "", *_parity_section(rec)],
        ["## Intended use and limits", "", *_use_section(run)],
        ["## Input convention: running `model.onnx` without tskd", "", *_contract_section(rec)],
        ["## Method", "", "Task-specific knowledge distillation from a vision foundation model, after Liang et al., "
         "arXiv 2503.06976 (2025); see the repository's docs/method.md for this project's choices."],
    ]
    return "\n\n".join("\n".join(s) for s in sections) + "\n"


def write_model_card(run, method: str, path, rec: dict) -> Path:
    path = Path(path)
    path.write_text(model_card(run, method, rec))
    return path
