"""Every setting is checked for type and range before any work: in get_profile (notebooks) and in the sweep's
argument checks, which also check paths, sizes and names; a refused sweep leaves no run folder."""
import pytest

from tskd_utils import reproduce
from tskd_utils.config import PROFILES, get_profile


@pytest.mark.parametrize("name", list(PROFILES))
def test_every_profile_passes_its_own_schema(name):
    get_profile(name)


@pytest.mark.parametrize("key, value, message", [
    ("data.image_size", 0, "data.image_size=0 is out of range: valid from 16 to 4096"),
    ("data.image_size", 100, "must be a multiple of 16"),
    ("teacher.epochs", -1, "teacher.epochs=-1 is out of range"),
    ("teacher.epochs", "true", "expected an integer"),
    ("teacher.lr", -1, "teacher.lr=-1 is out of range: valid above 0"),
    ("teacher.lr", "nan", "expected a finite number"),
    ("data.max_train", -5, "data.max_train=-5 is out of range"),
    ("diffusion.n_synthetic", -4, "diffusion.n_synthetic=-4 is out of range"),
    ("teacher.batch_size", 0, "teacher.batch_size=0 is out of range"),
    ("finetune.epochs", 1e12, "finetune.epochs=1000000000000 is out of range: valid from 1 to 100000"),
    ("device", "tpu", "'tpu' is not one of auto, cpu, cuda"),
    ("data.val_fraction", 1.5, "data.val_fraction=1.5 is out of range"),
    ("teacher.lora_targets", '["qkv", "mlp"]', "'mlp' is not one of qkv, proj, fc1, fc2"),
    ("diffusion.sampler", "euler", "'euler' is not one of ddim, dpm"),
    ("teacher.lora_stages", "[]", "teacher.lora_stages=()"),
])
def test_a_bad_setting_is_refused_naming_key_value_and_range(key, value, message):
    with pytest.raises(ValueError) as e:
        get_profile("smoke", {key: value})
    assert message in str(e.value)


def test_settings_that_only_fail_together():
    get_profile("smoke", {"data.val_fraction": 0.5})
    with pytest.raises(ValueError, match="leave no training cases"):
        get_profile("smoke", {"data.val_fraction": 0.5, "data.test_fraction": 0.5})


def _main(tmp_path, *args):
    return reproduce.main(["--profile", "smoke", "--dataset", "phantom", "--data-root", str(tmp_path / "data"),
                           "--out", str(tmp_path / "runs"), *args])


@pytest.mark.parametrize("args, message", [
    (["--set", "teacher.name=bogus"], "unknown teacher 'bogus'"),
    (["--set", "student.name=resnet"], "unknown student 'resnet'"),
    (["--grid", "teacher.name=tiny,bogus"], "unknown teacher 'bogus'"),
    (["--set", "data.val_fraction=1.5"], "data.val_fraction=1.5 is out of range"),
    (["--set", "teacher.lr=nan"], "expected a finite number"),
    (["--n-labeled", "1000000"], "--n-labeled 1000000: the phantom of this profile has 48 cases"),
    (["--seeds", "99999999999999999999"], "is not an integer from 0 to 4294967295"),
])
def test_a_refused_sweep_stops_before_any_work_and_leaves_no_folder(tmp_path, capsys, args, message):
    assert _main(tmp_path, *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_n_labeled_beyond_a_prepared_datasets_train_pool(tmp_path, capsys, toy_root):
    args = ["--profile", "smoke", "--dataset", "toy", "--data-root", str(toy_root), "--out", str(tmp_path / "runs"),
            "--n-labeled", "20"]
    assert reproduce.main(args) == 2
    assert "--n-labeled 20: n_labeled=20 is larger than the train pool" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_data_root_that_is_a_file(tmp_path, capsys):
    (tmp_path / "data").write_text("not a folder")
    assert _main(tmp_path) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_out_where_nothing_can_be_written_even_by_root(tmp_path, capsys):
    out = "/proc/tskd-runs"  # os.access says writable to root; writing there fails
    assert reproduce.main(["--profile", "smoke", "--dataset", "phantom", "--data-root", str(tmp_path / "data"),
                           "--out", out]) == 2
    assert f"--out {out}: cannot create files in /proc" in capsys.readouterr().err
