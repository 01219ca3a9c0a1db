"""The prior's cached sampling graphs (prior_row / prior_step) against the full-grid reference."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from vaeinfer.export.bundle import export_graph
from vaeinfer.export.prior_step import cache_check, cache_facts, step_limits, step_modules
from vaeinfer.export.validate import max_abs_error
from vaeinfer.training.pixelcnn import GatedPixelCNN
from vaeinfer.training.pixelcnn_step import cached_logits_sweep
from vaeinfer.prior_sampling import cached_loop, full_grid_loop
from vaeinfer.runtime import Graph
from vaeinfer.kinds.vqvae import vq_graphs
from vaeinfer.session import OrtRunner
from vaeinfer.vqvae import draw, filter_logits

K, GRID = 12, (5, 4)


def _prior(num_classes: int, kernel: int = 3, layers: int = 3) -> GatedPixelCNN:
    torch.manual_seed(num_classes + kernel)
    prior = GatedPixelCNN(K, GRID, channels=8, layers=layers, kernel=kernel, num_classes=num_classes).eval()
    with torch.no_grad():  # random weights with some spread, so that the logits are far from uniform
        for p in prior.parameters():
            p.mul_(2.0)
    return prior


@pytest.mark.parametrize("num_classes,kernel", [(0, 3), (3, 3), (2, 5)])
def test_cached_evaluation_equals_the_full_grid_in_torch(num_classes, kernel):
    prior = _prior(num_classes, kernel)
    codes = torch.randint(0, K, (6, *GRID), generator=torch.Generator().manual_seed(1))
    label = torch.arange(6) % num_classes if num_classes else None
    with torch.no_grad():
        full = prior(codes, label)
    assert torch.allclose(cached_logits_sweep(prior, codes, label), full, atol=1e-5)


def _graphs(prior: GatedPixelCNN) -> dict[str, Graph]:
    specs = vq_graphs((1, 8, 8), GRID, 4, K, prior.num_classes, cache_facts(prior))
    modules = {"prior": prior, **step_modules(prior)}
    limits = {"codes": K, "label": max(1, prior.num_classes), **step_limits(K)}
    graphs, files = {}, {}
    for role in ("prior", "prior_row", "prior_step"):
        data, figures, _ = export_graph(modules[role], specs[role], {}, limits, max_abs_error(1e-4))
        assert all(f["max_abs_err"] <= 1e-4 for f in figures.values())
        files[f"{role}.onnx"] = data
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        graphs[role] = Graph(OrtRunner(session), specs[role], role)
    figures = cache_check(GRID, K, prior.num_classes, cache_facts(prior))(files)
    assert figures["max_abs_err"] <= 1e-4
    return graphs


@pytest.mark.parametrize("num_classes", [0, 3])
def test_cached_loop_draws_the_reference_loops_codes(num_classes):
    prior = _prior(num_classes)
    graphs = _graphs(prior)
    n = 64
    labels = np.arange(n, dtype=np.int64) % num_classes if num_classes else None

    def loop(cached: bool, temperature: float):
        rng = np.random.default_rng(7)

        def choose(logits):
            return draw(filter_logits(logits, temperature, None, None), rng)

        if cached:
            return cached_loop(graphs["prior_row"], graphs["prior_step"], n, GRID, K, cache_facts(prior), labels,
                               choose, batch_size=24)
        return full_grid_loop(graphs["prior"], n, GRID, labels, choose, batch_size=24)

    for temperature in (1.0, 4.0):
        reference, fast = loop(False, temperature), loop(True, temperature)
        assert fast.shape == (n, *GRID) and fast.dtype == np.int64
        assert np.mean(fast == reference) >= 0.999
        assert len(np.unique(reference)) > 3  # the draws are not all one code: the comparison means something


def test_padding_code_is_the_zero_padding():
    # the first row / column see only padding: the cached graphs must give the full model's logits there
    prior = _prior(0)
    row, step = step_modules(prior).values()
    c = cache_facts(prior)
    with torch.no_grad():
        context, _ = row(torch.full((2, 1, GRID[1]), K), torch.zeros((2, c["layers"] - 1, GRID[1], 1, c["channels"])))
        logits, _ = step(torch.full((2, 1), K), torch.zeros((2, c["layers"] - 1, 1, c["channels"])), context[:, 0])
        full = prior(torch.randint(0, K, (2, *GRID)))[:, :, 0, 0]
    assert torch.allclose(logits, full, atol=1e-5)
