"""kind "vae" (see vaeinfer.kinds): an encoder/decoder pair -> a validated VAE bundle."""

from __future__ import annotations

from pathlib import Path

import torch

from vaeinfer.export.bundle import export_bundle
from vaeinfer.export.graphs import ExportError
from vaeinfer.spec import vae_graphs


def _likelihood(kind: str, scale: float | None) -> dict:
    from vaeinfer.training.likelihood import Likelihood

    try:
        return Likelihood(kind, scale).to_json()
    except ValueError as e:
        raise ExportError(str(e)) from None


def export_vae(encoder: torch.nn.Module, decoder: torch.nn.Module, image_shape, out_dir: str | Path, *,
               likelihood: str = "bernoulli", scale: float | None = None, name: str | None = None,
               training: dict | None = None, tolerance: float = 1e-4, latent_prior: dict | None = None) -> Path:
    """Export an encoder/decoder pair (see the module docstring) as a validated VAE bundle.

    `latent_prior`: a learned prior as a diagonal Gaussian mixture (numpy arrays log_weights (K,),
    means (K, Z), logvars (K, Z) and source "vamp" or "mog"); None: the standard normal."""
    from vaeinfer.export.latent_prior import prior_files
    from vaeinfer.training.models import latent_dim_of

    image = tuple(int(d) for d in image_shape)
    if len(image) != 3 or image[0] not in (1, 3):
        raise ExportError(f"image_shape must be (C, H, W) with C 1 or 3, got {image_shape}")
    encoder, decoder = encoder.cpu().eval(), decoder.cpu().eval()
    try:
        latent_dim = latent_dim_of(encoder, image)
    except Exception as e:  # a user's module may raise anything
        raise ExportError(f"the encoder cannot run on zeros of shape (2, {', '.join(map(str, image))}): {e}") from None
    prior_file, prior_slot = prior_files(latent_prior, latent_dim)
    return export_bundle(
        out_dir, name=name or Path(out_dir).name, kind="vae", image=image, latent={"dim": latent_dim},
        likelihood=_likelihood(likelihood, scale), modules={"encoder": encoder, "decoder": decoder},
        specs=vae_graphs(image, latent_dim), training=training, tolerance=tolerance,
        extra_files=prior_file, extra_manifest=prior_slot,
    )


def export_run(model, meta: dict, run_dir: Path, out_dir, name: str | None, training: dict) -> Path:
    """A trained run's model (`run_dir` unused: a VAE run has nothing beside its checkpoint); a
    learned prior goes along as prior.npz (a VampPrior's pseudo-input posteriors computed once)."""
    from vaeinfer.training.latent_prior import export_mixture

    lik = meta["likelihood"]
    return export_vae(model.encoder, model.decoder, meta["image_shape"], out_dir, likelihood=lik["kind"],
                      scale=lik.get("scale"), name=name, training=training, latent_prior=export_mixture(model))
