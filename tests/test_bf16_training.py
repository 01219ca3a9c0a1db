"""Training's bf16 mode (`--precision bf16`): the networks under bf16 autocast in channels-last
layout, losses, weights, checkpoints and exports in float32."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vaeinfer
from vaeinfer.export import export_checkpoint
from tests.conftest import CASES, blob_images, write_npz
from vaeinfer.training import checkpoint
from vaeinfer.training.likelihood import Likelihood
from vaeinfer.training.models import build_model
from vaeinfer.training.train import TrainConfig, set_precision, train


@pytest.mark.parametrize("samples", [1, 4])
def test_the_bf16_loss_is_float32_and_close_to_the_fp32_loss(samples):
    torch.manual_seed(0)
    model = build_model("conv-vae", (1, 12, 12), Likelihood("bernoulli"), latent_dim=4, channels=[8, 16], blocks=1,
                        prior="vamp", prior_components=3)
    g = torch.Generator().manual_seed(1)
    x = torch.bernoulli(torch.rand((16, 1, 12, 12), generator=g), generator=g)
    eps = torch.randn((16, samples, 4) if samples > 1 else (16, 4), generator=g)
    fp32 = model.loss(x, x, beta=1.0, eps=eps, samples=samples)
    set_precision(model, TrainConfig(precision="bf16"))
    bf16 = model.loss(x, x, beta=1.0, eps=eps, samples=samples)
    assert model.encoder.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model.encoder.features[0].weight.dtype == torch.float32  # the optimizer's weights stay float32
    for key in ("loss", "recon", "kl"):
        assert bf16[key].dtype == torch.float32
        a, b = float(bf16[key].detach()), float(fp32[key].detach())
        assert abs(a - b) <= 0.02 * abs(b) + 0.05, key
    assert float(bf16["loss"].detach()) != float(fp32["loss"].detach())  # it did run in bf16
    bf16["loss"].backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


def test_a_bf16_run_checkpoints_and_exports_float32(tmp_path):
    data = write_npz(tmp_path / "data.npz", blob_images(40, CASES["conv"].shape, seed=3))
    run = train(CASES["conv"].config(data, epochs=2, lr=0.01, precision="bf16"), tmp_path / "run", progress_bar=False)
    tensors, meta = checkpoint.load(run)
    assert meta["config"]["precision"] == "bf16"
    assert all(math.isfinite(r["val_elbo"]) for r in meta["history"])
    assert all(t.dtype == torch.float32 for k, t in tensors.items() if k.startswith("model."))
    bundle = vaeinfer.load(export_checkpoint(run, tmp_path / "bundle", name="bf16"), device="cpu")
    assert np.isfinite(bundle.sample(4, seed=0)).all()


def test_bf16_is_refused_where_it_does_not_apply(tmp_path):
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16'"):
        TrainConfig(precision="fp16")
    data = write_npz(tmp_path / "data.npz", blob_images(20, (1, 8, 8), seed=3))
    vq = TrainConfig(data=str(data), arch="vqvae", model_args={"codebook_size": 8, "code_dim": 2, "channels": [4]},
                     epochs=1, precision="bf16")
    with pytest.raises(ValueError, match="precision 'bf16' applies to VAEs"):
        train(vq, tmp_path / "vq", progress_bar=False)
