"""The runtime: determinism, input validation, devices, thread safety."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import vaeinfer
from vaeinfer import BackendError, InputError


@pytest.fixture(scope="module")
def vae(zoo):
    return vaeinfer.load(zoo.get("conv").bundle, device="cpu", threads=1)


@pytest.fixture(scope="module")
def images(zoo):
    return zoo.get("conv").images


# ---- determinism ----------------------------------------------------------------------------------------


def test_same_seed_bit_identical(vae, zoo):
    a = vae.sample(9, seed=7)
    np.testing.assert_array_equal(a, vae.sample(9, seed=7))
    other = vaeinfer.load(zoo.get("conv").bundle, device="cpu", threads=1)  # a separately loaded model
    np.testing.assert_array_equal(a, other.sample(9, seed=7))


def test_different_seeds_differ(vae):
    assert not np.array_equal(vae.sample(4, seed=0), vae.sample(4, seed=1))


def test_seed_none_is_random(vae):
    assert not np.array_equal(vae.sample(4), vae.sample(4))


@pytest.mark.parametrize("batch_size", [1, 3, 7, 50])
def test_sample_independent_of_batch_size(vae, batch_size):
    np.testing.assert_array_equal(vae.sample(11, seed=2, batch_size=batch_size), vae.sample(11, seed=2))


def test_sample_progress(vae):
    seen = []
    vae.sample(10, seed=0, batch_size=4, progress=seen.append)
    assert seen == [4, 8, 10]


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_score_independent_of_batch_size(vae, images, batch_size):
    x = images[:6]
    a = vae.score(x, samples=8, seed=4)
    b = vae.score(x, samples=8, seed=4, batch_size=batch_size)
    for name in ("nll", "elbo", "recon"):
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name))


def test_score_seeds(vae, images):
    x = images[:3]
    np.testing.assert_array_equal(vae.score(x, samples=8, seed=1).nll, vae.score(x, samples=8, seed=1).nll)
    assert not np.array_equal(vae.score(x, samples=8, seed=1).nll, vae.score(x, samples=8, seed=2).nll)


def test_score_one_sample_is_the_elbo(vae, images):
    s = vae.score(images[:4], samples=1)
    np.testing.assert_allclose(s.nll, s.elbo, rtol=1e-12)
    many = vae.score(images[:4], samples=64)
    assert (many.nll <= many.elbo).all()


def test_encode_decode_deterministic(vae, images):
    post = vae.encode(images[:5])
    np.testing.assert_array_equal(post.mean, vae.encode(images[:5]).mean)
    np.testing.assert_array_equal(vae.encode(images[:5], batch_size=2).mean, post.mean)
    np.testing.assert_array_equal(vae.decode(post.mean), vae.decode(post.mean))


# ---- input validation -----------------------------------------------------------------------------------


def _raises(call, *fragments):
    with pytest.raises(InputError) as info:
        call()
    assert isinstance(info.value, ValueError)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    return info.value


def test_input_error_is_value_error():
    assert issubclass(InputError, ValueError) and issubclass(InputError, vaeinfer.VaeinferError)


def test_image_shape_errors(vae):
    good = np.zeros((2, 3, 13, 17), np.float32)
    _raises(lambda: vae.encode(good[0]), "(N, 3, 13, 17)", "(3, 13, 17)")  # rank 3
    _raises(lambda: vae.encode(good[None]), "(N, 3, 13, 17)", "(1, 2, 3, 13, 17)")  # rank 5
    _raises(lambda: vae.encode(good[:, :1]), "(N, 3, 13, 17)", "(2, 1, 13, 17)")  # channels
    _raises(lambda: vae.encode(np.zeros((2, 3, 17, 13), np.float32)), "(N, 3, 13, 17)", "(2, 3, 17, 13)")  # size
    _raises(lambda: vae.encode(np.zeros((2, 13, 17, 3), np.float32)), "(N, 3, 13, 17)", "(2, 13, 17, 3)")  # NHWC
    _raises(lambda: vae.encode(good[:0]), "at least one", "batch of 0")
    _raises(lambda: vae.reconstruct(good[:, :, :12]), "(N, 3, 13, 17)")
    _raises(lambda: vae.score(good[:, :1]), "(N, 3, 13, 17)")


def test_image_dtype_and_value_errors(vae):
    shape = (2, 3, 13, 17)
    _raises(lambda: vae.encode(np.zeros(shape, np.int32)), "uint8, float16, float32 or float64", "int32")
    _raises(lambda: vae.encode(np.zeros(shape, bool)), "bool")
    nan = np.zeros(shape, np.float32)
    nan[1, 2, 3, 4] = np.nan
    _raises(lambda: vae.encode(nan), "finite", "1 NaN/Inf")
    inf = np.zeros(shape, np.float64)
    inf[0, 0, 0, :3] = np.inf
    _raises(lambda: vae.encode(inf), "finite", "3 NaN/Inf")
    _raises(lambda: vae.encode(np.full(shape, 1.5, np.float32)), "[0.0, 1.0]", "1.5")
    _raises(lambda: vae.encode(np.full(shape, 255.0)), "[0.0, 1.0]", "255")  # 0..255 floats are out of range
    _raises(lambda: vae.encode(np.full(shape, -0.1, np.float32)), "[0.0, 1.0]", "-0.1")
    _raises(lambda: vae.encode("not an image"), "expected")
    _raises(lambda: vae.encode([[1, "a"]]), "expected")


def test_uint8_and_other_floats_accepted(vae, images):
    x = images[:3]
    u8 = np.round(x * 255).astype(np.uint8)
    ref = vae.encode(u8.astype(np.float32) / 255.0).mean
    np.testing.assert_allclose(vae.encode(u8).mean, ref, atol=1e-6)
    np.testing.assert_allclose(vae.encode(x.astype(np.float64)).mean, vae.encode(x).mean, atol=1e-6)
    np.testing.assert_allclose(vae.encode(x.astype(np.float16)).mean, vae.encode(x).mean, atol=1e-2)
    np.testing.assert_array_equal(vae.encode(x.tolist()).mean, vae.encode(x).mean)  # nested lists
    np.testing.assert_array_equal(vae.encode(np.asfortranarray(x)).mean, vae.encode(x).mean)
    strided = np.repeat(x, 2, axis=3)[..., ::2]  # a non-contiguous view of the same values
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(vae.encode(strided).mean, vae.encode(x).mean)


def test_latent_errors(vae):
    _raises(lambda: vae.decode(np.zeros((2, 5), np.float32)), "latent size 4", "got 5")
    _raises(lambda: vae.decode(np.zeros(4, np.float32)), "(N, 4)", "(4,)")
    _raises(lambda: vae.decode(np.zeros((0, 4), np.float32)), "batch of 0")
    _raises(lambda: vae.decode(np.zeros((2, 4), np.int64)), "float", "int64")
    _raises(lambda: vae.decode(np.full((2, 4), np.nan, np.float32)), "finite")
    assert vae.decode(np.zeros((2, 4), np.float64)).shape == (2, 3, 13, 17)


def test_non_finite_output_refused(vae):
    """Latents far outside the prior overflow the decoder: an OutputError, and no numpy warnings."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(vaeinfer.OutputError, match="NaN/Inf"):
            vae.decode(np.full((2, 4), 3e38, np.float32))
        from vaeinfer.runtime import check_finite

        check_finite(np.full(8, 3e38, np.float32), "big but finite")  # the sum overflows; the values do not


def test_call_argument_errors(vae, images):
    _raises(lambda: vae.sample(0), "positive integer", "0")
    _raises(lambda: vae.sample(-3), "positive integer")
    _raises(lambda: vae.sample(2.0), "positive integer")
    _raises(lambda: vae.sample(2, seed=-1), "non-negative", "-1")
    _raises(lambda: vae.sample(2, seed=1.5), "seed")
    _raises(lambda: vae.sample(2, temperature=0), "temperature", "> 0")
    _raises(lambda: vae.sample(2, temperature=float("nan")), "temperature")
    _raises(lambda: vae.sample(2, batch_size=0), "batch_size")
    _raises(lambda: vae.score(images[:2], samples=0), "samples")
    _raises(lambda: vae.interpolate(images[:2], images[:3]), "as many images", "2", "3")
    _raises(lambda: vae.interpolate(images[:2], images[2:4], steps=0), "steps")


# ---- devices --------------------------------------------------------------------------------------------


def test_cuda_without_provider_is_backend_error(zoo):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    for device in ("cuda", "cuda:0", "cuda:1", "CUDA"):
        with pytest.raises(BackendError, match="CUDA"):
            vaeinfer.load(zoo.get("mlp").bundle, device=device)


def test_auto_device_is_cpu_here(zoo):
    import onnxruntime

    vae = vaeinfer.load(zoo.get("mlp").bundle, device="auto")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert vae.info.device == "cpu" and vae.info.providers == ("CPUExecutionProvider",)
        assert "cpu" in repr(vae)
    assert vaeinfer.load(zoo.get("mlp").bundle).info.device == vae.info.device  # auto is the default


@pytest.mark.parametrize("device", ["gpu", "cpu:0", "cuda:", "cuda:x", "", "tpu", "auto:1"])
def test_bad_device_string(zoo, device):
    with pytest.raises(ValueError, match="device"):
        vaeinfer.load(zoo.get("mlp").bundle, device=device)


def test_bad_threads_and_precision(zoo):
    with pytest.raises(ValueError, match="threads"):
        vaeinfer.load(zoo.get("mlp").bundle, device="cpu", threads=0)
    with pytest.raises(ValueError, match="precision"):
        vaeinfer.load(zoo.get("mlp").bundle, device="cpu", precision="fp8")
    with pytest.raises(vaeinfer.BundleError, match="fp16"):
        vaeinfer.load(zoo.get("mlp").bundle, device="cpu", precision="fp16")  # exported without variants


# ---- threads --------------------------------------------------------------------------------------------


def test_thread_safety(zoo):
    """One model, 8 threads, mixed calls: every result equals the sequential one."""
    t = zoo.get("conv")
    vae = vaeinfer.load(t.bundle, device="cpu", threads=1)
    x = t.images

    def work(i):
        return (vae.sample(5, seed=i), vae.encode(x[i:i + 4]).mean, vae.reconstruct(x[i:i + 3]),
                vae.score(x[i:i + 2], samples=4, seed=i).nll)

    expected = [work(i) for i in range(16)]
    barrier = threading.Barrier(8)

    def threaded(i):
        if i < 8:
            barrier.wait()  # start together
        return work(i)

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(threaded, range(16)))
    for e, g in zip(expected, got):
        for a, b in zip(e, g):
            np.testing.assert_array_equal(a, b)
