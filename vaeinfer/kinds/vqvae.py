"""kind "vqvae": a grid of codebook indices; encoder x -> (codes, z_q), decoder codes -> params,
and an optional (class-conditional) PixelCNN prior codes [+ label] -> logits."""

from __future__ import annotations

import numpy as np

from vaeinfer.errors import BundleError
from vaeinfer.kinds import Kind, register
from vaeinfer.manifest_fields import get, positive
from vaeinfer.spec import BATCH, GraphSpec, TensorSpec


STEP_ROLES = ("prior_row", "prior_step")  # the roles of `prior_step_graphs`


def vq_graphs(image: tuple[int, int, int], grid: tuple[int, int], code_dim: int, codebook_size: int,
              num_classes: int | None = None, cache: dict | None = None) -> dict[str, GraphSpec]:
    """VQ-VAE: encoder x -> (codes, z_q); decoder codes -> parameters; prior codes [+ label] -> logits.

    `num_classes` None: no prior graph; 0: an unconditional prior; > 0: a class-conditional one.
    `cache` ({"layers", "channels", "context"}, with a prior only): also the prior's cached
    sampling graphs, `prior_step_graphs`.
    """
    x = TensorSpec("x", "float32", (BATCH, *image))
    codes = TensorSpec("codes", "int64", (BATCH, *grid))
    graphs = {
        "encoder": GraphSpec("encoder", (x,), (codes, TensorSpec("z_q", "float32", (BATCH, code_dim, *grid)))),
        "decoder": GraphSpec("decoder", (codes,), (TensorSpec("params", "float32", (BATCH, *image)),)),
    }
    if num_classes is not None:
        inputs = (codes, TensorSpec("label", "int64", (BATCH,))) if num_classes > 0 else (codes,)
        graphs["prior"] = GraphSpec("prior", inputs, (TensorSpec("logits", "float32", (BATCH, codebook_size, *grid)),),
                                    batch_buckets=False)
        if cache is not None:
            graphs.update(prior_step_graphs(grid, codebook_size, num_classes, cache))
    return graphs


def prior_step_graphs(grid: tuple[int, int], codebook_size: int, num_classes: int, cache: dict) -> dict[str, GraphSpec]:
    """The PixelCNN prior's cached sampling graphs (see vaeinfer.prior_sampling), pure functions
    whose caches travel as inputs and outputs:

    prior_row, once per row: (above (N, k, W) codes of the k rows above [, label]) and
    v_cache (N, L-1, W, k, C) -> (context (N, W, L, 2C), next_v_cache);
    prior_step, once per position: (left (N, k) codes of the k positions to the left,
    h_cache (N, L-1, k, C), context (N, L, 2C) of the column) -> (logits (N, K), next_h_cache).
    A code equal to K (codebook_size) stands for "outside the grid". L = cache["layers"],
    C = cache["channels"], k = cache["context"] (kernel // 2).
    Both stay fp32 in every precision variant: small per-position matmuls where conversion casts
    would cost more than they save.
    """
    width, layers, channels, k = grid[1], cache["layers"], cache["channels"], cache["context"]
    v_cache = (BATCH, layers - 1, width, k, channels)
    h_cache = (BATCH, layers - 1, k, channels)
    label = (TensorSpec("label", "int64", (BATCH,)),) if num_classes > 0 else ()
    row, step = STEP_ROLES
    return {
        row: GraphSpec(
            row, (TensorSpec("above", "int64", (BATCH, k, width)), TensorSpec("v_cache", "float32", v_cache), *label),
            (TensorSpec("context", "float32", (BATCH, width, layers, 2 * channels)),
             TensorSpec("next_v_cache", "float32", v_cache)), batch_buckets=False, variants=False),
        step: GraphSpec(
            step, (TensorSpec("left", "int64", (BATCH, k)), TensorSpec("h_cache", "float32", h_cache),
                   TensorSpec("context", "float32", (BATCH, layers, 2 * channels))),
            (TensorSpec("logits", "float32", (BATCH, codebook_size)), TensorSpec("next_h_cache", "float32", h_cache)),
            batch_buckets=False, variants=False),
    }


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


def parse_prior(prior: dict) -> dict:
    """The `prior` slot: {"num_classes"} (0: unconditional), and with the cached sampling graphs
    (format 1.2) "cache": {"layers", "channels", "context"}."""
    n = get(prior, "num_classes", int, "prior")
    if not 0 <= n <= 1 << 16:
        raise BundleError(f"manifest: expected prior.num_classes in [0, 65536], got {n}")
    out = {"num_classes": n}
    if prior.get("cache") is not None:  # optional (1.2): the cached sampling graphs' facts
        cache = get(prior, "cache", dict, "prior")
        out["cache"] = {"layers": positive(cache, "layers", "prior.cache", 4096),
                        "channels": positive(cache, "channels", "prior.cache"),
                        "context": positive(cache, "context", "prior.cache", 64)}
        if out["cache"]["layers"] < 2:
            raise BundleError(f"manifest: expected prior.cache.layers >= 2, got {out['cache']['layers']}")
    return out


def runtime_class() -> type:
    from vaeinfer.vqvae import VQVAE

    return VQVAE


KIND = register(Kind(
    name="vqvae", runtime_class=runtime_class,
    parse_latent=parse_latent, feeds_from_encoder=feeds_from_encoder, graphs=_graphs, int_limits=_limits,
    latent_keys=("codes",), sample_options=("top_k", "top_p", "label"), parse_prior=parse_prior,
    companions={"prior": STEP_ROLES},
))
