"""Stand-in notebooks 01-05 for testing the sweep machinery in seconds instead of minutes.

They take the real notebooks' parameters and write the files the real ones claim (config.json, splits.json, the
teacher's weights, students/<m>/student.safetensors, results.csv, metrics/per_case.csv, metrics/summary.json), with
deterministic made-up Dice values, so skip / resume / locks / executors / the report can be exercised without
training anything. Each execution appends a line to ``<run>/fake_log.txt`` (notebook, force), so a test sees what
was executed again. Knobs, read from ``RUNS/fake_knobs.json`` (a file, so that they reach kernels in Ray workers and
SLURM jobs alike; see :func:`set_knobs`): ``sleep_02`` seconds of sleep in notebook 02, ``skip_student`` a method
notebook 04 does not write, ``fail`` a notebook that raises.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

PARAMETERS = '''profile = "smoke"
dataset = "phantom"
data_root = "data"
run_dir = "runs/x"
n_labeled = 4
seed = 0
overrides = {}
methods = ["all"]
force = False'''

COMMON = '''import hashlib, json, os, pathlib, time
run = pathlib.Path(run_dir)
run.mkdir(parents=True, exist_ok=True)
knobs_file = run.parent / "fake_knobs.json"
knobs = json.loads(knobs_file.read_text()) if knobs_file.is_file() else {}
if knobs.get("fail") == NB:
    raise RuntimeError(f"injected failure in {NB}")
with open(run / "fake_log.txt", "a") as fh:
    fh.write(f"{NB} force={force}\\n")

def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)

def weights(path, n=16):
    import numpy as np
    from safetensors.numpy import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.arange(n, dtype=np.float32)}, str(path))
'''

BODIES = {
    "01_data_preparation": '''from tskd_utils.config import get_profile, profile_to_dict
cfg = {"dataset": dataset, "profile": profile, "n_labeled": int(n_labeled), "seed": int(seed),
       "overrides": json.loads(json.dumps(overrides)),
       "resolved_profile": json.loads(json.dumps(profile_to_dict(get_profile(profile, overrides))))}
if (run / "config.json").is_file():
    have = json.loads((run / "config.json").read_text())
    assert all(have[k] == cfg[k] for k in ("dataset", "profile", "n_labeled", "seed", "overrides")), have
write(run / "config.json", json.dumps(cfg))  # as setup_run: the profile as this code defines it
write(run / "splits.json", json.dumps({"test": [f"c{i:02d}" for i in range(10)]}))''',
    "02_teacher_lora_finetuning": '''t_end = time.time() + float(knobs.get("sleep_02", 0))
while time.time() < t_end:
    time.sleep(0.1)
t = run / "teacher"
weights(t / "head.safetensors")
weights(t / "frozen_head.safetensors")
weights(t / "adapter" / "adapter_model.safetensors")
write(t / "adapter" / "adapter_config.json", json.dumps({"r": 4}))
write(t / "metrics.json", json.dumps({"lora_val_dice": 0.5}))''',
    "03_diffusion_synthesis": '''pass''',
    "04_distillation": '''for m in methods:
    if m != knobs.get("skip_student"):
        weights(run / "students" / m / "student.safetensors", 32)''',
    "05_evaluation": '''def unit(*key):
    return hashlib.sha1(repr(key).encode()).digest()[0] / 255

BASE = {"teacher": 0.80, "ts_kd": 0.72, "ts_kd_nosyn": 0.70, "ta_kd": 0.55, "mae": 0.71, "mocov3": 0.6, "scratch": 0.5}
shift = 0.01 * float(overrides.get("teacher.lora_rank", 0)) + 0.001 * float(overrides.get("finetune.epochs", 0))
present = ["teacher"] + [m for m in methods if (run / "students" / m / "student.safetensors").is_file()]
cases = json.loads((run / "splits.json").read_text())["test"]
lines, rows = ["method,case,class,dice,iou,hd95"], []
for m in present:
    dices = []
    for c in cases:
        d = min(1.0, max(0.0, BASE[m] + shift + 0.1 * unit(c) + 0.04 * (unit(m, c, seed) - 0.5)))
        dices.append(d)
        lines.append(f"{m},{c},fg,{d:.6f},{d / (2 - d):.6f},{10 * (1 - d):.4f}")
    dice = sum(dices) / len(dices)
    rows.append(f"{dataset},{n_labeled},{seed},{m},{dice:.6f},{dice / (2 - dice):.6f},{10 * (1 - dice):.4f},"
                f"{0.5 if m == 'teacher' else 0.1},{20.0 if m == 'teacher' else 2.0},{profile}")
write(run / "metrics" / "per_case.csv", "\\n".join(lines) + "\\n")
write(run / "metrics" / "summary.json", json.dumps({"methods": present}))
write(run / "results.csv", "dataset,n_labeled,seed,method,dice,iou,hd95,params_m,latency_ms,profile\\n"
      + "\\n".join(rows) + "\\n")''',
}


def make_fake_notebooks(folder: Path) -> Path:
    """Write the five stand-in notebooks into ``folder`` (same names as the real ones); returns it."""
    from tskd_utils.reproduce import NOTEBOOKS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for nb in NOTEBOOKS:
        cells = [nbformat.v4.new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}),
                 nbformat.v4.new_code_cell(f"NB = {nb!r}\n" + COMMON),
                 nbformat.v4.new_code_cell(BODIES[nb])]
        notebook = nbformat.v4.new_notebook(cells=cells)
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(notebook, str(folder / f"{nb}.ipynb"))
    return folder


def set_knobs(out: Path, **knobs) -> None:
    """Set the stand-in notebooks' knobs for the runs in RUNS folder ``out`` (no knobs: remove the file)."""
    import json

    path = Path(out) / "fake_knobs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if knobs:
        path.write_text(json.dumps(knobs))
    else:
        path.unlink(missing_ok=True)


def fake_log(run_dir: Path) -> list[str]:
    path = Path(run_dir) / "fake_log.txt"
    return path.read_text().splitlines() if path.is_file() else []


BASE = {"teacher": 0.80, "teacher_frozen": 0.6, "ts_kd": 0.72, "ts_kd_nosyn": 0.70, "ta_kd": 0.55, "mae": 0.71,
        "mocov3": 0.6, "scratch": 0.5, "unet_supervised": 0.74}


def write_fake_run(out: Path, dataset: str, n_labeled: int, seed: int, settings: dict | None = None,
                   methods=("ts_kd", "mae", "scratch"), profile: str = "smoke", shift: float = 0.0,
                   n_cases: int = 12) -> Path:
    """A finished run folder written directly (no kernels): config.json, status.json, results.csv, per_case.csv.
    Dice per case = the method's base + ``shift`` + a case effect + a small (method, case, seed) effect."""
    import hashlib
    import json

    from tskd_utils.config import get_profile, profile_to_dict
    from tskd_utils.reproduce import NOTEBOOKS, run_name

    def unit(*key):
        return hashlib.sha1(repr(key).encode()).digest()[0] / 255

    settings = dict(settings or {})
    run = Path(out) / run_name(dataset, n_labeled, seed, settings)
    (run / "metrics").mkdir(parents=True, exist_ok=True)
    cfg = {"dataset": dataset, "profile": profile, "n_labeled": n_labeled, "seed": seed, "overrides": settings,
           "resolved_profile": json.loads(json.dumps(profile_to_dict(get_profile(profile, settings))))}
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "status.json").write_text(json.dumps({"state": "done", "seconds": 1.0, "notebooks": {
        nb: {"state": "done", "seconds": 0.2} for nb in NOTEBOOKS}}))
    lines, rows = ["method,case,class,dice,iou,hd95"], []
    for m in ["teacher", *methods]:
        dices = []
        for i in range(n_cases):
            c = f"c{i:02d}"
            d = min(1.0, max(0.0, BASE[m] + shift + 0.1 * unit(c) + 0.04 * (unit(m, c, seed) - 0.5)))
            dices.append(d)
            lines.append(f"{m},{c},fg,{d:.6f},{d / (2 - d):.6f},{10 * (1 - d):.4f}")
        dice = sum(dices) / len(dices)
        rows.append(f"{dataset},{n_labeled},{seed},{m},{dice:.6f},{dice / (2 - dice):.6f},{10 * (1 - dice):.4f},"
                    f"{0.5 if m == 'teacher' else 0.1},{20.0 if m == 'teacher' else 2.0},{profile}")
    (run / "metrics" / "per_case.csv").write_text("\n".join(lines) + "\n")
    (run / "results.csv").write_text("dataset,n_labeled,seed,method,dice,iou,hd95,params_m,latency_ms,profile\n"
                                     + "\n".join(rows) + "\n")
    return run
