"""Where the notebooks run: platform and GPU detection, the defaults that follow, what is printed and recorded,
the declared dependencies, and the setup cell on a simulated fresh VM (the package not importable)."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from conftest import REPO
from tskd_utils import __version__, config, environment

CLEAN_ENV_KEYS = ("COLAB_RELEASE_TAG", "COLAB_GPU", "KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "BINDER_LAUNCH_HOST",
                  "BINDER_REPO_URL", environment.ENV_PLATFORM)


@pytest.fixture
def local(monkeypatch):
    for key in CLEAN_ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    return monkeypatch


# ---------------------------------------------------------------------------------- detection & defaults


def test_platform_detection(local):
    assert environment.detect_platform() == "local"
    local.setenv("BINDER_LAUNCH_HOST", "https://mybinder.org/")
    assert environment.detect_platform() == "binder"
    local.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert environment.detect_platform() == "kaggle"
    local.setenv("COLAB_RELEASE_TAG", "release-colab_20250101")
    assert environment.detect_platform() == "colab"
    local.setenv("TSKD_PLATFORM", "local")
    assert environment.detect_platform() == "local"
    local.setenv("TSKD_PLATFORM", "laptop")
    with pytest.raises(ValueError, match="TSKD_PLATFORM='laptop'"):
        environment.detect_platform()


def test_defaults_follow_platform_and_gpu(local, tmp_path):
    local.setattr(environment, "gpu_info", lambda: None)
    assert environment.default_profile() == "demo"
    local.setattr(environment, "gpu_info", lambda: {"name": "Tesla T4", "memory_gb": 14.7, "count": 1, "cuda": "12.4"})
    assert environment.default_profile() == "colab"
    local.setenv("TSKD_PLATFORM", "binder")  # 2 GB: only the smoke profile's teacher fits
    assert environment.default_profile() == "smoke"
    assert "does not fit" in " ".join(environment.hints("demo", "runs/demo"))
    (only,) = environment.hints("smoke", "runs/smoke")
    assert "one notebook's kernel" in only and "does not fit" not in only
    local.setenv("TSKD_PLATFORM", "local")
    # local: the checkout
    assert environment.default_run_dir("demo") == str(environment.REPO_ROOT / "runs" / "notebooks" / "demo")
    assert environment.default_data_root() == str(environment.REPO_ROOT / "data")
    # Kaggle: /kaggle/working, kept with the notebook's output
    local.setenv("TSKD_PLATFORM", "kaggle")
    assert environment.default_run_dir("colab") == "/kaggle/working/runs/notebooks/colab"
    assert environment.default_data_root() == "/kaggle/working/data"
    # Colab: the VM's disk, or Google Drive when asked (an already mounted Drive is not mounted again)
    local.setenv("TSKD_PLATFORM", "colab")
    assert environment.default_run_dir("colab") == str(environment.REPO_ROOT / "runs" / "notebooks" / "colab")
    (tmp_path / "drive" / "MyDrive").mkdir(parents=True)
    local.setattr(environment, "DRIVE_MOUNT", tmp_path / "drive")
    local.setattr(environment, "DRIVE_FOLDER", tmp_path / "drive" / "MyDrive" / "tskd")
    assert environment.default_run_dir("colab", drive=True) == str(tmp_path / "drive" / "MyDrive" / "tskd" / "runs" / "notebooks" / "colab")
    assert environment.default_data_root(drive=True) == str(tmp_path / "drive" / "MyDrive" / "tskd" / "data")
    # drive=True elsewhere: a note, and the local folder
    local.setenv("TSKD_PLATFORM", "local")
    assert environment.default_run_dir("demo", drive=True) == str(environment.REPO_ROOT / "runs" / "notebooks" / "demo")


def test_env_default_reads_typed_values_and_names_a_bad_one(monkeypatch):
    monkeypatch.setenv("TSKD_DRIVE", "yes")
    assert config.env_default("drive", False) is True
    monkeypatch.setenv("TSKD_METHODS", "ts_kd, scratch")
    assert config.env_default("methods", ["all"]) == ["ts_kd", "scratch"]
    monkeypatch.setenv("TSKD_SEED", "one")
    with pytest.raises(ValueError, match="TSKD_SEED='one': expected an integer"):
        config.env_default("seed", 0)
    monkeypatch.setenv("TSKD_DRIVE", "maybe")
    with pytest.raises(ValueError, match="TSKD_DRIVE='maybe'"):
        config.env_default("drive", False)


def test_print_config_shows_versions_device_and_hints(local, capsys):
    local.setattr(environment, "gpu_info", lambda: None)
    facts = environment.print_config("colab", "/somewhere/runs/colab")
    out = capsys.readouterr().out
    for name in ("torch", "torchvision", "timm", "peft", "diffusers"):
        assert re.search(rf"^{name} +{re.escape(importlib.metadata.version(name))}$", out, re.M), name
    assert f"tskd {__version__} (release v{__version__}" in out
    assert "cpu (no CUDA GPU visible)" in out and f"{os.cpu_count()} CPU cores" in out
    assert "hint: profile 'colab' is sized for a GPU" in out and "TSKD_PROFILE=demo" in out
    assert facts["device"] == "cpu" and facts["packages"]["torch"] == importlib.metadata.version("torch")
    # on Colab, a run folder on the VM's disk gets the Drive hint; the demo profile gets no GPU hint
    local.setenv("TSKD_PLATFORM", "colab")
    environment.print_config("demo", "/content/tskd/runs/demo")
    out = capsys.readouterr().out
    assert "GPU" not in out.split("hint:", 1)[-1] and "drive = True" in out
    assert "Runtime > Change runtime type" in environment.hints("colab", "/content/drive/MyDrive/tskd/runs/colab")[0]


def test_setup_run_records_the_environment(smoke_run, local):
    rec = json.loads((smoke_run.dir / "environment.json").read_text())
    assert rec["latest"]["packages"]["torch"] == importlib.metadata.version("torch")
    assert rec["latest"]["device"] == "cpu" and rec["latest"]["release"] == environment.RELEASE
    assert len(rec["history"]) == 1
    environment.record(smoke_run.dir)  # the same environment again: still one entry
    assert len(json.loads((smoke_run.dir / "environment.json").read_text())["history"]) == 1
    other = {**environment.describe(), "platform": "colab", "device": "cuda"}  # e.g. notebook 02 on a Colab GPU
    environment.record(smoke_run.dir, other)
    rec = json.loads((smoke_run.dir / "environment.json").read_text())
    assert [h["platform"] for h in rec["history"]] == ["local", "colab"] and rec["latest"]["device"] == "cuda"


# ----------------------------------------------------------------------------------- dependencies


def _declared() -> set[str]:
    """Distribution names in pyproject.toml's dependencies and optional dependencies (extras)."""
    text = (REPO / "pyproject.toml").read_text()
    blocks = [re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1),
              text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]]
    return {re.split(r"[<>=!~ \[]", s)[0].lower() for b in blocks for s in re.findall(r'"([^"]+)"', b)}


def test_every_imported_package_is_declared_with_the_floors_the_code_needs():
    """What tskd_utils imports from outside the standard library is a declared dependency (cv2 was not)."""
    declared = {d.replace("_", "-") for d in _declared()}
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for path in sorted((REPO / "tskd_utils").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("tskd_utils", "google"):  # google.colab: Colab's own
                    continue
                if not {d.lower().replace("_", "-") for d in dists.get(top, [top])} & declared:
                    missing.setdefault(top, []).append(path.name)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    text = (REPO / "pyproject.toml").read_text()
    assert '"torch>=2.6"' in text  # export: torch.onnx.export(dynamo=True, dynamic_shapes=, external_data=)
    assert '"monai>=1.4"' in text  # the first MONAI for NumPy 2
    assert "torchvision" not in declared  # not imported here (timm brings it)
    assert "opencv-python-headless>=" in text


# ------------------------------------------------------------------------------ the setup cell, fresh VM


def _setup_cell() -> str:
    nb = json.loads((REPO / "notebooks" / f"{environment.NOTEBOOKS[0]}.ipynb").read_text())
    return "".join(nb["cells"][1]["source"])


def _fresh_python(tmp_path: Path) -> Path:
    """A Python that has pip and setuptools but neither the project nor its dependencies: a fresh VM's view.
    (pip and setuptools come from the test's environment through a .pth file, so nothing is downloaded.)"""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    tools = tmp_path / "build-tools"
    tools.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if re.fullmatch(r"(pip|setuptools|wheel|pkg_resources|_distutils_hack)(-[^/]*\.dist-info)?", entry.name):
            (tools / entry.name).symlink_to(entry)
    venv_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    Path(venv_site, "build-tools.pth").write_text(f"{tools}\n")
    return python


def _vm_env(tmp_path: Path, **extra) -> dict:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8",
           # offline and fast in the test: the dependencies are not installed (a real VM installs them)
           "PIP_NO_DEPS": "1", "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return {**env, **extra}


CHECK = ("\nimport tskd_utils, tskd_utils.environment as e\n"
         "print('IMPORTED', tskd_utils.__file__, tskd_utils.__version__, e.RELEASE)\n")


def test_setup_cell_clones_the_release_installs_and_imports_on_a_fresh_vm(tmp_path):
    src = tmp_path / "origin"  # stands for the GitHub repository: a clone of this checkout, tagged with the release
    subprocess.run(["git", "clone", "-q", str(REPO), str(src)], check=True)
    subprocess.run(["git", "-C", str(src), "tag", "-f", environment.RELEASE], check=True, capture_output=True)
    python = _fresh_python(tmp_path)
    assert subprocess.run([str(python), "-c", "import tskd_utils"], cwd=tmp_path, env=_vm_env(tmp_path),
                          capture_output=True).returncode != 0  # not importable: a fresh VM
    vm = tmp_path / "content"
    vm.mkdir()
    cell = _setup_cell() + CHECK
    for attempt in ("first run", "re-run"):  # safe to re-run: the second time nothing is cloned or installed
        t0 = time.perf_counter()
        done = subprocess.run([str(python), "-c", cell], cwd=vm, env=_vm_env(tmp_path, TSKD_REPO_URL=str(src)),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{attempt}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        line = next(ln for ln in done.stdout.splitlines() if ln.startswith("IMPORTED"))
        assert line.split()[1:] == [str(vm / "tskd" / "tskd_utils" / "__init__.py"), __version__, environment.RELEASE]
        print(f"setup cell, {attempt}: {time.perf_counter() - t0:.1f} s")
    tag = subprocess.run(["git", "-C", str(vm / "tskd"), "describe", "--tags"], capture_output=True, text=True)
    assert tag.stdout.strip() == environment.RELEASE  # the release, not main


def _without_the_project() -> str:
    """Code that makes this environment's own (editable) install of the project invisible."""
    return ("import sys\nsys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
            "getattr(f, '__module__', '')]\nsys.path[:] = [p for p in sys.path if not p.startswith("
            f"{str(REPO)!r})]\n")


def test_setup_cell_fails_at_once_with_a_message_on_a_bad_url(tmp_path):
    vm = tmp_path / "content"
    vm.mkdir()
    cell = _without_the_project() + _setup_cell()
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", cell], cwd=vm, capture_output=True, text=True, timeout=60,
                          env=_vm_env(tmp_path, TSKD_REPO_URL=str(tmp_path / "no-such-repository")))
    assert time.perf_counter() - t0 < 30 and done.returncode != 0
    err = done.stderr
    assert "RuntimeError: could not clone" in err and "no-such-repository" in err and environment.RELEASE in err
    assert "TSKD_REPO_URL" in err and "TSKD_REF" in err
    assert not (vm / "tskd").exists()


def test_setup_cell_never_waits_for_a_password(tmp_path):
    """A private or mistyped GitHub URL makes git ask for a user name; the cell disables the prompt, so git
    fails at once. A stand-in git shows what the real one is given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "git").write_text('#!/bin/sh\necho "fatal: prompt=$GIT_TERMINAL_PROMPT stdin=$(test -t 0 && echo tty '
                                 '|| echo closed)" >&2\nexit 128\n')
    (bin_dir / "git").chmod(0o755)
    vm = tmp_path / "content"
    vm.mkdir()
    env = _vm_env(tmp_path, TSKD_REPO_URL="https://github.com/someone/private.git", TSKD_REF="main")
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    done = subprocess.run([sys.executable, "-c", _without_the_project() + _setup_cell()], cwd=vm, env=env,
                          capture_output=True, text=True, timeout=60)
    assert "could not clone https://github.com/someone/private.git at main: fatal: prompt=0 stdin=closed" in done.stderr
