"""Paired statistics: intervals that cover, verdicts that follow them, seeds as a random factor."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tskd_utils import stats


def _scores(shift: float, n_cases: int = 40, seeds=(0,), seed_sd: float = 0.0, rng_seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(rng_seed)
    case_level = rng.normal(0.8, 0.08, n_cases)  # hard and easy cases: what pairing removes
    rows = []
    for s in seeds:
        seed_effect = rng.normal(0, seed_sd)
        for c in range(n_cases):
            rows.append({"method": "ts_kd", "case": f"c{c}", "seed": s,
                         "dice": case_level[c] + shift + seed_effect + rng.normal(0, 0.02)})
            rows.append({"method": "scratch", "case": f"c{c}", "seed": s, "dice": case_level[c] + rng.normal(0, 0.02)})
    return pd.DataFrame(rows)


def test_a_real_difference_is_found_and_no_difference_is_within_noise():
    table = stats.paired_comparisons(_scores(0.03))
    row = table.iloc[0]
    assert row["verdict"] == "ts_kd better" and 0.02 < row["mean_diff"] < 0.04
    assert 0 < row["ci_low"] < row["mean_diff"] < row["ci_high"] and row["p_wilcoxon"] < 1e-6
    # unpaired, the case-to-case spread (sd 0.08) would hide a 0.03 shift; paired it does not
    null = stats.paired_comparisons(_scores(0.0, rng_seed=3)).iloc[0]
    assert null["verdict"] == "within noise" and null["ci_low"] < 0 < null["ci_high"]


def test_the_interval_covers_the_true_difference_about_95_percent_of_the_time():
    covered = 0
    for k in range(200):
        rng = np.random.default_rng(k)
        d = 0.01 + rng.normal(0, 0.03, 30)
        _, lo, hi = stats.bootstrap_ci(d, n_boot=1000, seed=k)
        covered += lo <= 0.01 <= hi
    assert 0.88 <= covered / 200 <= 0.99  # percentile bootstrap at n=30 slightly under-covers


def test_seed_to_seed_variation_widens_the_interval():
    narrow = stats.paired_comparisons(_scores(0.03, seeds=(0, 1, 2), seed_sd=0.0)).iloc[0]
    wide = stats.paired_comparisons(_scores(0.03, seeds=(0, 1, 2), seed_sd=0.03)).iloc[0]
    assert narrow["n_seeds"] == wide["n_seeds"] == 3
    assert (wide["ci_high"] - wide["ci_low"]) > 2 * (narrow["ci_high"] - narrow["ci_low"])


def test_case_scores_average_the_classes_and_missing_pairs_are_dropped():
    per_case = pd.DataFrame({"method": ["a", "a", "b", "b", "a", "a"], "case": ["x", "x", "x", "x", "y", "y"],
                             "class": ["k1", "k2"] * 3, "dice": [0.6, 0.8, 0.5, 0.5, 0.9, 0.7],
                             "iou": 0.0, "hd95": 0.0})
    scores = stats.case_scores(per_case)
    assert scores.set_index(["method", "case"])["dice"].to_dict() == pytest.approx(
        {("a", "x"): 0.7, ("b", "x"): 0.5, ("a", "y"): 0.8})
    table = stats.paired_comparisons(scores, reference="a")
    assert table.iloc[0]["n_cases"] == 1 and table.iloc[0]["mean_diff"] == pytest.approx(0.2)
    with pytest.raises(KeyError, match="reference method 'ts_kd'"):
        stats.paired_comparisons(scores)


def test_format_interval():
    assert stats.format_interval(0.042, 0.029, 0.056) == "+4.2 points [+2.9, +5.6]"
