"""Results of the runtime's calls: frozen dataclasses of numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Posterior:
    """q(z|x) = N(mean, exp(logvar)) for each image; arrays (N, latent) or, for a spatial VAE,
    (N, c, h, w). A deterministic encoder (AutoencoderTiny, VQModel) gives logvar None: std is
    then zero and sample() returns the mean."""

    mean: np.ndarray
    logvar: np.ndarray | None

    @property
    def std(self) -> np.ndarray:
        if self.logvar is None:
            return np.zeros_like(self.mean)
        return np.exp(0.5 * self.logvar)

    def sample(self, seed: int | None = None, temperature: float = 1.0) -> np.ndarray:
        """z = mean + temperature * std * eps, eps from numpy's Generator seeded with `seed`."""
        if self.logvar is None:
            return self.mean.copy()
        eps = np.random.default_rng(seed).standard_normal(self.mean.shape, dtype=np.float32)
        return (self.mean + np.float32(temperature) * self.std * eps).astype(np.float32)

    def __len__(self):
        return len(self.mean)


@dataclass(frozen=True)
class Codes:
    """A VQ-VAE's encoding: the code grid (N, h, w) int64 and the quantized vectors z_q (N, D, h, w)."""

    codes: np.ndarray
    z_q: np.ndarray

    def __len__(self):
        return len(self.codes)


@dataclass(frozen=True)
class Score:
    """Per-image scores in nats, float64 (N,).

    nll: importance-weighted estimate of -log p(x) (IWAE bound, Burda et al. 2015) with K samples;
    an upper bound on the true NLL that tightens as K grows. elbo: the negative ELBO (>= nll).
    recon: the expected reconstruction term -E_q[log p(x|z)].
    As an anomaly score: higher nll = less likely under the model.
    """

    nll: np.ndarray
    elbo: np.ndarray
    recon: np.ndarray


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str  # vae | vqvae | spatial-vae
    format_version: str
    image_shape: tuple[int, int, int]  # (C, H, W)
    value_range: tuple[float, float]
    latent: dict
    likelihood: dict
    device: str  # what actually runs: "cpu" or "cuda:N"
    backend: str  # the backend that runs it (vaeinfer.backends): "cpu", "cuda", "tensorrt", ...
    providers: tuple[str, ...]  # what the backend bound, in priority order (onnxruntime: its providers)
    precision: str
    precisions: tuple[str, ...]  # what the bundle offers
    threads: int | None
    has_prior: bool
    num_classes: int | None
    files: dict  # file name -> sha256
    path: str
    cuda_graph: tuple[int, ...] = ()  # batch sizes replayed as captured CUDA graphs (empty: none)
    # precision="auto": per graph {"choice": {batch: "backend/precision"}, "errors", "max_error", "why", "cached"}
    auto: dict | None = None
    # the graphs loaded (`vaeinfer.load(roles=...)`; every graph of the bundle unless asked otherwise)
    roles: tuple[str, ...] = ()
