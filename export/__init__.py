"""PyTorch -> validated ONNX bundle.

    from export import export_checkpoint, export_vae
    export_checkpoint("runs/my-vae", "bundles/my-vae")          # a run trained by `training`
    export_vae(my_encoder, my_decoder, (1, 28, 28), "bundles/x") # any module pair

A user's own modules follow the documented interface: `encoder(x) -> (mean, logvar)` with x
(N, C, H, W) float32 in [0, 1] and mean/logvar (N, Z); `decoder(z) -> params` (N, C, H, W), the
likelihood's parameters (Bernoulli logits, or the Gaussian mean whose fixed scale you pass).
"""

from __future__ import annotations

from pathlib import Path

import torch

from export.bundle import export_bundle
from export.graphs import ExportError
from vaeinfer.spec import vae_graphs

__all__ = ["export_vae", "export_checkpoint", "ExportError"]


def _likelihood(kind: str, scale: float | None) -> dict:
    from training.likelihood import Likelihood

    try:
        return Likelihood(kind, scale).to_json()
    except ValueError as e:
        raise ExportError(str(e)) from None


def export_vae(encoder: torch.nn.Module, decoder: torch.nn.Module, image_shape, out_dir: str | Path, *,
               likelihood: str = "bernoulli", scale: float | None = None, name: str | None = None,
               training: dict | None = None, tolerance: float = 1e-4) -> Path:
    """Export an encoder/decoder pair (see the module docstring) as a validated VAE bundle."""
    from training.models import latent_dim_of

    image = tuple(int(d) for d in image_shape)
    if len(image) != 3 or image[0] not in (1, 3):
        raise ExportError(f"image_shape must be (C, H, W) with C 1 or 3, got {image_shape}")
    encoder, decoder = encoder.cpu().eval(), decoder.cpu().eval()
    try:
        latent_dim = latent_dim_of(encoder, image)
    except Exception as e:  # a user's module may raise anything
        raise ExportError(f"the encoder cannot run on zeros of shape (2, {', '.join(map(str, image))}): {e}") from None
    return export_bundle(
        out_dir, name=name or Path(out_dir).name, kind="vae", image=image, latent={"dim": latent_dim},
        likelihood=_likelihood(likelihood, scale), modules={"encoder": encoder, "decoder": decoder},
        specs=vae_graphs(image, latent_dim), training=training, tolerance=tolerance,
    )


def training_facts(meta: dict) -> dict:
    """What a bundle records of the run that made it."""
    history = meta.get("history") or []
    return {"arch": meta["arch"], "model_args": meta["model_args"], "data": meta.get("data"),
            "epochs": history[-1]["epoch"] if history else 0, "steps": meta["progress"]["global_step"],
            "final_metrics": history[-1] if history else None,
            "config": {k: meta["config"].get(k) for k in ("batch_size", "lr", "lr_schedule", "beta",
                                                          "kl_warmup_epochs", "binarize", "seed")}}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, name: str | None = None) -> Path:
    """Export a run folder (or its checkpoint.json) made by `training` into a bundle."""
    from training import checkpoint as ckpt
    from training.likelihood import Likelihood
    from training.models import build_model

    tensors, meta = ckpt.load(checkpoint)
    model = build_model(meta["arch"], meta["image_shape"], Likelihood.from_json(meta["likelihood"]), **meta["model_args"])
    model.load_state_dict(ckpt.model_tensors(tensors))
    if meta["kind"] == "vqvae":
        from export.vq import export_vqvae

        return export_vqvae(model, ckpt.resolve(checkpoint).parent, out_dir, name=name, training=training_facts(meta),
                            vq_weights_sha256=meta["weights"]["sha256"])
    lik = meta["likelihood"]
    return export_vae(model.encoder, model.decoder, meta["image_shape"], out_dir, likelihood=lik["kind"],
                      scale=lik.get("scale"), name=name, training=training_facts(meta))
