"""Inference speed on CPU: the student in torch and in onnxruntime, against the teacher in torch.

    python benchmarks/bench_inference.py [--profile demo] [--students unet_s:128,unet_s:256,vit_mini:128,vit_tiny:256]
                                         [--run RUN_DIR --method ts_kd] [--threads N]

Without ``--run`` the models are built from the profile with random weights (speed does not depend
on the weights): the profile's teacher (LiteMedSAM with the profile's LoRA adapters, unmerged, as
``load_teacher`` gives it, and its head) and each student of ``--students`` (name:input size).
With ``--run`` the run's trained student and LoRA teacher are timed instead.

Each student is exported with :func:`tskd_utils.export.export_onnx` (dynamic batch) into a
temporary folder. Every model runs at batch 1 and 8 on the same random input, with the same number
of threads in torch and onnxruntime. After warm-up, the models take turns in interleaved rounds
(the teacher once per round, each student ``--repeats`` times), so that all of them share the
same stretch of machine load; the time is the median over the rounds. Prints the 1-minute load
average before and after, and a Markdown table with the speed-up over the teacher.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def teacher_from_profile(prof, n_classes: int = 2) -> torch.nn.Module:
    """The profile's teacher with (untrained) LoRA adapters injected by peft, as ``load_teacher`` builds it."""
    from peft import LoraConfig, get_peft_model

    from tskd_utils.models import TeacherSegmenter, build_teacher, freeze

    t = prof.teacher
    encoder = freeze(build_teacher(t.name, t.input_size, pretrained=True, weights=t.weights))
    lora = LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, bias="none",
                      target_modules=encoder.lora_target_regex(t.lora_targets, t.lora_stages))
    encoder = get_peft_model(encoder, lora).get_base_model()
    return freeze(TeacherSegmenter(encoder, n_classes, t.head_channels, t.head))


def models(args) -> tuple[dict, tuple]:
    """{label: (model, input size)} of the students, and (label, model, size) of the teacher."""
    from tskd_utils.config import get_profile
    from tskd_utils.models import build_student

    if args.run:
        from tskd_utils.distill import load_student
        from tskd_utils.run import load_run
        from tskd_utils.teacher import load_teacher

        run = load_run(args.run)
        p = run.profile
        students = {f"{p.student.name} ({args.method})": (load_student(run, args.method, "cpu"), p.data.image_size)}
        return students, (f"{p.teacher.name} + LoRA", load_teacher(run, "lora", "cpu"), p.teacher.input_size)
    p = get_profile(args.profile)
    students = {}
    for item in args.students.split(","):
        name, size = item.split(":")
        students[name] = (build_student(name, int(size), 2, p.student.decoder_channels).eval(), int(size))
    return students, (f"{p.teacher.name} + LoRA", teacher_from_profile(p), p.teacher.input_size)


def runners(args) -> list[dict]:
    """One entry per (model, runtime): label, input size, parameters, and ``call(x)`` for a float32 batch."""
    from tskd_utils.export import export_onnx, onnx_session

    students, (t_label, teacher, t_size) = models(args)

    def torch_call(model):
        def call(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x))
        return call

    out = [{"model": f"teacher: {t_label}", "input": t_size, "params": _params(teacher), "runtime": "torch",
            "call": torch_call(teacher), "teacher": True}]
    tmp = Path(tempfile.mkdtemp(prefix="bench_inference_"))
    for label, (model, size) in students.items():
        path = tmp / f"{label.split()[0]}.onnx"
        export_onnx(model, size, path)
        session = onnx_session(path, args.threads)
        common = {"model": f"student: {label}", "input": size, "params": _params(model), "teacher": False}
        out.append({**common, "runtime": "torch", "call": torch_call(model)})
        out.append({**common, "runtime": "onnxruntime",
                    "call": (lambda s: lambda x: s.run(["logits"], {"image": x}))(session)})
    return out


def _once_ms(call, x) -> float:
    t0 = time.perf_counter()
    call(x)
    return (time.perf_counter() - t0) * 1000


def measure(args) -> list[dict]:
    """Interleaved rounds: in each round the teacher runs once and every student ``--repeats`` times,
    so that all models share the same stretch of machine load (on a busy shared machine the
    ratios stay fair even when the milliseconds do not); the medians are reported."""
    rows = runners(args)
    for b in args.batches:
        inputs = {r["input"]: torch.rand(b, 1, r["input"], r["input"]).numpy() for r in rows}
        times: dict = {id(r): [] for r in rows}
        for r in rows:  # warm-up
            for _ in range(1 if r["teacher"] else 3):
                r["call"](inputs[r["input"]])
        for _ in range(args.rounds):
            for r in rows:
                n = 1 if r["teacher"] else args.repeats
                times[id(r)] += [_once_ms(r["call"], inputs[r["input"]]) for _ in range(n)]
        for r in rows:
            r.setdefault("ms", {})[b] = float(np.median(times[id(r)]))
    teacher_ms = rows[0]["ms"]
    for r in rows:
        r["speedup"] = {b: teacher_ms[b] / r["ms"][b] for b in args.batches}
    return rows


def _params(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def table(rows: list[dict], batches) -> str:
    head = ["model", "input", "params (M)", "runtime"] + [f"batch {b} (ms)" for b in batches] + \
           [f"batch {b}: ms/image" for b in batches if b > 1] + [f"vs teacher, batch {b}" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['input']}", f"{r['params']:.2f}", r["runtime"]]
        cells += [f"{r['ms'][b]:.1f}" if r["ms"][b] >= 10 else f"{r['ms'][b]:.2f}" for b in batches]
        cells += [f"{r['ms'][b] / b:.2f}" for b in batches if b > 1]
        cells += [f"{r['speedup'][b]:.0f}x" if r["speedup"][b] >= 10 else f"{r['speedup'][b]:.1f}x" for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--students", default="unet_s:128,unet_s:256,vit_mini:128,vit_tiny:256", help="name:input size, comma-separated")
    ap.add_argument("--run", type=Path, default=None, help="time this run's trained models instead")
    ap.add_argument("--method", default="ts_kd")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the teacher runs once per round)")
    ap.add_argument("--repeats", type=int, default=5, help="student runs per round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tskd_utils.export import machine_info

    before = machine_info()
    rows = measure(args)
    after = machine_info()
    import onnxruntime

    print(f"\nCPU: {before['cpu']}, {before['cores']} cores, {args.threads} threads (torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}); 1-minute load {before['load_1min']} before, "
          f"{after['load_1min']} after\n")
    print(table(rows, args.batches))


if __name__ == "__main__":
    main()
