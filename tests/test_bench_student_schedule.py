"""benchmarks/bench_student_schedule.py: its variants parse or fail with a clear message, and a variant's folder is a
copy, so training a variant never writes into the finished run it starts from."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_student_schedule", ROOT / "benchmarks" / "bench_student_schedule.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variants_parse_and_bad_ones_are_named():
    bench = _bench()
    assert bench.parse_variant("long:distill.epochs=20,finetune.lr=1e-4") == (
        "long", {"distill.epochs": "20", "finetune.lr": "1e-4"})
    for bad in ("finetune.lr=1e-4", "name:", "name:finetune.lr", ":finetune.lr=1"):
        with pytest.raises(SystemExit, match="--variant"):
            bench.parse_variant(bad)


def test_a_variant_folder_is_a_copy_of_what_it_reads(tmp_path):
    src, dst = tmp_path / "run", tmp_path / "out" / "v"
    for rel in ("config.json", "splits.json", "teacher/lora/w.safetensors", "cache/targets/a.safetensors",
                "students/ts_kd/pretrain/final.safetensors", "students/ts_kd/finetune/log.csv", "metrics/per_case.csv"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    _bench().copy_run(src, dst, ["ts_kd", "scratch"])
    copied = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert copied == ["cache/targets/a.safetensors", "config.json", "splits.json",
                      "students/ts_kd/pretrain/final.safetensors", "teacher/lora/w.safetensors"]  # no test metrics, no old fine-tuning
    (dst / "students/ts_kd/pretrain/final.safetensors").write_text("retrained")
    (dst / "cache/targets/a.safetensors").unlink()
    assert (src / "students/ts_kd/pretrain/final.safetensors").read_text() == "students/ts_kd/pretrain/final.safetensors"
    assert (src / "cache/targets/a.safetensors").is_file()
