"""Paired comparisons between methods: how sure is a claim that one method beats another?

Every method of a run is scored on the same test cases, and every seed of a sweep uses the same
test split, so two methods are compared on **paired** per-case differences (method A minus
method B on the same case and seed). A comparison is summarised by

* the mean paired difference;
* its 95% bootstrap confidence interval, resampling test cases and, when there are several,
  seeds too (both are random factors: a new seed is a new labeled set and a new training run,
  a new case is a new patient); the two factors are crossed, so each bootstrap draw resamples
  seeds and cases independently and averages the difference over the drawn cells;
* a two-sided Wilcoxon signed-rank p-value on the per-case differences (averaged over seeds).

An interval that includes 0 is reported as **within noise**. Nothing here is tuned on anything:
it only summarises per-case results that evaluation already wrote.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

N_BOOT = 10_000
CONFIDENCE = 0.95
BOOT_SEED = 0  # the bootstrap's own random stream: a report is the same every time it is made


def bootstrap_ci(diff: np.ndarray, n_boot: int = N_BOOT, confidence: float = CONFIDENCE,
                 seed: int = BOOT_SEED) -> tuple[float, float, float]:
    """(mean, low, high) of paired differences ``diff``: (n_cases,) or (n_seeds, n_cases).

    With several seeds, every draw resamples seeds and cases with replacement (a crossed design).
    NaN cells (a case missing for one seed) are left out of that draw's mean.
    """
    d = np.asarray(diff, dtype=np.float64)
    if d.ndim == 1:
        d = d[None]
    if d.ndim != 2 or d.shape[1] == 0:
        raise ValueError(f"expected (n_cases,) or (n_seeds, n_cases) differences, got shape {d.shape}")
    n_seeds, n_cases = d.shape
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // max(1, n_seeds * n_cases))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        seeds = rng.integers(0, n_seeds, (b, n_seeds)) if n_seeds > 1 else np.zeros((b, 1), dtype=int)
        cases = rng.integers(0, n_cases, (b, n_cases))
        cells = d[seeds[:, :, None], cases[:, None, :]]  # (b, n_seeds, n_cases)
        means[start:start + b] = np.nanmean(cells.reshape(b, -1), axis=1)
    alpha = (1 - confidence) / 2
    return float(np.nanmean(d)), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def wilcoxon_p(diff: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of per-case differences (averaged over seeds first)."""
    from scipy.stats import wilcoxon

    d = np.asarray(diff, dtype=np.float64)
    per_case = np.nanmean(d, axis=0) if d.ndim == 2 else d
    per_case = per_case[np.isfinite(per_case)]
    if per_case.size == 0 or np.all(per_case == 0):
        return 1.0
    return float(wilcoxon(per_case, zero_method="wilcox").pvalue)


def verdict(low: float, high: float, reference: str, other: str) -> str:
    if low > 0:
        return f"{reference} better"
    if high < 0:
        return f"{other} better"
    return "within noise"


def case_scores(per_case, metric: str = "dice"):
    """Per-case scores (the mean over foreground classes) from a ``per_case.csv`` table with columns
    method, case, class, <metric> (and optionally seed and other run columns)."""
    keys = [c for c in per_case.columns if c not in ("class", "dice", "iou", "hd95")]
    return per_case.groupby(keys, sort=False, observed=True)[metric].mean().reset_index()


def paired_comparisons(scores, reference: str = "ts_kd", metric: str = "dice",
                       others: Optional[Sequence[str]] = None, n_boot: int = N_BOOT):
    """``reference`` against every other method: a pandas table, one row per other method.

    ``scores`` has one row per (method, case[, seed]) with the case-level ``metric`` (see
    :func:`case_scores`). Differences are reference minus other, so a positive mean favours
    ``reference``. Cases (and seeds) where either method has no score are left out.
    """
    import pandas as pd

    seed_col = "seed" if "seed" in scores.columns else None
    wide = scores.pivot_table(index=[seed_col, "case"] if seed_col else ["case"], columns="method",
                              values=metric, aggfunc="mean", observed=True)
    if reference not in wide.columns:
        raise KeyError(f"no scores for the reference method {reference!r}; methods: {sorted(wide.columns)}")
    others = [m for m in (others or wide.columns) if m != reference and m in wide.columns]
    rows = []
    for other in others:
        diff = (wide[reference] - wide[other]).dropna()
        if diff.empty:
            continue
        if seed_col:
            grid = diff.unstack("case")  # (seeds, cases), NaN where a pair is missing
            d, n_seeds = grid.to_numpy(), grid.shape[0]
        else:
            d, n_seeds = diff.to_numpy(), 1
        mean, low, high = bootstrap_ci(d, n_boot=n_boot)
        rows.append({"comparison": f"{reference} - {other}", "other": other, "n_cases": int(np.asarray(d).shape[-1]),
                     "n_seeds": n_seeds, "mean_diff": mean, "ci_low": low, "ci_high": high,
                     "p_wilcoxon": wilcoxon_p(d), "verdict": verdict(low, high, reference, other)})
    return pd.DataFrame(rows)


def format_interval(mean: float, low: float, high: float, scale: float = 100.0, unit: str = " points") -> str:
    """``+4.2 points [+2.9, +5.6]`` (Dice differences as points by default)."""
    return f"{mean * scale:+.1f}{unit} [{low * scale:+.1f}, {high * scale:+.1f}]"
