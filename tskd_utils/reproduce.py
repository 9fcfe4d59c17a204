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
import itertools
import json
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

from . import REPO_ROOT, executors
from .config import MACHINES, PROFILES, get_profile
from .datasets import ensure_dataset
from .io import DataError, check_writable_dir, load_dataset
# the run's machinery; named here too, as before runner.py existed (reproduce.run_one, reproduce.NOTEBOOKS, ...)
from .runner import (EXECUTORS, IPC_PREFIX, NOTEBOOKS, RunLocked, RunSpec, SweepError, _fmt, _json_norm,  # noqa: F401
                     _same_number, check_run, config_mismatch, execute_run, failure_of, locked_by, profile_drift,
                     progress_line, read_status, record_lost, report_table, run_lock, run_name, run_one)
from .sweep_report import aggregate as _aggregate, aggregate_locked

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


def _check_values(n_labeled: Sequence[int], seeds: Sequence[int]) -> None:
    for what, values, minimum, most in (("--n-labeled", n_labeled, 1, 10 ** 9), ("--seeds", seeds, 0, MAX_SEED)):
        values = list(values)
        if not values:
            raise SweepError(f"{what} is empty: give at least one value")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= most:
                raise SweepError(f"{what}: {v!r} is not an integer from {minimum} to {most}")
        if len(set(values)) != len(values):
            raise SweepError(f"{what}: {values} repeats a value")


def _check_models(prof) -> None:
    from .models import check_student_name, check_teacher_name

    check_teacher_name(prof.teacher.name)
    check_student_name(prof.student.name)


def _check_grid(profile: str, overrides: dict, grid: dict) -> None:
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
                _check_models(get_profile(profile, {**overrides, key: v}))
            except KeyError as e:
                raise SweepError(f"--grid {key}: {e.args[0]}") from None
            except ValueError as e:
                raise SweepError(f"--grid {key}={v!r}: {e}") from None


def _check_dataset(dataset: str, data_root: Path) -> None:
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


def _combinations(dataset: str, n_labeled: Sequence[int], seeds: Sequence[int], grid: dict) -> list[dict]:
    """The grid's settings, one dict per combination; every run's folder name is checked (length, no two alike)."""
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


def validate(profile: str, dataset: str, data_root: Path, n_labeled: Sequence[int], seeds: Sequence[int], out: Path,
             overrides: dict, grid: dict, notebooks_dir: Path) -> list[dict]:
    """Check every argument before any work; returns the grid's settings (one dict per combination)."""
    prof = get_profile(profile, overrides)  # an unknown profile, --set key or bad value fails here (Key/ValueError)
    _check_values(n_labeled, seeds)
    _check_grid(profile, overrides, grid)
    try:
        _check_models(prof)
    except KeyError as e:
        raise SweepError(e.args[0]) from None
    _check_dataset(dataset, data_root)
    _check_sizes(prof, dataset, data_root, n_labeled)
    _check_out(Path(out))
    missing = [nb for nb in NOTEBOOKS if not (Path(notebooks_dir) / f"{nb}.ipynb").is_file()]
    if missing:
        raise SweepError(f"notebooks folder {notebooks_dir} lacks {', '.join(n + '.ipynb' for n in missing)}")
    return _combinations(dataset, n_labeled, seeds, grid)


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
    todo = _pending(specs, methods, failures)
    if todo and dataset == "phantom" and executor != "local":
        # made once here, not by several runs at the same time
        ensure_dataset(dataset, data_root, phantom_cases=get_profile(profile, overrides).data.phantom_cases)
    if todo:
        runner.run(todo, lambda spec, status: _announce_done(spec, status, failures))
    results = aggregate_locked(out, profile=profile, command=command, failures=failures,
                               wall_seconds=time.perf_counter() - t_all, axes=list(grid))
    return _summary(out, specs, failures, results, time.perf_counter() - t_all)


def _pending(specs: list, methods: list, failures: list) -> list:
    """The runs that still have work (read-only checks here; the worker repeats them under the run's lock): a run
    folder of another configuration or locked by another sweep fails, a finished one is skipped."""
    todo = []
    for spec in specs:
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
    return todo


def _summary(out: Path, specs: list, failures: list, results: int, seconds: float) -> int:
    """Print how many runs finished, the report's Dice table and the failed runs; the sweep's exit status."""
    print(f"\n{len(specs) - len(failures)}/{len(specs)} runs finished in {_fmt(seconds)}")
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
    return _aggregate(Path(out), profile=profile, command=command, failures=failures, wall_seconds=wall_seconds,
                      axes=axes)


# ------------------------------------------------------------------------------- command line


def _ints(text: str, what: str = "value", minimum: int = 0) -> list[int]:
    try:
        return int_list(text, what, minimum)
    except SweepError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _slurm_minutes(text: str) -> int:
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


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tskd_utils.reproduce", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
                    help="CPUs a run asks Ray/SLURM for (default by profile: "
                    + ", ".join(f"{p} {m.cpus}" for p, m in MACHINES.items()) + ")")
    ap.add_argument("--gpus-per-run", "--slurm-gpus", type=int, default=None,
                    help="GPUs a run asks Ray/SLURM for (default by profile: "
                    + ", ".join(f"{p} {m.gpus}" for p, m in MACHINES.items()) + ")")
    g = ap.add_argument_group("ray")
    g.add_argument("--ray-address", default=None, help="an existing Ray cluster (e.g. auto or ray://head:10001); "
                   "default: $RAY_ADDRESS, else a Ray runtime started on this machine")
    g = ap.add_argument_group("slurm (through submitit)")
    g.add_argument("--slurm-partition", default=None, help="the SLURM partition (sbatch --partition)")
    g.add_argument("--slurm-time", type=_slurm_minutes, default=None,
                   help="time limit per run (minutes or HH:MM:SS; default by profile: " + ", ".join(
                       f"{p} {_hours(m.slurm_minutes)}" for p, m in MACHINES.items()) + ")")
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
    return ap


def _hours(minutes: int) -> str:
    return f"{minutes} min" if minutes < 60 else f"{minutes / 60:g} h"


def _key_values(ap, items: Sequence[str], flag: str) -> dict:
    d = {}
    for item in items:
        if "=" not in item:
            ap.error(f"{flag} expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        d[k.strip()] = _value(v)
    return d


def _executor_options(ap, args) -> dict:
    """The chosen executor's options; an option of another executor is an error."""
    extra = _key_values(ap, args.slurm_extra, "--slurm-extra")
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
    return options


def main(argv: Optional[list] = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    overrides = _key_values(ap, args.overrides, "--set")
    options = _executor_options(ap, args)
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
