"""Training on the importance-weighted bound (`--iwae-samples K`, Burda et al. 2015): the loss
against an independent computation, its exactness with an exact posterior, its place between
the ELBO and log p(x), training and resume, data-parallel training, and the refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import distributions as D

from tests.conftest import CASES, blob_images, write_npz
from tests.test_distributed import VAE as DDP_VAE, compare, single_process, torchrun
from tests.test_latent_prior import ExactPosteriorUnderPrior
from tests.test_score import SIGMA, LinearDecoder
from vaeinfer.training import checkpoint
from vaeinfer.training.likelihood import Likelihood
from vaeinfer.training.models import VAE, build_model
from vaeinfer.training.latent_prior import warm_start
from vaeinfer.training.train import TrainConfig, train


def _model(prior: str = "normal"):
    torch.manual_seed(0)
    model = build_model("mlp-vae", (1, 6, 5), Likelihood("bernoulli"), latent_dim=3, hidden=[8],
                        prior=prior, prior_components=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    return model


@pytest.mark.parametrize("prior", ["normal", "vamp", "mog"])
def test_the_iwae_loss_is_the_log_mean_of_the_importance_weights(prior):
    model = _model(prior)
    g = torch.Generator().manual_seed(1)
    x = torch.bernoulli(torch.rand((5, 1, 6, 5), generator=g), generator=g)
    eps = torch.randn((5, 7, 3), generator=g)
    got = model.loss(x, x, beta=1.0, eps=eps, samples=7)
    with torch.no_grad():  # an independent computation through torch.distributions
        mean, logvar = model.encoder(x)
        q = D.Independent(D.Normal(mean[:, None], torch.exp(0.5 * logvar)[:, None]), 1)
        z = mean[:, None] + torch.exp(0.5 * logvar)[:, None] * eps
        if prior == "normal":
            log_p = D.Independent(D.Normal(torch.zeros(3), torch.ones(3)), 1).log_prob(z)
        else:
            log_w, means, logvars = model.prior.mixture(model.encoder)
            comp = D.Independent(D.Normal(means, torch.exp(0.5 * logvars)), 1)
            log_p = D.MixtureSameFamily(D.Categorical(logits=log_w), comp).log_prob(z)
        logits = model.decoder(z.reshape(-1, 3)).reshape(5, 7, -1)
        log_px = D.Independent(D.Bernoulli(logits=logits), 1).log_prob(x.reshape(5, 1, -1).expand(5, 7, -1))
        log_w = log_px + log_p - q.log_prob(z)
        bound = torch.logsumexp(log_w, 1) - math.log(7)
    torch.testing.assert_close(got["loss"], -bound.mean(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got["recon"], -log_px.mean(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got["kl"], (q.log_prob(z) - log_p).mean(), rtol=1e-5, atol=1e-4)
    # K = 1 is the ELBO of the same noise (the MC form; with the normal prior the closed-form KL)
    if prior != "normal":
        torch.testing.assert_close(model.loss(x, x, beta=1.0, eps=eps[:, 0])["loss"], -log_w[:, 0].mean(),
                                   rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(model._iwae_loss(x, x, 1.0, None, eps[:, :1], 1)["loss"],
                               -log_w[:, 0].mean(), rtol=1e-5, atol=1e-4)


def test_the_bound_is_exact_with_an_exact_posterior():
    """q(z|x) = p(z|x) (linear Gaussian decoder, prior N(m, diag s2)): every weight is p(x)."""
    q, _ = torch.linalg.qr(torch.randn(4, 2, generator=torch.Generator().manual_seed(0)))
    w, b = q * torch.tensor([0.4, 0.2]), torch.full((4,), 0.5)
    m, s2 = torch.tensor([0.7, -1.2]), torch.tensor([0.5, 2.0])
    model = VAE(ExactPosteriorUnderPrior(w, b, m, s2), LinearDecoder(w, b), Likelihood("gaussian", SIGMA),
                (1, 2, 2), prior="mog", prior_components=1)
    with torch.no_grad():
        model.prior.means.copy_(m[None])
        model.prior.logvars.copy_(torch.log(s2)[None])
    x = torch.rand((6, 1, 2, 2), generator=torch.Generator().manual_seed(1))
    cov = w @ torch.diag(s2) @ w.T + SIGMA**2 * torch.eye(4)
    exact = -D.MultivariateNormal(w @ m + b, cov).log_prob(x.reshape(6, 4)).mean()
    for k in (2, 9):
        got = model.loss(x, x, beta=1.0, generator=torch.Generator().manual_seed(k), samples=k)["loss"]
        torch.testing.assert_close(got, exact, rtol=0, atol=1e-4)


def test_more_samples_tighten_the_bound_towards_log_px():
    model = _model("vamp")
    g = torch.Generator().manual_seed(2)
    x = torch.bernoulli(torch.rand((64, 1, 6, 5), generator=g), generator=g)
    with torch.no_grad():
        bounds = [float(model.loss(x, x, beta=1.0, generator=torch.Generator().manual_seed(0), samples=k)["loss"])
                  for k in (1, 4, 64, 1024)]
    assert all(a > b for a, b in zip(bounds, bounds[1:])), bounds  # negative bounds fall as K grows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("iwae-data")
    return write_npz(folder / "data.npz", blob_images(40, CASES["mlp"].shape, seed=3))


def test_training_on_the_iwae_bound_reports_it_and_resumes_bit_identically(data, tmp_path):
    config = CASES["mlp"].config(data, model_args={**CASES["mlp"].model_args, "prior": "vamp",
                                                   "prior_components": 3}, epochs=2, lr=0.01, iwae_samples=4)
    straight = train(config, tmp_path / "straight", progress_bar=False)
    history = checkpoint.load(straight)[1]["history"]
    assert all(math.isfinite(r["val_iwae"]) and r["val_iwae"] >= r["val_elbo"] for r in history), history
    assert checkpoint.load(straight)[1]["config"]["iwae_samples"] == 4
    cut = TrainConfig.from_json({**checkpoint.load(straight)[1]["config"], "max_steps": 3})
    train(cut, tmp_path / "resumed", progress_bar=False)
    resumed = train(TrainConfig.from_json({**cut.__dict__, "max_steps": None}), tmp_path / "resumed",
                    resume=True, progress_bar=False)
    a, b = checkpoint.load(straight)[0], checkpoint.load(resumed)[0]
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model.")), "resume changed the weights"


def test_fine_tuning_a_vamp_run_keeps_its_prior(data, tmp_path):
    args = {**CASES["mlp"].model_args, "prior": "vamp", "prior_components": 3}
    first = train(CASES["mlp"].config(data, model_args=args, epochs=1, lr=0.01), tmp_path / "a", progress_bar=False)
    images = torch.from_numpy(blob_images(40, CASES["mlp"].shape, seed=3).astype(np.float32) / 255.0)
    same = build_model("mlp-vae", CASES["mlp"].shape, Likelihood("bernoulli"), **args)
    warm_start(same, str(first), images, seed=0)
    source = checkpoint.model_tensors(checkpoint.load(first)[0])
    assert all(torch.equal(v, source[k]) for k, v in same.state_dict().items())
    bigger = build_model("mlp-vae", CASES["mlp"].shape, Likelihood("bernoulli"), **{**args, "prior_components": 5})
    warm_start(bigger, str(first), images, seed=0)  # another size: pseudo-inputs start at training images
    u = bigger.prior.pseudo_inputs.detach().flatten(1)
    assert all((u[i] == images.flatten(1)).all(1).any() for i in range(5))


def test_iwae_samples_is_refused_where_it_does_not_apply(data, tmp_path):
    with pytest.raises(ValueError, match="iwae_samples must be an integer >= 1"):
        TrainConfig(iwae_samples=0)
    vq = TrainConfig(data=str(data), arch="vqvae", model_args={"codebook_size": 8, "code_dim": 2, "channels": [4]},
                     epochs=1, iwae_samples=2)
    with pytest.raises(ValueError, match="iwae_samples applies to VAEs"):
        train(vq, tmp_path / "vq", progress_bar=False)


def test_the_cli_flag_reaches_the_config(data, tmp_path):
    from click.testing import CliRunner

    from vaeinfer.cli import main

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data", str(data), "--arch", "mlp-vae", "--latent-dim", "2",
                                       "--hidden", "8", "--epochs", "1", "--iwae-samples", "3", "--out", str(out),
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    meta = checkpoint.load(out)[1]
    assert meta["config"]["iwae_samples"] == 3 and "val_iwae" in meta["history"][-1]


def test_iwae_ddp_matches_one_process(tmp_path):
    """Each rank keeps its rows of the global batch's (N, K, Z) noise, as for the ELBO."""
    path = tmp_path / "data.npz"
    np.savez(path, images=blob_images(41, (1, 12, 12), seed=3))
    config = {**DDP_VAE, "data": str(path), "iwae_samples": 3}
    torchrun(tmp_path, config, tmp_path / "ddp")
    single_process(config, tmp_path / "single")
    assert compare(tmp_path / "single", tmp_path / "ddp") <= 1e-5
