"""One loaded model shared by 16 threads: mixed calls give exactly the results of the same calls
made one after another, with no error and no memory growth (the long run is benchmarks.stress.soak,
its figures in benchmarks/results/soak.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

import vaeinfer
from benchmarks.stress import soak as soak_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def soak():
    return soak_module


@pytest.mark.parametrize("ort_threads", [1, 2])
def test_vae_shared_by_16_threads(soak, conv, ort_threads):
    model = vaeinfer.load(conv.bundle, device="cpu", threads=ort_threads)
    calls = soak.make_calls(model, 60, seed=ort_threads, max_batch=16)
    assert {c[0] for c in calls} == {"sample", "encode", "decode", "reconstruct", "score", "interpolate"}
    result = soak.soak(model, calls, total=1000, threads=16, seed=1)
    assert result["calls"] == 1000 and result["warmup_problems"] == 0
    assert result["errors"] == {} and result["mismatches"] == 0
    if result["rss_after_warmup_mib"]:
        assert result["rss_growth"] <= 0.10, result["rss_samples_mib"]


def test_vqvae_shared_by_16_threads(soak):
    model = vaeinfer.load(ROOT / "tests" / "data" / "fuzz-seeds" / "vq", device="cpu", threads=2)
    calls = soak.make_calls(model, 40, seed=3, max_batch=8)
    assert {c[0] for c in calls} == {"encode", "decode", "reconstruct", "sample", "prior_nll"}
    result = soak.soak(model, calls, total=600, threads=16, seed=2)
    assert result["errors"] == {} and result["mismatches"] == 0 and result["warmup_problems"] == 0


def test_errors_in_some_threads_do_not_disturb_others(soak, mlp):
    """Bad calls raise their typed error in their own thread; the good ones still match."""
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor

    model = vaeinfer.load(mlp.bundle, device="cpu", threads=2)
    good = model.sample(8, seed=5)

    def call(i):
        if i % 3 == 0:
            with pytest.raises(vaeinfer.InputError):
                model.decode(np.full((4, model.latent_dim), np.nan, np.float32))
            return True
        return np.array_equal(model.sample(8, seed=5), good)

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(call, range(300)))
