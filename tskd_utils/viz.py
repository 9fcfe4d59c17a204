"""Plots the notebooks show: image grids with mask overlays, training curves, bar charts; a function's source.

Every function returns the matplotlib Figure and, given ``save``, also writes it as a PNG (the run
folder's ``figures/``), so the executed notebooks and the run folder tell the same story.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np

# background transparent, then distinct colours per foreground class
CLASS_COLORS = np.array([
    [0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [145, 30, 180], [70, 240, 240],
    [245, 130, 48], [240, 50, 230],
], dtype=np.float32) / 255.0


def overlay(image: np.ndarray, mask: Optional[np.ndarray] = None, alpha: float = 0.45) -> np.ndarray:
    """Grayscale image (H, W) uint8 or float in [0,1] + class mask -> RGB float image."""
    img = np.asarray(image, dtype=np.float32)
    if img.max() > 1.0:
        img = img / 255.0
    rgb = np.repeat(img[..., None], 3, axis=2)
    if mask is not None:
        m = np.asarray(mask).astype(int)
        colors = CLASS_COLORS[np.clip(m, 0, len(CLASS_COLORS) - 1)]
        fg = (m > 0)[..., None]
        rgb = np.where(fg, (1 - alpha) * rgb + alpha * colors, rgb)
    return np.clip(rgb, 0, 1)


class Source(str):
    """Source text that a notebook shows as highlighted Python (and a console as plain text)."""

    def _repr_markdown_(self) -> str:
        return f"```python\n{self}\n```"

    def __repr__(self) -> str:
        return str(self)


def source(fn) -> Source:
    """A function's source, shown as code: the one copy the package runs, displayed where the notebook uses it."""
    return Source(inspect.getsource(fn).rstrip("\n"))


def _save(fig, save: Optional[Path]):
    if save is not None:
        save = Path(save)
        save.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=110, bbox_inches="tight")
    return fig


def image_grid(images: Sequence[np.ndarray], masks: Optional[Sequence[np.ndarray]] = None,
               titles: Optional[Sequence[str]] = None, cols: int = 6, size: float = 2.2,
               suptitle: Optional[str] = None, save: Optional[Path] = None):
    n = len(images)
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, (size + 0.3) * rows + (0.4 if suptitle else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < n:
            ax.imshow(overlay(images[i], masks[i] if masks is not None else None), interpolation="nearest")
            if titles is not None:
                ax.set_title(str(titles[i]), fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return _save(fig, save)


def comparison_grid(rows: Sequence[dict], columns: Sequence[str], save: Optional[Path] = None, size: float = 2.0):
    """One row per case; ``rows[i] = {"title": str, "image": arr, <column>: mask, ...}``."""
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(size * len(columns), size * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c, col in enumerate(columns):
            ax = axes[r, c]
            ax.axis("off")
            ax.imshow(overlay(row["image"], row.get(col)), interpolation="nearest")
            label = col if r == 0 else ""
            extra = row.get(f"{col}_title", "")
            ax.set_title(f"{label}\n{extra}".strip() if label or extra else "", fontsize=8)
        axes[r, 0].text(-0.05, 0.5, row.get("title", ""), transform=axes[r, 0].transAxes, rotation=90,
                        va="center", ha="right", fontsize=8)
    fig.tight_layout()
    return _save(fig, save)


def curves(histories: dict, keys: Sequence[str] = ("loss",), title: str = "", save: Optional[Path] = None,
           logy: bool = False):
    """``histories = {label: [ {epoch, loss, val_dice, ...}, ... ]}`` -> one panel per key."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, hist in histories.items():
            xs = [r["epoch"] for r in hist if r.get(key) is not None]
            ys = [r[key] for r in hist if r.get(key) is not None]
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(histories) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, save)


def bars(values: dict, errors: Optional[dict] = None, ylabel: str = "", title: str = "",
         save: Optional[Path] = None, highlight: Optional[str] = None):
    names = list(values)
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(names)), 3.2))
    colors = ["tab:red" if n == highlight else "tab:blue" for n in names]
    ax.bar(names, [values[n] for n in names], yerr=[errors.get(n, 0) for n in names] if errors else None,
           color=colors, capsize=3)
    for i, n in enumerate(names):
        ax.text(i, values[n], f"{values[n]:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, save)


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """(C, h, w) feature map -> (h, w, 3) picture of its first three principal components."""
    c, h, w = features.shape
    x = features.reshape(c, -1).T.astype(np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:3].T
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    return np.clip((proj - lo) / np.maximum(hi - lo, 1e-8), 0, 1).reshape(h, w, 3)


def picture_rows(rows: dict, titles: Sequence[str], size: float = 2.2, save: Optional[Path] = None,
                 suptitle: str = ""):
    """``rows = {row label: [RGB or gray pictures, one per column]}``."""
    labels = list(rows)
    cols = len(rows[labels[0]])
    fig, axes = plt.subplots(len(labels), cols, figsize=(size * cols, size * len(labels)), squeeze=False)
    for r, label in enumerate(labels):
        for c, pic in enumerate(rows[label]):
            ax = axes[r, c]
            ax.imshow(pic, cmap="gray" if np.ndim(pic) == 2 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
        axes[r, 0].set_ylabel(label, fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return _save(fig, save)


# ----------------------------------------------------------------------------- diffusion (03)


def noise_schedule(abar: np.ndarray, noised: Sequence[np.ndarray], timesteps: Sequence[int], title: str = "",
                   save: Optional[Path] = None):
    """alpha-bar over t, and one image noised at a few t."""
    fig = plt.figure(figsize=(2.0 * len(timesteps), 4.6))
    grid = fig.add_gridspec(2, len(timesteps), height_ratios=[1.3, 1])
    ax = fig.add_subplot(grid[0, :])
    ax.plot(abar, label=r"$\bar\alpha_t$ (signal kept)")
    ax.plot(np.sqrt(1 - abar), label=r"$\sqrt{1-\bar\alpha_t}$ (noise std)")
    ax.set_xlabel("t")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    for k, (t, im) in enumerate(zip(timesteps, noised)):
        a = fig.add_subplot(grid[1, k])
        a.imshow(im, cmap="gray", vmin=0, vmax=1)
        a.set_title(f"t = {t}", fontsize=8)
        a.axis("off")
    fig.tight_layout()
    return _save(fig, save)


def nearest_distances(report: dict, save: Optional[Path] = None):
    """Histograms: nearest-train distance of synthetic images vs held-out real images (embedding, pixels)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, field, label in ((axes[0], "memorisation_embedding", "embedding_distance", "embedding L2"),
                                  (axes[1], "memorisation_pixels", "pixel_distance", "pixel RMS")):
        syn = [r[field] for r in report["nearest"]]
        held = report[key].get("heldout_real_to_train")
        ax.hist(syn, bins=15, alpha=0.6, label=f"synthetic (n={len(syn)})", density=True)
        if held:
            ax.axvline(held["median"], color="tab:orange", ls="--", label=f"held-out real median (n={held['n']})")
            ax.axvline(held["p05"], color="tab:orange", ls=":", label="held-out real 5th pct")
        ax.set_xlabel(f"distance to nearest train image ({label})")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, save)


# ----------------------------------------------------------------------------- evaluation (05)


def forest(table, reference: str = "ts_kd", scale: float = 100.0, title: str = "", save: Optional[Path] = None):
    """Paired differences (``tskd_utils.stats.paired_comparisons`` rows) with their 95% intervals; the
    dashed line at 0 is "no difference": an interval crossing it is within noise."""
    rows = table.sort_values("mean_diff")
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(rows) + 1.2))
    y = np.arange(len(rows))
    colors = ["tab:green" if lo > 0 else "tab:red" if hi < 0 else "tab:gray"
              for lo, hi in zip(rows["ci_low"], rows["ci_high"])]
    for yi, (mean, lo, hi, color) in enumerate(zip(rows["mean_diff"], rows["ci_low"], rows["ci_high"], colors)):
        ax.errorbar(mean * scale, yi, xerr=[[(mean - lo) * scale], [(hi - mean) * scale]], fmt="o", color=color,
                    capsize=3)
    ax.axvline(0, color="k", ls="--", lw=1)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{reference} - {o}" for o in rows["other"]])
    ax.set_xlabel("paired Dice difference (points), 95% bootstrap interval")
    ax.set_title(title or f"{reference} against every other model")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, save)


def dice_vs_latency(points: dict, highlight: str = "ts_kd", save: Optional[Path] = None, title: str = ""):
    """``points = {model: (latency_ms, dice, params_m)}``: accuracy against CPU latency (log scale)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (lat, dice, params) in points.items():
        ax.scatter(lat, dice, s=30 + 40 * params, color="tab:red" if name == highlight else
                   "tab:purple" if name.startswith("teacher") else "tab:blue", alpha=0.8)
        ax.annotate(name, (lat, dice), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("CPU latency per image, batch 1 (ms, log scale)")
    ax.set_ylabel("test Dice")
    ax.set_title(title or "accuracy against speed (marker size: parameters)")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return _save(fig, save)
