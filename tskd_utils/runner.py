"""One run of a sweep, wherever it executes (here, in a Ray task, in a SLURM job): what a run is (:class:`RunSpec`),
its folder's lock, the check of what a finished run claims, the notebooks' execution with progress lines, and its
``status.json``. reproduce.py (the command line and the sweep) and executors.py (local, Ray, SLURM) import from here.
"""

from __future__ import annotations
import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from safetensors import SafetensorError, safe_open

from .config import NOTEBOOKS, flat_settings, get_profile, profile_to_dict
from .io import RESULT_COLUMNS, DataError, read_json, write_json
from .sweep_report import hms as _fmt

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
    """A safetensors file that opens, unloaded: safetensors checks its header and that its tensors cover the file."""
    if not path.is_file():
        return "is missing", False
    try:
        with safe_open(str(path), "np"):
            return None
    except (SafetensorError, OSError) as e:
        return f"is not a whole safetensors file ({path.stat().st_size} bytes; {e})", True


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
