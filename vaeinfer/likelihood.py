"""p(x|z) in numpy, from the decoder's parameters: the runtime twin of `training.likelihood`."""

from __future__ import annotations

import math

import numpy as np


def log_prob(x: np.ndarray, params: np.ndarray, likelihood: dict) -> np.ndarray:
    """log p(x|z) in nats, summed over pixels: float64 (N,). Bernoulli uses the logits directly
    (x*l - softplus(l)), never clipped probabilities, so it stays exact for confident pixels."""
    x = x.reshape(len(x), -1).astype(np.float64)
    p = params.reshape(len(params), -1).astype(np.float64)
    if likelihood["kind"] == "bernoulli":
        return (x * p - np.logaddexp(0.0, p)).sum(axis=1)
    s = likelihood["scale"]
    if likelihood["kind"] == "laplace":
        return (-np.abs(x - p) / s).sum(axis=1) - x.shape[1] * math.log(2 * s)
    return (-0.5 * ((x - p) / s) ** 2).sum(axis=1) - x.shape[1] * (math.log(s) + 0.5 * math.log(2 * math.pi))


def mean(params: np.ndarray, likelihood: dict, value_range: tuple[float, float]) -> np.ndarray:
    """The image for decoder parameters: E[x|z] (sigmoid of the logits, or the Gaussian's mean /
    the Laplace's location, clipped to the value range)."""
    if likelihood["kind"] == "bernoulli":
        # sigmoid in place: exp(-l) overflows to inf for very negative logits, and 1 / inf is the
        # right 0 (a third of the time of exp(-logaddexp(0, -l)), which matters at batch 1)
        with np.errstate(over="ignore"):
            out = np.exp(np.negative(params))
        out += 1
        np.reciprocal(out, out=out)
    else:
        out = np.clip(params, *value_range)
    return out.astype(np.float32, copy=False)
