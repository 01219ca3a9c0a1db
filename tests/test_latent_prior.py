"""Learned VAE priors (VampPrior, mixture of Gaussians): training, export as prior.npz, and the
runtime's sampling and scoring with them, checked against PyTorch and against exact math."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import vaeinfer
from vaeinfer.export import export_checkpoint, export_vae
from tests.conftest import CASES, blob_images, write_npz
from tests.test_score import SIGMA, LinearDecoder
from vaeinfer.training import checkpoint
from vaeinfer.training.evaluate import iwae_score
from vaeinfer.training.likelihood import Likelihood
from vaeinfer.training.models import build_model
from vaeinfer.training.latent_prior import MoGPrior, VampPrior, export_mixture, warm_start
from vaeinfer.training.train import train
from vaeinfer import latent_prior

PRIORS = ["vamp", "mog"]


def _tiny(prior: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("mlp-vae", (1, 6, 5), Likelihood("bernoulli"), latent_dim=3, hidden=[8],
                        prior=prior, prior_components=4)
    with torch.no_grad():  # spread the mixture so that log p(z) differs visibly between components
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    return model


@pytest.mark.parametrize("prior", PRIORS)
def test_runtime_log_prior_equals_pytorch(prior, tmp_path):
    model = _tiny(prior)
    out = export_vae(model.encoder, model.decoder, (1, 6, 5), tmp_path / "b", latent_prior=export_mixture(model))
    runtime = vaeinfer.load(out, device="cpu", threads=1)
    assert runtime.prior.components == 4 and runtime.prior.source == prior
    z = np.random.default_rng(0).standard_normal((50, 3)) * 2.0
    with torch.no_grad():
        ref = model.double().prior.log_prob(torch.from_numpy(z), model.encoder).numpy()
    np.testing.assert_allclose(runtime.prior.log_prob(z), ref, atol=1e-5, rtol=0)
    assert np.ptp(ref) > 1.0  # the points see different densities: the comparison means something


@pytest.mark.parametrize("prior", PRIORS)
def test_onnx_score_with_a_learned_prior_agrees_with_pytorch(prior, tmp_path):
    model = _tiny(prior, seed=1)
    out = export_vae(model.encoder, model.decoder, (1, 6, 5), tmp_path / "b", latent_prior=export_mixture(model))
    runtime = vaeinfer.load(out, device="cpu", threads=1)
    x = (np.random.default_rng(0).random((5, 1, 6, 5)) < 0.4).astype(np.float32)
    onnx = runtime.score(x, samples=32, seed=2)
    ref = iwae_score(model, x, samples=32, seed=2)
    for key in ("nll", "elbo", "recon"):
        np.testing.assert_allclose(getattr(onnx, key), ref[key], atol=1e-3, err_msg=key)
    # and the prior matters: the same graphs scored under N(0, I) give other numbers
    plain = vaeinfer.load(export_vae(model.encoder, model.decoder, (1, 6, 5), tmp_path / "plain"), device="cpu")
    assert np.max(np.abs(plain.score(x, samples=32, seed=2).nll - onnx.nll)) > 0.1


class ExactPosteriorUnderPrior(nn.Module):
    """q(z|x) = p(z|x) for the linear Gaussian decoder of test_score and the prior N(m, diag(s2))."""

    def __init__(self, w, b, m, s2):
        super().__init__()
        prec = torch.diag(1.0 / s2) + w.T @ w / SIGMA**2
        cov = torch.linalg.inv(prec)
        assert torch.allclose(cov, torch.diag(torch.diagonal(cov)), atol=1e-6)
        self.register_buffer("proj", cov @ w.T / SIGMA**2)
        self.register_buffer("shift", cov @ (m / s2))
        self.register_buffer("b", b)
        self.register_buffer("logvar", torch.log(torch.diagonal(cov)))

    def forward(self, x):
        mean = (x.flatten(1) - self.b) @ self.proj.T + self.shift
        return mean, self.logvar.expand_as(mean) + 0.0 * mean


def test_iwae_is_exact_under_a_shifted_scaled_one_component_prior(tmp_path):
    q, _ = torch.linalg.qr(torch.randn(4, 2, generator=torch.Generator().manual_seed(0)))
    w = q * torch.tensor([0.4, 0.2])  # orthogonal columns, so with a diagonal prior the posterior is diagonal
    b = torch.full((4,), 0.5)
    m, s2 = torch.tensor([0.7, -1.2]), torch.tensor([0.5, 2.0])
    mixture = {"source": "mog", "log_weights": np.zeros(1), "means": m.double().numpy()[None],
               "logvars": np.log(s2.double().numpy())[None]}
    out = export_vae(ExactPosteriorUnderPrior(w, b, m, s2), LinearDecoder(w, b), (1, 2, 2), tmp_path / "b",
                     likelihood="gaussian", scale=SIGMA, latent_prior=mixture)
    model = vaeinfer.load(out, device="cpu", threads=1)
    x = np.random.default_rng(1).random((5, 1, 2, 2), dtype=np.float32)
    w64, b64, m64, s64 = (t.double().numpy() for t in (w, b, m, s2))
    cov = w64 @ np.diag(s64) @ w64.T + SIGMA**2 * np.eye(4)
    d = x.reshape(5, 4) - (w64 @ m64 + b64)
    exact = 0.5 * (np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d) + np.linalg.slogdet(cov)[1]
                   + 4 * math.log(2 * math.pi))
    s = model.score(x, samples=7, seed=3)
    np.testing.assert_allclose(s.nll, exact, atol=1e-3)
    np.testing.assert_allclose(s.elbo, exact, atol=1e-3)  # every importance weight is p(x)
    # the standard-normal answer is far from it: the prior is what makes it exact
    plain = vaeinfer.load(export_vae(ExactPosteriorUnderPrior(w, b, m, s2), LinearDecoder(w, b), (1, 2, 2),
                                     tmp_path / "plain", likelihood="gaussian", scale=SIGMA), device="cpu")
    assert np.max(np.abs(plain.score(x, samples=7, seed=3).nll - exact)) > 0.1


def test_mixture_sampling_is_seeded_and_follows_the_weights():
    prior = latent_prior.MixturePrior(np.log([0.8, 0.2]), np.array([[-5.0], [5.0]]), np.log([[0.01], [0.01]]))
    a = prior.sample(np.random.default_rng(0), 4000)
    np.testing.assert_array_equal(a, prior.sample(np.random.default_rng(0), 4000))
    assert a.dtype == np.float32 and a.shape == (4000, 1)
    assert abs((a[:, 0] < 0).mean() - 0.8) < 0.03
    assert np.abs(np.abs(a) - 5.0).max() < 0.6
    cold = prior.sample(np.random.default_rng(0), 4000, temperature=0.1)
    assert np.abs(np.abs(cold) - 5.0).max() < 0.06


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prior-data")
    raw = blob_images(40, CASES["mlp"].shape, seed=3)
    return write_npz(folder / "data.npz", raw), raw.astype(np.float32) / 255.0


@pytest.mark.parametrize("prior", ["normal", "vamp", "mog"])
def test_training_with_each_prior_runs_and_learns_the_prior(prior, tiny_data, tmp_path):
    data, _ = tiny_data
    args = {**CASES["mlp"].model_args, "prior": prior, "prior_components": 3}
    path = train(CASES["mlp"].config(data, model_args=args, epochs=2, lr=0.01), tmp_path / "run", progress_bar=False)
    tensors, meta = checkpoint.load(path)
    history = meta["history"]
    assert len(history) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["val_elbo"]) for r in history)
    prior_keys = sorted(k for k in tensors if k.startswith("model.prior."))
    assert prior_keys == {"normal": [], "vamp": ["model.prior.pseudo_inputs"],
                          "mog": ["model.prior.logits", "model.prior.logvars", "model.prior.means"]}[prior]
    if prior == "vamp":  # started at training images, then moved by the optimizer
        u = tensors["model.prior.pseudo_inputs"]
        assert u.shape == (3, *CASES["mlp"].shape) and not torch.equal(u, u.clamp(0, 1).round())


def test_init_from_loads_the_weights_only_and_starts_pseudo_inputs_at_training_images(mlp, tiny_data):
    _, images = tiny_data
    model = build_model("mlp-vae", CASES["mlp"].shape, Likelihood("bernoulli"),
                        **CASES["mlp"].model_args, prior="vamp", prior_components=5)
    warm_start(model, str(mlp.run), torch.from_numpy(images), seed=0)
    source = checkpoint.model_tensors(checkpoint.load(mlp.run)[0])
    for name, value in model.state_dict().items():
        if not name.startswith("prior."):
            assert torch.equal(value, source[name]), name
    u = model.prior.pseudo_inputs.detach().flatten(1)
    assert all((u[i] == torch.from_numpy(images).flatten(1)).all(1).any() for i in range(5))
    other = build_model("mlp-vae", CASES["mlp"].shape, Likelihood("bernoulli"), latent_dim=5, hidden=[16])
    with pytest.raises(ValueError, match="do not fit"):
        warm_start(other, str(mlp.run), torch.from_numpy(images), seed=0)


@pytest.fixture(scope="module")
def vamp_bundle(tiny_data, tmp_path_factory):
    data, images = tiny_data
    folder = tmp_path_factory.mktemp("vamp")
    args = {**CASES["mlp"].model_args, "prior": "vamp", "prior_components": 3}
    run = train(CASES["mlp"].config(data, model_args=args, epochs=1), folder / "run", progress_bar=False)
    return run, export_checkpoint(run, folder / "bundle", name="tiny-vamp"), images


def test_export_load_sample_score_round_trip(vamp_bundle):
    run, bundle, images = vamp_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    slot = manifest["latent_prior"]
    assert slot["type"] == "mixture" and slot["components"] == 3 and slot["source"] == "vamp"
    assert slot["sha256"] == hashlib.sha256((bundle / slot["file"]).read_bytes()).hexdigest()
    model = vaeinfer.load(bundle, device="cpu", threads=1)
    a = model.sample(6, seed=4)
    np.testing.assert_array_equal(a, model.sample(6, seed=4))
    assert a.shape == (6, *CASES["mlp"].shape) and 0 <= a.min() and a.max() <= 1
    # the mixture's draws decoded: the same images as decoding the prior's own latents
    z = model.prior.sample(np.random.default_rng(4), 6)
    np.testing.assert_allclose(a, model.decode(z), atol=1e-6)
    tensors, meta = checkpoint.load(run)
    torch_model = build_model(meta["arch"], meta["image_shape"], Likelihood.from_json(meta["likelihood"]),
                              **meta["model_args"])
    torch_model.load_state_dict(checkpoint.model_tensors(tensors))
    x = (images[:4] > 0.5).astype(np.float32)
    ref = iwae_score(torch_model, x, samples=16, seed=1)
    np.testing.assert_allclose(model.score(x, samples=16, seed=1).nll, ref["nll"], atol=1e-3)


def test_a_bundle_without_the_slot_keeps_the_standard_normal(mlp):
    model = vaeinfer.load(mlp.bundle, device="cpu", threads=1)
    assert model.prior is None
    eps = np.random.default_rng(2).standard_normal((3, model.latent_dim), dtype=np.float32)
    np.testing.assert_array_equal(model.sample(3, seed=2), model.decode(eps))


def _copy_with(bundle, tmp_path, arrays=None, raw: bytes | None = None, fix_sha: bool = True):
    out = tmp_path / "bad"
    shutil.copytree(bundle, out)
    if arrays is not None:
        np.savez(out / "prior.npz", **arrays)
    if raw is not None:
        (out / "prior.npz").write_bytes(raw)
    if fix_sha:
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["latent_prior"]["sha256"] = hashlib.sha256((out / "prior.npz").read_bytes()).hexdigest()
        (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _good(bundle):
    with np.load(bundle / "prior.npz", allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.mark.parametrize("case, match", [
    ("nan", "NaN/Inf"),
    ("shape", "expected means of shape"),
    ("weights", "sum to 1"),
    ("keys", "expected arrays"),
    ("pickle", "not a readable numpy"),
    ("garbage", "not a readable numpy"),
    ("huge-logvar", "expected logvars in"),
    ("sha", "sha256"),
    ("symlink", "symbolic link"),
])
def test_a_bad_prior_npz_is_a_bundle_error(vamp_bundle, tmp_path, case, match):
    _, bundle, _ = vamp_bundle
    good = _good(bundle)
    if case == "nan":
        out = _copy_with(bundle, tmp_path, {**good, "means": np.where(np.arange(good["means"].size).reshape(
            good["means"].shape) == 0, np.nan, good["means"])})
    elif case == "shape":
        out = _copy_with(bundle, tmp_path, {**good, "means": good["means"][:, :-1]})
    elif case == "weights":
        out = _copy_with(bundle, tmp_path, {**good, "log_weights": good["log_weights"] + 0.1})
    elif case == "keys":
        out = _copy_with(bundle, tmp_path, {**good, "extra": np.zeros(1)})
    elif case == "pickle":
        out = _copy_with(bundle, tmp_path, {**good, "means": np.array([{"a": 1}], dtype=object)})
    elif case == "garbage":
        out = _copy_with(bundle, tmp_path, raw=b"PK\x03\x04 not really a zip")
    elif case == "huge-logvar":
        out = _copy_with(bundle, tmp_path, {**good, "logvars": good["logvars"] + 100.0})
    elif case == "sha":
        out = _copy_with(bundle, tmp_path, {**good, "means": good["means"] + 1.0}, fix_sha=False)
    else:
        out = _copy_with(bundle, tmp_path, fix_sha=False)
        (out / "elsewhere.npz").write_bytes((out / "prior.npz").read_bytes())
        os.remove(out / "prior.npz")
        os.symlink(out / "elsewhere.npz", out / "prior.npz")
    with pytest.raises(vaeinfer.BundleError, match=match):
        vaeinfer.load(out, device="cpu")


@pytest.mark.parametrize("change, match", [
    ({"components": 0}, "components"),
    ({"file": "../prior.npz"}, "plain"),
    ({"source": "flow"}, "source"),
    ({"type": "flow"}, "type"),
    ({"extra": 1}, "keys"),
])
def test_a_bad_latent_prior_slot_is_a_bundle_error(vamp_bundle, tmp_path, change, match):
    _, bundle, _ = vamp_bundle
    out = _copy_with(bundle, tmp_path, fix_sha=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["latent_prior"].update(change)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(vaeinfer.BundleError, match=match):
        vaeinfer.load(out, device="cpu")


def test_components_in_the_manifest_must_match_the_npz(vamp_bundle, tmp_path):
    _, bundle, _ = vamp_bundle
    out = _copy_with(bundle, tmp_path, fix_sha=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["latent_prior"]["components"] = 2
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(vaeinfer.BundleError, match="of shape"):
        vaeinfer.load(out, device="cpu")


def test_the_prior_modules_are_mixtures_with_normalised_weights():
    vamp, mog = VampPrior(4, (1, 3, 3)), MoGPrior(5, 2)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(9, 4))

    def enc(x):
        return encoder(x).chunk(2, dim=1)

    for prior, k in ((vamp, 4), (mog, 5)):
        log_w, means, logvars = prior.mixture(enc)
        assert log_w.shape == (k,) and means.shape == (k, 2) and logvars.shape == (k, 2)
        assert abs(float(log_w.detach().exp().sum()) - 1) < 1e-6


def test_only_a_kind_with_the_slot_takes_a_latent_prior():
    slot = {"type": "mixture", "file": "prior.npz", "sha256": "0" * 64, "components": 2, "source": "mog"}
    assert latent_prior.parse_slot(slot, "vae") == slot
    with pytest.raises(vaeinfer.BundleError, match="cannot have a latent_prior"):
        latent_prior.parse_slot(slot, "vqvae")
