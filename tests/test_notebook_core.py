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


def _cell(name: str, tag: str) -> str:
    nb = json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())
    return "".join(next(c for c in nb["cells"] if tag in c.get("metadata", {}).get("tags", []))["source"])


def test_notebook_04_loop_trains_what_the_package_trains(tmp_path, toy_root):
    """The pretraining loop written out in notebook 04 gives, weight for weight, the students of distill.pretrain
    (the loop ensure_students and the tests run), for TS-KD and for task-agnostic KD (no logits)."""
    import pandas as pd

    from tskd_utils import distill
    from tskd_utils.losses import kd_loss
    from tskd_utils.run import setup_run
    from tskd_utils.teacher import train_teacher
    from tskd_utils.training import load_weights, optimizer_step

    runs = []
    for name in ("notebook", "package"):
        run = setup_run(tmp_path / name, profile="smoke", dataset="toy", data_root=toy_root, n_labeled=6, seed=0,
                        overrides={"diffusion.n_synthetic": 0})
        train_teacher(run)
        runs.append(run)
    methods = ["ts_kd", "ta_kd"]
    ns = {"run": runs[0], "methods": methods, "force": False, "distill": distill, "kd_loss": kd_loss,
          "optimizer_step": optimizer_step, "pd": pd}
    exec(compile(_cell("04_distillation", "loop"), "04_distillation:loop", "exec"), ns)
    assert list(ns["pre"].index) == methods and ns["pre"].loc["ts_kd", "final_loss"] > 0
    for method in methods:
        distill.pretrain(runs[1], method)
        weights = []
        for run in runs:
            student = distill.new_student(run)
            load_weights(distill.method_dir(run, method) / "pretrain" / "final.safetensors", {"student": student},
                         strict=False)
            weights.append(student.state_dict())
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), method
