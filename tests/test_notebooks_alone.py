"""The notebooks the way a reader runs them: nbval ("Run all"), the smoke profile chosen through the
environment only (``TSKD_PROFILE``, ``TSKD_DATA_ROOT``, ``TSKD_RUN_DIR``: no injected parameters), on CPU,
in temporary data and run folders. ``make test-notebooks`` runs this file.

* all five notebooks in order on one run folder;
* notebooks 04 and 05 each alone on an empty run folder and an empty data root (a fresh Colab/Kaggle VM):
  they compute the missing teacher, synthetic images and students themselves (tskd_utils.stages).

nbval executes each notebook in a kernel of this Python (``--nbval-current-env``) and never writes the
notebook back; the test checks that the files are unchanged (outputs stay stripped). A notebook that cannot
run here would be listed in ``NOT_IN_CI`` with its reason (README, "Contributing"); none is today.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO
from tskd_utils.config import get_profile
from tskd_utils.environment import NOTEBOOKS
from tskd_utils.run import Run

pytestmark = [pytest.mark.slow, pytest.mark.notebooks]
NOT_IN_CI: dict = {}  # notebook -> why it cannot run in CI (none: every notebook runs in the smoke profile)
ALONE = ("04_distillation", "05_evaluation")


def _digests() -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((REPO / "notebooks").glob("*.ipynb"))}


def nbval(notebooks, data_root, run_dir, timeout: int = 900, **variables) -> float:
    """Run ``pytest --nbval-lax`` on the notebooks (in order) as a reader would; returns the seconds it took.
    ``variables``: more ``TSKD_<NAME>`` settings (e.g. methods="scratch,ts_kd")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSKD_")}  # only what is set here
    env.update(TSKD_PROFILE="smoke", TSKD_DATA_ROOT=str(data_root), TSKD_RUN_DIR=str(run_dir), TSKD_PLATFORM="local",
               CUDA_VISIBLE_DEVICES="", PYTHONDONTWRITEBYTECODE="1",
               **{f"TSKD_{k.upper()}": str(v) for k, v in variables.items()})
    paths = [str(REPO / "notebooks" / f"{n}.ipynb") for n in notebooks if n not in NOT_IN_CI]
    before, t0 = _digests(), time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                           "--nbval-current-env", "--nbval-cell-timeout", "600", *paths],
                          cwd=REPO / "notebooks", env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    assert done.returncode == 0, f"nbval failed on {notebooks}:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
    assert _digests() == before, "nbval changed a notebook file (outputs must stay stripped)"
    print(f"nbval {', '.join(notebooks)}: {seconds:.0f} s")
    return seconds


def test_all_notebooks_in_order_with_environment_defaults(tmp_path):
    run_dir = tmp_path / "runs" / "in-order"
    nbval(NOTEBOOKS, tmp_path / "data", run_dir)
    assert (run_dir / "results.csv").is_file() and (run_dir / "environment.json").is_file()
    rows = (run_dir / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 8 and all(",smoke" in r for r in rows[1:])  # teacher, six students, unet_supervised


@pytest.mark.parametrize("notebook", ALONE)
def test_notebook_runs_alone_on_an_empty_run_folder(tmp_path, notebook):
    """A fresh VM: no run folder, no data. Two students (TSKD_METHODS) keep it short; ts_kd needs the teacher
    and the synthetic images, scratch neither (the in-order pass above trains all six)."""
    run_dir = tmp_path / "runs" / notebook
    nbval([notebook], tmp_path / "data", run_dir, methods="scratch,ts_kd")
    assert (run_dir / "teacher" / "metrics.json").is_file()
    assert (run_dir / "synthetic" / "synthetic.json").is_file()
    assert sorted(p.name for p in (run_dir / "students").iterdir()) == ["scratch", "ts_kd"]
    assert all((run_dir / "students" / m / "student.safetensors").is_file() for m in ("scratch", "ts_kd"))
    if notebook == "05_evaluation":
        rows = (run_dir / "results.csv").read_text().splitlines()[1:]
        assert [r.split(",")[3] for r in rows] == ["teacher", "scratch", "ts_kd"]


# ------------------------------------------------------------------------------ the stages, directly


def test_ensure_computes_only_what_is_missing_and_says_how_long(smoke_run, capsys):
    from tskd_utils import stages

    assert stages.ensure_students(smoke_run, ["scratch"]) == ["scratch"]  # needs neither teacher nor synthetic
    out = capsys.readouterr().out
    assert "No trained student for scratch" in out and "under a minute on 2 CPU cores in the smoke profile" in out
    assert not stages.teacher_ready(smoke_run) and not stages.synthetic_ready(smoke_run)
    assert stages.ensure_students(smoke_run, ["scratch"]) == [] and capsys.readouterr().out == ""  # present: nothing
    from tskd_utils.config import MACHINES, PROFILES

    assert set(MACHINES) == set(PROFILES)  # every profile has its machine facts, in one place
    colab = Run(smoke_run.dir, get_profile("colab"), "toy", smoke_run.data_root, 6, 0)  # on this CPU machine
    text = stages.estimate(colab, "students", 6)
    assert "colab profile" in text and "not measured" in text and "no GPU" in text
