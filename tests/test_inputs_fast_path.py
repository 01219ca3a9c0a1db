"""The per-call fast paths (vaeinfer/inputs.py, runtime.check_finite, Graph._check_shapes,
likelihood.mean) keep every guarantee: NaN, Inf, out-of-range values, wrong dtypes and shapes
are still refused, with no numpy warnings and no copies of arrays that need none."""

import warnings

import numpy as np
import pytest

import vaeinfer
from vaeinfer import inputs, likelihood
from vaeinfer.errors import BundleError, InputError, OutputError
from vaeinfer.runtime import check_finite

SHAPE, RANGE = (1, 4, 4), (0.0, 1.0)


@pytest.fixture(autouse=True)
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _image(value=0.5, dtype=np.float32):
    a = np.full((1, *SHAPE), 0.5, dtype)
    a[0, 0, 1, 2] = value
    return a


def test_images_fast_path_returns_the_array_itself():
    a = _image()
    assert inputs.images(a, SHAPE, RANGE) is a
    strided = np.full((1, *SHAPE[:2], 8), 0.5, np.float32)[..., ::2]
    out = inputs.images(strided, SHAPE, RANGE)
    assert out.flags.c_contiguous and out.dtype == np.float32 and np.array_equal(out, strided)


@pytest.mark.parametrize("value, match", [(np.nan, "NaN/Inf"), (np.inf, "NaN/Inf"), (-np.inf, "NaN/Inf"),
                                          (1.5, r"values in \[0.0, 1.0\]"), (-0.01, r"values in \[0.0, 1.0\]")])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_images_refuse_nan_inf_and_out_of_range(value, match, dtype):
    with pytest.raises(InputError, match=match):
        inputs.images(_image(value, dtype), SHAPE, RANGE)


@pytest.mark.parametrize("bad", [np.zeros((1, *SHAPE), np.int32), np.zeros((1, *SHAPE), bool),
                                 np.zeros((1, *SHAPE), np.complex64), np.zeros((1, *SHAPE), ">f4")])
def test_images_refuse_other_dtypes(bad):
    with pytest.raises(InputError, match="dtype"):
        inputs.images(bad, SHAPE, RANGE)


@pytest.mark.parametrize("shape", [(1, 1, 4), (1, 4, 4), (2, 1, 4, 5), (1, 1, 1, 4, 4), ()])
def test_images_refuse_wrong_shapes(shape):
    with pytest.raises(InputError, match="expected shape"):
        inputs.images(np.zeros(shape, np.float32), SHAPE, RANGE)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 3e38])
def test_latents_refuse_non_finite(value):
    z = np.zeros((2, 3), np.float32)
    z[1, 2] = value
    if np.isfinite(value):  # huge but finite: accepted
        assert inputs.latents(z, 3) is z
    else:
        with pytest.raises(InputError, match="1 NaN/Inf"):
            inputs.latents(z, 3)


def test_latents_refuse_float64_beyond_float32():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns about the overflowing cast itself
        with pytest.raises(InputError, match="NaN/Inf"):
            inputs.latents(np.full((1, 3), 1e300), 3)
    with pytest.raises(InputError, match="float16/32/64"):
        inputs.latents(np.zeros((1, 3), np.int64), 3)


def test_codes_fast_path_and_refusals():
    c = np.zeros((1, 2, 2), np.int64)
    assert inputs.codes(c, (2, 2), 4) is c
    assert inputs.codes(c.astype(np.uint8), (2, 2), 4).dtype == np.int64
    for bad, match in ((np.full((1, 2, 2), 4), r"\[0, 4\)"), (np.full((1, 2, 2), -1), r"\[0, 4\)"),
                       (np.zeros((1, 2, 2), bool), "integer"), (np.zeros((1, 2, 2), np.float32), "integer")):
        with pytest.raises(InputError, match=match):
            inputs.codes(bad, (2, 2), 4)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 32, 1 << 16, (1 << 16) + 1])
def test_check_finite_every_path(dtype, size):
    big = np.finfo(dtype).max
    check_finite(np.full(size, big, dtype), "big but finite")  # a sum would overflow
    check_finite(np.full(size, -big, dtype), "big but finite")
    for value in (np.nan, np.inf, -np.inf):
        a = np.zeros(size, dtype)
        a[-1] = value
        with pytest.raises(OutputError, match=f"1 of {size} values"):
            check_finite(a, "out")
    a = np.zeros(size, dtype)
    a[0], a[-1] = np.inf, -np.inf  # inf - inf: NaN, still refused
    with pytest.raises(OutputError):
        check_finite(a, "out")


def test_sigmoid_without_warnings_matches_the_exact_one():
    logits = np.array([-1e30, -1000, -89, -88, -20, -1, 0, 1, 20, 88, 1000, 1e30], np.float32)
    got = likelihood.mean(logits, {"kind": "bernoulli"}, (0.0, 1.0))
    want = np.exp(-np.logaddexp(0.0, -logits.astype(np.float64)))
    assert got.dtype == np.float32 and np.all((0 <= got) & (got <= 1))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)
    params = np.array([-2.0, 0.25, 7.0], np.float32)
    np.testing.assert_array_equal(likelihood.mean(params, {"kind": "gaussian", "scale": 0.1}, (0.0, 1.0)),
                                  np.clip(params, 0.0, 1.0))


def test_bundled_model_refuses_through_the_fast_path():
    m = vaeinfer.load("mnist-vae", device="cpu", threads=1)
    x = np.full((1, *m.manifest.image), 0.5, np.float32)
    assert m.encode(x).mean.shape == (1, m.latent_dim)
    for value in (np.nan, np.inf, 2.0):
        bad = x.copy()
        bad[0, 0, 3, 3] = value
        with pytest.raises(InputError):
            m.encode(bad)
    with pytest.raises(InputError, match="dtype"):
        m.encode(x.astype(np.int16))
    with pytest.raises(OutputError, match="NaN/Inf"):
        m.decode(np.full((1, m.latent_dim), 3e38, np.float32))


def test_output_shape_check_still_refuses():
    g = vaeinfer.load("mnist-vae", device="cpu", threads=1).graph("decoder")
    good = g.run({"z": np.zeros((1, g.spec.inputs[0].shape[1]), np.float32)})
    g._check_shapes(good, 1)
    for outs, rows in (([good[0]], 2), ([good[0][:, :, :, :5]], 1), ([good[0][0]], 1), ([good[0][..., None]], 1)):
        with pytest.raises(BundleError, match="came out with shape"):
            g._check_shapes(outs, rows)


def test_images_range_is_exact_at_the_edges():
    """The range check is exact at its edges: -0.0 and hi are in, the next float32 beyond is out."""
    one = np.float32(1.0)
    for value, ok in ((0.0, True), (-0.0, True), (1.0, True), (np.nextafter(one, np.float32(2)), False),
                      (-np.float32(1e-45), False), (np.float32(1e-45), True), (np.nan, False), (-np.nan, False)):
        a = _image(value)
        if ok:
            assert inputs.images(a, SHAPE, RANGE) is a
        else:
            with pytest.raises(InputError):
                inputs.images(a, SHAPE, RANGE)
    hi = 0.1  # not a float32: the largest float32 <= 0.1 is allowed, the next one up is not
    below = np.float32(hi) if float(np.float32(hi)) <= hi else np.nextafter(np.float32(hi), np.float32(0))
    inputs.images(_image(0.0) * 0 + below, SHAPE, (0.0, hi))
    with pytest.raises(InputError):
        inputs.images(_image(0.0) * 0 + np.nextafter(below, np.float32(1)), SHAPE, (0.0, hi))
    with pytest.raises(InputError, match=r"\[-1.0, 1.0\]"):
        inputs.images(_image(1.5), SHAPE, (-1.0, 1.0))
    assert inputs.images(_image(-0.5), SHAPE, (-1.0, 1.0)).min() == -0.5


def test_codes_one_pass_refuses_negative_int64():
    for value in (-1, np.iinfo(np.int64).min, 4, np.iinfo(np.int64).max):
        c = np.zeros((1, 2, 2), np.int64)
        c[0, 1, 1] = value
        with pytest.raises(InputError, match=r"\[0, 4\)"):
            inputs.codes(c, (2, 2), 4)
    strided = np.zeros((1, 2, 4), np.int64)[..., ::2]
    assert inputs.codes(strided, (2, 2), 4).flags.c_contiguous
