"""A VAE's latent prior at run time: the standard normal, or a diagonal Gaussian mixture.

A bundle with a learned prior (VampPrior or mixture of Gaussians, see training/latent_prior.py) lists
it in the manifest's `latent_prior` slot and stores it as `prior.npz` (np.savez, float64 arrays
`log_weights` (K,), `means` (K, Z), `logvars` (K, Z)); a VampPrior's pseudo-input posteriors
are computed once at export, so both kinds are the same mixture here. No slot: N(0, I), as in
every bundle made before the slot existed.

The npz is read like a graph (see `vaeinfer.bundle`: a plain file name inside the bundle, no
symbolic link, sha256 checked) and loaded with allow_pickle=False, then validated: the keys, the
shapes against the manifest, finite values, weights summing to 1, variances in a range whose
exp() neither overflows nor underflows.
"""

from __future__ import annotations

import io
import math
import re
import zipfile
from dataclasses import dataclass

import numpy as np

from vaeinfer.errors import BundleError

SLOT = "latent_prior"
SOURCES = ("vamp", "mog")
ARRAYS = ("log_weights", "means", "logvars")
MAX_COMPONENTS = 1 << 16
MAX_NPZ_BYTES = 1 << 28
LOGVAR_RANGE = (-30.0, 30.0)
_LOG_2PI = math.log(2 * math.pi)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NPZ = re.compile(r"^[A-Za-z0-9_.-]+\.npz$")


def parse_slot(slot, kind: str) -> dict | None:
    """The manifest's `latent_prior` slot, checked: {"type": "mixture", "file", "sha256",
    "components", "source"}, or None (the standard normal)."""
    if slot is None:
        return None
    from vaeinfer import kinds

    if not kinds.get(kind).latent_prior_slot:
        raise BundleError(f"manifest: a {kind} bundle cannot have a {SLOT} (a flat Gaussian latent's learned prior)")
    if not isinstance(slot, dict):
        raise BundleError(f"manifest: expected {SLOT} to be an object, got {type(slot).__name__}")
    expected = {"type", "file", "sha256", "components", "source"}
    if set(slot) != expected:
        raise BundleError(f"manifest: expected {SLOT} keys {sorted(expected)}, got {sorted(slot)}")
    if slot["type"] != "mixture":
        raise BundleError(f"manifest: expected {SLOT}.type 'mixture', got {slot['type']!r:.40}")
    if not isinstance(slot["file"], str) or not _NPZ.match(slot["file"]):
        raise BundleError(f"manifest: expected {SLOT}.file to be a plain '<name>.npz' file name inside the "
                          f"bundle (letters, digits, '._-'), got {slot['file']!r:.80}")
    if not isinstance(slot["sha256"], str) or not _SHA256.match(slot["sha256"]):
        raise BundleError(f"manifest: expected {SLOT}.sha256 to be 64 lowercase hex digits, got {slot['sha256']!r:.80}")
    k = slot["components"]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= MAX_COMPONENTS:
        raise BundleError(f"manifest: expected {SLOT}.components in [1, {MAX_COMPONENTS}], got {k!r:.40}")
    if slot["source"] not in SOURCES:
        raise BundleError(f"manifest: expected {SLOT}.source in {SOURCES}, got {slot['source']!r:.40}")
    return dict(slot)


@dataclass(frozen=True)
class MixturePrior:
    """p(z) = sum_k w_k N(z; means[k], diag(exp(logvars[k]))), float64."""

    log_weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, Z)
    logvars: np.ndarray  # (K, Z)
    source: str = "mog"

    @property
    def components(self) -> int:
        return len(self.log_weights)

    def sample(self, rng: np.random.Generator, n: int, temperature: float = 1.0) -> np.ndarray:
        """n latents (float32): a component index k ~ w, then z = means[k] + temperature * std[k] * eps."""
        k = rng.choice(self.components, size=n, p=np.exp(self.log_weights))
        eps = rng.standard_normal((n, self.means.shape[1]))
        z = self.means[k] + temperature * np.exp(0.5 * self.logvars[k]) * eps
        return z.astype(np.float32)

    def log_prob(self, z: np.ndarray) -> np.ndarray:
        """log p(z) for z (..., Z) -> (...), float64, by one matrix product per quadratic term
        (memory (rows, K), never (rows, K, Z)) and a stable logsumexp over components."""
        z = np.asarray(z, np.float64)
        flat = z.reshape(-1, z.shape[-1])
        inv_var = np.exp(-self.logvars)  # (K, Z)
        quad = (flat ** 2) @ inv_var.T - 2.0 * flat @ (self.means * inv_var).T \
            + (self.means ** 2 * inv_var).sum(axis=1)
        log_n = -0.5 * (quad + self.logvars.sum(axis=1) + flat.shape[1] * _LOG_2PI) + self.log_weights
        top = log_n.max(axis=1, keepdims=True)
        out = top[:, 0] + np.log(np.exp(log_n - top).sum(axis=1))
        return out.reshape(z.shape[:-1])


def from_npz(data: bytes, slot: dict, latent_dim: int, where: str) -> MixturePrior:
    """Parse and validate prior.npz's bytes against its manifest slot."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:  # sizes before inflating anything
            total = sum(info.file_size for info in z.infolist())
        if total > MAX_NPZ_BYTES:
            raise BundleError(f"{where}: its arrays hold {total} bytes, more than the {MAX_NPZ_BYTES} allowed")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if sorted(npz.files) != sorted(ARRAYS):
                raise BundleError(f"{where}: expected arrays {list(ARRAYS)}, got {sorted(npz.files)}")
            arrays = {name: npz[name] for name in ARRAYS}
    except BundleError:
        raise
    except Exception as e:  # not a zip, a pickled object, a corrupt .npy header, ...
        raise BundleError(f"{where}: not a readable numpy .npz of plain arrays ({type(e).__name__}: {e})") from None
    k = slot["components"]
    shapes = {"log_weights": (k,), "means": (k, latent_dim), "logvars": (k, latent_dim)}
    for name, shape in shapes.items():
        a = arrays[name]
        if a.dtype.kind != "f":
            raise BundleError(f"{where}: expected {name} to be floating point, got dtype {a.dtype}")
        if a.shape != shape:
            raise BundleError(f"{where}: expected {name} of shape {shape} (components {k}, latent {latent_dim}), "
                              f"got {a.shape}")
        if not np.isfinite(a).all():
            raise BundleError(f"{where}: {name} has {int(a.size - np.isfinite(a).sum())} NaN/Inf values")
        arrays[name] = a.astype(np.float64)
    total_weight = float(np.exp(arrays["log_weights"]).sum())
    if abs(total_weight - 1.0) > 1e-6:
        raise BundleError(f"{where}: expected the component weights exp(log_weights) to sum to 1, got {total_weight!r}")
    lv = arrays["logvars"]
    if lv.min() < LOGVAR_RANGE[0] or lv.max() > LOGVAR_RANGE[1]:
        raise BundleError(f"{where}: expected logvars in {list(LOGVAR_RANGE)}, got [{lv.min():.3g}, {lv.max():.3g}]")
    # renormalised in float64 so sampling's probabilities sum to 1 exactly
    log_w = arrays["log_weights"] - math.log(total_weight)
    return MixturePrior(log_w, arrays["means"], lv, slot["source"])


def to_npz(log_weights: np.ndarray, means: np.ndarray, logvars: np.ndarray) -> bytes:
    """prior.npz's bytes (the export side's writer; float64, renormalised weights)."""
    log_w = np.asarray(log_weights, np.float64)
    top = log_w.max()
    log_w = log_w - (top + np.log(np.exp(log_w - top).sum()))
    buf = io.BytesIO()
    np.savez(buf, log_weights=log_w, means=np.asarray(means, np.float64), logvars=np.asarray(logvars, np.float64))
    return buf.getvalue()


def load(bundle, latent_dim: int, verify: bool = True) -> MixturePrior | None:
    """The bundle's learned prior (read, verified, validated), or None for the standard normal."""
    slot = parse_slot(bundle.manifest.raw.get(SLOT), bundle.manifest.kind)
    if slot is None:
        return None
    data = bundle.read_file(slot["file"], slot["sha256"], MAX_NPZ_BYTES, verify)
    return from_npz(data, slot, latent_dim, str(bundle.path / slot["file"]))
