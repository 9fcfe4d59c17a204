"""How good are the synthetic images? Offline measures (no Inception network needed).

* **Fréchet distance** (FD) in the pooled embedding space of the pretrained teacher encoder (the
  network that produces the distillation targets). FD is biased by sample size, so every FD is
  computed from two sets of the same size ``k = min(n_synthetic, n_train // 2)``:
  ``fd_real_vs_synthetic`` (k real train images vs k synthetic ones), the floor
  ``fd_floor_real_vs_real`` (two disjoint sets of k real train images: what a perfect generator
  scores) and ``fd_real_vs_resized_real`` (k real images vs k *other* train images sent through the
  DDPM's resolution: a generator perfect except for its resolution). Mean and std over ``draws``
  random draws of the real sets.
* **Memorisation**: each synthetic image's distance to its nearest training image of the generator, in embedding space
  and in pixel space (RMS of [0, 1] images at the DDPM's sample size, the nearer of the train image
  and its mirror, since training used flips), next to the same distance for held-out real images
  (the val split: other subjects). Synthetic images much closer than that are copies.

:func:`quality_report` writes ``<run>/synthetic/quality.json``; notebook 03 shows it.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np
import torch

from .checkpoints import pooled_embeddings
from .data import letterbox
from .generation import sampling_settings, synthetic_paths, to_sample_size, to_uint8, training_images
from .io import read_image, read_json, write_json
from .run import Run

FD_DRAWS = 10  # random draws of the real subsets for the Frechet distances (mean and std reported)
QUALITY_VERSION = 3  # bump when quality_report's contents change (an older quality.json is recomputed)


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: Optional[float] = None) -> float:
    """Frechet distance between Gaussians fitted to two sets of embeddings (N, D) and (M, D).

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with ``scipy.linalg.sqrtm``. With fewer
    samples than dimensions a covariance is singular, so ``eps`` times the identity is added to both
    covariances (default: 1e-6 times the mean variance; whenever N or M <= D, or when sqrtm fails).
    Like FID, the estimate is biased upwards for small N: compare only equal sample sizes.
    """
    from scipy import linalg

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"the Frechet distance needs at least 2 samples per set (got {len(a)} and {len(b)})")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    d = a.shape[1]
    if eps is None:
        eps = 1e-6 * max(float(np.mean(np.diag(s_a) + np.diag(s_b)) / 2), 1e-12)
    regularise = min(len(a), len(b)) <= d
    for attempt in range(2):
        s_a_, s_b_ = (s_a + eps * np.eye(d), s_b + eps * np.eye(d)) if regularise or attempt else (s_a, s_b)
        covmean = linalg.sqrtm(s_a_ @ s_b_)
        if np.all(np.isfinite(covmean)):
            break
    covmean = np.real(covmean)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a_) + np.trace(s_b_) - 2 * np.trace(covmean))


def nearest(query: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2 distance of each query row to its nearest ref row, and that row's index."""
    d, i = torch.cdist(torch.from_numpy(np.asarray(query, np.float64)),
                       torch.from_numpy(np.asarray(ref, np.float64))).min(dim=1)
    return d.numpy(), i.numpy()


def summary_stats(x: np.ndarray) -> dict:
    x = np.asarray(x, dtype=np.float64)
    return {"n": int(x.size), "min": float(x.min()), "p05": float(np.percentile(x, 5)), "median": float(np.median(x)),
            "mean": float(x.mean()), "max": float(x.max())}


def through_sample_size(image: np.ndarray, sample_size: int) -> np.ndarray:
    """A letterboxed uint8 image sent through the DDPM's resolution: down to ``sample_size`` as for
    training, back up as samples are (what a perfect generator at that resolution could produce)."""
    return to_uint8(to_sample_size(image, sample_size).astype(np.float32) / 255.0, image.shape[0])


def _embeddings(run: Run, rng) -> dict:
    """Pooled pretrained-teacher embeddings of train, val, synthetic and resized-real images."""
    size, s = run.profile.data.image_size, run.profile.diffusion.sample_size
    train_names, val_names = list(run.splits["train"]), list(run.splits["val"])
    syn_paths = synthetic_paths(run)
    real = [read_image(run.info.case(c).image) for c in train_names + val_names]
    emb_real = pooled_embeddings(run, train_names + val_names, real).numpy()
    emb_syn = pooled_embeddings(run, [p.stem for p in syn_paths], [read_image(p) for p in syn_paths],
                                synthetic=True).numpy()
    k = min(len(emb_syn), len(train_names) // 2)
    resized_idx = np.sort(rng.permutation(len(train_names))[:k])
    resized = [through_sample_size(letterbox(real[i], size), s) for i in resized_idx]
    emb_resized = pooled_embeddings(run, [f"resized{s}_{train_names[i]}" for i in resized_idx], resized,
                                    synthetic=True).numpy()
    return {"train": emb_real[:len(train_names)], "val": emb_real[len(train_names):], "synthetic": emb_syn,
            "resized": emb_resized, "resized_idx": resized_idx, "k": k, "dim": emb_real.shape[1]}


def _frechet_distances(e: dict, draws: int, rng) -> dict:
    n_train, n_syn, k = len(e["train"]), len(e["synthetic"]), e["k"]
    others = np.setdiff1d(np.arange(n_train), e["resized_idx"])
    fd = {"fd_real_vs_synthetic": [], "fd_floor_real_vs_real": [], "fd_real_vs_resized_real": []}
    for _ in range(draws):
        perm = rng.permutation(n_train)
        fd["fd_real_vs_synthetic"].append(frechet_distance(e["train"][perm[:k]], e["synthetic"][rng.permutation(n_syn)[:k]]))
        fd["fd_floor_real_vs_real"].append(frechet_distance(e["train"][perm[:k]], e["train"][perm[k:2 * k]]))
        fd["fd_real_vs_resized_real"].append(frechet_distance(e["train"][rng.permutation(others)[:k]], e["resized"]))
    return {key: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v} for key, v in fd.items()}


def _memo(syn_d: np.ndarray, val_d: np.ndarray) -> dict:
    out = {"synthetic_to_train": summary_stats(syn_d)}
    if len(val_d):
        out["heldout_real_to_train"] = summary_stats(val_d)
        out["ratio_median"] = float(np.median(syn_d) / max(np.median(val_d), 1e-12))
        out["fraction_closer_than_p05_heldout"] = float(np.mean(syn_d < np.percentile(val_d, 5)))
        out["fraction_closer_than_any_heldout"] = float(np.mean(syn_d < val_d.min()))
    return out


def _memorisation(run: Run, e: dict) -> dict:
    size, s = run.profile.data.image_size, run.profile.diffusion.sample_size
    syn_paths, train_names = synthetic_paths(run), run.real_transfer_cases()  # what the generator learned from
    position = {c: i for i, c in enumerate(run.splits["train"])}
    emb_seen = e["train"][[position[c] for c in train_names]]
    train01 = (training_images(run)[:, 0] + 1) / 2
    pix_train, pix_flip = train01.flatten(1).numpy(), train01.flip(-1).flatten(1).numpy()
    pix_syn = np.stack([to_sample_size(read_image(p), s) for p in syn_paths]).reshape(len(syn_paths), -1) / 255.0
    pix_val = np.stack([to_sample_size(letterbox(read_image(run.info.case(c).image), size), s)
                        for c in run.splits["val"]]).reshape(len(run.splits["val"]), -1) / 255.0
    rms = 1 / math.sqrt(s * s)

    def pixel_nn(q):
        d1, i1 = nearest(q, pix_train)
        d2, i2 = nearest(q, pix_flip)
        return np.minimum(d1, d2) * rms, np.where(d2 < d1, i2, i1), d2 < d1

    syn_emb_d, syn_emb_i = nearest(e["synthetic"], emb_seen)
    val_emb_d = nearest(e["val"], emb_seen)[0] if len(e["val"]) else np.zeros(0)
    syn_pix_d, syn_pix_i, syn_pix_flip = pixel_nn(pix_syn)
    val_pix_d = pixel_nn(pix_val)[0] if len(pix_val) else np.zeros(0)
    rows = [{"synthetic": p.name, "train_pixels": train_names[int(i)], "mirrored": bool(f), "pixel_distance": float(d),
             "train_embedding": train_names[int(j)], "embedding_distance": float(ed)}
            for p, i, f, d, j, ed in zip(syn_paths, syn_pix_i, syn_pix_flip, syn_pix_d, syn_emb_i, syn_emb_d)]
    return {"memorisation_embedding": _memo(syn_emb_d, val_emb_d), "memorisation_pixels": _memo(syn_pix_d, val_pix_d),
            "pixel_space": f"RMS difference of [0, 1] images at {s} px, nearest of the train image and its mirror",
            "nearest": rows}


def quality_report(run: Run, force: bool = False, draws: int = FD_DRAWS) -> dict:
    """Fréchet distances and the memorisation check; saved to ``<run>/synthetic/quality.json``."""
    path = run.synthetic_dir / "quality.json"
    if run.profile.diffusion.n_synthetic <= 0:
        report = {"skipped": True, "reason": "n_synthetic = 0"}
        write_json(path, report)
        return report
    model_sha = sampling_settings(run)["model_sha256"]
    if not force and path.is_file():
        report = read_json(path)
        if (report.get("model_sha256"), report.get("draws"), report.get("version")) == (model_sha, draws,
                                                                                          QUALITY_VERSION):
            print(f"quality report computed earlier: reusing {path} (force=True recomputes)")
            return report
    t0 = time.perf_counter()
    rng = np.random.default_rng([run.seed, 11])
    e = _embeddings(run, rng)
    t_embed = time.perf_counter() - t0
    fd = _frechet_distances(e, draws, rng)
    report = {"version": QUALITY_VERSION, "n_synthetic": len(e["synthetic"]), "n_train": len(e["train"]),
              "n_heldout": len(e["val"]), "draws": draws, "fd_set_size": e["k"],
              "embedding": f"pooled embedding of the pretrained {run.profile.teacher.name} encoder "
                           f"({e['dim']}-d, input {run.profile.teacher.input_size} px)", **fd,
              "resolution": run.profile.diffusion.sample_size,
              "fd_ratio": fd["fd_real_vs_synthetic"]["mean"] / max(fd["fd_floor_real_vs_real"]["mean"], 1e-12),
              **_memorisation(run, e), "model_sha256": model_sha,
              "seconds": {"embeddings": round(t_embed, 2), "total": round(time.perf_counter() - t0, 2)}}
    write_json(path, report)
    return report


def fd_table(report: dict):
    """The Fréchet distances as a pandas table (mean, std over the draws; set sizes)."""
    import pandas as pd

    rows = {"real vs real (floor)": "fd_floor_real_vs_real",
            f"real vs real through {report['resolution']} px": "fd_real_vs_resized_real",
            "real vs synthetic": "fd_real_vs_synthetic"}
    return pd.DataFrame([{"comparison": label, "FD mean": report[key]["mean"], "FD std": report[key]["std"],
                          "images per set": report["fd_set_size"], "draws": report["draws"]}
                         for label, key in rows.items()]).set_index("comparison")


def memorisation_table(report: dict):
    """A small pandas table of the memorisation numbers."""
    import pandas as pd

    rows = []
    for space in ("embedding", "pixels"):
        m = report[f"memorisation_{space}"]
        for who in ("synthetic_to_train", "heldout_real_to_train"):
            if who in m:
                rows.append({"space": space, "images": who, **{k: m[who][k] for k in ("n", "min", "p05", "median")}})
    return pd.DataFrame(rows)
