"""The method's core written out in notebooks 02-04 is what the package runs by default.

Each notebook's cell tagged "core" is executed here and compared with the package's own function on
the same inputs, so the code a reader sees and the code the tests and the sweep exercise cannot drift apart.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from conftest import REPO


def _core(name: str, namespace: dict) -> dict:
    nb = json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "core" in c.get("metadata", {}).get("tags", []))
    exec(compile("".join(cell["source"]), f"{name}:core", "exec"), namespace)
    return namespace


def test_notebook_02_lora_config_and_loss_are_the_packages(smoke_run):
    from tskd_utils import teacher

    ns = _core("02_teacher_lora_finetuning", {"teacher": teacher, "run": smoke_run})
    config = ns["lora_config"]
    default = teacher.lora_config(smoke_run, ns["encoder"])
    assert (config.r, config.lora_alpha, config.target_modules) == (default.r, default.lora_alpha,
                                                                     default.target_modules)
    model = teacher.TeacherSegmenter(ns["encoder"], smoke_run.info.n_classes, 16)
    torch.manual_seed(0)
    batch = {"image": torch.rand(2, 1, 32, 32), "valid": torch.tensor([[32, 32], [32, 20]]),
             "mask": torch.randint(0, 3, (2, 32, 32))}
    assert torch.equal(ns["lora_loss"](model, batch), teacher.lora_loss(model, batch))


def test_notebook_03_loss_and_sampling_loop_are_the_packages(tmp_path):
    from tskd_utils import generation, losses
    from tskd_utils.config import get_profile

    ns = _core("03_diffusion_synthesis", {"torch": torch, "F": torch.nn.functional})
    cfg = get_profile("smoke").diffusion
    torch.manual_seed(0)
    unet, scheduler = generation.build_unet(cfg).eval(), generation.build_scheduler(cfg)
    x0 = torch.rand(3, 1, cfg.sample_size, cfg.sample_size) * 2 - 1
    torch.manual_seed(1)
    a = ns["diffusion_loss"](unet, scheduler, x0)
    torch.manual_seed(1)
    assert torch.equal(a, losses.diffusion_loss(unet, scheduler, x0))
    # the notebook's loop from image 1's starting noise gives image 1 of diffusers' DDIMPipeline
    steps = 4
    noise = generation.initial_noise(7, [1], cfg.sample_size)
    x, kept = ns["sample_loop"](unet, generation.sampling_scheduler("ddim", scheduler.config), noise, steps, keep=(2,))
    pipeline = generation.sample(unet, scheduler.config, "ddim", steps, seed=7, indices=[0, 1])
    assert np.allclose(((x[0, 0].clamp(-1, 1) + 1) / 2).numpy(), pipeline[1], atol=1e-5)
    assert set(kept) == {2}


def test_notebook_04_kd_loss_is_the_packages():
    from tskd_utils import distill, losses
    from tskd_utils.models import build_student

    ns = _core("04_distillation", {"torch": torch, "F": torch.nn.functional,
                                    "balanced_cross_entropy": losses.balanced_cross_entropy,
                                    "class_dice_loss": losses.class_dice_loss})
    student = build_student("unet_xs", 32, 3, seed=0, feature_grid=8)
    align = distill.FeatureAlign(student.embed_dim, 16)
    torch.manual_seed(0)
    x, emb, logits = torch.rand(2, 1, 32, 32), torch.randn(2, 16, 8, 8), torch.randn(2, 3, 32, 32)
    for teacher_logits in (logits, None):  # TS-KD, and task-agnostic KD (no outputs)
        mine, parts = ns["kd_loss"](student, align, x, emb, teacher_logits, 1.0, 0.5, 2.0)
        ref, ref_parts = losses.kd_loss(student, align, x, emb, teacher_logits, 1.0, 0.5, 2.0)
        assert torch.allclose(mine, ref, atol=1e-6) and parts.keys() == ref_parts.keys()
