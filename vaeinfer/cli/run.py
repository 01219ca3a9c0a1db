"""Runtime commands: sample, encode, decode, reconstruct, score, info (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

import vaeinfer
from vaeinfer import images as image_io
from vaeinfer import kinds
from vaeinfer import inputs as checks  # not `inputs`: the commands take an argument of that name
from vaeinfer.cli.common import (_check_out, _load, _progress, _read_images, _spatial_options, _write_images, main,
                                 model_option, op_options, runtime_options)
from vaeinfer.cli import video
from vaeinfer.errors import InputError
from vaeinfer.op_params import SAMPLE, SCORE


def _exact_tiling_options(verb: str):
    """--max-memory and --tile-mode of a spatial VAE's `verb` ("decode" or "encode")."""

    def decorate(f):
        f = click.option("--tile-mode", type=click.Choice(["exact", "blend"]), default=None,
                         help="Spatial VAE: exact (default: whole-image GroupNorm and attention) or blend (approximate "
                              "overlapping tiles with blended seams, for any model; needs --tile).")(f)
        return click.option("--max-memory", default=None, metavar="SIZE",
                            help=f"Spatial VAE: {verb} exactly in tiles within this much memory (2GiB, 512MiB, bytes): "
                                 "the result equals the untiled one; refused at once, naming the smallest budget, if it "
                                 "cannot be met.")(f)

    return decorate


@main.command()
@model_option
@op_options(*SAMPLE.values())
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per onnxruntime call.")
@click.option("-o", "--out", default="samples.png", show_default=True,
              help="Output: .png, .jpg or .webp (a grid), .npy or .npz (float32 images N, C, H, W).")
@click.option("--nrow", type=click.IntRange(min=1), default=None, help="Images per row of the PNG grid.")
@click.option("--tile", type=click.IntRange(min=1), default=None,
              help="Spatial VAE: decode in tiles of this many latent pixels (exact; see --tile-mode).")
@_exact_tiling_options("decode")
def sample(model, device, threads, precision, n, seed, temperature, batch_size, top_k, top_p, label, out, nrow,
           height, width, tile, max_memory, tile_mode):
    """Generate images from a model's prior (default: the bundled mnist-vae)."""
    _check_out(out)
    m = _load(model, device, threads, precision)
    if video.is_video_model(m):
        raise InputError(f"{m.info.name} is a video-vae model: `vaeinfer sample` writes image grids; decode "
                         "latents to a clip with `vaeinfer decode -m MODEL z.npy -o clip.mp4` (or, in Python, "
                         "model.sample(n, frames=...))")
    asked = {"top_k": top_k, "top_p": top_p, "label": label, "height": height, "width": width, "tile": tile,
             "max_memory": max_memory, "tile_mode": tile_mode}
    allowed = kinds.get(m.info.kind).sample_options
    kwargs = {k: v for k, v in asked.items() if k in allowed}
    refused = [k for k, v in asked.items() if k not in allowed and v is not None]
    if refused:
        flags = ", ".join("--" + k.replace("_", "-") for k in refused)
        raise InputError(f"{flags} do not apply to {m.info.name}, a {m.info.kind} model "
                         f"(--top-k, --top-p and --label apply to VQ-VAE models; --height, --width, --tile, "
                         f"--max-memory and --tile-mode "
                         f"to spatial-vae models)")
    bar, advance = _progress(n, "sampling")
    with bar:
        imgs = m.sample(n, seed=seed, temperature=temperature, batch_size=batch_size, progress=advance, **kwargs)
    _write_images(imgs, out, nrow, model=m)


@main.command()
@model_option
@click.argument("inputs", nargs=-1, type=click.Path(exists=True))
@click.option("-o", "--out", default="latents.npz", show_default=True,
              help="Output .npz: VAE mean and logvar (N, Z) (spatial: N, c, h, w; logvar absent for a "
                   "deterministic encoder); VQ-VAE codes (N, h, w) and z_q.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--scaled", is_flag=True, help="Spatial VAE: write diffusion latents ((z - shift) * scaling_factor); "
              "video VAE: (mean - latents_mean) / latents_std.")
@click.option("--tile", type=click.IntRange(min=1), default=None,
              help="Spatial VAE: encode in tiles of this many image pixels (exact; see --tile-mode). Video model: "
                   "in tiles of this many latent pixels (exact).")
@_exact_tiling_options("encode")
def encode(model, device, threads, precision, inputs, out, batch_size, scaled, tile, max_memory, tile_mode):
    """Encode images (image files, or one .npy/.npz of N, C, H, W) to latents; a video model: one
    clip (a video file, a folder of frames, or a .npy/.npz of N, 3, T, H, W) to .npy (means) or .npz."""
    m = _load(model, device, threads, precision, roles=("encoder",))
    if video.is_video_model(m):
        video.refuse_spatial_tiling(m, max_memory=max_memory, tile_mode=tile_mode)
        return video.encode(m, inputs, out, batch_size, scaled, tile)
    _check_out(out, (".npz",))
    options = _spatial_options(m, scaled=scaled, tile=tile, max_memory=max_memory, tile_mode=tile_mode)
    x = _read_images(m, inputs)
    total, label = _tiles(m, "encode", x, options)
    if not options:  # every kind's encode; a spatial VAE's takes progress too
        result = m.encode(x, batch_size=batch_size)
    else:
        bar, advance = _progress(total, label)
        with bar:
            result = m.encode(x, batch_size=batch_size, progress=advance, **options)
    arrays = {k: getattr(result, k) for k in result.__dataclass_fields__ if getattr(result, k) is not None}
    image_io.save_arrays(out, **arrays)
    click.echo(f"wrote {out} ({', '.join(f'{k} {v.shape}' for k, v in arrays.items())})", err=True)


@main.command()
@model_option
@click.argument("latents", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", default="decoded.png", show_default=True, help="Output .png/.jpg/.webp grid, .npy or .npz.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--scaled", is_flag=True, help="Spatial VAE: the latents are diffusion latents (z / scaling_factor + shift); "
              "video VAE: z * latents_std + latents_mean.")
@click.option("--tile", type=click.IntRange(min=1), default=None,
              help="Spatial VAE: decode in tiles of this many latent pixels (64 = 512 image pixels at 8x; exact, "
                   "see --tile-mode). Video model: the same (exact).")
@_exact_tiling_options("decode")
@click.option("--fps", type=click.FloatRange(min=0, min_open=True), default=16.0, show_default=True,
              help="Video model: frames per second of the video written.")
def decode(model, device, threads, precision, latents, out, batch_size, scaled, tile, max_memory, tile_mode, fps):
    """Decode latents (.npz from `encode`: mean or z; codes for a VQ-VAE; or a .npy) to images; a
    video model's (N, c, T, h, w) to .mp4, .webm, .gif, a folder of PNGs (FOLDER/) or .npy/.npz."""
    m = _load(model, device, threads, precision, roles=("decoder",))
    if not video.is_video_model(m):
        _check_out(out)
    arrays = image_io.load_arrays(latents)
    keys = (*kinds.get(m.info.kind).latent_keys, "arr_0")  # arr_0: a plain np.savez
    key = next((k for k in keys if k in arrays), None)
    if key is None:
        raise InputError(f"{latents}: expected an array named one of {keys}, got {sorted(arrays)}")
    if video.is_video_model(m):
        video.refuse_spatial_tiling(m, max_memory=max_memory, tile_mode=tile_mode)
        return video.decode(m, arrays[key], out, batch_size, scaled, fps, tile)
    options = _spatial_options(m, scaled=scaled, tile=tile, max_memory=max_memory, tile_mode=tile_mode)
    z = arrays[key]
    total, label = _tiles(m, "decode", z, options)
    bar, advance = _progress(total, label)
    with bar:
        images = m.decode(z, batch_size=batch_size, progress=advance, **options)
    _write_images(images, out, model=m)


def _tiles(m, direction: str, a, options: dict) -> tuple[int, str]:
    """The progress bar's total and label: tiles (exact or blended) or rows."""
    verb = "decoding" if direction == "decode" else "encoding"
    tiled = options.get("tile") is not None or options.get("max_memory") is not None
    if not tiled or np.ndim(a) != 4:
        return (len(a) if np.ndim(a) else 1), verb
    if options.get("tile_mode") == "blend":
        return m.tile_count(np.shape(a), options["tile"], direction=direction), f"{verb} blended tiles"
    plan = m.exact_plan(np.shape(a), direction, options.get("tile"), options.get("max_memory"))
    click.echo(f"exact tiling: {plan.describe()}", err=True)
    return plan.total, f"{verb} exact tiles"


@main.command()
@model_option
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", default="reconstructions.png", show_default=True, help="Output .png/.jpg/.webp grid, .npy or .npz.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
def reconstruct(model, device, threads, precision, inputs, out, batch_size):
    """Encode then decode images; the PNG grid shows each input beside its reconstruction."""
    _check_out(out)
    m = _load(model, device, threads, precision)
    x = _read_images(m, inputs)
    rec = m.reconstruct(x, batch_size=batch_size)
    if Path(out).suffix.lower() in image_io.GRID_SUFFIXES:
        x = checks.images(x, rec.shape[1:], m.info.value_range)
        pairs = np.stack([x, rec], axis=1).reshape(-1, *rec.shape[1:])
        _write_images(pairs, out, nrow=2 * min(8, len(x)), model=m)
    else:
        _write_images(rec, out)


@main.command()
@model_option
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@op_options(*SCORE.values())
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Decoder rows per onnxruntime call.")
@click.option("-o", "--out", default=None, help="Write per-image scores to this .npz or .csv.")
def score(model, device, threads, precision, inputs, samples, seed, batch_size, out):
    """Score images: negative log-likelihood (nats, IWAE estimate), negative ELBO, reconstruction.

    Higher NLL = less likely under the model: the anomaly score to threshold in an app.
    """
    if out:
        _check_out(out, (".npz", ".csv"))
    m = _load(model, device, threads, precision)
    s = m.score(_read_images(m, inputs), samples=samples, seed=seed, batch_size=batch_size)
    fields = {k: getattr(s, k) for k in s.__dataclass_fields__}
    if out:
        if Path(out).suffix.lower() == ".csv":
            from vaeinfer._fs import atomic_write_text

            rows = ["index," + ",".join(fields)] + [
                f"{i}," + ",".join(f"{fields[k][i]:.6f}" for k in fields) for i in range(len(s.nll))]
            atomic_write_text(out, "\n".join(rows) + "\n")
        else:
            image_io.save_arrays(out, **fields)
    summary = {k: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))} for k, v in fields.items()}
    click.echo(json.dumps({"images": len(s.nll), "samples": samples, **summary}, indent=2))


@main.command()
@click.option("-m", "--model", default=None, help="A model to describe; without it, list the bundled models.")
@runtime_options
@click.option("--backends", "list_backends", is_flag=True,
              help="List the backends: what each runs on, its precisions, whether it is available here, how to install it.")
def info(model, device, threads, precision, list_backends):
    """List the bundled models, or describe one model loaded as the options say (as JSON; with
    --precision auto, what was chosen per graph and batch size, why, and the measured errors)."""
    if list_backends:
        from vaeinfer import backends

        for b in backends.REGISTRY.values():
            here = "available" if b.is_available() else f"not available ({b.install_hint})"
            click.echo(f"{b.name}: {b.title} on {b.device}, precisions {', '.join(b.precisions)}; {here}")
        return
    if model is None:
        for name in vaeinfer.available_models():
            m = vaeinfer.open_bundle(name).manifest
            default = " (default)" if name == vaeinfer.DEFAULT_MODEL else ""
            click.echo(f"{name}{default}: {m.kind}, image {'x'.join(map(str, m.image))}, latent {m.latent}")
        return
    m = _load(model, device, threads, precision)
    i = m.info
    facts = {k: getattr(i, k) for k in i.__dataclass_fields__}
    if hasattr(m, "exact_tiling_info"):  # a spatial VAE: whether decode --max-memory is exact here, or why not
        facts["exact_tiling"] = m.exact_tiling_info()
    click.echo(json.dumps(facts, indent=2, default=list))
