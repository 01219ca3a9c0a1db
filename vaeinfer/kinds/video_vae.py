"""kind "video-vae": causal video autoencoders (diffusers' AutoencoderKLWan: Wan 2.1 / 2.2, and
AutoencoderKLQwenImage), run as step graphs whose causal caches are explicit inputs and outputs,
so that a clip of any length streams through in memory that does not grow with its length.

A clip of 1 + t k frames (t the temporal downsampling, 4 for Wan) has 1 + k latent frames. Each
step is split in two graphs at the model's mid-block, so that the heavy full-resolution part runs
on spatial tiles (vaeinfer.video_vae; exact: every layer outside the mid-block's attention is
spatially local) while the attention sees the whole frame at latent resolution:

- decoder_first / decoder: z (N, c, 1, h, w) -> decoder_hidden (N, d, 1, h, w), next_cache_i: the
  decoder's conv_in and mid-block, on the whole frame (decoder_first on the first latent frame,
  with no cache in; decoder on each later one);
- decoder_first_up / decoder_up: decoder_hidden (a tile of it) -> frames (N, C, 1 or t, f h, f w),
  next_cache_i: the up blocks and the head (unpatchify and the final clamp inside), per tile;
- encoder_first / encoder: x (N, C, 1 or t, f h, f w) (a tile of the frames) -> encoder_hidden
  (N, e, 1, h, w), next_cache_i: patchify, conv_in and the down blocks, per tile (encoder_first on
  the first frame, encoder on each later chunk of t frames);
- encoder_first_mid / encoder_mid: encoder_hidden -> latent_mean, latent_logvar (N, c, 1, h, w),
  next_cache_i: the mid-block, the head and quant_conv (the logvar clamp inside), on the whole frame.

Each graph has its own caches cache_0, ... (the steady graph's inputs; both graphs of a pair output
next_cache_0, ...), shapes (N, channels, frames, s h, s w) recorded in the manifest's latent slot as
[channels, frames, s] each: `decoder_cache` (decoder's), `decoder_up_cache`, `encoder_cache`,
`encoder_mid_cache`; `decoder_hidden` / `encoder_hidden` are d and e; `decoder_halo` /
`encoder_halo` the latent pixels a tile of the tiled graphs (decoder_up, encoder) needs beyond
its core (their receptive field's radius, measured at export).

Bundles exported before the split have four graphs, one per step (decoder_first / decoder: z ->
frames; encoder_first / encoder: x -> latent_mean, latent_logvar), caches in `decoder_cache` /
`encoder_cache`, and no `*_up_cache`, `*_mid_cache`, `*_hidden` or `*_halo` field: they run
untiled. H = f h, W = f w with f the spatial downsampling; h, w >= 2. Runtime:
vaeinfer.video_vae.VideoVAE; export: vaeinfer.export.video_vae.
"""

from __future__ import annotations

import numpy as np

from vaeinfer.errors import BundleError
from vaeinfer.kinds import Kind, register
from vaeinfer.manifest_fields import finite, get, positive
from vaeinfer.spec import BATCH, HEIGHT, LATENT_HEIGHT, LATENT_WIDTH, WIDTH, GraphSpec, TensorSpec, example_inputs

# the role of each step graph's first call; a bundle exported before the split has the first two only
FIRST = {"decoder": "decoder_first", "encoder": "encoder_first",
         "decoder_up": "decoder_first_up", "encoder_mid": "encoder_first_mid"}
TILED = {"decoder": "decoder_up", "encoder": "encoder"}  # per direction, the step graph that runs per tile
# the latent fields of a split bundle (all or none): its second graphs' caches, the tensors
# between the two graphs, the halos of the tiled graphs
SPLIT_KEYS = ("decoder_up_cache", "encoder_mid_cache", "decoder_hidden", "encoder_hidden", "decoder_halo",
              "encoder_halo")
MAX_CACHES = 4096
MAX_HALO = 4096


def is_split(latent: dict) -> bool:
    """Whether a (parsed) latent slot describes split step graphs, which run in tiles."""
    return "decoder_halo" in latent


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


def _pair(step: str, ins: tuple, outs: tuple, slots, f: int) -> dict[str, GraphSpec]:
    """A step graph and its first-step graph: `ins` and `outs` are (the first graph's, the step
    graph's) tensors; the step graph also takes the caches, and both give the next caches."""
    cache_in, cache_out = _caches(slots, f)
    first = FIRST[step]
    return {first: GraphSpec(first, ins[0], (*outs[0], *cache_out)),
            step: GraphSpec(step, (*ins[1], *cache_in), (*outs[1], *cache_out))}


def video_vae_graphs(channels: int, latent: dict) -> dict[str, GraphSpec]:
    """The step graphs (see the module docstring) for a parsed latent slot: the eight split
    graphs, or the four of a bundle exported before the split."""
    f, t, c = latent["downsample"], latent["temporal_downsample"], latent["channels"]

    def video(name, ch, frames, s):
        return TensorSpec(name, "float32", (BATCH, ch, frames, *scaled_axes(s, f)))

    def both(v):
        return (v,), (v,)

    z = video("z", c, 1, 1)
    # not "mean": the exporter names the value of an internal torch.mean (Wan 2.2's AvgDown3D) so
    stats = (video("latent_mean", c, 1, 1), video("latent_logvar", c, 1, 1))
    x = (video("x", channels, 1, f),), (video("x", channels, t, f),)
    frames = (video("frames", channels, 1, f),), (video("frames", channels, t, f),)
    if not is_split(latent):
        return {**_pair("decoder", both(z), frames, latent["decoder_cache"], f),
                **_pair("encoder", x, (stats, stats), latent["encoder_cache"], f)}
    dec = both(video("decoder_hidden", latent["decoder_hidden"], 1, 1))
    enc = both(video("encoder_hidden", latent["encoder_hidden"], 1, 1))
    return {**_pair("decoder", both(z), dec, latent["decoder_cache"], f),
            **_pair("decoder_up", dec, frames, latent["decoder_up_cache"], f),
            **_pair("encoder", x, enc, latent["encoder_cache"], f),
            **_pair("encoder_mid", enc, (stats, stats), latent["encoder_mid_cache"], f)}


def _slots(latent: dict, key: str, f: int) -> list[list[int]]:
    slots = get(latent, key, list, "latent")
    ok = len(slots) <= MAX_CACHES and all(
        isinstance(s, list) and len(s) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s)
        and s[0] <= 65536 and s[1] <= 64 and f % s[2] == 0 for s in slots)
    if not ok:
        raise BundleError(f"manifest: expected latent.{key} to be a list of [channels, frames, scale] positive ints "
                          f"(scale dividing latent.downsample {f}), got {str(slots)[:80]}")
    return [list(s) for s in slots]


def _halo(latent: dict, key: str) -> int:
    value = get(latent, key, int, "latent")
    if not 0 <= value <= MAX_HALO:
        raise BundleError(f"manifest: expected latent.{key} (latent pixels a tile needs beyond its core) "
                          f"in [0, {MAX_HALO}], got {value}")
    return value


def parse_latent(latent: dict) -> dict:
    """{"channels", "downsample" (spatial), "temporal_downsample", "latents_mean", "latents_std"
    (per channel: diffusion latents are (z - mean) / std), "patch_size", "stochastic",
    "decoder_cache", "encoder_cache"}, and for split step graphs (`is_split`) "decoder_up_cache",
    "encoder_mid_cache", "decoder_hidden", "encoder_hidden", "decoder_halo", "encoder_halo"."""
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
    present = [k for k in SPLIT_KEYS if k in latent]
    if present and len(present) < len(SPLIT_KEYS):
        raise BundleError(f"manifest: latent has {present} but not {[k for k in SPLIT_KEYS if k not in latent]}: "
                          f"split step graphs need all of {list(SPLIT_KEYS)}")
    if present:
        for key in ("decoder_up_cache", "encoder_mid_cache"):
            out[key] = _slots(latent, key, out["downsample"])
        for key in ("decoder_hidden", "encoder_hidden"):
            out[key] = positive(latent, key, "latent", 65536)
        for key in ("decoder_halo", "encoder_halo"):
            out[key] = _halo(latent, key)
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
    lat = manifest.latent
    slots = [s for key in ("decoder_cache", "encoder_cache", "decoder_up_cache", "encoder_mid_cache")
             for s in lat.get(key, ())]
    for _, _, s in (*slots, (0, 0, 1), (0, 0, f)):
        ah, aw = scaled_axes(s, f)
        sizes[ah], sizes[aw] = s * h, s * w
    return sizes


def _graphs(m) -> dict:
    return video_vae_graphs(m.image[0], m.latent)


def runtime_class() -> type:
    from vaeinfer.video_vae import VideoVAE

    return VideoVAE


KIND = register(Kind(
    name="video-vae", runtime_class=runtime_class,
    parse_latent=parse_latent, feeds_from_encoder=feeds_from_encoder, graphs=_graphs, int_limits=lambda m: {},
    latent_keys=("z", "mean"), sample_options=("height", "width"), channels=(3,), likelihoods=("gaussian",), scale_optional=True,
    parse_image=parse_image, example_feeds=example_feeds, companions={
        "decoder": ("decoder_first", "decoder_first_up", "decoder_up"),
        "encoder": ("encoder_first", "encoder_first_mid", "encoder_mid")},
))
