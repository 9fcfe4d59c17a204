"""Earlier stages computed on demand, so that every notebook runs alone from its badge.

On Colab or Kaggle each notebook gets a fresh VM, so notebook 04 may open a run folder with no
teacher and no synthetic images, and notebook 05 one with no students. Rather than stopping with
"run notebook 02 first", they call :func:`ensure_teacher`, :func:`ensure_synthetic` and
:func:`ensure_students`: a stage that is already there is left alone (not even its fingerprint is
checked: the notebook that made it may have used its own loss, and the stage itself decides about
staleness when its notebook runs); a missing one is computed by the package with the profile's
defaults (LoRA config, losses), with a printed line saying what and about how long it takes in this
profile. The stages resume an interrupted computation and reuse finished work.

:data:`tskd_utils.config.MACHINES` holds those durations, with the profiles' other machine facts.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

from tqdm.auto import tqdm

from .config import MACHINES
from .distill import KD_METHODS, run_method
from .generation import generate, synthetic_paths
from .run import Run, check_methods
from .teacher import train_teacher

STAGE_NOTEBOOK = {"teacher": "02_teacher_lora_finetuning", "synthetic": "03_diffusion_synthesis",
                  "students": "04_distillation"}
NEEDS_TEACHER = KD_METHODS  # their pretraining distills the teacher
NEEDS_SYNTHETIC = ("ts_kd", "ta_kd", "mae", "mocov3")  # their transfer set includes the synthetic images


def _fmt_minutes(m: float) -> str:
    if m < 1:
        return "under a minute"
    return f"about {m:.0f} min" if m < 90 else f"about {m / 60:.1f} h"


def estimate(run: Run, stage: str, count: int = 1) -> str:
    """How long ``stage`` takes in the run's profile ("about 5 min on 2 CPU cores"), or that it is not known."""
    m = MACHINES.get(run.profile.name)
    if m is None or m.minutes.get(stage) is None:
        return f"no time estimate for the {run.profile.name!r} profile"
    text = f"{_fmt_minutes(m.minutes[stage] * count)} {m.where} in the {run.profile.name} profile"
    if not m.measured:
        text += " (a rough guess, not measured yet)"
    if m.gpu and not run.device.startswith("cuda"):
        text += "; this machine has no GPU, so expect many times longer"
    return text


def _announce(run: Run, stage: str, what: str, count: int = 1) -> float:
    print(f"{what}, {estimate(run, stage, count)}. Notebook {STAGE_NOTEBOOK[stage]} shows this stage step by step.",
          flush=True)
    return time.perf_counter()


def _done(stage: str, t0: float) -> None:
    print(f"{stage} ready after {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


# ------------------------------------------------------------------------------ what is there


def teacher_ready(run: Run) -> bool:
    """The run has a trained teacher (both variants and the record of which one is selected)."""
    t = run.teacher_dir
    return all(p.is_file() for p in (t / "metrics.json", t / "head.safetensors", t / "frozen_head.safetensors",
                                     t / "adapter" / "adapter_config.json"))


def synthetic_ready(run: Run) -> bool:
    """The run's synthetic images are all there (or the profile asks for none)."""
    try:
        synthetic_paths(run)
        return True
    except FileNotFoundError:
        return False


def student_ready(run: Run, method: str) -> bool:
    return (run.students_dir / method / "student.safetensors").is_file()


# ------------------------------------------------------------------------------ computing them


def ensure_teacher(run: Run) -> bool:
    """Train the teacher (notebook 02's stage, the profile's LoRA config and loss) if the run has none.
    Returns True when it was trained now."""
    if teacher_ready(run):
        return False
    t0 = _announce(run, "teacher", f"No trained teacher in {run.teacher_dir}: training it now "
                                   "(tskd_utils.teacher.train_teacher, the profile's LoRA config and loss)")
    train_teacher(run)
    _done("teacher", t0)
    return True


def ensure_synthetic(run: Run) -> bool:
    """Train the DDPM and sample the synthetic images (notebook 03's stage) if the run has not got them all.
    Returns True when they were computed now."""
    if synthetic_ready(run):
        return False
    n = run.profile.diffusion.n_synthetic
    t0 = _announce(run, "synthetic", f"The {n} synthetic images are not all in {run.synthetic_dir}: generating them now "
                                     "(tskd_utils.generation.generate: the diffusion model is trained, then sampled)")
    generate(run)
    _done("synthetic images", t0)
    return True


def ensure_students(run: Run, methods: Optional[Sequence[str]] = None) -> list[str]:
    """Pretrain and fine-tune every student of ``methods`` (default all) that the run has not got (notebook
    04's stage, the default losses), first computing the teacher and synthetic images they need.
    Returns the methods trained now."""
    missing = [m for m in check_methods(methods) if not student_ready(run, m)]
    if not missing:
        return []
    if any(m in NEEDS_TEACHER for m in missing):
        ensure_teacher(run)
    if any(m in NEEDS_SYNTHETIC for m in missing):
        ensure_synthetic(run)
    t0 = _announce(run, "students", f"No trained student for {', '.join(missing)} in {run.students_dir}: training "
                                    f"{'it' if len(missing) == 1 else 'them'} now (tskd_utils.distill.run_method: "
                                    "pretraining, then fine-tuning)", count=len(missing))
    for method in tqdm(missing, desc="students", unit="method", dynamic_ncols=True):
        run_method(run, method)
    _done("students", t0)
    return missing
