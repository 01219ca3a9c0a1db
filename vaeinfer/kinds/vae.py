"""kind "vae": a flat Gaussian latent (N, Z); encoder x -> (mean, logvar), decoder z -> params."""

from __future__ import annotations

import numpy as np

from vaeinfer.kinds import Kind, register
from vaeinfer.manifest_fields import positive
from vaeinfer.spec import BATCH, GraphSpec, TensorSpec


def vae_graphs(image: tuple[int, int, int], latent_dim: int) -> dict[str, GraphSpec]:
    """VAE: encoder x -> (mean, logvar); decoder z -> likelihood parameters."""
    x = TensorSpec("x", "float32", (BATCH, *image))
    return {
        "encoder": GraphSpec("encoder", (x,), (TensorSpec("mean", "float32", (BATCH, latent_dim)),
                                                TensorSpec("logvar", "float32", (BATCH, latent_dim)))),
        "decoder": GraphSpec("decoder", (TensorSpec("z", "float32", (BATCH, latent_dim)),),
                             (TensorSpec("params", "float32", (BATCH, *image)),)),
    }


def feeds_from_encoder(manifest, enc, labels, rng) -> dict:
    """The decoder on posterior samples z = mean + std * eps."""
    mean, logvar = enc
    eps = rng.standard_normal(mean.shape, dtype=np.float32)
    return {"decoder": {"z": (mean + np.exp(0.5 * logvar) * eps).astype(np.float32)}}


def parse_latent(latent: dict) -> dict:
    return {"dim": positive(latent, "dim", "latent")}


def runtime_class() -> type:
    from vaeinfer.vae import VAE

    return VAE


KIND = register(Kind(
    name="vae", runtime_class=runtime_class,
    parse_latent=parse_latent, feeds_from_encoder=feeds_from_encoder,
    graphs=lambda m: vae_graphs(m.image, m.latent["dim"]),
    int_limits=lambda m: {},
    latent_keys=("z", "mean"), scorable=True, latent_prior_slot=True, manifold=True,
))
