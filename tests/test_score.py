"""score(): the IWAE estimate from the exported graphs, checked against exact math and PyTorch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import vaeinfer
from vaeinfer.export import export_vae
from vaeinfer.training.evaluate import iwae_score
from vaeinfer.training.likelihood import Likelihood
from vaeinfer.training.models import build_model

SIGMA = 0.3


class ExactPosterior(nn.Module):
    """q(z|x) = p(z|x) for the linear Gaussian decoder below (W has orthogonal columns)."""

    def __init__(self, w, b):
        super().__init__()
        cov = torch.linalg.inv(torch.eye(w.shape[1]) + w.T @ w / SIGMA**2)
        assert torch.allclose(cov, torch.diag(torch.diagonal(cov)), atol=1e-6)
        self.register_buffer("proj", cov @ w.T / SIGMA**2)
        self.register_buffer("b", b)
        self.register_buffer("logvar", torch.log(torch.diagonal(cov)))

    def forward(self, x):
        mean = (x.flatten(1) - self.b) @ self.proj.T
        return mean, self.logvar.expand_as(mean) + 0.0 * mean


class LinearDecoder(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.register_buffer("w", w)
        self.register_buffer("b", b)

    def forward(self, z):
        return (z @ self.w.T + self.b).reshape(-1, 1, 2, 2)


@pytest.fixture(scope="module")
def linear_gaussian(tmp_path_factory):
    q, _ = torch.linalg.qr(torch.randn(4, 2, generator=torch.Generator().manual_seed(0)))
    w = q * torch.tensor([0.4, 0.2])  # orthogonal columns: a diagonal exact posterior
    b = torch.full((4,), 0.5)
    out = export_vae(ExactPosterior(w, b), LinearDecoder(w, b), (1, 2, 2), tmp_path_factory.mktemp("lg") / "b",
                     likelihood="gaussian", scale=SIGMA)
    return vaeinfer.load(out, device="cpu", threads=1), w.double().numpy(), b.double().numpy()


def test_iwae_equals_exact_log_likelihood_when_q_is_the_posterior(linear_gaussian):
    model, w, b = linear_gaussian
    x = np.random.default_rng(1).random((5, 1, 2, 2), dtype=np.float32)
    cov = w @ w.T + SIGMA**2 * np.eye(4)
    d = x.reshape(5, 4) - b
    exact = 0.5 * (np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d) + np.linalg.slogdet(cov)[1] + 4 * math.log(2 * math.pi))
    s = model.score(x, samples=7, seed=3)
    np.testing.assert_allclose(s.nll, exact, atol=1e-3)
    np.testing.assert_allclose(s.elbo, exact, atol=1e-3)  # every weight is p(x): no gap
    assert s.nll.dtype == np.float64 and s.nll.shape == (5,)


@pytest.fixture(scope="module")
def tiny_conv(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("conv-vae", (1, 12, 10), Likelihood("bernoulli"), latent_dim=4, channels=[4, 8])
    with torch.no_grad():  # untrained weights give a spread of posteriors wide enough to matter
        for p in model.parameters():
            p.mul_(1.5)
    out = export_vae(model.encoder, model.decoder, (1, 12, 10), tmp_path_factory.mktemp("conv") / "b")
    return model, vaeinfer.load(out, device="cpu", threads=1)


def test_onnx_score_agrees_with_pytorch_within_a_tenth_of_a_nat(tiny_conv):
    model, runtime = tiny_conv
    x = (np.random.default_rng(0).random((6, 1, 12, 10)) < 0.3).astype(np.float32)
    onnx = runtime.score(x, samples=64, seed=5)
    ref = iwae_score(model, x, samples=64, seed=5)
    for key in ("nll", "elbo", "recon"):
        assert np.max(np.abs(getattr(onnx, key) - ref[key])) < 0.1, key


def test_score_is_a_bound_ordered_and_independent_of_batching(tiny_conv):
    _, runtime = tiny_conv
    x = (np.random.default_rng(2).random((9, 1, 12, 10)) < 0.5).astype(np.float32)
    a = runtime.score(x, samples=20, seed=1, batch_size=7)
    b = runtime.score(x, samples=20, seed=1, batch_size=1000)
    np.testing.assert_array_equal(a.nll, b.nll)
    assert np.all(a.nll <= a.elbo + 1e-9)  # log mean exp >= mean log (Jensen), sample by sample
    assert np.all(a.recon > 0)
    c = runtime.score(x, samples=20, seed=2)
    assert not np.array_equal(a.nll, c.nll)


def test_score_refuses_bad_arguments(tiny_conv):
    _, runtime = tiny_conv
    x = np.zeros((2, 1, 12, 10), np.float32)
    for kwargs in ({"samples": 0}, {"samples": 2.5}, {"seed": -1}, {"batch_size": 0}):
        with pytest.raises(vaeinfer.InputError):
            runtime.score(x, **kwargs)


def test_an_overflowing_posterior_is_the_models_fault_not_the_callers(tmp_path):
    class HugeLogvar(nn.Module):
        def forward(self, x):
            mean = x.flatten(1)[:, :2] * 0
            return mean, mean + 1000.0  # std = exp(500): finite logvar, infinite samples

    out = export_vae(HugeLogvar(), LinearDecoder(torch.eye(4, 2), torch.zeros(4)), (1, 2, 2), tmp_path / "b",
                     likelihood="gaussian", scale=SIGMA)
    with pytest.raises(vaeinfer.OutputError, match="posterior"):
        vaeinfer.load(out, device="cpu").score(np.zeros((1, 1, 2, 2), np.float32), samples=2)
