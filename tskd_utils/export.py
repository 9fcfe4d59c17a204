"""Export a trained student to ONNX, check it against torch on real images, time it, write its model card.

::

    python -m tskd_utils.export --run RUN_DIR --method ts_kd --out DIR [--overwrite] [--inputs PATH ...]

writes ``DIR/model.onnx`` (input ``image``: float32 (B, 1, S, S) in [0, 1], dynamic batch; output
``logits``: (B, K, S, S)), ``DIR/parity.json`` (standard JSON: a NaN or inf is written as null) and
``DIR/MODEL_CARD.md``.

**All or nothing**: ``DIR`` must be a folder this process can write in (tried before any export
work); the three files are made in a temporary folder inside ``DIR`` and moved into place only
when the parity check passes and all three are written. Any failure leaves an earlier export in
``DIR`` exactly as it was; a failed parity check writes its record to ``DIR/parity.failed.json``
instead (the next successful export removes it).

**Parity check** (right after export; a model that fails it is not kept under ``model.onnx``):
onnxruntime and torch run the same real inputs (the run's test images; without the dataset, the
images given with ``--inputs``), in batches of 8 and once at batch 1. It passes when

* ``max |logits_onnx - logits_torch| <= 1e-4 * max(1, max |logits_torch|)``: fp32 kernels of two
  runtimes differ by rounding only (measured: about 1e-7 on logits of size 0.1 to 10, so the
  tolerance leaves a margin of about 100x while still catching a wrong op or layout), and
* the class-index masks at the original image size are identical on at least 99.9% of pixels.

**Exporter**: ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based exporter that
is torch's default since 2.9 (it needs ``onnxscript``). The batch dimension is declared dynamic
with ``torch.export.Dim``, so a wrong assumption about it fails at export time instead of
producing a graph that silently works at one batch size only. The legacy TorchScript exporter
(``dynamo=False``) also handles this timm ViT, but it is deprecated and traces tensor-derived
Python numbers as constants (TracerWarnings); it is used only if the dynamo exporter fails, and
``parity.json`` records which one made the file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .io import DataError, check_writable_dir, sha256sum, write_json
from .metrics import median_ms
from .modelcard import write_model_card
from .predict import find_inputs, label_map, model_input, onnx_forward, onnx_session, open_run, trained_model, \
    to_gray_uint8, torch_forward
from .training import non_finite

ONNX_NAME, PARITY_NAME, CARD_NAME = "model.onnx", "parity.json", "MODEL_CARD.md"
FAILED_NAME = "parity.failed.json"  # the record of a failed parity check; the export in the folder is left alone
LOGIT_TOLERANCE = 1e-4  # max |onnx - torch| <= LOGIT_TOLERANCE * max(1, max |torch logits|)
MIN_PIXEL_AGREEMENT = 0.999  # of mask pixels at the original size
PARITY_BATCH = 8
TOLERANCE_RULE = (f"max|logits_onnx - logits_torch| <= {LOGIT_TOLERANCE:g} * max(1, max|logits_torch|) and "
                  f"identical class-index masks on >= {MIN_PIXEL_AGREEMENT:.1%} of pixels")


class ParityError(RuntimeError):
    """The exported ONNX model does not reproduce the torch model within the stated tolerance."""


# ------------------------------------------------------------------------------- exporting


def export_onnx(model: torch.nn.Module, size: int, path: Path) -> dict:
    """Write ``model`` (float32 (B, 1, size, size) -> logits) to ``path`` with a dynamic batch dimension."""
    import onnx

    example = torch.rand(2, 1, size, size)  # batch 2: a batch of 1 could be specialised as a constant
    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.onnx.export(model, (example,), input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), dynamo=True, external_data=False,
                                    verbose=False)
    except Exception as e:  # noqa: BLE001 - any exporter failure: fall back, then parity decides
        note = f"dynamo export failed ({type(e).__name__}: {str(e)[:200]}); used the TorchScript exporter"
        print(f"note: {note}", file=sys.stderr)
        torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
                          opset_version=17)
        exporter = "torch.onnx TorchScript (dynamo=False)"
    else:  # writing the file is no part of the exporter: its errors are not the dynamo exporter's
        program.save(str(path), external_data=False)
        exporter, note = "torch.onnx dynamo (torch.export)", None
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"exporter": exporter, "exporter_note": note, "opset": int(opset), "torch": torch.__version__,
            "onnx": onnx.__version__}


def add_metadata(path: Path, meta: dict) -> None:
    """Store ``meta`` (str -> str) in the ONNX file's metadata_props, where any runtime can read it."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(proto, str(path))


def input_contract(size: int) -> str:
    return (f"image: float32 (B, 1, {size}, {size}) in [0, 1]: 8-bit grayscale / 255, letterboxed (longest side "
            f"resized to {size}, OpenCV INTER_AREA when shrinking, INTER_LINEAR when enlarging; zero padding at "
            f"the bottom/right)")


def output_contract() -> str:
    return ("logits: float32 (B, K, S, S); crop to the letterboxed image area, resize bilinearly (half-pixel "
            "centres) to the original size, argmax over K = class index")


def model_metadata(run, method: str, size: int) -> dict:
    return {"tskd.method": method, "tskd.run": run.name, "tskd.dataset": run.dataset,
            "tskd.classes": json.dumps(run.info.classes), "tskd.image_size": size,
            "tskd.input": input_contract(size), "tskd.output": output_contract(),
            "tskd.intended_use": "research and teaching, not for clinical use"}


# ------------------------------------------------------------------------------- parity


def parity_images(run, inputs: Optional[Sequence] = None) -> tuple[list[np.ndarray], str]:
    """Real images for the parity check: the run's test split, else the files/folders in ``inputs``."""
    try:
        test = run.splits["test"]
        images = [to_gray_uint8(run.info.case(c).image)[0] for c in test]
        if images:
            return images, f"test split of {run.name} ({len(images)} images of {run.dataset})"
    except (DataError, FileNotFoundError, KeyError) as e:
        reason = str(e)
    else:
        reason = "the test split is empty"
    if not inputs:
        raise DataError(f"no real images for the parity check ({reason}): pass --inputs FILE_OR_DIR")
    paths = [p for item in inputs for p in find_inputs(item)[0]]
    return [to_gray_uint8(p)[0] for p in paths], f"{len(paths)} given images ({reason})"


def _batched(forward: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([forward(x[i:i + batch]) for i in range(0, len(x), batch)])


def parity_check(model: torch.nn.Module, session, images: Sequence[np.ndarray], size: int) -> dict:
    """Compare onnxruntime with torch on ``images`` (uint8 grayscale, any size): logits and masks."""
    x = np.concatenate([model_input(im, size) for im in images])
    ref = _batched(torch_forward(model, "cpu"), x, PARITY_BATCH)
    got = _batched(onnx_forward(session), x, PARITY_BATCH)
    single = onnx_forward(session)(x[:1])  # batch 1 too: the dynamic dimension at both ends
    diff = np.abs(got.astype(np.float64) - ref)
    max_abs = float(max(diff.max(), np.abs(single.astype(np.float64) - ref[:1]).max()))
    scale = float(np.abs(ref).max())
    same = total = 0
    for im, a, b in zip(images, ref, got):
        same += int((label_map(a, im.shape) == label_map(b, im.shape)).sum())
        total += im.size
    tolerance = LOGIT_TOLERANCE * max(1.0, scale)
    agreement = same / total
    return {"n_images": len(images), "batch_sizes": sorted({1, min(PARITY_BATCH, len(images))}),
            "max_abs_diff": max_abs, "mean_abs_diff": float(diff.mean()), "logit_scale": scale,
            "tolerance": tolerance, "pixel_agreement": agreement, "n_pixels": total,
            "min_pixel_agreement": MIN_PIXEL_AGREEMENT, "rule": TOLERANCE_RULE,
            "passed": bool(max_abs <= tolerance and agreement >= MIN_PIXEL_AGREEMENT)}


# ------------------------------------------------------------------------------- latency


def machine_info() -> dict:
    """CPU model, cores, threads used and the load average when measured (shared machines vary)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_1min": round(load, 2) if load is not None else None, "os": platform.platform(terse=True)}


def measure_latency(model: torch.nn.Module, session, size: int, batch: int = 1) -> dict:
    """Median CPU latency (ms) of the student in torch and in onnxruntime, same input, same threads."""
    import onnxruntime as ort

    x = torch.rand(batch, 1, size, size)
    torch_fn, onnx_fn = torch_forward(model, "cpu"), onnx_forward(session)
    machine = machine_info()  # the load before measuring
    timed = dict(repeats=30, warmup=3, budget_s=4.0, min_repeats=3)
    out = {"batch": batch, "torch_ms": median_ms(lambda: torch_fn(x.numpy()), **timed),
           "onnxruntime_ms": median_ms(lambda: onnx_fn(x.numpy()), **timed), "onnxruntime": ort.__version__}
    out["onnx_speedup"] = out["torch_ms"] / out["onnxruntime_ms"]
    return {**out, "machine": machine}


# --------------------------------------------------------------------------- the whole step


def describe_student(model: torch.nn.Module) -> str:
    """The student's architecture in words, read off the model itself."""
    if hasattr(model, "channels") and hasattr(model, "decode"):  # a U-Net student (tskd_utils.models.UNetStudent)
        return (f"U-Net (MONAI residual units, channels {', '.join(map(str, model.channels))}, skip connections at "
                f"every resolution)")
    if hasattr(model, "net"):  # unet_supervised
        return f"MONAI UNet (channels {', '.join(map(str, model.net.channels))}, 2 residual units per level)"
    blocks = getattr(getattr(model, "encoder", None), "blocks", None)
    heads = getattr(getattr(blocks[0], "attn", None), "num_heads", "?") if blocks else "?"
    return (f"timm VisionTransformer (patch {getattr(model, 'patch', '?')}, width {getattr(model, 'embed_dim', '?')}, "
            f"depth {len(blocks) if blocks is not None else '?'}, heads {heads}) + light conv decoder")


def export_student(run, method: str = "ts_kd", out="export", overwrite: bool = False,
                   inputs: Optional[Sequence] = None, measure: bool = True) -> dict:
    """Export, verify, time and describe a student; returns what ``parity.json`` records.

    All or nothing (see the module docstring): raises :class:`ParityError`, after writing
    ``out/parity.failed.json`` with ``passed: false`` and leaving any earlier export in ``out`` as it
    was, when onnxruntime does not reproduce torch within the stated tolerance.
    """
    run, out = open_run(run), Path(out)
    if method == "teacher":
        raise DataError("only students are exported (the teacher is the slow model distillation replaces)")
    check_writable_dir(out, "--out")
    targets = [out / name for name in (ONNX_NAME, PARITY_NAME, CARD_NAME)]
    existing = [p for p in targets if p.exists()] if not overwrite else []
    if existing:
        raise FileExistsError(f"{existing[0]} already exists; pass --overwrite (overwrite=True) to replace it")
    model, size = trained_model(run, method, "cpu"), run.profile.data.image_size
    bad = non_finite({}, {method: model})
    if bad:
        raise DataError(f"{method} of {run.dir}: {bad} (its training diverged); nothing was exported. Retrain it "
                        "with a lower learning rate.")
    images, source = parity_images(run, inputs)
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".export.tmp-{uuid.uuid4().hex[:8]}"  # the new files, until they are all there and verified
    staged = [stage / target.name for target in targets]
    try:
        stage.mkdir()
        record = {"run": str(run.dir), "method": method, "image_size": size,
                  "student": getattr(model, "name", run.profile.student.name),
                  "n_classes": run.info.n_classes, "classes": run.info.classes,
                  "architecture": describe_student(model), "params": int(sum(p.numel() for p in model.parameters())),
                  **export_onnx(model, size, staged[0])}
        add_metadata(staged[0], model_metadata(run, method, size))
        session = onnx_session(staged[0])
        record["parity"] = dict(parity_check(model, session, images, size), source=source)
        if not record["parity"]["passed"]:
            write_json(out / FAILED_NAME, record, strict=True)
            p = record["parity"]
            raise ParityError(f"{method} ONNX export fails the parity check on {source}: max |diff| "
                              f"{p['max_abs_diff']:.3g} (tolerance {p['tolerance']:.3g}), identical mask pixels "
                              f"{p['pixel_agreement']:.4%} (need {MIN_PIXEL_AGREEMENT:.1%}); see {out / FAILED_NAME} "
                              f"(nothing else in {out} was changed)")
        record.update(file=ONNX_NAME, sha256=sha256sum(staged[0]), bytes=staged[0].stat().st_size)
        if measure:
            record["latency"] = measure_latency(model, session, size)
        write_json(staged[1], record, strict=True)
        write_model_card(run, method, staged[2], record)
        for new, target in zip(staged, targets):
            new.replace(target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    (out / FAILED_NAME).unlink(missing_ok=True)  # an earlier failure, now superseded
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tskd_utils.export",
                                 description="Export a run's student to ONNX with a parity check and a model card.",
                                 epilog=f"All or nothing: the files are moved into --out only when the parity check "
                                        f"passes; on a failure an earlier export there is left as it was (a failed "
                                        f"check is recorded in {FAILED_NAME}).")
    ap.add_argument("--run", type=Path, required=True, help="run folder")
    ap.add_argument("--method", default="ts_kd", help="student method id (default ts_kd)")
    ap.add_argument("--out", type=Path, required=True, help="output folder: model.onnx, parity.json, MODEL_CARD.md")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing export")
    ap.add_argument("--inputs", type=Path, nargs="*", default=None,
                    help="images for the parity check when the run's dataset (test split) is not available")
    ap.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    args = ap.parse_args(argv)
    try:
        rec = export_student(args.run, args.method, args.out, args.overwrite, args.inputs, not args.no_latency)
    except (DataError, OSError, ParityError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p = rec["parity"]
    print(f"wrote {args.out / ONNX_NAME} ({rec['exporter']}, opset {rec['opset']}, {rec['bytes'] / 1e6:.2f} MB)")
    print(f"parity on {p['source']}: max |logits diff| {p['max_abs_diff']:.2e} (tolerance {p['tolerance']:.1e}), "
          f"identical mask pixels {p['pixel_agreement']:.4%}")
    if "latency" in rec:
        lat = rec["latency"]
        print(f"CPU latency, batch 1: torch {lat['torch_ms']:.2f} ms, onnxruntime {lat['onnxruntime_ms']:.2f} ms "
              f"(load {lat['machine']['load_1min']})")
    print(f"model card: {args.out / CARD_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
