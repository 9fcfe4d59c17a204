"""Stage 2: the task-specific teacher (pretrained encoder + LoRA adapters + segmentation head).

Two teachers are trained on the n_labeled cases with the same head, loss and schedule:

* ``frozen``: the pretrained encoder untouched, only the head learns (the baseline), on embeddings
  computed once;
* ``lora``: peft LoRA adapters on the encoder's attention (and MLP) projections + the head, starting
  from the frozen baseline's head (linear probe, then fine-tune).

The better of the two on validation is the teacher that notebook 04 distills (``selected``); when
LoRA loses to the frozen baseline, that is said, not hidden. Notebook 02 shows the method's core (the
``LoraConfig``, the loss of one training step) and writes the LoRA loop out over :func:`lora_training`'s
stage; :func:`train_teacher` runs the same loop (:func:`fit_lora`). This module keeps the bookkeeping:
cached features, checkpoints, resume, progress and the record of what each stage was trained from.

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
from .metrics import validation_dice
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
        return {"val_dice": validation_dice(lambda idx: head(emb_val[idx].float().to(device)), val_masks, head.n_classes,
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


@dataclass
class LoraTraining:
    """The LoRA stage ready for its loop: notebook 02 writes the loop out, :func:`train_teacher` runs the same one
    (:func:`fit_lora`). ``model`` is the adapted encoder + head (the head starts from the frozen baseline's);
    ``loop`` holds the keyword arguments of ``stage.epochs``; :meth:`batches` is one epoch over the labeled cases;
    :meth:`finish` writes the adapters, the head and ``metrics.json`` (which teacher is selected)."""

    run: Run
    peft_model: object
    model: TeacherSegmenter
    stage: Stage
    data: Callable[[], TeacherData]
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    config: object = None
    frozen: Optional[tuple] = None  # (head, history, trained now?) of the frozen baseline
    started: tuple = (0.0, 0.0)  # perf_counter at the frozen baseline's start and at LoRA's
    trained: bool = False  # the LoRA stage had to train (not reused)
    _online: object = None

    @property
    def loop(self) -> dict:
        return {"modules": {"lora": lora_state(self.peft_model), "head": self.model.head}, "optimizer": self.optimizer,
                "epochs": self.run.profile.teacher.epochs, "seed": self.run.seed_for("teacher", "lora"),
                "scheduler": self.scheduler, "scaler": self.scaler, "monitor": "val_dice"}

    @property
    def n_images(self) -> int:
        return len(self.run.splits["labeled"])

    def train(self) -> None:
        self.model.train()
        bn_eval(self.model.encoder)  # the frozen base keeps its BatchNorm statistics

    def autocast(self):
        """fp16 autocast on CUDA (``teacher.amp``), else a no-op."""
        return autocast(self.run.device, self.run.profile.teacher.amp)

    def batches(self, epoch: int):
        """One epoch: each labeled case once, as a random one of its cached augmented variants (prefix cache), or
        augmented on line (no cache)."""
        d, t, device = self.data(), self.run.profile.teacher, self.run.device
        if d.train_prefix is not None:
            return (make_batch(d.train, d.train_prefix, idx, device) for idx in
                    variant_batches(len(d.dataset), d.n_variants, t.batch_size))
        if self._online is None:
            self._online = loader(d.dataset, t.batch_size, shuffle=True, num_workers=self.run.profile.data.num_workers)
        d.dataset.set_epoch(epoch)
        return ({"image": b["image"].to(device), "valid": b["valid"].to(device), "mask": b["mask"].to(device)}
                for b in self._online)

    def validate(self) -> dict:
        d, device = self.data(), self.run.device
        self.model.eval()
        with self.autocast():
            return {"val_dice": validation_dice(lambda idx: self.model.logits(make_batch(d.val, d.val_prefix, idx,
                                                                                  device)).float(),
                                         d.val["masks"], self.run.info.n_classes, self.run.profile.teacher.batch_size)}

    def finish(self) -> dict:
        """Write the LoRA teacher and ``metrics.json``: both variants' validation Dice, which one is selected."""
        run, t, out = self.run, self.run.profile.teacher, self.run.teacher_dir
        head, frozen_hist, _ = self.frozen
        if self.trained or not (out / "adapter" / "adapter_model.safetensors").is_file() or \
                not (out / "head.safetensors").is_file():
            self.peft_model.save_pretrained(str(out / "adapter"))
            save_weights(out / "head.safetensors", {"head": self.model.head})
        t0, t1 = self.started
        results = {"teacher": t.name, "input_size": t.input_size, "n_labeled": len(run.splits["labeled"]),
                   "n_val": len(run.splits["val"]), "device": run.device, "cached_augmentations": t.cached_augmentations,
                   "frozen_val_dice": max(r["val_dice"] for r in frozen_hist),
                   "lora_val_dice": max(r["val_dice"] for r in self.stage.history),
                   "parameters": parameter_table(self.peft_model, self.model.head),
                   "timings": {"frozen_seconds": round(t1 - t0, 2), "lora_seconds": round(time.perf_counter() - t1, 2)},
                   "lora": {k: v for k, v in self.config.to_dict().items()
                            if k in ("r", "lora_alpha", "lora_dropout", "target_modules")}}
        results["selected"] = "lora" if results["lora_val_dice"] >= results["frozen_val_dice"] else "frozen"
        if results["selected"] == "frozen":
            print(f"note: the LoRA teacher ({results['lora_val_dice']:.3f}) is below the frozen-encoder baseline "
                  f"({results['frozen_val_dice']:.3f}) on validation: the frozen one is the teacher that is distilled")
        write_json(out / "metrics.json", results)
        return results


def lora_loop(run: Run, peft_model, model: TeacherSegmenter, data, stage: Stage, **fields) -> LoraTraining:
    """A :class:`LoraTraining` for ``model`` (``data``: the :class:`TeacherData`, or a function that prepares it
    when first needed): AdamW on the adapters and the head, warm-up + cosine, the GradScaler (CUDA fp16)."""
    t = run.profile.teacher
    opt = _lora_optimizer(model, t)
    steps = -(-len(run.splits["labeled"]) // t.batch_size)
    sched = warmup_cosine(opt, t.warmup_epochs * steps, t.epochs * steps)
    prepared = data if callable(data) else (lambda: data)
    return LoraTraining(run, peft_model, model, stage, prepared, opt, sched, grad_scaler(run.device, t.amp), **fields)


def lora_training(run: Run, force: bool = False, config=None, loss_fn: Optional[Callable] = None,
                  data: Optional[TeacherData] = None) -> LoraTraining:
    """Train (or reuse) the frozen-encoder baseline, then set the LoRA teacher up from its head.

    ``config``: a ``peft.LoraConfig`` (default: the profile's); ``loss_fn(model, batch) -> loss``: the objective the
    loop will use (default :func:`lora_loss`): with ``config`` it is part of the stage's inputs, and a caller that
    names neither (a later notebook making sure a teacher exists) takes any finished teacher; ``data``: the
    :class:`TeacherData` when the caller already holds it (notebook 02), so that it is not prepared twice.
    """
    t, out = run.profile.teacher, run.teacher_dir
    out.mkdir(parents=True, exist_ok=True)
    encoder = freeze(build_encoder(run)).to(run.device)
    cache: dict = {} if data is None else {"d": data}

    def prepared() -> TeacherData:  # prepared once, only if a stage has to train
        if "d" not in cache:
            cache["d"] = teacher_data(run, encoder)
        return cache["d"]

    t0 = time.perf_counter()
    frozen = train_frozen(run, encoder, prepared, force)
    if frozen[2] or not (out / "frozen_head.safetensors").is_file():  # written once per training, not on reuse
        save_weights(out / "frozen_head.safetensors", {"head": frozen[0]})
    t1 = time.perf_counter()
    ignore = tuple(k for k, given in (("loss", loss_fn), ("lora config", config)) if given is None)
    config = config or lora_config(run, encoder)
    peft_model = add_lora(run, encoder, config)
    lora_encoder = peft_model.get_base_model()
    model = TeacherSegmenter(lora_encoder, run.info.n_classes, t.head_channels, t.head).to(run.device)
    model.head.load_state_dict(frozen[0].state_dict())
    inputs = {"split": run.split_digest("labeled", "val"), **run.settings("teacher"),
              "prefix_dtype": run_prefix_dtype(run), "seed": run.seed,
              "frozen head": file_digest(out / "frozen_head.safetensors"),
              "lora config": value_digest(config.to_dict()), "loss": source_digest(loss_fn or lora_loss)}
    stage = Stage(out / "lora", inputs, desc="teacher: LoRA encoder + head", force=force, ignore=ignore)
    if not stage.finished and t.grad_checkpointing and run.device.startswith("cuda"):
        _enable_grad_checkpointing(lora_encoder)
    return lora_loop(run, peft_model, model, prepared, stage, config=config, frozen=frozen, started=(t0, t1),
                     trained=not stage.finished)


def fit_lora(lt: LoraTraining, loss_fn: Optional[Callable] = None) -> list[dict]:
    """The LoRA loop (the one notebook 02 writes out): adapters + head with ``loss_fn(model, batch)``."""
    loss_fn = loss_fn or lora_loss
    for epoch in lt.stage.epochs(**lt.loop):
        lt.train()
        total = 0.0
        for batch in lt.batches(epoch.index):
            with lt.autocast():
                loss = loss_fn(lt.model, batch)
            optimizer_step(loss, lt.optimizer, lt.scaler, lt.scheduler)
            total += loss.item() * len(batch["mask"])
        epoch.log(loss=total / lt.n_images, **lt.validate())
    return lt.stage.history


# ------------------------------------------------------------------------------ the whole stage


def train_teacher(run: Run, force: bool = False, config=None, loss_fn: Optional[Callable] = None,
                  data: Optional[TeacherData] = None) -> dict:
    """Train (or reuse) the frozen-encoder baseline, then the LoRA teacher from it; pick the better.
    The arguments are :func:`lora_training`'s. Returns ``metrics.json``'s content."""
    lt = lora_training(run, force, config, loss_fn, data)
    fit_lora(lt, loss_fn)
    return lt.finish()
