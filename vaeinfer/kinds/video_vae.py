"""kind "video-vae": causal video autoencoders (diffusers' AutoencoderKLWan: Wan 2.1 / 2.2, and
AutoencoderKLQwenImage), run as step graphs whose causal caches are explicit inputs and outputs,
so that a clip of any length streams through in memory that does not grow with its length.

A clip of 1 + t k frames (t the temporal downsampling, 4 for Wan) has 1 + k latent frames:

- decoder_first: z (N, c, 1, h, w) -> frames (N, C, 1, H, W), next_cache_i (the caches after the
  first latent frame); decoder: z (N, c, 1, h, w), cache_i -> frames (N, C, t, H, W), next_cache_i,
  once per later latent frame;
- encoder_first: x (N, C, 1, H, W) -> latent_mean, latent_logvar (N, c, 1, h, w), next_cache_i;
  encoder: x (N, C, t, H, W), cache_i -> latent_mean, latent_logvar, next_cache_i, once per later chunk of t frames.

Each cache i has a shape (N, channels, frames, s h, s w) recorded in the manifest's latent slot
(`decoder_cache` / `encoder_cache`: [channels, frames, s] each). H = f h, W = f w with f the
spatial downsampling; h, w >= 2. Runtime: vaeinfer.video_vae.VideoVAE; export:
vaeinfer.export.video_vae.
"""

from __future__ import annotations

import numpy as np

from vaeinfer.errors import BundleError
from vaeinfer.kinds import Kind, register
from vaeinfer.manifest_fields import finite, get, positive
from vaeinfer.spec import BATCH, HEIGHT, LATENT_HEIGHT, LATENT_WIDTH, WIDTH, GraphSpec, TensorSpec, example_inputs

FIRST = {"decoder": "decoder_first", "encoder": "encoder_first"}  # the role of each step graph's first call
MAX_CACHES = 4096


def scaled_axes(s: int, f: int) -> tuple[str, str]:
    """The symbolic (height, width) axes of a tensor s times the latent grid: one name per size."""
    if s == 1:
        return LATENT_HEIGHT, LATENT_WIDTH
    if s == f:
        return HEIGHT, WIDTH
    return f"{LATENT_HEIGHT}*{s}", f"{LATENT_WIDTH}*{s}"


def cache_names(n: int) -> tuple[list[str], list[str]]:
    return [f"cache_{i}" for i in range(n)], [f"next_cache_{i}" for i in range(n)]


def _caches(slots, f: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    ins, outs = cache_names(len(slots))
    shapes = [(BATCH, c, t, *scaled_axes(s, f)) for c, t, s in slots]
    return (tuple(TensorSpec(n, "float32", sh) for n, sh in zip(ins, shapes)),
            tuple(TensorSpec(n, "float32", sh) for n, sh in zip(outs, shapes)))


def video_vae_graphs(channels: int, latent_channels: int, downsample: int, temporal: int,
                     decoder_cache, encoder_cache) -> dict[str, GraphSpec]:
    """The four step graphs (see the module docstring)."""
    f = downsample

    def video(c, t, s):
        return (BATCH, c, t, *scaled_axes(s, f))

    z = TensorSpec("z", "float32", video(latent_channels, 1, 1))
    # not "mean": the exporter names the value of an internal torch.mean (Wan 2.2's AvgDown3D) so
    stats = (TensorSpec("latent_mean", "float32", video(latent_channels, 1, 1)),
             TensorSpec("latent_logvar", "float32", video(latent_channels, 1, 1)))
    dec_in, dec_out = _caches(decoder_cache, f)
    enc_in, enc_out = _caches(encoder_cache, f)
    return {
        "decoder_first": GraphSpec("decoder_first", (z,), (TensorSpec("frames", "float32", video(channels, 1, f)), *dec_out)),
        "decoder": GraphSpec("decoder", (z, *dec_in), (TensorSpec("frames", "float32", video(channels, temporal, f)), *dec_out)),
        "encoder_first": GraphSpec("encoder_first", (TensorSpec("x", "float32", video(channels, 1, f)),), (*stats, *enc_out)),
        "encoder": GraphSpec("encoder", (TensorSpec("x", "float32", video(channels, temporal, f)), *enc_in), (*stats, *enc_out)),
    }


def _slots(latent: dict, key: str, f: int) -> list[list[int]]:
    slots = get(latent, key, list, "latent")
    ok = len(slots) <= MAX_CACHES and all(
        isinstance(s, list) and len(s) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s)
        and s[0] <= 65536 and s[1] <= 64 and f % s[2] == 0 for s in slots)
    if not ok:
        raise BundleError(f"manifest: expected latent.{key} to be a list of [channels, frames, scale] positive ints "
                          f"(scale dividing latent.downsample {f}), got {str(slots)[:80]}")
    return [list(s) for s in slots]


def parse_latent(latent: dict) -> dict:
    """{"channels", "downsample" (spatial), "temporal_downsample", "latents_mean", "latents_std"
    (per channel: diffusion latents are (z - mean) / std), "patch_size", "stochastic",
    "decoder_cache", "encoder_cache"}."""
    out = {"channels": positive(latent, "channels", "latent", 4096),
           "downsample": positive(latent, "downsample", "latent", 1024),
           "temporal_downsample": positive(latent, "temporal_downsample", "latent", 64),
           "patch_size": positive(latent, "patch_size", "latent", 64) if "patch_size" in latent else 1,
           "stochastic": get(latent, "stochastic", bool, "latent")}
    for key in ("latents_mean", "latents_std"):
        values = get(latent, key, list, "latent")
        if len(values) != out["channels"] or not all(finite(v) for v in values) or \
                (key == "latents_std" and not all(v > 0 for v in values)):
            raise BundleError(f"manifest: expected latent.{key} to be {out['channels']} finite numbers"
                              f"{' > 0' if key == 'latents_std' else ''}, got {str(values)[:80]}")
        out[key] = [float(v) for v in values]
    for key in ("decoder_cache", "encoder_cache"):
        out[key] = _slots(latent, key, out["downsample"])
    return out


def parse_image(image: dict, shape: tuple, latent: dict) -> dict:
    """Frames are any multiple of the spatial downsampling f, at least 2 f (each latent side >= 2)."""
    f = latent["downsample"]
    if shape[1] % f or shape[2] % f or min(shape[1:]) < 2 * f:
        raise BundleError(f"manifest: expected image.height/width to be multiples of {f} and >= {2 * f}, "
                          f"got {shape[1]}x{shape[2]}")
    return {"multiple_of": f, "min_size": 2 * f}


def feeds_from_encoder(manifest, enc, labels, rng) -> dict:
    """The first decoder step on the encoder's first latent frame (posterior samples)."""
    mean, logvar = enc[0], enc[1]
    eps = rng.standard_normal(mean.shape, dtype=np.float32)
    return {"decoder_first": {"z": (mean + np.exp(0.5 * logvar) * eps).astype(np.float32)}}


EXAMPLE_SIDE = 128  # the largest frame side precision="auto" measures on


def example_feeds(manifest, spec, rows: int, seed: int) -> dict:
    """Seeded inputs of one step graph (spec.example_inputs) at the native frame size, each side
    capped at EXAMPLE_SIDE (precision="auto" measures on them)."""
    arrays = example_inputs(spec, rows, seed, {}, _example_sizes(manifest), manifest.value_range)
    return {t.name: a for t, a in zip(spec.inputs, arrays)}


def _example_sizes(manifest) -> dict:
    """{axis: size} for every symbolic axis of the graphs at the native size, each side capped."""
    f = manifest.latent["downsample"]
    h, w = (max(2, min(side, EXAMPLE_SIDE) // f) for side in manifest.image[1:])
    sizes = {}
    for _, _, s in (*manifest.latent["decoder_cache"], *manifest.latent["encoder_cache"], (0, 0, 1), (0, 0, f)):
        ah, aw = scaled_axes(s, f)
        sizes[ah], sizes[aw] = s * h, s * w
    return sizes


def _graphs(m) -> dict:
    lat = m.latent
    return video_vae_graphs(m.image[0], lat["channels"], lat["downsample"], lat["temporal_downsample"],
                            lat["decoder_cache"], lat["encoder_cache"])


def runtime_class() -> type:
    from vaeinfer.video_vae import VideoVAE

    return VideoVAE


KIND = register(Kind(
    name="video-vae", runtime_class=runtime_class,
    parse_latent=parse_latent, feeds_from_encoder=feeds_from_encoder, graphs=_graphs, int_limits=lambda m: {},
    latent_keys=("z", "mean"), sample_options=("height", "width"), channels=(3,), likelihoods=("gaussian",), scale_optional=True,
    parse_image=parse_image, example_feeds=example_feeds, companions={role: (first,) for role, first in FIRST.items()},
))
