"""PyTorch -> validated ONNX bundle.

    from vaeinfer.export import export_checkpoint, export_vae
    export_checkpoint("runs/my-vae", "bundles/my-vae")          # a run trained by `training`
    export_vae(my_encoder, my_decoder, (1, 28, 28), "bundles/x") # any module pair

A user's own modules follow the documented interface: `encoder(x) -> (mean, logvar)` with x
(N, C, H, W) float32 in [0, 1] and mean/logvar (N, Z); `decoder(z) -> params` (N, C, H, W), the
likelihood's parameters (Bernoulli logits, or the Gaussian mean whose fixed scale you pass).

Each kind's export module (export/<kind>.py) registers its `Exporter` here with `register` when
imported; this package imports them all (at the end), so `EXPORTERS` is complete once
`vaeinfer.export` is. Adding a kind: its module calls `register(KIND.name, export_run,
variant_errors)` (and `variant_feeds=` when its graphs are not driven by one encoder call), and
its import goes below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vaeinfer.export.graphs import ExportError

__all__ = ["export_vae", "export_checkpoint", "ExportError", "EXPORTERS", "register"]


@dataclass(frozen=True)
class Exporter:
    # (model, checkpoint meta, run_dir, out_dir, name | None, training facts) -> the bundle's path:
    # a run trained by `training` (export_checkpoint)
    export_run: Callable[..., Path]
    # (ref, var, x, labels, nll_images, nll_samples, seed) -> the errors of a precision variant `var`
    # against the fp32 `ref`, both loaded, on the kind's data x (images; clips for a video kind)
    # (variants.evaluate); must include "reconstruction" (max/mean abs), which the export bounds
    variant_errors: Callable[..., dict]
    # (Manifest, {role: fp32 onnxruntime session}, data, labels | None, seed) -> {role: {input name:
    # array}}: each graph's inputs as the calibration data drive them, rows stacked (the fp16
    # overflow check, int8 calibration, speed-ups); None: variants.graph_feeds (the encoder on the
    # images in one call, the other graphs from its outputs)
    variant_feeds: Callable[..., dict] | None = None


EXPORTERS: dict[str, Exporter] = {}  # kind name (vaeinfer.kinds) -> its exporter


def register(kind: str, export_run: Callable[..., Path], variant_errors: Callable[..., dict],
             variant_feeds: Callable[..., dict] | None = None) -> Exporter:
    EXPORTERS[kind] = Exporter(export_run, variant_errors, variant_feeds)
    return EXPORTERS[kind]


def training_facts(meta: dict) -> dict:
    """What a bundle records of the run that made it."""
    history = meta.get("history") or []
    return {"arch": meta["arch"], "model_args": meta["model_args"], "data": meta.get("data"),
            "epochs": history[-1]["epoch"] if history else 0, "steps": meta["progress"]["global_step"],
            "final_metrics": history[-1] if history else None,
            "config": {k: meta["config"].get(k) for k in ("batch_size", "lr", "lr_schedule", "beta",
                                                          "kl_warmup_epochs", "binarize", "seed",
                                                          "iwae_samples", "precision", "init_from")}}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, name: str | None = None) -> Path:
    """Export a run folder (or its checkpoint.json) made by `training` into a bundle."""
    from vaeinfer.training import checkpoint as ckpt
    from vaeinfer.training.likelihood import Likelihood
    from vaeinfer.training.models import build_model

    tensors, meta = ckpt.load(checkpoint)
    model = build_model(meta["arch"], meta["image_shape"], Likelihood.from_json(meta["likelihood"]), **meta["model_args"])
    model.load_state_dict(ckpt.model_tensors(tensors))
    return EXPORTERS[meta["kind"]].export_run(model, meta, ckpt.resolve(checkpoint).parent, out_dir, name,
                                              training_facts(meta))


from vaeinfer.export import spatial_vae, vae, video_vae, vqvae  # noqa: F401  (each registers its exporter)
from vaeinfer.export.vae import export_vae
