"""Shared fixtures: a small toy dataset in the common format and smoke-profile runs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# the real HC18 images with filled masks, for the realdata tests: $TSKD_HC18_RAW, else shared/datasets/hc18 beside
# the checkout (where CI keeps its copy); the tests are skipped when neither exists
HC18 = Path(os.environ.get("TSKD_HC18_RAW") or REPO.parent / "shared" / "datasets" / "hc18")

# make test runs the files on 2 processes (pytest-xdist): one thread each there, so that they share the 2 cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
NO_TRAINING = "TSKD_TEST_NO_TRAINING"  # make test-fast: a test that runs a training epoch must be marked `trains`


# The longest test files first (docs/benchmarks.md, "Test suite": seconds per file): with the files shared between
# two processes (pytest-xdist, --dist loadfile), a long file started last would leave the other process idle at the
# end. The Makefile passes --no-loadscope-reorder: without it pytest-xdist re-sorts the files by their number of tests
# (the sweeps, with few tests each, last). The sort is stable: the order inside a file, and of the other files, is kept.
LONGEST_FIRST = ("test_sweep_cluster.py", "test_notebooks_alone.py", "test_pipeline.py", "test_predict_export.py",
                 "test_sweep_safety.py", "test_teacher.py", "test_converters_hc18_busi_kidneyus_folder.py",
                 "test_geometry.py", "test_distill.py", "test_readme_commands.py", "test_realdata.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _training_is_marked(request, monkeypatch):
    if os.environ.get(NO_TRAINING) != "1" or request.node.get_closest_marker("trains"):
        return
    from tskd_utils import training

    def refuse(self, *args, **kwargs):
        raise RuntimeError(f"{request.node.nodeid} trains a model ({self.desc}): mark it @pytest.mark.trains, or "
                           f"run it with make test")

    monkeypatch.setattr(training.Stage, "epochs", refuse)


def make_toy_dataset(root: Path, n_cases: int = 24, size: int = 40, frames: int = 2, seed: int = 0,
                     name: str = "toy") -> Path:
    """Noisy bright ellipses (class 1) with a darker core (class 2): learnable in a few steps."""
    from tskd_utils.io import DatasetWriter

    rng = np.random.default_rng(seed)
    meta = {"name": name, "modality": "synthetic", "classes": ["background", "ring", "core"],
            "license": "CC0-1.0", "citation": "test fixture", "source": "tests/conftest.py"}
    yy, xx = np.mgrid[0:size, 0:size]
    with DatasetWriter(root / name, meta) as w:
        for i in range(n_cases):
            cy, cx = rng.uniform(0.35, 0.65, 2) * size
            ry, rx = rng.uniform(0.18, 0.3, 2) * size
            r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            mask = np.where(r < 0.45, 2, np.where(r < 1, 1, 0)).astype(np.uint8)
            img = 60 + 120 * (mask == 1) + 40 * (mask == 2) + rng.normal(0, 20, (size, size))
            w.add_case(f"c{i:03d}", f"s{i // frames:03d}", np.clip(img, 0, 255).astype(np.uint8), mask)
    return root / name


@pytest.fixture
def toy_root(tmp_path) -> Path:
    """DATA_ROOT with a 24-case toy dataset at tmp_path/data/toy."""
    make_toy_dataset(tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture
def smoke_run(tmp_path, toy_root):
    """A smoke-profile run folder on the toy dataset (splits written)."""
    from tskd_utils.run import setup_run

    return setup_run(tmp_path / "runs" / "r0", profile="smoke", dataset="toy", data_root=toy_root,
                     n_labeled=6, seed=0)
