"""Dataset converters: raw public layouts -> the common format (see tskd_utils.io).

Each converter is a module ``tskd_utils.datasets.<name>`` that defines

* ``DESCRIPTION``: one line for ``--help``;
* ``add_arguments(parser)``: its own command-line options (besides --raw, --out, --overwrite);
* ``prepare(raw, out, overwrite=False, **options) -> Path``: convert ``raw`` into
  ``out/<dataset folder>`` with :class:`tskd_utils.io.DatasetWriter` and return that folder.

``data_scripts/prepare_<name>.py`` are thin wrappers around :func:`main`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Optional

from ..io import BusyError, DataError, check_name, load_dataset, safe_join, wait_for_conversion

CONVERTERS = ("phantom", "hc18", "busi", "kidneyus", "chaos", "psfhs", "folder")


def get_converter(name: str):
    if name not in CONVERTERS:
        raise KeyError(f"unknown dataset {name!r}; known converters: {', '.join(CONVERTERS)}")
    return importlib.import_module(f"{__name__}.{name}")


def prepare(name: str, raw: Optional[Path], out: Path, overwrite: bool = False, **options) -> Path:
    """Convert dataset ``name`` from ``raw`` into ``out``; returns the dataset folder."""
    module = get_converter(name)
    return Path(module.prepare(raw, Path(out), overwrite=overwrite, **options))


def ensure_dataset(dataset: str, data_root: Path, phantom_cases: int = 300, seed: int = 0,
                   wait_s: float = 1800) -> Path:
    """Return ``data_root/dataset``; generate it first if it is the phantom and missing.

    If another process is converting that dataset right now (its lock is held), wait up to
    ``wait_s`` seconds for it and use its result. Real datasets cannot be fetched silently
    (registration, licences, size): a clear error says which script prepares them.
    """

    root = safe_join(data_root, check_name(dataset, "dataset name", "the dataset argument"))
    if (root / "dataset.json").is_file():
        if dataset == "phantom":
            import json

            have = json.loads((root / "dataset.json").read_text()).get("n_cases")
            if have != phantom_cases:
                print(f"note: using the existing phantom in {root} ({have} cases; this profile would make "
                      f"{phantom_cases}). Delete that folder, or pass another data_root, to regenerate it.")
        return root
    if dataset == "phantom":
        try:
            return prepare("phantom", None, Path(data_root), n_cases=phantom_cases, seed=seed)
        except BusyError:
            print(f"note: another process is generating {root}; waiting for it (up to {wait_s:.0f} s)")
            wait_for_conversion(root, wait_s)
            return ensure_dataset(dataset, data_root, phantom_cases, seed, wait_s)
        except FileExistsError:  # another process finished it between the check above and the lock
            if (root / "dataset.json").is_file():
                return ensure_dataset(dataset, data_root, phantom_cases, seed, wait_s)
            raise
    hint = dataset.split("_")[0]
    raise DataError(
        f"dataset {dataset!r} not found at {root}. Prepare it first, e.g. "
        f"`python data_scripts/prepare_{hint if hint in CONVERTERS else 'folder'}.py --raw RAW --out {data_root}` "
        f"(see the README's dataset table), or use dataset='phantom'."
    )


def main(name: str, argv: Optional[list] = None) -> int:
    """Command line of ``data_scripts/prepare_<name>.py``."""
    module = get_converter(name)
    parser = argparse.ArgumentParser(
        prog=f"prepare_{name}.py", description=module.DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    if name != "phantom":
        parser.add_argument("--raw", type=Path, required=True, help="the raw download, in its published layout")
    parser.add_argument("--out", type=Path, required=True, help="DATA_ROOT: the dataset is written to a folder inside it")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished dataset of the same name")
    module.add_arguments(parser)
    args = vars(parser.parse_args(argv))
    raw, out, overwrite = args.pop("raw", None), args.pop("out"), args.pop("overwrite")

    start = time.perf_counter()
    try:
        folder = prepare(name, raw, out, overwrite=overwrite, **args)
    except (DataError, FileExistsError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    info = load_dataset(folder)
    print(f"wrote {len(info.cases)} cases ({len({c.subject for c in info.cases})} subjects, classes "
          f"{info.classes}) to {folder} in {time.perf_counter() - start:.1f} s")
    return 0
