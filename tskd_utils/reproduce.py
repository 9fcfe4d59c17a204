"""The reproduction sweep: notebooks 01-05 for every (n_labeled, seed), then one report.

    python -m tskd_utils.reproduce --profile demo --dataset hc18 --data-root data \\
        --n-labeled 10,20,50 --seeds 0,1,2 --out runs/hc18-demo

* Each run is a folder ``RUNS/<dataset>_n<N>_s<seed>/``; its executed notebooks are kept in
  ``notebooks/`` inside it as the record of the run.
* Finished runs are skipped; an interrupted run is resumed (notebooks that finished are not
  re-executed, and inside a notebook every stage resumes from its last checkpoint).
* A failing run does not stop the others; failures are listed at the end with their error and the
  exit status is non-zero.
* All runs are aggregated into ``RUNS/results.csv`` and ``RUNS/report.md`` (mean and standard
  deviation over seeds, a Dice-versus-n_labeled plot, the efficiency table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

from . import REPO_ROOT
from .io import read_json, write_json

NOTEBOOKS = ("01_data_preparation", "02_teacher_lora_finetuning", "03_diffusion_synthesis", "04_distillation",
             "05_evaluation")
WITH_METHODS = ("04_distillation", "05_evaluation")


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def run_name(dataset: str, n_labeled: int, seed: int) -> str:
    return f"{dataset}_n{n_labeled}_s{seed}"


def _kernel_manager_class():
    """Local kernels over Unix sockets where possible: a TCP kernel without CurveZMQ keys prints a
    plain-text-transport warning for every notebook (ipykernel >= 7); Windows has no IPC sockets."""
    if sys.platform == "win32":
        return None
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            kwargs.setdefault("transport", "ipc")
            super().__init__(**kwargs)

    return IPCKernelManager


def execute_run(run_dir: Path, params: dict, notebooks_dir: Path, methods: Sequence[str], label: str,
                log_output: bool = False) -> dict:
    """Execute the notebooks of one run, skipping those that finished; returns its status."""
    import papermill as pm

    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    status_path = run_dir / "status.json"
    status = read_json(status_path) if status_path.is_file() else {"notebooks": {}}
    start = time.perf_counter()
    kernel = {"kernel_manager_class": km} if (km := _kernel_manager_class()) else {}
    for nb in NOTEBOOKS:
        if status["notebooks"].get(nb, {}).get("state") == "done":
            continue
        print(f"{label}: {nb} (elapsed {_fmt(time.perf_counter() - start)})", flush=True)
        p = dict(params, methods=list(methods)) if nb in WITH_METHODS else dict(params)
        t0 = time.perf_counter()
        status["notebooks"][nb] = {"state": "running"}
        write_json(status_path, status)
        try:
            pm.execute_notebook(str(notebooks_dir / f"{nb}.ipynb"), str(out_dir / f"{nb}.ipynb"), parameters=p,
                                cwd=str(notebooks_dir), kernel_name="python3", progress_bar=False,
                                log_output=log_output, **kernel)
        except Exception as e:  # papermill re-raises the cell's error; keep it and stop this run
            err = getattr(e, "ename", type(e).__name__) + ": " + str(getattr(e, "evalue", e)).strip()[:500]
            status["notebooks"][nb] = {"state": "failed", "error": err, "seconds": round(time.perf_counter() - t0, 1)}
            status["state"] = "failed"
            write_json(status_path, status)
            return status
        status["notebooks"][nb] = {"state": "done", "seconds": round(time.perf_counter() - t0, 1)}
        write_json(status_path, status)
    status["state"] = "done"
    status["seconds"] = round(sum(v.get("seconds", 0) for v in status["notebooks"].values()), 1)
    write_json(status_path, status)
    return status


def sweep(profile: str, dataset: str, data_root: Path, n_labeled: Sequence[int], seeds: Sequence[int], out: Path,
          methods: Sequence[str] = ("all",), overrides: Optional[dict] = None, notebooks_dir: Optional[Path] = None,
          log_output: bool = False, command: str = "") -> int:
    from .run import check_methods

    methods = check_methods(list(methods))  # an unknown method fails here, before any work
    notebooks_dir = Path(notebooks_dir or REPO_ROOT / "notebooks").resolve()
    out, data_root = Path(out).resolve(), Path(data_root).resolve()
    out.mkdir(parents=True, exist_ok=True)
    grid = [(n, s) for n in n_labeled for s in seeds]
    failures, t_all = [], time.perf_counter()
    for i, (n, s) in enumerate(grid, start=1):
        run_dir = out / run_name(dataset, n, s)
        label = f"[{i}/{len(grid)}] {dataset} n_labeled={n} seed={s}"
        status_path = run_dir / "status.json"
        if status_path.is_file() and read_json(status_path).get("state") == "done" and (run_dir / "results.csv").is_file():
            print(f"{label}: finished earlier, skipped", flush=True)
            continue
        params = {"profile": profile, "dataset": dataset, "data_root": str(data_root), "run_dir": str(run_dir),
                  "n_labeled": int(n), "seed": int(s), "overrides": overrides or {}}
        try:
            status = execute_run(run_dir, params, notebooks_dir, methods, label, log_output)
        except Exception as e:  # the sweep itself must go on
            traceback.print_exc()
            status = {"state": "failed", "notebooks": {"sweep": {"error": f"{type(e).__name__}: {e}"}}}
        if status.get("state") != "done":
            nb, info = next(((k, v) for k, v in status["notebooks"].items() if v.get("state") == "failed" or
                             "error" in v), ("?", {}))
            failures.append((label, nb, info.get("error", "unknown error")))
            print(f"{label}: FAILED in {nb}: {info.get('error')}", flush=True)
        else:
            print(f"{label}: done in {_fmt(status.get('seconds', 0))}", flush=True)
    results = aggregate(out, profile=profile, command=command,
                        failures=failures, wall_seconds=time.perf_counter() - t_all)
    print(f"\n{len(grid) - len(failures)}/{len(grid)} runs finished in {_fmt(time.perf_counter() - t_all)}")
    print(f"results: {out / 'results.csv'} ({results} rows)\nreport:  {out / 'report.md'}")
    if failures:
        print("\nFailed runs (re-run the same command to resume them):")
        for label, nb, err in failures:
            print(f"  {label}: {nb}: {err}")
        return 1
    return 0


# --------------------------------------------------------------------------------- the report


def aggregate(out: Path, profile: str = "", command: str = "", failures: Sequence = (),
              wall_seconds: Optional[float] = None) -> int:
    """Collect every run's results.csv into RUNS/results.csv and write RUNS/report.md."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from .evaluate import RESULT_COLUMNS

    frames = []
    for f in sorted(out.glob("*/results.csv")):
        frames.append(pd.read_csv(f))
    if not frames:
        (out / "report.md").write_text("# Report\n\nNo finished runs yet.\n")
        return 0
    df = pd.concat(frames, ignore_index=True)[RESULT_COLUMNS]
    df.to_csv(out / "results.csv", index=False)
    order = ["teacher", "ts_kd", "ts_kd_nosyn", "ta_kd", "mae", "mocov3", "scratch"]
    df["method"] = pd.Categorical(df["method"], [m for m in order if m in set(df["method"])] +
                                  sorted(set(df["method"]) - set(order)))
    stats = df.groupby(["method", "n_labeled"], observed=True).agg(
        dice=("dice", "mean"), dice_sd=("dice", "std"), iou=("iou", "mean"), iou_sd=("iou", "std"),
        hd95=("hd95", "mean"), hd95_sd=("hd95", "std"), seeds=("seed", "nunique")).reset_index()

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, g in stats.groupby("method", observed=True):
        ax.errorbar(g["n_labeled"], g["dice"], yerr=g["dice_sd"].fillna(0), marker="o", capsize=3, label=method,
                    lw=2.5 if method == "ts_kd" else 1.2, ls="--" if method == "teacher" else "-")
    ax.set_xlabel("labeled training images (n_labeled)")
    ax.set_ylabel("test Dice (mean over seeds)")
    ax.set_xscale("log")
    ax.set_xticks(sorted(stats["n_labeled"].unique()))
    ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{', '.join(sorted(df['dataset'].unique()))}: Dice vs labeled images")
    fig.tight_layout()
    fig.savefig(out / "dice_vs_n_labeled.png", dpi=120)
    plt.close(fig)

    def cell(m, s):
        return f"{m:.3f} ± {s:.3f}" if pd.notna(s) else f"{m:.3f}"

    lines = [f"# Reproduction report: {', '.join(sorted(df['dataset'].unique()))}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    run_seconds = sum(read_json(st).get("seconds", 0) or 0 for st in out.glob("*/status.json"))
    lines += [f"Profile: {profile or ', '.join(sorted(df['profile'].unique()))}; runs: "
              f"{df.groupby(['n_labeled', 'seed']).ngroups}; time in the runs' notebooks: {_fmt(run_seconds)}"
              + (f"; this invocation: {_fmt(wall_seconds)}" if wall_seconds else ""), "",
              "Dice / IoU: mean over test cases of the foreground-class mean; ± is the standard deviation over "
              "seeds. HD95 unit: see each run's metrics/summary.json.", "",
              "![Dice vs n_labeled](dice_vs_n_labeled.png)", ""]
    for metric in ("dice", "iou", "hd95"):
        piv = stats.pivot(index="method", columns="n_labeled", values=[metric, f"{metric}_sd"])
        ns = sorted(stats["n_labeled"].unique())
        lines += [f"## {dict(dice='Dice', iou='IoU', hd95='HD95')[metric]}", "",
                  "| method | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
        for method in piv.index:
            lines.append(f"| {method} | " + " | ".join(
                cell(piv.loc[method, (metric, n)], piv.loc[method, (f"{metric}_sd", n)])
                if pd.notna(piv.loc[method, (metric, n)]) else "" for n in ns) + " |")
        lines.append("")
    eff = df.groupby("method", observed=True).agg(params_m=("params_m", "first"),
                                                  latency_ms=("latency_ms", "median")).reset_index()
    t_lat = eff.loc[eff["method"] == "teacher", "latency_ms"]
    lines += ["## Efficiency (CPU, batch 1, median)", "", "| model | parameters (M) | latency (ms) | speed-up vs teacher |",
              "|---|---|---|---|"]
    for _, r in eff.iterrows():
        speed = f"{float(t_lat.iloc[0]) / r['latency_ms']:.1f}x" if len(t_lat) and r["latency_ms"] else ""
        lines.append(f"| {r['method']} | {r['params_m']:.2f} | {r['latency_ms']:.1f} | {speed} |")
    runs = []
    for st in sorted(out.glob("*/status.json")):
        s = read_json(st)
        runs.append(f"| {st.parent.name} | {s.get('state')} | {_fmt(s.get('seconds', 0)) if s.get('seconds') else ''} |")
    lines += ["", "## Runs", "", "| run | state | time |", "|---|---|---|"] + runs
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- {label}: {nb}: {err}" for label, nb, err in failures]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return len(df)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tskd_utils.reproduce", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--dataset", default="phantom")
    ap.add_argument("--data-root", type=Path, default=REPO_ROOT / "data")
    ap.add_argument("--n-labeled", type=_ints, default=[20])
    ap.add_argument("--seeds", type=_ints, default=[0])
    ap.add_argument("--methods", default="all", help="comma-separated method ids, or all")
    ap.add_argument("--out", type=Path, required=True, help="RUNS folder")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="profile override, e.g. --set teacher.epochs=5 (repeatable)")
    ap.add_argument("--log-output", action="store_true", help="stream the notebooks' output")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.overrides:
        if "=" not in item:
            ap.error(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    from .config import get_profile

    try:
        get_profile(args.profile, overrides)  # bad profile names or keys fail before any work
        return sweep(args.profile, args.dataset, args.data_root, args.n_labeled, args.seeds, args.out,
                     methods=args.methods.split(","), overrides=overrides, log_output=args.log_output,
                     command="python -m tskd_utils.reproduce " + " ".join(argv if argv is not None else sys.argv[1:]))
    except (KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
