"""Pictures of a VAE's latent space: the 2-D manifold grid and single-dimension traversals.

`manifold` is the figure of Kingma & Welling 2013 (Fig. 4): a grid over the unit square mapped
through the inverse Gaussian CDF into two latent dimensions and decoded, the other dimensions
held at 0 or at an image's posterior mean. `traverse` varies one latent dimension at a time
from an image's posterior mean (the beta-VAE figure). numpy only: the inverse normal CDF is
Acklam's rational approximation (relative error below 1.2e-9), no scipy.
"""

from __future__ import annotations

import numpy as np

from vaeinfer import kinds
from vaeinfer.errors import InputError

# Acklam's coefficients: central region |p - 0.5| <= 0.475, tails beyond
_A = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02, 1.383577518672690e+02,
      -3.066479806614716e+01, 2.506628277459239e+00)
_B = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02, 6.680131188771972e+01,
      -1.328068155288572e+01)
_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00, -2.549732539343734e+00,
      4.374664141464968e+00, 2.938163982698783e+00)
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00)
_LOW = 0.02425


def _poly(coeffs, x):
    out = np.zeros_like(x)
    for c in coeffs:
        out = out * x + c
    return out


def norm_ppf(p) -> np.ndarray:
    """The inverse CDF of N(0, 1) for probabilities in (0, 1), float64."""
    p = np.asarray(p, np.float64)
    if not np.all((p > 0) & (p < 1)):
        raise InputError("norm_ppf: expected probabilities strictly between 0 and 1")
    out = np.empty_like(p)
    lo, hi = p < _LOW, p > 1 - _LOW
    mid = ~(lo | hi)
    q = p[mid] - 0.5
    r = q * q
    out[mid] = q * _poly(_A, r) / (_poly(_B, r) * r + 1.0)
    for mask, sign, tail in ((lo, 1.0, p[lo]), (hi, -1.0, 1.0 - p[hi])):
        t = np.sqrt(-2.0 * np.log(tail))
        out[mask] = sign * _poly(_C, t) / (_poly(_D, t) * t + 1.0)
    return out


def _dims(dims, latent_dim: int, count: int | None, what: str) -> list[int]:
    dims = list(dims)
    if count is not None and len(dims) != count:
        raise InputError(f"{what}: expected {count} latent dimensions, got {len(dims)}: {dims}")
    if len(set(dims)) != len(dims) or not all(0 <= d < latent_dim for d in dims):
        raise InputError(f"{what}: expected distinct latent dimensions in [0, {latent_dim - 1}], got {dims}")
    return dims


def _base(model, around, what: str) -> np.ndarray:
    """(Z,) float32: zeros, or the posterior mean of the one image `around`."""
    if around is None:
        return np.zeros(model.latent_dim, np.float32)
    mean = model.encode(around).mean
    if len(mean) != 1:
        raise InputError(f"{what}: expected one image to hold the other dimensions at, got {len(mean)}")
    return mean[0]


def manifold(model, dims=(0, 1), size: int = 20, around=None, batch_size: int | None = None) -> np.ndarray:
    """Decoded images (size * size, C, H, W) over a size x size grid: latent dims[0] varies along
    each row (left to right), dims[1] down the columns, through norm_ppf((i + 0.5) / size); the
    other dimensions are 0, or the posterior mean of the single image `around` (1, C, H, W)."""
    if not kinds.get(model.info.kind).manifold:
        raise InputError(f"manifold: needs a VAE (a continuous latent), {model.info.name} is a {model.info.kind}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 2 <= size <= 100:
        raise InputError(f"manifold: expected a grid size in [2, 100], got {size!r}")
    i, j = _dims(dims, model.latent_dim, 2, "manifold")
    values = norm_ppf((np.arange(size) + 0.5) / size).astype(np.float32)
    z = np.repeat(_base(model, around, "manifold")[None], size * size, axis=0)
    z[:, i] = np.tile(values, size)
    z[:, j] = np.repeat(values[::-1], size)  # top row: the largest value, as on a plot's y axis
    return model.decode(z, batch_size)


def traverse(model, image, dims=None, span: float = 3.0, steps: int = 9, batch_size: int | None = None) -> np.ndarray:
    """Decoded images (len(dims), steps, C, H, W): from the posterior mean of the single `image`,
    each latent dimension of `dims` (default: all) in turn set to `steps` values evenly spaced
    over [-span, span], the others kept at the mean."""
    if not kinds.get(model.info.kind).manifold:
        raise InputError(f"traverse: needs a VAE (a continuous latent), {model.info.name} is a {model.info.kind}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 2 <= steps <= 100:
        raise InputError(f"traverse: expected steps in [2, 100], got {steps!r}")
    if not (isinstance(span, (int, float)) and np.isfinite(span) and 0 < span <= 100):
        raise InputError(f"traverse: expected a range in (0, 100], got {span!r}")
    dims = _dims(range(model.latent_dim) if dims is None else dims, model.latent_dim, None, "traverse")
    if not dims:
        raise InputError("traverse: expected at least one latent dimension")
    base = _base(model, image, "traverse")
    values = np.linspace(-span, span, steps, dtype=np.float32)
    z = np.repeat(base[None, None], len(dims), axis=0).repeat(steps, axis=1)  # (D, steps, Z)
    for row, d in enumerate(dims):
        z[row, :, d] = values
    return model.decode(z.reshape(-1, model.latent_dim), batch_size).reshape(len(dims), steps, *model.info.image_shape)
