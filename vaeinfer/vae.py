"""The VAE runtime: encode, decode, sample, reconstruct, interpolate, score."""

from __future__ import annotations

import math

import numpy as np

from vaeinfer import inputs, latent_prior
from vaeinfer import likelihood as lik
from vaeinfer.results import Posterior, Score
from vaeinfer.runtime import DEFAULT_BATCH, Model, check_finite

_LOG_2PI = math.log(2 * math.pi)


class VAE(Model):
    """A loaded VAE bundle. Images are float32 (N, C, H, W) in `info.value_range`.

    `prior` is the bundle's learned latent prior (a `vaeinfer.latent_prior.MixturePrior`), or None for
    the standard normal; `sample` draws from it and `score` uses its log p(z)."""

    def __init__(self, bundle, device: str = "auto", threads: int | None = None, precision: str = "fp32",
                 verify: bool = True, **options):
        super().__init__(bundle, device, threads, precision, verify, **options)
        self.prior = latent_prior.load(bundle, self.latent_dim, verify)

    @property
    def latent_dim(self) -> int:
        return self.manifest.latent["dim"]

    def _x(self, x, what="images"):
        return inputs.images(x, self.manifest.image, self.manifest.value_range, what)

    def _z(self, z) -> np.ndarray:
        if isinstance(z, Posterior):
            z = z.mean
        return inputs.latents(z, self.latent_dim)

    def encode(self, x, batch_size: int | None = None) -> Posterior:
        """q(z|x) for images x: a `Posterior(mean, logvar)`, each (N, latent)."""
        mean, logvar = self._graphs["encoder"].run({"x": self._x(x)}, inputs.batch_size(batch_size))
        return Posterior(mean, logvar)

    def decode_params(self, z, batch_size: int | None = None, progress=None) -> np.ndarray:
        """The decoder's raw likelihood parameters (Bernoulli logits or Gaussian mean) for z."""
        return self._graphs["decoder"].run({"z": self._z(z)}, inputs.batch_size(batch_size), progress)[0]

    def decode(self, z, batch_size: int | None = None, progress=None) -> np.ndarray:
        """Images E[x|z] for latents z (N, latent), or for a Posterior's means."""
        return self._images_from_params(self.decode_params(z, batch_size, progress))

    def reconstruct(self, x, batch_size: int | None = None) -> np.ndarray:
        """decode(encode(x).mean): the model's deterministic reconstruction of x."""
        return self.decode(self.encode(x, batch_size).mean, batch_size)

    def sample(self, n: int, seed: int | None = None, temperature: float = 1.0,
               batch_size: int | None = None, progress=None) -> np.ndarray:
        """n images from the prior: z = temperature * eps, eps ~ N(0, I) from numpy's Generator(seed);
        with a learned mixture prior, a component k ~ w then z = mean_k + temperature * std_k * eps.

        The same seed gives bit-identical images on the same machine, provider and thread count,
        whatever the batch_size. `progress(done)` is called after each chunk, if given.
        """
        return self.decode(self.sample_latents(n, seed, temperature), batch_size, progress)

    def sample_latents(self, n: int, seed: int | None = None, temperature: float = 1.0) -> np.ndarray:
        """The latents `sample` decodes: z = temperature * eps (n, latent) float32, eps from
        numpy's Generator(seed); with a learned mixture prior, a component k ~ w then
        z = mean_k + temperature * std_k * eps from the same generator. decode(sample_latents(...))
        is sample(...), bit for bit, also when the z of several calls are decoded together (as
        `vaeinfer serve` batches them)."""
        n, seed = inputs.count(n), inputs.seed(seed)
        temperature = inputs.positive(temperature, "temperature")
        rng = np.random.default_rng(seed)
        if self.prior is not None:
            return self.prior.sample(rng, n, temperature)
        eps = rng.standard_normal((n, self.latent_dim), dtype=np.float32)
        return eps * np.float32(temperature)

    def interpolate(self, a, b, steps: int = 8, batch_size: int | None = None) -> np.ndarray:
        """Decoded linear interpolations between the posterior means of a[i] and b[i]:
        (N, steps, C, H, W), the first step a's reconstruction, the last b's."""
        steps = inputs.count(steps, "steps")
        ma, mb = self.encode(a, batch_size).mean, self.encode(b, batch_size).mean
        if ma.shape != mb.shape:
            raise inputs.InputError(f"interpolate: expected as many images in b as in a ({len(ma)}), got {len(mb)}")
        t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[None, :, None]
        z = (ma[:, None] * (1 - t) + mb[:, None] * t).reshape(-1, self.latent_dim)
        return self.decode(z, batch_size).reshape(len(ma), steps, *self.manifest.image)

    def score(self, x, samples: int = 100, seed: int = 0, batch_size: int | None = None,
              index_offset: int = 0) -> Score:
        """Per-image scores in nats from the exported graphs (see `Score`): nll is the IWAE
        estimate of -log p(x) with K=`samples` importance samples from q(z|x), under the bundle's
        prior (the standard normal, or its learned mixture).

        Image i's noise comes from numpy's Generator([seed, index_offset + i]), so results do not
        depend on batch_size, and scoring a dataset in pieces (x[a:b] with index_offset=a, as
        `vaeinfer.ray` does) gives the scores of one call over all of it. Memory stays bounded: at
        most `batch_size` (default 512) decoder rows at once.
        """
        log_prior = None if self.prior is None else self.prior.log_prob
        return iwae_score(self, self._x(x), samples, seed, batch_size, index_offset, (self.latent_dim,), log_prior)


def iwae_score(model, x: np.ndarray, samples: int, seed: int, batch_size: int | None, index_offset: int,
               latent_shape: tuple[int, ...], log_prior=None) -> Score:
    """The IWAE scores of checked images x under `model` (its encode(x, rows) -> Posterior and
    decode_params(z, rows)), with latents of `latent_shape` per image (see VAE.score).
    log_prior(z (..., Z) float64) -> log p(z): a learned prior (vaeinfer.latent_prior); default N(0, I)."""
    k = inputs.count(samples, "samples")
    seed = inputs.seed(seed) or 0
    if not isinstance(index_offset, (int, np.integer)) or isinstance(index_offset, bool) or index_offset < 0:
        raise inputs.InputError(f"index_offset: expected a non-negative integer, got {index_offset!r}")
    offset = int(index_offset)
    rows = inputs.batch_size(batch_size) or DEFAULT_BATCH
    per_chunk = max(1, rows // k)
    axes = tuple(range(2, 2 + len(latent_shape)))
    nll, elbo, recon = (np.empty(len(x)) for _ in range(3))
    for start in range(0, len(x), per_chunk):
        xs = x[start:start + per_chunk]
        post = model.encode(xs, batch_size=rows)
        eps = np.stack([np.random.default_rng([seed, offset + start + i]).standard_normal(
            (k, *latent_shape), dtype=np.float32) for i in range(len(xs))])  # (B, K, *latent)
        with np.errstate(over="ignore", invalid="ignore"):
            z = post.mean[:, None] + post.std[:, None] * eps
        check_finite(z, f"{model.manifest.name}/encoder posterior samples (mean + std * eps)")
        params = model.decode_params(z.reshape(-1, *latent_shape), batch_size=rows)
        lpx = lik.log_prob(np.repeat(xs, k, axis=0), params, model.manifest.likelihood).reshape(len(xs), k)
        z64, eps64 = z.astype(np.float64), eps.astype(np.float64)
        log_pz = -0.5 * (z64 ** 2 + _LOG_2PI).sum(axis=axes) if log_prior is None else log_prior(z64)
        log_qz = -0.5 * (eps64 ** 2 + _LOG_2PI + post.logvar.astype(np.float64)[:, None]).sum(axis=axes)
        log_w = lpx + log_pz - log_qz
        top = log_w.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(log_w - top).sum(axis=1))
        end = start + len(xs)
        nll[start:end] = -(lse - math.log(k))
        elbo[start:end] = -log_w.mean(axis=1)
        recon[start:end] = -lpx.mean(axis=1)
    return Score(nll=nll, elbo=elbo, recon=recon)
