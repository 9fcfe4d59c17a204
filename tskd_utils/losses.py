"""The losses of every stage, in one place (the notebooks show and may redefine them).

* :func:`segmentation_loss`: Dice + cross-entropy on K-class logits (teacher, fine-tuning);
* :func:`feature_loss` and :func:`output_loss` (soft KL + class-balanced CE and per-image, per-class Dice on
  the teacher's labels): the two halves of knowledge distillation, and
  :func:`kd_loss` combining them (notebook 04);
* :func:`diffusion_loss`: the DDPM's denoising objective (notebook 03).

A notebook that defines its own version of a loss passes it to the stage; the stage records a
digest of the function's source, so editing a loss in a notebook retrains what depends on it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_DICE_CE = None


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """MONAI ``DiceCELoss``: soft Dice over the foreground classes (batch-wise, stable for small
    structures) + cross-entropy. ``logits`` (B, K, H, W), ``masks`` (B, H, W) class indices."""
    global _DICE_CE
    if _DICE_CE is None:
        from monai.losses import DiceCELoss

        _DICE_CE = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    return _DICE_CE(logits.float(), masks[:, None])


def feature_loss(student_features: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """MSE between the aligned student features and the teacher's embedding on the same grid."""
    return F.mse_loss(student_features, teacher_embedding.float())


def class_dice_loss(student_logits: torch.Tensor, teacher_labels: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice per image and per foreground class against the teacher's labels, averaged over the (image,
    class) pairs in which the teacher finds the class. A class the teacher predicts in an image weighs as much
    as any other class there, however few pixels it has, so the student cannot buy a lower loss by dropping it;
    a class the teacher does not find in an image asks nothing of it there."""
    k = student_logits.shape[1]
    probs = F.softmax(student_logits.float(), dim=1)
    onehot = F.one_hot(teacher_labels.long(), k).permute(0, 3, 1, 2).float()
    inter, size = (probs * onehot).sum((2, 3)), onehot.sum((2, 3))
    dice = 2 * inter / (probs.sum((2, 3)) + size).clamp_min(1e-6)  # (B, K)
    present = size[:, 1:] > 0
    if not bool(present.any()):
        return student_logits.sum() * 0.0
    return 1 - dice[:, 1:][present].mean()


def balanced_cross_entropy(student_logits: torch.Tensor, teacher_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the teacher's labels with each class that occurs in the batch weighing the same in
    total (weights: the inverse of its pixel count), so a small structure is not outvoted by the background."""
    k = student_logits.shape[1]
    counts = torch.bincount(teacher_labels.reshape(-1).long(), minlength=k).float()
    weight = torch.where(counts > 0, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts))
    return F.cross_entropy(student_logits.float(), teacher_labels.long(), weight=weight / weight.sum())


def output_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Match the teacher's per-pixel outputs without losing a class: T^2 * KL(teacher || student) between
    temperature-softened class distributions (the teacher's soft knowledge), plus, on the teacher's hard labels
    (its argmax), class-balanced cross-entropy and Dice per image and per class. The KL is a mean over pixels:
    alone (or with a Dice pooled over the batch) it lets a student that cannot yet draw a thin structure lower
    the loss by calling it background everywhere (tests/test_distill.py builds such a case); the two label terms
    give every class the teacher finds the same weight as the background."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    p_teacher = F.softmax(teacher_logits.float() / t, dim=1)
    kl = F.kl_div(log_p_student, p_teacher, reduction="none").sum(1).mean() * t * t
    labels = teacher_logits.argmax(1)
    return kl + balanced_cross_entropy(student_logits, labels) + class_dice_loss(student_logits, labels)


def kd_loss(student, align, images: torch.Tensor, teacher_embedding: torch.Tensor,
            teacher_logits: Optional[torch.Tensor], feature_weight: float = 1.0, output_weight: float = 1.0,
            temperature: float = 2.0) -> tuple[torch.Tensor, dict]:
    """Feature loss (+ output loss when the teacher's logits are given): (loss, its parts as floats)."""
    features, logits = student.forward_with_features(images)
    feat = feature_loss(align(features), teacher_embedding)
    loss, parts = feature_weight * feat, {"feature_loss": feat.item()}
    if teacher_logits is not None:
        out = output_loss(logits, teacher_logits, temperature)
        loss, parts["output_loss"] = loss + output_weight * out, out.item()
    return loss, parts


def diffusion_loss(unet, scheduler, x0: torch.Tensor, noise: Optional[torch.Tensor] = None,
                   timesteps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The denoising loss on clean images ``x0`` in [-1, 1] (noise and t drawn if not given): MSE
    between the UNet's output and the noise (``prediction_type`` epsilon) or the velocity (v_prediction)."""
    if noise is None:
        noise = torch.randn_like(x0)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
    xt = scheduler.add_noise(x0, noise, timesteps)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, timesteps)
    return F.mse_loss(unet(xt, timesteps).sample.float(), target.float())
