"""Export of the PixelCNN prior's cached sampling graphs, `prior_row` and `prior_step`
(training/pixelcnn_step.py), beside the full prior graph.

Each graph gets the usual per-graph validation (structure, parity with PyTorch at several batch
sizes); `cache_check` then runs the two graphs over whole code grids, cache in and out as the
runtime does, against the full prior graph's logits. `add_prior_step` adds them to an existing
bundle without touching its other files (for bundles exported before these graphs existed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vaeinfer.export.bundle import export_graph
from vaeinfer.export.graphs import ExportError
from vaeinfer.export.validate import FP32_TOLERANCE, max_abs_error
from vaeinfer.export.writer import sha256, write_bundle
from vaeinfer.bundle import MANIFEST
from vaeinfer.manifest import FORMAT_VERSION
from vaeinfer.prior_sampling import cached_loop
from vaeinfer.kinds.vqvae import KIND, prior_step_graphs

CHECK_GRIDS, CHECK_SEED = 16, 5


def cache_facts(prior) -> dict | None:
    """The manifest's prior.cache for a GatedPixelCNN, or None where the cached graphs do not apply."""
    if prior.num_layers < 2:
        return None
    return {"layers": prior.num_layers, "channels": prior.channels, "context": prior.kernel // 2}


def step_modules(prior) -> dict:
    from vaeinfer.training.pixelcnn_step import PriorRow, PriorStep
    return {"prior_row": PriorRow(prior).eval(), "prior_step": PriorStep(prior).eval()}


def step_limits(codebook_size: int) -> dict:
    """Code inputs of the cached graphs take [0, K]: K is the padding code."""
    return {"above": codebook_size + 1, "left": codebook_size + 1}


class _Session:
    """The bit of vaeinfer's Graph that the sampling loops use: run(feeds, batch) -> outputs."""

    def __init__(self, data: bytes):
        self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds, _batch_size=None):
        return self.session.run(self.names, feeds)


def cache_check(grid, codebook_size: int, num_classes: int, cache: dict, tolerance: float = FP32_TOLERANCE):
    """files -> figures: the cached graphs' logits, cache carried position by position, against
    the full prior graph's on the same seeded random code grids (the cached loop's own draws are
    replaced by the given codes, so both see the same context everywhere)."""

    def check(files: dict[str, bytes]) -> dict:
        rng = np.random.default_rng(CHECK_SEED)
        codes = rng.integers(0, codebook_size, (CHECK_GRIDS, *grid), dtype=np.int64)
        labels = rng.integers(0, num_classes, CHECK_GRIDS, dtype=np.int64) if num_classes else None
        full = _Session(files["prior.onnx"])
        feeds = {"codes": codes} if labels is None else {"codes": codes, "label": labels}
        expected = full.run(feeds)[0]
        got, position = np.zeros_like(expected), iter(range(grid[0] * grid[1]))

        def choose(logits):  # record the logits, then "draw" the given code
            i, j = divmod(next(position), grid[1])
            got[:, :, i, j] = logits
            return codes[:, i, j]

        cached_loop(_Session(files["prior_row.onnx"]), _Session(files["prior_step.onnx"]), CHECK_GRIDS, tuple(grid),
                    codebook_size, cache, labels, choose)
        err = float(np.abs(expected.astype(np.float64) - got).max())
        if not err <= tolerance:
            raise ExportError(f"prior_row/prior_step: the cached logits differ from the full prior graph's by {err:.3g} "
                              f"> {tolerance:g}")
        return {"grids": CHECK_GRIDS, "max_abs_err": err}

    return check


def add_prior_step(bundle_dir: str | Path, run_dir: str | Path, tolerance: float = FP32_TOLERANCE) -> Path:
    """Add prior_row/prior_step, exported from the prior checkpoint in `run_dir`, to a VQ-VAE bundle.

    The bundle's other graphs stay byte for byte (the writer only ever drops unused
    initializers); the prior checkpoint must be the one the bundle's prior graph came from
    (its exported logits are compared with the bundle's prior graph). fp16/int8 variants use
    the fp32 cached graphs (the manifest lists no variant of them).
    """
    from vaeinfer.export.vqvae import load_prior
    from vaeinfer.training import checkpoint

    bundle_dir, run_dir = Path(bundle_dir), Path(run_dir)
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    if manifest.get("kind") != KIND.name or not manifest.get("prior"):
        raise ExportError(f"{bundle_dir}: not a VQ-VAE bundle with a prior")
    _, vq_meta = checkpoint.load(run_dir)
    prior, _ = load_prior(run_dir, vq_meta["weights"]["sha256"])
    if prior is None:
        raise ExportError(f"{run_dir}: no prior checkpoint")
    cache = cache_facts(prior)
    if cache is None:
        raise ExportError(f"{run_dir}: the prior has {prior.num_layers} layer(s); the cached graphs need >= 2")
    latent, num_classes = manifest["latent"], manifest["prior"]["num_classes"]
    if prior.num_classes != num_classes or prior.codebook_size != latent["codebook_size"]:
        raise ExportError(f"{run_dir}: the prior checkpoint does not match the bundle's prior")
    files = {}
    for name in {e["file"] for e in manifest["graphs"].values()} | \
            {e["file"] for v in manifest.get("variants", {}).values() for e in v["graphs"].values()}:
        files[name] = (bundle_dir / name).read_bytes()
    facts = {"format_version": FORMAT_VERSION, "name": manifest["name"], "kind": KIND.name,
             "image": [manifest["image"][k] for k in ("channels", "height", "width")],
             "latent": latent, "likelihood": manifest["likelihood"]}
    specs = prior_step_graphs(tuple(latent["grid"]), latent["codebook_size"], num_classes, cache)
    limits = {**step_limits(latent["codebook_size"]), "label": max(1, num_classes)}
    parity = manifest["export"]["parity"]["graphs"]
    for role, spec in specs.items():
        data, parity[role], _ = export_graph(step_modules(prior)[role], spec, facts, limits, max_abs_error(tolerance))
        files[f"{role}.onnx"] = data
        manifest["graphs"][role] = {"file": f"{role}.onnx", "sha256": sha256(data), **spec.io_json()}
    manifest["export"]["parity"]["prior_cache"] = cache_check(latent["grid"], latent["codebook_size"], num_classes,
                                                              cache, tolerance)(files)
    manifest["prior"]["cache"] = cache
    manifest["format_version"] = FORMAT_VERSION
    return write_bundle(bundle_dir, manifest, files)
