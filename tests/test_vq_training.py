"""VQ-VAE and PixelCNN-prior training: quantizer, round trip, causality, the loop, exact resume.

Tiny models on small synthetic .npz datasets, fixed seeds, one thread: each test takes seconds.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from vaeinfer.training import checkpoint
from vaeinfer.training.likelihood import Likelihood
from vaeinfer.training.models import build_model
from vaeinfer.training.pixelcnn import GatedPixelCNN
from vaeinfer.training.pixelcnn_prior import PriorConfig, train_prior
from vaeinfer.training.quantizer import VectorQuantizer
from vaeinfer.training.train import TrainConfig, train
from vaeinfer.training.vqvae import VQVAE

TINY = {"codebook_size": 16, "code_dim": 8, "channels": [8, 16], "blocks": 1, "dead_code_threshold": 2}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_data(path, channels=1, size=16, n=64, seed=0):
    """n images (4 classes: a bright quadrant each, over faint noise) and their labels, as .npz."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    images = rng.uniform(0.0, 0.2, (n, channels, size, size))
    half = size // 2
    for image, label in zip(images, labels):
        r, c = divmod(int(label), 2)
        image[:, r * half:(r + 1) * half, c * half:(c + 1) * half] += 0.75
    np.savez(path, images=images.clip(0.0, 1.0).astype(np.float32), labels=labels.astype(np.int64))
    return path


def vq_config(data, **changes) -> TrainConfig:
    base = TrainConfig(data=str(data), arch="vqvae", model_args=dict(TINY), epochs=4, batch_size=16, lr=3e-3,
                       val_fraction=0.25, seed=0, threads=1)
    return replace(base, **changes)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- quantizer


def test_straight_through_gradient_reaches_the_encoder_output():
    q = VectorQuantizer(8, 4).eval()  # eval: no EMA update moves the codebook after the lookup
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    upstream = torch.randn_like(out.z_q)
    (out.z_q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)  # identity gradient through the quantization
    assert torch.equal(out.z_q, q.lookup(out.codes))  # while the value is exactly the codes' vectors


def test_nearest_code_matches_brute_force():
    torch.manual_seed(0)
    q = VectorQuantizer(32, 6)
    q.codebook.copy_(torch.randn(32, 6))
    z = torch.randn(4, 6, 5, 7)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 6).double()
    brute = ((flat[:, None, :] - q.codebook.double()[None]) ** 2).sum(-1).argmin(1).reshape(4, 5, 7)
    codes = q.nearest(z)
    assert codes.dtype == torch.int64 and codes.shape == (4, 5, 7)
    assert torch.equal(codes, brute)
    assert torch.equal(q(z).codes, brute)


def test_exact_ties_go_to_the_lowest_code_index():
    # integer vectors make the distances exact, so these are true ties; torch.argmin (and ONNX
    # ArgMin with select_last_index=0) return the first minimal index
    q = VectorQuantizer(4, 2, ema=False)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0], [2.0, 0.0], [0.0, 2.0]]))
    points = torch.tensor([[2.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # ties {0,2}, {0,1,2}, all, {1,3}
    z = points.t().reshape(1, 2, 1, 4)
    assert q.nearest(z).flatten().tolist() == [0, 0, 0, 1]


def test_ema_changes_the_codebook_only_in_train_mode():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 4, decay=0.9)
    assert list(q.parameters()) == []  # with EMA, gradients never touch the codebook
    z = torch.randn(4, 4, 3, 3)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.eval()
    q(z)
    assert_same_tensors(q.state_dict(), before)
    q.train()
    out = q(z)
    counts = torch.bincount(out.codes.flatten(), minlength=8).float()
    assert torch.allclose(q.cluster_size, 0.9 * before["cluster_size"] + 0.1 * counts)
    assert not torch.equal(q.codebook, before["codebook"])


def test_dead_codes_are_restarted_from_the_batch_with_the_given_generator():
    def run(seed):
        q = VectorQuantizer(8, 2, dead_code_threshold=2)
        far = torch.cat([torch.zeros(1, 2), 100.0 + torch.arange(14.0).reshape(7, 2)])  # only code 0 is ever chosen
        q.codebook.copy_(far)
        q.embed_sum.copy_(far)
        z = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.1
        gen = torch.Generator().manual_seed(seed)
        assert float(q(z, gen).dead_codes) == 0  # unused for one step only
        assert float(q(z, gen).dead_codes) == 7  # unused for two: dead, and restarted
        flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
        assert (q.codebook[1:, None] == flat[None]).all(-1).any(1).all()  # each one a vector of the batch
        assert (q.unused_steps == 0).all()
        return q.codebook.clone()

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_kmeans_init_puts_the_codes_on_the_clusters_of_the_first_batch():
    centers = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    gen = torch.Generator().manual_seed(0)
    points = centers[torch.arange(64) % 4] + 0.1 * torch.randn(64, 2, generator=gen)
    z = points.reshape(4, 4, 4, 2).permute(0, 3, 1, 2)
    q = VectorQuantizer(4, 2, kmeans_init=True)
    assert not bool(q.initialized)
    q(z, gen)
    assert bool(q.initialized) and "initialized" in q.state_dict()
    distance = torch.cdist(q.codebook, centers)
    assert distance.amin(dim=1).max() < 0.2 and distance.argmin(dim=1).unique().numel() == 4


# ---------------------------------------------------------------- VQ-VAE


@pytest.mark.parametrize("shape, likelihood", [((1, 16, 16), Likelihood()), ((3, 15, 13), Likelihood("gaussian", 0.1))])
def test_vqvae_round_trip_and_gradients(shape, likelihood):
    torch.manual_seed(0)
    model = VQVAE(shape, likelihood, **TINY)
    assert model.kind == "vqvae" and model.image_shape == shape
    assert model.grid == ((shape[1] + 3) // 4, (shape[2] + 3) // 4)
    x = torch.rand(5, *shape)

    model.eval()
    codes, z_q = model.encoder(x)
    assert codes.dtype == torch.int64 and codes.shape == (5, *model.grid)
    assert z_q.dtype == torch.float32 and z_q.shape == (5, model.code_dim, *model.grid)
    params, q = model(x)  # the training path
    assert torch.equal(codes, q.codes)
    assert torch.equal(model.decoder(codes), params)
    assert params.shape == (5, *shape)
    assert [k for k in model.state_dict() if k.endswith("codebook")] == ["quantizer.codebook"]

    model.train()
    losses = model.loss(x, x, beta=1.0, generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"loss", "recon", "vq_loss", "perplexity", "usage", "dead_codes"}
    assert all(v.dim() == 0 for v in losses.values())
    losses["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_net.parameters())


def test_training_loop_reduces_the_loss_and_writes_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    path = train(vq_config(write_data(tmp_path / "data.npz")), run, progress_bar=False)
    tensors, meta = checkpoint.load(path)
    assert meta["kind"] == "vqvae" and meta["arch"] == "vqvae"
    history = read_jsonl(run / "metrics.jsonl")
    assert len(history) == 4 and history[-1]["loss"] < history[0]["loss"]
    assert {"recon", "vq_loss", "perplexity", "usage", "dead_codes", "val_loss", "val_perplexity"} <= set(history[-1])
    assert (run / "reconstructions.png").is_file() and not (run / "samples.png").exists()
    model = build_model(meta["arch"], meta["image_shape"], Likelihood.from_json(meta["likelihood"]), **meta["model_args"])
    model.load_state_dict(checkpoint.model_tensors(tensors))  # strict: EMA buffers included
    assert "model.quantizer.cluster_size" in tensors


def test_resume_after_max_steps_is_bit_identical(tmp_path):
    # 3 channels, dynamic binarization, k-means init and quick restarts: every RNG consumer in play
    data = write_data(tmp_path / "rgb.npz", channels=3, size=12)
    config = vq_config(data, epochs=2, binarize="dynamic",
                       model_args=dict(TINY, kmeans_init=True))
    train(config, tmp_path / "straight", progress_bar=False)
    stopped = train(replace(config, max_steps=4), tmp_path / "resumed", progress_bar=False)
    assert checkpoint.load(stopped)[1]["progress"]["global_step"] == 4  # mid-epoch 2 of 3 steps each
    train(replace(config, max_steps=1000), tmp_path / "resumed", resume=True, progress_bar=False)
    a, meta_a = checkpoint.load(tmp_path / "straight")
    b, meta_b = checkpoint.load(tmp_path / "resumed")
    assert_same_tensors(a, b)
    drop = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert drop(meta_a["history"]) == drop(meta_b["history"])


# ---------------------------------------------------------------- PixelCNN prior


@pytest.mark.parametrize("num_classes", [0, 3])
def test_pixelcnn_is_causal_without_a_blind_spot(num_classes):
    h, w, k = 4, 5, 8
    torch.manual_seed(0)
    prior = GatedPixelCNN(k, (h, w), channels=8, layers=5, num_classes=num_classes).eval()
    base = torch.randint(0, k, (1, h, w))
    grids = base.repeat(h * w + 1, 1, 1)  # grid q + 1 differs from base at raster position q only
    for q in range(h * w):
        i, j = divmod(q, w)
        grids[q + 1, i, j] = (base[0, i, j] + 1) % k
    label = torch.full((len(grids),), 2) if num_classes else None
    logits = prior(grids, label)
    assert logits.shape == (h * w + 1, k, h, w) and logits.dtype == torch.float32
    changed = (logits[1:] != logits[:1]).any(dim=1).flatten(1)  # [q, p]: changing code q moved logits at p
    earlier = torch.arange(h * w)[:, None] < torch.arange(h * w)[None, :]
    assert torch.equal(changed, earlier)  # never on q >= p (causal), always on q < p (no blind spot)


def test_conditional_pixelcnn_depends_on_the_label():
    torch.manual_seed(0)
    prior = GatedPixelCNN(8, (3, 3), channels=8, layers=2, num_classes=3).eval()
    codes = torch.randint(0, 8, (2, 3, 3))
    a, b = prior(codes, torch.tensor([0, 0])), prior(codes, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="num_classes=3"):
        prior(codes)
    with pytest.raises(ValueError, match="num_classes=0"):
        GatedPixelCNN(8, (3, 3), channels=8, layers=2)(codes, torch.tensor([0, 0]))


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    """A VQ-VAE trained for one epoch on labelled 1x16x16 data."""
    root = tmp_path_factory.mktemp("vq")
    torch.set_num_threads(1)
    train(vq_config(write_data(root / "data.npz"), epochs=1), root / "run", progress_bar=False)
    return root / "run"


def copy_run(vq_run, target):
    target.mkdir()
    for name in ("checkpoint.json", checkpoint.load(vq_run)[1]["weights"]["file"]):
        shutil.copy(vq_run / name, target / name)
    return target


def test_train_prior_writes_its_checkpoint_and_metrics(vq_run, tmp_path):
    run = copy_run(vq_run, tmp_path / "run")
    path = train_prior(run, PriorConfig(epochs=2, batch_size=16, layers=2, channels=8, threads=1), progress_bar=False)
    assert path == run / "prior.json"
    tensors, meta = checkpoint.load(run, name="prior")
    assert meta["model_args"] == {"codebook_size": 16, "grid": [4, 4], "channels": 8, "layers": 2, "kernel": 3,
                                  "num_classes": 4}  # conditional by default: the data has labels
    assert meta["config"]["conditional"] is True
    rows = read_jsonl(run / "prior_metrics.jsonl")
    assert rows == meta["history"] and len(rows) == 2
    assert all(0 < row["val_bits_per_code"] < math.log2(16) + 1 for row in rows)
    assert rows[-1]["bits_per_code"] < rows[0]["bits_per_code"]
    assert (run / "prior_samples.png").is_file()
    prior = GatedPixelCNN(**meta["model_args"])
    prior.load_state_dict(checkpoint.model_tensors(tensors))
    assert (run / "checkpoint.json").is_file()  # the VQ-VAE's own checkpoint is left alone


def test_prior_resume_after_max_steps_is_bit_identical(vq_run, tmp_path):
    config = PriorConfig(epochs=2, batch_size=16, layers=2, channels=8, conditional=False, threads=1)
    train_prior(copy_run(vq_run, tmp_path / "straight"), config, progress_bar=False)
    resumed = copy_run(vq_run, tmp_path / "resumed")
    train_prior(resumed, replace(config, max_steps=4), progress_bar=False)
    assert checkpoint.load(resumed, name="prior")[1]["progress"]["global_step"] == 4
    train_prior(resumed, replace(config, max_steps=1000), resume=True, progress_bar=False)
    a, meta_a = checkpoint.load(tmp_path / "straight", name="prior")
    b, meta_b = checkpoint.load(resumed, name="prior")
    assert meta_a["model_args"]["num_classes"] == 0
    assert_same_tensors(a, b)
    assert [r["val_bits_per_code"] for r in meta_a["history"]] == [r["val_bits_per_code"] for r in meta_b["history"]]
