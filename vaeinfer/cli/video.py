"""The video side of `vaeinfer decode` / `encode` (models with decode_stream / encode_stream):
latents .npy/.npz in, .mp4 / .webm / .gif / a PNG folder (or .npy) out, frames written as they are
decoded; a video file or PNG folder (or a .npy clip) in, latents out. No torch; PyAV only when a
video file is read or written (vaeinfer.video_io)."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from vaeinfer import images as image_io
from vaeinfer import video_io
from vaeinfer.cli.common import ARRAY_SUFFIXES, _progress
from vaeinfer.errors import InputError


def is_video_model(model) -> bool:
    return hasattr(model, "decode_stream") and hasattr(model, "encode_stream")


def refuse_spatial_tiling(model, **options) -> None:
    """InputError naming the spatial VAEs' tiling options given (max_memory, tile_mode): a video
    model takes --tile only."""
    given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v is not None]
    if given:
        raise InputError(f"{', '.join(given)}: applies to spatial VAEs; {model.info.name} is a video-vae model, "
                         f"streamed in constant memory (--tile N runs its frames in exact tiles)")


def decode(model, z, out: str, batch_size, scaled: bool, fps: float, tile: int | None = None) -> None:
    """Stream z (N, c, T, h, w) through the decoder into `out` (a video, a PNG folder, or .npy/.npz),
    in tiles of `tile` latent pixels if given."""
    z = np.asarray(z)
    suffix = Path(out).suffix.lower()
    if suffix not in ARRAY_SUFFIXES and not video_io.is_video_out(out):
        raise InputError(f"{out}: a video model writes .mp4, .webm, .gif, a folder of PNGs (FOLDER/) or .npy/.npz")
    total = z.shape[2] if z.ndim == 5 else 1
    bar, advance = _progress(total, "decoding frames")
    if suffix in ARRAY_SUFFIXES:
        with bar:
            clip = model.decode(z, scaled=scaled, batch_size=batch_size, progress=advance, tile=tile)
        image_io.save_arrays(out, images=clip) if suffix == ".npz" else image_io.save_arrays(out, arr_0=clip)
        click.echo(f"wrote {out} (clips {clip.shape})", err=True)
        return
    writer = video_io.VideoWriter(out, fps)
    frames = 0
    with bar:
        for i, chunk in enumerate(model.decode_stream(z, scaled=scaled, batch_size=batch_size, tile=tile)):
            writer.write(chunk)
            frames += chunk.shape[2]
            advance(i + 1)
    writer.close()
    click.echo(f"wrote {', '.join(map(str, writer.paths))} ({frames} frames at {fps:g} fps)", err=True)


def encode(model, inputs: tuple[str, ...], out: str, batch_size, scaled: bool, tile: int | None = None) -> None:
    """A video file, a PNG folder or a .npy/.npz clip (N, 3, T, H, W) -> latents: .npy (the means,
    N, c, 1 + k, h, w) or .npz (mean, logvar); in tiles of `tile` latent pixels if given."""
    if Path(out).suffix.lower() not in ARRAY_SUFFIXES:
        raise InputError(f"{out}: expected an output ending in .npy (the means) or .npz (mean and logvar)")
    if len(inputs) != 1:
        raise InputError(f"a video model encodes one clip: a video file, a folder of frames or a .npy/.npz "
                         f"(N, 3, T, H, W); got {len(inputs)} inputs")
    src = inputs[0]
    t = model.temporal_downsample
    if Path(src).suffix.lower() in ARRAY_SUFFIXES:
        arrays = image_io.load_arrays(src)
        key = next((k for k in ("x", "images", "arr_0") if k in arrays), None) or next(iter(arrays))
        frames, count = np.asarray(arrays[key]), None
        count = frames.shape[2] if frames.ndim == 5 else None
    else:
        count = video_io.frame_count(src)
        frames = video_io.read_frames(src)
    if count is not None:
        model.check_frames(count)
    bar, advance = _progress(1 + (count - 1) // t if count else 0, "encoding frames")
    means, logvars = [], []
    with bar:
        for i, post in enumerate(model.encode_stream(frames, scaled=scaled, batch_size=batch_size, tile=tile)):
            means.append(post.mean)
            logvars.append(post.logvar)
            advance(i + 1)
    mean, logvar = np.concatenate(means, axis=2), np.concatenate(logvars, axis=2)
    if Path(out).suffix.lower() == ".npy":
        image_io.save_arrays(out, mean=mean)
    else:
        image_io.save_arrays(out, mean=mean, logvar=logvar)
    click.echo(f"wrote {out} (mean {mean.shape})", err=True)
