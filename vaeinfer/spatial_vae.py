"""The spatial-latent VAE runtime (kind "spatial-vae"): latent-diffusion autoencoders such as
Stable Diffusion's `AutoencoderKL`, TAESD (`AutoencoderTiny`) and VQGAN-style `VQModel`, and
conv VAEs trained with `--latent spatial`.

Images are float32 (N, C, H, W) in `info.value_range` ([-1, 1] for the diffusers families), of
any height and width that are multiples of `multiple_of` (at least `min_size`); latents are
(N, c, H / f, W / f) with f the downsampling factor.

"Diffusion latents" (`scaled=True`) are the latents a diffusion model works in:
encode returns (z - shift_factor) * scaling_factor, decode takes z / scaling_factor + shift_factor.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from vaeinfer import inputs
from vaeinfer.errors import BundleError, InputError
from vaeinfer.results import Posterior, Score
from vaeinfer.runtime import Model


class SpatialVAE(Model):
    """A loaded spatial-vae bundle; safe to share between threads."""

    @property
    def latent_channels(self) -> int:
        return self.manifest.latent["channels"]

    @property
    def downsample(self) -> int:
        return self.manifest.latent["downsample"]

    @property
    def scaling_factor(self) -> float:
        return self.manifest.latent["scaling_factor"]

    @property
    def shift_factor(self) -> float:
        return self.manifest.latent["shift_factor"]

    # --- input checks ---------------------------------------------------------------------

    def _x(self, x, what: str = "images") -> np.ndarray:
        lat = self.manifest.latent
        return inputs.spatial_images(x, self.manifest.image[0], self.manifest.value_range, lat["multiple_of"],
                                     lat["min_size"], what)

    def _z(self, z, scaled: bool, what: str = "z") -> np.ndarray:
        if isinstance(z, Posterior):
            z = z.mean
        lat = self.manifest.latent
        a = inputs.spatial_latents(z, self.latent_channels, what=what)
        # the image this latent decodes to must be a size the decoder takes
        inputs.spatial_size(tuple(d * self.downsample for d in a.shape), lat["multiple_of"], lat["min_size"],
                            f"{what} (decodes to height and width = {self.downsample} x latent)")
        if scaled:
            a = a / np.float32(self.scaling_factor) + np.float32(self.shift_factor)
        return np.ascontiguousarray(a, np.float32)

    def _check_out(self, out: np.ndarray, rows: int, size: tuple[int, int], what: str) -> None:
        if out.shape[0] != rows or tuple(out.shape[2:]) != size:
            raise BundleError(f"{self.manifest.name}/{what}: came out with shape {out.shape}; expected "
                              f"({rows}, {out.shape[1]}, {size[0]}, {size[1]}) (downsampling {self.downsample})")

    # --- the graphs -----------------------------------------------------------------------

    def _encode_raw(self, x: np.ndarray, batch_size, progress=None) -> list[np.ndarray]:
        outs = self._graphs["encoder"].run({"x": x}, batch_size, progress)
        size = (x.shape[2] // self.downsample, x.shape[3] // self.downsample)
        for o in outs:
            self._check_out(o, len(x), size, "encoder")
        return outs

    def _decode_raw(self, z: np.ndarray, batch_size, progress=None) -> np.ndarray:
        out = self._graphs["decoder"].run({"z": z}, batch_size, progress)[0]
        self._check_out(out, len(z), (z.shape[2] * self.downsample, z.shape[3] * self.downsample), "decoder")
        return out

    def encode(self, x, scaled: bool = False, tile=None, batch_size: int | None = None, progress=None) -> Posterior:
        """q(z|x) for images x: a `Posterior(mean, logvar)`, each (N, c, H / f, W / f).

        scaled=True: diffusion latents ((z - shift_factor) * scaling_factor; logvar shifted by
        2 log scaling_factor). A deterministic encoder (AutoencoderTiny; VQModel, whose latents
        are the pre-quantization ones) gives logvar None: `Posterior.sample()` is then the mean.
        tile: encode images larger than `tile` image pixels (an int, or (height, width);
        a multiple of `multiple_of`) in overlapping tiles (a quarter of the tile) with blended
        seams (see `vaeinfer.tiling`), in bounded memory. `progress(done)` counts tiles then.
        """
        x = self._x(x)
        bs = inputs.batch_size(batch_size)
        if tile is not None:
            outs = self._tiled("encode", x, tile, bs, progress)
        else:
            outs = self._encode_raw(x, bs, progress)
        mean, logvar = outs[0], (outs[1] if len(outs) > 1 else None)
        if scaled:
            s = np.float32(self.scaling_factor)
            mean = (mean - np.float32(self.shift_factor)) * s
            logvar = None if logvar is None else logvar + np.float32(2 * math.log(self.scaling_factor))
        return Posterior(mean.astype(np.float32, copy=False), logvar)

    def decode_params(self, z, scaled: bool = False, tile=None, batch_size: int | None = None,
                      progress=None) -> np.ndarray:
        """The decoder's raw output (the likelihood's mean, unclipped) for latents z (N, c, h, w)."""
        z = self._z(z, scaled)
        bs = inputs.batch_size(batch_size)
        if tile is not None:
            return self._tiled("decode", z, tile, bs, progress)[0]
        return self._decode_raw(z, bs, progress)

    def decode(self, z, scaled: bool = False, tile=None, batch_size: int | None = None, progress=None) -> np.ndarray:
        """Images (N, C, f h, f w) in the value range for latents z (N, c, h, w) or a Posterior's means.

        scaled=True: z are diffusion latents (decoded as z / scaling_factor + shift_factor).
        tile: decode latents larger than `tile` *latent* pixels (an int or (height, width); 64 is a
        512-pixel tile for an 8x decoder) in overlapping tiles (a quarter of the tile) with blended
        seams, in memory bounded by the output plus one tile's activations, not the image's.
        `progress(done)` is called as batches (or, with tile, tiles) finish; see `tile_count`.
        """
        return self._images_from_params(self.decode_params(z, scaled, tile, batch_size, progress))

    def reconstruct(self, x, tile=None, batch_size: int | None = None) -> np.ndarray:
        """decode(encode(x).mean): the model's deterministic reconstruction of x."""
        return self.decode(self.encode(x, tile=tile, batch_size=batch_size).mean, tile=tile, batch_size=batch_size)

    def sample(self, n: int, seed: int | None = None, temperature: float = 1.0, height: int | None = None,
               width: int | None = None, tile=None, batch_size: int | None = None, progress=None) -> np.ndarray:
        """n images decoded from latents temperature * eps, eps ~ N(0, I) (numpy's Generator(seed)),
        (n, c, height / f, width / f); default size: the manifest's native image size.

        For a latent-diffusion autoencoder this is its KL prior, not the data distribution: the
        images are textures (making latents that decode to real images is a diffusion model's job).
        """
        n, seed = inputs.count(n), inputs.seed(seed)
        temperature = inputs.positive(temperature, "temperature")
        h = self.manifest.image[1] if height is None else inputs.count(height, "height")
        w = self.manifest.image[2] if width is None else inputs.count(width, "width")
        lat = self.manifest.latent
        inputs.spatial_size((n, 0, h, w), lat["multiple_of"], lat["min_size"], "sample")
        shape = (n, self.latent_channels, h // self.downsample, w // self.downsample)
        eps = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        return self.decode(eps * np.float32(temperature), tile=tile, batch_size=batch_size, progress=progress)

    def score(self, x, samples: int = 100, seed: int = 0, batch_size: int | None = None,
              index_offset: int = 0) -> Score:
        """Per-image IWAE scores in nats (see `vaeinfer.vae.VAE.score`). Needs a stochastic encoder
        and a likelihood with a stated scale (bundles trained by vaeinfer); an imported
        latent-diffusion autoencoder states none, and this raises InputError."""
        from vaeinfer.vae import iwae_score

        if "scale" not in self.manifest.likelihood or not self.manifest.latent["stochastic"]:
            raise InputError(f"{self.manifest.name}: score needs a stochastic encoder and a likelihood scale; this "
                             f"bundle has likelihood {self.manifest.likelihood} and stochastic="
                             f"{self.manifest.latent['stochastic']} (an imported autoencoder only encodes/decodes)")
        x = self._x(x)
        latent = (self.latent_channels, x.shape[2] // self.downsample, x.shape[3] // self.downsample)
        return iwae_score(self, x, samples, seed, batch_size, index_offset, latent)

    # --- tiles ----------------------------------------------------------------------------

    def _tiling(self, direction: str, tile, overlap):
        """(factor, multiple, tile, overlap) for vaeinfer.tiling, in the input's units."""
        f, lat = self.downsample, self.manifest.latent
        # tiles start and end on the grid the model takes: multiple_of image pixels
        if direction == "decode":
            factor, multiple, smallest = f, max(1, lat["multiple_of"] // f), -(-lat["min_size"] // f)
        else:
            factor, multiple, smallest = Fraction(1, f), lat["multiple_of"], lat["min_size"]
        tiles = tuple(tile) if isinstance(tile, (tuple, list)) else (tile, tile)
        if len(tiles) != 2 or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in tiles):
            raise InputError(f"tile: expected an int or (height, width) ints, got {tile!r}")
        if min(tiles) < smallest:
            raise InputError(f"tile: expected at least {smallest} ({'latent' if direction == 'decode' else 'image'} "
                             f"pixels) for this model, got {tile!r}")
        if overlap is None:  # a quarter of the tile, on the alignment grid
            overlap = tuple(max(0, (t // 4) // multiple * multiple) for t in tiles)
        return factor, multiple, tiles, overlap

    def tile_count(self, shape, tile, overlap=None, direction: str = "decode") -> int:
        """How many tiles `decode(z, tile=...)` (or encode) runs for an input of `shape`
        (the `progress` total)."""
        from vaeinfer import tiling

        factor, multiple, tiles, overlap = self._tiling(direction, tile, overlap)
        return tiling.tile_count(shape, tiles, overlap, factor, multiple)

    def _tiled(self, direction: str, a: np.ndarray, tile, batch_size, progress, overlap=None) -> list[np.ndarray]:
        """Run the encoder or decoder over `a` in overlapping tiles with blended seams
        (vaeinfer.tiling); tile and overlap are in the input's pixels (latent pixels for decode,
        image pixels for encode), overlap by default a quarter of the tile. Memory: the output
        plus one batch of tiles (`batch_size` tiles per call, default 1)."""
        from vaeinfer import tiling

        factor, multiple, tiles, overlap = self._tiling(direction, tile, overlap)
        step = batch_size or 1

        def run(chunk):
            chunk = np.ascontiguousarray(chunk)
            outs = self._decode_raw(chunk, None) if direction == "decode" else self._encode_raw(chunk, None)
            return outs if direction == "decode" else tuple(outs)

        report = None if progress is None else (lambda done, _total: progress(done))
        out = tiling.tiled_apply(run, a, tiles, overlap, factor, multiple=multiple, max_batch=step, progress=report)
        return list(out) if isinstance(out, tuple) else [out]
