"""train -> export -> vaeinfer.load -> every runtime call, for MLP and conv VAEs, 1 and 3 channels,
non-square and odd image sizes, Bernoulli and Gaussian likelihoods."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vaeinfer
from tests.conftest import CASES
from vaeinfer.results import Posterior, Score


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip(zoo, name):
    t = zoo.get(name)
    case = t.case
    vae = vaeinfer.load(t.bundle, device="cpu", threads=1)
    c, h, w = case.shape
    latent = case.model_args["latent_dim"]

    info = vae.info
    assert info.kind == "vae" and info.image_shape == case.shape and info.latent == {"dim": latent}
    assert info.device == "cpu" and info.providers == ("CPUExecutionProvider",)
    assert info.name == f"tiny-{name}" and info.value_range == (0.0, 1.0)
    if case.likelihood == "gaussian":
        assert info.likelihood == {"kind": "gaussian", "scale": pytest.approx(0.2)}
        assert json.loads((t.bundle / "manifest.json").read_text())["likelihood"] == {"kind": "gaussian", "scale": 0.2}
    else:
        assert info.likelihood == {"kind": "bernoulli"}

    imgs = vae.sample(5, seed=3)
    assert imgs.shape == (5, c, h, w) and imgs.dtype == np.float32
    assert imgs.min() >= 0.0 and imgs.max() <= 1.0 and np.isfinite(imgs).all()
    assert vae.sample(5, seed=3, temperature=0.5).shape == (5, c, h, w)

    x = t.images[:6]
    post = vae.encode(x)
    assert isinstance(post, Posterior) and len(post) == 6
    assert post.mean.shape == post.logvar.shape == (6, latent) and post.mean.dtype == np.float32
    z = post.sample(seed=1)
    assert z.shape == (6, latent) and z.dtype == np.float32
    np.testing.assert_array_equal(z, post.sample(seed=1))

    dec = vae.decode(post)  # a Posterior decodes its means
    np.testing.assert_array_equal(dec, vae.decode(post.mean))
    assert dec.shape == (6, c, h, w) and dec.min() >= 0.0 and dec.max() <= 1.0
    params = vae.decode_params(z)
    assert params.shape == (6, c, h, w) and params.dtype == np.float32

    rec = vae.reconstruct(x)
    np.testing.assert_array_equal(rec, dec)

    path = vae.interpolate(x[:2], x[2:4], steps=4)
    assert path.shape == (2, 4, c, h, w)
    np.testing.assert_allclose(path[:, 0], rec[:2], atol=1e-6)
    np.testing.assert_allclose(path[:, -1], rec[2:4], atol=1e-6)

    s = vae.score(x, samples=8)
    assert isinstance(s, Score)
    for a in (s.nll, s.elbo, s.recon):
        assert a.shape == (6,) and a.dtype == np.float64 and np.isfinite(a).all()
    assert (s.nll <= s.elbo + 1e-9).all()  # the IWAE bound is tighter than the ELBO
    # uint8 images mean the same as their float equivalents
    u8 = np.round(x * 255).astype(np.uint8)
    np.testing.assert_allclose(vae.encode(u8).mean, post.mean, atol=1e-5)


def test_training_improves_over_init(mlp):
    """A handful of steps on tiny data already lowers the loss (the loop really trains)."""
    rows = [json.loads(line) for line in (mlp.run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert "val_elbo" in rows[-1]


def test_score_matches_torch_elbo_scale(conv):
    """The runtime's negative ELBO is close to the one the training loop reports (same nats scale)."""
    vae = vaeinfer.load(conv.bundle, device="cpu", threads=1)
    s = vae.score(conv.images, samples=16)
    rows = [json.loads(line) for line in (conv.run / "metrics.jsonl").read_text().splitlines()]
    # val_elbo is on the validation split, we score everything; a loose match is what this guards
    assert abs(s.elbo.mean() + rows[-1]["val_elbo"]) < 0.1 * abs(rows[-1]["val_elbo"])


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 5, 7), (3, 13, 17), (1, 28, 28), (3, 33, 9), (1, 2, 31)])
@pytest.mark.parametrize("channels", [[4], [4, 8], [4, 4, 8]])
def test_conv_vae_any_size(shape, channels):
    """ConvDecoder's final crop makes any H x W exact, also odd and non-square ones."""
    from vaeinfer.training.likelihood import Likelihood
    from vaeinfer.training.models import build_model

    torch.manual_seed(0)
    model = build_model("conv-vae", shape, Likelihood(), latent_dim=3, channels=channels, blocks=1)
    x = torch.rand(2, *shape)
    mean, logvar = model.encoder(x)
    assert mean.shape == logvar.shape == (2, 3)
    assert model.decoder(mean).shape == (2, *shape)
    losses = model.loss(x, x, beta=1.0, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("kind,scale", [("bernoulli", None), ("gaussian", 0.3), ("laplace", 0.2)])
def test_runtime_likelihood_equals_training_likelihood(kind, scale):
    """vaeinfer.likelihood (numpy) computes the same log p(x|z) and image as training.likelihood (torch)."""
    from vaeinfer.training.likelihood import Likelihood
    from vaeinfer import likelihood as lik

    rng = np.random.default_rng(0)
    x = rng.random((4, 1, 5, 6)).astype(np.float32)
    x[0] = x[0] > 0.5
    params = (rng.standard_normal((4, 1, 5, 6)) * 30).astype(np.float32)  # confident logits too
    if kind != "bernoulli":
        params = rng.random((4, 1, 5, 6)).astype(np.float32) * 1.4 - 0.2
    torch_lik = Likelihood(kind, scale)
    expected = torch_lik.log_prob(torch.from_numpy(x).double(), torch.from_numpy(params).double()).numpy()
    actual = lik.log_prob(x, params, torch_lik.to_json())
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(lik.mean(params, torch_lik.to_json(), (0.0, 1.0)),
                               torch_lik.mean(torch.from_numpy(params)).numpy(), atol=1e-7)
