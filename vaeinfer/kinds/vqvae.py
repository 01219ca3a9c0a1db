"""kind "vqvae": a grid of codebook indices; encoder x -> (codes, z_q), decoder codes -> params,
and an optional (class-conditional) PixelCNN prior codes [+ label] -> logits."""

from __future__ import annotations

import numpy as np

from vaeinfer.errors import BundleError
from vaeinfer.kinds import Kind, register
from vaeinfer.manifest_fields import get, positive
from vaeinfer.spec import vq_graphs


def parse_latent(latent: dict) -> dict:
    grid = get(latent, "grid", list, "latent")
    if len(grid) != 2 or not all(isinstance(g, int) and not isinstance(g, bool) and 0 < g <= 4096 for g in grid):
        raise BundleError(f"manifest: expected latent.grid [h, w] of positive ints, got {grid!r:.60}")
    return {"grid": list(grid), "codebook_size": positive(latent, "codebook_size", "latent"),
            "code_dim": positive(latent, "code_dim", "latent")}


def feeds_from_encoder(manifest, enc, labels, rng) -> dict:
    """The decoder and the prior on the encoder's codes; labels (random ones if none are known)
    for a class-conditional prior."""
    codes = enc[0].astype(np.int64)
    feeds = {"decoder": {"codes": codes}}
    if manifest.prior is not None:
        prior = {"codes": codes}
        n = manifest.prior["num_classes"]
        if n > 0:
            lab = labels if labels is not None else rng.integers(0, n, len(codes))
            prior["label"] = np.asarray(lab, np.int64)[:len(codes)]
        feeds["prior"] = prior
    return feeds


def _graphs(m) -> dict:
    return vq_graphs(m.image, tuple(m.latent["grid"]), m.latent["code_dim"], m.latent["codebook_size"],
                     None if m.prior is None else m.prior["num_classes"],
                     None if m.prior is None else m.prior.get("cache"))


def _limits(m) -> dict:
    limits = {"codes": m.latent["codebook_size"]}
    if m.prior is not None and m.prior["num_classes"] > 0:
        limits["label"] = m.prior["num_classes"]
    if m.prior is not None and m.prior.get("cache"):  # the cached graphs' code inputs: K is the padding code
        limits.update(above=m.latent["codebook_size"] + 1, left=m.latent["codebook_size"] + 1)
    return limits


KIND = register(Kind(
    name="vqvae", runtime="vaeinfer.vqvae:VQVAE", export_module="vaeinfer.export.vqvae",
    parse_latent=parse_latent, feeds_from_encoder=feeds_from_encoder, graphs=_graphs, int_limits=_limits,
    latent_keys=("codes",), sample_options=("top_k", "top_p", "label"), prior_slot=True,
))
