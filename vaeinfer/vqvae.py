"""The VQ-VAE runtime: encode to code grids, decode them, and sample new grids from the PixelCNN
prior autoregressively (prior in onnxruntime, sampling on the host with a seeded Generator)."""

from __future__ import annotations

import math

import numpy as np

from vaeinfer import inputs
from vaeinfer.prior_sampling import cached_loop, full_grid_loop
from vaeinfer.errors import BundleError, InputError
from vaeinfer.results import Codes
from vaeinfer.runtime import Model

LOG2 = math.log(2.0)


def filter_logits(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None) -> np.ndarray:
    """Row-wise log-probabilities after temperature, top-k and top-p (nucleus) filtering; the
    removed codes get -inf. logits: (n, K) -> float64 (n, K)."""
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.shape[1]:
        kth = np.partition(z, -top_k, axis=1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-logp, axis=1, kind="stable")
        sorted_p = np.exp(np.take_along_axis(logp, order, axis=1))
        # keep the smallest prefix whose mass reaches top_p (always at least the likeliest code)
        keep_sorted = np.cumsum(sorted_p, axis=1) - sorted_p < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=1)
        z = np.where(keep, logp, -np.inf)
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return logp


def draw(logp: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One code per row from log-probabilities, by inverse CDF with one uniform per row."""
    cdf = np.cumsum(np.exp(logp), axis=1)
    u = rng.random(len(logp))[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=1), logp.shape[1] - 1).astype(np.int64)


class VQVAE(Model):
    """A loaded VQ-VAE bundle: `encode` -> Codes, `decode(codes)`, `sample` through the prior."""

    @property
    def can_sample(self) -> bool:
        """Only with a prior graph: the codes are sampled from it."""
        return "prior" in self.manifest.specs()

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.manifest.latent["grid"])

    @property
    def codebook_size(self) -> int:
        return self.manifest.latent["codebook_size"]

    def _codes(self, codes) -> np.ndarray:
        if isinstance(codes, Codes):
            codes = codes.codes
        return inputs.codes(codes, self.grid, self.codebook_size)

    def encode(self, x, batch_size: int | None = None) -> Codes:
        """Code grids (N, h, w) int64 and quantized vectors z_q (N, D, h, w) for images x."""
        x = inputs.images(x, self.manifest.image, self.manifest.value_range)
        codes, z_q = self._graphs["encoder"].run({"x": x}, inputs.batch_size(batch_size))
        return Codes(codes, z_q)

    def decode(self, codes, batch_size: int | None = None, progress=None) -> np.ndarray:
        """Images for code grids (an int array (N, h, w) or a Codes)."""
        params = self._graphs["decoder"].run({"codes": self._codes(codes)}, inputs.batch_size(batch_size), progress)[0]
        return self._images_from_params(params)

    def reconstruct(self, x, batch_size: int | None = None) -> np.ndarray:
        return self.decode(self.encode(x, batch_size), batch_size)

    def _prior(self):
        if "prior" not in self.manifest.specs():
            raise BundleError(f"{self.manifest.name}: this VQ-VAE bundle has no prior, so it cannot sample "
                              "(encode/decode/reconstruct work); train one with `vaeinfer train-prior RUN` and re-export")
        return self._graphs["prior"]  # ValueError if loaded without it (roles=)

    def _labels(self, label, n: int, rng: np.random.Generator) -> np.ndarray | None:
        classes = self.manifest.prior["num_classes"]
        if classes == 0:
            if label is not None:
                raise InputError(f"label: this model's prior is unconditional, got label={label!r}")
            return None
        if label is None:
            return rng.integers(0, classes, size=n, dtype=np.int64)
        labels = np.broadcast_to(np.asarray(label), (n,)) if np.ndim(label) == 0 else np.asarray(label)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"label: expected an int or {n} ints, got {np.asarray(label).dtype} shape {np.shape(label)}")
        if labels.min() < 0 or labels.max() >= classes:
            raise InputError(f"label: expected classes in [0, {classes}), got [{labels.min()}, {labels.max()}]")
        return np.ascontiguousarray(labels, np.int64)

    def sample_codes(self, n: int, seed: int | None = None, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, label=None, batch_size: int | None = None, progress=None,
                     cached: bool | None = None) -> np.ndarray:
        """n code grids drawn from the prior, position by position in raster order.

        All n grids advance together (one prior call per position for the whole batch, in chunks
        of `batch_size`); the noise is one seeded uniform per position and grid. `cached`: use
        the bundle's cached prior graphs (one new position per layer and step; the default when
        the bundle has them) or, False, the full prior graph once per position (the reference).
        The two draw the same codes up to float rounding (see vaeinfer.prior_sampling).
        """
        prior = self._prior()
        n, seed = inputs.count(n), inputs.seed(seed)
        temperature = inputs.positive(temperature, "temperature")
        if top_k is not None:
            top_k = inputs.count(top_k, "top_k")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise InputError(f"top_p: expected a number in (0, 1], got {top_p!r}")
        has_cache = "prior_step" in self._graphs
        if cached and not has_cache:
            raise BundleError(f"{self.manifest.name}: this bundle has no cached prior graphs (prior_row, "
                              "prior_step); re-export it, or sample with cached=False")
        rng = np.random.default_rng(seed)
        labels = self._labels(label, n, rng)
        batch = inputs.batch_size(batch_size)

        def choose(logits):
            return draw(filter_logits(logits, temperature, top_k, top_p), rng)

        if has_cache and cached is not False:
            return cached_loop(self._graphs["prior_row"], self._graphs["prior_step"], n, self.grid, self.codebook_size,
                               self.manifest.prior["cache"], labels, choose, batch, progress)
        return full_grid_loop(prior, n, self.grid, labels, choose, batch, progress)

    def sample(self, n: int, seed: int | None = None, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, label=None, batch_size: int | None = None, progress=None,
               cached: bool | None = None) -> np.ndarray:
        """n images: code grids from the prior (see `sample_codes`), decoded.

        temperature divides the prior's logits; top_k / top_p restrict each draw to the k likeliest
        codes / the smallest set holding probability top_p; label (an int or n ints) picks the
        class of a class-conditional prior (None: classes drawn uniformly).
        """
        codes = self.sample_codes(n, seed, temperature, top_k, top_p, label, batch_size, progress, cached)
        return self.decode(codes, batch_size)

    def sample_latents(self, n: int, seed: int | None = None, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, label=None, batch_size: int | None = None,
                       cached: bool | None = None) -> np.ndarray:
        """What `sample` decodes: `sample_codes` under the name every model kind has
        (decode(sample_latents(...)) is sample(...), bit for bit)."""
        return self.sample_codes(n, seed, temperature, top_k, top_p, label, batch_size, cached=cached)

    def prior_nll(self, codes, label=None, batch_size: int | None = None) -> np.ndarray:
        """-log2 p(codes) / (h*w) under the prior: bits per code, float64 (N,)."""
        prior, codes = self._prior(), self._codes(codes)
        if self.manifest.prior["num_classes"] > 0 and label is None:
            raise InputError("label: this model's prior is class-conditional; pass the labels of the codes")
        labels = self._labels(label, len(codes), np.random.default_rng(0))
        feeds = {"codes": codes} if labels is None else {"codes": codes, "label": labels}
        logits = prior.run(feeds, inputs.batch_size(batch_size))[0].astype(np.float64)  # (N, K, h, w)
        top = logits.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        picked = np.take_along_axis(logits, codes[:, None], axis=1)[:, 0]
        return (log_z - picked).reshape(len(codes), -1).mean(axis=1) / LOG2
