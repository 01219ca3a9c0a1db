"""Import of pretrained latent-diffusion autoencoders from diffusers (local files only).

    from vaeinfer.export.diffusers import from_diffusers
    from_diffusers("./sd-vae-ft-mse", "bundles/sd-vae")                 # a save_pretrained folder
    from_diffusers("./vae.safetensors", "bundles/x", config="./sd-vae")  # one .safetensors file

Supported: `AutoencoderKL` (Stable Diffusion 1.x/2.x, SDXL, SD3, Flux: 4 or 16 latent channels,
`scaling_factor`, `shift_factor`), `AutoencoderTiny` (TAESD) and `VQModel` (VQGAN-style). The
exported graphs wrap the diffusers module itself, and validation compares onnxruntime against
that module (not a re-implementation) at several batch sizes and image sizes:

- AutoencoderKL: encoder x -> latent_dist.mean, latent_dist.logvar (stochastic); decoder z ->
  decode(z).sample. Images in [-1, 1], as in diffusers' API.
- AutoencoderTiny: encoder x -> latents, decoder -> images, both in [-1, 1] (diffusers' API; the
  module maps to TAESD's own [0, 1] inside). TAESD's latents are already in the diffusion scale:
  the manifest records scaling_factor 1.0, shift 0.0 (the config's values).
- VQModel: encoder x -> the pre-quantization latents h; the decoder quantizes (manifest latent
  "quantized": true), so any h decodes through the codebook.

No network: diffusers is called with local_files_only=True; a single-file checkpoint needs the
folder (or config.json) of its diffusers config (`config=`). diffusers is the `diffusers` extra.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from vaeinfer.export import subpixel
from vaeinfer.export.graphs import ExportError
from vaeinfer.export.spatial_vae import BATCHES, SIZES, TOLERANCE, export_spatial_vae, smooth_images

FAMILIES = ("AutoencoderKL", "AutoencoderTiny", "VQModel")
VIDEO_FAMILIES = ("AutoencoderKLWan", "AutoencoderKLQwenImage")  # causal video VAEs: export/video_vae.py
# a variant whose reconstructions differ from fp32's by more than this (mean abs, outputs in [-1, 1]) is refused
VARIANT_MAX_MAE = 0.1


def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ExportError(f"importing from diffusers needs the diffusers package ({e}): "
                          "pip install 'vaeinfer[diffusers]'") from None
    return diffusers


class _KLEncoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.logvar


class _LatentsEncoder(torch.nn.Module):
    """AutoencoderTiny and VQModel: `encode(x).latents` (VQModel's are pre-quantization)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        return self.vae.encode(x).latents


class _Decoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: cannot read a diffusers config.json: {e}") from None


def load_module(src: str | os.PathLike, config: str | os.PathLike | None = None):
    """The diffusers module in `src` (a save_pretrained folder, or a .safetensors file with
    `config` its diffusers config folder / config.json), in eval mode, fp32, on CPU; and its config."""
    diffusers = _diffusers()
    src = Path(src)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    if src.is_dir():
        cfg_path = src / "config.json"
        if not cfg_path.is_file() and (src / "vae" / "config.json").is_file():
            src, cfg_path = src / "vae", src / "vae" / "config.json"  # a whole pipeline folder
        if not cfg_path.is_file():
            raise ExportError(f"{src}: expected a diffusers model folder with config.json (as save_pretrained writes)")
        cfg = _read_config(cfg_path)
        family = cfg.get("_class_name")
        if family not in FAMILIES + VIDEO_FAMILIES:
            raise ExportError(f"{cfg_path}: _class_name {family!r}; supported: {', '.join(FAMILIES + VIDEO_FAMILIES)}")
        try:
            module = getattr(diffusers, family).from_pretrained(str(src), local_files_only=True, torch_dtype=torch.float32)
        except Exception as e:  # diffusers raises many types for a bad folder
            raise ExportError(f"{src}: diffusers cannot load the {family}: {type(e).__name__}: {e}") from None
    elif src.is_file() and src.suffix == ".safetensors":
        if config is None:
            raise ExportError(f"{src}: a single-file checkpoint needs its diffusers config (--config DIR or config.json; "
                              "no network is used to guess it)")
        cfg_dir = Path(config)
        cfg_dir = cfg_dir.parent if cfg_dir.is_file() else cfg_dir
        cfg = _read_config(cfg_dir / "config.json")
        family = cfg.get("_class_name", "AutoencoderKL")
        if family != "AutoencoderKL":
            raise ExportError(f"{src}: diffusers reads single-file checkpoints of AutoencoderKL only, "
                              f"the config names {family!r}; save it with save_pretrained instead")
        try:
            module = diffusers.AutoencoderKL.from_single_file(str(src), config=str(cfg_dir), local_files_only=True,
                                                              torch_dtype=torch.float32)
        except Exception as e:
            raise ExportError(f"{src}: diffusers cannot load it as an AutoencoderKL: {type(e).__name__}: {e}") from None
    else:
        raise ExportError(f"{src}: expected a diffusers folder (config.json + weights) or a .safetensors file")
    return module.cpu().eval(), dict(module.config)


def _facts(module, cfg: dict) -> dict:
    """export_spatial_vae's keyword arguments for a diffusers module."""
    family = type(module).__name__
    channels = int(cfg.get("in_channels", 3))
    if family == "AutoencoderKL":
        down = 2 ** (len(cfg["block_out_channels"]) - 1)
        shift = cfg.get("shift_factor")
        return dict(encoder=_KLEncoder(module), channels=channels, latent_channels=int(cfg["latent_channels"]),
                    downsample=down, stochastic=True, quantized=False,
                    scaling_factor=float(cfg.get("scaling_factor") or 1.0), shift_factor=float(shift or 0.0))
    if family == "AutoencoderTiny":
        # each encoder block but the first halves the size; TAESD: 4 blocks, 8x
        down = 2 ** (len(cfg["encoder_block_out_channels"]) - 1)
        return dict(encoder=_LatentsEncoder(module), channels=channels, latent_channels=int(cfg["latent_channels"]),
                    downsample=down, stochastic=False, quantized=False,
                    scaling_factor=float(cfg.get("scaling_factor") or 1.0), shift_factor=float(cfg.get("shift_factor") or 0.0))
    if family == "VQModel":
        down = 2 ** (len(cfg["block_out_channels"]) - 1)
        return dict(encoder=_LatentsEncoder(module), channels=channels,
                    latent_channels=int(cfg.get("vq_embed_dim") or cfg["latent_channels"]), downsample=down,
                    stochastic=False, quantized=True, scaling_factor=float(cfg.get("scaling_factor") or 1.0),
                    shift_factor=0.0)
    raise ExportError(f"unsupported diffusers class {family}; supported: {', '.join(FAMILIES)}")


def _exact_tiling(module, downsample: int, wanted: bool | None, say) -> tuple[dict, dict | None]:
    """(stage graph files, manifest slot) of exact tiling, or the slot saying why there are none."""
    if wanted is False:
        return {}, None
    from vaeinfer.export.exact_tiling import Unsupported, export_exact_tiling

    family = type(module).__name__
    try:
        if family != "AutoencoderKL":
            raise Unsupported(f"exact tiling: {family} is not of the AutoencoderKL family (GroupNorm + mid-block "
                              "attention); decode it untiled or with tile_mode='blend'")
        return export_exact_tiling(module, downsample, progress=say)
    except Unsupported as e:
        if wanted:
            raise
        say(f"{e}; exporting without it")
        return {}, {"unavailable": str(e)}


def _source(module, cfg: dict, src: Path) -> dict:
    diffusers = _diffusers()
    public = {k: v for k, v in sorted(cfg.items()) if not k.startswith("_")}
    text = json.dumps(public, sort_keys=True, default=list)
    return {"library": "diffusers", "class": type(module).__name__, "diffusers_version": diffusers.__version__,
            "config_sha256": hashlib.sha256(text.encode()).hexdigest(), "config": json.loads(text), "path": src.name}


def from_diffusers(src: str | os.PathLike, out_dir: str | os.PathLike, *, name: str | None = None,
                   config: str | os.PathLike | None = None, sizes=SIZES, batches=BATCHES,
                   precisions=(), height: int | None = None, width: int | None = None,
                   tolerance: float = TOLERANCE, calibration_images: int = 16, calibration_clips: int = 4, progress=None,
                   exact_tiling: bool | None = None) -> Path:
    """Export a diffusers AutoencoderKL / AutoencoderTiny / VQModel into a validated spatial-vae bundle,
    or an AutoencoderKLWan / AutoencoderKLQwenImage into a video-vae bundle (export.video_vae).

    src: a save_pretrained folder (or a pipeline folder with vae/), or a single .safetensors file
        with `config` its diffusers config folder. sizes: image sizes (H, W) validated against the
        diffusers module, at each of `batches`. height/width: the native size recorded for
        sample() (default: the config's sample_size). precisions: also make "fp16" (made safe:
        the nodes that overflow stay fp32, see export.variants.make_fp16) and/or "int8" variants,
        calibrated and validated on smooth synthetic images at sizes[0] (`calibration_images` of
        them); and/or validate "bf16" (computed by OpenVINO). A video VAE's variants are made
        from its step graphs stepped over `calibration_clips` smooth synthetic clips and
        validated on whole clips (export.video_vae.variant_feeds / variant_errors).
    exact_tiling: add the stage graphs of exact tiled decode/encode (vaeinfer.exact_tiling,
        export.exact_tiling), validated against the module. None (default): for an AutoencoderKL
        of the supported family; otherwise the manifest records why not. True: an ExportError
        when the model is not of the family. False: none.
    """
    say = progress or (lambda _msg: None)
    src = Path(src)
    module, cfg = load_module(src, config)
    subpixel.install(module)  # its upsamplers traced as 2x2 convolutions; eager calls (validation) unchanged
    if type(module).__name__ in VIDEO_FAMILIES:
        from vaeinfer.export.video_vae import export_video_vae

        if exact_tiling:
            raise ExportError(f"{type(module).__name__}: exact tiling is for the AutoencoderKL family, not video "
                              "VAEs (their decode streams frame by frame instead); export without --exact-tiling")
        path = export_video_vae(module, out_dir, name=name or Path(out_dir).name, source=_source(module, cfg, src),
                                height=height, width=width, progress=progress)
        if precisions:
            from vaeinfer.bundle import open_bundle
            from vaeinfer.export.video_vae import variant_clips

            m = open_bundle(path).manifest
            calib, held = variant_clips(m, calibration_clips, seed=1), variant_clips(m, max(1, calibration_clips // 2), seed=2)
            path = _add_variants(path, precisions, calib, held, f"smooth synthetic clips of {calib.shape[2]} frames "
                                 f"{calib.shape[3]}x{calib.shape[4]} (vaeinfer.export.video_vae.variant_clips)", progress)
        return path
    facts = _facts(module, cfg)
    encoder = facts.pop("encoder")
    native = int(cfg.get("sample_size") or 512)
    native = native[0] if isinstance(native, (list, tuple)) else native
    f = facts["downsample"]
    h = height or max(f * 2, native // f * f)
    w = width or h
    say(f"{type(module).__name__}: {facts['latent_channels']} latent channels, {f}x downsampling; tracing and "
        f"validating against diffusers at sizes {list(sizes)}, batches {list(batches)}")
    files, slot = _exact_tiling(module, f, exact_tiling, say)
    path = export_spatial_vae(encoder, _Decoder(module), out_dir, height=h, width=w, value_range=(-1.0, 1.0),
                              sizes=sizes, batches=batches, name=name or Path(out_dir).name,
                              source=_source(module, cfg, src), tolerance=tolerance, extra_files=files,
                              extra_manifest={"exact_tiling": slot} if slot else None, **facts)
    if precisions:
        hh, ww = sizes[0]
        calib = smooth_images(calibration_images, facts["channels"], hh, ww, seed=1)
        held = smooth_images(max(2, calibration_images // 4), facts["channels"], hh, ww, seed=2)
        path = _add_variants(path, precisions, calib, held,
                             f"smooth synthetic images {hh}x{ww} (vaeinfer.export.spatial_vae.smooth_images)", progress)
    return path


def _add_variants(path: Path, precisions, calib, held, data: str, progress) -> Path:
    """The precision variants of an imported bundle, calibrated on `calib` and validated on `held`
    (synthetic images or clips, described by `data`)."""
    from vaeinfer.export.variants import add_variants

    return add_variants(path, list(precisions), calib, held, nll_images=0, speed_batch=2, calibration_batch=4,
                        source={"data": data}, max_image_mae=VARIANT_MAX_MAE, progress=progress)
