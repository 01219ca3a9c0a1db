"""Likelihood evaluation on the PyTorch side, the twin of `vaeinfer.VAE.score`.

`iwae_score` draws image i's noise exactly as the runtime does (numpy's Generator([seed, i]),
float32 standard normals of shape (K, Z)), so the two estimates differ only by the arithmetic
of PyTorch vs onnxruntime: a test checks they agree within 0.1 nats.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vaeinfer.training.models import VAE
from vaeinfer.training.latent_prior import mixture_log_prob


def _noise(seed: int, index: int, k: int, dim: int) -> np.ndarray:
    return np.random.default_rng([seed, index]).standard_normal((k, dim), dtype=np.float32)


@torch.no_grad()
def iwae_score(model: VAE, images: np.ndarray, samples: int, seed: int = 0, rows: int = 512) -> dict[str, np.ndarray]:
    """Per-image nll (IWAE bound with K=`samples`), negative ELBO and recon term, nats, float64."""
    model.eval()
    k, dim = samples, model.latent_dim
    out = {key: np.empty(len(images)) for key in ("nll", "elbo", "recon")}
    per_chunk = max(1, rows // k)
    log_2pi = math.log(2 * math.pi)
    for start in range(0, len(images), per_chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + per_chunk], np.float32))
        mean, logvar = model.encoder(x)
        eps = torch.from_numpy(np.stack([_noise(seed, start + i, k, dim) for i in range(len(x))]))
        z = mean[:, None] + torch.exp(0.5 * logvar)[:, None] * eps  # (B, K, Z)
        flat = z.reshape(-1, dim)
        target = x.repeat_interleave(k, dim=0)
        lpx = torch.cat([model.likelihood.log_prob(target[i:i + rows], model.decoder(flat[i:i + rows]))
                         for i in range(0, len(flat), rows)]).double().reshape(len(x), k)
        z64, eps64 = z.double(), eps.double()
        if model.prior is None:
            log_pz = -0.5 * (z64 ** 2 + log_2pi).sum(dim=2)
        else:  # the learned mixture, in float64 like the runtime
            log_pz = mixture_log_prob(z64, *(t.double() for t in model.prior.mixture(model.encoder)))
        log_qz = -0.5 * (eps64 ** 2 + log_2pi + logvar.double()[:, None]).sum(dim=2)
        log_w = lpx + log_pz - log_qz
        end = start + len(x)
        out["nll"][start:end] = -(torch.logsumexp(log_w, dim=1) - math.log(k)).numpy()
        out["elbo"][start:end] = -log_w.mean(dim=1).numpy()
        out["recon"][start:end] = -lpx.mean(dim=1).numpy()
    return out


def binarize(images: np.ndarray, seed: int) -> np.ndarray:
    """One fixed, seeded binarization: pixel ~ Bernoulli(intensity)."""
    return (np.random.default_rng(seed).random(images.shape, dtype=np.float32) < images).astype(np.float32)
