"""One resumable epoch loop shared by every training stage (teacher, DDPM, pretraining, fine-tuning).

A :class:`Stage` owns a folder. After every epoch it writes a checkpoint (weights as
safetensors; optimizer, scheduler, epoch, history and RNG state in ``state.pt``), the training
log (``log.csv``) and, when a monitored validation metric improves, ``best.safetensors``. Re-running
a stage resumes after the last finished epoch; a finished stage (``done.json``) is reused, not
retrained, unless ``force=True``. Checkpoints are written to a temporary folder and swapped in, so
an interruption never leaves a half-written checkpoint.

The stage reseeds torch, numpy and random at the start of every epoch from (seed, epoch), so an
interrupted and resumed run follows the same random stream as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .io import read_json, write_json

STOP_ENV = "TSKD_STOP_AFTER_EPOCH"  # fault injection for tests: "<stage dir name>:<epoch>"


class StageInterrupted(RuntimeError):
    """Raised when a stage is stopped on purpose after an epoch (tests / fault injection)."""


# ----------------------------------------------------------------------------- seeding & RNG


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------- weights I/O


def _flat_state(modules: dict) -> dict:
    flat = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            if isinstance(value, torch.Tensor):
                flat[f"{name}.{key}"] = value.detach().to("cpu").contiguous()
    return flat


def save_weights(path: Path, modules: dict, metadata: Optional[dict] = None) -> None:
    """Save the state of several modules into one safetensors file (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    flat = _flat_state(modules)
    # safetensors refuses tensors that share memory; clone those
    seen, out = {}, {}
    for k, v in flat.items():
        ptr = (v.data_ptr(), v.numel())
        out[k] = v.clone() if ptr in seen else v
        seen[ptr] = k
    save_file(out, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)


def load_weights(path: Path, modules: dict, strict: bool = True) -> None:
    flat = load_file(str(path))
    for name, module in modules.items():
        prefix = name + "."
        sd = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        missing = module.load_state_dict(sd, strict=strict)
        if strict is False and missing is not None:
            pass


class StateOf:
    """Adapter giving a state_dict/load_state_dict pair to something that is not a module
    (e.g. only the LoRA weights of a peft model)."""

    def __init__(self, get: Callable[[], dict], set_: Callable[[dict], object]):
        self._get, self._set = get, set_

    def state_dict(self) -> dict:
        return self._get()

    def load_state_dict(self, sd: dict, strict: bool = True):
        return self._set(sd)


# ---------------------------------------------------------------------------- schedules & AMP


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_factor: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to ``min_factor`` of the base learning rate."""
    total_steps = max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device: str, enabled: bool = True):
    """fp16 autocast on CUDA when enabled; a no-op on CPU."""
    if device.startswith("cuda") and enabled:
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def grad_scaler(device: str, enabled: bool = True):
    return torch.amp.GradScaler("cuda", enabled=device.startswith("cuda") and enabled)


# ------------------------------------------------------------------------------------ stage


class Stage:
    """A resumable, checkpointed epoch loop.

    ``train_epoch(epoch) -> dict`` trains one epoch and returns its metrics (e.g. loss);
    ``validate() -> dict`` (optional) returns validation metrics; ``monitor`` names the one that
    picks the best checkpoint (``mode`` "max" or "min").
    """

    def __init__(self, directory: os.PathLike, modules: dict, optimizer: Optional[torch.optim.Optimizer],
                 epochs: int, seed: int = 0, scheduler=None, scaler=None, monitor: Optional[str] = None,
                 mode: str = "max", desc: Optional[str] = None, force: bool = False,
                 extra_state: Optional[dict] = None):
        self.dir = Path(directory)
        self.modules, self.optimizer, self.scheduler, self.scaler = modules, optimizer, scheduler, scaler
        self.epochs, self.seed, self.monitor, self.mode = int(epochs), int(seed), monitor, mode
        self.desc = desc or self.dir.name
        self.extra_state = extra_state or {}  # name -> object with state_dict/load_state_dict (e.g. EMA)
        self.history: list[dict] = []
        self.best: Optional[float] = None
        self.start_epoch = 0
        if force:
            self.reset()

    # -- paths ---------------------------------------------------------------------------
    @property
    def ckpt(self) -> Path:
        return self.dir / "checkpoint"

    @property
    def done_path(self) -> Path:
        return self.dir / "done.json"

    @property
    def best_path(self) -> Path:
        return self.dir / "best.safetensors"

    @property
    def final_path(self) -> Path:
        return self.dir / "final.safetensors"

    @property
    def done(self) -> bool:
        return self.done_path.is_file()

    def reset(self) -> None:
        for p in (self.ckpt, self.dir / "checkpoint.tmp", self.dir / "checkpoint.old"):
            shutil.rmtree(p, ignore_errors=True)
        for p in (self.done_path, self.best_path, self.final_path, self.dir / "log.csv"):
            p.unlink(missing_ok=True)

    # -- checkpointing ---------------------------------------------------------------------
    def _better(self, value: float) -> bool:
        if self.best is None or not math.isfinite(self.best):
            return math.isfinite(value)
        return value > self.best if self.mode == "max" else value < self.best

    def _save_checkpoint(self, epoch: int) -> None:
        tmp, old = self.dir / "checkpoint.tmp", self.dir / "checkpoint.old"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_weights(tmp / "last.safetensors", self.modules, {"epoch": epoch})
        state = {
            "epoch": epoch,
            "history": self.history,
            "best": self.best,
            "rng": rng_state(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "extra": {k: v.state_dict() for k, v in self.extra_state.items()},
        }
        torch.save(state, tmp / "state.pt")
        if self.ckpt.exists():
            shutil.rmtree(old, ignore_errors=True)
            self.ckpt.rename(old)
        tmp.rename(self.ckpt)
        shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self) -> bool:
        ckpt = self.ckpt
        if not (ckpt / "state.pt").is_file() and (self.dir / "checkpoint.old" / "state.pt").is_file():
            ckpt = self.dir / "checkpoint.old"  # interrupted between the two renames
        if not (ckpt / "state.pt").is_file():
            return False
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        load_weights(ckpt / "last.safetensors", self.modules)
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        for k, v in self.extra_state.items():
            if k in (state.get("extra") or {}):
                v.load_state_dict(state["extra"][k])
        set_rng_state(state["rng"])
        self.start_epoch, self.history, self.best = int(state["epoch"]), list(state["history"]), state["best"]
        return True

    def _write_log(self) -> None:
        if not self.history:
            return
        keys = []
        for row in self.history:
            keys += [k for k in row if k not in keys]
        tmp = self.dir / ".log.csv.tmp"
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(self.history)
        tmp.replace(self.dir / "log.csv")

    def load_final(self) -> list[dict]:
        """Load the finished stage's chosen weights (best if monitored, else final)."""
        info = read_json(self.done_path)
        path = self.best_path if self.monitor and self.best_path.is_file() else self.final_path
        load_weights(path, self.modules)
        self.history = info.get("history", [])
        return self.history

    # -- the loop --------------------------------------------------------------------------
    def run(self, train_epoch: Callable[[int], dict], validate: Optional[Callable[[], dict]] = None) -> list[dict]:
        if self.done:
            print(f"[{self.desc}] finished earlier: reusing {self.dir} (force=True retrains)")
            return self.load_final()
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._load_checkpoint():
            print(f"[{self.desc}] resuming after epoch {self.start_epoch}/{self.epochs} from {self.ckpt}")
        stop = os.environ.get(STOP_ENV, "")
        bar = tqdm(range(self.start_epoch, self.epochs), desc=self.desc, initial=self.start_epoch,
                   total=self.epochs, unit="epoch", dynamic_ncols=True)
        for epoch in bar:
            seed_everything(self.seed * 100_003 + epoch)
            t0 = time.perf_counter()
            row = {"epoch": epoch + 1}
            row.update(train_epoch(epoch) or {})
            if validate is not None:
                row.update(validate() or {})
            if self.optimizer is not None:
                row["lr"] = self.optimizer.param_groups[0]["lr"]
            row["seconds"] = round(time.perf_counter() - t0, 3)
            self.history.append(row)
            if self.monitor is not None and self._better(float(row[self.monitor])):
                self.best = float(row[self.monitor])
                save_weights(self.best_path, self.modules, {"epoch": epoch + 1, self.monitor: self.best})
            self._save_checkpoint(epoch + 1)
            self._write_log()
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "lr"})
            if stop == f"{self.dir.name}:{epoch + 1}":
                bar.close()
                raise StageInterrupted(f"[{self.desc}] stopped after epoch {epoch + 1} ({STOP_ENV}={stop})")
        bar.close()
        save_weights(self.final_path, self.modules, {"epoch": self.epochs})
        write_json(self.done_path, {"epochs": self.epochs, "monitor": self.monitor, "best": self.best,
                                    "history": self.history,
                                    "seconds": round(sum(r.get("seconds", 0) for r in self.history), 2)})
        if self.monitor is not None and self.best_path.is_file():
            load_weights(self.best_path, self.modules)
        return self.history


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def history_of(stage_dir: os.PathLike) -> list[dict]:
    """The per-epoch log of a stage folder (finished or not)."""
    stage_dir = Path(stage_dir)
    if (stage_dir / "done.json").is_file():
        return read_json(stage_dir / "done.json").get("history", [])
    log = stage_dir / "log.csv"
    if log.is_file():
        with log.open() as fh:
            return [{k: float(v) if v not in ("", None) else None for k, v in row.items()} for row in csv.DictReader(fh)]
    return []
