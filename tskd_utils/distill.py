"""Stage 4: pretrain the student on the transfer set (TS-KD and the baselines), then fine-tune it.

Methods (method.md): ``scratch``, ``ta_kd``, ``ts_kd``, ``ts_kd_nosyn``, ``mae``, ``mocov3``. Every
method uses the same student architecture and initial weights, the same transfer set and the same
fine-tuning; ``ts_kd_nosyn`` drops the synthetic images.

**The transfer set** is the labeled cases, ``distill.n_unlabeled`` of the unlabeled train cases
(a seeded subset; all by default) and the synthetic images (``diffusion.n_synthetic``). Its
composition is recorded in ``<run>/cache/targets/transfer_set.json``.

**Teacher targets** are computed once per transfer image and cached in ``<run>/cache/targets/``
(fp16 safetensors): the selected teacher's embedding **average-pooled to the student's token grid**
(16x smaller than LiteMedSAM's 64x64 map, and the student's features need no upsampling), its class
logits area-averaged to the student's input size (the two share the letterbox frame; logits, not
probabilities, so the temperature applies at training time), and the pretrained encoder's pooled
embedding for ``ta_kd``. Student epochs read the cache; the teacher never runs inside them.

Augmentation on the distillation path is a horizontal flip applied identically to the image and
its targets, plus photometric changes (brightness, contrast, noise) of the image only.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

# load_student is here for notebook 04 and older callers (tskd_utils.distill.load_student)
from .checkpoints import (SUPERVISED, load_student, load_teacher, method_dir, new_student,  # noqa: F401
                          student_grid, teacher_digest)
from .data import SegmentationDataset, letterbox, loader
from .features import (FeatureCache, images_to_tensor, run_prefix_dtype, run_suffix, teacher_inputs, teacher_prefix,
                       valid_tensor)
from .generation import synthetic_paths
from .io import read_image, read_json, read_mask, save_safetensors, write_json
from .losses import kd_loss, segmentation_loss
from .metrics import validation_dice
from .pretrain import MoCoV3, build_mim
from .run import METHODS, Run, check_methods  # noqa: F401 (distill.METHODS)
from .training import (Stage, autocast, compute_dtype, file_digest, grad_scaler, load_weights, optimizer_step, save_weights, seeded,
                       source_digest, value_digest, warmup_cosine)
from .viz import pca_rgb

KD_METHODS = ("ts_kd", "ts_kd_nosyn", "ta_kd")
NO_PRETRAINING = ("scratch", SUPERVISED)
TARGETS_VERSION = 2  # bump when what a cached target file holds changes


# ------------------------------------------------------------------------------ transfer set


def transfer_set(run: Run, synthetic: bool = True) -> tuple[list[str], list[Path], list[bool]]:
    """(names, image paths, is_synthetic) of the transfer set: the labeled cases, the chosen unlabeled
    ones and (with ``synthetic``) the synthetic images."""
    real = run.real_transfer_cases()
    names, paths, flags = real, [run.info.case(c).image for c in real], [False] * len(real)
    if synthetic:
        syn = synthetic_paths(run)
        names, paths, flags = names + [p.stem for p in syn], paths + syn, flags + [True] * len(syn)
    return names, paths, flags


def transfer_composition(run: Run, synthetic: bool = True) -> dict:
    names, _, flags = transfer_set(run, synthetic)
    n_syn = sum(flags)
    return {"labeled": len(run.splits["labeled"]), "unlabeled": len(names) - n_syn - len(run.splits["labeled"]),
            "unlabeled_available": len(run.splits["unlabeled"]), "synthetic": n_syn, "total": len(names)}


def _synthetic_digest(run: Run) -> str:
    record = run.synthetic_dir / "synthetic.json"
    return value_digest(read_json(record).get("model_sha256") if record.is_file() else None)


# ---------------------------------------------------------------------------- teacher targets


def _compute_targets(run: Run, todo: list, keys, names, boxed, valid, flags, out_dir: Path, grid: int) -> None:
    size_s = run.profile.data.image_size
    ts_model, ta_model = load_teacher(run, "selected"), load_teacher(run, "pretrained")
    t0 = time.perf_counter()
    for synth in (False, True):
        idx = [i for i in todo if flags[i] == synth]
        if not idx:
            continue
        prefix = teacher_prefix(run, ts_model.encoder, [names[i] for i in idx], [boxed[i] for i in idx],
                                [valid[i] for i in idx], synthetic=synth)
        for j, i in enumerate(tqdm(idx, desc="teacher targets", dynamic_ncols=True)):
            (emb_ts, logits), emb_ta = run_suffix(ts_model.from_prefix, prefix[j:j + 1], run.device)[0], \
                run_suffix(ta_model.encoder.suffix, prefix[j:j + 1], run.device)[0]
            target = {"emb_ts": F.adaptive_avg_pool2d(emb_ts, grid)[0], "emb_ta": F.adaptive_avg_pool2d(emb_ta, grid)[0],
                      "logits_ts": F.interpolate(logits, size=(size_s, size_s), mode="area")[0]}
            FeatureCache(out_dir).save(keys[i], {k: v.half() for k, v in target.items()})
    print(f"teacher targets for {len(todo)} images in {time.perf_counter() - t0:.1f} s -> {out_dir}")


def teacher_targets(run: Run, synthetic: bool = True, kinds: Sequence[str] = ("ts", "ta")) -> dict:
    """Load (computing what is missing) the cached teacher targets of the transfer set.

    Returns ``{"names", "synthetic", "images" (uint8 at the student size), "emb_ts", "logits_ts", "emb_ta",
    "digest"}`` with one fp16 tensor stack per kind asked for; ``digest`` fingerprints the targets.
    """

    size_t, size_s = run.profile.teacher.input_size, run.profile.data.image_size
    names, paths, flags = transfer_set(run, synthetic)
    raw = [read_image(p) for p in paths]
    boxed, valid = teacher_inputs(raw, size_t)
    out_dir, grid = run.cache_dir / "targets", student_grid(run)
    fingerprint = {"version": TARGETS_VERSION, "teacher": teacher_digest(run), "teacher_size": size_t,
                   "student_size": size_s, "grid": grid, "prefix_dtype": run_prefix_dtype(run)}
    meta_path = out_dir / "meta.json"
    if meta_path.is_file() and read_json(meta_path) != fingerprint:
        print(f"the teacher or the student's grid changed since {out_dir} was filled: recomputing its targets")
        for f in out_dir.glob("*.safetensors"):
            f.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    if not meta_path.is_file() or read_json(meta_path) != fingerprint:
        write_json(meta_path, fingerprint)
    write_json(out_dir / ("transfer_set.json" if synthetic else "transfer_set_real.json"),
               {**transfer_composition(run, synthetic), "names": names})
    keys = [FeatureCache.key(n, im, v) for n, im, v in zip(names, boxed, valid)]
    todo = [i for i, k in enumerate(keys) if not FeatureCache(out_dir).path(k).is_file()]
    if todo:
        _compute_targets(run, todo, keys, names, boxed, valid, flags, out_dir, grid)
    if "ts" in kinds:
        teacher_val_labels(run)  # for the per-class check after distillation (check_classes)
    fields = [f for k in kinds for f in {"ts": ("emb_ts", "logits_ts"), "ta": ("emb_ta",)}[k]]
    loaded = [FeatureCache(out_dir).load_all(k) for k in keys]
    result = {f: torch.stack([d[f] for d in loaded]) for f in fields}
    result.update(names=names, synthetic=flags, images=np.stack([letterbox(im, size_s) for im in raw]),
                  digest=value_digest([fingerprint, keys]))
    return result


# ------------------------------------------------------------------------------- augmentation


def flip_photometric(x: torch.Tensor, *targets: torch.Tensor, flip: bool = True) -> tuple:
    """Random horizontal flip of images (B,1,H,W) and targets (B,C,h,w) together, then photometric
    jitter of the images only (brightness +-0.1, contrast x0.8-1.2, Gaussian noise sd <= 0.03). A None target
    (task-agnostic KD has no logits) stays None."""
    b = x.shape[0]
    if flip:
        f = torch.rand(b) < 0.5
        x = torch.where(f.view(b, 1, 1, 1).to(x.device), x.flip(-1), x)
        targets = tuple(None if t is None else torch.where(f.view(b, 1, 1, 1).to(t.device), t.flip(-1), t)
                        for t in targets)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = torch.empty(b, 1, 1, 1, device=x.device).uniform_(0.8, 1.2)
    bright = torch.empty(b, 1, 1, 1, device=x.device).uniform_(-0.1, 0.1)
    noise = torch.randn_like(x) * torch.empty(b, 1, 1, 1, device=x.device).uniform_(0, 0.03)
    x = ((x - mean) * contrast + mean + bright + noise).clamp(0, 1)
    return (x,) + targets


def two_views(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """A MoCo view: random resized crop (scale 0.3-1, aspect 3/4-4/3), flip, photometric jitter."""
    b, _, h, w = x.shape
    views = []
    for i in range(b):
        area = h * w * float(torch.empty(1).uniform_(0.3, 1.0))
        ratio = float(torch.exp(torch.empty(1).uniform_(np.log(3 / 4), np.log(4 / 3))))
        ch = int(min(h, max(8, round((area / ratio) ** 0.5))))
        cw = int(min(w, max(8, round((area * ratio) ** 0.5))))
        top = int(torch.randint(0, h - ch + 1, (1,)))
        left = int(torch.randint(0, w - cw + 1, (1,)))
        crop = x[i:i + 1, :, top:top + ch, left:left + cw]
        views.append(F.interpolate(crop, size=(out_size, out_size), mode="bilinear", align_corners=False))
    return flip_photometric(torch.cat(views))[0]


# ------------------------------------------------------------------------------ pretraining


class FeatureAlign(nn.Module):
    """Student features (B, Cs, g, g) -> teacher embedding space (B, Ct, g, g): a 1x1 convolution (the
    cached teacher embedding is already pooled to the student's grid)."""

    def __init__(self, c_student: int, c_teacher: int):
        super().__init__()
        self.proj = nn.Conv2d(c_student, c_teacher, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.proj(f)


def standardized(emb: torch.Tensor) -> torch.Tensor:
    """Teacher embeddings with each channel's mean 0 and standard deviation 1 over the transfer set: the
    feature loss then weighs every channel alike and has the same scale for every teacher (LiteMedSAM's
    pooled embedding has a standard deviation of about 0.1, which made the feature term negligible)."""
    flat = emb.float().transpose(0, 1).reshape(emb.shape[1], -1)
    mean, std = flat.mean(1), flat.std(1).clamp_min(1e-6)
    return ((emb.float() - mean[None, :, None, None]) / std[None, :, None, None]).half()


@dataclass
class Pretraining:
    """A pretraining stage ready for its loop: notebook 04 writes the loop out for the KD methods, :func:`pretrain`
    runs the same one for every method. ``modules`` (the student and the method's extra: ``align``, the 1x1
    projection to the teacher's embedding, or the MAE / MoCo ``wrapper``) are what the stage checkpoints;
    ``loop`` holds the keyword arguments of ``stage.epochs``; :meth:`batches` is one shuffled pass over the
    transfer set; :meth:`finish` checks the classes (TS-KD) and returns the stage's summary."""

    run: Run
    method: str
    stage: Stage
    modules: dict
    images: torch.Tensor  # (N, 1, S, S) in [0, 1]: the transfer set
    targets: tuple  # KD: (teacher embedding, teacher logits or None) per image, cached; SSL: ()
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    info: dict
    started: float
    val_set: Optional[SegmentationDataset] = None

    student = property(lambda self: self.modules["student"])
    align = property(lambda self: self.modules.get("align"))
    wrapper = property(lambda self: self.modules.get("wrapper"))

    @property
    def n_batches(self) -> int:
        return max(1, len(self.images) // self.run.profile.distill.batch_size)

    @property
    def loop(self) -> dict:
        return {"modules": self.modules, "optimizer": self.optimizer, "epochs": self.run.profile.distill.epochs,
                "seed": self.run.seed_for("pretrain", self.method), "scheduler": self.scheduler, "scaler": self.scaler}

    def train(self) -> None:
        for m in self.modules.values():
            m.train()

    def autocast(self):
        """bfloat16 autocast where the CPU has bf16 instructions and the profile asks for it, else a no-op."""
        return autocast(self.run.device, cpu_dtype=compute_dtype(self.run.device, self.run.profile.student.cpu_dtype))

    def batches(self):
        """One shuffled pass (full batches): the images on the device, then the KD targets of the same images."""
        n, bs, device = len(self.images), self.run.profile.distill.batch_size, self.run.device
        order = torch.randperm(n)
        for idx in [order[i:i + bs] for i in range(0, n - bs + 1, bs)] or [order]:
            yield (self.images[idx].to(device),) + tuple(None if t is None else t[idx].to(device) for t in self.targets)

    def validate(self) -> dict:
        """TS-KD: the student's validation Dice straight after distillation (what the teacher alone taught it)."""
        if self.method not in ("ts_kd", "ts_kd_nosyn"):
            return {}
        if self.val_set is None:
            self.val_set = SegmentationDataset(self.run.info, self.run.splits["val"], self.run.profile.data.image_size)
        return {"val_dice": student_val_dice(self.student, self.val_set, self.run.device,
                                     self.run.profile.finetune.batch_size)}

    def finish(self) -> dict:
        hist = self.stage.history
        info = dict(self.info)
        info.update(method=self.method, transfer_set=len(self.images), final_loss=hist[-1]["loss"] if hist else None,
                    pretrain_seconds=round(sum(r["seconds"] for r in hist) + time.perf_counter() - self.started, 2))
        if hist and "val_dice" in hist[-1]:
            info["val_dice_after_pretrain"] = hist[-1]["val_dice"]
        if self.method in ("ts_kd", "ts_kd_nosyn"):
            info["lost_classes"] = check_classes(self.run, self.method, self.student)["lost"]
        return info


def pretraining(run: Run, method: str, force: bool = False, loss_fn: Optional[Callable] = None) -> Pretraining:
    """Set up ``method``'s pretraining of a fresh student (data, targets, optimizer, schedule, resumable stage).

    KD methods: the transfer images with the selected teacher's cached embedding, **standardized per channel**
    over the transfer set (:func:`standardized`), and its class logits (``ta_kd``: the pretrained encoder's
    embedding and no logits). ``loss_fn`` is the KD objective the loop will use (``losses.kd_loss``'s signature);
    its source is part of the stage's inputs, so editing it retrains. None: any finished pretraining will do.
    """
    check_methods([method])
    if method in NO_PRETRAINING:
        raise ValueError(f"{method} has no pretraining stage")
    d, size, started = run.profile.distill, run.profile.data.image_size, time.perf_counter()
    student = new_student(run)
    if method in KD_METHODS:
        tg = teacher_targets(run, synthetic=method != "ts_kd_nosyn", kinds=("ta",) if method == "ta_kd" else ("ts",))
        targets = (standardized(tg["emb_ta"] if method == "ta_kd" else tg["emb_ts"]),
                   None if method == "ta_kd" else tg["logits_ts"])
        with seeded(run.seed_for("pretrain", method, "align")):
            extras = {"align": FeatureAlign(student.embed_dim, targets[0].shape[1]).to(run.device)}
        images, flags = tg["images"], tg["synthetic"]
        # the standardization is part of the targets the student sees: changing it retrains the stage
        digest = {"targets": tg["digest"], "target transform": source_digest(standardized),
                  "loss": source_digest(loss_fn or kd_loss)}
    else:
        names, paths, flags = transfer_set(run, synthetic=True)
        images, targets = np.stack([letterbox(read_image(p), size) for p in paths]), ()
        with seeded(run.seed_for("pretrain", method, "wrapper")):
            extras = {"wrapper": (build_mim(student, d.mae_mask_ratio, d.mae_decoder_dim, d.mae_decoder_depth)
                                  if method == "mae" else
                                  MoCoV3(student, d.moco_dim, d.moco_hidden, d.moco_temperature)).to(run.device)}
        digest = {"transfer set": value_digest([names, _synthetic_digest(run)])}
    inputs = {**digest, **run.settings("distill", "student"), "image_size": size, "seed": run.seed}
    stage = Stage(method_dir(run, method) / "pretrain", inputs, desc=f"{method}: pretraining on {len(images)} images",
                  force=force, ignore=("loss",) if loss_fn is None else ())
    modules = {"student": student, **extras}
    params = list({id(p): p for m in modules.values() for p in m.parameters() if p.requires_grad}.values())
    opt = torch.optim.AdamW(params, lr=d.lr, weight_decay=d.weight_decay)
    n_batches = max(1, len(images) // d.batch_size)
    sched = warmup_cosine(opt, d.warmup_epochs * n_batches, d.epochs * n_batches)
    return Pretraining(run, method, stage, modules, torch.from_numpy(images).float().div_(255.0)[:, None], targets,
                       opt, sched, grad_scaler(run.device), {"synthetic": int(sum(flags))}, started)


def ssl_loss(p: Pretraining, x: torch.Tensor) -> torch.Tensor:
    """MAE: reconstruct masked patches of a flipped, jittered image; MoCo v3: contrast two augmented views."""
    if p.method == "mae":
        return p.wrapper(flip_photometric(x, flip=p.run.profile.distill.flip)[0])[0]
    return p.wrapper(two_views(x, x.shape[-1]), two_views(x, x.shape[-1]))


def pretrain(run: Run, method: str, force: bool = False, loss_fn: Optional[Callable] = None) -> dict:
    """Pretrain a fresh student on the transfer set with ``method`` (the loop notebook 04 writes out; MAE and MoCo v3
    with :func:`ssl_loss`); returns timing/loss info. ``loss_fn``: the KD objective (default ``losses.kd_loss``).
    The result is ``students/<method>/pretrain/final.safetensors`` (student + the method's extras)."""
    check_methods([method])
    if method in NO_PRETRAINING:
        return {"method": method, "pretrain_seconds": 0.0}
    p, d = pretraining(run, method, force, loss_fn), run.profile.distill
    kd = loss_fn or kd_loss
    for epoch in p.stage.epochs(**p.loop):
        p.train()
        sums: dict = {}
        for k, (x, *targets) in enumerate(p.batches()):
            with p.autocast():
                if method in KD_METHODS:
                    x, emb, logits = flip_photometric(x, *targets, flip=d.flip)  # the same flip on the targets
                    loss, parts = kd(p.student, p.align, x, emb, logits, d.feature_weight, d.output_weight,
                                     d.temperature)
                else:
                    loss, parts = ssl_loss(p, x), {}
            optimizer_step(loss, p.optimizer, p.scaler, p.scheduler)
            if method == "mocov3":  # momentum rises from moco_momentum to 1 (cosine), as in MoCo v3
                progress = (epoch.index * p.n_batches + k) / max(1, d.epochs * p.n_batches)
                p.wrapper.update_momentum(1 - (1 - d.moco_momentum) * (np.cos(np.pi * progress) + 1) / 2)
            for key, v in {"loss": loss.item(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + v
        epoch.log(**{key: v / p.n_batches for key, v in sums.items()}, **p.validate())
    return p.finish()


# ------------------------------------------------------------------------ no class may be lost


class LostClassError(RuntimeError):
    """After distillation the student never predicts a class that the teacher finds on validation."""


def check_classes(run: Run, method: str, student: Optional[nn.Module] = None) -> dict:
    """Per class on the validation images, after ``method``'s distillation (before any label): in how many images
    the teacher finds the class, in how many the student predicts it, and the student's Dice against the teacher's
    labels and against the ground truth. A class the teacher finds and the student never predicts is *lost*:
    printed loudly, and with ``distill.lost_class="error"`` (the default) a :class:`LostClassError` stops the
    stage; ``"warn"`` only prints. Written to ``students/<method>/pretrain/class_check.json``."""
    if student is None:
        student = new_student(run).eval()
        load_weights(method_dir(run, method) / "pretrain" / "final.safetensors", {"student": student})
    classes, size_s = run.info.classes, run.profile.data.image_size
    cases = run.splits["val"]
    raw = [read_image(run.info.case(c).image) for c in cases]
    masks = torch.from_numpy(np.stack([letterbox(read_mask(run.info.case(c).mask), size_s, is_mask=True)
                                       for c in cases])).long()
    t_labels = teacher_val_labels(run)
    student.eval()
    with torch.inference_mode():
        x = images_to_tensor(np.stack([letterbox(im, size_s) for im in raw]), run.device)
        s_labels = torch.cat([student(x[i:i + 8]).float().argmax(1).cpu() for i in range(0, len(x), 8)])
    rows = []
    for k in range(1, len(classes)):
        t_in, s_in = (t_labels == k).flatten(1).any(1), (s_labels == k).flatten(1).any(1)
        rows.append({"class": classes[k], "teacher_images": int(t_in.sum()), "student_images": int(s_in.sum()),
                     "dice_vs_teacher": _dice(s_labels == k, t_labels == k), "dice_vs_truth": _dice(s_labels == k,
                                                                                                 masks == k)})
    lost = [r["class"] for r in rows if r["teacher_images"] > 0 and r["student_images"] == 0]
    result = {"method": method, "n_val": len(cases), "classes": rows, "lost": lost}
    write_json(method_dir(run, method) / "pretrain" / "class_check.json", result)
    table = "\n".join(f"  {r['class']:>16}: teacher finds it in {r['teacher_images']}/{len(cases)} validation images, "
                      f"the student in {r['student_images']}; Dice vs teacher {r['dice_vs_teacher']:.3f}, vs truth "
                      f"{r['dice_vs_truth']:.3f}" for r in rows)
    print(f"{method}: per class on validation after distillation\n{table}")
    if lost:
        message = (f"{method}: after distillation the student never predicts {', '.join(lost)} on the "
                   f"{len(cases)} validation images, where the teacher finds it: distillation lost the class. "
                   f"Fine-tuning on a few labels rarely brings a lost class back. Try more distillation epochs "
                   f"(distill.epochs) or a larger output weight (distill.output_weight); set "
                   f"distill.lost_class='warn' to go on anyway. Details: "
                   f"{method_dir(run, method) / 'pretrain' / 'class_check.json'}")
        print("!" * 100 + "\n" + message + "\n" + "!" * 100)
        if run.profile.distill.lost_class == "error":
            raise LostClassError(message)
    return result


def teacher_val_labels(run: Run) -> torch.Tensor:
    """The selected teacher's labels of the validation images at the student's size (N, S, S), computed once and
    cached beside the teacher targets (``cache/targets/val_labels.safetensors``, keyed by the teacher's weights)."""
    from safetensors.torch import load_file


    cases, size_s = run.splits["val"], run.profile.data.image_size
    key = value_digest([teacher_digest(run), cases, size_s, run_prefix_dtype(run)])
    path = run.cache_dir / "targets" / "val_labels.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            if (fh.metadata() or {}).get("key") == key:
                return load_file(str(path))["labels"].long()
    teacher = load_teacher(run, "selected")
    raw = [read_image(run.info.case(c).image) for c in cases]
    boxed, valid = teacher_inputs(raw, run.profile.teacher.input_size)
    prefix = teacher_prefix(run, teacher.encoder, cases, boxed, valid)
    logits = torch.cat(run_suffix(lambda h: teacher.from_prefix(h)[1], prefix, run.device))
    labels = F.interpolate(logits, size=(size_s, size_s), mode="area").argmax(1).to(torch.uint8)
    save_safetensors(path, {"labels": labels.contiguous()}, metadata={"key": key})
    return labels.long()


def _dice(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """Dice of two boolean stacks pooled over all their pixels (1 when both are empty)."""
    inter, total = float((pred & ref).sum()), float(pred.sum() + ref.sum())
    return 1.0 if total == 0 else 2 * inter / total


# -------------------------------------------------------------------------------- fine-tuning


def student_val_dice(model: nn.Module, ds: SegmentationDataset, device: str, batch_size: int) -> float:
    """:func:`tskd_utils.metrics.validation_dice` of a student on a (not augmented) dataset."""
    model.eval()
    masks = torch.from_numpy(np.stack(ds.masks)).long()  # what ds[i]["mask"] is without augmentation
    return validation_dice(lambda idx: model(torch.stack([ds[i]["image"] for i in idx]).to(device)), masks,
                           ds.info.n_classes, batch_size)


def finetune(run: Run, method: str, force: bool = False) -> dict:
    """Fine-tune the pretrained student on the n_labeled cases (Dice + CE); keep the best by val Dice.

    ``scratch`` starts from the student's initial weights; ``unet_supervised`` trains the practitioner's U-Net
    from scratch with its own budget (``profile.supervised``) instead of the students' (``profile.finetune``)."""
    check_methods([method])
    prof, device = run.profile, run.device
    f = prof.supervised if method == SUPERVISED else prof.finetune
    student = new_student(run, method=method)
    pre = method_dir(run, method) / "pretrain" / "final.safetensors"
    if method not in NO_PRETRAINING:
        if not pre.is_file():
            raise FileNotFoundError(f"{pre} is missing: pretrain {method!r} first (tskd_utils.distill.pretrain)")
        load_weights(pre, {"student": student})
    model_settings = run.settings("supervised") if method == SUPERVISED else run.settings("finetune", "student")
    inputs = {"pretrained": file_digest(pre) if method not in NO_PRETRAINING else "none", "split": run.split_digest(
        "labeled", "val"), **model_settings, "image_size": prof.data.image_size,
        "seed": run.seed, "loss": source_digest(segmentation_loss)}
    train_ds = SegmentationDataset(run.info, run.splits["labeled"], prof.data.image_size, train=True,
                                   augment=f.augment, seed=run.seed)
    stage = Stage(method_dir(run, method) / "finetune", inputs, force=force,
                  desc=f"{method}: {'training' if method == SUPERVISED else 'fine-tuning'} on {len(train_ds)} labeled")
    val_ds = SegmentationDataset(run.info, run.splits["val"], prof.data.image_size)
    dl = loader(train_ds, f.batch_size, shuffle=True, num_workers=prof.data.num_workers,
                drop_last=len(train_ds) > f.batch_size, steps=f.steps_per_epoch)
    opt = torch.optim.AdamW(student.parameters(), lr=f.lr, weight_decay=f.weight_decay)
    sched = warmup_cosine(opt, f.warmup_epochs * max(1, len(dl)), f.epochs * max(1, len(dl)))
    scaler = grad_scaler(device)
    dtype = compute_dtype(device, prof.student.cpu_dtype)

    def epoch_fn(epoch: int) -> dict:
        student.train()
        train_ds.set_epoch(epoch)
        total, count = 0.0, 0
        for batch in dl:
            with autocast(device, cpu_dtype=dtype):
                loss = segmentation_loss(student(batch["image"].to(device)), batch["mask"].to(device))
            optimizer_step(loss, opt, scaler, sched)
            total, count = total + loss.item() * len(batch["index"]), count + len(batch["index"])
        return {"loss": total / max(count, 1)}

    hist = stage.train({"student": student}, opt, f.epochs, epoch_fn,
                       lambda: {"val_dice": student_val_dice(student, val_ds, device, f.batch_size)},
                       seed=run.seed_for("finetune", method), scheduler=sched, scaler=scaler, monitor="val_dice")
    arch = "monai_unet" if method == SUPERVISED else prof.student.name
    save_weights(method_dir(run, method) / "student.safetensors", {"student": student},
                 {"method": method, "student": arch, "classes": json.dumps(run.info.classes)})
    return {"method": method, "finetune_seconds": round(sum(r["seconds"] for r in hist), 2),
            "best_val_dice": max(r["val_dice"] for r in hist), "epochs": f.epochs,
            "steps": f.epochs * max(1, len(dl)), "compute_dtype": dtype}


def run_method(run: Run, method: str, force: bool = False, loss_fn: Optional[Callable] = None) -> dict:
    """Pretrain (if the method has a pretraining stage) and fine-tune; results in students/<method>/."""
    info = pretrain(run, method, force=force, loss_fn=loss_fn)
    info.update(finetune(run, method, force=force))
    write_json(method_dir(run, method) / "metrics.json", info)
    return info


def run_methods(run: Run, methods=None, force: bool = False, loss_fn: Optional[Callable] = None) -> list[dict]:
    return [run_method(run, m, force=force, loss_fn=loss_fn) for m in check_methods(methods)]


def embedding_pictures(run: Run, cases: Sequence[str], method: str = "ts_kd") -> dict:
    """PCA pictures of the teacher embedding and of the student's features before (random init) and
    after pretraining with ``method``, for a few cases (each map's own 3 principal components)."""
    size_t, size_s = run.profile.teacher.input_size, run.profile.data.image_size
    raw = [read_image(run.info.case(c).image) for c in cases]
    boxed, valid = teacher_inputs(raw, size_t)
    ts = load_teacher(run, "selected")
    before, after = new_student(run).eval(), new_student(run).eval()
    load_weights(method_dir(run, method) / "pretrain" / "final.safetensors", {"student": after})
    x = images_to_tensor(np.stack([letterbox(im, size_s) for im in raw]), run.device)
    with torch.inference_mode():
        emb = ts.encoder(images_to_tensor(np.stack(boxed), run.device), valid_tensor(valid, run.device))
        fb, fa = before.features(x), after.features(x)
    return {"image": [letterbox(im, size_s) for im in raw],
            "teacher embedding": [pca_rgb(e.float().cpu().numpy()) for e in emb],
            "student before": [pca_rgb(f.float().cpu().numpy()) for f in fb],
            "student after": [pca_rgb(f.float().cpu().numpy()) for f in fa]}
