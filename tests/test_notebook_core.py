"""What notebooks 02-04 write out is what the package runs by default.

The training loops (cells tagged "loop") are executed here on a smoke run and must train, weight for weight, what
the package's own loop trains (the loop ``stages.ensure_*`` and the tests use); notebook 03's sampling loop must give
diffusers' pipeline image. The code a reader sees and the code the tests and the sweep exercise cannot drift apart.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import REPO


def _cell(name: str, tag: str) -> str:
    nb = json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())
    return "".join(next(c for c in nb["cells"] if tag in c.get("metadata", {}).get("tags", []))["source"])


def _core(name: str, namespace: dict) -> dict:
    exec(compile(_cell(name, "core"), f"{name}:core", "exec"), namespace)
    return namespace


def _tensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.trains
def test_notebook_02_config_and_loop_train_what_the_package_trains(tmp_path, toy_root):
    """Notebook 02's LoraConfig is the profile's, and its LoRA loop gives, weight for weight, the teacher of
    teacher.train_teacher (the loop ensure_teacher and the tests run)."""
    import pandas as pd

    from tskd_utils import teacher
    from tskd_utils.run import setup_run
    from tskd_utils.training import optimizer_step

    runs = [setup_run(tmp_path / name, profile="smoke", dataset="toy", data_root=toy_root, n_labeled=6, seed=0)
            for name in ("notebook", "package")]
    ns = _core("02_teacher_lora_finetuning", {"teacher": teacher, "run": runs[0]})
    config, default = ns["lora_config"], teacher.lora_config(runs[0], ns["encoder"])
    assert (config.r, config.lora_alpha, config.target_modules) == (default.r, default.lora_alpha,
                                                                     default.target_modules)
    ns.update(data=teacher.teacher_data(runs[0], ns["encoder"]), force=False, optimizer_step=optimizer_step, pd=pd)
    exec(compile(_cell("02_teacher_lora_finetuning", "loop"), "02:loop", "exec"), ns)
    assert ns["results"]["lora_val_dice"] > 0
    teacher.train_teacher(runs[1])
    for rel in ("lora/final.safetensors", "head.safetensors", "frozen_head.safetensors"):
        a, b = (_tensors(run.teacher_dir / rel) for run in runs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel


def test_notebook_03_sampling_loop_is_the_pipelines():
    """The notebook's sampling loop from image 1's starting noise gives image 1 of diffusers' DDIMPipeline."""
    from tskd_utils import generation
    from tskd_utils.config import get_profile

    ns = _core("03_diffusion_synthesis", {"torch": torch})
    cfg = get_profile("smoke").diffusion
    torch.manual_seed(0)
    unet, scheduler = generation.build_unet(cfg).eval(), generation.build_scheduler(cfg)
    steps = 4
    noise = generation.initial_noise(7, [1], cfg.sample_size)
    x, kept = ns["sample_loop"](unet, generation.sampling_scheduler("ddim", scheduler.config), noise, steps, keep=(2,))
    pipeline = generation.sample(unet, scheduler.config, "ddim", steps, seed=7, indices=[0, 1])
    assert np.allclose(((x[0, 0].clamp(-1, 1) + 1) / 2).numpy(), pipeline[1], atol=1e-5)
    assert set(kept) == {2}


@pytest.mark.trains
def test_notebook_03_loop_trains_what_the_package_trains(tmp_path, toy_root):
    """Notebook 03's DDPM loop gives, weight for weight, the EMA pipeline of generation.train_diffusion."""
    from tskd_utils import generation, viz
    from tskd_utils.losses import diffusion_loss
    from tskd_utils.run import setup_run
    from tskd_utils.training import optimizer_step

    runs = [setup_run(tmp_path / name, profile="smoke", dataset="toy", data_root=toy_root, n_labeled=6, seed=0)
            for name in ("notebook", "package")]
    ns = {"run": runs[0], "generation": generation, "diffusion_loss": diffusion_loss, "optimizer_step": optimizer_step,
          "enabled": False, "viz": viz}
    exec(compile(_cell("03_diffusion_synthesis", "loop"), "03:loop", "exec"), ns)
    assert ns["train_summary"]["final_loss"] > 0
    generation.train_diffusion(runs[1])
    rel = "pipeline/unet/diffusion_pytorch_model.safetensors"
    a, b = (_tensors(run.synthetic_dir / rel) for run in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.trains
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


def test_a_notebook_shows_the_packages_loss_as_code():
    from tskd_utils import losses, viz

    shown = viz.source(losses.kd_loss)
    assert shown.startswith("def kd_loss(") and "return loss, parts" in shown
    assert shown._repr_markdown_().startswith("```python\ndef kd_loss(") and repr(shown) == str(shown)
