"""kind "spatial-vae": spatial latents (N, c, H / f, W / f) with dynamic height and width;
encoder x -> mean [, logvar], decoder z -> params. Latent-diffusion autoencoders imported from
diffusers (AutoencoderKL, AutoencoderTiny, VQModel; see export/diffusers.py) and conv VAEs with
spatial latents. Runtime: vaeinfer.spatial_vae.SpatialVAE; export: vaeinfer.export.spatial_vae."""

from __future__ import annotations

import numpy as np

from vaeinfer.errors import BundleError
from vaeinfer.kinds import Kind, register
from vaeinfer.manifest_fields import finite, get, positive
from vaeinfer.spec import (BATCH, HEIGHT, LATENT_HEIGHT, LATENT_WIDTH, WIDTH, GraphSpec, TensorSpec, example_inputs,
                           smooth_images)


def spatial_vae_graphs(channels: int, latent_channels: int, stochastic: bool = True) -> dict[str, GraphSpec]:
    """Spatial-latent VAE (latent-diffusion autoencoders): encoder x (N, C, height, width) ->
    mean [, logvar] (N, c, latent_height, latent_width); decoder z -> params (N, C, height, width).
    Height and width are dynamic (multiples of the downsampling factor, see the manifest)."""
    image = (BATCH, channels, HEIGHT, WIDTH)
    latent = (BATCH, latent_channels, LATENT_HEIGHT, LATENT_WIDTH)
    outputs = (TensorSpec("mean", "float32", latent),) + ((TensorSpec("logvar", "float32", latent),) if stochastic else ())
    return {
        "encoder": GraphSpec("encoder", (TensorSpec("x", "float32", image),), outputs),
        "decoder": GraphSpec("decoder", (TensorSpec("z", "float32", latent),), (TensorSpec("params", "float32", image),)),
    }


def parse_latent(latent: dict) -> dict:
    """{"channels", "downsample", "scaling_factor" (1.0 when absent), "shift_factor" (0.0),
    "stochastic" (the encoder gives logvar too), "quantized" (the decoder quantizes: VQModel)}."""
    out = {"channels": positive(latent, "channels", "latent", 4096),
           "downsample": positive(latent, "downsample", "latent", 1024)}
    for key, default in (("scaling_factor", 1.0), ("shift_factor", 0.0)):
        value = latent.get(key, default)
        if not finite(value) or (key == "scaling_factor" and value <= 0):
            want = "a finite number > 0" if key == "scaling_factor" else "a finite number"
            raise BundleError(f"manifest: expected latent.{key} to be {want}, got {value!r:.40}")
        out[key] = float(value)
    for key in ("stochastic", "quantized"):
        out[key] = get(latent, key, bool, "latent")
    return out


def feeds_from_encoder(manifest, enc, labels, rng) -> dict:
    """The decoder on posterior samples z = mean + std * eps (the mean for a deterministic encoder)."""
    mean = enc[0]
    if len(enc) == 1:
        return {"decoder": {"z": np.ascontiguousarray(mean, np.float32)}}
    eps = rng.standard_normal(mean.shape, dtype=np.float32)
    return {"decoder": {"z": (mean + np.exp(0.5 * enc[1]) * eps).astype(np.float32)}}


def parse_image(image: dict, shape: tuple, latent: dict) -> dict:
    """The image slot's size rules, kept with the latent facts: "multiple_of" (H and W must be
    multiples of it; default the downsampling factor) and "min_size" (default multiple_of)."""
    f = latent["downsample"]
    multiple = positive(image, "multiple_of", "image", 4096) if "multiple_of" in image else f
    if multiple % f:
        raise BundleError(f"manifest: expected image.multiple_of to be a multiple of latent.downsample ({f}), got {multiple}")
    min_size = positive(image, "min_size", "image", 4096) if "min_size" in image else multiple
    if shape[1] % multiple or shape[2] % multiple or min(shape[1:]) < min_size:
        raise BundleError(f"manifest: expected image.height/width (the native size) to be multiples of {multiple} "
                          f"and >= {min_size}, got {shape[1]}x{shape[2]}")
    return {"multiple_of": multiple, "min_size": min_size}


EXAMPLE_SIDE = 256  # the largest image side precision="auto" measures on (time grows with the pixels, ratios hardly)


def example_feeds(manifest, spec, rows: int, seed: int) -> dict:
    """Inputs as the graphs meet them in a latent-diffusion pipeline, at the native size with each
    side capped at EXAMPLE_SIDE: the encoder smooth, photo-like images (spec.smooth_images); the
    decoder a diffusion model's N(0, 1) latents unscaled as `decode(z, scaled=True)` does
    (z / scaling_factor + shift_factor), not N(0, 1) raw latents, which would understate the
    range int8 or bf16 must cover."""
    lat = manifest.latent
    f, multiple = lat["downsample"], lat["multiple_of"]
    h, w = (max(multiple, min(side, EXAMPLE_SIDE) // multiple * multiple) for side in manifest.image[1:])
    sizes = {HEIGHT: h, WIDTH: w, LATENT_HEIGHT: h // f, LATENT_WIDTH: w // f}
    feeds = {t.name: a for t, a in zip(spec.inputs, example_inputs(spec, rows, seed, {}, sizes, manifest.value_range))}
    if "x" in feeds:
        feeds["x"] = smooth_images(rows, manifest.image[0], h, w, seed, manifest.value_range)
    if "z" in feeds:
        feeds["z"] = (feeds["z"] / np.float32(lat["scaling_factor"]) + np.float32(lat["shift_factor"])).astype(np.float32)
    return feeds


def runtime_class() -> type:
    from vaeinfer.spatial_vae import SpatialVAE

    return SpatialVAE


KIND = register(Kind(
    name="spatial-vae", runtime_class=runtime_class,
    parse_latent=parse_latent, feeds_from_encoder=feeds_from_encoder,
    graphs=lambda m: spatial_vae_graphs(m.image[0], m.latent["channels"], m.latent["stochastic"]),
    int_limits=lambda m: {},
    latent_keys=("z", "mean"), sample_options=("height", "width", "tile", "max_memory", "tile_mode"), scorable=True,
    channels=(1, 3, 4), likelihoods=("gaussian", "laplace"), scale_optional=True, parse_image=parse_image, example_feeds=example_feeds,
))
