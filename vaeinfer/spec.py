"""The input/output spec of every graph in a bundle, written once, as data.

`export` uses it to name, shape and trace the graphs and to make its validation inputs; the
runtime uses it to check that a bundle's manifest and its graphs agree before running anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BATCH = "batch"
# the symbolic spatial axes of a spatial VAE's graphs (dynamic height and width)
HEIGHT, WIDTH, LATENT_HEIGHT, LATENT_WIDTH = "height", "width", "latent_height", "latent_width"
DTYPES = ("float32", "int64")
# onnxruntime's type strings for the dtypes above
ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # one of DTYPES
    shape: tuple  # BATCH first, then ints or symbolic axis names (e.g. "height"), dynamic like BATCH

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    role: str  # encoder | decoder | prior | prior_row | prior_step
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def io_json(self) -> dict:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}


def vae_graphs(image: tuple[int, int, int], latent_dim: int) -> dict[str, GraphSpec]:
    """VAE: encoder x -> (mean, logvar); decoder z -> likelihood parameters."""
    x = TensorSpec("x", "float32", (BATCH, *image))
    return {
        "encoder": GraphSpec("encoder", (x,), (TensorSpec("mean", "float32", (BATCH, latent_dim)),
                                                TensorSpec("logvar", "float32", (BATCH, latent_dim)))),
        "decoder": GraphSpec("decoder", (TensorSpec("z", "float32", (BATCH, latent_dim)),),
                             (TensorSpec("params", "float32", (BATCH, *image)),)),
    }


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
        graphs["prior"] = GraphSpec("prior", inputs, (TensorSpec("logits", "float32", (BATCH, codebook_size, *grid)),))
        if cache is not None:
            graphs.update(prior_step_graphs(grid, codebook_size, num_classes, cache))
    return graphs


def is_fixed(axis) -> bool:
    """A spec axis with a size of its own (not BATCH or another symbolic name)."""
    return isinstance(axis, int) and not isinstance(axis, bool)


def example_inputs(spec: GraphSpec, batch: int, seed: int = 0, limits: dict | None = None,
                   sizes: dict | None = None, value_range: tuple[float, float] = (0.0, 1.0)) -> list[np.ndarray]:
    """Seeded inputs for a graph, one per spec input: images uniform in `value_range`, float
    latents N(0, 1), int64 inputs uniform in [0, limits[name]). `sizes` gives each symbolic axis
    (other than BATCH) its concrete size. The one builder export, the probe and the benchmarks use."""
    rng = np.random.default_rng(seed)
    limits, sizes = limits or {}, sizes or {}
    out = []
    for t in spec.inputs:
        missing = [a for a in t.shape[1:] if not is_fixed(a) and a not in sizes]
        if missing:
            raise ValueError(f"{spec.role} input {t.name}: give a size for the symbolic axes {missing}")
        shape = (batch, *(a if is_fixed(a) else sizes[a] for a in t.shape[1:]))
        if t.dtype == "int64":
            out.append(rng.integers(0, limits[t.name], size=shape, dtype=np.int64))
        elif t.name == "x":
            lo, hi = value_range
            out.append((lo + (hi - lo) * rng.random(shape, dtype=np.float32)).astype(np.float32))
        else:
            out.append(rng.standard_normal(shape, dtype=np.float32))
    return out


def prior_step_graphs(grid: tuple[int, int], codebook_size: int, num_classes: int, cache: dict) -> dict[str, GraphSpec]:
    """The PixelCNN prior's cached sampling graphs (see vaeinfer.prior_sampling), pure functions
    whose caches travel as inputs and outputs:

    prior_row, once per row: (above (N, k, W) codes of the k rows above [, label]) and
    v_cache (N, L-1, W, k, C) -> (context (N, W, L, 2C), next_v_cache);
    prior_step, once per position: (left (N, k) codes of the k positions to the left,
    h_cache (N, L-1, k, C), context (N, L, 2C) of the column) -> (logits (N, K), next_h_cache).
    A code equal to K (codebook_size) stands for "outside the grid". L = cache["layers"],
    C = cache["channels"], k = cache["context"] (kernel // 2).
    """
    width, layers, channels, k = grid[1], cache["layers"], cache["channels"], cache["context"]
    v_cache = (BATCH, layers - 1, width, k, channels)
    h_cache = (BATCH, layers - 1, k, channels)
    label = (TensorSpec("label", "int64", (BATCH,)),) if num_classes > 0 else ()
    return {
        "prior_row": GraphSpec(
            "prior_row", (TensorSpec("above", "int64", (BATCH, k, width)), TensorSpec("v_cache", "float32", v_cache), *label),
            (TensorSpec("context", "float32", (BATCH, width, layers, 2 * channels)),
             TensorSpec("next_v_cache", "float32", v_cache))),
        "prior_step": GraphSpec(
            "prior_step", (TensorSpec("left", "int64", (BATCH, k)), TensorSpec("h_cache", "float32", h_cache),
                           TensorSpec("context", "float32", (BATCH, layers, 2 * channels))),
            (TensorSpec("logits", "float32", (BATCH, codebook_size)), TensorSpec("next_h_cache", "float32", h_cache))),
    }


def spatial_vae_graphs(channels: int, latent_channels: int, stochastic: bool = True) -> dict[str, GraphSpec]:
    """Spatial-latent VAE (latent-diffusion autoencoders): encoder x (N, C, height, width) ->
    mean [, logvar] (N, c, latent_height, latent_width); decoder z -> params (N, C, height, width).
    Height and width are dynamic (multiples of the downsampling factor, see the manifest)."""
    image = (BATCH, channels, HEIGHT, WIDTH)
    latent = (BATCH, latent_channels, LATENT_HEIGHT, LATENT_WIDTH)
    outputs = (TensorSpec("mean", "float32", latent),) + ((TensorSpec("logvar", "float32", latent),) if stochastic else ())
    return {
        "encoder": GraphSpec("encoder", (TensorSpec("x", "float32", image),), outputs),
        "decoder": GraphSpec("decoder", (TensorSpec("z", "float32", latent),), (TensorSpec("params", "float32", image),)),
    }
