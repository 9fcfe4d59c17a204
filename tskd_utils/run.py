"""The run folder: one dataset, one n_labeled, one seed, one profile.

Notebooks pass work to each other only through it::

    runs/<run_name>/config.json  splits.json  environment.json  teacher/  synthetic/  cache/
                    students/<method>/  metrics/  figures/

Every notebook starts with :func:`setup_run`, which creates the folder (or checks that an existing
one was made with the same settings), prepares the phantom if it is the dataset and is missing,
and writes the split if there is none yet.
"""

from __future__ import annotations

import datetime as _dt
import json
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from . import __version__
from .config import PROFILES, Profile, flat_settings, get_profile, profile_to_dict, resolve_device
from .data import check_classes_present, make_splits
from .datasets import ensure_dataset
from .environment import record as record_environment
from .io import DataError, DatasetInfo, check_name, load_dataset, read_json, write_json
from .training import derive_seed, value_digest

# the students' methods (one student architecture, six pretrainings), then the practitioner's U-Net trained on the
# labels only (its own architecture); "teacher" is the reference
METHODS = ("scratch", "ta_kd", "ts_kd", "ts_kd_nosyn", "mae", "mocov3", "unet_supervised")
ALL_METHODS = METHODS + ("teacher",)


@dataclass
class Run:
    dir: Path
    profile: Profile
    dataset: str
    data_root: Path
    n_labeled: int
    seed: int
    overrides: dict = field(default_factory=dict)
    _info: Optional[DatasetInfo] = None
    _splits: Optional[dict] = None

    # -- folders ------------------------------------------------------------------------
    @property
    def teacher_dir(self) -> Path:
        return self.dir / "teacher"

    @property
    def synthetic_dir(self) -> Path:
        return self.dir / "synthetic"

    @property
    def cache_dir(self) -> Path:
        return self.dir / "cache"

    @property
    def students_dir(self) -> Path:
        return self.dir / "students"

    @property
    def metrics_dir(self) -> Path:
        return self.dir / "metrics"

    @property
    def figures_dir(self) -> Path:
        d = self.dir / "figures"
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def shared_cache_dir(self) -> Path:
        """Per-image features of the *frozen pretrained* teacher, shared by all runs beside this one
        (they do not depend on the split, n_labeled or seed)."""
        return self.dir.parent / "_shared_cache" / self.dataset

    # -- data -----------------------------------------------------------------------------
    @property
    def dataset_root(self) -> Path:
        return self.data_root / self.dataset

    @property
    def info(self) -> DatasetInfo:
        if self._info is None:
            self._info = load_dataset(self.dataset_root)
        return self._info

    @property
    def splits(self) -> dict:
        if self._splits is None:
            path = self.dir / "splits.json"
            if not path.is_file():
                raise DataError(f"{path} is missing: run notebook 01 (or tskd_utils.run.setup_run) first")
            self._splits = read_json(path)
        return self._splits

    @property
    def device(self) -> str:
        return resolve_device(self.profile)

    @property
    def name(self) -> str:
        return self.dir.name

    # -- what a stage reads (its fingerprint) ------------------------------------------------
    def settings(self, *sections: str) -> dict:
        """The profile values of ``sections`` (e.g. "teacher", "distill") as a plain dict."""
        return {s: asdict(getattr(self.profile, s)) for s in sections}

    def split_digest(self, *parts: str) -> str:
        """A digest of the split's case lists ``parts`` (e.g. "labeled", "val")."""
        return value_digest({p: self.splits[p] for p in parts})

    def unlabeled_subset(self) -> list[str]:
        """``distill.n_unlabeled`` unlabeled train cases (all when None), a seeded draw: for one seed a smaller
        subset is part of a larger one."""
        import numpy as np

        pool, n = list(self.splits["unlabeled"]), self.profile.distill.n_unlabeled
        if n is None or n >= len(pool):
            return pool
        if n < 0:
            raise DataError(f"distill.n_unlabeled must be >= 0 or None (all), got {n}")
        order = np.random.default_rng(self.seed_for("transfer set")).permutation(len(pool))
        return sorted(pool[i] for i in order[:n])

    def real_transfer_cases(self) -> list[str]:
        """The real images of the transfer set: the labeled cases and the chosen unlabeled ones. They are
        also all the images the diffusion model learns from (no image the run does not use)."""
        return sorted(self.splits["labeled"] + self.unlabeled_subset())

    def seed_for(self, *labels: str) -> int:
        """The seed of one stage / method / module of this run (see :func:`tskd_utils.training.derive_seed`)."""
        return derive_seed(self.seed, *labels)

    def describe(self) -> str:
        s = self.splits
        return (f"run {self.dir} | profile {self.profile.name} | dataset {self.dataset} | n_labeled {self.n_labeled} "
                f"| seed {self.seed} | device {self.device} | train {s['counts']['train']} (labeled "
                f"{s['counts']['labeled']}) val {s['counts']['val']} test {s['counts']['test']}")


def _config_dict(profile: Profile, dataset: str, data_root: Path, n_labeled: int, seed: int,
                 overrides: dict) -> dict:
    return {
        "dataset": dataset,
        "data_root": str(data_root),
        "n_labeled": int(n_labeled),
        "seed": int(seed),
        "profile": profile.name,
        "overrides": overrides,
        "resolved_profile": profile_to_dict(profile),
        "tskd_version": __version__,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }


SPLIT_KEYS = ("val_fraction", "test_fraction", "max_train", "max_val", "max_test")
# what a run folder holds besides hidden files (a sweep's lock): a folder without config.json that holds anything
# else is not a run folder, and setup_run writes nothing into it
RUN_ENTRIES = ("config.json", "splits.json", "environment.json", "status.json", "results.csv", "notebooks", "teacher",
               "synthetic", "cache", "students", "metrics", "figures")


def _folder_arg(name: str, value) -> Path:
    """``value`` as a folder path, or a DataError naming the parameter: empty (that would be the working directory)
    or an existing file."""
    if value is None or not str(value).strip():
        raise DataError(f"{name}={value!r} is empty: give a folder (setup_run never uses the working directory "
                        f"by default; the notebooks turn an empty {name} into their default folder)")
    path = Path(value).resolve()
    if path.exists() and not path.is_dir():
        raise DataError(f"{name}={str(value)!r}: {path} is a file, not a folder")
    return path


def _count_arg(name: str, value, low: int, expected: str) -> int:
    """``value`` as an integer >= ``low``, or a DataError naming the parameter and what it ``expected``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise DataError(f"{name}={value!r} is not valid: expected {expected}")
    return int(value)


def _check_run_folder(run_dir: Path) -> None:
    """Refuse a non-empty folder that is not a run folder: setup_run would write beside someone else's files."""
    if not run_dir.is_dir() or (run_dir / "config.json").is_file():
        return
    other = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".") and p.name not in RUN_ENTRIES)
    if other:
        raise DataError(f"run_dir {run_dir} holds other files ({', '.join(other[:5])}"
                        f"{', ...' if len(other) > 5 else ''}) and no config.json: it is not a run folder; give a new "
                        f"or empty folder (or an earlier run's folder) as run_dir")


def setup_run(run_dir, profile: str = "demo", dataset: str = "phantom", data_root="data",
              n_labeled: Optional[int] = None, seed: int = 0, overrides: Optional[dict] = None,
              prepare: bool = True) -> Run:
    """Create (or reopen) a run folder and make sure its dataset and split exist.

    The dataset, n_labeled, seed and profile of a run folder are fixed once it exists; other settings
    (``overrides``) may change between sessions: the stages that read a changed setting are recomputed
    (each stage compares what it was trained from), the others are reused. Every argument and the split are
    checked before anything is written; ``run_dir`` must be new, empty or a run folder (it has config.json).
    """
    run_dir, data_root = _folder_arg("run_dir", run_dir), _folder_arg("data_root", data_root)
    if not isinstance(profile, str) or profile not in PROFILES:
        raise DataError(f"profile={profile!r} is not a known profile; choose one of: {', '.join(PROFILES)}")
    check_name(dataset, "dataset name", "the dataset argument (a folder in data_root)")
    n_labeled = _count_arg("n_labeled", 0 if n_labeled is None else n_labeled, 0,
                           "an integer >= 1 (0 or None: the profile's default)")
    seed = _count_arg("seed", seed, 0, "an integer >= 0")
    _check_run_folder(run_dir)
    overrides = json.loads(json.dumps(dict(overrides or {})))  # as it reads back from config.json
    prof = get_profile(profile, overrides)
    n_labeled = n_labeled or prof.default_n_labeled
    cfg_path = run_dir / "config.json"
    wanted = _config_dict(prof, dataset, data_root, n_labeled, seed, overrides)
    rewrite = not cfg_path.is_file()
    if not rewrite:
        have = read_json(cfg_path)
        for key in ("dataset", "n_labeled", "seed", "profile"):
            if have.get(key) != wanted[key]:
                raise DataError(
                    f"{cfg_path} was made with {key}={have.get(key)!r}, not {wanted[key]!r}: use another "
                    f"run_dir for different settings (finished work in {run_dir} is left as it is)")
        resolved = json.loads(json.dumps(wanted["resolved_profile"]))
        if have.get("overrides") != overrides:
            print(f"note: the settings of {run_dir} changed ({have.get('overrides')} -> {overrides}); stages "
                  f"that read a changed setting will be recomputed")
        elif "resolved_profile" in have and flat_settings(have["resolved_profile"]) != flat_settings(resolved):
            print(f"note: profile {profile!r} changed since {cfg_path} was written (this version of the repository "
                  f"defines it otherwise); stages that read a changed setting will be recomputed")
        if have.get("overrides") != overrides or have.get("resolved_profile", resolved) != resolved:
            wanted, rewrite = {**wanted, "created": have.get("created", wanted["created"])}, True
    if prepare:
        ensure_dataset(dataset, data_root, phantom_cases=prof.data.phantom_cases)
    run = Run(run_dir, prof, dataset, data_root, n_labeled, seed, overrides)
    splits = _new_split(run)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rewrite:
        write_json(cfg_path, wanted)
    record_environment(run_dir)  # environment.json: versions, platform, device of this session (and earlier ones)
    if splits is not None:
        write_json(run_dir / "splits.json", splits)
    return run


def _new_split(run: Run) -> Optional[dict]:
    """The split to write as splits.json (None when it exists); refuse one made with other data settings, and a
    class of dataset.json that no mask of the split contains."""
    d = run.profile.data
    split_settings = {k: getattr(d, k) for k in SPLIT_KEYS}
    path = run.dir / "splits.json"
    if path.is_file():
        have = read_json(path).get("settings", split_settings)
        if have != split_settings:
            raise DataError(f"{path} was made with data settings {have}, not {split_settings}: the split of a "
                            f"run folder is fixed, use another run_dir")
        return None
    splits = make_splits(run.info, run.n_labeled, run.seed, d.val_fraction, d.test_fraction,
                         max_train=d.max_train, max_val=d.max_val, max_test=d.max_test)
    check_classes_present(run.info, splits["train"] + splits["val"] + splits["test"])
    return {**splits, "settings": split_settings}


def load_run(run_dir) -> Run:
    """Reopen a run folder made by :func:`setup_run`."""
    run_dir = Path(run_dir).resolve()
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise DataError(f"{cfg_path} is missing: {run_dir} is not a run folder (run notebook 01 first)")
    cfg = read_json(cfg_path)
    prof = get_profile(cfg["profile"], cfg.get("overrides") or {})
    return Run(run_dir, prof, cfg["dataset"], Path(cfg["data_root"]), int(cfg["n_labeled"]), int(cfg["seed"]),
               cfg.get("overrides") or {})


def check_methods(methods) -> list[str]:
    """Validate a list of method ids (``"all"`` or None = every student method)."""
    if methods is None or methods == "all" or methods == ["all"]:
        return list(METHODS)
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise KeyError(f"unknown method(s) {bad}; valid methods: {', '.join(ALL_METHODS)}")
    return [m for m in methods if m != "teacher"]

