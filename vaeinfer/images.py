"""Image and array files: PNG/JPEG/WebP grids out, PNG/JPEG or .npy/.npz in. Pillow and numpy only."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from vaeinfer._fs import atomic_path
from vaeinfer.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _writable(suffixes: tuple[str, ...]) -> tuple[str, ...]:
    """The suffixes whose format this Pillow build can write (WebP needs libwebp)."""
    Image.init()
    return tuple(s for s in suffixes if Image.registered_extensions().get(s) in Image.SAVE)


# grids can be written in these; lossy formats get a high quality (digits have sharp edges)
GRID_SUFFIXES = _writable((".png", ".jpg", ".jpeg", ".webp"))
SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}}


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> one uint8 (H', W') or (H', W', 3) tiled image, white padding."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    canvas = np.ones((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), np.float32)
    for i, img in enumerate(images):
        r, k = divmod(i, nrow)
        canvas[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img
    out = to_uint8(canvas)
    return out[0] if c == 1 else out.transpose(1, 2, 0)


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None) -> Path:
    """Write images (N, C, H, W) in [0, 1] as one grid, atomically: PNG, or JPEG/WebP by the
    suffix (see GRID_SUFFIXES)."""
    path = Path(path)
    fmt = grid_format(path)
    with atomic_path(path) as tmp:
        Image.fromarray(grid(np.asarray(images, np.float32), nrow)).save(tmp, format=fmt, **SAVE_OPTIONS.get(fmt, {}))
    return path


def grid_format(path: str | Path) -> str:
    """Pillow's format name for a grid file name, or InputError for a suffix it cannot write."""
    suffix = Path(path).suffix.lower()
    if suffix not in GRID_SUFFIXES:
        raise InputError(f"{path}: expected an image file ending in {' or '.join(GRID_SUFFIXES)}")
    return Image.registered_extensions()[suffix]


def save_arrays(path: str | Path, **arrays: np.ndarray) -> Path:
    """.npz with the named arrays, or .npy with the single one, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            if path.suffix == ".npy":
                (only,) = arrays.values()
                np.save(f, only)
            else:
                np.savez(f, **arrays)
    return path


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a .npy (as {'arr_0': ...}) or .npz file, never unpickling anything."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            return {"arr_0": np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: expected a readable .npy/.npz file of numeric arrays ({e})") from e


def load_images(paths: list[str | Path], channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """Image files -> float32 (N, C, H, W) in [0, 1]; each must already be H x W (size None: any
    size, the first file's for all)."""
    out = []
    for p in paths:
        out.append(read_image(p, channels, size, str(p)).astype(np.float32) / 255.0)
        size = size or out[0].shape[1:]
    return np.stack(out)


def read_image(source, channels: int, size: tuple[int, int] | None, what: str) -> np.ndarray:
    """One image (a path or a binary file object) -> uint8 (C, H, W); it must already be H x W
    (None: any size). The size is checked before any pixel is decoded (a small file can hold a
    huge image)."""
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    try:
        with Image.open(source) as im:
            if size is not None and (im.height, im.width) != tuple(size):
                raise InputError(f"{what}: expected an image of {size[0]}x{size[1]} pixels, got {im.height}x{im.width}")
            a = np.asarray(im.convert(mode), np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{what}: expected an image file ({e})") from e
    return a[None] if channels == 1 else a.transpose(2, 0, 1)
