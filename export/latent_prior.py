"""A VAE's learned latent prior into the bundle: prior.npz and the manifest's `latent_prior` slot.

The arrays come from `vaeinfer.training.latent_prior.export_mixture` (a VampPrior's pseudo-input posteriors are
computed there, once) or from a user's own mixture; they are checked here by the runtime's own
parser (`vaeinfer.latent_prior.from_npz`), so an export never writes a prior the runtime would refuse.
"""

from __future__ import annotations

import hashlib

from vaeinfer.export.graphs import ExportError
from vaeinfer import latent_prior
from vaeinfer.errors import BundleError
from vaeinfer.kinds.vae import KIND

FILE = "prior.npz"


def prior_files(mixture: dict | None, latent_dim: int) -> tuple[dict[str, bytes], dict]:
    """({"prior.npz": bytes}, {"latent_prior": slot}) for `mixture` (keys log_weights, means,
    logvars, source); ({}, {}) for None, the standard normal."""
    if mixture is None:
        return {}, {}
    data = latent_prior.to_npz(mixture["log_weights"], mixture["means"], mixture["logvars"])
    slot = {"type": "mixture", "file": FILE, "sha256": hashlib.sha256(data).hexdigest(),
            "components": int(len(mixture["log_weights"])), "source": mixture["source"]}
    try:
        latent_prior.from_npz(data, latent_prior.parse_slot(slot, KIND.name), latent_dim, FILE)
    except BundleError as e:
        raise ExportError(f"the latent prior cannot be exported: {e}") from None
    return {FILE: data}, {latent_prior.SLOT: slot}


def bundle_files(bundle) -> dict[str, bytes]:
    """An existing bundle's prior file ({} without one), verified, for re-writing the bundle."""
    slot = latent_prior.parse_slot(bundle.manifest.raw.get(latent_prior.SLOT), bundle.manifest.kind)
    if slot is None:
        return {}
    return {slot["file"]: bundle.read_file(slot["file"], slot["sha256"], latent_prior.MAX_NPZ_BYTES)}
