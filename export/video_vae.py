"""kind "video-vae" (see vaeinfer.kinds.video_vae): diffusers' causal video autoencoders
(AutoencoderKLWan: Wan 2.1 and 2.2, patch_size and is_residual included; AutoencoderKLQwenImage)
-> eight validated step graphs whose causal caches are explicit inputs and outputs.

    from vaeinfer.export.diffusers import from_diffusers
    from_diffusers("./Wan2.1-T2V-1.3B-Diffusers/vae", "bundles/wan-vae")

diffusers runs its encoder on the first frame, then on chunks of t = 4 frames, and its decoder on
one latent frame at a time, each call reading and rewriting a list of cached activations
(`feat_cache`: the last frames each causal convolution saw). Each such call is cut in two at the
mid-block (`run_part`: diffusers' own layers, its forward replicated around them), so that the
full-resolution part can run on spatial tiles (vaeinfer.kinds.video_vae names the graphs), and
each part is one graph with its slots of that list made explicit: the caches the part reads are
inputs, the caches it leaves are outputs (diffusers' feat_idx counter tells where the second
part's slots start). The halo a tile of the full-resolution part needs is its receptive field's
radius, measured with autograd on diffusers' layers (`measure_halo`). The list's slots and their
steady shapes are learnt by running diffusers' own layers on a small input; after the first call
diffusers keeps some slots shorter (one frame where later steps keep two) or as the marker "Rep"
(an upsampler that has not yet run its time convolution); the first graphs give those slots their
steady shape by padding with zero frames, which is what diffusers' convolutions pad with, so the
step graphs' shapes never change.

Validation: each graph against its PyTorch module at several batch sizes and sizes, then the
graphs run as the runtime runs them (vaeinfer.video_vae's loops) against diffusers' own
`decode(z).sample` and `encode(x).latent_dist` on whole clips of several lengths, and in tiles
whose inputs are cut exactly at the halo against untiled (`tile_check`).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch.export import Dim

from vaeinfer import export
from vaeinfer.export.bundle import export_bundle
from vaeinfer.export.graphs import ExportError
from vaeinfer.export.spatial_vae import smooth_images
from vaeinfer.kinds.video_vae import FIRST, KIND, TILED, scaled_axes, video_vae_graphs
from vaeinfer.spec import LATENT_HEIGHT
from vaeinfer.video_vae import decode_steps, encode_steps

FAMILIES = ("AutoencoderKLWan", "AutoencoderKLQwenImage")
LATENT_SIZES = ((2, 3), (4, 4))  # latent (h, w) validated by default (frames f times larger)
BATCHES = (1, 2)
LATENT_FRAMES = (1, 2, 3)  # whole clips validated: 1, 1 + t, 1 + 2 t frames (1, 5, 9 for Wan)
TOLERANCE = 5e-4  # each graph against its module (fp32)
CLIP_TOLERANCE = 1e-3  # whole clips against diffusers' own decode / encode (errors add up over steps)
CHECK_SEED = 7
PROBE = (2, 3)  # the latent grid the cache slots are learnt on


def _wan_ops():
    from diffusers.models.autoencoders.autoencoder_kl_wan import patchify, unpatchify

    return patchify, unpatchify


PARTS = {"decoder": ("decoder", "decoder_up"), "encoder": ("encoder", "encoder_mid")}  # per direction, in order
CACHE_T = 2  # the frames diffusers' causal convolutions cache (CACHE_T of both modules)


def _causal(conv, x, feat: list, idx: list):
    """diffusers' conv_in / conv_out call in its encoders' and decoders' forward: the causal conv
    on x with its cache slot, which then keeps x's last two frames."""
    i = idx[0]
    cache = x[:, :, -CACHE_T:].clone()
    if cache.shape[2] < 2 and feat[i] is not None:  # one frame: with the last one cached before
        cache = torch.cat([feat[i][:, :, -1:], cache], dim=2)
    out = conv(x, feat[i])
    feat[i] = cache
    idx[0] += 1
    return out


def _blocks(blocks, x, feat: list, idx: list, **kwargs):
    for block in blocks:
        x = block(x, feat_cache=feat, feat_idx=idx, **kwargs)
    return x


def run_part(vae, part: str, x, feat: list, idx: list, first: bool) -> tuple:
    """One part of a call of diffusers' decoder or encoder (its forward, cut at the mid-block),
    reading and rewriting the cache slots from idx[0] on:

    - "decoder": post_quant_conv, conv_in and the mid-block -> (hidden,);
    - "decoder_up": the up blocks and the head, unpatchify -> (frames,), not clamped;
    - "encoder": patchify, conv_in and the down blocks -> (hidden,);
    - "encoder_mid": the mid-block, the head and quant_conv -> (mean, logvar), not clamped.
    `first`: the call on the first frame (Wan 2.2's up blocks then drop the frames they would add)."""
    patch = int(vae.config.get("patch_size") or 1)
    dec, enc = vae.decoder, vae.encoder
    if part == "decoder":
        return (dec.mid_block(_causal(dec.conv_in, vae.post_quant_conv(x), feat, idx), feat_cache=feat, feat_idx=idx),)
    if part == "decoder_up":
        kwargs = {"first_chunk": True} if first and "first_chunk" in inspect.signature(
            dec.up_blocks[0].forward).parameters else {}
        out = _causal(dec.conv_out, dec.nonlinearity(dec.norm_out(_blocks(dec.up_blocks, x, feat, idx, **kwargs))),
                      feat, idx)
        return (_wan_ops()[1](out, patch) if patch > 1 else out,)
    if part == "encoder":
        x = _wan_ops()[0](x, patch) if patch > 1 else x
        return (_blocks(enc.down_blocks, _causal(enc.conv_in, x, feat, idx), feat, idx),)
    x = enc.nonlinearity(enc.norm_out(enc.mid_block(x, feat_cache=feat, feat_idx=idx)))
    return tuple(torch.chunk(vae.quant_conv(_causal(enc.conv_out, x, feat, idx)), 2, dim=1))


class _Step(torch.nn.Module):
    """One part of one call of diffusers' encoder or decoder (`run_part`), its feat_cache slots
    made explicit: (input, *caches) -> (*outputs, *next caches), with the final clamp of the
    frames and the posterior's logvar clamp inside. `slots`: the part's [(slot index, channels,
    frames, scale)]; `start`: its first slot index; `first`: the call on the first frame (no
    cache in); its caches come out in their steady shapes."""

    def __init__(self, vae, part: str, first: bool, slots: list, n: int, start: int):
        super().__init__()
        self.vae, self.part, self.first, self.n, self.start = vae, part, first, n, start
        self.used = [idx for idx, *_ in slots]
        self.shapes = [tuple(shape) for _, *shape in slots]

    def forward(self, x, *caches):
        feat = [None] * self.n
        for idx, cache in zip(self.used, caches):
            feat[idx] = cache
        outs = run_part(self.vae, self.part, x, feat, [self.start], self.first)
        if self.part == "decoder_up":
            outs = (outs[0].clamp(-1.0, 1.0),)
        elif self.part == "encoder_mid":
            outs = (outs[0], outs[1].clamp(-30.0, 20.0))  # DiagonalGaussianDistribution's clamp
        grid = x if self.part.startswith("decoder") else outs[0]  # the latent grid
        n, h, w = grid.shape[0], grid.shape[3], grid.shape[4]
        new = []
        for idx, (c, t, s) in zip(self.used, self.shapes):
            v = feat[idx]
            if not isinstance(v, torch.Tensor):  # "Rep": diffusers then pads its time conv with zeros
                v = grid.new_zeros((n, c, t, h * s, w * s))
            elif v.shape[2] < t:  # fewer frames seen yet: the zero frames diffusers' conv pads with
                v = F.pad(v, (0, 0, 0, 0, t - v.shape[2], 0))
            new.append(v)
        return (*outs, *new)


def facts(vae) -> dict:
    """Spatial / temporal downsampling, patch size and channels of a diffusers video VAE."""
    cfg = vae.config
    patch = int(cfg.get("patch_size") or 1)
    # Wan 2.2 states its channels after patchify (in_channels 12 = 3 x 2 x 2)
    channels = int(cfg.get("in_channels", cfg.get("input_channels", 3))) // (patch * patch)
    return {"channels": channels, "latent_channels": int(cfg["z_dim"]),
            "downsample": 2 ** (len(cfg["dim_mult"]) - 1) * patch,
            "temporal": 2 ** sum(bool(d) for d in cfg["temperal_downsample"]), "patch_size": patch}


def _probe_input(fx: dict, direction: str, frames: int, h: int, w: int, g, hidden: int | None = None):
    """Random input of a direction's first part (z, or frames in [-1, 1]); with `hidden`: of its
    second part's tiled counterpart, the decoder's hidden tensor (for `measure_halo`)."""
    if direction == "decoder":
        return torch.randn((1, hidden or fx["latent_channels"], 1, h, w), generator=g)
    f = fx["downsample"]
    return torch.rand((1, fx["channels"], frames, h * f, w * f), generator=g) * 2 - 1


def probe_slots(vae, direction: str) -> dict:
    """What a direction's step graphs need, learnt by running diffusers' own layers (`run_part`)
    on a small input: a first call, then two steps (which must agree). {"parts": {part: [(slot
    index, channels, frames, scale)]}, the cache slots each of the direction's two parts uses in
    steady state; "n": the slot count; "split": the second part's first slot; "hidden": the
    channels of the tensor between the parts}."""
    fx = facts(vae)
    f, t = fx["downsample"], fx["temporal"]
    vae.clear_cache()
    n = len(vae._feat_map if direction == "decoder" else vae._enc_feat_map)
    g = torch.Generator().manual_seed(0)
    h, w = PROBE
    feat = [None] * n
    first_part, second = PARTS[direction]

    def call(frames: int, first: bool):
        idx = [0]
        hidden = run_part(vae, first_part, _probe_input(fx, direction, frames, h, w, g), feat, idx, first)[0]
        split = idx[0]
        run_part(vae, second, hidden, feat, idx, first)
        return [tuple(v.shape) if isinstance(v, torch.Tensor) else v for v in feat], split, hidden.shape[1]

    with torch.no_grad():
        call(1, True)
        steady = call(t, False)
        if call(t, False) != steady:
            raise ExportError(f"{direction}: diffusers' cache shapes change from step to step; cannot export fixed "
                              f"step graphs")
    vae.clear_cache()
    shapes, split, hidden = steady
    slots = []
    for idx, shape in enumerate(shapes):
        if shape is None:
            continue  # a conv that caches nothing (a 1x1x1 shortcut)
        if not isinstance(shape, tuple) or len(shape) != 5:
            raise ExportError(f"{direction}: cache slot {idx} holds {shape!r} in steady state; expected a tensor")
        s = shape[3] // h
        if s < 1 or shape[3] != s * h or shape[4] != s * w or f % s:
            raise ExportError(f"{direction}: cache slot {idx} has shape {shape} for a {h}x{w} latent; expected a "
                              f"multiple of it")
        slots.append((idx, shape[1], shape[2], s))
    return {"parts": {first_part: [v for v in slots if v[0] < split], second: [v for v in slots if v[0] >= split]},
            "n": n, "split": split, "hidden": hidden}


HALO_PROBE = 16  # the first probe of measure_halo: 2 HALO_PROBE + 1 latent pixels long
MAX_HALO_PROBE = 512


def measure_halo(vae, direction: str, probe: dict) -> int:
    """The latent pixels a tile of the direction's tiled part (the decoder's up blocks and head,
    the encoder's conv_in and down blocks) needs beyond its core: the radius of the part's
    receptive field, from autograd on diffusers' own layers: the input pixels on which one latent
    row (column) of its outputs depends, on a probe long in that axis and 2 latent pixels wide
    (the first call, no caches: the time convolutions of later calls are spatially pointwise).
    The probe grows until the dependence ends inside it; ExportError where it never does (a
    spatially global layer, such as an attention in the up or down blocks)."""
    fx = facts(vae)
    tiled = TILED[direction]
    first_part = tiled == PARTS[direction][0]  # the encoder's: it starts at slot 0 and takes the frames
    hidden, start = (None, 0) if first_part else (probe["hidden"], probe["split"])
    f_in, f_out = (1, fx["downsample"]) if direction == "decoder" else (fx["downsample"], 1)
    g = torch.Generator().manual_seed(0)
    radius = 0
    for axis in (3, 4):
        length = 2 * HALO_PROBE + 1
        while True:
            c = length // 2
            x = _probe_input(fx, direction, 1, *((length, 2) if axis == 3 else (2, length)), g, hidden)
            x.requires_grad_(True)
            out = run_part(vae, tiled, x, [None] * probe["n"], [start], True)[0]
            (grad,) = torch.autograd.grad(out.narrow(axis, c * f_out, f_out).sum(), x)
            reach = torch.nonzero(grad.abs().sum(dim=[d for d in range(5) if d != axis])).flatten()
            lo, hi = int(reach.min()), int(reach.max())
            if lo > 0 and hi < length * f_in - 1:
                radius = max(radius, -(-max(c * f_in - lo, hi - (c + 1) * f_in + 1) // f_in))
                break
            if length > MAX_HALO_PROBE:
                raise ExportError(f"{direction}: the outputs of {tiled!r} depend on more than {MAX_HALO_PROBE} latent "
                                  f"pixels around them (a spatially global layer?); its frames cannot be tiled")
            length = 2 * length + 1
    return radius


class _Session:
    """What vaeinfer.video_vae's loops use of a runtime Graph: run(feeds, batch_size) -> outputs."""

    def __init__(self, data: bytes):
        self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds, _batch_size=None):
        return self.session.run(self.names, feeds)


def clips(n: int, frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """Smooth synthetic clips (n, 3, frames, height, width) in [-1, 1]: a slowly moving pattern."""
    flat = smooth_images(n * frames, 3, height, width, seed)
    a = flat.reshape(n, frames, 3, height, width).transpose(0, 2, 1, 3, 4)
    drift = np.linspace(0.0, 1.0, frames, dtype=np.float32)[None, None, :, None, None]
    base = a[:, :, :1]  # mostly the first frame, drifting towards the others: like a video
    return np.ascontiguousarray(np.clip(base * (1 - 0.3 * drift) + 0.3 * drift * a, -1, 1), np.float32)


def _sessions(files: dict[str, bytes], latent: dict) -> dict:
    """role -> _Session of every step graph (video_vae_graphs for its roles: the channels do not matter)."""
    return {role: _Session(files[f"{role}.onnx"]) for role in video_vae_graphs(3, latent)}


def _chunks(x: np.ndarray, t: int) -> list[np.ndarray]:
    """A clip (N, C, 1 + t k, H, W) as the encoder steps take it: its first frame, then chunks of t."""
    return [x[:, :, :1]] + [np.ascontiguousarray(x[:, :, i:i + t]) for i in range(1, x.shape[2], t)]


def clip_check(vae, latent: dict, sizes, batches, latent_frames, tolerance: float):
    """files -> figures: the graphs run step by step as the runtime runs them (untiled), against
    diffusers' own decode(z).sample and encode(x).latent_dist on whole clips."""
    fx = facts(vae)
    f, t, c = fx["downsample"], fx["temporal"], fx["latent_channels"]
    mean, std = (np.asarray(latent[k], np.float32).reshape(1, -1, 1, 1, 1) for k in ("latents_mean", "latents_std"))

    def check(files: dict[str, bytes]) -> dict:
        s = _sessions(files, latent)
        rng = np.random.default_rng(CHECK_SEED)
        worst = {"decode": 0.0, "encode_mean": 0.0, "encode_logvar": 0.0}
        vae.use_tiling = vae.use_slicing = False
        for h, w in sizes:
            for n in batches:
                for k in latent_frames:
                    z = (rng.standard_normal((n, c, k, h, w), dtype=np.float32) * std + mean).astype(np.float32)
                    with torch.no_grad():
                        ref = vae.decode(torch.from_numpy(z)).sample.numpy()
                    got = np.concatenate(list(decode_steps(s, latent, z)), axis=2)
                    worst["decode"] = max(worst["decode"], _err(ref, got, "decode", z.shape))
                    x = clips(n, 1 + t * (k - 1), h * f, w * f, int(rng.integers(1 << 30)))
                    with torch.no_grad():
                        dist = vae.encode(torch.from_numpy(x)).latent_dist
                    outs = list(encode_steps(s, latent, _chunks(x, t)))
                    for key, ref_v, got_v in (("encode_mean", dist.mean, [o[0] for o in outs]),
                                              ("encode_logvar", dist.logvar, [o[1] for o in outs])):
                        worst[key] = max(worst[key], _err(ref_v.numpy(), np.concatenate(got_v, axis=2), key, x.shape))
        for key, err in worst.items():
            if not err <= tolerance:
                raise ExportError(f"{key}: whole clips stepped through the graphs differ from diffusers by {err:.3g} "
                                  f"> {tolerance:g}")
        return {"frames": [1 + t * (k - 1) for k in latent_frames], "latent_sizes": [list(v) for v in sizes],
                "batches": list(batches), "tolerance": tolerance, **{f"{k}_max_abs_err": v for k, v in worst.items()}}

    return check


TILE_TOLERANCE = 5e-5  # tiled against untiled, both through the graphs (fp32; only rounding differs)


def tile_check(latent: dict, tolerance: float):
    """files -> figures: the safety check of the halos: the graphs run in tiles as the runtime
    runs them, against the untiled graphs, on clips of 3 latent frames whose frames are 2 r + 3
    latent pixels long in one axis (r the direction's halo) and 3 in the other, in tiles one
    latent pixel long: a tile's crop ends on the frame's border or exactly r pixels beyond its
    core (the middle tile's on both sides), so a halo too small shows."""
    f, t, c = latent["downsample"], latent["temporal_downsample"], latent["channels"]

    def check(files: dict[str, bytes]) -> dict:
        rng = np.random.default_rng(CHECK_SEED)
        s = _sessions(files, latent)
        worst = {}
        for direction in ("decoder", "encoder"):
            long = 2 * latent[f"{direction}_halo"] + 3
            for (h, w), tile in (((long, 3), (1, 3)), ((3, long), (3, 1))):
                if direction == "decoder":
                    z = rng.standard_normal((1, c, 3, h, w), dtype=np.float32)
                    runs = [decode_steps(s, latent, z, tile=k) for k in (None, tile)]
                else:
                    x = _chunks(clips(1, 1 + 2 * t, h * f, w * f, int(rng.integers(1 << 30))), t)
                    runs = [(np.concatenate(o, axis=1) for o in encode_steps(s, latent, x, tile=k)) for k in (None, tile)]
                whole, tiled = (np.concatenate(list(run), axis=2) for run in runs)
                worst[direction] = max(worst.get(direction, 0.0), _err(whole, tiled, f"{direction} tiles", (h, w)))
        for direction, err in worst.items():
            if not err <= tolerance:
                raise ExportError(f"{direction}: frames run in tiles differ from the whole frame by {err:.3g} > "
                                  f"{tolerance:g}: the measured halo ({latent[f'{direction}_halo']} latent pixels) "
                                  f"does not cover the graphs' receptive field")
        return {"tolerance": tolerance, **{f"{k}_halo": latent[f"{k}_halo"] for k in worst},
                **{f"{k}_max_abs_err": v for k, v in worst.items()}}

    return check


def _err(ref: np.ndarray, got: np.ndarray, what: str, shape) -> float:
    if ref.shape != got.shape:
        raise ExportError(f"{what}: the graphs give shape {got.shape} for input {tuple(shape)}, diffusers {ref.shape}")
    return float(np.max(np.abs(ref.astype(np.float64) - got)))


def _axis_sizes(h: int, w: int, scales, f: int) -> dict:
    out = {}
    for s in {1, f, *scales}:
        ah, aw = scaled_axes(s, f)
        out[ah], out[aw] = s * h, s * w
    return out


def export_video_vae(vae, out_dir: str | Path, *, name: str | None = None, source: dict | None = None,
                     height: int | None = None, width: int | None = None, latent_sizes=LATENT_SIZES,
                     batches=BATCHES, latent_frames=LATENT_FRAMES, tolerance: float = TOLERANCE,
                     clip_tolerance: float = CLIP_TOLERANCE, progress=None) -> Path:
    """Export a diffusers AutoencoderKLWan / AutoencoderKLQwenImage (eval, fp32, CPU) as a
    validated video-vae bundle. height/width: the native frame size recorded for sample()
    (default 256, rounded to the downsampling). latent_sizes, batches, latent_frames: what the
    graphs and whole clips are validated at."""
    say = progress or (lambda _msg: None)
    family = type(vae).__name__
    if family not in FAMILIES:
        raise ExportError(f"unsupported video VAE class {family}; supported: {', '.join(FAMILIES)}")
    vae = vae.cpu().float().eval()
    vae.use_tiling = vae.use_slicing = False
    fx = facts(vae)
    f, t = fx["downsample"], fx["temporal"]
    if fx["channels"] != 3:
        raise ExportError(f"{family}: {fx['channels']} input channels; a video bundle takes 3 (RGB)")
    cfg = vae.config
    stats = [list(map(float, cfg.get(k) or [])) for k in ("latents_mean", "latents_std")]
    if any(len(v) != fx["latent_channels"] for v in stats):
        raise ExportError(f"{family}: the config's latents_mean / latents_std must have z_dim = {fx['latent_channels']} "
                          f"values each, got {len(stats[0])} and {len(stats[1])}")
    latent_sizes = [tuple(int(d) for d in s) for s in latent_sizes]
    if any(min(s) < 2 for s in latent_sizes):
        raise ExportError(f"latent sizes must be at least 2x2, got {latent_sizes}")
    probes = {direction: probe_slots(vae, direction) for direction in PARTS}
    halos = {direction: measure_halo(vae, direction, probe) for direction, probe in probes.items()}
    parts = {part: slots for probe in probes.values() for part, slots in probe["parts"].items()}
    say(f"{family}: {fx['latent_channels']} latent channels, {f}x spatial / {t}x temporal downsampling, "
        f"{sum(len(v) for v in parts.values())} caches, halos of {halos['decoder']} (decoder) and "
        f"{halos['encoder']} (encoder) latent pixels; tracing the step graphs")
    latent = {"channels": fx["latent_channels"], "downsample": f, "temporal_downsample": t,
              "patch_size": fx["patch_size"], "stochastic": True, "latents_mean": stats[0], "latents_std": stats[1],
              **{f"{part}_cache": [list(v[1:]) for v in slots] for part, slots in parts.items()},
              **{f"{direction}_hidden": probe["hidden"] for direction, probe in probes.items()},
              **{f"{direction}_halo": halo for direction, halo in halos.items()}}
    specs = video_vae_graphs(fx["channels"], latent)
    modules = {}
    for direction, probe in probes.items():
        for part, start in zip(PARTS[direction], (0, probe["split"])):
            for role, first in ((FIRST[part], True), (part, False)):
                modules[role] = _Step(vae, part, first, probe["parts"][part], probe["n"], start)
    scales = {v[3] for slots in parts.values() for v in slots}
    root_h, root_w = Dim(LATENT_HEIGHT, min=2, max=1024), Dim("latent_width", min=2, max=1024)
    dims = {}
    for s in {1, f, *scales}:
        ah, aw = scaled_axes(s, f)
        dims[ah], dims[aw] = (root_h, root_w) if s == 1 else (s * root_h, s * root_w)
    native_h = height or max(2 * f, 256 // f * f)
    native_w = width or native_h
    return export_bundle(
        out_dir, name=name or Path(out_dir).name, kind=KIND.name, image=(fx["channels"], native_h, native_w),
        latent=latent, likelihood={"kind": "gaussian"}, modules=modules, specs=specs, tolerance=tolerance,
        value_range=(-1.0, 1.0),
        spatial={"dims": dims, "trace": _axis_sizes(*latent_sizes[0], scales, f),
                 "sizes": [_axis_sizes(h, w, scales, f) for h, w in latent_sizes], "batches": batches},
        image_extra={"multiple_of": f, "min_size": 2 * f},
        extra_checks={"clips": clip_check(vae, latent, latent_sizes, batches, latent_frames, clip_tolerance),
                      "tiles": tile_check(latent, TILE_TOLERANCE)},
        extra_manifest={"source": source} if source else None,
    )


def export_run(model, meta: dict, run_dir: Path, out_dir, name: str | None, training: dict) -> Path:
    raise ExportError("video VAEs are imported from diffusers (vaeinfer export --from-diffusers DIR); "
                      "vaeinfer does not train them")


# --- precision variants (export.variants.add_variants, through the exporter's hooks) -----------

VARIANT_LATENT = (4, 4)  # latent (h, w) of the clips that calibrate and validate the variants
VARIANT_LATENT_FRAMES = 3  # their latent frames: the first step and two later ones (steady-state caches)


def variant_clips(manifest, n: int, seed: int) -> np.ndarray:
    """n smooth synthetic clips (`clips`) of 1 + t (VARIANT_LATENT_FRAMES - 1) frames at
    VARIANT_LATENT times the spatial downsampling: the data the variants are made and validated on."""
    lat = manifest.latent
    f, t = lat["downsample"], lat["temporal_downsample"]
    h, w = VARIANT_LATENT
    return clips(n, 1 + t * (VARIANT_LATENT_FRAMES - 1), h * f, w * f, seed)


class _Recording:
    """An fp32 step graph's onnxruntime session that keeps every feed it is run on."""

    def __init__(self, session):
        self.session, self.feeds = session, []
        self.names = [o.name for o in session.get_outputs()]

    def run(self, feeds, _batch_size=None):
        self.feeds.append(feeds)
        return self.session.run(self.names, feeds)


def variant_feeds(manifest, sessions: dict, data: np.ndarray, labels, seed: int) -> dict:
    """Each step graph's inputs as whole clips drive it (variants.add_variants' feeds): the fp32
    encoder graphs stepped over the clips `data` (N, 3, 1 + t k, H, W) by the runtime's own loop
    (vaeinfer.video_vae.encode_steps), so every later step gets the caches the steps before it
    really left, then the decoder graphs the same way over posterior samples of those latents.
    Each role's feeds of all its steps are stacked along the batch axis (the caches keep their
    shapes from step to step). Never random caches: the fp16 overflow check and int8's ranges
    need the activations of real streams."""
    t = manifest.latent["temporal_downsample"]
    x = np.ascontiguousarray(data, np.float32)
    if x.ndim != 5 or x.shape[2] < 1 + t or (x.shape[2] - 1) % t:
        raise ExportError(f"video variants calibrate on clips (N, 3, 1 + {t} k, H, W) with k >= 1 (every step graph "
                          f"runs), got shape {x.shape}")
    rec = {role: _Recording(s) for role, s in sessions.items()}
    stats = list(encode_steps(rec, manifest.latent, _chunks(x, t)))
    mean, logvar = (np.concatenate([s[i] for s in stats], axis=2) for i in (0, 1))
    eps = np.random.default_rng(seed).standard_normal(mean.shape, dtype=np.float32)
    for _ in decode_steps(rec, manifest.latent, (mean + np.exp(0.5 * logvar) * eps).astype(np.float32)):
        pass
    return {role: {name: np.concatenate([f[name] for f in r.feeds]) for name in r.feeds[0]} for role, r in rec.items()}


def variant_errors(ref, var, x, labels, nll_images: int, nll_samples: int, seed: int) -> dict:
    """A precision variant `var` against the fp32 model `ref` (both loaded VideoVAEs) on clips x,
    whole clips through the runtime's step loops: the posterior (mean, logvar), the decoder on
    the fp32 posterior means and on diffusion latents (N(0, 1) per channel, as a pipeline gives
    it), and the reconstruction (each model decoding its own encoding). No NLL (no likelihood scale)."""
    from vaeinfer.export.variants import abs_errors

    pa, pb = ref.encode(x), var.encode(x)
    frames = ref.decode(pa.mean)
    latents = np.random.default_rng(seed).standard_normal(pa.mean.shape, dtype=np.float32)
    return {"encoder": {"mean": abs_errors(pa.mean, pb.mean), "logvar": abs_errors(pa.logvar, pb.logvar)},
            "decoder": {"frames": abs_errors(frames, var.decode(pa.mean)),
                        "diffusion_latents": abs_errors(ref.decode(latents, scaled=True), var.decode(latents, scaled=True))},
            "reconstruction": abs_errors(frames, var.decode(pb.mean))}


export.register(KIND.name, export_run, variant_errors, variant_feeds)
