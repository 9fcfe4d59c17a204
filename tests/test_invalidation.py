"""A finished stage is reused only while what it was trained from is unchanged (issue: stale stages).

Smoke profile on the toy dataset, two methods (scratch and ts_kd), no synthetic images: seconds.
"""

from __future__ import annotations

import pytest

from tskd_utils import distill, evaluate, teacher
from tskd_utils.io import sha256sum
from tskd_utils.run import setup_run

pytestmark = pytest.mark.trains  # every test here fits a model (make test-fast leaves them out)

METHODS = ["scratch", "ts_kd"]
BASE = {"diffusion.n_synthetic": 0}


def _pipeline(tmp_path, toy_root, overrides):
    run = setup_run(tmp_path / "run", profile="smoke", dataset="toy", data_root=toy_root, n_labeled=6, seed=0,
                    overrides={**BASE, **overrides})
    teacher.train_teacher(run)
    distill.run_methods(run, METHODS)
    evaluate.evaluate_run(run, METHODS, measure_efficiency=False)
    return run


def _stamps(run) -> dict:
    files = {"frozen head": run.teacher_dir / "frozen_head.safetensors",
             "lora": run.teacher_dir / "lora" / "final.safetensors",
             "targets": run.cache_dir / "targets" / "meta.json",
             "ts_kd pretrain": run.students_dir / "ts_kd" / "pretrain" / "final.safetensors",
             "ts_kd finetune": run.students_dir / "ts_kd" / "finetune" / "final.safetensors",
             "scratch finetune": run.students_dir / "scratch" / "finetune" / "final.safetensors",
             "per_case": run.metrics_dir / "per_case.csv"}
    return {k: (p.stat().st_mtime_ns, sha256sum(p)) for k, p in files.items()}


def _changed(before: dict, after: dict) -> set:
    return {k for k in before if before[k][0] != after[k][0]}


@pytest.fixture
def finished(tmp_path, toy_root):
    run = _pipeline(tmp_path, toy_root, {})
    return run, _stamps(run)


def test_an_unchanged_rerun_reuses_everything(finished, tmp_path, toy_root, capsys):
    _, before = finished
    run = _pipeline(tmp_path, toy_root, {})
    assert _changed(before, _stamps(run)) == {"per_case"}  # evaluation always re-scores; no stage retrains
    assert "recomputing" not in capsys.readouterr().out


def test_a_changed_teacher_recomputes_what_depends_on_it(finished, tmp_path, toy_root, capsys):
    _, before = finished
    run = _pipeline(tmp_path, toy_root, {"teacher.epochs": 3})
    out = capsys.readouterr().out
    changed = _changed(before, _stamps(run))
    # the LoRA stage reads teacher.epochs; the frozen baseline does not; scratch never saw the teacher
    assert changed == {"lora", "targets", "ts_kd pretrain", "ts_kd finetune", "per_case"}, changed
    assert "teacher.epochs (2 -> 3)" in out and "recomputing" in out


def test_changed_distillation_settings_retrain_the_students_but_not_the_teacher(finished, tmp_path, toy_root,
                                                                                capsys):
    _, before = finished
    run = _pipeline(tmp_path, toy_root, {"distill.epochs": 3})
    changed = _changed(before, _stamps(run))
    assert changed == {"ts_kd pretrain", "ts_kd finetune", "per_case"}, changed
    assert "distill.epochs (2 -> 3)" in capsys.readouterr().out


def test_a_changed_loss_in_a_notebook_retrains_its_stage(finished, tmp_path, toy_root, capsys):
    run, before = finished

    def my_kd_loss(student, align, images, emb, logits, w_feat, w_out, temperature):
        from tskd_utils.losses import kd_loss
        return kd_loss(student, align, images, emb, logits, w_feat, 2 * w_out, temperature)

    distill.pretrain(run, "ts_kd", loss_fn=my_kd_loss)
    assert "inputs changed" in capsys.readouterr().out
    assert _changed(before, _stamps(run)) == {"ts_kd pretrain"}


def test_a_later_notebook_naming_no_loss_reuses_what_a_notebook_loss_trained(finished, tmp_path, toy_root):
    run, before = finished

    def notebook_kd_loss(student, align, images, emb, logits, w_feat, w_out, temperature):
        """The same objective, written out as notebook 04 writes it (another source text)."""
        from tskd_utils.losses import kd_loss
        return kd_loss(student, align, images, emb, logits, w_feat, w_out, temperature)

    distill.pretrain(run, "ts_kd", loss_fn=notebook_kd_loss)
    trained = _stamps(run)
    assert _changed(before, trained) == {"ts_kd pretrain"}  # the notebook's loss is another source: retrained
    distill.pretrain(run, "ts_kd")  # e.g. notebook 05 making sure the students exist: any finished one will do
    assert _changed(trained, _stamps(run)) == set()
