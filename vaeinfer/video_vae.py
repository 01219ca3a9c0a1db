"""The video VAE runtime (kind "video-vae"): causal video autoencoders such as Wan 2.1 / 2.2's
`AutoencoderKLWan` and `AutoencoderKLQwenImage`, streamed one latent frame at a time.

Clips are float32 (N, 3, T, H, W) in [-1, 1] with T = 1 + t k frames (t = `temporal_downsample`,
4 for Wan) and H, W multiples of the spatial downsampling f (at least 2 f); latents are
(N, c, 1 + k, H / f, W / f). The graphs run one step at a time (the first frame, then each chunk
of t frames; the first latent frame, then each later one), the causal caches passed from step to
step as numpy arrays: memory holds the caches and one step's activations, whatever the length
of the clip, plus the output the caller keeps (`decode_stream` / `encode_stream` keep none).

"Diffusion latents" (`scaled=True`) are the latents a diffusion pipeline works in, per channel:
encode returns (mean - latents_mean) / latents_std, decode takes z * latents_std + latents_mean
(diffusers' Wan and Qwen-Image pipelines).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from vaeinfer import host_memory

from vaeinfer import inputs
from vaeinfer.errors import BundleError, InputError
from vaeinfer.kinds.video_vae import FIRST, cache_names
from vaeinfer.results import Posterior
from vaeinfer.runtime import Model


def pad_hint(frames: int, t: int) -> str:
    """What a clip of `frames` frames should be padded to (the next 1 + t k)."""
    k = max(0, -(-(frames - 1) // t))
    return f"pad to {1 + t * k} frames (e.g. repeat the last frame){'' if frames <= 1 else f' or cut to {1 + t * ((frames - 1) // t)}'}"


def decode_steps(first, step, z: np.ndarray, batch_size=None) -> Iterator[np.ndarray]:
    """The decoder graphs over latents z (N, c, T, h, w), caches carried step to step: yields the
    frames of each latent frame in turn ((N, C, 1, H, W), then (N, C, t, H, W)). `first` / `step`
    have `run(feeds, batch_size) -> outputs` (a runtime Graph, or export's session)."""
    outs = first.run({"z": np.ascontiguousarray(z[:, :, :1])}, batch_size)
    yield outs[0]
    names = cache_names(len(outs) - 1)[0]
    for i in range(1, z.shape[2]):
        caches = outs[1:]
        outs = None  # only one step's caches alive at a time
        outs = step.run({"z": np.ascontiguousarray(z[:, :, i:i + 1]), **dict(zip(names, caches))}, batch_size)
        del caches
        yield outs[0]


def encode_steps(first, step, chunks: Iterable[np.ndarray], batch_size=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The encoder graphs over clips given as chunks (N, C, 1, H, W) then (N, C, t, H, W): yields
    (mean, logvar) (N, c, 1, h, w) per latent frame."""
    outs, names = None, None
    for chunk in chunks:
        if outs is None:
            outs = first.run({"x": chunk}, batch_size)
            names = cache_names(len(outs) - 2)[0]
        else:
            caches = outs[2:]
            outs = None
            outs = step.run({"x": chunk, **dict(zip(names, caches))}, batch_size)
            del caches
        yield outs[0], outs[1]


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

    def _check_out(self, out: np.ndarray, rows: int, size: tuple, what: str) -> None:
        if out.shape[0] != rows or tuple(out.shape[3:]) != size:
            raise BundleError(f"{self.manifest.name}/{what}: came out with shape {out.shape}; expected "
                              f"({rows}, ..., {size[0]}, {size[1]})")

    # --- decoding -------------------------------------------------------------------------

    def decode_stream(self, z, scaled: bool = False, batch_size: int | None = None) -> Iterator[np.ndarray]:
        """Frames for latents z (N, c, T, h, w) as they are ready: (N, 3, 1, H, W) for the first
        latent frame, then (N, 3, t, H, W) for each later one; values in [-1, 1]. Memory: the
        caches and one step, whatever T (the frames are the caller's to keep or drop)."""
        z = self._z(z, scaled)
        bs = inputs.batch_size(batch_size)
        size = (z.shape[3] * self.downsample, z.shape[4] * self.downsample)
        for frames in decode_steps(self._graphs[FIRST["decoder"]], self._graphs["decoder"], z, bs):
            self._check_out(frames, len(z), size, "decoder")
            yield frames

    def decode(self, z, scaled: bool = False, batch_size: int | None = None, progress=None) -> np.ndarray:
        """The clip (N, 3, 1 + t (T - 1), H, W) in [-1, 1] for latents z (N, c, T, h, w) (or a
        Posterior's means), as diffusers' `decode(z).sample`. scaled=True: z are diffusion latents
        (decoded as z * latents_std + latents_mean). `progress(done)` counts latent frames."""
        z = self._z(z, scaled)
        n, _, t_lat, h, w = z.shape
        out = np.empty((n, self.manifest.image[0], self.frames_for(t_lat), h * self.downsample, w * self.downsample),
                       np.float32)
        pos = 0
        for i, frames in enumerate(self.decode_stream(z, batch_size=batch_size)):
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

    def encode_stream(self, frames, scaled: bool = False, batch_size: int | None = None) -> Iterator[Posterior]:
        """Posteriors (mean, logvar each (N, c, 1, h, w)), one per latent frame as it is ready, for
        a clip (N, 3, T, H, W) or an iterable of frames ((N, 3, H, W) each, or chunks (N, 3, k, H, W)),
        read as it is consumed. A clip must have 1 + t k frames (InputError, at its end for an
        iterable, saying what to pad to). scaled=True: diffusion latents (see the module docstring)."""
        whole = isinstance(frames, np.ndarray)
        bs = inputs.batch_size(batch_size)
        mean_s, std_s = self._stats()
        log_std2 = 2 * np.log(std_s)
        for mean, logvar in encode_steps(self._graphs[FIRST["encoder"]], self._graphs["encoder"],
                                         self._chunks(frames, whole), bs):
            if scaled:
                mean, logvar = (mean - mean_s) / std_s, logvar - log_std2
            yield Posterior(mean, logvar)

    def encode(self, x, scaled: bool = False, batch_size: int | None = None, progress=None) -> Posterior:
        """q(z|x) for clips x (N, 3, 1 + t k, H, W) in [-1, 1] (or uint8): a `Posterior(mean,
        logvar)`, each (N, c, 1 + k, H / f, W / f), as diffusers' `encode(x).latent_dist`.
        `progress(done)` counts latent frames."""
        x = self._frames(x, "x", True)
        self.check_frames(x.shape[2])
        n, _, t, h, w = x.shape
        f = self.downsample
        shape = (n, self.latent_channels, 1 + (t - 1) // self.temporal_downsample, h // f, w // f)
        mean, logvar = np.empty(shape, np.float32), np.empty(shape, np.float32)
        for i, post in enumerate(self.encode_stream(x, scaled, batch_size)):
            if post.mean.shape != (n, shape[1], 1, *shape[3:]):
                raise BundleError(f"{self.manifest.name}/encoder: came out with shape {post.mean.shape}; expected "
                                  f"{(n, shape[1], 1, *shape[3:])}")
            mean[:, :, i:i + 1], logvar[:, :, i:i + 1] = post.mean, post.logvar
            if progress is not None:
                progress(i + 1)
        return Posterior(mean, logvar)

    def reconstruct(self, x, batch_size: int | None = None) -> np.ndarray:
        """decode(encode(x).mean)."""
        return self.decode(self.encode(x, batch_size=batch_size).mean, batch_size=batch_size)

    def sample(self, n: int, seed: int | None = None, temperature: float = 1.0, frames: int = 1,
               height: int | None = None, width: int | None = None, batch_size: int | None = None,
               progress=None) -> np.ndarray:
        """n clips of `frames` (1 + t k) frames decoded from N(0, temperature^2) latents: the
        autoencoder's KL prior (textures), not a video model."""
        n, seed = inputs.count(n), inputs.seed(seed)
        temperature = inputs.positive(temperature, "temperature")
        self.check_frames(int(frames))
        f = self.downsample
        h = self.manifest.image[1] if height is None else inputs.count(height, "height")
        w = self.manifest.image[2] if width is None else inputs.count(width, "width")
        inputs.spatial_size((n, 0, h, w), f, 2 * f, "sample")
        shape = (n, self.latent_channels, 1 + (int(frames) - 1) // self.temporal_downsample, h // f, w // f)
        eps = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        return self.decode(eps * np.float32(temperature), batch_size=batch_size, progress=progress)

