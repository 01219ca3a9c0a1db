"""p(x|z) in numpy, from the decoder's parameters: the runtime twin of `training.likelihood`."""

from __future__ import annotations

import math

import numpy as np

_MIN_LOGIT = -88.0  # exp(88) < float32 max


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
        # sigmoid in place, warning-free without an errstate context (entering one costs more than
        # a ufunc at batch 1): logits below -88 are clamped so that exp(-l) stays finite; their
        # sigmoid is under 1e-38 either way
        out = np.maximum(params, _MIN_LOGIT)
        np.negative(out, out=out)
        np.exp(out, out=out)
        out += 1
        np.reciprocal(out, out=out)
    else:  # np.clip's Python layer costs more than its two ufuncs
        lo, hi = value_range
        out = np.maximum(params, lo)
        np.minimum(out, hi, out=out)
    return out if out.dtype == np.float32 else out.astype(np.float32)
