"""Batch inference with Ray Data (`vaeinfer.ray`) on a local Ray instance with 2 CPUs: results of
map_batches with 2 actors equal one single-process runtime call over the whole dataset.

Ray starts once per module (a few seconds); each pipeline starts its own actors.
"""

from __future__ import annotations

import glob
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

import vaeinfer
from tests.conftest import blob_images


def need(module: str):
    """Import an optional dependency; skip without it, except in CI (CI=true), where it must be there."""
    if os.environ.get("CI", "").lower() == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module)


ray = need("ray")
need("pyarrow")
vray = importlib.import_module("vaeinfer.ray")

MODEL = "mnist-vae"  # bundled: no training needed
N = 64


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # .npy results carry no id column: written in input order, they can be compared row by row
    ctx.execution_options.preserve_order = True
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return blob_images(N, (1, 28, 28), seed=11)  # uint8, as images usually are on disk


@pytest.fixture(scope="module")
def reference(images):
    return vaeinfer.load(MODEL, device="cpu", threads=1)


def read_parquet_sorted(folder) -> dict[str, np.ndarray]:
    """Results written as Parquet, read back (with Ray, which knows its tensor columns), sorted by id."""
    batch = ray.data.read_parquet(str(folder)).take_batch(10 * N, batch_format="numpy")
    order = np.argsort(batch["id"])
    return {k: np.asarray(v)[order] for k, v in batch.items()}


def test_vaeinfer_does_not_import_ray():
    code = "import sys, vaeinfer; assert 'ray' not in sys.modules and 'vaeinfer.ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parquet_encode_decode_and_score(local_ray, images, reference, tmp_path):
    """Parquet in (4 files of 16 rows), batches of 12 (so batches straddle files), 2 actors, Parquet out."""
    files = vray.write_images(images, tmp_path / "in", rows_per_file=16)
    assert len(files) == 4
    ds = vray.read_images(str(tmp_path / "in"), override_num_blocks=4)  # a block per file: work for both actors

    coded = vray.map_model(ds, MODEL, "encode", concurrency=2, num_cpus=0.25, batch_size=12)
    decoded = vray.map_model(coded, MODEL, "decode", concurrency=2, num_cpus=0.25, batch_size=12)  # from "mean"
    vray.write(decoded, str(tmp_path / "decoded"))
    scored = vray.map_model(ds, MODEL, "score", concurrency=2, num_cpus=0.25, batch_size=12, samples=8, seed=3)
    vray.write(scored, str(tmp_path / "scores"), columns=["id", "nll", "elbo", "recon"])

    post = reference.encode(images)
    want_images = reference.decode(post.mean)
    want = reference.score(images, samples=8, seed=3)

    got = read_parquet_sorted(tmp_path / "decoded")
    assert list(got["id"]) == list(range(N))
    assert set(got) == {"id", "logvar", "image"}  # mean was decode's input; logvar passed through
    np.testing.assert_allclose(got["logvar"], post.logvar, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["image"], want_images, rtol=1e-5, atol=1e-6)

    scores = read_parquet_sorted(tmp_path / "scores")
    assert list(scores["id"]) == list(range(N))
    for k in ("nll", "elbo", "recon"):
        np.testing.assert_allclose(scores[k], getattr(want, k), rtol=1e-6, err_msg=k)


def test_npy_reconstruct(local_ray, images, reference, tmp_path):
    """.npy files in (2 of 32 rows), .npy files out (one folder per column), in input order."""
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "part-0.npy", images[:32])
    np.save(tmp_path / "in" / "part-1.npy", images[32:])
    ds = vray.read_images(str(tmp_path / "in"))
    rec = vray.map_model(ds, MODEL, "reconstruct", concurrency=2, num_cpus=0.25, batch_size=10)
    vray.write(rec, str(tmp_path / "out"), format="npy")
    parts = sorted(glob.glob(str(tmp_path / "out" / "reconstruction" / "*.npy")))
    got = np.concatenate([np.load(p) for p in parts])
    np.testing.assert_allclose(got, reference.reconstruct(images), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------- BundlePredictor alone (no Ray needed)


def test_predictor_layouts_and_score_offsets(images, reference):
    """Flat rows and per-row object arrays are images too; non-consecutive ids score as globally indexed."""
    x = images.astype(np.float32) / 255
    enc = vray.BundlePredictor(MODEL, "encode")
    flat = enc({"image": x.reshape(N, -1), "label": np.arange(N) % 3})
    rows = enc({"image": np.array([r.reshape(-1) for r in images] + [None], dtype=object)[:-1]})
    want = reference.encode(x)
    np.testing.assert_array_equal(flat["mean"], want.mean)
    np.testing.assert_array_equal(flat["label"], np.arange(N) % 3)  # other columns pass through
    np.testing.assert_array_equal(rows["mean"], reference.encode(images).mean)  # uint8 rows

    score = vray.BundlePredictor(MODEL, "score", samples=4, seed=1)
    whole = reference.score(x, samples=4, seed=1)
    pick = np.array([5, 6, 7, 40, 41, 2])  # three runs of consecutive ids
    s = score({"image": x[pick], "id": pick})
    np.testing.assert_allclose(s["nll"], whole.nll[pick], rtol=1e-6)
    np.testing.assert_array_equal(s["id"], pick)
    with pytest.raises(KeyError, match="id column"):
        score({"image": x[:2]})
    with pytest.raises(ValueError, match="op must be"):
        vray.BundlePredictor(MODEL, "sample")


def test_score_index_offset_matches_one_call(reference, images):
    x = images[:10]
    whole = reference.score(x, samples=3, seed=5)
    tail = reference.score(x[6:], samples=3, seed=5, index_offset=6)
    np.testing.assert_array_equal(tail.nll, whole.nll[6:])
    with pytest.raises(vaeinfer.InputError, match="index_offset"):
        reference.score(x, index_offset=-1)


@pytest.mark.skipif("mnist-vqvae" not in vaeinfer.available_models(), reason="no bundled VQ-VAE in this checkout")
def test_predictor_vq_codes_round_trip(images):
    m = vaeinfer.load("mnist-vqvae", device="cpu", threads=1)
    codes = vray.BundlePredictor("mnist-vqvae", "encode")({"image": images[:8], "id": np.arange(8)})
    assert codes["codes"].dtype == np.int64
    out = vray.BundlePredictor("mnist-vqvae", "decode")({"codes": codes["codes"], "id": np.arange(8)})
    np.testing.assert_array_equal(out["image"], m.decode(m.encode(images[:8]).codes))
    with pytest.raises(ValueError, match="VAE bundles"):
        vray.BundlePredictor("mnist-vqvae", "score")
