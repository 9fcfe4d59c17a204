"""Every command the README shows either runs here as written (in a temporary folder) or is listed in ``LONG`` with
what it costs; the predict/export commands run on a smoke run in tests/test_predict_export.py."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

# commands too long, interactive or networked for the test suite, and what each costs
LONG = {
    "make demo": "the whole pipeline, 30 min or more on 2 cores (README, 'What to expect')",
    "make test": "this suite, about 10 minutes",
    "make test-fast": "the suite without the slow runs",
    "make test-notebooks": "the nbval runs of the notebooks, about 4 minutes",
    "make install": "pip install into .venv: minutes, 2.4 to 7 GB",
    "make -B install": "make install again, to add an extra to an existing .venv (the same cost)",
    "make lab": "starts JupyterLab (interactive)",
    "make lock": "resolves the lock file against the registry (network); tests/test_lock.py checks the result",
    "make reproduce": "a sweep: one demo run per (n_labeled, seed), 30 min or more each",
    "python -m tskd_utils.reproduce": "a sweep (see make reproduce); its argument checks: tests/test_sweep_safety.py",
    "python -m tskd_utils.environment --sync": "rewrites the notebooks' badges after a version bump "
                                               "(tests/test_notebook_contract.py checks they agree)",
    "python -m tskd_utils.predict": "run on a smoke run: tests/test_predict_export.py",
    "python -m tskd_utils.export": "run on a smoke run: tests/test_predict_export.py",
    "python data_scripts/download_": "downloads (network); tested with the network mocked: tests/test_download.py",
    "python benchmarks/": "timings, minutes each (docs/benchmarks.md), never in the tests",
    "conda env create": "conda and the network",
    "conda activate": "conda",
    "pip install": "the network (make install runs it)",
    "TSKD_PROFILE=smoke": "the notebooks with nbval: tests/test_notebooks_alone.py",
}


def readme_commands() -> list[str]:
    """Shell commands of the README: lines of its bash blocks and inline `python ...` / `make ...` code."""
    text = (REPO / "README.md").read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line.strip())
            if line and not line.startswith("#"):
                found.append(" ".join(line.split()))
    for code in re.findall(r"`((?:python|make|conda|pip) [^`]+)`", text):
        found += [" ".join(c.split()) for c in code.split("&&")]
    return found


def _run(cmd: str, cwd) -> subprocess.CompletedProcess:
    argv = shlex.split(cmd)
    if argv[0] == "python":
        argv[0] = sys.executable
    argv = [str(REPO / a) if a.startswith("data_scripts/") else a for a in argv]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_every_readme_command_runs_or_is_listed_with_its_cost(tmp_path):
    commands = readme_commands()
    assert len(commands) > 15  # the parser found the README's commands (a test that reads nothing cannot fail)
    ran, unlisted = [], []
    # a folder of one's own images and masks, for prepare_folder's example
    for sub in ("images", "masks"):
        (tmp_path / "my" / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(4):
        mask = np.zeros((48, 48), np.uint8)
        mask[10 + k:30 + k, 12:36] = 1
        Image.fromarray(mask).save(tmp_path / "my" / "masks" / f"case{k}.png")
        Image.fromarray((rng.random((48, 48)) * 80 + mask * 120).astype(np.uint8)).save(
            tmp_path / "my" / "images" / f"case{k}.png")
    for cmd in dict.fromkeys(commands):
        if any(cmd.startswith(prefix) for prefix in LONG):
            continue
        if cmd.startswith(("python data_scripts/prepare_phantom.py", "python data_scripts/prepare_folder.py")):
            done = _run(cmd, tmp_path)
            assert done.returncode == 0, f"README command failed: {cmd}\n{done.stdout}\n{done.stderr}"
            assert "wrote" in done.stdout
            ran.append(cmd)
        else:
            unlisted.append(cmd)
    assert not unlisted, "README commands neither run by this test nor listed in LONG:\n" + "\n".join(unlisted)
    assert any("prepare_phantom" in c for c in ran) and any("prepare_folder" in c for c in ran)
    assert (tmp_path / "data" / "phantom" / "dataset.json").is_file()
    assert (tmp_path / "data" / "mydata" / "dataset.json").is_file()


@pytest.mark.parametrize("script", ["data_scripts/prepare_phantom.py", "data_scripts/prepare_folder.py",
                                    "data_scripts/prepare_hc18.py", "-m tskd_utils.reproduce",
                                    "-m tskd_utils.predict", "-m tskd_utils.export"])
def test_command_line_help_documents_every_option(script):
    done = subprocess.run([sys.executable, *script.split()[:1], *script.split()[1:], "--help"]
                          if script.startswith("-m") else [sys.executable, str(REPO / script), "--help"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    entries, current = [], None
    for line in done.stdout.splitlines():
        if re.match(r"^  -", line):
            current = [line]
            entries.append(current)
        elif current is not None and re.match(r"^\s{4,}\S", line):
            current.append(line)
        else:
            current = None
    assert len(entries) > 3, done.stdout
    bare = []
    for entry in entries:
        m = re.match(r"^  (\S.*?)(?:\s{2,}(.*))?$", entry[0])
        words = " ".join([m.group(2) or ""] + [ln.strip() for ln in entry[1:]]).strip()
        if not words:
            bare.append(m.group(1))
    assert not bare, f"{script}: options without help text: {bare}"
