"""Shared fixtures: tiny synthetic datasets, and tiny trained runs exported once per session.

Everything here is small and seeded: one CPU thread, models of a few thousand parameters,
a few optimizer steps. Tests that need a run or a bundle share the session's copies; tests that
change files work on a copy (`bundle_copy`).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch/onnxruntime start their pools; inherited by subprocesses

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"


def blob_images(n: int, shape, seed: int = 0) -> np.ndarray:
    """uint8 (N, C, H, W) images with some structure (a bright blob at a random place)."""
    c, h, w = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, c, h, w), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(2, max(3, min(h, w) / 2))
        base = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        for k in range(c):
            out[i, k] = np.clip(255 * base * rng.uniform(0.5, 1.0) + rng.integers(0, 20, (h, w)), 0, 255)
    return out


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
    np.savez(path, **arrays)
    return path


@dataclass(frozen=True)
class Case:
    """One tiny model, trained and exported."""

    name: str
    arch: str
    shape: tuple[int, int, int]
    likelihood: str
    model_args: dict

    def config(self, data: Path, **overrides):
        from vaeinfer.training.train import TrainConfig

        args = dict(data=str(data), arch=self.arch, model_args=dict(self.model_args), likelihood=self.likelihood,
                    gaussian_scale=0.2, epochs=2, batch_size=16, val_fraction=0.25, seed=0, threads=1)
        return TrainConfig(**{**args, **overrides})


CASES = {
    "mlp": Case("mlp", "mlp-vae", (1, 20, 12), "bernoulli", {"latent_dim": 4, "hidden": [16]}),
    "conv": Case("conv", "conv-vae", (3, 13, 17), "bernoulli", {"latent_dim": 4, "channels": [4, 8]}),
    "conv-gauss": Case("conv-gauss", "conv-vae", (1, 20, 12), "gaussian",
                       {"latent_dim": 4, "channels": [4, 8], "blocks": 1, "activation": "leaky_relu"}),
    "mlp-gauss": Case("mlp-gauss", "mlp-vae", (3, 13, 17), "gaussian",
                      {"latent_dim": 3, "hidden": [16], "activation": "elu"}),
}


@dataclass(frozen=True)
class Trained:
    case: Case
    data: Path  # the .npz it was trained on
    images: np.ndarray  # those images, float32 (N, C, H, W) in [0, 1]
    run: Path  # the run folder (checkpoint.json + weights)
    bundle: Path  # the exported bundle


class _Zoo:
    """Trains and exports each case on first use, once per session."""

    def __init__(self, root: Path):
        self.root, self.done = root, {}

    def get(self, name: str) -> Trained:
        if name not in self.done:
            from vaeinfer.export import export_checkpoint
            from vaeinfer.training.train import train

            case = CASES[name]
            folder = self.root / name
            folder.mkdir()
            raw = blob_images(48, case.shape, seed=len(self.done))
            data = write_npz(folder / "data.npz", raw)
            run = folder / "run"
            train(case.config(data), run, progress_bar=False)
            bundle = export_checkpoint(run, folder / "bundle", name=f"tiny-{name}")
            self.done[name] = Trained(case, data, raw.astype(np.float32) / 255.0, run, bundle)
        return self.done[name]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> _Zoo:
    return _Zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def mlp(zoo) -> Trained:
    return zoo.get("mlp")


@pytest.fixture(scope="session")
def conv(zoo) -> Trained:
    return zoo.get("conv")


@pytest.fixture(scope="session")
def gauss(zoo) -> Trained:
    return zoo.get("conv-gauss")


@pytest.fixture(params=["mlp", "conv", "conv-gauss"])
def trained(request, zoo) -> Trained:
    """Each of the three main tiny models in turn."""
    return zoo.get(request.param)


@pytest.fixture
def bundle_copy(mlp, tmp_path) -> Path:
    """A private copy of the MLP bundle, for tests that tamper with files."""
    return Path(shutil.copytree(mlp.bundle, tmp_path / "bundle"))


# With CI=true, a test skipped because something is not installed is a failure: .ci/run installs
# every extra, so such a skip means the set-up is broken, not that the test does not apply.
_MISSING_DEPENDENCY = ("no module named", "not installed", "could not import", "importorskip")
_ci_skips: list[str] = []


def pytest_runtest_logreport(report):
    if os.environ.get("CI") == "true" and report.skipped:
        reason = str(report.longrepr).lower()
        if any(word in reason for word in _MISSING_DEPENDENCY):
            _ci_skips.append(f"{report.nodeid}: {report.longrepr}")


def pytest_sessionfinish(session):
    if _ci_skips:
        print("\nCI=true: tests skipped for a missing dependency:\n  " + "\n  ".join(_ci_skips))
        session.exitstatus = 1
