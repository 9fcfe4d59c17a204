"""One resumable epoch loop shared by every training stage (teacher, DDPM, pretraining, fine-tuning).

The loop's body is the caller's (``for epoch in stage.epochs(...): ...; epoch.log(loss=...)``, as notebooks 02-04
write it); everything around it is here. A :class:`Stage` owns a folder and records the **inputs** it was trained from (fingerprints of
upstream weights, caches, the split, the settings it reads, the loss function's source). After
every epoch it writes a checkpoint (weights as safetensors; optimizer, scheduler, epoch and
history in ``state.pt``), the training log (``log.csv``) and, when a monitored validation metric
improves, ``best.safetensors``. Re-running a stage resumes after the last finished epoch; a
finished stage (``done.json``) is reused, not retrained, while its inputs are unchanged. When any
input changed, the stage says which and starts over (``force=True`` always starts over).
Checkpoints are written to a temporary folder and swapped in, so an interruption never leaves a
half-written checkpoint; the per-epoch checkpoint is removed once the stage has finished.

The stage reseeds torch, numpy and random at the start of every epoch from (seed, epoch), so an
interrupted and resumed run follows the same random stream as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .config import without_retired
from .io import DataError, read_json, save_safetensors, sha256sum, write_json

STOP_ENV = "TSKD_STOP_AFTER_EPOCH"  # fault injection for tests: "<stage dir name>:<epoch>"


class StageInterrupted(RuntimeError):
    """Raised when a stage is stopped on purpose after an epoch (tests / fault injection)."""


class DivergedError(RuntimeError):
    """A stage's loss or weights became non-finite (NaN or inf): it stops, keeping its last good checkpoint."""


def non_finite(row: dict, modules: dict) -> Optional[str]:
    """What is not finite after an epoch: a metric of ``row`` or a weight of ``modules`` (modules, or objects with
    a ``state_dict`` such as LoRA adapters' :class:`StateOf`); None if all are. The training metrics are named
    first, then the weights, then the validation metrics (``val*``: non-finite weights make those non-finite)."""
    def metric(validation: bool) -> Optional[str]:
        for key, value in row.items():
            if key.startswith("val") == validation and isinstance(value, float) and not math.isfinite(value):
                return f"{key} = {value}"
        return None

    found = metric(False)
    if found:
        return found
    for name, module in modules.items():
        if isinstance(module, torch.nn.Module):
            tensors = ((k, p.detach()) for k, p in module.named_parameters())
        elif hasattr(module, "state_dict"):
            tensors = ((k, v) for k, v in module.state_dict().items() if torch.is_tensor(v))
        else:
            continue
        for pname, t in tensors:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"parameter {name}.{pname} holds {int((~torch.isfinite(t)).sum())} non-finite values"
    return metric(True)


# ------------------------------------------------------------------------------ seeds & digests


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def derive_seed(seed: int, *labels: str) -> int:
    """A seed of its own for each (run seed, stage, method): independent streams that do not depend on
    which other stages ran before in the same process (so a resumed run equals an uninterrupted one)."""
    words = [int.from_bytes(hashlib.sha256(str(label).encode()).digest()[:4], "little") for label in labels]
    return int(np.random.SeedSequence([int(seed), *words]).generate_state(1)[0] % (2 ** 31))


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block (building randomly initialised modules) under its own seed, leaving the global
    random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def file_digest(path: os.PathLike) -> str:
    """The first 16 hex digits of a file's SHA-256 ("missing" when absent)."""
    path = Path(path)
    return sha256sum(path)[:16] if path.is_file() else "missing"


def source_digest(fn: Callable) -> str:
    """A digest of a function's source code: a loss edited in a notebook makes its stage recompute."""
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        text = repr((code.co_code, code.co_consts)) if code is not None else repr(fn)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def value_digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} -> {b!r})" if not isinstance(a, str) or len(str(a)) < 20
                       else f"{prefix}{key}")
    return out


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
    flat = _flat_state(modules)
    seen, out = set(), {}  # safetensors refuses tensors that share memory; clone those
    for k, v in flat.items():
        ptr = (v.data_ptr(), v.numel())
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    save_safetensors(path, out, metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_weights(path: Path, modules: dict, strict: bool = True) -> None:
    """Load modules saved by :func:`save_weights`; a missing or damaged file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        flat = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable safetensors file ({e}); delete it and re-run its stage") from None
    for name, module in modules.items():
        prefix = name + "."
        sd = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(sd, strict=strict)
        except RuntimeError as e:
            raise DataError(f"{path}: its {name!r} weights do not fit the model ({str(e).splitlines()[0]})") from None


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


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up, then cosine decay to zero (diffusers' ``get_cosine_schedule_with_warmup``)."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, warmup_steps, max(total_steps, 1))


CPU_DTYPES = ("float32", "bfloat16")
_BF16_WARNED: set = set()  # the settings whose float32 fallback was warned about (once per process each)


def cpu_bf16_supported() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX). Only there is bf16 autocast faster
    (measured 1.6x for ViT-Tiny at 256 px, docs/benchmarks.md); elsewhere it is emulated and slower."""
    try:  # not mkldnn's bf16 check: it says yes on any AVX-512 CPU, where bf16 is still emulated
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16_or_float32(setting: str, what: str) -> str:
    """``bfloat16`` where the CPU has bf16 instructions, else ``float32``, with one warning per ``setting`` (the profile
    setting that asked for bfloat16; ``what`` is the work that runs in float32 instead)."""
    if cpu_bf16_supported():
        return "bfloat16"
    if setting not in _BF16_WARNED:
        _BF16_WARNED.add(setting)
        warnings.warn(f"{setting}='bfloat16' asked for, but this CPU has no bfloat16 instructions (emulated bf16 is "
                      f"several times slower): {what} in float32; results may differ slightly from a bf16 CPU's",
                      stacklevel=3)
    return "float32"


def compute_dtype(device: str, cpu_dtype: str = "float32") -> str:
    """The type training really computes in: float16 on CUDA (AMP), on CPU ``cpu_dtype`` where the CPU
    supports it (bfloat16 falls back to float32 with a warning where it has no bf16 instructions)."""
    if cpu_dtype not in CPU_DTYPES:
        raise ValueError(f"unknown student.cpu_dtype {cpu_dtype!r}; choose one of: {', '.join(CPU_DTYPES)}")
    if device.startswith("cuda"):
        return "float16"
    return cpu_bf16_or_float32("student.cpu_dtype", "the students train") if cpu_dtype == "bfloat16" else cpu_dtype


def autocast(device: str, enabled: bool = True, cpu_dtype: str = "float32"):
    """fp16 autocast on CUDA when enabled; on CPU bf16 autocast when ``cpu_dtype`` is bfloat16 (see
    :func:`compute_dtype`), else a no-op."""
    if device.startswith("cuda") and enabled:
        return torch.autocast("cuda", dtype=torch.float16)
    if device == "cpu" and enabled and cpu_dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def grad_scaler(device: str, enabled: bool = True):
    """A GradScaler for fp16 on CUDA; disabled (a pass-through) elsewhere."""
    return torch.amp.GradScaler("cuda", enabled=device.startswith("cuda") and enabled)


def optimizer_step(loss: torch.Tensor, optimizer, scaler, scheduler=None, params=None,
                   max_grad_norm: Optional[float] = None) -> None:
    """backward, optional gradient clipping, step, scaler update, scheduler step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if max_grad_norm is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    if scheduler is not None:
        scheduler.step()


# ------------------------------------------------------------------------------------ stage


@dataclass
class Epoch:
    """One epoch of :meth:`Stage.epochs`: ``index`` counts from 0; :meth:`log` records what the loop measured."""

    index: int
    metrics: dict = field(default_factory=dict)

    def log(self, **metrics) -> None:
        self.metrics.update(metrics)


class Stage:
    """A resumable, checkpointed epoch loop in ``directory`` that knows what it was trained from.

    ``inputs`` (JSON-able: digests and settings) are compared with those recorded by an earlier
    run in the folder (settings this version removed, recorded at the value every run had, are left out:
    ``config.RETIRED``); a difference resets the stage with a printed reason. Use :attr:`finished`
    to skip preparing data for a stage that will be reused, then :meth:`load_final`; else write the
    loop over :meth:`epochs` (or pass the epoch's body to :meth:`train`).
    """

    def __init__(self, directory: os.PathLike, inputs: Optional[dict] = None, desc: Optional[str] = None,
                 force: bool = False, ignore: Sequence[str] = ()):
        self.dir = Path(directory)
        self.desc = desc or self.dir.name
        self.inputs = json.loads(json.dumps(inputs or {}, sort_keys=True, default=str))
        self.ignore = tuple(ignore)  # inputs a caller does not care about (e.g. "loss": any finished training will do)
        self.history: list[dict] = []
        self.best: Optional[float] = None
        self.start_epoch = 0
        if force:
            if self.dir.exists():
                print(f"[{self.desc}] force=True: starting over")
            self.reset()
        else:
            reason = self.stale_reason()
            if reason:
                print(f"[{self.desc}] inputs changed since {self.dir} was trained ({reason}): recomputing")
                self.reset()

    # -- paths & state ----------------------------------------------------------------------
    ckpt = property(lambda self: self.dir / "checkpoint")
    done_path = property(lambda self: self.dir / "done.json")
    best_path = property(lambda self: self.dir / "best.safetensors")
    final_path = property(lambda self: self.dir / "final.safetensors")
    inputs_path = property(lambda self: self.dir / "inputs.json")

    @property
    def finished(self) -> bool:
        return self.done_path.is_file() and self.final_path.is_file()

    @property
    def weights_path(self) -> Path:
        """The chosen weights of a finished stage: best if it monitored a metric, else final."""
        return self.best_path if self.best_path.is_file() else self.final_path

    def stale_reason(self) -> Optional[str]:
        if not self.inputs_path.is_file():
            return "no record of its inputs" if self.done_path.is_file() else None
        recorded = {k: v for k, v in without_retired(read_json(self.inputs_path)).items() if k not in self.ignore}
        if recorded == {k: v for k, v in self.inputs.items() if k not in self.ignore}:
            if self.done_path.is_file() and not self.final_path.is_file():
                return f"{self.final_path.name} is missing"
            return None
        return ", ".join(_changes(recorded, {k: v for k, v in self.inputs.items() if k not in self.ignore})) or \
            "inputs differ"

    def reset(self) -> None:
        for p in (self.ckpt, self.dir / "checkpoint.tmp", self.dir / "checkpoint.old"):
            shutil.rmtree(p, ignore_errors=True)
        for p in (self.done_path, self.best_path, self.final_path, self.dir / "log.csv", self.inputs_path):
            p.unlink(missing_ok=True)

    # -- checkpointing ---------------------------------------------------------------------
    def _better(self, value: float, mode: str) -> bool:
        if self.best is None or not math.isfinite(self.best):
            return math.isfinite(value)
        return value > self.best if mode == "max" else value < self.best

    def _save_checkpoint(self, epoch: int, modules: dict, parts: dict) -> None:
        tmp, old = self.dir / "checkpoint.tmp", self.dir / "checkpoint.old"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_weights(tmp / "last.safetensors", modules, {"epoch": epoch})
        state = {"epoch": epoch, "history": self.history, "best": self.best,
                 **{k: (v.state_dict() if v is not None else None) for k, v in parts.items()}}
        torch.save(state, tmp / "state.pt")
        if self.ckpt.exists():
            shutil.rmtree(old, ignore_errors=True)
            self.ckpt.rename(old)
        tmp.rename(self.ckpt)
        shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, modules: dict, parts: dict) -> bool:
        ckpt = self.ckpt
        if not (ckpt / "state.pt").is_file() and (self.dir / "checkpoint.old" / "state.pt").is_file():
            ckpt = self.dir / "checkpoint.old"  # interrupted between the two renames
        if not (ckpt / "state.pt").is_file():
            return False
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        load_weights(ckpt / "last.safetensors", modules)
        for k, v in parts.items():
            if v is not None and state.get(k) is not None:
                v.load_state_dict(state[k])
        self.start_epoch, self.history, self.best = int(state["epoch"]), list(state["history"]), state["best"]
        return True

    def _write_log(self) -> None:
        keys = []
        for row in self.history:
            keys += [k for k in row if k not in keys]
        tmp = self.dir / ".log.csv.tmp"
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(self.history)
        tmp.replace(self.dir / "log.csv")

    def load_final(self, modules: dict) -> list[dict]:
        """Load the finished stage's chosen weights (best if monitored, else final)."""
        print(f"[{self.desc}] finished earlier with the same inputs: reusing {self.dir} (force=True retrains)")
        load_weights(self.weights_path, modules)
        self.history = read_json(self.done_path).get("history", [])
        return self.history

    # -- the loop --------------------------------------------------------------------------
    def epochs(self, modules: dict, optimizer, epochs: int, *, seed: int, scheduler=None, scaler=None,
               monitor: Optional[str] = None, mode: str = "max", extra_state: Optional[dict] = None) -> Iterator[Epoch]:
        """The epochs still to run, for a loop written out by the caller::

            for epoch in stage.epochs({"model": model}, optimizer, 10, seed=0, scheduler=sched, monitor="val_dice"):
                for batch in batches:          # the caller's data, forward, loss, backward and step
                    ...
                epoch.log(loss=mean_loss, val_dice=validate())

        Before each epoch torch/numpy/random are reseeded from (seed, epoch); after it (once the loop body has
        run) the logged metrics and the weights are checked for NaN/inf, the best weights by ``monitor`` (``mode``
        "max" or "min") are kept, and a checkpoint of ``modules``, the optimizer, scheduler, scaler and
        ``extra_state`` (name -> object with state_dict/load_state_dict, e.g. an EMA) is written. A stage that was
        interrupted resumes after its last finished epoch; a finished one loads its weights and yields nothing.
        When the loop ends the final weights and ``done.json`` are written and the best weights loaded;
        :attr:`history` holds the per-epoch rows.
        """
        if self.finished:
            self.load_final(modules)
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.inputs_path, self.inputs)
        parts = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, **(extra_state or {})}
        if self._load_checkpoint(modules, parts):
            print(f"[{self.desc}] resuming after epoch {self.start_epoch}/{epochs} from {self.ckpt}")
        stop = os.environ.get(STOP_ENV, "")
        bar = tqdm(range(self.start_epoch, epochs), desc=self.desc, initial=self.start_epoch, total=epochs,
                   unit="epoch", dynamic_ncols=True)
        for index in bar:
            seed_everything(int(seed) * 100_003 + index)
            t0 = time.perf_counter()
            epoch = Epoch(index)
            yield epoch
            row = {"epoch": index + 1, **epoch.metrics}
            self._check_finite(row, modules, optimizer, scaler, index, epochs, bar)
            if optimizer is not None:
                row["lr"] = optimizer.param_groups[0]["lr"]
            row["seconds"] = round(time.perf_counter() - t0, 3)
            self.history.append(row)
            if monitor is not None and self._better(float(row[monitor]), mode):
                self.best = float(row[monitor])
                save_weights(self.best_path, modules, {"epoch": index + 1, monitor: self.best})
            self._save_checkpoint(index + 1, modules, parts)
            self._write_log()
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "lr"})
            if stop == f"{self.dir.name}:{index + 1}":
                bar.close()
                raise StageInterrupted(f"[{self.desc}] stopped after epoch {index + 1} ({STOP_ENV}={stop})")
        bar.close()
        save_weights(self.final_path, modules, {"epoch": epochs})
        write_json(self.done_path, {"epochs": epochs, "monitor": monitor, "best": self.best, "history": self.history,
                                    "seconds": round(sum(r.get("seconds", 0) for r in self.history), 2)})
        shutil.rmtree(self.ckpt, ignore_errors=True)  # the final weights and done.json are the record
        if monitor is not None and self.best_path.is_file():
            load_weights(self.best_path, modules)

    def _check_finite(self, row: dict, modules: dict, optimizer, scaler, index: int, epochs: int, bar) -> None:
        # fp16 on CUDA: a batch that overflows gives an inf loss the GradScaler skips; only the weights count there
        fp16 = scaler is not None and getattr(scaler, "is_enabled", lambda: False)()
        bad = non_finite({} if fp16 else row, modules)
        if bad is None:
            return
        bar.close()
        lr = f" (lr {optimizer.param_groups[0]['lr']:.3g} at this epoch)" if optimizer is not None else ""
        kept = (f"the last good checkpoint (after epoch {index}) stays in {self.ckpt}" if self.ckpt.is_dir()
                else "no checkpoint was written")
        raise DivergedError(f"[{self.desc}] diverged in epoch {index + 1}/{epochs}: {bad}. Likely cause: a learning "
                            f"rate too high for this model{lr}; lower it and run again. {kept}; no final weights were "
                            "written.")

    def train(self, modules: dict, optimizer, epochs: int, train_epoch: Callable[[int], dict],
              validate: Optional[Callable[[], dict]] = None, **loop) -> list[dict]:
        """:meth:`epochs` with the epoch's body as functions: ``train_epoch(epoch) -> metrics`` then
        ``validate() -> metrics``; ``loop``: the keyword arguments of :meth:`epochs`. Returns the history."""
        for epoch in self.epochs(modules, optimizer, epochs, **loop):
            epoch.log(**(train_epoch(epoch.index) or {}))
            if validate is not None:
                epoch.log(**(validate() or {}))
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
