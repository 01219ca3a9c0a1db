"""The video VAE runtime (kind "video-vae"): causal video autoencoders such as Wan 2.1 / 2.2's
`AutoencoderKLWan` and `AutoencoderKLQwenImage`, streamed one latent frame at a time.

Clips are float32 (N, 3, T, H, W) in [-1, 1] with T = 1 + t k frames (t = `temporal_downsample`,
4 for Wan) and H, W multiples of the spatial downsampling f (at least 2 f); latents are
(N, c, 1 + k, H / f, W / f). The graphs run one step at a time (the first frame, then each chunk
of t frames; the first latent frame, then each later one), the causal caches passed from step to
step as numpy arrays: memory holds the caches and one step's activations, whatever the length
of the clip, plus the output the caller keeps (`decode_stream` / `encode_stream` keep none).

Large frames (`tile=`): each step is two graphs cut at the mid-block (vaeinfer.kinds.video_vae).
The full-resolution one (the decoder's up blocks, the encoder's down blocks) runs per tile: a
grid of cores of tile x tile latent pixels, each tile's input cropped to its core widened by the
direction's halo (the graph's receptive field, recorded at export) and clamped to the frame, its
output cropped back to the core and pasted into the frame; each tile runs its own stream (its own
caches) from the first frame on. The mid-block runs on the whole frame at latent resolution. The
result equals the untiled one: every layer but the mid-block's attention is spatially local.

"Diffusion latents" (`scaled=True`) are the latents a diffusion pipeline works in, per channel:
encode returns (mean - latents_mean) / latents_std, decode takes z * latents_std + latents_mean
(diffusers' Wan and Qwen-Image pipelines).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from vaeinfer import host_memory

from vaeinfer import inputs
from vaeinfer.errors import BundleError, InputError
from vaeinfer.exact_tiling import axis_tiles, input_range
from vaeinfer.kinds.video_vae import FIRST, TILED, cache_names, is_split
from vaeinfer.results import Posterior
from vaeinfer.runtime import Model


def pad_hint(frames: int, t: int) -> str:
    """What a clip of `frames` frames should be padded to (the next 1 + t k)."""
    k = max(0, -(-(frames - 1) // t))
    return f"pad to {1 + t * k} frames (e.g. repeat the last frame){'' if frames <= 1 else f' or cut to {1 + t * ((frames - 1) // t)}'}"


class Steps:
    """One stream through a step graph pair (`step`'s role, vaeinfer.kinds.video_vae): the
    first-step graph on the first call, the step graph on each later one, the caches carried from
    call to call (only one step's alive at a time). A call returns the graph's `outputs` first
    outputs. `graphs[role]` has `run(feeds, batch_size) -> outputs` (a runtime Graph, or export's
    session)."""

    def __init__(self, graphs, step: str, outputs: int, batch_size=None):
        self.first, self.step = graphs[FIRST[step]], graphs[step]
        self.outputs, self.batch_size, self.caches = outputs, batch_size, None

    def __call__(self, feeds: dict) -> list[np.ndarray]:
        if self.caches is None:
            outs = self.first.run(feeds, self.batch_size)
        else:
            caches, self.caches = self.caches, None
            outs = self.step.run({**feeds, **dict(zip(cache_names(len(caches))[0], caches))}, self.batch_size)
            del caches
        self.caches = outs[self.outputs:]
        return outs[:self.outputs]


@dataclass(frozen=True)
class Tile:
    """A tile of the latent grid: its `core` (y0, y1, x0, x1), the latent pixels it computes, and
    its `crop`, the input it reads: the core widened by the halo, clamped to the frame (where the
    graph's own zero padding is the untiled frame's)."""

    core: tuple[int, int, int, int]
    crop: tuple[int, int, int, int]


def tile_grid(h: int, w: int, tile: tuple[int, int] | None, halo: int) -> list[Tile]:
    """The tiles of core sides `tile` (None: one tile, the whole frame) over a latent h x w."""
    th, tw = tile or (h, w)
    one = Fraction(1)
    return [Tile((y0, y1, x0, x1), (*input_range(y0, y1, h, one, halo), *input_range(x0, x1, w, one, halo)))
            for y0, y1 in axis_tiles(h, th) for x0, x1 in axis_tiles(w, tw)]


def run_tiles(streams: list[Steps], grid: list[Tile], name: str, a: np.ndarray, f_in: int, f_out: int) -> np.ndarray:
    """Each tile's stream on its crop of `a` (N, C, k, f_in h, f_in w) fed as `name`; the cores
    of their first outputs ((N, C', k', f_out * crop), the halo cropped off) pasted into one
    (N, C', k', f_out h, f_out w). One tile covering the frame: its output as it is."""
    if len(grid) == 1:
        return streams[0]({name: a})[0]
    out = None
    for tile, stream in zip(grid, streams):
        (y0, y1, x0, x1), (iy0, iy1, ix0, ix1) = tile.core, tile.crop
        y = stream({name: np.ascontiguousarray(a[..., iy0 * f_in:iy1 * f_in, ix0 * f_in:ix1 * f_in])})[0]
        if y.shape[-2:] != ((iy1 - iy0) * f_out, (ix1 - ix0) * f_out):
            raise BundleError(f"video tiles: a graph gave {y.shape} for a tile of {iy1 - iy0}x{ix1 - ix0} latent "
                              f"pixels; expected {f_out}x that")
        if out is None:
            out = np.empty((*y.shape[:-2], a.shape[-2] // f_in * f_out, a.shape[-1] // f_in * f_out), y.dtype)
        dy, dx = (y0 - iy0) * f_out, (x0 - ix0) * f_out
        out[..., y0 * f_out:y1 * f_out, x0 * f_out:x1 * f_out] = \
            y[..., dy:dy + (y1 - y0) * f_out, dx:dx + (x1 - x0) * f_out]
    return out


def decode_steps(graphs, latent: dict, z: np.ndarray, batch_size=None, tile=None) -> Iterator[np.ndarray]:
    """The decoder graphs over latents z (N, c, T, h, w), caches carried step to step: yields the
    frames of each latent frame in turn ((N, C, 1, H, W), then (N, C, t, H, W)). `graphs`: role
    -> `run(feeds, batch_size)` (see `Steps`); `latent`: the parsed latent slot. Split graphs
    run the mid-block on the whole frame, then the up blocks per tile of core sides `tile`
    ((height, width) latent pixels; None: the whole frame), each tile its own stream; a bundle
    exported before the split runs untiled."""
    head = Steps(graphs, "decoder", 1, batch_size)
    if not is_split(latent):
        for i in range(z.shape[2]):
            yield head({"z": np.ascontiguousarray(z[:, :, i:i + 1])})[0]
        return
    grid = tile_grid(z.shape[3], z.shape[4], tile, latent["decoder_halo"])
    streams = [Steps(graphs, TILED["decoder"], 1, batch_size) for _ in grid]
    for i in range(z.shape[2]):
        hidden = head({"z": np.ascontiguousarray(z[:, :, i:i + 1])})[0]
        yield run_tiles(streams, grid, "decoder_hidden", hidden, 1, latent["downsample"])


def encode_steps(graphs, latent: dict, chunks: Iterable[np.ndarray], batch_size=None,
                 tile=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The encoder graphs over clips given as chunks (N, C, 1, H, W) then (N, C, t, H, W): yields
    (mean, logvar) (N, c, 1, h, w) per latent frame. Split graphs run the down blocks per tile
    (see `decode_steps`), then the mid-block on the whole frame."""
    if not is_split(latent):
        head = Steps(graphs, "encoder", 2, batch_size)
        for chunk in chunks:
            yield tuple(head({"x": chunk}))
        return
    f = latent["downsample"]
    head = Steps(graphs, "encoder_mid", 2, batch_size)
    grid, streams = None, None
    for chunk in chunks:
        if grid is None:
            grid = tile_grid(chunk.shape[3] // f, chunk.shape[4] // f, tile, latent["encoder_halo"])
            streams = [Steps(graphs, TILED["encoder"], 1, batch_size) for _ in grid]
        hidden = run_tiles(streams, grid, "x", chunk, f, 1)
        yield tuple(head({"encoder_hidden": hidden}))


class VideoVAE(Model):
    """A loaded video-vae bundle; safe to share between threads (a stream's caches are its own).

    Memory stays constant in the clip's length: each step's working memory is given back after
    the step (no host arena keeping the largest step's buffers, and glibc's large-block threshold
    fixed: vaeinfer.host_memory), so only the caches and one step are ever alive; and every step
    peaks alike (no memory pattern laying a run's tensors out with gaps from the second run on)."""

    host_arena = False
    parallel_chunks = False

    def __init__(self, *args, **kwargs):
        host_memory.bounded_malloc()
        super().__init__(*args, **kwargs)

    @property
    def latent_channels(self) -> int:
        return self.manifest.latent["channels"]

    @property
    def downsample(self) -> int:
        """The spatial downsampling f: frames are f times the latent's height and width."""
        return self.manifest.latent["downsample"]

    @property
    def temporal_downsample(self) -> int:
        """t: a clip of 1 + t k frames has 1 + k latent frames."""
        return self.manifest.latent["temporal_downsample"]

    def _stats(self) -> tuple[np.ndarray, np.ndarray]:
        lat = self.manifest.latent
        shape = (1, self.latent_channels, 1, 1, 1)
        return (np.asarray(lat["latents_mean"], np.float32).reshape(shape),
                np.asarray(lat["latents_std"], np.float32).reshape(shape))

    def frames_for(self, latent_frames: int) -> int:
        """How many video frames `latent_frames` latent frames decode to: 1 + t (T - 1)."""
        return 1 + self.temporal_downsample * (int(latent_frames) - 1)

    # --- input checks ---------------------------------------------------------------------

    def _z(self, z, scaled: bool, what: str = "z") -> np.ndarray:
        if isinstance(z, Posterior):
            z = z.mean
        a = inputs._array(z, what)
        c = self.latent_channels
        if a.ndim != 5 or a.shape[1] != c or a.shape[0] == 0 or a.shape[2] == 0:
            raise InputError(f"{what}: expected video latents of shape (N, {c}, T, h, w) with N, T >= 1, "
                             f"got {tuple(a.shape)}")
        if min(a.shape[3:]) < 2:
            raise InputError(f"{what}: expected latent height and width >= 2, got {a.shape[3]}x{a.shape[4]}")
        if a.dtype not in inputs.FLOAT_DTYPES:
            raise InputError(f"{what}: expected a float16/32/64 array, got {a.dtype}")
        a = np.ascontiguousarray(a, np.float32)
        inputs._finite(a, what)
        if scaled:
            mean, std = self._stats()
            a = a * std + mean
        return a

    def _frames(self, x, what: str, whole: bool) -> np.ndarray:
        """A clip (N, C, T, H, W) (or frames (N, C, H, W) when not `whole`): float in [-1, 1] or uint8."""
        a = inputs._array(x, what)
        c, f = self.manifest.image[0], self.downsample
        if not whole and a.ndim == 4:
            a = a[:, :, None]
        if a.ndim != 5 or a.shape[1] != c or a.shape[0] == 0 or a.shape[2] == 0:
            want = f"(N, {c}, T, H, W)" + ("" if whole else f" or (N, {c}, H, W)")
            raise InputError(f"{what}: expected video frames of shape {want}, got {tuple(a.shape)}")
        inputs.spatial_size(a.shape, f, 2 * f, what)
        n, _, t, h, w = a.shape
        flat = inputs.images(a.reshape(n, c, t * h, w), (c, t * h, w), self.manifest.value_range, what)
        return flat.reshape(n, c, t, h, w)

    def check_frames(self, frames: int) -> None:
        """InputError unless a clip of `frames` frames encodes: 1 + t k of them."""
        t = self.temporal_downsample
        if frames < 1 or (frames - 1) % t:
            raise InputError(f"a clip for {self.manifest.name} must have 1 + {t} k frames (1, {1 + t}, {1 + 2 * t}, ...); "
                             f"got {frames}: {pad_hint(frames, t)}")

    def _tile(self, tile) -> tuple[int, int] | None:
        """`tile=` of decode / encode: None (the whole frame) or the side of a tile's core in
        latent pixels; BundleError for a bundle exported before its graphs were split."""
        if tile is None:
            return None
        side = inputs.count(tile, "tile (the side of a tile's core in latent pixels, or None for the whole frame)")
        if not is_split(self.manifest.latent):
            raise BundleError(f"{self.manifest.name}: this bundle was exported before video frames could be tiled "
                              f"(its step graphs are not split at the mid-block and it records no halo); re-export "
                              f"it with this vaeinfer (vaeinfer export --from-diffusers ...) to decode and encode "
                              f"in tiles, or leave tile=None")
        return side, side

    def _check_out(self, out: np.ndarray, rows: int, size: tuple, what: str) -> None:
        if out.shape[0] != rows or tuple(out.shape[3:]) != size:
            raise BundleError(f"{self.manifest.name}/{what}: came out with shape {out.shape}; expected "
                              f"({rows}, ..., {size[0]}, {size[1]})")

    # --- decoding -------------------------------------------------------------------------

    def decode_stream(self, z, scaled: bool = False, batch_size: int | None = None,
                      tile: int | None = None) -> Iterator[np.ndarray]:
        """Frames for latents z (N, c, T, h, w) as they are ready: (N, 3, 1, H, W) for the first
        latent frame, then (N, 3, t, H, W) for each later one; values in [-1, 1]. Memory: the
        caches and one step, whatever T (the frames are the caller's to keep or drop). tile:
        run the full-resolution layers in tiles whose cores are tile x tile latent pixels (the
        same frames: exact; see the module docstring); None: the whole frame at once."""
        z = self._z(z, scaled)
        bs = inputs.batch_size(batch_size)
        tiles = self._tile(tile)
        size = (z.shape[3] * self.downsample, z.shape[4] * self.downsample)
        for frames in decode_steps(self._graphs, self.manifest.latent, z, bs, tiles):
            self._check_out(frames, len(z), size, "decoder")
            yield frames

    def decode(self, z, scaled: bool = False, batch_size: int | None = None, progress=None,
               tile: int | None = None) -> np.ndarray:
        """The clip (N, 3, 1 + t (T - 1), H, W) in [-1, 1] for latents z (N, c, T, h, w) (or a
        Posterior's means), as diffusers' `decode(z).sample`. scaled=True: z are diffusion latents
        (decoded as z * latents_std + latents_mean). `progress(done)` counts latent frames.
        tile: see `decode_stream`."""
        z = self._z(z, scaled)
        n, _, t_lat, h, w = z.shape
        out = np.empty((n, self.manifest.image[0], self.frames_for(t_lat), h * self.downsample, w * self.downsample),
                       np.float32)
        pos = 0
        for i, frames in enumerate(self.decode_stream(z, batch_size=batch_size, tile=tile)):
            out[:, :, pos:pos + frames.shape[2]] = frames
            pos += frames.shape[2]
            if progress is not None:
                progress(i + 1)
        return out

    # --- encoding -------------------------------------------------------------------------

    def _chunks(self, frames, whole: bool) -> Iterator[np.ndarray]:
        """Chunks of 1, then t frames from a clip array or an iterable of frame arrays; InputError
        (saying what to pad to) for a clip whose length is not 1 + t k."""
        t = self.temporal_downsample
        if whole:
            clip = self._frames(frames, "x", True)
            self.check_frames(clip.shape[2])
            yield np.ascontiguousarray(clip[:, :, :1])
            for i in range(1, clip.shape[2], t):
                yield np.ascontiguousarray(clip[:, :, i:i + t])
            return
        pending, count, shape = [], 0, None
        for item in frames:
            a = self._frames(item, "frames", False)
            if shape is None:
                shape = (a.shape[0], *a.shape[3:])
            elif (a.shape[0], *a.shape[3:]) != shape:
                raise InputError(f"frames: every chunk must have N, H, W {shape}, got {tuple(a.shape)}")
            for j in range(a.shape[2]):
                pending.append(a[:, :, j:j + 1])
                count += 1
                if count == 1 or len(pending) == t:
                    yield np.ascontiguousarray(np.concatenate(pending, axis=2))
                    pending = []
        if count == 0:
            raise InputError("frames: expected at least one frame, got none")
        if pending:
            self.check_frames(count)

    def encode_stream(self, frames, scaled: bool = False, batch_size: int | None = None,
                      tile: int | None = None) -> Iterator[Posterior]:
        """Posteriors (mean, logvar each (N, c, 1, h, w)), one per latent frame as it is ready, for
        a clip (N, 3, T, H, W) or an iterable of frames ((N, 3, H, W) each, or chunks (N, 3, k, H, W)),
        read as it is consumed. A clip must have 1 + t k frames (InputError, at its end for an
        iterable, saying what to pad to). scaled=True: diffusion latents (see the module docstring).
        tile: run the full-resolution layers in tiles whose cores are tile x tile latent pixels
        (tile f x tile f frame pixels; exact); None: the whole frame at once."""
        whole = isinstance(frames, np.ndarray)
        bs = inputs.batch_size(batch_size)
        tiles = self._tile(tile)
        mean_s, std_s = self._stats()
        log_std2 = 2 * np.log(std_s)
        for mean, logvar in encode_steps(self._graphs, self.manifest.latent, self._chunks(frames, whole), bs, tiles):
            if scaled:
                mean, logvar = (mean - mean_s) / std_s, logvar - log_std2
            yield Posterior(mean, logvar)

    def encode(self, x, scaled: bool = False, batch_size: int | None = None, progress=None,
               tile: int | None = None) -> Posterior:
        """q(z|x) for clips x (N, 3, 1 + t k, H, W) in [-1, 1] (or uint8): a `Posterior(mean,
        logvar)`, each (N, c, 1 + k, H / f, W / f), as diffusers' `encode(x).latent_dist`.
        `progress(done)` counts latent frames. tile: see `encode_stream`."""
        x = self._frames(x, "x", True)
        self.check_frames(x.shape[2])
        n, _, t, h, w = x.shape
        f = self.downsample
        shape = (n, self.latent_channels, 1 + (t - 1) // self.temporal_downsample, h // f, w // f)
        mean, logvar = np.empty(shape, np.float32), np.empty(shape, np.float32)
        for i, post in enumerate(self.encode_stream(x, scaled, batch_size, tile)):
            if post.mean.shape != (n, shape[1], 1, *shape[3:]):
                raise BundleError(f"{self.manifest.name}/encoder: came out with shape {post.mean.shape}; expected "
                                  f"{(n, shape[1], 1, *shape[3:])}")
            mean[:, :, i:i + 1], logvar[:, :, i:i + 1] = post.mean, post.logvar
            if progress is not None:
                progress(i + 1)
        return Posterior(mean, logvar)

    def reconstruct(self, x, batch_size: int | None = None, tile: int | None = None) -> np.ndarray:
        """decode(encode(x).mean) (both in tiles of `tile` latent pixels, if given)."""
        return self.decode(self.encode(x, batch_size=batch_size, tile=tile).mean, batch_size=batch_size, tile=tile)

    def sample(self, n: int, seed: int | None = None, temperature: float = 1.0, frames: int = 1,
               height: int | None = None, width: int | None = None, batch_size: int | None = None,
               progress=None, tile: int | None = None) -> np.ndarray:
        """n clips of `frames` (1 + t k) frames decoded from N(0, temperature^2) latents: the
        autoencoder's KL prior (textures), not a video model. tile: see `decode_stream`."""
        n, seed = inputs.count(n), inputs.seed(seed)
        temperature = inputs.positive(temperature, "temperature")
        self.check_frames(int(frames))
        f = self.downsample
        h = self.manifest.image[1] if height is None else inputs.count(height, "height")
        w = self.manifest.image[2] if width is None else inputs.count(width, "width")
        inputs.spatial_size((n, 0, h, w), f, 2 * f, "sample")
        shape = (n, self.latent_channels, 1 + (int(frames) - 1) // self.temporal_downsample, h // f, w // f)
        eps = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        return self.decode(eps * np.float32(temperature), batch_size=batch_size, progress=progress, tile=tile)

