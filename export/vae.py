"""kind "vae" (see vaeinfer.kinds): an encoder/decoder pair -> a validated VAE bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vaeinfer import export
from vaeinfer.export.bundle import export_bundle
from vaeinfer.export.graphs import ExportError
from vaeinfer.kinds.vae import KIND, vae_graphs


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
        out_dir, name=name or Path(out_dir).name, kind=KIND.name, image=image, latent={"dim": latent_dim},
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


def variant_errors(ref, var, x, labels, nll_images: int, nll_samples: int, seed: int) -> dict:
    """A precision variant `var` against the fp32 model `ref` (both loaded) on images `x`, for
    `vaeinfer.export.variants.evaluate`: the posterior mean (and logvar), the decoder on it, the
    reconstruction, and the NLL where the model scores. A continuous latent: spatial VAEs use it too."""
    from vaeinfer.export.variants import abs_errors

    errors = {}
    pa, pb = ref.encode(x), var.encode(x)
    errors["encoder"] = {"mean": abs_errors(pa.mean, pb.mean)}
    if pa.logvar is not None:
        errors["encoder"]["logvar"] = abs_errors(pa.logvar, pb.logvar)
    errors["decoder"] = {"params": abs_errors(ref.decode_params(pa.mean), var.decode_params(pa.mean)),
                         "images": abs_errors(ref.decode(pa.mean), var.decode(pa.mean))}
    errors["reconstruction"] = abs_errors(ref.decode(pa.mean), var.decode(pb.mean))
    # an imported spatial VAE (no likelihood scale, or a deterministic encoder) has no NLL
    scorable = ref.manifest.likelihood["kind"] == "bernoulli" or "scale" in ref.manifest.likelihood
    if nll_images and scorable and pa.logvar is not None:
        xs = x[:nll_images]
        na = ref.score(xs, samples=nll_samples, seed=seed).nll
        nb = var.score(xs, samples=nll_samples, seed=seed).nll
        errors["nll"] = {"images": len(xs), "samples": nll_samples, "fp32": float(na.mean()),
                         "variant": float(nb.mean()), "diff": float(nb.mean() - na.mean()),
                         "max_abs_diff": float(np.abs(nb - na).max())}
    return errors


export.register(KIND.name, export_run, variant_errors)
