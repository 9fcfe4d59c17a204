"""Stage 2: the task-specific teacher (pretrained encoder + LoRA adapters + segmentation head).

Two teachers are trained on the n_labeled cases with the same head, loss and schedule:

* ``frozen``: the pretrained encoder untouched, only the head learns (the baseline), on embeddings
  computed once;
* ``lora``: peft LoRA adapters on the encoder's attention (and MLP) projections + the head, starting
  from the frozen baseline's head (linear probe, then fine-tune).

The better of the two on validation is the teacher that notebook 04 distills (``selected``); when
LoRA loses to the frozen baseline, that is said, not hidden. The notebook shows the method's core
(the ``LoraConfig`` and the loss of one training step) and passes them here; this module keeps the
bookkeeping: cached features, checkpoints, resume, progress and the record of what each stage was
trained from.

Outputs in ``<run>/teacher/``: ``adapter/`` (peft ``save_pretrained``), ``head.safetensors``,
``frozen_head.safetensors``, ``metrics.json``, and the stage folders ``frozen/`` and ``lora/``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import SegmentationDataset, build_transform, loader
# the loaders live in checkpoints.py (below this module); named here too for notebook 02 and older callers
from .checkpoints import (VARIANTS, build_encoder, load_teacher, predict_cases, selected_variant,  # noqa: F401
                          teacher_digest)
from .features import images_to_tensor, run_prefix_dtype, teacher_prefix, valid_tensor
from .io import write_json
from .losses import segmentation_loss
from .metrics import mean_foreground_dice
from .models import TeacherEncoder, TeacherSegmenter, bn_eval, build_head, freeze
from .run import Run
from .training import (StateOf, Stage, autocast, file_digest, grad_scaler, optimizer_step, save_weights,
                       seeded, source_digest, value_digest, warmup_cosine)


# -------------------------------------------------------------------------------- the models


def lora_target_modules(run: Run, encoder: TeacherEncoder) -> str:
    """The regex of the layers that get adapters (``teacher.lora_targets`` in ``teacher.lora_stages``)."""
    t = run.profile.teacher
    return encoder.lora_target_regex(t.lora_targets, t.lora_stages)


def lora_config(run: Run, encoder: TeacherEncoder):
    """The profile's ``peft.LoraConfig`` (notebook 02 writes the same one out)."""
    from peft import LoraConfig

    t = run.profile.teacher
    return LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, bias="none",
                      target_modules=lora_target_modules(run, encoder))


def add_lora(run: Run, encoder: TeacherEncoder, config=None):
    """Wrap the (frozen) encoder with peft LoRA adapters (initialised from the run's own seed)."""
    from peft import get_peft_model

    with seeded(run.seed_for("teacher", "lora init")):
        return get_peft_model(encoder, config or lora_config(run, encoder))


def lora_state(peft_model) -> StateOf:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    return StateOf(lambda: get_peft_model_state_dict(peft_model), lambda sd: set_peft_model_state_dict(peft_model, sd))


def parameter_table(peft_model, head: torch.nn.Module) -> list[dict]:
    """Trainable parameters of each teacher variant (peft's count) and their fraction of the encoder."""
    lora, total = peft_model.get_nb_trainable_parameters()
    base, h = total - lora, sum(p.numel() for p in head.parameters())
    return [
        {"teacher": "frozen encoder + head", "encoder_params": base, "trainable_encoder": 0, "head": h,
         "trainable_total": h, "trainable_fraction_of_encoder": 0.0},
        {"teacher": "LoRA encoder + head", "encoder_params": base, "trainable_encoder": lora, "head": h,
         "trainable_total": lora + h, "trainable_fraction_of_encoder": lora / base},
    ]


def new_head(run: Run, encoder: TeacherEncoder) -> torch.nn.Module:
    t = run.profile.teacher
    with seeded(run.seed_for("teacher", "head init")):
        return build_head(encoder, run.info.n_classes, t.head, t.head_channels)


def lora_loss(model: TeacherSegmenter, batch: dict) -> torch.Tensor:
    """The LoRA teacher's objective on one batch (the default; notebook 02 writes its own)."""
    return segmentation_loss(model.logits(batch), batch["mask"])


# ------------------------------------------------------------------------------------ data


@dataclass
class TeacherData:
    """The labeled cases (with ``n_variants`` augmented variants each, consecutively) and the validation
    cases at the teacher's input size; ``*_prefix`` hold their cached frozen-prefix features."""

    train: dict  # names, images, masks (tensor), valid
    val: dict
    n_variants: int
    train_prefix: Optional[list] = None
    val_prefix: Optional[list] = None
    dataset: Optional[SegmentationDataset] = None  # for on-line augmentation (no prefix cache)


def augmented_variants(ds: SegmentationDataset, copies: int, seed: int) -> dict:
    """The labeled cases plus ``copies`` augmented versions of each (training augmentations, seeded);
    variants of case i at i * (copies + 1) + v, v = 0 the original."""
    out = {"names": [], "images": [], "masks": [], "valid": []}
    transforms = [build_transform(True, seed * 1000 + k) for k in range(copies)]
    for case, image, mask, valid in zip(ds.cases, ds.images, ds.masks, ds.valid):
        views = [(case, image, mask)]
        for k, tf in enumerate(transforms):
            aug = tf(image=image, mask=mask)
            views.append((f"{case}~aug{k}", aug["image"], aug["mask"]))
        for name, im, mk in views:
            out["names"].append(name)
            out["images"].append(im)
            out["masks"].append(mk)
            out["valid"].append(valid)
    out["masks"] = torch.from_numpy(np.stack(out["masks"])).long()
    return out


def teacher_data(run: Run, encoder: TeacherEncoder) -> TeacherData:
    t = run.profile.teacher
    train_ds = SegmentationDataset(run.info, run.splits["labeled"], t.input_size, train=not t.cache_prefix,
                                   augment=t.augment, seed=run.seed)
    val_ds = SegmentationDataset(run.info, run.splits["val"], t.input_size)
    copies = t.cached_augmentations if t.cache_prefix else 0
    train = augmented_variants(train_ds, copies, run.seed)
    val = {"names": val_ds.cases, "images": val_ds.images, "valid": val_ds.valid,
           "masks": torch.from_numpy(np.stack(val_ds.masks)).long()}
    data = TeacherData(train, val, copies + 1, dataset=train_ds)
    if t.cache_prefix:  # the frozen stages, once per image (cached on disk, shared between runs)
        data.train_prefix = teacher_prefix(run, encoder, train["names"], train["images"], train["valid"],
                                           desc=f"teacher prefix (labeled x{copies + 1})")
        data.val_prefix = teacher_prefix(run, encoder, val["names"], val["images"], val["valid"],
                                         desc="teacher prefix (val)")
    return data


def make_batch(part: dict, prefix: Optional[list], idx: list, device: str) -> dict:
    """A training/validation batch of cases ``idx``: cached prefix features, or images + valid regions."""
    batch = {"mask": part["masks"][idx].to(device)}
    if prefix is not None:
        batch["prefix"] = torch.stack([prefix[i] for i in idx]).float().to(device)
    else:
        batch["image"] = images_to_tensor(np.stack([part["images"][i] for i in idx]), device)
        batch["valid"] = valid_tensor([part["valid"][i] for i in idx], device)
    return batch


def variant_batches(n_cases: int, n_variants: int, batch_size: int):
    """One epoch over the labeled cases, each seen once as a randomly chosen variant."""
    pick = torch.arange(n_cases) * n_variants + torch.randint(0, n_variants, (n_cases,))
    pick = pick[torch.randperm(n_cases)].tolist()
    for i in range(0, n_cases, batch_size):
        yield pick[i:i + batch_size]


def val_dice(logits_of: Callable[[list], torch.Tensor], masks: torch.Tensor, n_classes: int, batch_size: int) -> float:
    """Mean foreground Dice over the validation cases; ``logits_of(indices)`` predicts a batch."""
    scores = []
    with torch.inference_mode():
        for i in range(0, len(masks), batch_size):
            idx = list(range(i, min(i + batch_size, len(masks))))
            scores.append(mean_foreground_dice(logits_of(idx).argmax(1).cpu(), masks[idx], n_classes))
    return float(torch.cat(scores).mean())


# ---------------------------------------------------------------------- frozen encoder + head


def frozen_embeddings(encoder: TeacherEncoder, part: dict, prefix: Optional[list], device: str,
                      batch_size: int) -> torch.Tensor:
    """fp16 embeddings of the frozen encoder, from cached prefix features when given, else from the images."""
    embs = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(part["images"]), batch_size), desc="frozen embeddings", leave=False):
            batch = make_batch(part, prefix, list(range(i, min(i + batch_size, len(part["images"])))), device)
            emb = encoder.suffix(batch["prefix"]) if prefix is not None else encoder(batch["image"], batch["valid"])
            embs.append(emb.half().cpu())
    return torch.cat(embs)


def fit_head(head: torch.nn.Module, emb_train: torch.Tensor, train_masks: torch.Tensor, emb_val: torch.Tensor,
             val_masks: torch.Tensor, t, stage: Stage, seed: int, device: str, n_variants: int = 1) -> list[dict]:
    """Train a segmentation head on fixed embeddings (Dice + CE, AdamW, warm-up + cosine, best by val Dice).
    With ``n_variants > 1`` every epoch sees each case once, as a random variant."""
    n_cases = len(emb_train) // n_variants
    steps = -(-n_cases // t.batch_size)
    opt = torch.optim.AdamW(head.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = warmup_cosine(opt, t.warmup_epochs * steps, t.head_epochs * steps)
    scaler = grad_scaler("cpu", False)

    def epoch_fn(epoch):
        head.train()
        total = 0.0
        for idx in variant_batches(n_cases, n_variants, t.batch_size):
            loss = segmentation_loss(head(emb_train[idx].float().to(device)), train_masks[idx].to(device))
            optimizer_step(loss, opt, scaler, sched)
            total += loss.item() * len(idx)
        return {"loss": total / n_cases}

    def val_fn():
        head.eval()
        return {"val_dice": val_dice(lambda idx: head(emb_val[idx].float().to(device)), val_masks, head.n_classes,
                                     t.batch_size)}

    return stage.train({"head": head}, opt, t.head_epochs, epoch_fn, val_fn, seed=seed, scheduler=sched,
                       monitor="val_dice")


def train_frozen(run: Run, encoder: TeacherEncoder, data: Callable[[], TeacherData], force: bool = False):
    """The frozen-encoder baseline: (head, history, trained now?). ``data`` is called only when training is needed."""
    t = run.profile.teacher
    inputs = {"split": run.split_digest("labeled", "val"), **run.settings("teacher"),
              "prefix_dtype": run_prefix_dtype(run), "seed": run.seed,
              "loss": source_digest(segmentation_loss)}
    for k in ("epochs", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "head_lr"):
        inputs["teacher"].pop(k)
    stage = Stage(run.teacher_dir / "frozen", inputs, desc="teacher: frozen encoder + head", force=force)
    head = new_head(run, encoder).to(run.device)
    if stage.finished:
        return head, stage.load_final({"head": head}), False
    d = data()
    emb_train = frozen_embeddings(encoder, d.train, d.train_prefix, run.device, t.batch_size)
    emb_val = frozen_embeddings(encoder, d.val, d.val_prefix, run.device, t.batch_size)
    hist = fit_head(head, emb_train, d.train["masks"], emb_val, d.val["masks"], t, stage,
                    run.seed_for("teacher", "frozen"), run.device, d.n_variants)
    return head, hist, True


# --------------------------------------------------------------------------- LoRA encoder + head


def _lora_optimizer(model: TeacherSegmenter, t):
    adapters = [p for n, p in model.encoder.named_parameters() if p.requires_grad]
    groups = [{"params": adapters}, {"params": [p for p in model.head.parameters() if p.requires_grad],
                                     "lr": t.head_lr if t.head_lr is not None else t.lr}]
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)


def _enable_grad_checkpointing(encoder: TeacherEncoder) -> None:
    if hasattr(encoder, "vit"):
        encoder.vit.set_grad_checkpointing(True)
    elif hasattr(encoder, "encoder"):
        for layer in encoder.encoder.layers[encoder.suffix_start:]:
            layer.use_checkpoint = True


def fit_lora(run: Run, peft_model, model: TeacherSegmenter, d: TeacherData, loss_fn: Callable,
             stage: Stage) -> list[dict]:
    """Train adapters + head with ``loss_fn(model, batch)`` (checkpointed, resumable)."""
    t, device = run.profile.teacher, run.device
    n_cases = len(d.dataset)
    steps = -(-n_cases // t.batch_size)
    opt = _lora_optimizer(model, t)
    sched = warmup_cosine(opt, t.warmup_epochs * steps, t.epochs * steps)
    scaler = grad_scaler(device, t.amp)
    online = None if d.train_prefix is not None else loader(d.dataset, t.batch_size, shuffle=True,
                                                             num_workers=run.profile.data.num_workers)

    def batches(epoch):
        if online is None:
            return (make_batch(d.train, d.train_prefix, idx, device) for idx in
                    variant_batches(n_cases, d.n_variants, t.batch_size))
        d.dataset.set_epoch(epoch)
        return ({"image": b["image"].to(device), "valid": b["valid"].to(device), "mask": b["mask"].to(device)}
                for b in online)

    def epoch_fn(epoch):
        model.train()
        bn_eval(model.encoder)  # the frozen base keeps its BatchNorm statistics
        total, n = 0.0, 0
        for batch in batches(epoch):
            with autocast(device, t.amp):
                loss = loss_fn(model, batch)
            optimizer_step(loss, opt, scaler, sched)
            total, n = total + loss.item() * len(batch["mask"]), n + len(batch["mask"])
        return {"loss": total / n}

    def val_fn():
        model.eval()
        with autocast(device, t.amp):
            return {"val_dice": val_dice(lambda idx: model.logits(make_batch(d.val, d.val_prefix, idx, device)).float(),
                                         d.val["masks"], run.info.n_classes, t.batch_size)}

    modules = {"lora": lora_state(peft_model), "head": model.head}
    return stage.train(modules, opt, t.epochs, epoch_fn, val_fn, seed=run.seed_for("teacher", "lora"),
                       scheduler=sched, scaler=scaler, monitor="val_dice")


def train_lora(run: Run, encoder: TeacherEncoder, frozen_head, data: Callable[[], TeacherData], config=None,
               loss_fn: Optional[Callable] = None, force: bool = False):
    """The LoRA teacher, starting from the frozen baseline's head: (peft model, model, history, trained now?)."""
    t = run.profile.teacher
    ignore = tuple(k for k, given in (("loss", loss_fn), ("lora config", config)) if given is None)
    config = config or lora_config(run, encoder)
    loss_fn = loss_fn or lora_loss
    peft_model = add_lora(run, encoder, config)
    lora_encoder = peft_model.get_base_model()
    model = TeacherSegmenter(lora_encoder, run.info.n_classes, t.head_channels, t.head).to(run.device)
    model.head.load_state_dict(frozen_head.state_dict())
    inputs = {"split": run.split_digest("labeled", "val"), **run.settings("teacher"),
              "prefix_dtype": run_prefix_dtype(run), "seed": run.seed,
              "frozen head": file_digest(run.teacher_dir / "frozen_head.safetensors"),
              "lora config": value_digest(config.to_dict()), "loss": source_digest(loss_fn)}
    # a caller that names no loss / LoRA config (e.g. a later notebook making sure a teacher exists) takes any
    # finished teacher; the notebook that defines them retrains when they change
    stage = Stage(run.teacher_dir / "lora", inputs, desc="teacher: LoRA encoder + head", force=force, ignore=ignore)
    if stage.finished:
        return peft_model, model, stage.load_final({"lora": lora_state(peft_model), "head": model.head}), False
    if t.grad_checkpointing and run.device.startswith("cuda"):
        _enable_grad_checkpointing(lora_encoder)
    return peft_model, model, fit_lora(run, peft_model, model, data(), loss_fn, stage), True


# ------------------------------------------------------------------------------ the whole stage


def train_teacher(run: Run, force: bool = False, config=None, loss_fn: Optional[Callable] = None,
                  data: Optional[TeacherData] = None) -> dict:
    """Train (or reuse) the frozen-encoder baseline, then the LoRA teacher from it; pick the better.

    ``config``: a ``peft.LoraConfig`` (default: the profile's); ``loss_fn(model, batch) -> loss``: the
    objective of one LoRA training step (default :func:`lora_loss`); ``data``: the :class:`TeacherData` when
    the caller already holds it (notebook 02), so that it is not prepared twice. Returns ``metrics.json``'s content.
    """
    t, out = run.profile.teacher, run.teacher_dir
    out.mkdir(parents=True, exist_ok=True)
    encoder = freeze(build_encoder(run)).to(run.device)
    cache: dict = {} if data is None else {"d": data}
    t0 = time.perf_counter()

    def prepared() -> TeacherData:  # prepared once, only if a stage has to train
        if "d" not in cache:
            cache["d"] = teacher_data(run, encoder)
        return cache["d"]

    head, frozen_hist, trained = train_frozen(run, encoder, prepared, force)
    if trained or not (out / "frozen_head.safetensors").is_file():  # written once per training, not on reuse
        save_weights(out / "frozen_head.safetensors", {"head": head})
    t1 = time.perf_counter()
    peft_model, model, lora_hist, trained = train_lora(run, encoder, head, prepared, config, loss_fn, force)
    if trained or not (out / "adapter" / "adapter_model.safetensors").is_file() or not (out / "head.safetensors").is_file():
        peft_model.save_pretrained(str(out / "adapter"))
        save_weights(out / "head.safetensors", {"head": model.head})
    results = {"teacher": t.name, "input_size": t.input_size, "n_labeled": len(run.splits["labeled"]),
               "n_val": len(run.splits["val"]), "device": run.device, "cached_augmentations": t.cached_augmentations,
               "frozen_val_dice": max(r["val_dice"] for r in frozen_hist),
               "lora_val_dice": max(r["val_dice"] for r in lora_hist),
               "parameters": parameter_table(peft_model, model.head),
               "timings": {"frozen_seconds": round(t1 - t0, 2), "lora_seconds": round(time.perf_counter() - t1, 2)},
               "lora": {**{k: v for k, v in (config or lora_config(run, encoder)).to_dict().items()
                           if k in ("r", "lora_alpha", "lora_dropout", "target_modules")}}}
    results["selected"] = "lora" if results["lora_val_dice"] >= results["frozen_val_dice"] else "frozen"
    if results["selected"] == "frozen":
        print(f"note: the LoRA teacher ({results['lora_val_dice']:.3f}) is below the frozen-encoder baseline "
              f"({results['frozen_val_dice']:.3f}) on validation: the frozen one is the teacher that is distilled")
    write_json(out / "metrics.json", results)
    return results
