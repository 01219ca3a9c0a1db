"""kind "vae": a flat Gaussian latent (N, Z); encoder x -> (mean, logvar), decoder z -> params."""

from __future__ import annotations

from vaeinfer.kinds import Kind, register
from vaeinfer.manifest_fields import positive
from vaeinfer.spec import vae_graphs


def parse_latent(latent: dict) -> dict:
    return {"dim": positive(latent, "dim", "latent")}


KIND = register(Kind(
    name="vae", runtime="vaeinfer.vae:VAE", export_module="export.vae",
    parse_latent=parse_latent,
    graphs=lambda m: vae_graphs(m.image, m.latent["dim"]),
    int_limits=lambda m: {},
    latent_keys=("z", "mean"), scorable=True,
))
