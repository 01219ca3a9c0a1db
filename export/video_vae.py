"""kind "video-vae" (see vaeinfer.kinds.video_vae): diffusers' causal video autoencoders
(AutoencoderKLWan: Wan 2.1 and 2.2, patch_size and is_residual included; AutoencoderKLQwenImage)
-> four validated step graphs whose causal caches are explicit inputs and outputs.

    from vaeinfer.export.diffusers import from_diffusers
    from_diffusers("./Wan2.1-T2V-1.3B-Diffusers/vae", "bundles/wan-vae")

diffusers runs its encoder on the first frame, then on chunks of t = 4 frames, and its decoder on
one latent frame at a time, each call reading and rewriting a list of cached activations
(`feat_cache`: the last frames each causal convolution saw). Each graph here is one such call of
the diffusers module itself, with that list made explicit: the caches the call reads are inputs,
the caches it leaves are outputs. The list's slots and their steady shapes are learnt by running
diffusers' own code on a small input; after the first call diffusers keeps some slots shorter (one
frame where later steps keep two) or as the marker "Rep" (an upsampler that has not yet run its
time convolution); the first graphs give those slots their steady shape by padding with zero
frames, which is what diffusers' convolutions pad with, so the step graphs' shapes never change.

Validation: each graph against its PyTorch module at several batch sizes and sizes, then the
graphs run as the runtime runs them (vaeinfer.video_vae's loops) against diffusers' own
`decode(z).sample` and `encode(x).latent_dist` on whole clips of several lengths.
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
from vaeinfer.kinds.video_vae import FIRST, KIND, scaled_axes, video_vae_graphs
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


class _Step(torch.nn.Module):
    """One call of diffusers' encoder or decoder, its feat_cache list made explicit.

    decoder: (z (N, c, 1, h, w), *caches) -> (frames, *next caches); post_quant_conv, unpatchify
    and the final clamp inside. encoder: (x (N, C, k, H, W), *caches) -> (mean, logvar, *next
    caches); patchify, quant_conv and the posterior's logvar clamp inside. `first`: the call on the
    first frame (no cache in; diffusers' first_chunk); its caches come out in their steady shapes."""

    def __init__(self, vae, part: str, first: bool, slots: list, n: int):
        super().__init__()
        self.vae, self.part, self.first, self.n = vae, part, first, n
        self.used = [idx for idx, *_ in slots]
        self.shapes = [tuple(shape) for _, *shape in slots]
        self.patch = int(vae.config.get("patch_size") or 1)
        self.first_chunk = first and part == "decoder" and \
            "first_chunk" in inspect.signature(vae.decoder.forward).parameters

    def forward(self, x, *caches):
        feat = [None] * self.n
        for idx, cache in zip(self.used, caches):
            feat[idx] = cache
        if self.part == "decoder":
            out = self.vae.decoder(self.vae.post_quant_conv(x), feat_cache=feat, feat_idx=[0],
                                   **({"first_chunk": True} if self.first_chunk else {}))
            if self.patch > 1:
                out = _wan_ops()[1](out, self.patch)
            outs, grid = (out.clamp(-1.0, 1.0),), x
        else:
            if self.patch > 1:
                x = _wan_ops()[0](x, self.patch)
            mean, logvar = torch.chunk(self.vae.quant_conv(self.vae.encoder(x, feat_cache=feat, feat_idx=[0])), 2, dim=1)
            outs, grid = (mean, logvar.clamp(-30.0, 20.0)), mean  # DiagonalGaussianDistribution's clamp
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


def probe_slots(vae, part: str) -> tuple[list, int]:
    """[(slot index, channels, frames, scale)] of the cache slots diffusers' `part` uses in steady
    state, learnt by running its own code: a first call, then two steps (which must agree)."""
    fx = facts(vae)
    f, t = fx["downsample"], fx["temporal"]
    vae.clear_cache()
    n = len(vae._feat_map if part == "decoder" else vae._enc_feat_map)
    first_chunk = part == "decoder" and "first_chunk" in inspect.signature(vae.decoder.forward).parameters
    g = torch.Generator().manual_seed(0)
    h, w = PROBE
    feat = [None] * n

    def call(frames: int, first: bool):
        if part == "decoder":
            z = torch.randn((1, fx["latent_channels"], 1, h, w), generator=g)
            vae.decoder(vae.post_quant_conv(z), feat_cache=feat, feat_idx=[0], **({"first_chunk": True} if first and first_chunk else {}))
        else:
            x = torch.rand((1, fx["channels"], frames, h * f, w * f), generator=g) * 2 - 1
            if fx["patch_size"] > 1:
                x = _wan_ops()[0](x, fx["patch_size"])
            vae.encoder(x, feat_cache=feat, feat_idx=[0])
        return [tuple(v.shape) if isinstance(v, torch.Tensor) else v for v in feat]

    with torch.no_grad():
        call(1, True)
        steady = call(t, False)
        if call(t, False) != steady:
            raise ExportError(f"{part}: diffusers' cache shapes change from step to step; cannot export fixed step graphs")
    vae.clear_cache()
    slots = []
    for idx, shape in enumerate(steady):
        if shape is None:
            continue  # a conv that caches nothing (a 1x1x1 shortcut)
        if not isinstance(shape, tuple) or len(shape) != 5:
            raise ExportError(f"{part}: cache slot {idx} holds {shape!r} in steady state; expected a tensor")
        s = shape[3] // h
        if s < 1 or shape[3] != s * h or shape[4] != s * w or f % s:
            raise ExportError(f"{part}: cache slot {idx} has shape {shape} for a {h}x{w} latent; expected a multiple of it")
        slots.append((idx, shape[1], shape[2], s))
    return slots, n


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


def clip_check(vae, sizes, batches, latent_frames, tolerance: float, mean_std):
    """files -> figures: the graphs run step by step as the runtime runs them, against diffusers'
    own decode(z).sample and encode(x).latent_dist on whole clips."""
    fx = facts(vae)
    f, t, c = fx["downsample"], fx["temporal"], fx["latent_channels"]
    mean, std = (np.asarray(v, np.float32).reshape(1, -1, 1, 1, 1) for v in mean_std)

    def check(files: dict[str, bytes]) -> dict:
        s = {role: _Session(files[f"{role}.onnx"]) for role in (*FIRST, *FIRST.values())}
        rng = np.random.default_rng(CHECK_SEED)
        worst = {"decode": 0.0, "encode_mean": 0.0, "encode_logvar": 0.0}
        vae.use_tiling = vae.use_slicing = False
        for h, w in sizes:
            for n in batches:
                for k in latent_frames:
                    z = (rng.standard_normal((n, c, k, h, w), dtype=np.float32) * std + mean).astype(np.float32)
                    with torch.no_grad():
                        ref = vae.decode(torch.from_numpy(z)).sample.numpy()
                    got = np.concatenate(list(decode_steps(s[FIRST["decoder"]], s["decoder"], z)), axis=2)
                    worst["decode"] = max(worst["decode"], _err(ref, got, "decode", z.shape))
                    x = clips(n, 1 + t * (k - 1), h * f, w * f, int(rng.integers(1 << 30)))
                    with torch.no_grad():
                        dist = vae.encode(torch.from_numpy(x)).latent_dist
                    chunks = [x[:, :, :1]] + [np.ascontiguousarray(x[:, :, i:i + t]) for i in range(1, x.shape[2], t)]
                    outs = list(encode_steps(s[FIRST["encoder"]], s["encoder"], chunks))
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
    dec, n_dec = probe_slots(vae, "decoder")
    enc, n_enc = probe_slots(vae, "encoder")
    say(f"{family}: {fx['latent_channels']} latent channels, {f}x spatial / {t}x temporal downsampling, "
        f"{len(dec)} decoder and {len(enc)} encoder caches; tracing the step graphs")
    dec_slots, enc_slots = [list(v[1:]) for v in dec], [list(v[1:]) for v in enc]
    specs = video_vae_graphs(fx["channels"], fx["latent_channels"], f, t, dec_slots, enc_slots)
    modules = {FIRST["decoder"]: _Step(vae, "decoder", True, dec, n_dec), "decoder": _Step(vae, "decoder", False, dec, n_dec),
               FIRST["encoder"]: _Step(vae, "encoder", True, enc, n_enc), "encoder": _Step(vae, "encoder", False, enc, n_enc)}
    scales = {s for *_, s in (*dec_slots, *enc_slots)}
    root_h, root_w = Dim(LATENT_HEIGHT, min=2, max=1024), Dim("latent_width", min=2, max=1024)
    dims = {}
    for s in {1, f, *scales}:
        ah, aw = scaled_axes(s, f)
        dims[ah], dims[aw] = (root_h, root_w) if s == 1 else (s * root_h, s * root_w)
    native_h = height or max(2 * f, 256 // f * f)
    native_w = width or native_h
    latent = {"channels": fx["latent_channels"], "downsample": f, "temporal_downsample": t,
              "patch_size": fx["patch_size"], "stochastic": True, "latents_mean": stats[0], "latents_std": stats[1],
              "decoder_cache": dec_slots, "encoder_cache": enc_slots}
    return export_bundle(
        out_dir, name=name or Path(out_dir).name, kind=KIND.name, image=(fx["channels"], native_h, native_w),
        latent=latent, likelihood={"kind": "gaussian"}, modules=modules, specs=specs, tolerance=tolerance,
        value_range=(-1.0, 1.0),
        spatial={"dims": dims, "trace": _axis_sizes(*latent_sizes[0], scales, f),
                 "sizes": [_axis_sizes(h, w, scales, f) for h, w in latent_sizes], "batches": batches},
        image_extra={"multiple_of": f, "min_size": 2 * f},
        extra_checks={"clips": clip_check(vae, latent_sizes, batches, latent_frames, clip_tolerance, stats)},
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
    chunks = [x[:, :, :1]] + [np.ascontiguousarray(x[:, :, i:i + t]) for i in range(1, x.shape[2], t)]
    stats = list(encode_steps(rec[FIRST["encoder"]], rec["encoder"], chunks))
    mean, logvar = (np.concatenate([s[i] for s in stats], axis=2) for i in (0, 1))
    eps = np.random.default_rng(seed).standard_normal(mean.shape, dtype=np.float32)
    for _ in decode_steps(rec[FIRST["decoder"]], rec["decoder"], (mean + np.exp(0.5 * logvar) * eps).astype(np.float32)):
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
