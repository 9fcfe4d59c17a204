"""Teacher features computed once and cached on disk: shared by teacher training, synthesis quality,
distillation and evaluation.

The frozen stages of the teacher encoder (those before the first LoRA-adapted stage, the
*prefix*) never change, so their output is computed once per image and kept in a
:class:`FeatureCache`: one safetensors file per image, keyed by the image's name, a hash of its
pixels and its valid region. Real cases share one cache per dataset (beside the run folders: the
features depend on neither the split nor the seed); synthetic images, which belong to one run,
use a cache inside the run. On a CPU the prefix may run in bfloat16 (``teacher.prefix_dtype``,
about 2x faster; the cache key says which).

Teacher input convention (method.md): an image is letterboxed (longest side resized, zero padding
bottom/right) and the teacher normalises **the image itself**, not the padding
(:meth:`tskd_utils.models.TeacherEncoder.preprocess` takes each image's valid region).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .data import letterbox, letterbox_valid
from .io import DataError, safe_join, save_safetensors
from .training import cpu_bf16_or_float32

PREFIX_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


class FeatureCache:
    """One safetensors file per image, keyed by name + a hash of the pixels (and valid region), filled
    on demand. Filling is resumable: an interrupted fill keeps the files already written."""

    def __init__(self, directory: Path, dtype: torch.dtype = torch.float16):
        self.dir, self.dtype = Path(directory), dtype

    @staticmethod
    def key(name: str, image: np.ndarray, valid: Optional[tuple] = None) -> str:
        h = hashlib.sha1(np.ascontiguousarray(image).tobytes())
        if valid is not None:
            h.update(np.asarray(valid, dtype=np.int64).tobytes())
        return f"{name}-{h.hexdigest()[:12]}"

    def path(self, key: str) -> Path:
        return safe_join(self.dir, f"{key}.safetensors")

    def save(self, key: str, tensors: dict) -> None:
        """Write one entry atomically (a temporary file renamed into place). The temporary name is unique
        to this writer: runs of a sweep share the cache and may fill the same entry at the same time
        (the last rename wins; both wrote the same features)."""
        save_safetensors(self.path(key), {k: v.contiguous().cpu() for k, v in tensors.items()})

    def load_all(self, key: str) -> dict:
        path = self.path(key)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise DataError(f"{path}: damaged cache file ({e}); delete it and re-run to recompute") from None

    def load(self, key: str) -> torch.Tensor:
        return self.load_all(key)["x"]

    def get_many(self, names: Sequence[str], images: Sequence[np.ndarray], compute: Callable,
                 valid: Optional[Sequence[tuple]] = None, desc: str = "features") -> list[torch.Tensor]:
        """``compute(uint8 images (B, S, S), valid (B, 2)) -> (B, ...)``; returns one tensor per image."""
        valid = list(valid) if valid is not None else [None] * len(images)
        keys = [self.key(n, im, v) for n, im, v in zip(names, images, valid)]
        todo = [i for i, k in enumerate(keys) if not self.path(k).is_file()]
        if todo:
            self.dir.mkdir(parents=True, exist_ok=True)
            for i in tqdm(todo, desc=desc, unit="img", dynamic_ncols=True):
                f = compute(images[i][None], None if valid[i] is None else [valid[i]])[0]
                f16 = f.to(self.dtype)
                self.save(keys[i], {"x": f16 if torch.isfinite(f16).all() else f.float()})  # fp16 unless out of range
        return [self.load(k) for k in keys]


# ------------------------------------------------------------------------------- teacher input


def images_to_tensor(images: np.ndarray, device: str) -> torch.Tensor:
    """uint8 (B, S, S) -> float (B, 1, S, S) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)[:, None].to(device)


def teacher_inputs(raw_images: Sequence[np.ndarray], size: int) -> tuple[list[np.ndarray], list[tuple]]:
    """Original uint8 images -> (letterboxed images at ``size``, their valid (rows, cols))."""
    return [letterbox(im, size) for im in raw_images], [letterbox_valid(im.shape, size) for im in raw_images]


def valid_tensor(valid: Optional[Sequence[tuple]], device: str) -> Optional[torch.Tensor]:
    return None if valid is None or any(v is None for v in valid) else torch.tensor(
        [tuple(v) for v in valid], dtype=torch.long, device=device)


def effective_prefix_dtype(dtype: str, device: str) -> str:
    """The type the prefix really runs in: ``teacher.prefix_dtype``, except bfloat16 on a CPU without bfloat16
    instructions (AVX512-BF16, AMX), where it is emulated and many times slower than float32 (the demo's prefix,
    LiteMedSAM stages 0-2 at 256 px: 16.8 against 1.7 s per image on a 2-core AVX2-only AMD EPYC): float32
    there, with a warning. The caches are named by it."""
    if dtype not in PREFIX_DTYPES:
        raise KeyError(f"unknown teacher.prefix_dtype {dtype!r}; choose one of: {', '.join(PREFIX_DTYPES)}")
    if dtype == "bfloat16" and torch.device(device).type == "cpu":
        return cpu_bf16_or_float32("teacher.prefix_dtype", "the teacher's prefix runs")
    return dtype


def run_prefix_dtype(run) -> str:
    """:func:`effective_prefix_dtype` for a run's profile and device."""
    return effective_prefix_dtype(run.profile.teacher.prefix_dtype, run.device)


def compute_prefix(encoder, device: str, dtype: str = "float32") -> Callable:
    """A ``compute`` function for :class:`FeatureCache` running the frozen prefix (in ``dtype``; bfloat16 only
    where the device has it, see :func:`effective_prefix_dtype`)."""
    dtype = effective_prefix_dtype(dtype, device)
    if device == "cpu" and hasattr(encoder, "fuse_prefix"):
        encoder.fuse_prefix()

    @torch.inference_mode()
    def compute(images: np.ndarray, valid=None) -> torch.Tensor:
        x = encoder.preprocess(images_to_tensor(images, device), valid_tensor(valid, device))
        if PREFIX_DTYPES[dtype] is None:
            return encoder.prefix(x).float().cpu()
        with torch.autocast(torch.device(device).type, dtype=PREFIX_DTYPES[dtype]):
            return encoder.prefix(x).float().cpu()

    return compute


def prefix_cache(run, encoder, synthetic: bool = False) -> FeatureCache:
    """The cache of ``encoder``'s prefix: shared by every run of the dataset, or the run's own for
    synthetic images."""
    t = run.profile.teacher
    name = f"{encoder.name}-{t.input_size}-prefix{encoder.suffix_start}-{run_prefix_dtype(run)}"
    if synthetic:
        return FeatureCache(run.cache_dir / f"{name}-synthetic")
    return FeatureCache(run.shared_cache_dir / name)


def teacher_prefix(run, encoder, names: Sequence[str], images: Sequence[np.ndarray],
                   valid: Optional[Sequence[tuple]] = None, synthetic: bool = False,
                   desc: Optional[str] = None) -> list[torch.Tensor]:
    """Prefix features of letterboxed uint8 images at the teacher's input size, from the cache."""
    cache = prefix_cache(run, encoder, synthetic)
    compute = compute_prefix(encoder, run.device, run_prefix_dtype(run))
    return cache.get_many(names, images, compute, valid,
                          desc=desc or ("teacher prefix (synthetic)" if synthetic else "teacher prefix"))


def run_suffix(fn: Callable, prefix: Sequence[torch.Tensor], device: str, batch_size: int = 8) -> list:
    """``fn(prefix batch on device)`` over cached prefix features, in batches; outputs moved to the CPU."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(prefix), batch_size):
            h = torch.stack(list(prefix[i:i + batch_size])).float().to(device)
            res = fn(h)
            out.append(tuple(r.float().cpu() for r in res) if isinstance(res, tuple) else res.float().cpu())
    return out
