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

    def encode(self, x, scaled: bool = False, tile=None, batch_size: int | None = None, progress=None,
               max_memory=None, tile_mode: str = "exact") -> Posterior:
        """q(z|x) for images x: a `Posterior(mean, logvar)`, each (N, c, H / f, W / f).

        scaled=True: diffusion latents ((z - shift_factor) * scaling_factor; logvar shifted by
        2 log scaling_factor). A deterministic encoder (AutoencoderTiny; VQModel, whose latents
        are the pre-quantization ones) gives logvar None: `Posterior.sample()` is then the mean.
        max_memory / tile: encode in tiles, exactly (see `decode`): max_memory ("2GiB", bytes)
        plans the tiles; tile (image pixels, an int or (height, width), a multiple of the
        downsampling factor) sets them. tile_mode="blend": the approximate overlapping tiles with
        blended seams of `vaeinfer.tiling` (tile= a multiple of `multiple_of`).
        `progress(done)` counts tiles then (`exact_plan(...).total` of them).
        """
        x = self._x(x)
        bs = inputs.batch_size(batch_size)
        outs = self._spatial("encode", x, tile, max_memory, tile_mode, bs, progress)
        mean, logvar = outs[0], (outs[1] if len(outs) > 1 else None)
        if scaled:
            s = np.float32(self.scaling_factor)
            mean = (mean - np.float32(self.shift_factor)) * s
            logvar = None if logvar is None else logvar + np.float32(2 * math.log(self.scaling_factor))
        return Posterior(mean.astype(np.float32, copy=False), logvar)

    def decode_params(self, z, scaled: bool = False, tile=None, batch_size: int | None = None,
                      progress=None, max_memory=None, tile_mode: str = "exact") -> np.ndarray:
        """The decoder's raw output (the likelihood's mean, unclipped) for latents z (N, c, h, w)."""
        z = self._z(z, scaled)
        bs = inputs.batch_size(batch_size)
        return self._spatial("decode", z, tile, max_memory, tile_mode, bs, progress)[0]

    def decode(self, z, scaled: bool = False, tile=None, batch_size: int | None = None, progress=None,
               max_memory=None, tile_mode: str = "exact") -> np.ndarray:
        """Images (N, C, f h, f w) in the value range for latents z (N, c, h, w) or a Posterior's means.

        scaled=True: z are diffusion latents (decoded as z / scaling_factor + shift_factor).
        max_memory: decode within this much memory beyond the input and the output ("2GiB",
        "512MiB" or bytes): exact tiling (`vaeinfer.exact_tiling`) plans tiles, attention chunks and
        what goes to disk before running, and raises MemoryBudgetError naming the smallest budget
        that works when it cannot. The result equals the untiled decode (GroupNorm statistics and
        attention over the whole image). Needs a bundle exported with the stage graphs
        (`--exact-tiling`); `exact_tiling_info()` says whether this one has them.
        tile: set the exact tiles yourself, in *latent* pixels (an int or (height, width)).
        tile_mode="blend": instead, the approximate overlapping tiles (a quarter of the tile) with
        blended seams of `vaeinfer.tiling`, for any decoder; seams show where GroupNorm or attention
        sees a tile instead of the image.
        `progress(done)` is called as batches (or tiles) finish; see `exact_plan` / `tile_count`.
        """
        params = self.decode_params(z, scaled, tile, batch_size, progress, max_memory, tile_mode)
        if max_memory is not None and self.manifest.likelihood["kind"] != "bernoulli":
            # the Gaussian/Laplace mean clipped in place: no second output-sized array in the budget
            lo, hi = self.manifest.value_range
            np.maximum(params, np.float32(lo), out=params)
            np.minimum(params, np.float32(hi), out=params)
            return params
        return self._images_from_params(params)

    def reconstruct(self, x, tile=None, batch_size: int | None = None, max_memory=None,
                    tile_mode: str = "exact") -> np.ndarray:
        """decode(encode(x).mean): the model's deterministic reconstruction of x (tile: image pixels)."""
        t = None if tile is None else (tile // self.downsample if isinstance(tile, int) else
                                       tuple(v // self.downsample for v in tile))
        mean = self.encode(x, tile=tile, batch_size=batch_size, max_memory=max_memory, tile_mode=tile_mode).mean
        return self.decode(mean, tile=t, batch_size=batch_size, max_memory=max_memory, tile_mode=tile_mode)

    def sample(self, n: int, seed: int | None = None, temperature: float = 1.0, height: int | None = None,
               width: int | None = None, tile=None, batch_size: int | None = None, progress=None,
               max_memory=None, tile_mode: str = "exact") -> np.ndarray:
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
        return self.decode(eps * np.float32(temperature), tile=tile, batch_size=batch_size, progress=progress,
                           max_memory=max_memory, tile_mode=tile_mode)

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

    TILE_MODES = ("exact", "blend")

    def _spatial(self, direction: str, a: np.ndarray, tile, max_memory, tile_mode: str, batch_size,
                 progress) -> list[np.ndarray]:
        """Untiled, exactly tiled (max_memory / tile) or blended (tile_mode="blend")."""
        if tile_mode not in self.TILE_MODES:
            raise InputError(f"tile_mode: expected one of {self.TILE_MODES}, got {tile_mode!r:.40}")
        if tile_mode == "blend":
            if max_memory is not None:
                raise InputError("max_memory plans exact tiles; tile_mode='blend' takes tile= (its size) instead")
            if tile is None:
                raise InputError("tile_mode='blend' needs tile= (the tile size)")
            return self._tiled(direction, a, tile, batch_size, progress)
        if tile is None and max_memory is None:
            if direction == "decode":
                return [self._decode_raw(a, batch_size, progress)]
            return self._encode_raw(a, batch_size, progress)
        return self._exact(direction, a, tile, max_memory, progress)

    def exact_tiling_info(self) -> dict:
        """Whether this bundle decodes/encodes with exact tiling: {"decoder": bool, "encoder":
        bool, "why": the reason when not (a model not of the AutoencoderKL family, or a bundle
        exported without the stage graphs)}."""
        slot = self.manifest.exact_tiling or {}
        have = {d: d in slot for d in ("decoder", "encoder")}
        why = None
        if not all(have.values()):
            why = slot.get("unavailable") or ("this bundle has no exact-tiling stage graphs; re-export it with "
                                              "--exact-tiling (vaeinfer export --from-diffusers DIR --exact-tiling)")
        return {**have, "why": why}

    def exact_plan(self, shape, direction: str = "decode", tile=None, max_memory=None):
        """The plan exact tiling would run for an input of `shape` (`vaeinfer.exact_tiling.Plan`:
        `.total` tiles for `progress`, `.peak` estimated bytes, `.describe()`); raises
        MemoryBudgetError when max_memory cannot be met.

        With a budget that the stage graphs' weights would take a quarter of, each stage graph is
        loaded for its step and released after it (`.stream`: only the largest counts in the
        budget; loading them all costs about 3x their files' size, 650 MiB for SD's decoder);
        otherwise they are loaded once and kept."""
        from vaeinfer import exact_tiling

        role = "decoder" if direction == "decode" else "encoder"
        d = self._exact_direction(role)
        budget = None if max_memory is None else exact_tiling.parse_bytes(max_memory)
        tiles = None if tile is None else self._exact_tile(direction, tile)
        resident = self._stage_resident(role)
        stream = budget is not None and resident > budget // 4
        p = exact_tiling.plan(d, tuple(shape), budget, tiles, self._stage_resident(role, True) if stream else resident)
        p.stream = stream
        return p

    def _exact_direction(self, role: str):
        slot = self.manifest.exact_tiling or {}
        if role not in slot:
            why = self.exact_tiling_info()["why"]
            raise InputError(f"{self.manifest.name}: exact tiling (max_memory, tile) is not available: {why}. "
                             "Pass tile_mode='blend' with tile= for approximate tiles with blended seams.")
        if self.info.precision != "fp32":
            raise InputError(f"{self.manifest.name}: exact tiling runs the fp32 stage graphs; this model is loaded "
                             f"with precision {self.info.precision!r} (load it with precision='fp32')")
        return slot[role]

    def _exact_tile(self, direction: str, tile) -> tuple[int, int]:
        tiles = tuple(tile) if isinstance(tile, (tuple, list)) else (tile, tile)
        if len(tiles) != 2 or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t > 0
                                      for t in tiles):
            raise InputError(f"tile: expected a positive int or (height, width) ints, got {tile!r}")
        if direction == "encode" and any(t % self.downsample for t in tiles):
            raise InputError(f"tile: expected multiples of {self.downsample} (image pixels) for exact tiled "
                             f"encoding, got {tile!r}")
        return int(tiles[0]), int(tiles[1])

    def _stage_resident(self, role: str, largest: bool = False) -> int:
        """Bytes the stage graphs will take once loaded (0 when they are): three times their files'
        size (measured on SD's decoder: the bytes read, the session's weights, prepacked convolution
        weights) and a session's own memory each; largest=True: the largest one's alone."""
        import os

        from vaeinfer.exact_tiling import SESSION_BYTES

        if role in getattr(self, "_stages", {}):
            return 0
        d = (self.manifest.exact_tiling or {})[role]
        costs = [3 * os.stat(self.bundle.path / s.file).st_size + SESSION_BYTES for s in d.graphs().values()]
        return max(costs) if largest else sum(costs)

    def _stage_graph(self, role: str, name: str):
        """One stage graph as a runtime Graph on this model's device, in the shared host arena."""
        import inspect

        from vaeinfer import exact_tiling
        from vaeinfer.runtime import Graph

        device = self.graph(role).device
        make = device.entry.make_runner
        params = inspect.signature(make).parameters
        extra = {"arena": "shared"} if "arena" in params or any(
            p.kind == p.VAR_KEYWORD for p in params.values()) else {}
        step = self.manifest.exact_tiling[role].graphs()[name]
        spec, what = exact_tiling.stage_spec(step), f"{self.manifest.name}/{name}"
        runner = make(self.bundle.read_graph(name, "fp32"), device, threads=self.info.threads, what=what,
                      precision="fp32", spec=spec, **extra)
        return Graph(runner, spec, what, device)

    def _stage_graphs(self, role: str):
        """The stage graphs of a direction, made on first use and kept."""
        import threading

        lock = self.__dict__.setdefault("_stage_lock", threading.Lock())
        with lock:
            stages = self.__dict__.setdefault("_stages", {})
            if role not in stages:
                stages[role] = {name: self._stage_graph(role, name)
                                for name in self.manifest.exact_tiling[role].graphs()}
            return stages[role]

    def _exact(self, direction: str, a: np.ndarray, tile, max_memory, progress) -> list[np.ndarray]:
        from vaeinfer import exact_tiling
        from vaeinfer.runtime import check_finite

        role = "decoder" if direction == "decode" else "encoder"
        d = self._exact_direction(role)
        p = self.exact_plan(a.shape, direction, tile, max_memory)  # refuses before anything runs
        graphs = None if p.stream else self._stage_graphs(role)

        def runner(name):  # streamed: made for its step, released after it
            graph = self._stage_graph(role, name) if graphs is None else graphs[name]
            session = graph.session  # onnxruntime: its last tile shrinks the shared arena afterwards
            if session is None or not hasattr(graph.runner, "run_options"):
                return lambda feeds, last=False: graph.run(feeds)

            def run(feeds, last=False):
                if not last:
                    return graph.run(feeds)
                options = graph.runner.run_options()
                options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
                outs = session.run([t.name for t in graph.spec.outputs], feeds, options)
                check_finite(outs[0], f"{graph.what} output y")
                return outs
            return run

        outs = exact_tiling.run(d, p, a, runner, progress, threads=self.info.threads)
        for (name, _), o in zip(d.outputs, outs):
            check_finite(o, f"{self.manifest.name}/{role} output {name} (exact tiling)")
        return outs

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
