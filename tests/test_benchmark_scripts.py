"""Benchmark scripts: the transfer-set ablation's report (bench_transfer_set.py --from-csv), the student-schedule variants
(bench_student_schedule.py: variants parse or fail with a clear message, and a variant's folder is a copy, so training a
variant never writes into the finished run it starts from) and the teacher variants (bench_teacher_variants.py, on the
smoke profile: a variant trains beside the run, reuses what its settings leave unchanged, and the run is only read), and
the post-processing benchmark's largest-component step (bench_postprocess.py), and the teacher against the U-Net
(bench_teacher_vs_unet.py, smoke profile: both scored, seeds pooled, a second invocation trains and scores nothing), and
pooling saved per-case tables of several seeds (pool_per_case.py: run folders and saved tables, a mix refused)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str = "bench_transfer_set"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _per_case(seed: int, unlabeled: int, gain: float, n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(seed * 1000 + unlabeled)
    base = rng.uniform(0.7, 0.9, n)
    rows = [("ts_kd_nosyn", base), ("ts_kd", base + gain + rng.normal(0, 0.005, n))]
    return pd.concat([pd.DataFrame({"method": m, "case": [f"c{i:03d}" for i in range(n)], "dice": d, "seed": seed,
                                    "unlabeled": unlabeled, "synthetic": 100}) for m, d in rows])


def test_from_csv_joins_invocations_and_finds_only_the_real_gain(tmp_path, monkeypatch):
    # compositions and seeds written by separate invocations, in the order they were run (200 before 50 and 0)
    parts = {"all": pd.concat([_per_case(0, 200, 0.0), _per_case(1, 200, 0.0)]),
             "scarce": pd.concat([_per_case(s, u, 0.03) for s in (0, 1) for u in (0, 50)])}
    paths = []
    for name, df in parts.items():
        paths.append(tmp_path / f"{name}.csv")
        df.to_csv(paths[-1], index=False)
    out = tmp_path / "report"
    monkeypatch.setattr(sys, "argv", ["bench_transfer_set.py", "--out", str(out), "--data-root", str(tmp_path),
                                      "--from-csv", *map(str, paths), str(paths[0])])  # a file given twice counts once
    _bench().main()
    rows = [line.split("|")[1:-1] for line in (out / "ablation.md").read_text().splitlines() if line.startswith("| ")]
    body = {int(r[0]): r for r in rows[1:] if r[0].strip().isdigit()}
    assert list(body) == [0, 50, 200]  # numeric order, not the order the files came in
    for u in (0, 50):
        assert body[u][-1].strip() == "ts_kd better", body[u]
        low, high = map(float, re.search(r"\[([-+\d.]+), ([-+\d.]+)\]", body[u][3]).groups())
        assert low <= 3.0 <= high and low > 2.0, body[u]  # the interval covers the true +3 points
    assert body[200][-1].strip() == "within noise", body[200]
    assert (out / "ablation.png").stat().st_size > 10_000
    assert len(pd.read_csv(out / "per_case.csv")) == 2 * 2 * 3 * 40  # methods x seeds x compositions x cases


def test_from_csv_names_a_missing_file(tmp_path, monkeypatch):
    present = tmp_path / "a.csv"
    _per_case(0, 0, 0.0).to_csv(present, index=False)
    monkeypatch.setattr(sys, "argv", ["bench_transfer_set.py", "--out", str(tmp_path / "o"), "--data-root", str(tmp_path),
                                      "--from-csv", str(present), str(tmp_path / "nowhere.csv")])
    with pytest.raises(SystemExit, match="nowhere.csv"):
        _bench().main()


def test_variants_parse_and_bad_ones_are_named():
    bench = _bench("bench_student_schedule")
    assert bench.parse_variant("long:distill.epochs=20,finetune.lr=1e-4") == (
        "long", {"distill.epochs": "20", "finetune.lr": "1e-4"})
    assert bench.parse_variant("s23:teacher.lora_stages=[2,3],teacher.lora_rank=16") == (
        "s23", {"teacher.lora_stages": "[2,3]", "teacher.lora_rank": "16"})  # a list's commas stay in its value
    for bad in ("finetune.lr=1e-4", "name:", "name:finetune.lr", ":finetune.lr=1"):
        with pytest.raises(SystemExit, match="--variant"):
            bench.parse_variant(bad)


def test_a_variant_folder_is_a_copy_of_what_it_reads(tmp_path):
    src, dst = tmp_path / "run", tmp_path / "out" / "v"
    for rel in ("config.json", "splits.json", "teacher/lora/w.safetensors", "cache/targets/a.safetensors",
                "students/ts_kd/pretrain/final.safetensors", "students/ts_kd/finetune/log.csv", "metrics/per_case.csv"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    _bench("bench_student_schedule").copy_run(src, dst, ["ts_kd", "scratch"])
    copied = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert copied == ["cache/targets/a.safetensors", "config.json", "splits.json",
                      "students/ts_kd/pretrain/final.safetensors", "teacher/lora/w.safetensors"]  # no test metrics, no old fine-tuning
    (dst / "students/ts_kd/pretrain/final.safetensors").write_text("retrained")
    (dst / "cache/targets/a.safetensors").unlink()
    assert (src / "students/ts_kd/pretrain/final.safetensors").read_text() == "students/ts_kd/pretrain/final.safetensors"
    assert (src / "cache/targets/a.safetensors").is_file()


@pytest.mark.trains
def test_teacher_variants_train_beside_the_run_and_never_write_into_it(smoke_run, monkeypatch, capsys):
    import hashlib

    from tskd_utils.io import read_json
    from tskd_utils.teacher import train_teacher

    base = train_teacher(smoke_run)

    def snapshot():
        return {str(p.relative_to(smoke_run.dir)): hashlib.sha1(p.read_bytes()).hexdigest()
                for p in sorted(smoke_run.dir.rglob("*")) if p.is_file() and p.name != "environment.json"}

    before = snapshot()
    from tskd_utils import teacher

    head_fits = []
    monkeypatch.setattr(teacher, "fit_head", lambda *a, **k: head_fits.append(1))
    out = smoke_run.dir.parent / "variants"
    monkeypatch.setattr(sys, "argv", ["bench_teacher_variants.py", "--run-dir", str(smoke_run.dir), "--out", str(out),
                                      "--variant", "rank2:teacher.lora_rank=2,teacher.lora_alpha=4"])
    _bench("bench_teacher_variants").main()
    assert snapshot() == before  # the finished run is only read
    got = read_json(out / "rank2" / "teacher" / "metrics.json")
    assert got["lora"]["r"] == 2 and base["lora"]["r"] == 4  # the variant's setting was applied
    assert head_fits == [] and got["frozen_val_dice"] == base["frozen_val_dice"]  # frozen head reused: inputs unchanged
    assert got["parameters"][1]["trainable_encoder"] == base["parameters"][1]["trainable_encoder"] // 2
    table = pd.read_csv(out / "teachers.csv")
    assert list(table["variant"]) == ["as run", "rank2"]
    assert "| rank2 |" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["bench_teacher_variants.py", "--run-dir", str(smoke_run.dir), "--out", str(out),
                                      "--variant", "rank2:teacher.lora_rank=2,teacher.lora_alpha=4",
                                      "--variant", "ep1:teacher.epochs=1"])
    _bench("bench_teacher_variants").main()  # rank2 finished: reused, not retrained; ep1 is new
    table = pd.read_csv(out / "teachers.csv")
    assert list(table["variant"]) == ["as run", "rank2", "ep1"] and head_fits == []
    monkeypatch.setattr(sys, "argv", ["bench_teacher_variants.py", "--run-dir", str(smoke_run.dir), "--out", str(out)])
    with pytest.raises(SystemExit, match="--variant"):
        _bench("bench_teacher_variants").main()


@pytest.mark.trains
def test_teacher_vs_unet_pools_seeds_and_a_second_invocation_trains_nothing(toy_root, tmp_path, monkeypatch, capsys):
    from tskd_utils.io import read_json
    from tskd_utils.run import load_run

    out = tmp_path / "tvu"
    monkeypatch.setattr(sys, "argv", ["bench_teacher_vs_unet.py", "--data-root", str(toy_root), "--out", str(out),
                                      "--profile", "smoke", "--dataset", "toy", "--runs", "6:0", "6:1"])
    _bench("bench_teacher_vs_unet").main()
    first = capsys.readouterr().out
    assert first.count("training it now") == 4 and first.count("evaluate s") == 2  # 2 runs x (teacher, U-Net)
    for split in ("val ", "test"):
        assert f"{split} n6 seeds 0,1 pooled: teacher - unet_supervised" in first
    run = load_run(out / "toy_n6_s0")
    val = read_json(run.metrics_dir / "teacher_vs_unet_val.json")
    assert len(val["teacher"]) == len(val["unet_supervised"]) == len(run.splits["val"])
    assert (run.students_dir / "unet_supervised" / "student.safetensors").is_file()
    _bench("bench_teacher_vs_unet").main()
    again = capsys.readouterr().out
    assert "training it now" not in again and "evaluate s" not in again
    table = lambda text: text.split("points [95% bootstrap CI]")[1]  # noqa: E731
    assert table(again) == table(first)  # the same scores, read back


def test_postprocess_keeps_each_class_largest_component_and_scores_like_notebook_05():
    from tskd_utils.metrics import case_metrics

    bench = _bench("bench_postprocess")
    labels = np.zeros((40, 40), np.uint8)
    labels[2:20, 2:20] = 1          # the head, with a hole
    labels[8:11, 8:11] = 0
    labels[30:33, 30:33] = 1        # a stray blob of the same class: removed
    labels[25:35, 2:12] = 2         # another class's only object: kept
    labels[36:38, 20:22] = 2        # and its stray blob: removed
    largest = bench.postprocess(labels, 3, "largest")
    assert largest[30:33, 30:33].sum() == 0 and largest[36:38, 20:22].sum() == 0
    assert (largest[25:35, 2:12] == 2).all() and largest[8:11, 8:11].sum() == 0
    filled = bench.postprocess(labels, 3, "largest+fill")
    assert (filled[2:20, 2:20] == 1).all() and filled[30:33, 30:33].sum() == 0
    assert bench.postprocess(labels, 3, "raw") is labels
    # its fast Dice is notebook 05's (MONAI's), empty-mask rule included
    rng = np.random.default_rng(0)
    for _ in range(3):
        pred, mask = rng.integers(0, 3, (30, 30)).astype(np.uint8), rng.integers(0, 3, (30, 30)).astype(np.uint8)
        assert bench.dice_of(pred, mask, 3) == pytest.approx(np.mean(case_metrics(pred, mask, 3)["dice"]), abs=1e-6)
    empty = np.zeros((8, 8), np.uint8)
    assert bench.dice_of(empty, empty, 2) == 1.0 and bench.dice_of(labels[:8, :8] * 0 + 1, empty, 2) == 0.0


def _run_folder(root: Path, seed: int, gain: float, n_labeled: int = 50, n: int = 60) -> Path:
    """A minimal evaluated run folder: config.json and the test split's metrics/per_case.csv (two classes)."""
    import json

    run = root / f"hc18_n{n_labeled}_s{seed}"
    (run / "metrics").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"dataset": "hc18", "n_labeled": n_labeled, "seed": seed}))
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.85, 0.95, n)
    rows = [{"method": m, "case": f"c{i:03d}", "class": k, "dice": d + rng.normal(0, 0.002), "iou": 0.0, "hd95": 1.0}
            for m, dice in (("unet_supervised", base), ("ts_kd", base + gain)) for i, d in enumerate(dice)
            for k in ("head", "rim")]
    pd.DataFrame(rows).to_csv(run / "metrics" / "per_case.csv", index=False)
    return run


def test_pooling_saved_tables_finds_the_gain_over_both_seeds_and_refuses_a_mix(tmp_path, monkeypatch, capsys):
    pool = _bench("pool_per_case")
    runs = [_run_folder(tmp_path, 0, 0.03), _run_folder(tmp_path, 1, 0.01)]
    saved = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["pool_per_case.py", str(runs[0]), "--save-dir", str(saved)])
    pool.main()  # the run folder read, its table kept with the run's columns
    kept = pd.read_csv(saved / "hc18_n50_s0_test.csv")
    assert set(kept[["dataset", "n_labeled", "seed", "split"]].itertuples(index=False)) == {("hc18", 50, 0, "test")}
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["pool_per_case.py", str(saved / "hc18_n50_s0_test.csv"), str(runs[1])])
    pool.main()  # a saved table pooled with a run folder: 60 cases x 2 seeds, the mean gain +2 points
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("ts_kd - unet_supervised"))
    low, high = map(float, re.search(r"\[([-+\d.]+), ([-+\d.]+)\]", line).groups())
    # seeds resampled too: the interval spans the two seeds' gains (+1 and +3), not one seed's
    assert "+2.0 points" in line and "60 cases x 2 seeds" in line and "ts_kd better" in line, line
    assert 0.5 < low < 2.0 < high <= 3.1, line
    other = _run_folder(tmp_path / "n20", 1, 0.0, n_labeled=20)
    with pytest.raises(SystemExit, match="differ in n_labeled.*n20"):
        pool.read_tables([runs[0], other])
    with pytest.raises(SystemExit, match=r"seed \[0\] comes from more than one file"):
        pool.read_tables([runs[0], saved / "hc18_n50_s0_test.csv"])
    with pytest.raises(SystemExit, match="not an evaluated run folder"):
        pool.read_tables([tmp_path])
