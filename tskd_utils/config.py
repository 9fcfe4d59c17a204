"""Profiles and run configuration: every size, epoch count and learning rate lives here.

A *profile* says how big a run is (README, "Profiles"): ``smoke`` for tests, ``demo`` for
the embedded phantom on a 2-core CPU in minutes, ``cpu`` for real data on a laptop CPU (quality first,
about an hour or more per run on 2 cores: docs/benchmarks.md), ``colab`` for one free GPU and ``paper`` for a large GPU.  Notebooks never hard-code
these numbers; they name a profile and may override single values with dotted keys::

    profile = get_profile("demo", {"teacher.epochs": 5, "diffusion.n_synthetic": 0})
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, Optional

ENV_PREFIX = "TSKD_"
# the pipeline's notebooks (notebooks/<name>.ipynb), in the order a run executes them
NOTEBOOKS = ("01_data_preparation", "02_teacher_lora_finetuning", "03_diffusion_synthesis", "04_distillation",
             "05_evaluation")


@dataclass
class DataConfig:
    image_size: int = 128  # the student's input: longest side resized, zero-padded to a square
    val_fraction: float = 0.15  # of subjects
    test_fraction: float = 0.2  # of subjects
    max_train: Optional[int] = None  # cap on the real train pool (= real part of the transfer set)
    max_val: Optional[int] = None
    max_test: Optional[int] = None
    phantom_cases: int = 300  # cases in the embedded phantom when it is prepared by a notebook
    num_workers: int = 0


@dataclass
class TeacherConfig:
    name: str = "litemedsam"  # litemedsam | sam_vit_b | tiny
    weights: Optional[str] = None  # local checkpoint file (sam_vit_b offline)
    input_size: int = 256  # what the teacher encoder sees (LiteMedSAM: fixed 256)
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple = ("qkv",)  # module names that get adapters (qkv, proj, fc1, fc2)
    lora_stages: Optional[tuple] = None  # stages (LiteMedSAM) or blocks (ViT) with adapters; None = all
    cache_prefix: bool = False  # compute the frozen stages before the first adapter once per image
    prefix_dtype: str = "float32"  # float32 | bfloat16: the cached prefix's compute type (bf16: ~2x faster on CPU)
    cached_augmentations: int = 0  # with cache_prefix: augmented copies of each labeled case cached too
    head: str = "conv"  # conv (light upsampling decoder) | sam_decoder (LiteMedSAM's pretrained mask decoder)
    head_channels: int = 64  # conv head only
    head_epochs: int = 40  # the head on the frozen encoder's cached embeddings (the baseline, cheap)
    epochs: int = 20  # then adapters + head together (LoRA teacher)
    batch_size: int = 4
    lr: float = 1e-3
    head_lr: Optional[float] = None  # the head's learning rate while the adapters train (None: lr)
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    augment: bool = True  # on-line augmentation; with cache_prefix use cached_augmentations instead
    grad_checkpointing: bool = False  # CUDA only
    amp: bool = True  # CUDA only


@dataclass
class DiffusionConfig:
    n_synthetic: int = 40  # 0 skips the stage
    sample_size: int = 64  # the images' resolution (pixel space); samples are resized to data.image_size
    block_out_channels: tuple = (32, 64, 64)
    layers_per_block: int = 1
    attention: bool = False  # self-attention at the lowest resolution
    train_timesteps: int = 1000
    beta_schedule: str = "linear"  # DDPMScheduler's: linear | scaled_linear | squaredcos_cap_v2 (cosine)
    prediction_type: str = "epsilon"  # what the UNet predicts: epsilon (the noise) | v_prediction
    epochs: int = 30
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 1e-6  # AdamW
    max_grad_norm: float = 1.0  # gradient clipping
    flip: bool = True  # random horizontal flips of the training images
    warmup_steps: int = 50
    ema_decay: float = 0.995
    sampler: str = "ddim"  # ddim | dpm
    sampling_steps: int = 25
    sample_batch_size: int = 16
    amp: bool = True  # CUDA only


@dataclass
class StudentConfig:
    # unet_s (a U-Net student: skips at every resolution, 1.7 M) | vit_tiny (the paper's student: ViT-Tiny, 5.5 M,
    # with a light decoder from its 16x-coarser tokens) | vit_mini | unet_xs, vit_micro (tests); tskd_utils.models
    name: str = "unet_s"
    decoder_channels: int = 64  # ViT students' decoder only
    # float32 | bfloat16: the students' training (pretraining and fine-tuning) on a CPU. bf16 autocast is 1.6x
    # faster where the CPU has bf16 instructions (AVX512-BF16, AMX); elsewhere float32 is used, with a warning
    cpu_dtype: str = "float32"


@dataclass
class DistillConfig:
    epochs: int = 15
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    feature_weight: float = 1.0
    output_weight: float = 1.0
    temperature: float = 2.0
    lost_class: str = "error"  # a class the teacher finds on validation and the distilled student never predicts:
    # error (stop the stage, say what to try) | warn (print loudly and go on); tskd_utils.distill.check_classes
    n_unlabeled: Optional[int] = None  # real unlabeled images in the transfer set (None: all; 0: labeled only)
    flip: bool = True  # horizontal flips applied identically to image and cached targets
    mae_mask_ratio: float = 0.75
    mae_decoder_dim: int = 96
    mae_decoder_depth: int = 1
    moco_temperature: float = 0.2
    moco_momentum: float = 0.99
    moco_dim: int = 64
    moco_hidden: int = 256


@dataclass
class FinetuneConfig:
    epochs: int = 40
    steps_per_epoch: int = 0  # 0: one pass over the labeled cases; > 0: that many batches per epoch
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_epochs: int = 2
    augment: bool = True


@dataclass
class SupervisedConfig:
    """``unet_supervised``, the practitioner's baseline: MONAI's UNet (fixed architecture, 1.6 M parameters) trained
    from scratch on the labeled images only, with the students' augmentation and loss (Dice + CE), AdamW and a
    warm-up + cosine schedule; validation after every epoch of ``steps_per_epoch`` batches keeps the best."""
    epochs: int = 12
    steps_per_epoch: int = 125  # 1,500 steps in all: where validation Dice levels off on HC18 (docs/benchmarks.md)
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    augment: bool = True


@dataclass
class EvalConfig:
    latency_repeats: int = 20
    latency_warmup: int = 3
    n_overlay: int = 6


@dataclass
class Profile:
    name: str
    description: str
    default_n_labeled: int = 20
    device: str = "auto"  # auto | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _smoke() -> Profile:
    return Profile(
        name="smoke",
        description="tests and CI: tiny random teacher and student, 32 px, a few steps",
        default_n_labeled=6,
        device="cpu",
        data=DataConfig(image_size=32, max_train=24, max_val=6, max_test=6, phantom_cases=48),
        teacher=TeacherConfig(
            name="tiny", input_size=32, lora_rank=4, lora_alpha=8, lora_targets=("qkv", "proj"),
            lora_stages=(1,), cache_prefix=True, cached_augmentations=1, augment=False, head_channels=16,
            head_epochs=2, epochs=2,
            batch_size=4, lr=3e-3, warmup_epochs=0,
        ),
        diffusion=DiffusionConfig(
            n_synthetic=4, sample_size=16, block_out_channels=(8, 16), epochs=2, batch_size=8,
            warmup_steps=0, sampling_steps=4, sample_batch_size=4,
        ),
        student=StudentConfig(name="unet_xs", decoder_channels=16),
        distill=DistillConfig(epochs=2, batch_size=8, lr=1e-3, warmup_epochs=0, mae_decoder_dim=16, lost_class="warn",
                              moco_dim=16, moco_hidden=32),
        finetune=FinetuneConfig(epochs=2, batch_size=4, lr=1e-3, warmup_epochs=0),
        supervised=SupervisedConfig(epochs=2, steps_per_epoch=3, batch_size=4, lr=1e-3, warmup_epochs=0),
        eval=EvalConfig(latency_repeats=3, latency_warmup=1, n_overlay=3),
    )


def _demo() -> Profile:
    return Profile(
        name="demo",
        description="a laptop or 2-core CPU, no GPU, no network: LiteMedSAM teacher, small student, 128 px",
        default_n_labeled=20,
        device="auto",
        data=DataConfig(image_size=128, max_train=220, max_val=40, max_test=100, phantom_cases=180),
        # the prefix in float32: the same features on every CPU (bfloat16 is emulated, 10x slower than float32, on
        # CPUs without bf16 instructions: features.effective_prefix_dtype)
        teacher=TeacherConfig(
            name="litemedsam", input_size=256, lora_rank=8, lora_alpha=16,
            lora_targets=("qkv", "proj", "fc1", "fc2"), lora_stages=(3,), cache_prefix=True, prefix_dtype="float32",
            augment=False, cached_augmentations=2, head_epochs=30, epochs=5, batch_size=4, lr=3e-3,
            warmup_epochs=1,
        ),
        # v-prediction with the cosine schedule gets the dark background and the organ's layout in a few hundred
        # steps at 48 px where epsilon-prediction gave grey noise (benchmarks/bench_diffusion.py)
        diffusion=DiffusionConfig(
            n_synthetic=40, sample_size=48, block_out_channels=(16, 32, 64, 64), attention=True,
            beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", epochs=40, batch_size=16, lr=1e-3,
        ),
        student=StudentConfig(name="unet_s"),
        # 20 epochs of batch 8 (docs/benchmarks.md: make demo; benchmarks/bench_kd_loss.py for the output loss)
        distill=DistillConfig(epochs=20, batch_size=8, lr=1e-3),
        # 300 steps: ts_kd's validation Dice 0.940 after 96, 0.951 after 300, 0.952 after 600 (seed 0, docs/benchmarks.md)
        finetune=FinetuneConfig(epochs=12, steps_per_epoch=25, batch_size=8, lr=1e-3, warmup_epochs=1),
        # 600 steps: validation Dice levels off from step 300 on (0.952 at 300, 0.955 at 540; seed 0)
        supervised=SupervisedConfig(epochs=10, steps_per_epoch=60, batch_size=8, lr=2e-3),
    )


def _cpu() -> Profile:
    # Aimed at 45 minutes per run on 2 CPU cores; measured longer (docs/benchmarks.md, "HC18 with the U-Net
    # student": on a 2-core AVX2-only CPU ts_kd's pretraining alone took 513 s, unet_supervised 490 s, and each of the
    # five pretrained methods gets the same 20-epoch schedule on the 320 transfer images).
    return Profile(
        name="cpu",
        description="real data on a laptop CPU, quality first: LiteMedSAM teacher, a U-Net student, 256 px",
        default_n_labeled=20,
        device="auto",
        data=DataConfig(image_size=256, max_train=220, max_val=40, max_test=100, phantom_cases=300),
        # LoRA on stages (2, 3): 0.945 on HC18 validation (seeds 0 and 1) against 0.898 / 0.910 with the last stage
        # only, for 4 more minutes; 16 epochs on the last stage 0.919, rank 16 0.906, the mask decoder as head 0.929
        # (docs/benchmarks.md, benchmarks/bench_teacher_variants.py)
        teacher=TeacherConfig(
            name="litemedsam", input_size=256, lora_rank=8, lora_alpha=16,
            lora_targets=("qkv", "proj", "fc1", "fc2"), lora_stages=(2, 3), cache_prefix=True, prefix_dtype="bfloat16",
            augment=False, cached_augmentations=3, head_epochs=40, epochs=8, batch_size=4, lr=1e-3, warmup_epochs=1,
        ),
        # pixel space at 64 px (a latent model's autoencoder alone took 39 s per epoch on HC18: docs/benchmarks.md)
        diffusion=DiffusionConfig(
            n_synthetic=100, sample_size=64, block_out_channels=(16, 32, 64, 64), attention=True,
            beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", epochs=60, batch_size=16, lr=1e-3,
        ),
        # bfloat16 autocast where the CPU has bf16 instructions (float32 elsewhere, with a warning)
        student=StudentConfig(name="unet_s", cpu_dtype="bfloat16"),
        # 10 epochs were short of convergence on HC18: 20 raised ts_kd's validation Dice after distillation from 0.865
        # to 0.884 (teacher 0.898; docs/benchmarks.md, benchmarks/bench_student_schedule.py)
        distill=DistillConfig(epochs=20, batch_size=16, lr=1e-3, warmup_epochs=1),
        # 320 steps (was 128): on the demo more fine-tuning steps raised ts_kd's validation Dice by 1.1 points
        finetune=FinetuneConfig(epochs=16, steps_per_epoch=20, batch_size=8, lr=5e-4, warmup_epochs=1),
        supervised=SupervisedConfig(epochs=12, steps_per_epoch=125, batch_size=8, lr=2e-3),  # 1,500 steps
    )


def _colab() -> Profile:
    return Profile(
        name="colab",
        description="one free Colab/Kaggle GPU (T4, 15 GB): SAM ViT-B teacher, a U-Net student, 256 px, fp16",
        default_n_labeled=20,
        device="auto",
        data=DataConfig(image_size=256, max_train=None, phantom_cases=300, num_workers=2),
        teacher=TeacherConfig(
            name="sam_vit_b", input_size=256, lora_rank=8, lora_alpha=16, lora_targets=("qkv",),
            lora_stages=None, cache_prefix=False, augment=True, epochs=40, batch_size=8, lr=5e-4,
            warmup_epochs=2, grad_checkpointing=True,
        ),
        diffusion=DiffusionConfig(
            n_synthetic=500, sample_size=128, block_out_channels=(64, 128, 256, 256),
            layers_per_block=2, attention=True, epochs=150, batch_size=32, lr=2e-4, warmup_steps=500,
            ema_decay=0.999, sampling_steps=50, sample_batch_size=64,
        ),
        student=StudentConfig(name="unet_s"),
        distill=DistillConfig(epochs=100, batch_size=32, lr=5e-4, warmup_epochs=5),
        finetune=FinetuneConfig(epochs=100, batch_size=8, lr=3e-4, warmup_epochs=5),
    )


def _paper() -> Profile:
    return Profile(
        name="paper",
        description="a large GPU: SAM ViT-B at its native 1024 px, a U-Net student at 256 px, long schedules",
        default_n_labeled=80,
        device="auto",
        data=DataConfig(image_size=256, phantom_cases=1000, num_workers=8),
        teacher=TeacherConfig(
            name="sam_vit_b", input_size=1024, lora_rank=8, lora_alpha=16, lora_targets=("qkv",),
            lora_stages=None, cache_prefix=False, augment=True, epochs=100, batch_size=8, lr=5e-4,
            warmup_epochs=5, grad_checkpointing=True,
        ),
        diffusion=DiffusionConfig(
            n_synthetic=2000, sample_size=256, block_out_channels=(64, 128, 256, 256, 512),
            layers_per_block=2, attention=True, epochs=300, batch_size=32, lr=1e-4, warmup_steps=1000,
            ema_decay=0.9999, sampling_steps=50, sample_batch_size=64,
        ),
        student=StudentConfig(name="unet_s"),
        distill=DistillConfig(epochs=300, batch_size=64, lr=5e-4, warmup_epochs=10),
        finetune=FinetuneConfig(epochs=200, batch_size=8, lr=3e-4, warmup_epochs=10),
    )


PROFILES = {"smoke": _smoke, "demo": _demo, "cpu": _cpu, "colab": _colab, "paper": _paper}


@dataclass(frozen=True)
class Machine:
    """What a profile is sized for, beside its training settings: the one place for the facts the stages, the sweep's
    schedulers and the environment's hints use."""
    where: str  # the machine the profile is for, as printed ("on 2 CPU cores")
    gpu: bool  # sized for a GPU: hours or days on a CPU (environment.hints says so)
    cpus: int  # what one run asks a scheduler (Ray, SLURM) for
    gpus: int
    slurm_minutes: int  # SLURM's default time limit per run
    minutes: dict  # minutes per stage when stages.ensure_* computes it (students: per method)
    measured: bool  # the minutes were measured (else a rough guess, printed as such)


# Minutes: smoke on 2 busy CPU cores (tests/test_notebooks_alone.py); demo: notebooks 02, 03 and 04 of a fresh
# clone's `make demo` on 2 CPU cores without AVX-512 (docs/benchmarks.md, commit 3340799: 8.2, 10.5 and 15.5 min for
# 7 methods; update these when the demo profile is re-timed); cpu: the HC18 sweep run of docs/benchmarks.md
# (n_labeled 20, seed 0); colab and paper: rough guesses, not measured yet.
MACHINES = {
    "smoke": Machine("on 2 CPU cores", False, 1, 0, 30, {"teacher": 0.2, "synthetic": 0.2, "students": 0.1}, True),
    "demo": Machine("on 2 CPU cores", False, 2, 0, 3 * 60, {"teacher": 8, "synthetic": 10.5, "students": 2.2}, True),
    "cpu": Machine("on 2 CPU cores", False, 2, 0, 4 * 60, {"teacher": 10, "synthetic": 11.5, "students": 9}, True),
    "colab": Machine("on a T4 GPU", True, 4, 1, 24 * 60, {"teacher": 10, "synthetic": 25, "students": 10}, False),
    "paper": Machine("on a large GPU", True, 8, 1, 72 * 60, {"teacher": 60, "synthetic": 180, "students": 60}, False),
}


def _coerce(value: Any, current: Any, key: str) -> Any:
    """Convert an override (often a string from the command line) to the type of the default."""
    if isinstance(value, str):
        if current is None or isinstance(current, (tuple, list)):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        elif isinstance(current, bool):
            low = value.strip().lower()
            if low not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(f"override {key}={value!r}: expected true or false")
            return low in {"true", "1", "yes"}
        elif isinstance(current, (int, float)):
            try:
                return type(current)(value)
            except ValueError:
                raise ValueError(f"override {key}={value!r}: expected "
                                 f"{'an integer' if isinstance(current, int) else 'a number'}") from None
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ValueError(f"override {key}={value!r}: expected true or false")
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"override {key}={value!r}: expected an integer")
        return int(value)
    return value


# ------------------------------------------------------------------------------- the settings' schema

_INF = float("inf")
# The valid range of every number (a field named by its last part holds in every section; a dotted name overrides
# it): (low, high) inclusive, or (low, high, "above") for low < value <= high. Integers stay integers, floats must be
# finite; Optional[...] fields also take None.
_POS = (0.0, 10.0, "above")
RANGES: dict[str, tuple] = {
    "epochs": (1, 100_000), "head_epochs": (1, 100_000),
    "warmup_epochs": (0, 100_000), "warmup_steps": (0, 10_000_000), "steps_per_epoch": (0, 10_000_000),
    "batch_size": (1, 65_536), "sample_batch_size": (1, 65_536),
    "lr": _POS, "head_lr": _POS, "weight_decay": (0.0, 10.0), "max_grad_norm": (0.0, _INF, "above"),
    "image_size": (16, 4096), "input_size": (16, 4096), "sample_size": (8, 4096),
    "max_train": (1, _INF), "max_val": (1, _INF), "max_test": (1, _INF),
    "data.val_fraction": (0.0, 0.9, "above"), "data.test_fraction": (0.0, 0.9, "above"), "data.phantom_cases": (10, 1_000_000),
    "num_workers": (0, 256),
    "lora_rank": (1, 4096), "lora_alpha": (0.0, 1e6, "above"), "lora_dropout": (0.0, 0.99), "cached_augmentations": (0, 1000),
    "head_channels": (1, 4096), "decoder_channels": (1, 4096),
    "n_synthetic": (0, 10_000_000), "layers_per_block": (1, 16), "train_timesteps": (2, 100_000),
    "ema_decay": (0.0, 1.0), "sampling_steps": (1, 100_000),
    "feature_weight": (0.0, 1e6), "output_weight": (0.0, 1e6), "temperature": (0.0, 1e3, "above"),
    "n_unlabeled": (0, _INF), "mae_mask_ratio": (0.0, 0.99), "mae_decoder_dim": (1, 4096),
    "mae_decoder_depth": (1, 64), "moco_temperature": (0.0, 1e3, "above"), "moco_momentum": (0.0, 1.0), "moco_dim": (1, 4096),
    "moco_hidden": (1, 65_536),
    "latency_repeats": (1, 100_000), "latency_warmup": (0, 100_000), "n_overlay": (0, 10_000),
    "default_n_labeled": (1, _INF),
}
# The values a text setting takes (teacher and student names are checked by tskd_utils.models, which owns them)
CHOICES: dict[str, tuple] = {
    "device": ("auto", "cpu", "cuda"),
    "teacher.prefix_dtype": ("float32", "bfloat16"), "student.cpu_dtype": ("float32", "bfloat16"),
    "teacher.head": ("conv", "sam_decoder"),
    "teacher.lora_targets": ("qkv", "proj", "fc1", "fc2"),  # each item
    "diffusion.beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "diffusion.prediction_type": ("epsilon", "v_prediction"), "diffusion.sampler": ("ddim", "dpm"),
    "distill.lost_class": ("error", "warn"),
}


def _in_range(value: float, bounds: tuple) -> bool:
    low, high, *above = bounds
    return (low < value if above else low <= value) and value <= high


def _fmt_range(bounds: tuple) -> str:
    low, high, *above = bounds
    return ("above " if above else "from ") + f"{low:g}" + ("" if high == _INF else f" to {high:g}")


def _check_value(key: str, value: Any, hint: Any) -> None:
    """One setting against its annotated type, RANGES and CHOICES; ValueError naming the key, value and range."""
    optional = type(None) in getattr(hint, "__args__", ())
    if value is None:
        if optional:
            return
        raise ValueError(f"setting {key}=None: a value is required")
    base = next((a for a in getattr(hint, "__args__", (hint,)) if a is not type(None)), hint)
    base = getattr(base, "__origin__", base)
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          str: lambda v: isinstance(v, str), tuple: lambda v: isinstance(v, tuple)}.get(base, lambda v: True)
    if not ok(value):
        want = {bool: "true or false", int: "an integer", float: "a finite number", str: "a text",
                tuple: "a list"}.get(base, str(base))
        raise ValueError(f"setting {key}={value!r}: expected {want}")
    bounds = RANGES.get(key, RANGES.get(key.rsplit(".", 1)[-1]))
    if bounds is not None and base in (int, float) and not _in_range(value, bounds):
        raise ValueError(f"setting {key}={value!r} is out of range: valid {_fmt_range(bounds)}")
    choices = CHOICES.get(key)
    if choices is not None:
        for item in value if isinstance(value, tuple) else (value,):
            if item not in choices:
                raise ValueError(f"setting {key}={value!r}: {item!r} is not one of {', '.join(map(str, choices))}")


def check_profile(profile: Profile) -> Profile:
    """Every setting of ``profile`` checked for type and range before any work (``ValueError`` naming the setting,
    its value and the valid range); also the settings that only make sense together."""

    def walk(node: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(node))
        for f in fields(node):
            value, key = getattr(node, f.name), prefix + f.name
            if is_dataclass(value):
                walk(value, key + ".")
            elif f.name not in LABEL_KEYS or prefix:
                _check_value(key, value, hints[f.name])

    walk(profile, "")
    d = profile.data
    if d.val_fraction + d.test_fraction >= 0.95:
        raise ValueError(f"settings data.val_fraction={d.val_fraction} + data.test_fraction={d.test_fraction} leave "
                         f"no training cases: keep their sum below 0.95")
    if d.image_size % 16:
        raise ValueError(f"setting data.image_size={d.image_size}: must be a multiple of 16 (the U-Nets halve it "
                         f"four times)")
    stages = profile.teacher.lora_stages
    if stages is not None and (not stages or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                                 for s in stages)):
        raise ValueError(f"setting teacher.lora_stages={stages!r}: a list of stage numbers >= 0, or null for all")
    return profile


def apply_overrides(profile: Profile, overrides: Optional[dict] = None) -> Profile:
    """Return a copy of ``profile`` with dotted-key overrides applied (``{"teacher.epochs": 3}``)."""
    profile = profile_from_dict(profile_to_dict(profile))
    for key, value in (overrides or {}).items():
        if key in RETIRED:
            raise KeyError(f"profile setting {key!r} no longer exists: it belonged to {RETIRED[key][1]}")
        parts = key.split(".")
        target = profile
        for part in parts[:-1]:
            if not is_dataclass(target) or part not in {f.name for f in fields(target)}:
                raise KeyError(f"unknown profile setting {key!r}; valid keys: {', '.join(valid_keys())}")
            target = getattr(target, part)
        name = parts[-1]
        if not is_dataclass(target) or name not in {f.name for f in fields(target)} or is_dataclass(
                getattr(target, name)):
            raise KeyError(f"unknown profile setting {key!r}; valid keys: {', '.join(valid_keys())}")
        setattr(target, name, _coerce(value, getattr(target, name), key))
    return check_profile(profile)


def valid_keys(obj: Any = None, prefix: str = "") -> list[str]:
    obj = obj if obj is not None else _smoke()
    keys = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            keys += valid_keys(value, f"{prefix}{f.name}.")
        elif f.name not in {"name", "description"}:
            keys.append(prefix + f.name)
    return keys


def get_profile(name: Optional[str] = None, overrides: Optional[dict] = None) -> Profile:
    """The named profile (default: ``$TSKD_PROFILE`` or ``demo``) with overrides applied."""
    name = name or os.environ.get(ENV_PREFIX + "PROFILE", "demo")
    if name not in PROFILES:
        raise KeyError(f"unknown profile {name!r}; choose one of: {', '.join(PROFILES)}")
    return apply_overrides(PROFILES[name](), overrides)


def profile_to_dict(profile: Profile) -> dict:
    return asdict(profile)


LABEL_KEYS = ("name", "description")  # a profile's words, not its settings: no result depends on them

# Settings this version no longer has, each with the value every profile gave it (``why``: what went with it). A run
# folder that records one of them at that value (config.json, a stage's inputs.json) is unchanged by the removal:
# the sweep's drift check and the stages' reuse leave it out, so nothing is trained again. Recorded at another value,
# it still counts as a difference, and an override naming it gets an error saying what was removed.
RETIRED = {key: (value, "latent diffusion (an AutoencoderKL under the DDPM), which no profile used: removed after "
                        "commit 83a7a54") for key, value in {
    "diffusion.latent": False, "diffusion.vae_block_out_channels": [32, 64, 64], "diffusion.latent_channels": 4,
    "diffusion.vae_epochs": 30, "diffusion.vae_lr": 1e-3, "diffusion.vae_kl_weight": 1e-6}.items()}


def is_retired(key: str, value: Any) -> bool:
    """``key`` (dotted) is a removed setting and ``value`` (as read from JSON) the one every run used."""
    return key in RETIRED and json.loads(json.dumps(value)) == RETIRED[key][0]


def without_retired(node: Any, prefix: str = "") -> Any:
    """Nested settings (a stage's inputs, a resolved profile) without the retired settings at their old value."""
    if not isinstance(node, dict):
        return node
    return {k: without_retired(v, f"{prefix}{k}.") for k, v in node.items() if not is_retired(f"{prefix}{k}", v)}


def flat_settings(node, prefix: str = "") -> dict:
    """A profile's settings, from the nested dict of config.json's ``resolved_profile``, as ``{"section.key":
    value}``; its name and description (LABEL_KEYS) are left out: no result depends on them."""
    if not isinstance(node, dict):
        return {} if is_retired(prefix, node) else {prefix: node}
    out = {}
    for key, value in node.items():
        if prefix or key not in LABEL_KEYS:
            out.update(flat_settings(value, f"{prefix}.{key}" if prefix else key))
    return out


def profile_from_dict(d: dict) -> Profile:
    def build(cls, values):
        kwargs = {}
        known = {f.name: f for f in fields(cls)}
        for key, value in values.items():
            if key not in known:
                raise KeyError(f"unknown profile setting {key!r} in {cls.__name__}")
            sub = known[key].default_factory if known[key].default_factory is not dataclasses.MISSING else None
            if sub is not None and is_dataclass(sub):
                value = build(sub, value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)

    return build(Profile, d)


def resolve_device(profile: Profile) -> str:
    import torch

    if profile.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if profile.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"profile {profile.name!r} asks for device='cuda' but no CUDA GPU is visible")
    return profile.device


def env_default(name: str, default: Any) -> Any:
    """Read ``TSKD_<NAME>`` from the environment, typed like ``default`` (for notebooks' parameters).

    The notebooks' defaults (profile, data root, run folder) come from :mod:`tskd_utils.environment`
    (Colab, Kaggle or local; GPU or not); a ``TSKD_<NAME>`` the user set always wins. A value that does
    not fit the type of the default is an error naming the variable.
    """
    var = ENV_PREFIX + name.upper()
    raw = os.environ.get(var)
    if raw is None or raw.strip() == "":
        return default
    if isinstance(default, bool):
        low = raw.strip().lower()
        if low not in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            raise ValueError(f"{var}={raw!r}: expected true or false (1/0, yes/no, on/off)")
        return low in {"1", "true", "yes", "on"}
    try:
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r}: expected {'an integer' if isinstance(default, int) else 'a number'}") from None
    if isinstance(default, (list, tuple)):
        return [s.strip() for s in raw.split(",") if s.strip()]
    return raw


__all__ = [
    "DataConfig", "TeacherConfig", "DiffusionConfig", "StudentConfig", "DistillConfig", "FinetuneConfig",
    "SupervisedConfig",
    "EvalConfig", "Profile", "PROFILES", "NOTEBOOKS", "get_profile", "apply_overrides", "profile_to_dict",
    "profile_from_dict", "without_retired", "RETIRED", "resolve_device", "env_default", "valid_keys", "replace", "check_profile", "RANGES",
    "CHOICES",
]
