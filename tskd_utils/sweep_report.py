"""The sweep's report: RUNS/results.csv, RUNS/paired.csv and RUNS/report.md from every finished run in RUNS.

* ``results.csv``: every finished run's rows (dataset, n_labeled, seed, method, dice, iou, hd95, params_m,
  latency_ms, profile), then one column per grid axis. A setting
  that was given to some runs of this folder with another value (an earlier sweep's ``--set`` or ``--grid``, or a
  profile that an older version of the repository defined otherwise) becomes a column too, so two experiments are
  never averaged together. A run that is not finished (executing again after a change) is left out, with a note.
* ``report.md``: one section per (dataset, profile); inside it, rows are split by every axis. Dice / IoU / HD95 against
  n_labeled (mean ± sd over seeds), for each grid axis a table and a plot of Dice against the setting (one line per
  method, mean and 95% t-interval over seeds), the paired comparisons of ts_kd against every other method, the
  efficiency table, and every run's state.
* ``paired.csv``: ts_kd minus every other method per (dataset, profile, n_labeled, grid setting): mean paired Dice
  difference with a 95% bootstrap interval over test cases and seeds and a Wilcoxon p-value
  (:mod:`tskd_utils.stats`, from each run's ``metrics/per_case.csv``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

from . import stats
from .config import flat_settings
from .io import RESULT_COLUMNS, DataError, atomic_write, read_json
from .stats import format_interval

METHOD_ORDER = ["teacher", "teacher_frozen", "unet_supervised", "ts_kd", "ts_kd_nosyn", "ta_kd", "mae", "mocov3",
                "scratch"]
REFERENCE = "ts_kd"
GROUP = ["dataset", "profile"]
PAIRED_COLUMNS = ["comparison", "other", "n_cases", "n_seeds", "mean_diff", "ci_low", "ci_high", "p_wilcoxon",
                  "verdict"]
MAX_PANELS = 12


def hms(seconds: float) -> str:
    """``12m05s``, ``1h02m03s``: a duration as the sweep prints it."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _write_csv(path: Path, df) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def _save_fig(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".")))


def _cell_value(value):
    """A setting as a table cell: scalars as they are, anything else as JSON text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value)


def _setting(cfg: dict, key: str):
    over = cfg.get("overrides") or {}
    if key in over:
        return _cell_value(over[key])
    node = cfg.get("resolved_profile") or {}
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return "?"
        node = node[part]
    return _cell_value(node)


def _sort_key(v):
    if isinstance(v, bool):
        return (1, str(v))
    if isinstance(v, (int, float)):
        return (0, v)
    return (1, str(v))


def _label(v) -> str:
    return json.dumps(v) if isinstance(v, bool) else str(v)


def _run_folders(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))
                  and ((p / "status.json").is_file() or (p / "config.json").is_file()))


def collect(out: Path):
    """(runs, notes): one entry per run folder with a readable results.csv, and why others were left out."""
    import pandas as pd

    runs, notes = [], []
    for d in _run_folders(out):
        f = d / "results.csv"
        if not f.is_file():
            continue
        try:
            state = read_json(d / "status.json").get("state")
        except FileNotFoundError:  # notebooks run by hand, without the sweep: their results.csv is all there is
            state = "done"
        except DataError:
            state = "unreadable"
        if state != "done":  # a run executing again (after a change, a damaged file) keeps its old results.csv
            notes.append(f"{d.name} left out: not finished (state {state}); its results.csv is from an earlier "
                         f"execution")
            continue
        try:
            df = pd.read_csv(f)
            missing = [c for c in RESULT_COLUMNS if c not in df.columns]
            if missing:
                raise ValueError(f"lacks column(s) {', '.join(missing)}")
        except Exception as e:
            notes.append(f"{f.relative_to(out)} left out: {type(e).__name__}: {str(e)[:120]}")
            continue
        try:
            cfg = read_json(d / "config.json")
        except (FileNotFoundError, DataError):
            cfg = {}
        runs.append({"dir": d, "results": df[RESULT_COLUMNS].copy(), "config": cfg})
    return runs, notes


def find_axes(runs: list, axes: Sequence[str] = ()) -> list[str]:
    """The sweep's grid axes, then every other setting that differs between runs of one dataset and profile: one
    given with ``--set``, or one that the profile itself defined otherwise when an older run was made."""
    found = list(dict.fromkeys(axes))
    given = {k for r in runs for k in (r["config"].get("overrides") or {})}
    keys = sorted(given | set().union(*[flat_settings(r["config"].get("resolved_profile") or {})
                                         for r in runs]))
    keys = [k for k in keys if k not in found]
    groups: dict = {}
    for r in runs:
        c = r["config"]
        groups.setdefault((c.get("dataset"), c.get("profile")), []).append(c)
    for key in keys:
        # a run that records no resolved profile (an old or hand-made folder) makes no profile setting an axis
        if any(len({json.dumps(_setting(c, key), sort_keys=True) for c in cfgs
                    if key in given or c.get("resolved_profile")}) > 1 for cfgs in groups.values()):
            found.append(key)
    return found


def _interval(values) -> tuple[float, float, float]:
    """Mean and 95% t-interval over seeds (NaN bounds with one seed)."""
    import numpy as np
    from scipy.stats import t

    v = np.asarray([x for x in values if x == x], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if v.size < 2:
        return m, math.nan, math.nan
    half = float(t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return m, m - half, m + half


def _method_order(methods) -> list:
    present = list(dict.fromkeys(methods))
    return [m for m in METHOD_ORDER if m in present] + sorted(set(present) - set(METHOD_ORDER))


def paired_over_runs(runs: list, axes: Sequence[str], reference: str = REFERENCE):
    """One row per (dataset, profile, n_labeled, grid setting, other method): ts_kd minus that method."""
    import pandas as pd

    groups: dict = {}
    for r in runs:
        f = r["dir"] / "metrics" / "per_case.csv"
        first = r["results"].iloc[0] if len(r["results"]) else None
        if first is None or not f.is_file():
            continue
        key = (first["dataset"], first["profile"], int(first["n_labeled"])) + tuple(r["axes"][a] for a in axes)
        pc = pd.read_csv(f)
        if not {"method", "case", "dice"} <= set(pc.columns):
            continue
        pc = pc[[c for c in ("method", "case", "class", "dice") if c in pc.columns]].copy()
        pc["seed"] = int(first["seed"])
        groups.setdefault(key, []).append(pc)
    rows = []
    for key, frames in sorted(groups.items(), key=lambda kv: tuple(_sort_key(v) for v in kv[0])):
        per_case = pd.concat(frames, ignore_index=True)
        if reference not in set(per_case["method"]):
            continue
        scores = stats.case_scores(per_case)
        others = [m for m in _method_order(scores["method"]) if m != reference]
        table = stats.paired_comparisons(scores, reference=reference, others=others)
        for _, t in table.iterrows():
            rows.append({**dict(zip(["dataset", "profile", "n_labeled", *axes], key)),
                         **{c: t[c] for c in PAIRED_COLUMNS}})
    return pd.DataFrame(rows, columns=["dataset", "profile", "n_labeled", *axes, *PAIRED_COLUMNS])


def _md_table(header: list, rows: list) -> list[str]:
    return ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def _panels(n: int):
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axs = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axs.flat[n:]:
        ax.set_visible(False)
    return fig, list(axs.flat[:n])


def _style(method: str) -> dict:
    return {"lw": 2.5 if method == REFERENCE else 1.2, "ls": "--" if method.startswith("teacher") else "-"}


def aggregate(out: Path, profile: str = "", command: str = "", failures: Sequence = (),
              wall_seconds: Optional[float] = None, axes: Sequence[str] = ()) -> int:
    """Write RUNS/results.csv, RUNS/paired.csv and RUNS/report.md; returns the number of result rows."""
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    out = Path(out)
    runs, notes = collect(out)
    folders = _run_folders(out)
    if not runs:
        _write_text(out / "report.md", "# Report\n\nNo finished runs yet.\n" + "".join(f"\n- {n}" for n in notes))
        return 0
    axes = find_axes(runs, axes)
    frames = []
    for r in runs:
        r["axes"] = {a: _setting(r["config"], a) for a in axes}
        df = r["results"].copy()
        for a in axes:
            df[a] = r["axes"][a]
        df["_run"] = r["dir"].name
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    _write_csv(out / "results.csv", df[RESULT_COLUMNS + axes])
    paired = paired_over_runs(runs, axes)
    _write_csv(out / "paired.csv", paired)
    lines = _header(df, axes, runs, folders, notes, profile, command, wall_seconds)
    groups = sorted(df.groupby(GROUP).groups, key=lambda g: tuple(map(str, g)))
    for dataset, prof in groups:
        g = df[(df["dataset"] == dataset) & (df["profile"] == prof)].copy()
        pg = paired[(paired["dataset"] == dataset) & (paired["profile"] == prof)] if len(paired) else paired
        lines += _section(out, g, pg, axes, "" if len(groups) == 1 else f"_{dataset}_{prof}")
    lines += ["## Runs", ""] + _md_table(["run", "state", "time"], [_run_row(d) for d in folders])
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- {label}: {nb}: {err}" for label, nb, err in failures]
    _write_text(out / "report.md", "\n".join(lines) + "\n")
    return len(df)


def _run_row(d: Path) -> list:
    try:
        s = read_json(d / "status.json")
    except (FileNotFoundError, DataError):
        s = {}
    return [d.name, s.get("state", "not started"), hms(s["seconds"]) if s.get("seconds") else ""]


def _header(df, axes: list, runs: list, folders: list, notes: list, profile: str, command: str,
            wall_seconds: Optional[float]) -> list[str]:
    """The report's title, command, profile, time, grid and how to read it."""
    run_seconds = 0.0
    for d in folders:
        try:
            run_seconds += float(read_json(d / "status.json").get("seconds", 0) or 0)
        except (FileNotFoundError, DataError, ValueError, TypeError):
            pass
    lines = [f"# Reproduction report: {', '.join(sorted(df['dataset'].astype(str).unique()))}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Profile: {profile or ', '.join(sorted(df['profile'].astype(str).unique()))}; runs: {len(runs)} "
              f"finished of {len(folders)} run folders; time in the runs' notebooks: {hms(run_seconds)}"
              + (f"; this invocation: {hms(wall_seconds)}" if wall_seconds else ""), ""]
    if axes:
        lines += ["Grid: " + "; ".join(
            f"`{a}` = {', '.join(_label(v) for v in sorted(df[a].unique(), key=_sort_key))}" for a in axes), ""]
    lines += ["Each section is one dataset and profile, and rows are split by every setting that differs between "
              "runs: runs of different datasets, profiles or settings are never averaged together.", "",
              "Dice / IoU: mean over test cases of the foreground-class mean; ± is the standard deviation over seeds. "
              "HD95 unit: see each run's metrics/summary.json.", ""]
    return lines + [f"- {n}" for n in notes] + ([""] if notes else [])


def _matching(table, axes: list, combo: tuple):
    """The rows of ``table`` at grid setting ``combo`` (every row when there is no grid)."""
    import pandas as pd

    return table[(table[axes] == pd.Series(combo, index=axes)).all(axis=1)] if axes else table


def _section(out: Path, g, pg, axes: list, suffix: str) -> list[str]:
    """One (dataset, profile) section: Dice against n_labeled, the metric tables, one part per grid axis, the paired
    comparisons and the efficiency table."""
    dataset, prof = g["dataset"].iloc[0], g["profile"].iloc[0]
    order = _method_order(g["method"])
    st = g.groupby(axes + ["method", "n_labeled"], sort=False).agg(
        dice=("dice", "mean"), dice_sd=("dice", "std"), iou=("iou", "mean"), iou_sd=("iou", "std"),
        hd95=("hd95", "mean"), hd95_sd=("hd95", "std"), seeds=("seed", "nunique")).reset_index()
    ns = sorted(g["n_labeled"].unique())
    combos = sorted({tuple(r[a] for a in axes) for _, r in g.iterrows()}, key=lambda c: tuple(map(_sort_key, c)))
    lines = [f"## {dataset} · profile {prof}", ""]
    lines += _plot_against_n(out, st, axes, combos, order, ns, dataset, suffix)
    for metric in ("dice", "iou", "hd95"):
        lines += [f"### {dict(dice='Dice', iou='IoU', hd95='HD95')[metric]}", ""]
        rows = []
        for combo in combos:
            for m in order:
                sel = _matching(st[st["method"] == m], axes, combo)
                if len(sel):
                    by_n = {int(r["n_labeled"]): _cell(r[metric], r[f"{metric}_sd"]) for _, r in sel.iterrows()}
                    rows.append([*map(_label, combo), m] + [by_n.get(int(n), "") for n in ns])
        lines += _md_table([*axes, "method"] + [f"n={n}" for n in ns], rows) + [""]
    for axis in axes:
        lines += _axis_part(out, g, axes, axis, order, suffix)
    return lines + _paired_lines(pg, axes) + _efficiency_lines(g, axes, combos, order)


def _cell(m, s) -> str:
    import pandas as pd

    if pd.isna(m):
        return ""
    return f"{m:.3f} ± {s:.3f}" if pd.notna(s) else f"{m:.3f}"


def _plot_against_n(out: Path, st, axes: list, combos: list, order: list, ns: list, dataset: str,
                    suffix: str) -> list[str]:
    """Dice against n_labeled, one panel per grid setting (at most MAX_PANELS)."""
    import matplotlib.pyplot as plt

    shown = combos[:MAX_PANELS]
    fig, panels = _panels(len(shown))
    for ax, combo in zip(panels, shown):
        sub = _matching(st, axes, combo)
        for m in order:
            s = sub[sub["method"] == m].sort_values("n_labeled")
            if len(s):
                ax.errorbar(s["n_labeled"], s["dice"], yerr=s["dice_sd"].fillna(0), marker="o", capsize=3,
                            label=m, **_style(m))
        ax.set_xlabel("labeled training images (n_labeled)")
        ax.set_ylabel("test Dice (mean over seeds)")
        ax.set_xscale("log")
        ax.set_xticks(ns)
        ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
        ax.grid(alpha=0.3)
        ax.set_title(", ".join(f"{a}={_label(v)}" for a, v in zip(axes, combo)) or f"{dataset}: Dice vs labeled "
                     f"images", fontsize=9)
    panels[0].legend(fontsize=8)
    fig.tight_layout()
    name = f"dice_vs_n_labeled{suffix}.png"
    _save_fig(fig, out / name)
    plt.close(fig)
    lines = [f"![Dice vs n_labeled]({name})", ""]
    if len(combos) > len(shown):
        lines += [f"(the plot shows the first {len(shown)} of {len(combos)} settings; the tables show all)", ""]
    return lines


def _axis_part(out: Path, g, axes: list, axis: str, order: list, suffix: str) -> list[str]:
    """Dice against one grid axis, the other axes and n_labeled held fixed: a table and a plot."""
    import matplotlib.pyplot as plt

    others = [a for a in axes if a != axis]
    values = sorted(g[axis].unique(), key=_sort_key)
    per_seed: dict = {}  # (value, other settings, n_labeled, method) -> Dice of each seed
    for _, r in g.iterrows():
        per_seed.setdefault((r[axis], tuple(r[a] for a in others), int(r["n_labeled"]), r["method"]),
                            []).append(float(r["dice"]))
    cond = sorted({(int(r["n_labeled"]),) + tuple(r[a] for a in others) for _, r in g.iterrows()},
                  key=lambda c: tuple(map(_sort_key, c)))
    lines = [f"### Dice against {axis}", "",
             "Mean over seeds and, in brackets, its 95% t-interval over seeds (none with one seed)."
             + (f" Held fixed per row: n_labeled, {', '.join(others)}." if others else ""), ""]
    shown = cond[:MAX_PANELS]
    fig, panels = _panels(len(shown))
    rows = []
    for ci, c in enumerate(cond):
        ax = panels[ci] if ci < len(shown) else None
        for m in order:
            pts = [_interval(per_seed.get((v, tuple(c[1:]), c[0], m), [])) for v in values]
            if all(math.isnan(p[0]) for p in pts):
                continue
            rows.append([c[0], *map(_label, c[1:]), m] + [
                "" if math.isnan(mu) else (f"{mu:.3f}" if math.isnan(lo) else f"{mu:.3f} [{lo:.3f}, {hi:.3f}]")
                for mu, lo, hi in pts])
            if ax is not None:
                _errorbars(ax, pts, m)
        if ax is not None:
            ax.set_xticks(range(len(values)))
            ax.set_xticklabels([_label(v) for v in values])
            ax.set_xlabel(axis)
            ax.set_ylabel("test Dice (mean over seeds)")
            ax.grid(alpha=0.3)
            ax.set_title(", ".join([f"n_labeled={c[0]}"] + [f"{a}={_label(v)}" for a, v in zip(others, c[1:])]),
                         fontsize=9)
    panels[0].legend(fontsize=8)
    fig.tight_layout()
    name = f"dice_vs_{axis}{suffix}.png"
    _save_fig(fig, out / name)
    plt.close(fig)
    return lines + [f"![Dice vs {axis}]({name})", ""] + _md_table(["n_labeled", *others, "method"] +
                                                                  [_label(v) for v in values], rows) + [""]


def _errorbars(ax, pts: list, method: str) -> None:
    """One method's means with their intervals (points without a value left out)."""
    x = [i for i, p in enumerate(pts) if not math.isnan(p[0])]
    y = [pts[i][0] for i in x]
    err = [[0 if math.isnan(pts[i][1]) else pts[i][0] - pts[i][1] for i in x],
           [0 if math.isnan(pts[i][2]) else pts[i][2] - pts[i][0] for i in x]]
    ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method, **_style(method))


def _paired_lines(pg, axes: list) -> list[str]:
    """The paired comparisons of REFERENCE against every other method of the section."""
    lines = [f"### Paired comparisons: {REFERENCE} against every other method", ""]
    if not len(pg):
        return lines + [f"None: {REFERENCE} is not among this section's methods, or its runs have no "
                        f"metrics/per_case.csv.", ""]
    lines += ["Dice difference (ts_kd minus the other method) in points: mean over paired test cases and "
              "seeds, with its 95% bootstrap interval (cases and seeds resampled); two-sided Wilcoxon "
              "signed-rank p on the per-case differences. **within noise**: the interval includes 0. Also in "
              "paired.csv.", ""]
    rows = []
    for _, r in pg.iterrows():
        p = r["p_wilcoxon"]
        rows.append([int(r["n_labeled"]), *[_label(r[a]) for a in axes], r["comparison"],
                     format_interval(r["mean_diff"], r["ci_low"], r["ci_high"]),
                     "<0.001" if p < 0.001 else f"{p:.3f}", r["verdict"], f"{int(r['n_cases'])} × {int(r['n_seeds'])}"])
    return lines + _md_table(["n_labeled", *axes, "comparison", "Dice difference [95% CI]", "p (Wilcoxon)",
                              "verdict", "cases × seeds"], rows) + [""]


def _efficiency_lines(g, axes: list, combos: list, order: list) -> list[str]:
    """Parameters, CPU latency at batch 1 and the speed-up against the teacher, per model."""
    eff = g.groupby(axes + ["method"], sort=False).agg(params_m=("params_m", "first"),
                                                      latency_ms=("latency_ms", "median")).reset_index()
    rows = []
    for combo in combos:
        sel = _matching(eff, axes, combo)
        t_lat = sel.loc[sel["method"] == "teacher", "latency_ms"]
        for m in order:
            r = sel[sel["method"] == m]
            if not len(r):
                continue
            r = r.iloc[0]
            speed = f"{float(t_lat.iloc[0]) / r['latency_ms']:.1f}x" if len(t_lat) and r["latency_ms"] else ""
            rows.append([*map(_label, combo), m, f"{r['params_m']:.2f}", f"{r['latency_ms']:.1f}", speed])
    return ["### Efficiency (CPU, batch 1, median)", ""] + _md_table(
        [*axes, "model", "parameters (M)", "latency (ms)", "speed-up vs teacher"], rows) + [""]


def aggregate_locked(out: Path, timeout: float = 600.0, **kwargs) -> int:
    """:func:`aggregate` under ``RUNS/.aggregate.lock``: two sweeps finishing together write the report in turn."""
    from filelock import FileLock

    with FileLock(str(Path(out) / ".aggregate.lock"), timeout=timeout):
        return aggregate(Path(out), **kwargs)
