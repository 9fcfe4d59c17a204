"""The reproduction sweep: notebooks 01-05 for every run of a grid, then one report.

    python -m tskd_utils.reproduce --profile demo --dataset hc18 --data-root data \\
        --n-labeled 10,20,50 --seeds 0,1,2 --out runs/hc18-demo
    python -m tskd_utils.reproduce --profile demo --n-labeled 20 --seeds 0 \\
        --grid teacher.lora_rank=4,8,16 --out runs/phantom-lora-rank          # any profile setting as an axis
    ... --executor ray [--ray-address ADDR]                                   # runs as Ray tasks
    ... --executor slurm --slurm-partition gpu --slurm-time 12:00:00          # runs as a SLURM array job

* A run is one (n_labeled, seed) and one value of every ``--grid`` axis (the axes are crossed). Its folder is
  ``RUNS/<dataset>_n<N>_s<seed>[_<key>-<value>...]/``; the executed notebooks are kept in ``notebooks/`` inside it
  as the record of the run.
* Every argument is checked before any kernel starts (exit status 2 with a message naming the value).
* A finished run is skipped only when the files it claims exist and are whole (``results.csv`` with a row per
  requested method, the teacher's weights, each requested method's ``student.safetensors``, the metrics); a missing
  or truncated file makes the run re-execute from the notebook that owns it, with a printed reason (a truncated
  file is kept beside, renamed ``*.corrupt-<time>``). An interrupted run is resumed (notebooks that finished are not
  re-executed, and inside a notebook every stage resumes from its last checkpoint). A run folder made with other
  settings is never reused: the run fails with the setting that differs. A run finished under an older definition
  of its profile (config.json's ``resolved_profile`` differs from what this code resolves) is executed again from
  its first notebook, naming the settings that changed; the stages those settings do not feed are reused.
* A run folder is locked while a sweep executes it (``.sweep.lock``): a second sweep does not wait for it, it
  refuses that run with the lock holder's host and pid and goes on with the others.
* A failing run does not stop the others; failures are listed at the end with their error and the exit status is
  non-zero. A requested method whose student file is missing after the run is a failure, not a missing row.
* Runs execute here one after another (``--executor local``), as Ray tasks (``ray``) or as a SLURM array job through
  submitit (``slurm``); see docs/cluster.md.
* All finished runs in RUNS (a run executing again is left out, with a note) are aggregated into ``RUNS/results.csv`` (one column per grid axis after the conventions'
  columns), ``RUNS/paired.csv`` (ts_kd against every other method, paired over test cases and seeds) and
  ``RUNS/report.md`` (see :mod:`tskd_utils.sweep_report`).
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from . import REPO_ROOT
from .io import DataError, check_writable_dir, read_json, write_json

NOTEBOOKS = ("01_data_preparation", "02_teacher_lora_finetuning", "03_diffusion_synthesis", "04_distillation",
             "05_evaluation")
WITH_METHODS = ("04_distillation", "05_evaluation")
EXECUTORS = ("local", "ray", "slurm")
LOCK_FILE = ".sweep.lock"  # filelock (flock) on this file while a sweep executes the run
OWNER_FILE = ".sweep.lock.json"  # who holds it: host, pid, since, command
LOCK_WAIT_S = 5.0  # a worker waits this long for a run's lock (a driver's own check holds it for an instant)
CONFIG_KEYS = ("dataset", "profile", "n_labeled", "seed", "overrides")  # what makes a run folder that run


class SweepError(ValueError):
    """A bad sweep argument, found before any work (exit status 2); the message names the value."""


class RunLocked(RuntimeError):
    """Another process holds the run folder's lock."""


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _json_norm(value):
    """A value as it reads back from config.json (tuples become lists)."""
    return json.loads(json.dumps(value))


def _same_number(value):
    """Integral floats as ints (``1.0`` -> ``1``), inside lists and dicts too: for comparing grid values."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_same_number(v) for v in value]
    if isinstance(value, dict):
        return {k: _same_number(v) for k, v in value.items()}
    return value


def _slug(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


def run_name(dataset: str, n_labeled: int, seed: int, settings: Optional[dict] = None) -> str:
    """``<dataset>_n<N>_s<seed>``, then ``_<key>-<value>`` for every grid setting, in axis order."""
    name = f"{dataset}_n{n_labeled}_s{seed}"
    for key, value in (settings or {}).items():
        name += f"_{key}-{_slug(value)}"
    return name


# ------------------------------------------------------------------------------- one run


@dataclass
class RunSpec:
    """Everything a worker (this process, a Ray task, a SLURM job) needs to execute one run."""

    index: int
    total: int
    profile: str
    dataset: str
    data_root: str
    n_labeled: int
    seed: int
    settings: dict  # this run's value of every grid axis
    overrides: dict  # --set overrides and the grid settings together
    run_dir: str
    methods: list
    notebooks_dir: str
    log_output: bool = False
    announce: bool = True  # print progress here (the local executor); remote drivers poll status.json instead
    command: str = ""
    attempt: str = ""  # written into status.json, so a driver tells this attempt's progress from an earlier one's

    @property
    def label(self) -> str:
        extra = "".join(f" {k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in self.settings.items())
        return f"[{self.index}/{self.total}] {self.dataset} n_labeled={self.n_labeled} seed={self.seed}{extra}"

    @property
    def params(self) -> dict:
        return {"profile": self.profile, "dataset": self.dataset, "data_root": self.data_root, "run_dir": self.run_dir,
                "n_labeled": int(self.n_labeled), "seed": int(self.seed), "overrides": dict(self.overrides)}

    def wanted_config(self) -> dict:
        return {"dataset": self.dataset, "profile": self.profile, "n_labeled": int(self.n_labeled),
                "seed": int(self.seed), "overrides": _json_norm(self.overrides)}


# ---- what a finished run claims


@dataclass
class Problem:
    """A claimed file that is missing or not whole; ``notebook`` is the one that writes it."""

    notebook: str
    path: Path
    what: str
    corrupt: bool = False  # the file exists but is not whole: moved aside before re-execution

    def describe(self, run_dir: Path) -> str:
        try:
            rel = self.path.relative_to(run_dir)
        except ValueError:
            rel = self.path
        return f"{rel} {self.what}"


def _check_json(path: Path) -> Optional[tuple[str, bool]]:
    if not path.is_file():
        return "is missing", False
    try:
        json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        return f"is not valid JSON ({type(e).__name__}: {str(e)[:80]})", True
    return None


def _check_safetensors(path: Path) -> Optional[tuple[str, bool]]:
    """Structure of a safetensors file without loading it: header length, header JSON, data size."""
    if not path.is_file():
        return "is missing", False
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"is truncated ({size} bytes, no header)", True
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                return f"is truncated ({size} bytes; its header alone claims {8 + n})", True
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"is not a readable safetensors file ({type(e).__name__})", True
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and "data_offsets" in v]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"is truncated ({size} bytes of {need})", True
    return None


def _check_csv(path: Path, columns: Sequence[str], methods: Sequence[str] = ()) -> Optional[tuple[str, bool]]:
    if not path.is_file():
        return "is missing", False
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except Exception as e:  # empty, truncated mid-quote, not a CSV
        return f"is not a readable CSV ({type(e).__name__}: {str(e)[:80]})", True
    missing_cols = [c for c in columns if c not in df.columns]
    if missing_cols:
        return f"lacks the column(s) {', '.join(missing_cols)}", True
    absent = [m for m in methods if m not in set(df["method"].astype(str))]
    if absent:
        return f"has no row for {', '.join(absent)}", False
    return None


def claimed_files(run_dir: Path, methods: Sequence[str]) -> dict:
    """notebook -> [(path, check)] for the files a finished notebook leaves that later ones or the report read."""
    from .evaluate import RESULT_COLUMNS

    t, m = run_dir / "teacher", list(methods)
    return {
        "01_data_preparation": [(run_dir / "config.json", _check_json), (run_dir / "splits.json", _check_json)],
        "02_teacher_lora_finetuning": [
            (t / "metrics.json", _check_json), (t / "head.safetensors", _check_safetensors),
            (t / "frozen_head.safetensors", _check_safetensors), (t / "adapter" / "adapter_config.json", _check_json),
            (t / "adapter" / "adapter_model.safetensors", _check_safetensors)],
        "03_diffusion_synthesis": [],  # its synthetic set is read only by notebook 04, whose outputs are checked
        "04_distillation": [(run_dir / "students" / x / "student.safetensors", _check_safetensors) for x in m],
        "05_evaluation": [
            (run_dir / "results.csv", lambda p: _check_csv(p, RESULT_COLUMNS, ["teacher"] + m)),
            (run_dir / "metrics" / "per_case.csv", lambda p: _check_csv(p, ["method", "case", "class", "dice"])),
            (run_dir / "metrics" / "summary.json", _check_json)],
    }


def check_run(run_dir: Path, methods: Sequence[str], notebooks: Sequence[str] = NOTEBOOKS) -> list[Problem]:
    """Problems with the files that the given (finished) notebooks of a run claim, in notebook order."""
    run_dir = Path(run_dir)
    claims = claimed_files(run_dir, methods)
    problems = []
    for nb in NOTEBOOKS:
        if nb not in notebooks:
            continue
        for path, check in claims[nb]:
            found = check(path)
            if found:
                problems.append(Problem(nb, path, found[0], found[1]))
    return problems


def config_mismatch(run_dir: Path, wanted: dict) -> Optional[str]:
    """Why an existing run folder is not this run (None when it is, or when it has no readable config yet)."""
    path = Path(run_dir) / "config.json"
    try:
        have = read_json(path)
    except (FileNotFoundError, DataError):
        return None
    for key in CONFIG_KEYS:
        if have.get(key) != wanted[key]:
            return (f"{path} was made with {key}={have.get(key)!r}, not {wanted[key]!r}: this sweep would mix two "
                    f"experiments in one folder. Use another --out (the finished work in {path.parent} is left as "
                    f"it is)")
    return None


def profile_drift(run_dir: Path, profile: str, overrides: dict) -> Optional[Problem]:
    """The run folder's recorded settings against what ``profile`` (with ``overrides``) resolves to in this code.

    A profile's definition can change between versions of the repository (a longer schedule, another default):
    a run finished with the old definition is then not this run any more. It is re-executed from its first
    notebook; inside, every stage whose inputs did not change is reused, so only what the change touches is
    trained again. None when the settings are the same, or when the folder records none (older versions).
    """
    from .config import flat_settings, get_profile, profile_to_dict

    path = Path(run_dir) / "config.json"
    try:
        have = read_json(path).get("resolved_profile")
    except (FileNotFoundError, DataError):
        return None
    if not isinstance(have, dict):
        return None
    old = flat_settings(have)  # an edited description re-runs nothing
    new = flat_settings(_json_norm(profile_to_dict(get_profile(profile, overrides))))
    changed = [f"{k} {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}"
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if not changed:
        return None
    shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
    return Problem(NOTEBOOKS[0], path, f"records settings of profile {profile!r} that this version changed "
                                       f"({shown}); the stages these settings feed are trained again")


def read_status(run_dir: Path) -> dict:
    path = Path(run_dir) / "status.json"
    try:
        status = read_json(path)
    except FileNotFoundError:
        return {"notebooks": {}}
    except DataError:  # a half-written status from an old version: start the record again
        return {"notebooks": {}, "note": f"{path} was unreadable and was started again"}
    status.setdefault("notebooks", {})
    return status


def failure_of(status: dict) -> tuple[str, str]:
    """(notebook, error) of a run that did not finish."""
    if status.get("error"):
        return status.get("notebook") or "sweep", status["error"]
    for nb, info in status.get("notebooks", {}).items():
        if info.get("state") == "failed" or "error" in info:
            return nb, info.get("error", "unknown error")
    for nb, info in status.get("notebooks", {}).items():
        if info.get("state") != "done":
            return nb, f"stopped while {info.get('state', 'pending')}"
    return "?", "unknown error"


# ---- locks


def _owner(run_dir: Path) -> str:
    try:
        o = read_json(Path(run_dir) / OWNER_FILE)
        return f"host {o.get('host')} pid {o.get('pid')} since {o.get('since')}"
    except (FileNotFoundError, DataError):
        return "owner unknown"


def _acquire(run_dir: Path, timeout: float):
    from filelock import FileLock, Timeout

    lock = FileLock(str(Path(run_dir) / LOCK_FILE))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise RunLocked(f"{run_dir} is being executed by another sweep ({_owner(run_dir)}; lock {run_dir / LOCK_FILE}):"
                        f" this run was refused and left untouched; re-run this command once that sweep is done"
                        ) from None
    return lock


@contextmanager
def run_lock(run_dir: Path, timeout: float = 0.0, command: str = "") -> Iterator[None]:
    """Hold the run folder's lock (refuse with :class:`RunLocked` after ``timeout`` seconds); while held,
    ``.sweep.lock.json`` says who holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _acquire(run_dir, timeout)
    try:
        write_json(run_dir / OWNER_FILE, {"host": socket.gethostname(), "pid": os.getpid(),
                                          "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command})
        yield
    finally:
        (run_dir / OWNER_FILE).unlink(missing_ok=True)
        lock.release()


def locked_by(run_dir: Path) -> Optional[str]:
    """Why a run folder is not free (its lock's holder), or None (checked by taking the lock for an instant)."""
    if not (Path(run_dir) / LOCK_FILE).is_file():
        return None
    try:
        _acquire(Path(run_dir), 0).release()
    except RunLocked as e:
        return str(e)
    return None


# ---- kernels


IPC_PREFIX = "tskd-kernel-"


def _remove_stale_ipc_dirs(base: str) -> None:
    """Socket folders left by sweep processes that were killed (``tskd-kernel-<pid>-*`` of a pid that is gone)."""
    for d in Path(base).glob(f"{IPC_PREFIX}*-*"):
        try:
            pid = int(d.name[len(IPC_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except OSError:  # another user's live process
            pass


@contextmanager
def _kernel_ipc_dir() -> Iterator[Optional[Path]]:
    """A private folder for this run's kernel sockets, removed afterwards (None where IPC is unavailable)."""
    if sys.platform == "win32":
        yield None
        return
    base = tempfile.gettempdir()
    if len(base) > 60:  # a Unix socket path has at most ~107 bytes
        base = "/tmp"
    try:
        _remove_stale_ipc_dirs(base)
        path = Path(tempfile.mkdtemp(prefix=f"{IPC_PREFIX}{os.getpid()}-", dir=base))
    except OSError:
        yield None
        return
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _kernel_manager_class(ipc_dir: Optional[Path] = None):
    """Local kernels over Unix sockets in ``ipc_dir``: a TCP kernel without CurveZMQ keys prints a plain-text-transport
    warning for every notebook (ipykernel >= 7). The sockets live in a folder of this process only: jupyter_client
    picks socket names by looking at which files exist, so two sweeps sharing one folder would connect to each other's
    kernels. None (TCP) on Windows or without a private folder."""
    if sys.platform == "win32" or ipc_dir is None:
        return None
    from jupyter_client.manager import AsyncKernelManager

    ip = str(Path(ipc_dir) / "kernel")

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            kwargs.setdefault("transport", "ipc")
            kwargs.setdefault("ip", ip)
            super().__init__(**kwargs)

    return IPCKernelManager


def _progress_seconds() -> float:
    """How often a local sweep says where a notebook is: ``TSKD_PROGRESS_S`` seconds (default 60; 0: never)."""
    raw = os.environ.get("TSKD_PROGRESS_S", "60")
    try:
        return max(0.0, float(raw))
    except ValueError:
        print(f"note: TSKD_PROGRESS_S={raw!r} is not a number of seconds; using 60")
        return 60.0


def progress_line(notebook: dict) -> Optional[str]:
    """Where an executing notebook is: ``cell k/n`` and its latest output line (a tqdm bar, a print), from the
    output notebook papermill keeps saving (at every cell and every 30 s inside one)."""
    cells = [c for c in notebook.get("cells", []) if c.get("cell_type") == "code"]
    if not cells:
        return None
    meta = [c.get("metadata", {}).get("papermill", {}) for c in cells]
    started = [i for i, m in enumerate(meta) if m.get("start_time")]
    if not started:
        return None
    k = started[-1]
    last = ""
    for o in cells[k].get("outputs", []):  # the running cell's own output: a stream, or a widget's text form
        text = o.get("text", o.get("data", {}).get("text/plain", ""))
        text = "".join(text) if isinstance(text, list) else str(text)
        lines = [ln for ln in re.split(r"[\r\n]", text) if ln.strip()]
        if lines:
            last = lines[-1].strip()
    return f"cell {k + 1}/{len(cells)}" + (f": {last[:140]}" if last else "")


@contextmanager
def _watch(path: Path, label: str, every: float = 60.0) -> Iterator[None]:
    """Print :func:`progress_line` of the notebook being written at ``path`` every ``every`` s when it changed."""
    import threading

    stop = threading.Event()

    def loop():
        said = None
        while not stop.wait(every):
            try:
                line = progress_line(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
            if line and line != said:
                print(f"  {label}: {line}", flush=True)
                said = line

    thread = threading.Thread(target=loop, daemon=True)
    if every > 0:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if every > 0:
            thread.join(timeout=5)


def execute_run(run_dir: Path, params: dict, notebooks_dir: Path, methods: Sequence[str], label: str,
                log_output: bool = False, announce: bool = True, force: Sequence[str] = (), attempt: str = "") -> dict:
    """Execute the notebooks of one run, skipping those that finished; returns its status.

    ``force``: notebooks executed with ``force=True`` (a finished stage is recomputed). The caller holds the lock.
    """
    import papermill as pm

    run_dir = Path(run_dir)
    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    status_path = run_dir / "status.json"
    status = read_status(run_dir)
    status.update(state="running", host=socket.gethostname(), pid=os.getpid(), started=time.time(), attempt=attempt)
    for key in ("error", "notebook", "seconds"):
        status.pop(key, None)
    start, every = time.perf_counter(), _progress_seconds()
    with _kernel_ipc_dir() as ipc:
        km = _kernel_manager_class(ipc)
        kernel = {"kernel_manager_class": km} if km else {}
        for nb in NOTEBOOKS:
            entry = status["notebooks"].get(nb, {})
            if entry.get("state") == "done":
                continue
            if announce:
                print(f"{label}: {nb} (elapsed {_fmt(time.perf_counter() - start)})", flush=True)
            forced = nb in force or bool(entry.get("force"))
            p = dict(params, methods=list(methods)) if nb in WITH_METHODS else dict(params)
            if forced:
                p["force"] = True
            t0, started = time.perf_counter(), time.time()
            status["notebooks"][nb] = {"state": "running", "started": started, **({"force": True} if forced else {})}
            write_json(status_path, status)
            try:
                with _watch(out_dir / f"{nb}.ipynb", f"{label}: {nb}", every if announce and not log_output else 0):
                    pm.execute_notebook(str(Path(notebooks_dir) / f"{nb}.ipynb"), str(out_dir / f"{nb}.ipynb"),
                                        parameters=p, cwd=str(notebooks_dir), kernel_name="python3",
                                        progress_bar=False, log_output=log_output, **kernel)
            except Exception as e:  # papermill re-raises the cell's error; keep it and stop this run
                err = getattr(e, "ename", type(e).__name__) + ": " + str(getattr(e, "evalue", e)).strip()[:500]
                status["notebooks"][nb] = {"state": "failed", "error": err, "seconds": round(time.perf_counter() - t0, 1),
                                           "started": started, **({"force": True} if forced else {})}
                status["state"] = "failed"
                write_json(status_path, status)
                return status
            status["notebooks"][nb] = {"state": "done", "seconds": round(time.perf_counter() - t0, 1), "started": started}
            write_json(status_path, status)
    status["state"] = "done"
    status["seconds"] = round(sum(v.get("seconds", 0) for v in status["notebooks"].values()), 1)
    write_json(status_path, status)
    return status


def report_table(report: Path) -> str:
    """The report's Dice table and its paired comparisons (the first of each), as printed at the end of a sweep."""
    try:
        lines = Path(report).read_text().splitlines()
    except OSError:
        return ""
    shown = []
    for head in ("### Dice", "### Paired comparisons"):
        start = next((i for i, ln in enumerate(lines) if ln == head or ln.startswith(head + ":")), None)
        if start is None:
            continue
        block, i = [lines[start]], start + 1
        while i < len(lines) and not lines[i].startswith(("|", "#")):  # the lines that say what the table holds
            if lines[i].strip():
                block.append(lines[i])
            i += 1
        while i < len(lines) and lines[i].startswith("|"):  # none when the section has no table
            block.append(lines[i])
            i += 1
        shown.append("\n".join(block))
    return "\n\n".join(shown)


def _move_aside(path: Path) -> Path:
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(target)
    return target


def run_one(spec: RunSpec) -> dict:
    """Execute one run where this function is called (here, in a Ray task or in a SLURM job): take the run folder's
    lock, check what a finished run claims, resume or re-execute, check again. Returns the run's status."""
    run_dir = Path(spec.run_dir)
    try:
        with run_lock(run_dir, timeout=LOCK_WAIT_S, command=spec.command):
            try:
                return _run_locked(spec, run_dir)
            except OSError as e:  # a full disk, a folder that became read-only: this run fails, the sweep goes on
                return _write_failure(run_dir, e)
    except RunLocked as e:
        return {"state": "refused", "notebook": "lock", "error": str(e), "notebooks": {}}


def _write_failure(run_dir: Path, e: OSError) -> dict:
    """The status of a run stopped by a file-system error, naming the path; written to status.json where possible
    (on a full disk it may not be: the next sweep then finds a 'running' status of a dead process and resumes)."""
    where = f" writing {e.filename}" if e.filename else ""
    hint = " (the disk is full: free space, then re-run the same command to resume)" if e.errno == errno.ENOSPC else ""
    status = read_status(run_dir)
    nb = next((n for n, v in status.get("notebooks", {}).items() if v.get("state") == "running"), "sweep")
    error = f"{type(e).__name__}: {e.strerror or e}{where}{hint}"
    if nb in status.get("notebooks", {}):
        status["notebooks"][nb] = dict(status["notebooks"][nb], state="failed", error=error)
    status.update(state="failed", notebook=nb, error=error)
    try:
        write_json(run_dir / "status.json", status)
    except OSError:
        pass
    return status


def _run_locked(spec: RunSpec, run_dir: Path) -> dict:
    say = (lambda msg: print(msg, flush=True)) if spec.announce else (lambda msg: None)
    mismatch = config_mismatch(run_dir, spec.wanted_config())
    if mismatch:
        return {"state": "failed", "notebook": NOTEBOOKS[0], "error": mismatch, "notebooks": {}}
    status = read_status(run_dir)
    done = [nb for nb in NOTEBOOKS if status["notebooks"].get(nb, {}).get("state") == "done"]
    drift = profile_drift(run_dir, spec.profile, spec.overrides)
    problems = ([drift] if drift else []) + check_run(run_dir, spec.methods, done)
    if problems:
        first = NOTEBOOKS.index(problems[0].notebook)
        for p in problems:
            if p.corrupt and p.path.exists():
                p.what += f" (kept as {_move_aside(p.path).name})"
            say(f"{spec.label}: {p.describe(run_dir)}: re-executing from {problems[0].notebook}")
        # the owning notebook's finished stages write their missing outputs again from their final weights (a
        # damaged file was moved aside, so it is missing); the check after the run fails it if one is still missing
        reason = "; ".join(p.describe(run_dir) for p in problems)
        for nb in NOTEBOOKS[first:]:
            if status["notebooks"].get(nb, {}).get("state") == "done":
                status["notebooks"][nb] = {"state": "stale", "reason": reason}
        status["state"] = "stale"
        write_json(run_dir / "status.json", status)
    elif status.get("state") == "done" and len(done) == len(NOTEBOOKS):
        status["skipped"] = True
        return status
    status = execute_run(run_dir, spec.params, Path(spec.notebooks_dir), spec.methods, spec.label,
                         spec.log_output, spec.announce, attempt=spec.attempt)
    if status.get("state") == "done":
        after = check_run(run_dir, spec.methods)
        if after:  # a notebook said done but its files are not there: the run failed, loudly
            p = after[0]
            err = f"{p.notebook} finished but {p.describe(run_dir)}" + (
                f" (method {p.path.parent.name!r} was requested)" if p.path.name == "student.safetensors" else "")
            status["notebooks"][p.notebook] = dict(status["notebooks"].get(p.notebook, {}), state="failed", error=err)
            status["state"] = "failed"
            write_json(run_dir / "status.json", status)
    return status


def record_lost(spec: RunSpec, reason: str) -> dict:
    """The status of a run whose worker died (a killed Ray worker, a dead node, a cancelled SLURM job): the notebook
    it was in is marked failed (when the lock is free), so that the report and a re-run see it."""
    run_dir = Path(spec.run_dir)
    status = read_status(run_dir)
    nb = next((k for k in NOTEBOOKS if status["notebooks"].get(k, {}).get("state") not in ("done", None)),
              next((k for k in NOTEBOOKS if k not in status["notebooks"]), NOTEBOOKS[0]))
    err = reason.strip().splitlines()[0][:500] if reason.strip() else "the worker died"
    status["notebooks"][nb] = dict(status["notebooks"].get(nb, {}), state="failed", error=err)
    status["state"] = "failed"
    try:
        with run_lock(run_dir, timeout=0):
            write_json(run_dir / "status.json", status)
    except RunLocked:
        pass  # someone is executing it again already: leave their record alone
    return status


# ------------------------------------------------------------------------------- arguments


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets: ``4,8`` -> [4, 8]; ``[1,2],[3]`` -> two lists."""
    items, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    return [s.strip() for s in items]


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def int_list(text: str, what: str, minimum: int) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; an empty item, a non-integer, a value below ``minimum`` or a repeat is an error."""
    items = _split_top(str(text))
    if not str(text).strip():
        raise SweepError(f"{what} is empty: give at least one value, e.g. {what} {max(minimum, 0)}")
    out = []
    for item in items:
        if item == "":
            raise SweepError(f"{what} {text!r} has an empty item: use commas only between values")
        try:
            v = int(item)
        except ValueError:
            raise SweepError(f"{what} {text!r}: {item!r} is not an integer") from None
        if v < minimum:
            raise SweepError(f"{what} {text!r}: {v} is below {minimum}"
                             + (" (n_labeled counts labeled training images)" if minimum == 1 else ""))
        if v in out:
            raise SweepError(f"{what} {text!r}: {v} is given twice")
        out.append(v)
    return out


def parse_grid(items: Sequence[str]) -> dict:
    """``["teacher.lora_rank=4,8,16", ...]`` -> {"teacher.lora_rank": [4, 8, 16], ...} (values JSON, else text)."""
    grid: dict = {}
    for item in items:
        if "=" not in item:
            raise SweepError(f"--grid expects KEY=V1,V2,..., got {item!r}")
        key, text = (s.strip() for s in item.split("=", 1))
        if key in grid:
            raise SweepError(f"--grid {key} is given twice: put all its values in one --grid {key}=V1,V2")
        if not text:
            raise SweepError(f"--grid {key}= has no values")
        raw = _split_top(text)
        if "" in raw:
            raise SweepError(f"--grid {item!r} has an empty item: use commas only between values")
        grid[key] = [_value(v) for v in raw]
    return grid


def _check_out(out: Path) -> None:
    try:
        check_writable_dir(out, "--out")
    except DataError as e:
        raise SweepError(f"{e}: give a folder for the runs (RUNS) that can be written") from None


MAX_SEED = 2 ** 32 - 1  # numpy's and torch's seeds


def _check_sizes(prof, dataset: str, data_root: Path, n_labeled: Sequence[int]) -> None:
    """--n-labeled against the train pool: the split itself for a prepared dataset, the phantom's size otherwise."""
    from .data import make_splits
    from .io import load_dataset

    d = prof.data
    ds = Path(data_root) / dataset
    if (ds / "dataset.json").is_file():
        try:
            info = load_dataset(ds)
        except DataError:
            return  # notebook 01 says what is wrong with the dataset, naming the file
        for n in n_labeled:
            try:
                make_splits(info, n, 0, d.val_fraction, d.test_fraction, max_train=d.max_train, max_val=d.max_val,
                            max_test=d.max_test)
            except DataError as e:
                raise SweepError(f"--n-labeled {n}: {e}") from None
        return
    most = min(d.phantom_cases, d.max_train or d.phantom_cases)
    for n in n_labeled:
        if n > most:
            raise SweepError(f"--n-labeled {n}: the phantom of this profile has {d.phantom_cases} cases"
                             + (f" and a train pool of at most {d.max_train}" if d.max_train else "")
                             + f"; choose fewer labeled cases")


def validate(profile: str, dataset: str, data_root: Path, n_labeled: Sequence[int], seeds: Sequence[int], out: Path,
             overrides: dict, grid: dict, notebooks_dir: Path) -> list[dict]:
    """Check every argument before any work; returns the grid's settings (one dict per combination)."""
    from .config import get_profile

    from .models import check_student_name, check_teacher_name

    prof = get_profile(profile, overrides)  # an unknown profile, --set key or bad value fails here (Key/ValueError)
    for what, values, minimum, most in (("--n-labeled", n_labeled, 1, 10 ** 9), ("--seeds", seeds, 0, MAX_SEED)):
        values = list(values)
        if not values:
            raise SweepError(f"{what} is empty: give at least one value")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= most:
                raise SweepError(f"{what}: {v!r} is not an integer from {minimum} to {most}")
        if len(set(values)) != len(values):
            raise SweepError(f"{what}: {values} repeats a value")
    for key, values in grid.items():
        if key in overrides:
            raise SweepError(f"{key} is both a --set override and a --grid axis: keep one")
        if key in ("n_labeled", "seed", "seeds", "dataset", "profile"):
            raise SweepError(f"--grid {key}: not a profile setting; use --n-labeled / --seeds / one sweep per "
                             f"{key}")
        if not values:
            raise SweepError(f"--grid {key} has no values")
        normed = [json.dumps(_same_number(_json_norm(v)), sort_keys=True) for v in values]
        if len(set(normed)) != len(normed):  # 1 and 1.0 are one value: two folders would hold one experiment
            raise SweepError(f"--grid {key}: {values} repeats a value")
        for v in values:
            try:
                one = get_profile(profile, {**overrides, key: v})
                check_teacher_name(one.teacher.name)
                check_student_name(one.student.name)
            except KeyError as e:
                raise SweepError(f"--grid {key}: {e.args[0]}") from None
            except ValueError as e:
                raise SweepError(f"--grid {key}={v!r}: {e}") from None
    try:
        check_teacher_name(prof.teacher.name)
        check_student_name(prof.student.name)
    except KeyError as e:
        raise SweepError(e.args[0]) from None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", dataset):
        raise SweepError(f"--dataset {dataset!r}: a dataset is a folder name in data_root (letters, digits, . _ -)")
    ds = Path(data_root) / dataset
    for path in (Path(data_root), ds):
        if path.exists() and not path.is_dir():
            raise SweepError(f"--data-root {data_root}: {path} is a file, not a folder")
    if dataset != "phantom" and not (ds / "dataset.json").is_file():
        raise SweepError(f"--dataset {dataset}: {ds / 'dataset.json'} not found. Prepare the dataset first, e.g. "
                         f"`python data_scripts/prepare_<name>.py --raw RAW --out {data_root}` (README's dataset "
                         f"table), pass the right --data-root, or use --dataset phantom (generated)")
    _check_sizes(prof, dataset, data_root, n_labeled)
    _check_out(Path(out))
    missing = [nb for nb in NOTEBOOKS if not (Path(notebooks_dir) / f"{nb}.ipynb").is_file()]
    if missing:
        raise SweepError(f"notebooks folder {notebooks_dir} lacks {', '.join(n + '.ipynb' for n in missing)}")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    names: dict = {}
    for n in n_labeled:
        for s in seeds:
            for c in combos:
                name = run_name(dataset, n, s, c)
                if len(name.encode()) > 200:
                    raise SweepError(f"run folder name too long ({len(name)} characters): {name}; use fewer or "
                                     f"shorter --grid values")
                if name in names:
                    raise SweepError(f"--grid settings {names[name]} and {c} give the same run folder {name}")
                names[name] = c
    return combos


# ------------------------------------------------------------------------------- the sweep


def _announce_done(spec: RunSpec, status: dict, failures: list) -> None:
    if status.get("state") == "done":
        if status.get("skipped"):
            print(f"{spec.label}: finished earlier, skipped", flush=True)
        else:
            print(f"{spec.label}: done in {_fmt(status.get('seconds', 0))}", flush=True)
        return
    nb, err = failure_of(status)
    failures.append((spec.label, nb, err))
    print(f"{spec.label}: FAILED in {nb}: {err}", flush=True)


def sweep(profile: str, dataset: str, data_root: Path, n_labeled: Sequence[int], seeds: Sequence[int], out: Path,
          methods: Sequence[str] = ("all",), overrides: Optional[dict] = None, notebooks_dir: Optional[Path] = None,
          log_output: bool = False, command: str = "", grid: Optional[dict] = None, executor: str = "local",
          executor_options: Optional[dict] = None) -> int:
    """Run the grid (n_labeled x seeds x every --grid axis) and aggregate RUNS; returns the exit status.

    Raises :class:`SweepError` (or KeyError for an unknown method/profile/setting) before any work."""
    from . import executors
    from .run import check_methods

    methods = check_methods(list(methods))  # an unknown method fails here, before any work
    overrides, grid = dict(overrides or {}), dict(grid or {})
    notebooks_dir = Path(notebooks_dir or REPO_ROOT / "notebooks").resolve()
    out, data_root = Path(out).resolve(), Path(data_root).resolve()
    combos = validate(profile, dataset, data_root, n_labeled, seeds, out, overrides, grid, notebooks_dir)
    runner = executors.make(executor, profile=profile, out=out, log_output=log_output, **(executor_options or {}))
    out.mkdir(parents=True, exist_ok=True)
    runs = [(n, s, c) for n in n_labeled for s in seeds for c in combos]
    specs = [RunSpec(index=i, total=len(runs), profile=profile, dataset=dataset, data_root=str(data_root),
                     n_labeled=int(n), seed=int(s), settings=dict(c), overrides={**overrides, **c},
                     run_dir=str(out / run_name(dataset, n, s, c)), methods=list(methods),
                     notebooks_dir=str(notebooks_dir), log_output=log_output, announce=runner.announces,
                     command=command, attempt=uuid.uuid4().hex)
             for i, (n, s, c) in enumerate(runs, start=1)]
    failures: list = []
    t_all = time.perf_counter()
    todo = []
    for spec in specs:  # read-only checks here; the worker repeats them under the run's lock
        run_dir = Path(spec.run_dir)
        mismatch = config_mismatch(run_dir, spec.wanted_config())
        holder = None if mismatch else locked_by(run_dir)
        if mismatch or holder:
            _announce_done(spec, {"state": "failed", "notebook": NOTEBOOKS[0] if mismatch else "lock",
                                  "error": mismatch or holder}, failures)
            continue
        status = read_status(run_dir)
        done = [nb for nb in NOTEBOOKS if status["notebooks"].get(nb, {}).get("state") == "done"]
        drift = profile_drift(run_dir, spec.profile, spec.overrides)
        problems = ([drift] if drift else []) + check_run(run_dir, methods, done)
        if not problems and status.get("state") == "done" and len(done) == len(NOTEBOOKS):
            _announce_done(spec, dict(status, skipped=True), failures)
            continue
        if problems and not spec.announce:  # the local worker prints these itself
            for p in problems:
                print(f"{spec.label}: {p.describe(run_dir)}: re-executing from {problems[0].notebook}", flush=True)
        todo.append(spec)
    if todo and dataset == "phantom" and executor != "local":
        from .config import get_profile
        from .datasets import ensure_dataset

        # made once here, not by several runs at the same time
        ensure_dataset(dataset, data_root, phantom_cases=get_profile(profile, overrides).data.phantom_cases)
    if todo:
        runner.run(todo, lambda spec, status: _announce_done(spec, status, failures))
    from .sweep_report import aggregate_locked

    results = aggregate_locked(out, profile=profile, command=command, failures=failures,
                               wall_seconds=time.perf_counter() - t_all, axes=list(grid))
    print(f"\n{len(specs) - len(failures)}/{len(specs)} runs finished in {_fmt(time.perf_counter() - t_all)}")
    table = report_table(out / "report.md")
    if table:
        print("\n" + table)
    print(f"results: {out / 'results.csv'} ({results} rows)\nreport:  {out / 'report.md'}")
    if failures:
        print("\nFailed runs (re-run the same command to resume them):")
        for label, nb, err in failures:
            print(f"  {label}: {nb}: {err}")
        return 1
    return 0


def aggregate(out: Path, profile: str = "", command: str = "", failures: Sequence = (),
              wall_seconds: Optional[float] = None, axes: Sequence[str] = ()) -> int:
    """Collect every run's results into RUNS/results.csv, RUNS/paired.csv and RUNS/report.md (see sweep_report)."""
    from .sweep_report import aggregate as _aggregate

    return _aggregate(Path(out), profile=profile, command=command, failures=failures, wall_seconds=wall_seconds,
                      axes=axes)


# ------------------------------------------------------------------------------- command line


def _ints(text: str, what: str = "value", minimum: int = 0) -> list[int]:
    try:
        return int_list(text, what, minimum)
    except SweepError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _minutes(text: str) -> int:
    """SLURM time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS -> whole minutes (rounded up)."""
    t = str(text).strip()
    try:
        if "-" in t:
            d, rest = t.split("-", 1)
            days, parts = int(d), [int(x) for x in rest.split(":")]
            if len(parts) > 3:
                raise ValueError
            h, m, s = (parts + [0, 0])[:3]
        else:
            days, parts = 0, [int(x) for x in t.split(":")]
            if len(parts) > 3:
                raise ValueError
            h, m, s = ([0, 0] + parts)[-3:] if len(parts) == 3 else (0, parts[0], parts[1] if len(parts) == 2 else 0)
        minutes = days * 24 * 60 + h * 60 + m + (1 if s > 0 else 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--slurm-time {text!r}: expected minutes, HH:MM:SS or D-HH:MM:SS") from None
    if minutes < 1:
        raise argparse.ArgumentTypeError(f"--slurm-time {text!r}: at least one minute")
    return minutes


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tskd_utils.reproduce", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from .config import PROFILES
    from .run import METHODS

    ap.add_argument("--profile", default="demo", help="how big a run is: " + ", ".join(PROFILES)
                    + " (sizes and schedules in tskd_utils/config.py; the README's 'Profiles' table)")
    ap.add_argument("--dataset", default="phantom", help="a dataset folder inside --data-root in the common format "
                    "(phantom is generated when missing; the others are prepared with data_scripts/prepare_*.py)")
    ap.add_argument("--data-root", type=Path, default=REPO_ROOT / "data", help="DATA_ROOT: holds <dataset>/")
    ap.add_argument("--n-labeled", type=lambda t: _ints(t, "--n-labeled", 1), default=[20],
                    help="labeled training cases, comma-separated for several runs (e.g. 10,20,50)")
    ap.add_argument("--seeds", type=lambda t: _ints(t, "--seeds", 0), default=[0],
                    help="seeds, comma-separated (e.g. 0,1,2): each seed draws its own labeled subset and inits")
    ap.add_argument("--methods", default="all", help="comma-separated student methods, or all: " + ", ".join(METHODS)
                    + " (the teacher always runs)")
    ap.add_argument("--out", type=Path, required=True, help="RUNS folder")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="profile override, e.g. --set teacher.epochs=5 (repeatable)")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a profile setting as a sweep axis, e.g. --grid teacher.lora_rank=4,8,16 (repeatable; "
                         "axes are crossed with each other, --n-labeled and --seeds)")
    ap.add_argument("--log-output", action="store_true", help="stream the notebooks' output")
    ap.add_argument("--notebooks-dir", type=Path, default=None, help="folder with notebooks 01-05 (default: the "
                    "checkout's notebooks/)")
    ap.add_argument("--executor", choices=EXECUTORS, default="local",
                    help="local: here, one run after another; ray: one Ray task per run; slurm: a SLURM array job")
    ap.add_argument("--cpus-per-run", "--slurm-cpus", type=int, default=None,
                    help="CPUs a run asks Ray/SLURM for (default by profile: smoke 1, demo 2, cpu 2, colab 4, paper 8)")
    ap.add_argument("--gpus-per-run", "--slurm-gpus", type=int, default=None,
                    help="GPUs a run asks Ray/SLURM for (default: 1 for colab/paper, else 0)")
    g = ap.add_argument_group("ray")
    g.add_argument("--ray-address", default=None, help="an existing Ray cluster (e.g. auto or ray://head:10001); "
                   "default: $RAY_ADDRESS, else a Ray runtime started on this machine")
    g = ap.add_argument_group("slurm (through submitit)")
    g.add_argument("--slurm-partition", default=None, help="the SLURM partition (sbatch --partition)")
    g.add_argument("--slurm-time", type=_minutes, default=None,
                   help="time limit per run (minutes or HH:MM:SS; default by profile: smoke 30 min, demo 3 h, "
                        "cpu 4 h, colab 24 h, paper 72 h)")
    g.add_argument("--slurm-mem-gb", type=int, default=None, help="memory per run in GB (sbatch --mem)")
    g.add_argument("--slurm-account", default=None, help="the account to charge (sbatch --account)")
    g.add_argument("--slurm-qos", default=None, help="quality of service (sbatch --qos)")
    g.add_argument("--slurm-parallelism", type=int, default=None, help="at most this many runs at once")
    g.add_argument("--slurm-setup", action="append", default=[], metavar="CMD",
                   help="a shell line run before each job, e.g. 'source .venv/bin/activate' (repeatable)")
    g.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                   help="another sbatch option, e.g. constraint=a100 (repeatable)")
    g.add_argument("--slurm-cluster", choices=("slurm", "local"), default="slurm",
                   help="local: submitit's local executor (runs the SLURM path on this machine, for testing)")
    args = ap.parse_args(argv)

    def key_values(items, flag):
        d = {}
        for item in items:
            if "=" not in item:
                ap.error(f"{flag} expects KEY=VALUE, got {item!r}")
            k, v = item.split("=", 1)
            d[k.strip()] = _value(v)
        return d

    overrides = key_values(args.overrides, "--set")
    extra = key_values(args.slurm_extra, "--slurm-extra")
    options: dict = {"cpus_per_run": args.cpus_per_run, "gpus_per_run": args.gpus_per_run}
    if args.executor == "ray":
        options["address"] = args.ray_address
    elif args.ray_address:
        ap.error("--ray-address needs --executor ray")
    slurm_given = [f for f in ("slurm_partition", "slurm_time", "slurm_mem_gb", "slurm_account", "slurm_qos",
                               "slurm_parallelism") if getattr(args, f) is not None] + \
        (["slurm_setup"] if args.slurm_setup else []) + (["slurm_extra"] if extra else [])
    if args.executor == "slurm":
        options.update(partition=args.slurm_partition, time_min=args.slurm_time, mem_gb=args.slurm_mem_gb,
                       account=args.slurm_account, qos=args.slurm_qos, parallelism=args.slurm_parallelism,
                       setup=list(args.slurm_setup), extra=extra, cluster=args.slurm_cluster)
    elif slurm_given:
        ap.error(f"--{slurm_given[0].replace('_', '-')} needs --executor slurm")
    command = "python -m tskd_utils.reproduce " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        grid = parse_grid(args.grid)
        return sweep(args.profile, args.dataset, args.data_root, args.n_labeled, args.seeds, args.out,
                     methods=args.methods.split(","), overrides=overrides, notebooks_dir=args.notebooks_dir,
                     log_output=args.log_output, command=command, grid=grid, executor=args.executor,
                     executor_options=options)
    except KeyError as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except ValueError as e:  # SweepError, a bad override value
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
