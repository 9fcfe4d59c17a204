"""The lock file (requirements/lock-linux-x86_64.txt) pins every dependency of pyproject.toml, extras included, at a
version inside the declared range, and make install / environment.yml use it."""
import subprocess
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import REPO

LOCK = REPO / "requirements" / "lock-linux-x86_64.txt"
ENV = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "python_version": "3.11",
       "python_full_version": "3.11.7", "implementation_name": "cpython", "os_name": "posix"}


def _locked() -> dict:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{LOCK}: {line!r} is not pinned with =="
            pins[canonicalize_name(name.split("[")[0])] = Version(version.split(";")[0].strip())
    return pins


def test_the_lock_satisfies_every_declared_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    pins, problems = _locked(), []
    for text in declared:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(ENV):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req.name} is not in the lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req.name}=={pins[name]} is outside pyproject.toml's {req.specifier}")
    assert not problems, "\n".join(problems)


def test_the_lock_pins_torch_to_the_release_of_the_pin_file():
    pin = {canonicalize_name(Requirement(ln).name): str(Requirement(ln).specifier)
           for ln in (REPO / "requirements" / "torch-pin.txt").read_text().splitlines() if ln and not ln.startswith("#")}
    pins = _locked()
    for name, spec in pin.items():
        assert f"=={pins[name]}" == spec


def test_make_install_and_environment_yml_use_the_lock():
    dry = subprocess.run(["make", "-n", "-B", "install", "PINNED=1"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert f"-c {LOCK.relative_to(REPO)}" in dry
    unpinned = subprocess.run(["make", "-n", "-B", "install", "PINNED=0"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout
    assert "-c requirements" not in unpinned and 'pip install -q -e ".[dev]"' in unpinned
    assert "- -c requirements/lock-linux-x86_64.txt" in (REPO / "environment.yml").read_text()
