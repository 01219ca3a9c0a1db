"""Training a spatial-latent conv VAE (`vaeinfer train --arch conv-vae --latent spatial`) on a folder
of RGB PNGs: the model's interface and sizes, its KL, the CLI run, and exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tests.conftest import blob_images
from vaeinfer.training import checkpoint
from vaeinfer.training.likelihood import Likelihood
from vaeinfer.training.models import build_model
from vaeinfer.cli import main

TINY = {"downsample": 4, "latent_channels": 2, "channels": [8, 16], "blocks": 1}


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    """16 RGB 32x32 PNGs."""
    folder = tmp_path_factory.mktemp("rgb")
    for i, img in enumerate(blob_images(16, (3, 32, 32), seed=3)):
        Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{i:02d}.png")
    return folder


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def train_args(data, out, *extra):
    return ["train", "--data", data, "--arch", "conv-vae", "--latent", "spatial", "--downsample", "4",
            "--latent-channels", "2", "--conv-channels", "8,16", "--blocks", "1", "--batch-size", "4",
            "--lr", "3e-3", "--val-fraction", "0.25", "--threads", "1", "--quiet", "--out", out, *extra]


@pytest.mark.parametrize("downsample,channels", [(4, [8, 16]), (8, [8, 8, 16])])
def test_spatial_vae_is_fully_convolutional(downsample, channels):
    torch.manual_seed(0)
    model = build_model("spatial-conv-vae", (3, 32, 32), Likelihood("laplace", 0.1),
                        downsample=downsample, latent_channels=3, channels=channels)
    assert model.kind == "spatial-vae" and model.downsample == downsample and model.latent_channels == 3
    assert model.value_range == (-1.0, 1.0) and model.latent_shape == (3, 32 // downsample, 32 // downsample)
    x = torch.rand(2, 3, 48, 40) * 2 - 1  # another size than the training one
    mean, logvar = model.encoder(x)
    assert mean.shape == logvar.shape == (2, 3, 48 // downsample, 40 // downsample)
    assert model.decoder(mean).shape == (2, 3, 48, 40)


def test_kl_is_summed_over_the_spatial_latent():
    torch.manual_seed(0)
    model = build_model("spatial-conv-vae", (3, 16, 16), Likelihood("gaussian", 0.1), **TINY)
    x = torch.rand(3, 3, 16, 16)
    mean, logvar = model.encoder(2 * x - 1)
    expected = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    losses = model.loss(x, x, beta=0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(losses["kl"], expected)
    torch.testing.assert_close(losses["loss"], losses["recon"] + 0.5 * losses["kl"])


def test_spatial_vae_refuses_what_it_cannot_train():
    lik = Likelihood("gaussian", 0.1)
    with pytest.raises(ValueError, match="multiples of downsample 4"):
        build_model("spatial-conv-vae", (3, 30, 32), lik, **TINY)
    with pytest.raises(ValueError, match="takes 3 stride-2 stages"):
        build_model("spatial-conv-vae", (3, 32, 32), lik, downsample=8, channels=[8, 16])
    with pytest.raises(ValueError, match="gaussian or laplace"):
        build_model("spatial-conv-vae", (3, 32, 32), Likelihood("bernoulli"), **TINY)


def test_cli_trains_on_an_rgb_folder_and_resumes_exactly(rgb_folder, tmp_path):
    straight = tmp_path / "straight"
    r = cli(*train_args(rgb_folder, straight, "--epochs", "4", "--likelihood", "laplace", "--beta", "0.5"))
    assert r.exit_code == 0, r.output
    tensors, meta = checkpoint.load(straight)
    assert meta["kind"] == "spatial-vae" and meta["arch"] == "spatial-conv-vae"
    assert meta["model_args"] == {**TINY, "channels": [8, 16]} and meta["image_shape"] == [3, 32, 32]
    assert meta["value_range"] == [-1.0, 1.0] and meta["likelihood"] == {"kind": "laplace", "scale": 0.1}
    history = meta["history"]
    assert len(history) == 4 and history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert all(np.isfinite(row["val_elbo"]) for row in history)
    assert (straight / "samples.png").exists()
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["epoch"] == 4

    resumed = tmp_path / "resumed"
    r = cli(*train_args(rgb_folder, resumed, "--epochs", "4", "--likelihood", "laplace", "--beta", "0.5",
                        "--max-steps", "5"))
    assert r.exit_code == 0, r.output
    r = cli(*train_args(rgb_folder, resumed, "--epochs", "4", "--resume"))
    assert r.exit_code == 0, r.output
    again, meta2 = checkpoint.load(resumed)
    assert meta2["progress"]["global_step"] == meta["progress"]["global_step"] == 12
    for key in tensors:
        assert torch.equal(tensors[key], again[key]), key


def test_cli_default_likelihood_and_bad_combinations(rgb_folder, tmp_path):
    r = cli(*train_args(rgb_folder, tmp_path / "g", "--max-steps", "1"))
    assert r.exit_code == 0, r.output
    assert checkpoint.load(tmp_path / "g")[1]["likelihood"] == {"kind": "gaussian", "scale": 0.1}
    r = cli("train", "--data", rgb_folder, "--arch", "vqvae", "--latent", "spatial", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--latent spatial takes --arch conv-vae" in r.output
    r = cli("train", "--data", rgb_folder, "--downsample", "4", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "take --latent spatial" in r.output
    r = cli(*train_args(rgb_folder, tmp_path / "x", "--latent-dim", "8"))
    assert r.exit_code == 2 and "--latent-dim does not apply" in r.output
    r = cli(*train_args(rgb_folder, tmp_path / "x", "--image-size", "30"))
    assert r.exit_code != 0 and "multiples of downsample 4" in r.output


def test_trained_modules_trace_with_dynamic_height_and_width(tmp_path):
    """The encoder and decoder export (torch.onnx, dynamo) with symbolic H, W and run at a size
    they were not traced at, matching PyTorch: what export/spatial_vae.py relies on."""
    ort = pytest.importorskip("onnxruntime")
    from torch.export import Dim

    torch.manual_seed(0)
    model = build_model("spatial-conv-vae", (3, 16, 16), Likelihood("gaussian", 0.1), **TINY).eval()
    hk, wk = Dim("hk", min=1, max=64), Dim("wk", min=1, max=64)
    graphs = {"encoder": (model.encoder, torch.rand(2, 3, 16, 16) * 2 - 1, {0: Dim("n"), 2: 4 * hk, 3: 4 * wk}),
              "decoder": (model.decoder, torch.randn(2, 2, 4, 4), {0: Dim("n"), 2: hk, 3: wk})}
    x = np.random.default_rng(0).uniform(-1, 1, (3, 3, 24, 40)).astype(np.float32)
    feeds = {"encoder": x, "decoder": np.random.default_rng(1).standard_normal((3, 2, 6, 10)).astype(np.float32)}
    for name, (module, example, dims) in graphs.items():
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(module, (example,), str(path), dynamo=True, dynamic_shapes=(dims,), external_data=False,
                          verbose=False)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: feeds[name]})
        with torch.no_grad():
            want = module(torch.from_numpy(feeds[name]))
        want = want if isinstance(want, tuple) else (want,)
        assert [g.shape for g in got] == [tuple(w.shape) for w in want]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.numpy(), atol=1e-4)
