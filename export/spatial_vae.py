"""kind "spatial-vae" (see vaeinfer.kinds): any spatial encoder/decoder pair -> a validated bundle
with dynamic height and width.

    from vaeinfer.export.spatial_vae import export_spatial_vae
    export_spatial_vae(encoder, decoder, "bundles/x", channels=3, latent_channels=4, downsample=8,
                       height=256, width=256, value_range=(-1, 1), scaling_factor=0.18215)

The modules: `encoder(x) -> (mean, logvar)` (or `-> mean` with stochastic=False) for x
(N, C, H, W) in `value_range`, latents (N, c, H / f, W / f); `decoder(z) -> params` (N, C, H, W).
H and W may be any multiple of `multiple_of` (default f) from `min_size` up: the graphs are traced
with torch.export Dims (H = multiple_of * k) and validated against the modules at several image
sizes and batch sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.export import Dim

from vaeinfer import export
from vaeinfer.export import vae
from vaeinfer.export.bundle import export_bundle
from vaeinfer.export.graphs import ExportError
from vaeinfer.kinds.spatial_vae import KIND, spatial_vae_graphs
from vaeinfer.spec import smooth_images  # noqa: F401  (its home is the runtime: precision="auto" measures on it)
from vaeinfer.spec import HEIGHT, LATENT_HEIGHT, LATENT_WIDTH, WIDTH, example_inputs

SIZES = ((64, 64), (96, 128))  # image sizes (H, W) validated by default
BATCHES = (1, 2, 3)
TOLERANCE = 5e-4  # max abs error of any output against PyTorch, fp32 (deep conv stacks, values ~1)


def _axes(downsample: int, multiple: int, min_size: int) -> dict:
    """torch.export Dims for the spec's spatial axes: H = multiple * k, h = H / downsample."""
    per = multiple // downsample
    # at least 2 units: the exporter specialises axes of length 0 or 1
    unit_h = Dim("latent_height" if per == 1 else "height_units", min=max(2, -(-min_size // multiple)), max=4096)
    unit_w = Dim("latent_width" if per == 1 else "width_units", min=max(2, -(-min_size // multiple)), max=4096)
    lat_h, lat_w = (unit_h, unit_w) if per == 1 else (per * unit_h, per * unit_w)
    return {HEIGHT: multiple * unit_h, WIDTH: multiple * unit_w, LATENT_HEIGHT: lat_h, LATENT_WIDTH: lat_w}


def _sizes(h: int, w: int, downsample: int) -> dict:
    return {HEIGHT: h, WIDTH: w, LATENT_HEIGHT: h // downsample, LATENT_WIDTH: w // downsample}


def export_spatial_vae(encoder: torch.nn.Module, decoder: torch.nn.Module, out_dir: str | Path, *, channels: int,
                       latent_channels: int, downsample: int, height: int, width: int, value_range=(-1.0, 1.0),
                       scaling_factor: float = 1.0, shift_factor: float = 0.0, stochastic: bool = True,
                       quantized: bool = False, likelihood: dict | None = None, multiple_of: int | None = None,
                       min_size: int | None = None, sizes=SIZES, batches=BATCHES, name: str | None = None,
                       source: dict | None = None, training: dict | None = None,
                       tolerance: float = TOLERANCE, extra_files: dict | None = None,
                       extra_manifest: dict | None = None) -> Path:
    """Export a spatial encoder/decoder pair (see the module docstring) as a validated bundle.

    height/width: the native image size (sample()'s default). likelihood: {"kind": "gaussian" |
    "laplace", "scale"?} (default: a Gaussian mean without a scale: decode only, no score).
    Decoder validation inputs are N(0, 1) / scaling_factor + shift_factor: latents at the scale
    the decoder sees in a diffusion pipeline.
    """
    multiple = int(multiple_of or downsample)
    min_size = int(min_size or multiple)
    if channels not in (1, 3, 4):
        raise ExportError(f"channels must be 1, 3 or 4, got {channels}")
    if multiple % downsample:
        raise ExportError(f"multiple_of ({multiple}) must be a multiple of the downsampling factor ({downsample})")
    sizes = [tuple(int(d) for d in s) for s in sizes]
    for h, w in [(height, width), *sizes]:
        if h % multiple or w % multiple or min(h, w) < max(min_size, 2 * multiple):
            raise ExportError(f"image size {h}x{w}: must be multiples of {multiple}, at least {max(min_size, 2 * multiple)}")
    specs = spatial_vae_graphs(channels, latent_channels, stochastic)
    encoder, decoder = encoder.cpu().eval(), decoder.cpu().eval()
    rng_range = tuple(float(v) for v in value_range)

    def encoder_feeds(batch, seed, size):
        return [smooth_images(batch, channels, size[HEIGHT], size[WIDTH], seed, rng_range)]

    def decoder_feeds(batch, seed, size):
        z = example_inputs(specs["decoder"], batch, seed, sizes=size)[0]
        return [(z / np.float32(scaling_factor) + np.float32(shift_factor)).astype(np.float32)]

    latent = {"channels": latent_channels, "downsample": downsample, "scaling_factor": float(scaling_factor),
              "shift_factor": float(shift_factor), "stochastic": bool(stochastic), "quantized": bool(quantized)}
    return export_bundle(
        out_dir, name=name or Path(out_dir).name, kind=KIND.name, image=(channels, height, width), latent=latent,
        likelihood=likelihood or {"kind": "gaussian"}, modules={"encoder": encoder, "decoder": decoder},
        specs=specs, training=training, tolerance=tolerance, value_range=rng_range,
        spatial={"dims": _axes(downsample, multiple, min_size), "trace": _sizes(*sizes[0], downsample),
                 "sizes": [_sizes(h, w, downsample) for h, w in sizes], "batches": batches,
                 "feeds": {"encoder": encoder_feeds, "decoder": decoder_feeds}},
        image_extra={"multiple_of": multiple, "min_size": min_size},
        extra_manifest={**({"source": source} if source else {}), **(extra_manifest or {})} or None,
        extra_files=extra_files,
    )


def export_run(model, meta: dict, run_dir: Path, out_dir, name: str | None, training: dict) -> Path:
    """A trained run's spatial conv VAE (`vaeinfer train --arch conv-vae --latent spatial`;
    vaeinfer.training.spatial_vae.SpatialVAE: images in the checkpoint's value_range, [-1, 1])."""
    c, h, w = meta["image_shape"]
    f = model.downsample
    return export_spatial_vae(model.encoder, model.decoder, out_dir, channels=c, latent_channels=model.latent_channels,
                              downsample=f, height=h, width=w, value_range=tuple(meta.get("value_range", (-1.0, 1.0))),
                              likelihood=dict(meta["likelihood"]), name=name, training=training,
                              sizes=((h, w), (h + 2 * f, w + 4 * f)))


export.register(KIND.name, export_run, vae.variant_errors)  # a continuous latent, as a VAE's
