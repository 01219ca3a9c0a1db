"""Tiled application of a spatial function (a decoder or an encoder graph) over a large array.

An image (or latent) larger than a tile is cut into overlapping tiles of one size; the function
runs on batches of tiles; each tile's output is weighted by a smooth window and added into one
preallocated output array. So peak memory is the output plus the activations of one batch of
tiles, never the activations of the whole image.

Layout along each axis (in input units, e.g. latent pixels for a decoder): the fewest tiles of
the one size whose overlaps are all >= `overlap`, spread evenly from the start to the end of the
axis, so the last tile is shifted inward to end on the border rather than cut smaller, and the
extra overlap is shared out instead of piling up at the last seam; an axis no longer than a tile
is one tile of the axis's length; an array no larger than a tile in both axes is one plain
call, untiled.

Blending: inside each overlap between neighbours, the left (upper) tile's weight ramps down and
the right (lower) tile's ramps up (linear or cosine), and the weights are normalised so that they
sum to exactly 1 (up to float rounding) in every output pixel. A tile has no ramp on the image
border. Outside the overlaps a single tile has weight exactly 1, so where the function is local
(its receptive field ends inside the tile) tiled output equals untiled output bit for bit away
from the seams; in the seams the error is at most what the tile edges' truncated context
causes, damped by the ramp (tests/test_tiling.py states and checks the bounds).

Everything here is numpy; `fn` is whatever runs the model (an onnxruntime session call).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, Sequence

import numpy as np

from vaeinfer.errors import InputError, OutputError

BLENDS = ("cosine", "linear")


def tiled_apply(fn: Callable, array: np.ndarray, tile, overlap, factor, *, multiple: int = 1,
                max_batch: int = 1, blend: str = "cosine", progress: Callable[[int, int], None] | None = None):
    """Apply the spatial function `fn` to `array` (N, C, H, W) in overlapping, blended tiles.

    fn: takes a float array (n, C, h, w) of n <= max_batch tiles (or the whole array when it
      fits in one tile) and returns an array (n, C', h * factor, w * factor), or a tuple/list of
      such arrays (an encoder's mean and logvar): each is blended the same way.
    tile, overlap: tile size and overlap in input units (an int, or (height, width)); both
      multiples of the alignment (see `multiple`); 0 <= 2 * overlap < tile.
    factor: output pixels per input pixel: 8 for a decoder with 8x upsampling, 1/8 (or
      Fraction(1, 8)) for an encoder with 8x downsampling. Tiles start at multiples of the
      alignment = lcm(multiple, factor's denominator), so an encoder sees tiles whose size and
      offset are multiples of its downsampling factor.
    multiple: what else the model needs tile sizes/offsets to be multiples of (input units).
    max_batch: how many tiles (of any of the N images) go into one call of fn.
    blend: "cosine" (default) or "linear" ramps in the overlaps.
    progress: called as progress(done_tiles, total_tiles) after each tile is written.

    Returns the blended output (N, C', H * factor, W * factor) in fn's dtype (a tuple/list of
    them if fn returns one). Raises InputError for bad arguments, OutputError when fn returns
    arrays of the wrong shape.
    """
    factor = _factor(factor)
    align = _alignment(factor, multiple)
    if not isinstance(array, np.ndarray) or array.ndim != 4:
        raise InputError(f"tiling: expected an array (N, C, H, W), got {_describe(array)}")
    n, _, height, width = array.shape
    if n == 0:
        raise InputError("tiling: expected at least one image, got an array with N = 0")
    for name, size in (("height", height), ("width", width)):
        if size == 0 or size % align or (size * factor).denominator != 1:
            raise InputError(f"tiling: the input {name} must be a positive multiple of {align}, got {size}")
    (th, tw), (oh, ow) = check_tile(tile, overlap, factor, multiple)
    max_batch = _positive_int(max_batch, "max_batch")
    if blend not in BLENDS:
        raise InputError(f"tiling: blend must be one of {BLENDS}, got {blend!r}")

    if height <= th and width <= tw:
        result = fn(array)
        _each(result, lambda o: _check_out(o, (n, int(height * factor), int(width * factor))))
        if progress is not None:
            progress(1, 1)
        return result

    ys, xs = axis_starts(height, th, oh, align), axis_starts(width, tw, ow, align)
    th, tw = min(th, height), min(tw, width)
    wys = axis_weights(ys, th, height, factor, blend)
    wxs = axis_weights(xs, tw, width, factor, blend)
    jobs = [(i, a, b) for i in range(n) for a in range(len(ys)) for b in range(len(xs))]
    out_h, out_w = int(th * factor), int(tw * factor)
    outs = None
    for first in range(0, len(jobs), max_batch):
        chunk = jobs[first:first + max_batch]
        batch = np.stack([array[i, :, ys[a]:ys[a] + th, xs[b]:xs[b] + tw] for i, a, b in chunk])
        result = fn(batch)
        parts = list(result) if isinstance(result, (tuple, list)) else [result]
        for p in parts:
            _check_out(p, (len(chunk), out_h, out_w))
        if outs is None:
            outs = [np.zeros((n, p.shape[1], int(height * factor), int(width * factor)), p.dtype) for p in parts]
        elif len(parts) != len(outs) or any(p.shape[1] != o.shape[1] for p, o in zip(parts, outs)):
            raise OutputError(f"tiling: the function's outputs changed between calls: {[p.shape for p in parts]}")
        for k, (i, a, b) in enumerate(chunk):
            y0, x0 = int(ys[a] * factor), int(xs[b] * factor)
            w = wys[a][:, None] * wxs[b][None, :]
            for p, o in zip(parts, outs):
                o[i, :, y0:y0 + out_h, x0:x0 + out_w] += p[k] * w.astype(p.dtype)
            if progress is not None:
                progress(first + k + 1, len(jobs))
    if isinstance(result, tuple):
        return tuple(outs)
    return outs if isinstance(result, list) else outs[0]


def tiled_decode(fn: Callable, z: np.ndarray, tile, overlap, scale: int = 8, **options):
    """`tiled_apply` for a decoder that upsamples `scale` times: tile and overlap in latent pixels."""
    return tiled_apply(fn, z, tile, overlap, _positive_int(scale, "scale"), **options)


def tiled_encode(fn: Callable, x: np.ndarray, tile, overlap, scale: int = 8, **options):
    """`tiled_apply` for an encoder that downsamples `scale` times: tile and overlap in image pixels
    (multiples of `scale`); fn may return (mean, logvar), and a tuple comes back."""
    return tiled_apply(fn, x, tile, overlap, Fraction(1, _positive_int(scale, "scale")), **options)


def check_tile(tile, overlap, factor=1, multiple: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
    """Validated ((tile_h, tile_w), (overlap_h, overlap_w)) in input units, or InputError."""
    factor = _factor(factor)
    align = _alignment(factor, multiple)
    tiles, overlaps = _pair(tile, "tile"), _pair(overlap, "overlap")
    for t, o in zip(tiles, overlaps):
        if t <= 0 or t % align:
            raise InputError(f"tiling: tile must be a positive multiple of {align} (input units), got {tile!r}")
        if o < 0 or o % align:
            raise InputError(f"tiling: overlap must be a multiple of {align} >= 0 (input units), got {overlap!r}")
        if 2 * o >= t:
            raise InputError(f"tiling: overlap must be less than half the tile, got overlap {overlap!r} "
                             f"for tile {tile!r}")
    return tiles, overlaps


def axis_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Where the tiles along one axis start (input units): the fewest tiles whose overlaps are all
    >= `overlap`, spread evenly from 0 to length - tile (so the last tile is shifted inward to end
    on the border instead of being cut smaller), at multiples of `align`; [0] when the axis fits
    in one tile."""
    if length <= tile:
        return [0]
    if (length - tile) % align or (tile - overlap) % align:  # tiled_apply checks these first
        raise InputError(f"tiling: length {length}, tile {tile} and overlap {overlap} must be multiples of {align}")
    gaps = -(-(length - tile) // (tile - overlap))
    # rounding is monotone, so no gap grows past tile - overlap (a multiple of align)
    return [round(k * (length - tile) / gaps / align) * align for k in range(gaps + 1)]


def axis_weights(starts: Sequence[int], tile: int, length: int, factor=1, blend: str = "cosine") -> list[np.ndarray]:
    """Each tile's blending weights along one axis, in output pixels (float64, tile * factor long):
    ramps inside the overlaps with the neighbours (none on the image border), normalised so that
    the weights of all tiles sum to 1 in every output pixel."""
    factor = _factor(factor)
    size, total = int(tile * factor), int(length * factor)
    offsets = [int(s * factor) for s in starts]
    raw = []
    for k, a in enumerate(offsets):
        w = np.ones(size)
        if k > 0:  # ramp up across the overlap with the previous tile
            w *= _ramp(offsets[k - 1] + size - a, size, blend)
        if k + 1 < len(offsets):  # ramp down across the overlap with the next tile
            w *= _ramp(a + size - offsets[k + 1], size, blend)[::-1]
        raw.append(w)
    norm = np.zeros(total)
    for a, w in zip(offsets, raw):
        norm[a:a + size] += w
    return [w / norm[a:a + size] for a, w in zip(offsets, raw)]


def tile_count(shape: Sequence[int], tile, overlap, factor=1, multiple: int = 1) -> int:
    """How many calls' worth of tiles (tiles x images) `tiled_apply` runs for an array of `shape`
    (N, C, H, W): 1 when it fits in one tile (one untiled call)."""
    factor = _factor(factor)
    align = _alignment(factor, multiple)
    (th, tw), (oh, ow) = check_tile(tile, overlap, factor, multiple)
    n, _, h, w = shape
    if h <= th and w <= tw:
        return 1
    return n * len(axis_starts(h, th, oh, align)) * len(axis_starts(w, tw, ow, align))


def _ramp(overlap: int, size: int, blend: str) -> np.ndarray:
    """Weights rising from ~0 to 1 over the first `overlap` of `size` pixels, then 1. Never exactly
    0, so every output pixel keeps a positive total weight."""
    w = np.ones(size)
    if overlap > 0:
        t = (np.arange(overlap) + 0.5) / overlap
        w[:overlap] = t if blend == "linear" else np.sin(0.5 * math.pi * t) ** 2
    return w


def _check_out(out, expect: tuple[int, int, int]) -> None:
    if not isinstance(out, np.ndarray) or out.ndim != 4 or (out.shape[0], *out.shape[2:]) != expect:
        raise OutputError(f"tiling: the function returned {_describe(out)}; expected "
                          f"({expect[0]}, C, {expect[1]}, {expect[2]})")


def _each(result, check) -> None:
    for r in (result if isinstance(result, (tuple, list)) else [result]):
        check(r)


def _factor(factor) -> Fraction:
    try:
        f = Fraction(factor).limit_denominator(1 << 16)
    except (TypeError, ValueError):
        raise InputError(f"tiling: factor must be a positive number, got {factor!r}") from None
    if f <= 0:
        raise InputError(f"tiling: factor must be a positive number, got {factor!r}")
    return f


def _alignment(factor: Fraction, multiple) -> int:
    return math.lcm(factor.denominator, _positive_int(multiple, "multiple"))


def _positive_int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise InputError(f"tiling: {what} must be a positive integer, got {v!r}")
    return int(v)


def _pair(v, what: str) -> tuple[int, int]:
    vals = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(vals) != 2 or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in vals):
        raise InputError(f"tiling: {what} must be an int or (height, width) ints, got {v!r}")
    return int(vals[0]), int(vals[1])


def _describe(a) -> str:
    return f"shape {a.shape} {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
