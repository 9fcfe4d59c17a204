"""Stage 4: pretrain the student on the transfer set (TS-KD and the baselines), then fine-tune it.

Methods (method.md): ``scratch``, ``ta_kd``, ``ts_kd``, ``ts_kd_nosyn``, ``mae``, ``mocov3``. Every
method uses the same student architecture and initial weights, the same transfer set (real train
images + synthetic ones; ``ts_kd_nosyn`` drops the synthetic ones) and the same fine-tuning.

Teacher targets are computed once per transfer image and cached in ``<run>/cache/targets/``
(fp16 safetensors): the fine-tuned teacher's embedding and class logits (``ts``), and the
pretrained encoder's embedding (``ta``). Student epochs read the cache; the teacher never runs
inside them. Teacher logits are computed at the teacher's input size and area-averaged to the
student's grid (the two share the letterbox frame, so this is a plain downscale); logits rather
than probabilities are stored so that the temperature can be applied at training time.

Augmentation on the distillation path is a horizontal flip applied identically to the image and
its targets, plus photometric changes (brightness, contrast, noise) of the image only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import SegmentationDataset, letterbox, loader
from .io import read_image, read_json, sha256sum, write_json
from .metrics import mean_foreground_dice
from .models import Student, build_student
from .pretrain import MAE, MoCoV3
from .run import METHODS, Run, check_methods
from .teacher import FeatureCache, _loss_fn, load_teacher, teacher_prefix
from .training import Stage, autocast, grad_scaler, load_weights, save_weights, warmup_cosine

KD_METHODS = ("ts_kd", "ts_kd_nosyn", "ta_kd")


# ------------------------------------------------------------------------------ transfer set


def transfer_set(run: Run, synthetic: bool = True) -> tuple[list[str], list[Path], list[bool]]:
    """(names, image paths, is_synthetic) of the transfer set: all train images (+ synthetic ones)."""
    names, paths, flags = [], [], []
    for case in run.splits["train"]:
        names.append(case)
        paths.append(run.info.case(case).image)
        flags.append(False)
    if synthetic:
        from .synthesis import synthetic_paths

        for p in synthetic_paths(run):
            names.append(p.stem)
            paths.append(p)
            flags.append(True)
    return names, paths, flags


# ---------------------------------------------------------------------------- teacher targets


def _teacher_fingerprint(run: Run) -> str:
    files = [run.teacher_dir / "head.safetensors", run.teacher_dir / "adapter" / "adapter_model.safetensors"]
    return "-".join(sha256sum(f)[:12] for f in files if f.is_file())


def teacher_targets(run: Run, synthetic: bool = True, kinds: Sequence[str] = ("ts", "ta"),
                    batch_size: int = 4) -> dict:
    """Load (computing what is missing) the cached teacher targets of the transfer set.

    Returns ``{"names", "images" (uint8 at the student size), "emb_ts", "logits_ts", "emb_ta"}``
    with one fp16 tensor stack per kind asked for.
    """
    size_t, size_s = run.profile.teacher.input_size, run.profile.data.image_size
    names, paths, flags = transfer_set(run, synthetic)
    raw = [read_image(p) for p in paths]
    images_t = [letterbox(im, size_t) for im in raw]
    out_dir = run.cache_dir / "targets"
    meta_path = out_dir / "meta.json"
    fingerprint = {"teacher": _teacher_fingerprint(run), "teacher_size": size_t, "student_size": size_s}
    if meta_path.is_file() and read_json(meta_path) != fingerprint:
        print(f"the teacher changed since {out_dir} was filled: recomputing its targets")
        for f in out_dir.glob("*.safetensors"):
            f.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(meta_path, fingerprint)
    keys = [FeatureCache.key(n, im) for n, im in zip(names, images_t)]
    todo = [i for i, k in enumerate(keys) if not (out_dir / f"{k}.safetensors").is_file()]
    if todo:
        device = run.device
        ts_model = load_teacher(run, "lora", device)
        ta_model = load_teacher(run, "pretrained", device)
        t0 = time.perf_counter()
        for synth in (False, True):
            idx = [i for i in todo if flags[i] == synth]
            if not idx:
                continue
            prefix = teacher_prefix(run, ts_model.encoder, [names[i] for i in idx], [images_t[i] for i in idx],
                                    synthetic=synth)
            with torch.inference_mode():
                for start in tqdm(range(0, len(idx), batch_size), desc="teacher targets", dynamic_ncols=True):
                    chunk = idx[start:start + batch_size]
                    h = torch.stack(prefix[start:start + batch_size]).float().to(device)
                    emb_ts, logits = ts_model.from_prefix(h)
                    logits = F.interpolate(logits.float(), size=(size_s, size_s), mode="area")
                    emb_ta = ta_model.encoder.suffix(h)
                    for j, i in enumerate(chunk):
                        tmp = out_dir / f".{keys[i]}.tmp"
                        save_file({"emb_ts": emb_ts[j].half().cpu().contiguous(),
                                   "logits_ts": logits[j].half().cpu().contiguous(),
                                   "emb_ta": emb_ta[j].half().cpu().contiguous()}, str(tmp))
                        tmp.replace(out_dir / f"{keys[i]}.safetensors")
        print(f"teacher targets for {len(todo)} images in {time.perf_counter() - t0:.1f} s -> {out_dir}")
    wanted = {"ts": ("emb_ts", "logits_ts"), "ta": ("emb_ta",)}
    fields = [f for k in kinds for f in wanted[k]]
    stacks: dict = {f: [] for f in fields}
    for k in keys:
        d = load_file(str(out_dir / f"{k}.safetensors"))
        for f in fields:
            stacks[f].append(d[f])
    result = {f: torch.stack(v) for f, v in stacks.items()}
    result["names"] = names
    result["synthetic"] = flags
    result["images"] = np.stack([letterbox(im, size_s) for im in raw])
    return result


# ------------------------------------------------------------------------------- augmentation


def flip_photometric(x: torch.Tensor, *targets: torch.Tensor, flip: bool = True) -> tuple:
    """Random horizontal flip of images (B,1,H,W) and targets (B,C,h,w) together, then photometric
    jitter of the images only (brightness +-0.1, contrast x0.8-1.2, Gaussian noise sd <= 0.03)."""
    b = x.shape[0]
    if flip:
        f = torch.rand(b) < 0.5
        x = torch.where(f.view(b, 1, 1, 1).to(x.device), x.flip(-1), x)
        targets = tuple(torch.where(f.view(b, 1, 1, 1).to(t.device), t.flip(-1), t) for t in targets)
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
    v = torch.cat(views)
    return flip_photometric(v)[0]


# ------------------------------------------------------------------------------ pretraining


class FeatureAlign(nn.Module):
    """Student features (B, Cs, gs, gs) -> teacher embedding space (B, Ct, gt, gt): 1x1 conv, then
    bilinear resize to the teacher's grid."""

    def __init__(self, c_student: int, c_teacher: int, grid_teacher: int):
        super().__init__()
        self.proj = nn.Conv2d(c_student, c_teacher, 1)
        self.grid = grid_teacher

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        f = self.proj(f)
        if f.shape[-1] != self.grid:
            f = F.interpolate(f, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return f


def kd_loss(student: Student, align: FeatureAlign, x: torch.Tensor, emb: torch.Tensor,
            logits_t: Optional[torch.Tensor], feature_weight: float, output_weight: float,
            temperature: float) -> tuple[torch.Tensor, dict]:
    """Feature MSE (+ temperature-scaled KL between per-pixel class distributions)."""
    feats, logits_s = student.forward_with_features(x)
    feat = F.mse_loss(align(feats), emb.float())
    parts = {"feature_loss": feat.item()}
    loss = feature_weight * feat
    if logits_t is not None:
        T = temperature
        log_p_s = F.log_softmax(logits_s / T, dim=1)
        p_t = F.softmax(logits_t.float() / T, dim=1)
        kl = F.kl_div(log_p_s, p_t, reduction="none").sum(1).mean() * T * T
        parts["output_loss"] = kl.item()
        loss = loss + output_weight * kl
    return loss, parts


def new_student(run: Run) -> Student:
    s = run.profile.student
    return build_student(s.name, run.profile.data.image_size, run.info.n_classes, s.decoder_channels,
                         seed=run.seed).to(run.device)


def method_dir(run: Run, method: str) -> Path:
    return run.students_dir / method


def pretrain(run: Run, method: str, force: bool = False) -> dict:
    """Pretrain a fresh student on the transfer set with ``method``; returns timing/loss info.

    The result is ``students/<method>/pretrain/final.safetensors`` (student + the method's extras).
    """
    check_methods([method])
    prof, d = run.profile, run.profile.distill
    device, student = run.device, new_student(run)
    out = method_dir(run, method) / "pretrain"
    if method == "scratch":
        return {"method": method, "pretrain_seconds": 0.0}
    t_start = time.perf_counter()
    synthetic = method not in ("ts_kd_nosyn",)
    if method in KD_METHODS:
        tg = teacher_targets(run, synthetic=synthetic, kinds=("ts",) if method != "ta_kd" else ("ta",))
        emb = tg["emb_ts"] if method != "ta_kd" else tg["emb_ta"]
        logits_t = tg.get("logits_ts") if method != "ta_kd" else None
        align = FeatureAlign(student.embed_dim, emb.shape[1], emb.shape[-1]).to(device)
        extras = {"align": align}
    else:
        names, paths, _ = transfer_set(run, synthetic)
        tg = {"images": np.stack([letterbox(read_image(p), prof.data.image_size) for p in paths]), "names": names}
        wrapper = MAE(student, d.mae_mask_ratio, d.mae_decoder_dim, d.mae_decoder_depth) if method == "mae" \
            else MoCoV3(student, d.moco_dim, d.moco_hidden, d.moco_temperature)
        wrapper.to(device)
        extras = {"wrapper": wrapper}
    images = torch.from_numpy(tg["images"]).float().div_(255.0)[:, None]
    n = len(images)
    setup_seconds = time.perf_counter() - t_start
    modules = {"student": student, **extras}
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    params = list({id(p): p for p in params}.values())
    steps = max(1, n // d.batch_size) if n >= d.batch_size else 1
    opt = torch.optim.AdamW(params, lr=d.lr, weight_decay=d.weight_decay)
    sched = warmup_cosine(opt, d.warmup_epochs * steps, d.epochs * steps)
    scaler = grad_scaler(device)

    def epoch_fn(epoch: int) -> dict:
        for m in modules.values():
            m.train()
        order = torch.randperm(n)
        batches = [order[i:i + d.batch_size] for i in range(0, n - d.batch_size + 1, d.batch_size)] or [order]
        sums: dict = {}
        for k, idx in enumerate(batches):
            x = images[idx].to(device)
            with autocast(device):
                if method in KD_METHODS:
                    targets = (emb[idx].to(device),) + ((logits_t[idx].to(device),) if logits_t is not None else ())
                    x, *targets = flip_photometric(x, *targets, flip=d.flip)
                    loss, parts = kd_loss(student, align, x, targets[0], targets[1] if len(targets) > 1 else None,
                                          d.feature_weight, d.output_weight, d.temperature)
                elif method == "mae":
                    x = flip_photometric(x, flip=d.flip)[0]
                    loss = wrapper(x)[0]
                    parts = {}
                else:  # mocov3
                    loss = wrapper(two_views(x, x.shape[-1]), two_views(x, x.shape[-1]))
                    parts = {}
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            if method == "mocov3":  # momentum rises from moco_momentum to 1 (cosine), as in MoCo v3
                progress = (epoch * len(batches) + k) / max(1, d.epochs * len(batches))
                wrapper.update_momentum(1 - (1 - d.moco_momentum) * (np.cos(np.pi * progress) + 1) / 2)
            for key, v in {"loss": loss.item(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + v
        return {k: v / len(batches) for k, v in sums.items()}

    validate = None
    if method in ("ts_kd", "ts_kd_nosyn"):  # the decoder learned the teacher's outputs: score it as is
        val_ds = SegmentationDataset(run.info, run.splits["val"], prof.data.image_size)

        def validate():
            return {"val_dice": val_dice(student, val_ds, device, prof.finetune.batch_size)}

    stage = Stage(out, modules, opt, d.epochs, seed=run.seed, scheduler=sched, scaler=scaler,
                  desc=f"{method}: pretraining on {n} images", force=force)
    hist = stage.run(epoch_fn, validate)
    info = {"method": method, "transfer_set": n, "synthetic": int(sum(tg.get("synthetic", [False] * n))) if
            method in KD_METHODS else None, "pretrain_seconds": round(sum(r["seconds"] for r in hist) + setup_seconds, 2),
            "final_loss": hist[-1]["loss"] if hist else None}
    if validate is not None and hist:
        info["val_dice_after_pretrain"] = hist[-1]["val_dice"]
    return info


# -------------------------------------------------------------------------------- fine-tuning


def val_dice(model: nn.Module, ds: SegmentationDataset, device: str, batch_size: int) -> float:
    model.eval()
    scores = []
    with torch.inference_mode():
        for batch in loader(ds, batch_size, shuffle=False):
            pred = model(batch["image"].to(device)).argmax(1).cpu()
            scores.append(mean_foreground_dice(pred, batch["mask"], ds.info.n_classes))
    return float(torch.cat(scores).mean())


def finetune(run: Run, method: str, force: bool = False) -> dict:
    """Fine-tune the pretrained student on the n_labeled cases (Dice + CE); keep the best by val Dice."""
    check_methods([method])
    prof, f = run.profile, run.profile.finetune
    device = run.device
    student = new_student(run)
    if method != "scratch":
        pre = method_dir(run, method) / "pretrain" / "final.safetensors"
        if not pre.is_file():
            raise FileNotFoundError(f"{pre} is missing: pretrain {method!r} first (tskd_utils.distill.pretrain)")
        load_weights(pre, {"student": student})
    train_ds = SegmentationDataset(run.info, run.splits["labeled"], prof.data.image_size, train=True,
                                   augment=f.augment, seed=run.seed)
    val_ds = SegmentationDataset(run.info, run.splits["val"], prof.data.image_size)
    dl = loader(train_ds, f.batch_size, shuffle=True, num_workers=prof.data.num_workers,
                drop_last=len(train_ds) > f.batch_size, steps=f.steps_per_epoch)
    steps = max(1, len(dl))
    opt = torch.optim.AdamW(student.parameters(), lr=f.lr, weight_decay=f.weight_decay)
    sched = warmup_cosine(opt, f.warmup_epochs * steps, f.epochs * steps)
    scaler = grad_scaler(device)
    loss_fn = _loss_fn()

    def epoch_fn(epoch: int) -> dict:
        student.train()
        train_ds.set_epoch(epoch)
        total, count = 0.0, 0
        for batch in dl:
            with autocast(device):
                logits = student(batch["image"].to(device))
                loss = loss_fn(logits.float(), batch["mask"][:, None].to(device))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += loss.item() * len(batch["index"])
            count += len(batch["index"])
        return {"loss": total / max(count, 1)}

    stage = Stage(method_dir(run, method) / "finetune", {"student": student}, opt, f.epochs, seed=run.seed,
                  scheduler=sched, scaler=scaler, monitor="val_dice", desc=f"{method}: fine-tuning on "
                  f"{len(train_ds)} labeled", force=force)
    hist = stage.run(epoch_fn, lambda: {"val_dice": val_dice(student, val_ds, device, f.batch_size)})
    save_weights(method_dir(run, method) / "student.safetensors", {"student": student},
                 {"method": method, "student": prof.student.name})
    return {"method": method, "finetune_seconds": round(sum(r["seconds"] for r in hist), 2),
            "best_val_dice": max(r["val_dice"] for r in hist), "epochs": f.epochs}


def run_method(run: Run, method: str, force: bool = False) -> dict:
    """Pretrain (if the method has a pretraining stage) and fine-tune; results in students/<method>/."""
    info = pretrain(run, method, force=force)
    info.update(finetune(run, method, force=force))
    write_json(method_dir(run, method) / "metrics.json", info)
    return info


def run_methods(run: Run, methods=None, force: bool = False) -> list[dict]:
    methods = check_methods(methods)
    return [run_method(run, m, force=force) for m in methods]


def load_student(run: Run, method: str, device: Optional[str] = None) -> Student:
    """The fine-tuned student of ``method`` (best validation checkpoint), in eval mode."""
    check_methods([method])
    path = method_dir(run, method) / "student.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run notebook 04 (tskd_utils.distill.run_method) for {method!r}")
    student = new_student(run)
    load_weights(path, {"student": student})
    return student.to(device or run.device).eval()




def embedding_pictures(run: Run, cases: Sequence[str], method: str = "ts_kd") -> dict:
    """PCA pictures of the teacher embedding and of the student's features before (random init) and
    after pretraining with ``method``, for a few cases (each map's own 3 principal components)."""
    from .teacher import images_to_tensor
    from .viz import pca_rgb

    size_t, size_s = run.profile.teacher.input_size, run.profile.data.image_size
    raw = [read_image(run.info.case(c).image) for c in cases]
    ts = load_teacher(run, "lora")
    before = new_student(run).eval()
    after = new_student(run).eval()
    load_weights(method_dir(run, method) / "pretrain" / "final.safetensors", {"student": after})
    rows = {"image": [letterbox(im, size_s) for im in raw], "teacher embedding": [], "student before": [],
            "student after": []}
    with torch.inference_mode():
        emb = ts.encoder(images_to_tensor(np.stack([letterbox(im, size_t) for im in raw]), run.device))
        x = images_to_tensor(np.stack([letterbox(im, size_s) for im in raw]), run.device)
        fb, fa = before.features(x), after.features(x)
    for i in range(len(cases)):
        rows["teacher embedding"].append(pca_rgb(emb[i].float().cpu().numpy()))
        rows["student before"].append(pca_rgb(fb[i].float().cpu().numpy()))
        rows["student after"].append(pca_rgb(fa[i].float().cpu().numpy()))
    return rows
