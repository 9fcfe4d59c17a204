"""Stage 2: the task-specific teacher (pretrained encoder + LoRA adapters + segmentation head).

Two teachers are trained on the n_labeled cases with the same head, loss and schedule:

* ``frozen``: the pretrained encoder untouched, only the head learns (the baseline);
* ``lora``: peft LoRA adapters on the encoder's attention (and optionally MLP) projections + head.

Cost on a CPU is dominated by the encoder. When ``teacher.cache_prefix`` is set, the frozen
stages before the first adapted one are computed once per image (BatchNorm folded, channels-last)
and cached on disk, shared by every run of the same dataset; the frozen baseline trains on cached
embeddings. No augmentation is possible on that path (the cache holds the unaugmented image);
profiles for GPUs run the whole encoder with augmentation instead.

Outputs in ``<run>/teacher/``: ``adapter/`` (peft ``save_pretrained``), ``head.safetensors``,
``frozen_head.safetensors``, ``metrics.json``, and the stage folders ``lora/`` and ``frozen/`` with
per-epoch checkpoints and logs.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import SegmentationDataset, loader
from .io import read_json, write_json
from .metrics import mean_foreground_dice
from .models import TeacherEncoder, TeacherSegmenter, bn_eval, build_head, build_teacher, freeze
from .run import Run
from .training import (StateOf, Stage, autocast, count_parameters, grad_scaler, load_weights, save_weights,
                       warmup_cosine)

# ------------------------------------------------------------------------ prefix feature cache


class FeatureCache:
    """One safetensors file per image, keyed by name + a hash of the pixels, filled on demand.

    Computing is resumable: an interrupted fill keeps the files already written.
    """

    def __init__(self, directory: Path, dtype: torch.dtype = torch.float16):
        self.dir, self.dtype = Path(directory), dtype

    @staticmethod
    def key(name: str, image: np.ndarray) -> str:
        return f"{name}-{hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()[:12]}"

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def get_many(self, names: Sequence[str], images: Sequence[np.ndarray], compute, batch_size: int = 1,
                 desc: str = "features") -> list[torch.Tensor]:
        """``compute(uint8 images (B, S, S)) -> (B, ...)`` float tensor; returns one tensor per image."""
        keys = [self.key(n, im) for n, im in zip(names, images)]
        todo = [i for i, k in enumerate(keys) if not self.path(k).is_file()]
        if todo:
            self.dir.mkdir(parents=True, exist_ok=True)
            for start in tqdm(range(0, len(todo), batch_size), desc=desc, unit="batch" if batch_size > 1 else "img",
                              total=(len(todo) + batch_size - 1) // batch_size, dynamic_ncols=True):
                idx = todo[start:start + batch_size]
                feats = compute(np.stack([images[i] for i in idx]))
                for i, f in zip(idx, feats):
                    f16 = f.to(self.dtype)
                    if not torch.isfinite(f16).all():  # outside fp16 range: keep full precision
                        f16 = f.float()
                    tmp = self.dir / f".{keys[i]}.tmp"
                    save_file({"x": f16.contiguous().cpu()}, str(tmp))
                    tmp.replace(self.path(keys[i]))
        return [load_file(str(self.path(k)))["x"] for k in keys]


def images_to_tensor(images: np.ndarray, device: str) -> torch.Tensor:
    """uint8 (B, S, S) -> float (B, 1, S, S) in [0, 1]."""
    return torch.from_numpy(np.asarray(images)).float().div_(255.0)[:, None].to(device)


def prefix_cache(run: Run, encoder: TeacherEncoder) -> FeatureCache:
    t = run.profile.teacher
    return FeatureCache(run.shared_cache_dir / f"{encoder.name}-{t.input_size}-prefix{encoder.suffix_start}")


def compute_prefix(encoder: TeacherEncoder, device: str):
    """A ``compute`` function for :class:`FeatureCache` running the frozen prefix."""

    @torch.inference_mode()
    def compute(images: np.ndarray) -> torch.Tensor:
        x = encoder.preprocess(images_to_tensor(images, device))
        return encoder.prefix(x).float().cpu()

    return compute


# -------------------------------------------------------------------------------- the models


def build_encoder(run: Run, pretrained: bool = True) -> TeacherEncoder:
    t = run.profile.teacher
    enc = build_teacher(t.name, t.input_size, pretrained=pretrained, weights=t.weights)
    enc.set_split(t.lora_stages if t.cache_prefix else None)
    return enc


def lora_config(run: Run, encoder: TeacherEncoder):
    from peft import LoraConfig

    t = run.profile.teacher
    return LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, bias="none",
                      target_modules=encoder.lora_target_regex(t.lora_targets, t.lora_stages))


def add_lora(run: Run, encoder: TeacherEncoder):
    """Wrap the (frozen) encoder with peft LoRA adapters; returns the PeftModel."""
    from peft import get_peft_model

    return get_peft_model(encoder, lora_config(run, encoder))


def lora_state(peft_model) -> StateOf:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    return StateOf(lambda: get_peft_model_state_dict(peft_model),
                   lambda sd: set_peft_model_state_dict(peft_model, sd))


def parameter_table(encoder: TeacherEncoder, peft_model, head: torch.nn.Module) -> list[dict]:
    """Trainable parameters of each teacher variant and their fraction of the encoder."""
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    base = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" not in n)
    h = count_parameters(head)
    return [
        {"teacher": "frozen encoder + head", "encoder_params": base, "trainable_encoder": 0, "head": h,
         "trainable_total": h, "trainable_fraction_of_encoder": 0.0},
        {"teacher": "LoRA encoder + head", "encoder_params": base, "trainable_encoder": lora, "head": h,
         "trainable_total": lora + h, "trainable_fraction_of_encoder": lora / base},
    ]


# ---------------------------------------------------------------------------------- training


def _loss_fn():
    from monai.losses import DiceCELoss

    # Dice over the foreground classes (batch-wise, stable for small structures) + cross-entropy
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)


def _variant_batches(n_cases: int, n_variants: int, batch_size: int):
    """One epoch over the labeled cases, each seen once as a randomly chosen variant (the original or one
    of its cached augmented copies); variants of case i are stored at i * n_variants + v."""
    pick = torch.arange(n_cases) * n_variants + torch.randint(0, n_variants, (n_cases,))
    pick = pick[torch.randperm(n_cases)].tolist()
    for i in range(0, n_cases, batch_size):
        yield pick[i:i + batch_size]


def augmented_variants(ds: SegmentationDataset, copies: int, seed: int) -> tuple[list, list, list]:
    """The labeled cases plus ``copies`` augmented versions of each (training augmentations, seeded):
    (names, images, masks), variants of case i at i * (copies + 1) + v, v = 0 the original."""
    from .data import build_transform

    names, images, masks = [], [], []
    transforms = [build_transform(True, seed * 1000 + k) for k in range(copies)]
    for case, image, mask in zip(ds.cases, ds.images, ds.masks):
        names.append(case)
        images.append(image)
        masks.append(mask)
        for k, tf in enumerate(transforms):
            out = tf(image=image, mask=mask)
            names.append(f"{case}~aug{k}")
            images.append(out["image"])
            masks.append(out["mask"])
    return names, images, masks


def _batches(n: int, batch_size: int, shuffle: bool):
    order = torch.randperm(n).tolist() if shuffle else list(range(n))
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def _val_dice(predict, inputs: list, masks: torch.Tensor, n_classes: int, batch_size: int) -> float:
    scores = []
    with torch.inference_mode():
        for idx in _batches(len(inputs), batch_size, shuffle=False):
            logits = predict(idx)
            scores.append(mean_foreground_dice(logits.argmax(1).cpu(), masks[idx], n_classes))
    return float(torch.cat(scores).mean())


def frozen_embeddings(encoder: TeacherEncoder, prefix: Optional[list], images: Sequence[np.ndarray], device: str,
                      batch_size: int) -> torch.Tensor:
    """Embeddings of the frozen encoder, from cached prefix features when given, else from the images."""
    embs = []
    with torch.inference_mode():
        for idx in tqdm(list(_batches(len(images), batch_size, False)), desc="frozen embeddings", leave=False,
                        dynamic_ncols=True):
            if prefix is not None:
                embs.append(encoder.suffix(torch.stack([prefix[i] for i in idx]).float().to(device)).cpu())
            else:
                embs.append(encoder(images_to_tensor(np.stack([images[i] for i in idx]), device)).cpu())
    return torch.cat(embs)


def fit_head(head: torch.nn.Module, emb_train: torch.Tensor, train_masks: torch.Tensor, emb_val: torch.Tensor,
             val_masks: torch.Tensor, t, stage_dir: Path, seed: int, device: str, force: bool = False,
             desc: str = "teacher: frozen encoder + head", n_variants: int = 1) -> list[dict]:
    """Train a segmentation head on fixed embeddings (Dice + CE, AdamW, warm-up + cosine, best by val Dice).

    With ``n_variants > 1`` the embeddings hold each case's variants consecutively (see
    :func:`augmented_variants`) and every epoch sees each case once, as a random variant.
    """
    n_classes = head.n_classes
    loss_fn = _loss_fn()
    n_cases = len(emb_train) // n_variants
    steps = max(1, (n_cases + t.batch_size - 1) // t.batch_size)
    opt = torch.optim.AdamW(head.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = warmup_cosine(opt, t.warmup_epochs * steps, t.head_epochs * steps)

    def epoch_fn(epoch):
        head.train()
        total = 0.0
        for idx in _variant_batches(n_cases, n_variants, t.batch_size):
            loss = loss_fn(head(emb_train[idx].to(device)), train_masks[idx][:, None].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        return {"loss": total / n_cases}

    def val_fn():
        head.eval()
        return {"val_dice": _val_dice(lambda idx: head(emb_val[idx].to(device)), list(range(len(emb_val))),
                                      val_masks, n_classes, t.batch_size)}

    stage = Stage(stage_dir, {"head": head}, opt, t.head_epochs, seed=seed, scheduler=sched, monitor="val_dice",
                  desc=desc, force=force)
    return stage.run(epoch_fn, val_fn)


def train_teacher(run: Run, force: bool = False) -> dict:
    """Train the frozen-encoder baseline, then the LoRA teacher from it; reuse them when finished.

    1. ``frozen``: the head is trained on the frozen encoder's embeddings, computed once
       (``teacher.head_epochs``; cheap, so it is trained to convergence: the fair frozen baseline).
    2. ``lora``: adapters are added and trained together with that head (``teacher.epochs``), i.e.
       linear-probe-then-fine-tune, which keeps the expensive adapted epochs few.
    """
    prof, t = run.profile, run.profile.teacher
    device, n_classes = run.device, run.info.n_classes
    out = run.teacher_dir
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.json"
    if not force and metrics_path.is_file() and (out / "adapter").is_dir():
        print(f"teacher finished earlier: reusing {out} (force=True retrains)")
        return read_json(metrics_path)
    if t.cache_prefix and t.augment:
        print(f"note: teacher.cache_prefix is on: augmentation is offline ({t.cached_augmentations} cached "
              f"augmented copies per labeled case), not on-line")

    splits = run.splits
    train_ds = SegmentationDataset(run.info, splits["labeled"], t.input_size, train=not t.cache_prefix,
                                   augment=t.augment, seed=run.seed)
    val_ds = SegmentationDataset(run.info, splits["val"], t.input_size)
    val_masks = torch.from_numpy(np.stack(val_ds.masks)).long()
    # on the cached-prefix path augmentation is offline: a few augmented copies of each labeled case go
    # through the frozen stages once, and every epoch picks one variant per case
    copies = t.cached_augmentations if t.cache_prefix else 0
    n_variants = copies + 1
    train_names, train_images, train_mask_list = augmented_variants(train_ds, copies, run.seed)
    train_masks = torch.from_numpy(np.stack(train_mask_list)).long()

    encoder = build_encoder(run).to(device)
    freeze(encoder)
    timings: dict = {}
    results: dict = {"teacher": t.name, "input_size": t.input_size, "n_labeled": len(train_ds),
                     "n_val": len(val_ds), "device": device}

    # the frozen stages, once per image (cached on disk, shared between runs)
    prefix_train = prefix_val = None
    if t.cache_prefix:
        if device == "cpu" and hasattr(encoder, "fuse_prefix"):
            encoder.fuse_prefix()
        cache = prefix_cache(run, encoder)
        t0 = time.perf_counter()
        prefix_train = cache.get_many(train_names, train_images, compute_prefix(encoder, device),
                                      desc=f"teacher prefix (labeled x{n_variants})")
        prefix_val = cache.get_many(val_ds.cases, val_ds.images, compute_prefix(encoder, device),
                                    desc="teacher prefix (val)")
        timings["prefix_seconds"] = round(time.perf_counter() - t0, 2)

    loss_fn = _loss_fn()
    steps_per_epoch = max(1, (len(train_ds) + t.batch_size - 1) // t.batch_size)
    results["cached_augmentations"] = copies

    # ----- frozen encoder + head -------------------------------------------------------------
    t0 = time.perf_counter()  # the frozen encoder's embeddings never change: computed once
    emb_train = frozen_embeddings(encoder, prefix_train, train_images, device, t.batch_size)
    emb_val = frozen_embeddings(encoder, prefix_val, val_ds.images, device, t.batch_size)
    head = build_head(encoder, n_classes, t.head, t.head_channels).to(device)
    hist = fit_head(head, emb_train, train_masks, emb_val, val_masks, t, out / "frozen", run.seed, device,
                    force=force, n_variants=n_variants)
    save_weights(out / "frozen_head.safetensors", {"head": head})
    results["frozen_val_dice"] = max(r["val_dice"] for r in hist)
    timings["frozen_seconds"] = round(time.perf_counter() - t0, 2)
    del emb_train, emb_val

    # ----- LoRA encoder + head ---------------------------------------------------------------
    t0 = time.perf_counter()
    peft_model = add_lora(run, encoder)
    lora_encoder: TeacherEncoder = peft_model.get_base_model()
    model = TeacherSegmenter(lora_encoder, n_classes, t.head_channels, t.head).to(device)
    model.head.load_state_dict(head.state_dict())  # start from the trained frozen-encoder head
    if t.grad_checkpointing and device.startswith("cuda"):
        if hasattr(lora_encoder, "vit"):
            lora_encoder.vit.set_grad_checkpointing(True)
        elif hasattr(lora_encoder, "encoder"):
            for layer in lora_encoder.encoder.layers[lora_encoder.suffix_start:]:
                layer.use_checkpoint = True
    params = [p for p in model.parameters() if p.requires_grad]
    results["parameters"] = parameter_table(encoder, peft_model, model.head)
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    sched = warmup_cosine(opt, t.warmup_epochs * steps_per_epoch, t.epochs * steps_per_epoch)
    scaler = grad_scaler(device, t.amp)
    train_loader = None if t.cache_prefix else loader(train_ds, t.batch_size, shuffle=True,
                                                      num_workers=prof.data.num_workers)

    def forward_idx(idx, prefix, ds) -> torch.Tensor:
        if prefix is not None:
            h = torch.stack([prefix[i] for i in idx]).float().to(device)
            return model.from_prefix(h)[1]
        return model(images_to_tensor(np.stack([ds.images[i] for i in idx]), device))

    def lora_epoch(epoch):
        model.train()
        bn_eval(model.encoder)  # the frozen base keeps its BatchNorm statistics
        train_ds.set_epoch(epoch)
        total, n = 0.0, 0
        batches = ((idx, None) for idx in _variant_batches(len(train_ds), n_variants, t.batch_size)) if t.cache_prefix \
            else ((b["index"].tolist(), b) for b in train_loader)
        for idx, batch in batches:
            with autocast(device, t.amp):
                if batch is None:
                    logits = forward_idx(idx, prefix_train, train_ds)
                    target = train_masks[idx][:, None].to(device)
                else:
                    logits = model(batch["image"].to(device))
                    target = batch["mask"][:, None].to(device)
                loss = loss_fn(logits.float(), target)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
        return {"loss": total / n}

    def lora_val():
        model.eval()
        with autocast(device, t.amp):
            d = _val_dice(lambda idx: forward_idx(idx, prefix_val, val_ds).float(), list(range(len(val_ds))),
                          val_masks, n_classes, t.batch_size)
        return {"val_dice": d}

    stage = Stage(out / "lora", {"lora": lora_state(peft_model), "head": model.head}, opt, t.epochs, seed=run.seed,
                  scheduler=sched, scaler=scaler, monitor="val_dice", desc="teacher: LoRA encoder + head",
                  force=force)
    hist = stage.run(lora_epoch, lora_val)
    peft_model.save_pretrained(str(out / "adapter"))
    save_weights(out / "head.safetensors", {"head": model.head})
    results["lora_val_dice"] = max(r["val_dice"] for r in hist)
    timings["lora_seconds"] = round(time.perf_counter() - t0, 2)
    results["timings"] = timings
    results["lora"] = {"rank": t.lora_rank, "alpha": t.lora_alpha, "dropout": t.lora_dropout,
                       "targets": list(t.lora_targets), "stages": list(t.lora_stages) if t.lora_stages else "all",
                       "regex": lora_config(run, encoder).target_modules}
    write_json(metrics_path, results)
    return results


# -------------------------------------------------------------------------------- loading


def load_teacher(run: Run, variant: str = "lora", device: Optional[str] = None) -> TeacherSegmenter:
    """The trained teacher (``lora``, ``frozen`` with its head, or ``pretrained`` = encoder without
    adapters, for task-agnostic KD), frozen, in eval mode."""
    from peft import PeftModel

    device = device or run.device
    t = run.profile.teacher
    encoder = build_encoder(run)
    freeze(encoder)
    if variant == "lora":
        adapter = run.teacher_dir / "adapter"
        if not adapter.is_dir():
            raise FileNotFoundError(f"no trained teacher in {run.teacher_dir}: run notebook 02 "
                                    f"(tskd_utils.teacher.train_teacher) first")
        encoder = PeftModel.from_pretrained(encoder, str(adapter)).get_base_model()
        head_file = run.teacher_dir / "head.safetensors"
    elif variant == "frozen":
        head_file = run.teacher_dir / "frozen_head.safetensors"
    elif variant == "pretrained":
        head_file = None
    else:
        raise KeyError(f"unknown teacher variant {variant!r}; choose lora, frozen or pretrained")
    model = TeacherSegmenter(encoder, run.info.n_classes, t.head_channels, t.head)
    if head_file is not None:
        load_weights(head_file, {"head": model.head})
    freeze(model)
    return model.to(device)



# ------------------------------------------------------------------- embeddings of any images


def teacher_prefix(run: Run, encoder: TeacherEncoder, names: Sequence[str], images: Sequence[np.ndarray],
                   synthetic: bool = False) -> list[torch.Tensor]:
    """Prefix features of letterboxed uint8 images at the teacher's input size, from the cache.

    Real cases use the cache shared by all runs of the dataset; synthetic images, which belong to
    one run, use a cache in the run's ``cache/`` folder.
    """
    if run.device == "cpu" and hasattr(encoder, "fuse_prefix"):
        encoder.fuse_prefix()
    if synthetic:
        t = run.profile.teacher
        cache = FeatureCache(run.cache_dir / f"{encoder.name}-{t.input_size}-prefix{encoder.suffix_start}-synthetic")
    else:
        cache = prefix_cache(run, encoder)
    return cache.get_many(names, images, compute_prefix(encoder, run.device),
                          desc="teacher prefix (synthetic)" if synthetic else "teacher prefix")


def pooled_embeddings(run: Run, names: Sequence[str], images: Sequence[np.ndarray], synthetic: bool = False,
                      batch_size: int = 8) -> torch.Tensor:
    """(N, C) spatially averaged embeddings of the *pretrained* teacher encoder (no adapters)."""
    encoder = freeze(build_encoder(run)).to(run.device)
    prefix = teacher_prefix(run, encoder, names, images, synthetic=synthetic)
    out = []
    with torch.inference_mode():
        for i in range(0, len(prefix), batch_size):
            h = torch.stack(prefix[i:i + batch_size]).float().to(run.device)
            out.append(encoder.suffix(h).mean(dim=(2, 3)).cpu())
    return torch.cat(out) if out else torch.zeros(0, encoder.embed_dim)
