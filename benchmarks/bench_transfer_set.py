#!/usr/bin/env python
"""The transfer-set ablation: does TS-KD gain from synthetic images, and at which scale of real data?

For each seed, one run folder; for each composition of the transfer set (the labeled cases plus 0, some or all
real unlabeled cases), the diffusion model is trained on exactly those real images, its samples are added,
and ts_kd (with the synthetic images) and ts_kd_nosyn (without) are distilled from the same teacher and
fine-tuned. The teacher is trained once per seed (it reads no transfer-set setting, so the stage fingerprints
reuse it); only what depends on the composition is recomputed. Per-case test Dice of every (composition,
seed, method) goes to ``per_case.csv``; ``ablation.md`` has the table, the paired intervals and a plot.

    python benchmarks/bench_transfer_set.py --profile cpu --dataset hc18 --data-root /tmp/hc18work/data \\
        --n-labeled 20 --seeds 0,1 --unlabeled 0,50,all --out /tmp/transfer_ablation
    python benchmarks/bench_transfer_set.py --out OUT --data-root DATA --from-csv A/per_case.csv B/per_case.csv

Run the compositions in the order given: a run folder keeps one generator and one student per method, so going back to a
composition retrains them. ``--from-csv`` joins the per-case tables of invocations run apart into one report.

Never tuned on the test split: every setting comes from the profile; the test split only scores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ["ts_kd", "ts_kd_nosyn"]


def one(args, seed: int, n_unlabeled) -> pd.DataFrame:
    from tskd_utils import distill, evaluate, generation, teacher
    from tskd_utils.run import setup_run
    from tskd_utils.stats import case_scores

    overrides = dict(args.overrides, **{"distill.n_unlabeled": n_unlabeled})
    run = setup_run(args.out / f"{args.dataset}_n{args.n_labeled}_s{seed}", args.profile, args.dataset,
                    args.data_root, args.n_labeled, seed, overrides)
    t0 = time.perf_counter()
    teacher.train_teacher(run)
    generation.generate(run)
    distill.run_methods(run, METHODS)
    evaluate.evaluate_run(run, METHODS, include_teacher=False, measure_efficiency=False)
    scores = case_scores(pd.read_csv(run.metrics_dir / "per_case.csv"))
    comp = distill.transfer_composition(run)
    print(f"seed {seed}, unlabeled {comp['unlabeled']}: {time.perf_counter() - t0:.0f} s; "
          f"{scores.groupby('method')['dice'].mean().round(4).to_dict()}", flush=True)
    return scores.assign(seed=seed, unlabeled=comp["unlabeled"], synthetic=comp["synthetic"])


def report(df: pd.DataFrame, out: Path) -> str:
    import matplotlib.pyplot as plt

    from tskd_utils.stats import format_interval, paired_comparisons

    lines = ["| real unlabeled | ts_kd_nosyn | ts_kd (+ synthetic) | ts_kd - ts_kd_nosyn, 95% interval | p | verdict |",
             "|---|---|---|---|---|---|"]
    fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(9, 3.5))
    groups = sorted(df.groupby("unlabeled"), key=lambda kv: int(kv[0]))
    x = range(len(groups))
    labels = [str(u) for u, _ in groups]
    for method, style in (("ts_kd_nosyn", "o--"), ("ts_kd", "s-")):
        means = [g[g.method == method]["dice"].mean() for _, g in groups]
        (line,) = ax.plot(x, means, style, label=method)
        for i, (_, g) in enumerate(groups):  # one faint point per seed: how far seeds spread
            per_seed = g[g.method == method].groupby("seed")["dice"].mean()
            ax.plot([i] * len(per_seed), per_seed.values, style[0], alpha=0.3, color=line.get_color())
    rows = []
    for u, g in groups:
        row = paired_comparisons(g.drop(columns=["unlabeled", "synthetic"]), reference="ts_kd").iloc[0]
        rows.append(row)
        means = g.groupby("method")["dice"].mean()
        lines.append(f"| {u} | {means['ts_kd_nosyn']:.3f} | {means['ts_kd']:.3f} | "
                     f"{format_interval(row['mean_diff'], row['ci_low'], row['ci_high'])} | "
                     f"{row['p_wilcoxon']:.2g} | {row['verdict']} |")
    diff = [100 * r["mean_diff"] for r in rows]
    err = [[100 * (r["mean_diff"] - r["ci_low"]) for r in rows], [100 * (r["ci_high"] - r["mean_diff"]) for r in rows]]
    ax_diff.errorbar(x, diff, yerr=err, fmt="s", capsize=4, color="C1")
    ax_diff.axhline(0, color="0.4", lw=1)
    ax_diff.set_ylabel("ts_kd - ts_kd_nosyn, Dice points\n(paired, 95% interval)")
    n_seeds = df["seed"].nunique()
    for a in (ax, ax_diff):
        a.set_xticks(list(x), labels)
        a.set_xlabel("real unlabeled images in the transfer set")
        a.grid(alpha=0.3)
    ax.set_ylabel(f"test Dice (mean; faint: each of {n_seeds} seed(s))")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=120)
    return "\n".join(lines)


def write_report(df: pd.DataFrame, out: Path) -> None:
    table = report(df, out)
    (out / "ablation.md").write_text(f"Command: `{' '.join(sys.argv)}`\n\n{table}\n")
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--dataset", default="hc18")
    ap.add_argument("--data-root", type=Path, required=True)
    ap.add_argument("--n-labeled", type=int, default=20)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--unlabeled", default="0,50,all")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--from-csv", type=Path, nargs="+", default=None, metavar="CSV",
                    help="no training: the report of per_case.csv files of earlier invocations (compositions run apart)")
    args = ap.parse_args()
    args.overrides = dict(kv.split("=", 1) for kv in args.sets)
    if args.from_csv:
        missing = [str(p) for p in args.from_csv if not p.is_file()]
        if missing:
            raise SystemExit(f"--from-csv: no such file: {', '.join(missing)}")
        df = pd.concat([pd.read_csv(p) for p in args.from_csv]).drop_duplicates(["method", "case", "seed", "unlabeled"])
        args.out.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out / "per_case.csv", index=False)
        write_report(df, args.out)
        return
    frames = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for u in args.unlabeled.split(","):
            frames.append(one(args, seed, None if u == "all" else int(u)))
            pd.concat(frames).to_csv(args.out / "per_case.csv", index=False)
    write_report(pd.concat(frames), args.out)


if __name__ == "__main__":
    main()
