"""The smoke pipeline on a subset of the real HC18 data (skipped without a copy: conftest.HC18)."""

from __future__ import annotations

import json

import pytest

from conftest import HC18

pytestmark = [pytest.mark.realdata, pytest.mark.slow,
              pytest.mark.skipif(not HC18.is_dir(), reason=f"real HC18 copy not found at {HC18}")]


def test_smoke_pipeline_on_an_hc18_subset(tmp_path):
    from tskd_utils import distill, evaluate, generation, teacher
    from tskd_utils.datasets import prepare
    from tskd_utils.run import ALL_METHODS, setup_run

    root = prepare("hc18", HC18, tmp_path / "data", max_cases=60)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["n_cases"] == 60 and meta["classes"] == ["background", "fetal head"]
    run = setup_run(tmp_path / "runs" / "hc18_n6_s0", "smoke", "hc18", tmp_path / "data", n_labeled=6, seed=0)
    teacher.train_teacher(run)
    generation.generate(run)
    distill.run_methods(run, "all")
    summary = evaluate.evaluate_run(run)
    assert summary["hd95_unit"] == "mm"  # HC18 has a pixel size for every image
    assert set(summary["methods"]) == set(ALL_METHODS)
    for s in summary["methods"].values():
        assert 0 <= s["dice"] <= 1 and s["params_m"] > 0
