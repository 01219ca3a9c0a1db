"""kind "vae": a flat Gaussian latent (N, Z); encoder x -> (mean, logvar), decoder z -> params."""

from __future__ import annotations

import numpy as np

from vaeinfer.kinds import Kind, register
from vaeinfer.manifest_fields import positive
from vaeinfer.spec import vae_graphs


def feeds_from_encoder(manifest, enc, labels, rng) -> dict:
    """The decoder on posterior samples z = mean + std * eps."""
    mean, logvar = enc
    eps = rng.standard_normal(mean.shape, dtype=np.float32)
    return {"decoder": {"z": (mean + np.exp(0.5 * logvar) * eps).astype(np.float32)}}


def parse_latent(latent: dict) -> dict:
    return {"dim": positive(latent, "dim", "latent")}


KIND = register(Kind(
    name="vae", runtime="vaeinfer.vae:VAE", export_module="vaeinfer.export.vae",
    parse_latent=parse_latent, feeds_from_encoder=feeds_from_encoder,
    graphs=lambda m: vae_graphs(m.image, m.latent["dim"]),
    int_limits=lambda m: {},
    latent_keys=("z", "mean"), scorable=True, latent_prior_slot=True,
))
