#!/usr/bin/env python
"""Pool the per-case scores of several runs (seeds) into one paired comparison, from saved tables.

A run folder can be gone (another machine, another session) while its per-case table is kept. This reads run
folders (their test split's ``metrics/per_case.csv``, with dataset, n_labeled and seed from ``config.json``) and saved
tables (``--save-dir`` of an earlier call, or the validation table of ``bench_val_paired.py --csv``), and prints
``reference`` minus every other method, cases and seeds resampled together (``tskd_utils.stats``).

    python benchmarks/pool_per_case.py RUNS/hc18_n50_s0 --save-dir docs/results     # keep the table, then later:
    python benchmarks/pool_per_case.py docs/results/hc18_n50_s0_test.csv RUNS/hc18_n50_s1 --reference ts_kd

Only tables of one dataset, n_labeled and split pool together: a mix is refused, naming the files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def read_table(path: Path) -> pd.DataFrame:
    """A run folder's test table with its dataset, n_labeled, seed and split as columns, or a saved table."""
    if path.is_dir():
        per_case, config = path / "metrics" / "per_case.csv", path / "config.json"
        if not (per_case.is_file() and config.is_file()):
            raise SystemExit(f"{path}: not an evaluated run folder (no metrics/per_case.csv or config.json)")
        c = json.loads(config.read_text())
        df = pd.read_csv(per_case)
        for i, (key, value) in enumerate((("dataset", c["dataset"]), ("n_labeled", c["n_labeled"]),
                                          ("seed", c["seed"]), ("split", "test"))):
            df.insert(i, key, value)
        return df
    if not path.is_file():
        raise SystemExit(f"{path}: no such file or run folder")
    return pd.read_csv(path)


def read_tables(paths, seeds=None, save_dir=None) -> pd.DataFrame:
    """One table of case scores (method, case, seed, dice) from per-case files; a seed given twice is refused."""
    from tskd_utils.stats import case_scores

    frames = []
    for i, path in enumerate(paths):
        df = read_table(path)
        missing = {"method", "case", "dice"} - set(df.columns)
        if missing:
            raise SystemExit(f"{path}: not a per-case table (no column {', '.join(sorted(missing))})")
        if save_dir is not None and {"dataset", "n_labeled", "seed", "split"} <= set(df.columns):
            r = df.iloc[0]
            out = Path(save_dir) / f"{r['dataset']}_n{r['n_labeled']}_s{r['seed']}_{r['split']}.csv"
            out.parent.mkdir(parents=True, exist_ok=True)
            df.to_csv(out, index=False, float_format="%.6f")
            print(f"saved {out}")
        if "seed" not in df.columns:
            if not seeds or i >= len(seeds):
                raise SystemExit(f"{path} has no seed column: give --seeds, one per file in order")
            df["seed"] = seeds[i]
        df["file"] = str(path)
        frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    for col in ("dataset", "n_labeled", "split"):
        if col in table.columns and table[col].nunique(dropna=False) > 1:
            groups = table.groupby(col, dropna=False)["file"].unique().to_dict()
            raise SystemExit(f"these tables differ in {col} and do not pool: "
                             + "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items()))
    twice = table.groupby("seed")["file"].nunique()
    if (twice > 1).any():
        raise SystemExit(f"seed {twice[twice > 1].index.tolist()} comes from more than one file")
    keep = ["method", "case", "seed", "dice"] + (["class"] if "class" in table.columns else [])
    return case_scores(table[keep])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tables", nargs="+", type=Path, help="run folders or per-case CSV files, one per run")
    ap.add_argument("--reference", default="ts_kd")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], help="seeds of files without a seed column")
    ap.add_argument("--save-dir", type=Path, help="write each table read, with its run columns, as "
                                                  "<dataset>_n<N>_s<seed>_<split>.csv here")
    args = ap.parse_args()

    from tskd_utils.stats import format_interval, paired_comparisons

    scores = read_tables(args.tables, args.seeds, args.save_dir)
    means = scores.pivot_table(index="method", columns="seed", values="dice", aggfunc="mean")
    means["pooled"] = scores.groupby("method")["dice"].mean()
    print(means.round(4).to_string())
    table = paired_comparisons(scores, reference=args.reference)
    for _, r in table.iterrows():
        print(f"{r['comparison']}: {format_interval(r['mean_diff'], r['ci_low'], r['ci_high'])} "
              f"({r['n_cases']} cases x {r['n_seeds']} seeds; Wilcoxon p {r['p_wilcoxon']:.2g}) {r['verdict']}")


if __name__ == "__main__":
    main()
