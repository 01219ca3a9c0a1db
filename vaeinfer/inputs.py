"""Validation of everything a caller hands the runtime, before onnxruntime sees it.

Each check returns the array in the exact dtype and layout the graph takes, or raises
InputError naming what was expected and what came.
"""

from __future__ import annotations

import numbers

import numpy as np

from vaeinfer.errors import InputError

FLOAT_DTYPES = (np.float16, np.float32, np.float64)
_FLOATS = frozenset(map(np.dtype, FLOAT_DTYPES))  # a set lookup: cheaper than comparing to each type


def _array(x, what: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    try:
        a = np.asarray(x)
    except (ValueError, TypeError) as e:
        raise InputError(f"{what}: expected a numpy array, got {type(x).__name__} ({e})") from None
    if a.dtype == object:
        raise InputError(f"{what}: expected a numeric array, got {type(x).__name__} of mixed objects")
    return a


def _rank_and_batch(a: np.ndarray, trailing: tuple, what: str, layout: str) -> None:
    if a.shape[1:] != tuple(trailing):
        raise InputError(f"{what}: expected shape (N, {', '.join(map(str, trailing))}) {layout}, got {tuple(a.shape)}")
    if a.shape[0] == 0:
        raise InputError(f"{what}: expected at least one item, got a batch of 0")


def all_finite(a: np.ndarray) -> bool:
    """Whether no value is NaN/Inf: exact and warning-free (a sum would warn on Inf - Inf), and
    without the Python layer of ndarray.all (which costs as much as the pass at batch 1)."""
    return bool(np.logical_and.reduce(np.isfinite(a), None))


def _finite(a: np.ndarray, what: str) -> None:
    if not all_finite(a):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise InputError(f"{what}: expected finite values, got {bad} NaN/Inf")


def _float32(a: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 array: `a` itself when it already is one (no copy, no call)."""
    return a if a.dtype == np.float32 and a.flags.c_contiguous else np.ascontiguousarray(a, np.float32)


def images(x, shape: tuple[int, int, int], value_range: tuple[float, float], what: str = "images") -> np.ndarray:
    """Images (N, C, H, W): float16/32/64 within value_range, or uint8 (0..255, scaled to the range)."""
    a = _array(x, what)
    _rank_and_batch(a, shape, what, "(N, C, H, W)")
    lo, hi = value_range
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a, np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)
    if a.dtype not in _FLOATS:
        raise InputError(f"{what}: expected dtype uint8, float16, float32 or float64, got {a.dtype}")
    a = _float32(a)
    amin, amax = float(np.minimum.reduce(a, None)), float(np.maximum.reduce(a, None))
    if not (lo <= amin and amax <= hi):  # NaN fails this too (min/max propagate it): tell which
        _finite(a, what)
        raise InputError(f"{what}: expected values in [{lo}, {hi}], got [{amin:g}, {amax:g}]")
    return a


def spatial_size(shape: tuple, multiple: int, min_size: int, what: str, axes: str = "height and width") -> None:
    """H and W of a (N, C, H, W) shape: multiples of `multiple`, at least `min_size`."""
    h, w = shape[-2:]
    if h % multiple or w % multiple or min(h, w) < min_size:
        raise InputError(f"{what}: expected {axes} multiples of {multiple} and at least {min_size}, got {h}x{w} "
                         f"(shape {tuple(shape)}); pad or resize to e.g. {_round_up(h, multiple, min_size)}x"
                         f"{_round_up(w, multiple, min_size)}")


def _round_up(n: int, multiple: int, min_size: int) -> int:
    return max(min_size, -(-n // multiple) * multiple)


def spatial_images(x, channels: int, value_range: tuple[float, float], multiple: int, min_size: int,
                   what: str = "images") -> np.ndarray:
    """Images (N, C, H, W) of any size whose H and W are multiples of `multiple` (>= min_size)."""
    a = _array(x, what)
    if a.ndim != 4 or a.shape[1] != channels:
        raise InputError(f"{what}: expected shape (N, {channels}, H, W) (N, C, H, W), got {tuple(a.shape)}")
    spatial_size(a.shape, multiple, min_size, what)
    return images(a, tuple(a.shape[1:]), value_range, what)


def spatial_latents(z, channels: int, min_size: int = 1, what: str = "z") -> np.ndarray:
    """Spatial latents (N, c, h, w), float, finite."""
    a = _array(z, what)
    if a.ndim != 4 or a.shape[1] != channels:
        raise InputError(f"{what}: expected shape (N, {channels}, h, w) (N, c, h, w), got {tuple(a.shape)}")
    spatial_size(a.shape, 1, min_size, what, "latent height and width")
    _rank_and_batch(a, tuple(a.shape[1:]), what, "(N, c, h, w)")
    if a.dtype not in FLOAT_DTYPES:
        raise InputError(f"{what}: expected a float16/32/64 array, got {a.dtype}")
    a = np.ascontiguousarray(a, np.float32)
    _finite(a, what)
    return a


def latents(z, dim: int, what: str = "z") -> np.ndarray:
    """Latent vectors (N, dim), float, finite."""
    a = _array(z, what)
    if a.ndim == 2 and a.shape[1] != dim:
        raise InputError(f"{what}: expected latent size {dim}, got {a.shape[1]} (shape {tuple(a.shape)})")
    _rank_and_batch(a, (dim,), what, "(N, latent)")
    if a.dtype not in _FLOATS:
        raise InputError(f"{what}: expected a float16/32/64 array, got {a.dtype}")
    a = _float32(a)
    _finite(a, what)
    return a


def codes(c, grid: tuple[int, int], codebook_size: int, what: str = "codes") -> np.ndarray:
    """Code grids (N, h, w) of integers in [0, codebook_size)."""
    a = _array(c, what)
    _rank_and_batch(a, grid, what, "(N, h, w)")
    if a.dtype.kind not in "iu":  # signed or unsigned integers (not bool)
        raise InputError(f"{what}: expected an integer array, got {a.dtype}")
    if a.dtype == np.int64 and np.maximum.reduce(a.view(np.uint64), None) < codebook_size:
        return a if a.flags.c_contiguous else np.ascontiguousarray(a)  # one pass: negatives read >= 2**63
    amin, amax = int(np.minimum.reduce(a, None)), int(np.maximum.reduce(a, None))
    if amin < 0 or amax >= codebook_size:
        raise InputError(f"{what}: expected codes in [0, {codebook_size}), got [{amin}, {amax}]")
    return a if a.dtype == np.int64 and a.flags.c_contiguous else np.ascontiguousarray(a, np.int64)


def count(n, what: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise InputError(f"{what}: expected a positive integer, got {n!r}")
    return int(n)


def positive(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value <= 0:
        raise InputError(f"{what}: expected a finite number > 0, got {value!r}")
    return float(value)


def batch_size(value) -> int | None:
    return None if value is None else count(value, "batch_size")


def seed(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise InputError(f"seed: expected a non-negative integer or None, got {value!r}")
    return int(value)
