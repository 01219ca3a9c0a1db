"""The input/output spec of a bundle's graphs, as data; each kind's graphs are in its module
(vaeinfer.kinds.<kind>: `vae_graphs`, `vq_graphs`, `spatial_vae_graphs`).

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
    # whether load(cuda_graph=...) may capture it for fixed batch buckets (padding the batch); False
    # for a graph whose other axes change from call to call (an autoregressive prior's growing context)
    batch_buckets: bool = True
    variants: bool = True  # whether precision variants (fp16, int8) are made of it; False: fp32 in every variant

    def io_json(self) -> dict:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}


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


def smooth_images(n: int, channels: int, height: int, width: int, seed: int = 0,
                  value_range=(-1.0, 1.0)) -> np.ndarray:
    """Real-looking synthetic images: a few random low-frequency waves and a gradient per channel,
    filling most of `value_range` (activations of image models on these resemble those on photos
    far more than on uniform noise, which matters for fp16 overflow checks and int8 calibration)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, height, dtype=np.float32), np.linspace(0, 1, width, dtype=np.float32),
                         indexing="ij")
    out = np.empty((n, channels, height, width), np.float32)
    for i in range(n):
        for c in range(channels):
            img = rng.uniform(-1, 1) * yy + rng.uniform(-1, 1) * xx
            for _ in range(4):
                fy, fx, ph = rng.uniform(0.5, 4), rng.uniform(0.5, 4), rng.uniform(0, 2 * np.pi)
                img = img + rng.uniform(0.2, 1) * np.cos(2 * np.pi * (fy * yy + fx * xx) + ph)
            img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
            out[i, c] = img
    lo, hi = value_range
    return (lo + (hi - lo) * (0.05 + 0.9 * out)).astype(np.float32)
