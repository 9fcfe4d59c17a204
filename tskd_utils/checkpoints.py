"""Trained models out of a run folder, and the predictions made with them: below the stages that train them.

* the teacher: :func:`build_encoder` (the pretrained encoder, split where the prefix is cached), :func:`load_teacher`
  (``lora``, ``frozen``, ``selected`` or ``pretrained``), :func:`selected_variant`, :func:`teacher_digest`;
* the students: :func:`new_student` (the same initial weights for every method), :func:`load_student`;
* any method by its id: :func:`load_model`;
* logits and label maps of original-size images: :func:`teacher_logits` (through the shared prefix cache),
  :func:`student_logits`, :func:`to_label_map`, :func:`predict_cases`;
* :func:`pooled_embeddings`: the pretrained encoder's averaged embeddings (the quality report's features).

teacher.py (notebook 02), distill.py (04), evaluate.py (05) and predict.py import from here; nothing here imports
them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .data import by_rows, letterbox, unletterbox
from .features import images_to_tensor, run_suffix, teacher_inputs, teacher_prefix
from .io import DataError, load_case, read_json
from .models import TeacherEncoder, TeacherSegmenter, build_student, build_supervised_unet, build_teacher, freeze, \
    student_feature_grid
from .run import Run, check_methods
from .training import file_digest, load_weights, value_digest

VARIANTS = ("lora", "frozen", "pretrained", "selected")
SUPERVISED = "unet_supervised"  # the practitioner's U-Net on the labels only: no pretraining, its own architecture


# -------------------------------------------------------------------------------- the teacher


def build_encoder(run: Run, pretrained: bool = True) -> TeacherEncoder:
    t = run.profile.teacher
    enc = build_teacher(t.name, t.input_size, pretrained=pretrained, weights=t.weights)
    enc.set_split(t.lora_stages if t.cache_prefix else None)
    return enc


def selected_variant(run: Run) -> str:
    """``lora`` or ``frozen``: the teacher with the better validation Dice (recorded by train_teacher)."""
    path = run.teacher_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"no trained teacher in {run.teacher_dir}: run notebook 02 "
                                f"(tskd_utils.teacher.train_teacher) first")
    return read_json(path).get("selected", "lora")


def load_teacher(run: Run, variant: str = "lora", device: Optional[str] = None) -> TeacherSegmenter:
    """The trained teacher (``lora``; ``frozen`` with its head; ``selected``: the better of the two on
    validation; ``pretrained`` = the encoder without adapters, for task-agnostic KD), frozen, in eval mode."""
    from peft import PeftModel

    if variant not in VARIANTS:
        raise KeyError(f"unknown teacher variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    variant = selected_variant(run) if variant == "selected" else variant
    t = run.profile.teacher
    encoder = freeze(build_encoder(run))
    head_file = {"lora": run.teacher_dir / "head.safetensors", "frozen": run.teacher_dir / "frozen_head.safetensors",
                 "pretrained": None}[variant]
    if variant == "lora":
        adapter = run.teacher_dir / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no trained teacher in {run.teacher_dir} ({adapter} is missing): run "
                                    f"notebook 02 (tskd_utils.teacher.train_teacher) first")
        encoder = PeftModel.from_pretrained(encoder, str(adapter)).get_base_model()
    model = TeacherSegmenter(encoder, run.info.n_classes, t.head_channels, t.head)
    if head_file is not None:
        load_weights(head_file, {"head": model.head})
    freeze(model)
    model.variant = variant
    return model.to(device or run.device)


def teacher_digest(run: Run, variant: str = "selected") -> str:
    """A digest of the weights of a teacher variant: what its targets and predictions depend on."""
    variant = selected_variant(run) if variant == "selected" else variant
    files = {"lora": [run.teacher_dir / "head.safetensors", run.teacher_dir / "adapter" / "adapter_model.safetensors"],
             "frozen": [run.teacher_dir / "frozen_head.safetensors"], "pretrained": []}[variant]
    return value_digest([variant] + [file_digest(f) for f in files])


# -------------------------------------------------------------------------------- the students


def student_grid(run: Run) -> int:
    """The grid of the student's feature map that KD matches (ViT: its tokens; U-Net: the teacher's stride)."""
    p = run.profile
    return student_feature_grid(p.student.name, p.data.image_size, p.teacher.name, p.teacher.input_size)


def new_student(run: Run, n_classes: Optional[int] = None, method: Optional[str] = None) -> nn.Module:
    """A freshly initialised student: the same initial weights for every method of the run. ``unet_supervised``
    gets the practitioner's U-Net instead (:class:`~tskd_utils.models.SupervisedUNet`, whatever the student)."""
    s, n_classes = run.profile.student, n_classes or run.info.n_classes
    if method == SUPERVISED:
        return build_supervised_unet(n_classes, run.profile.data.image_size,
                                     seed=run.seed_for("supervised init")).to(run.device)
    return build_student(s.name, run.profile.data.image_size, n_classes, s.decoder_channels,
                         seed=run.seed_for("student init"), feature_grid=student_grid(run)).to(run.device)


def method_dir(run: Run, method: str) -> Path:
    return run.students_dir / method


def load_student(run: Run, method: str, device: Optional[str] = None) -> nn.Module:
    """The fine-tuned student of ``method`` (best validation checkpoint), in eval mode."""
    check_methods([method])
    path = method_dir(run, method) / "student.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run notebook 04 (tskd_utils.distill.run_method) for {method!r}")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as fh:  # the classes travel with the weights: no dataset folder needed
            classes = json.loads((fh.metadata() or {}).get("classes", "null") or "null")
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable safetensors file ({e}); re-run notebook 04 for {method!r}") from None
    student = new_student(run, len(classes) if classes else None, method=method)
    load_weights(path, {"student": student})
    student.classes = classes
    return student.to(device or run.device).eval()


def load_model(run: Run, method: str):
    """(model, input size) of a method id; ``teacher`` is the LoRA teacher, ``teacher_frozen`` the baseline."""
    if method in ("teacher", "teacher_frozen"):
        return load_teacher(run, "lora" if method == "teacher" else "frozen"), run.profile.teacher.input_size
    return load_student(run, method), run.profile.data.image_size


# ------------------------------------------------------------------------------ predictions


def teacher_logits(run: Run, model, images: list[np.ndarray], names: list[str]) -> list[torch.Tensor]:
    """Teacher logits of original-size images through the shared prefix cache (the frozen stages are
    never recomputed)."""
    boxed, valid = teacher_inputs(images, run.profile.teacher.input_size)
    prefix = teacher_prefix(run, model.encoder, names, boxed, valid)
    return [lg for batch in run_suffix(lambda h: model.from_prefix(h)[1], prefix, run.device) for lg in batch]


def student_logits(run: Run, model, images: list[np.ndarray], batch_size: int = 8) -> list[torch.Tensor]:
    """Student logits of original-size images (letterboxed to the student's input size)."""
    size = run.profile.data.image_size
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = images_to_tensor(np.stack([letterbox(im, size) for im in images[i:i + batch_size]]), run.device)
            out += list(model(x).float().cpu())
    return out


def to_label_map(logits, original_hw: tuple[int, int]) -> np.ndarray:
    """(K, S, S) letterboxed logits -> (H, W) uint8 class indices at the original size (the logits resized to it are
    float32; the argmax is taken a block of rows at a time, without int64 temporaries at the full image size)."""
    up = unletterbox(torch.as_tensor(logits), original_hw).numpy()
    return by_rows(lambda rows: rows.argmax(1), np.moveaxis(up, 0, 1))  # (H, K, W): rows first


def predict_cases(run: Run, variant: str, cases) -> list[np.ndarray]:
    """Label maps (original image size) of a teacher variant on some cases of the dataset."""
    model = load_teacher(run, variant)
    images = [load_case(run.info, run.info.case(c))[0] for c in cases]
    return [to_label_map(lg, im.shape) for lg, im in zip(teacher_logits(run, model, images, list(cases)), images)]


def pooled_embeddings(run, names: Sequence[str], raw_images: Sequence[np.ndarray], synthetic: bool = False,
                      batch_size: int = 8) -> torch.Tensor:
    """(N, C) spatially averaged embeddings of the *pretrained* teacher encoder (no adapters)."""
    encoder = freeze(build_encoder(run)).to(run.device)
    boxed, valid = teacher_inputs(raw_images, run.profile.teacher.input_size)
    prefix = teacher_prefix(run, encoder, names, boxed, valid, synthetic=synthetic)
    out = run_suffix(lambda h: encoder.suffix(h).mean(dim=(2, 3)), prefix, run.device, batch_size)
    return torch.cat(out) if out else torch.zeros(0, encoder.embed_dim)
