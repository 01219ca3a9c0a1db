"""Data-parallel training under torchrun (2 CPU processes, gloo) against one-process training.

Each test launches `python -m torch.distributed.run --standalone --nproc-per-node 2 -m vaeinfer.cli
train` on a tiny model and a small synthetic .npz, 20 optimizer steps with a global batch of 8,
then trains the same config in this process and compares every tensor of the two checkpoints.
The data make the last batch of each epoch hold one image, so one rank's slice is empty.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import blob_images
from vaeinfer.training import checkpoint, distributed
from vaeinfer.training.train import TrainConfig, train

RTOL = 1e-5  # the bound: max |ddp - single| / max |single|, per tensor
STEPS = 20

# 41 images, 8 for validation: 33 to train on, so batches of 8 end each epoch with 1 image
BASE = {"epochs": 10, "batch_size": 8, "lr": 3e-3, "val_fraction": 0.2, "seed": 0, "threads": 1, "max_steps": STEPS}
VAE = {**BASE, "arch": "conv-vae", "model_args": {"latent_dim": 4, "channels": [4, 8]}, "binarize": "dynamic"}
# EMA codebook, k-means init on the first batch, and dead-code restarts after 2 unused steps:
# every path of the quantizer that sees the whole batch
VQVAE = {**BASE, "arch": "vqvae", "model_args": {"codebook_size": 16, "code_dim": 4, "channels": [4, 8], "blocks": 1,
                                                 "dead_code_threshold": 2, "kmeans_init": True}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp-data") / "data.npz"
    np.savez(path, images=blob_images(41, (1, 12, 12), seed=3))
    return path


def torchrun(tmp_path: Path, config: dict, out: Path, *flags: str, timeout: float = 120.0) -> None:
    """`vaeinfer train --config` under torchrun with 2 CPU processes; fails (never hangs) on error."""
    cfg = tmp_path / f"{out.name}.json"
    cfg.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vaeinfer.cli", "train", "--config", str(cfg), "--out", str(out), "--quiet", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a session of its own, so that a timeout ends the workers too, not only the launcher
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    assert output.count("checkpoint:") == 1, output[-2000:]  # rank 0 alone reports (and writes)


def single_process(config: dict, out: Path) -> None:
    train(TrainConfig.from_json(config), out, progress_bar=False)


def compare(single: Path, ddp: Path) -> float:
    """Assert the two runs agree; returns the worst relative parameter difference."""
    a, meta_a = checkpoint.load(single)
    b, meta_b = checkpoint.load(ddp)
    assert meta_b["progress"]["global_step"] == meta_a["progress"]["global_step"] == STEPS
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        if not key.startswith("model."):
            continue
        x, y = a[key].double(), b[key].double()
        scale = float(x.abs().max()) if x.numel() else 0.0
        diff = float((x - y).abs().max()) if x.numel() else 0.0
        assert diff <= RTOL * max(scale, 1e-12), f"{key}: max |ddp - single| = {diff:.3g}, max |single| = {scale:.3g}"
        worst = max(worst, diff / max(scale, 1e-12))
    # both runs drew the same random numbers from the shared generator
    assert torch.equal(a["rng.train"], b["rng.train"])
    # the logged metrics are the global batch's (all-reduced), validation runs on rank 0
    hist_a, hist_b = meta_a["history"], meta_b["history"]
    assert len(hist_a) == len(hist_b) > 0
    for row_a, row_b in zip(hist_a, hist_b):
        assert row_a.keys() == row_b.keys()
        for k in row_a:
            if k != "seconds":
                assert row_b[k] == pytest.approx(row_a[k], rel=1e-5, abs=1e-6), k
    for name in ("metrics.jsonl", "loss_curve.png"):
        assert (ddp / name).is_file()
    print(f"worst relative parameter difference, DDP vs one process: {worst:.2e}")
    return worst


def test_one_process_is_untouched():
    """Without torchrun the loop calls model.loss itself: no process group, no wrapper."""
    ctx = distributed.setup("cpu")
    assert not ctx.enabled and ctx.is_main and not distributed.active()

    class M:
        def loss(self):
            pass

    m = M()
    assert ctx.loss_fn(m) == m.loss


def test_shards_cover_a_global_batch_in_order():
    for n in (0, 1, 2, 7, 8, 33):
        for world in (1, 2, 3, 5):
            bounds = [distributed.shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(s - t for t, s in bounds) - min(s - t for t, s in bounds) <= 1


def test_vae_ddp_matches_one_process_and_resumes(data, tmp_path):
    """Conv VAE with dynamic binarization; the DDP run stops at step 12 (mid-epoch) and resumes."""
    config = {**VAE, "data": str(data)}
    ddp = tmp_path / "ddp"
    torchrun(tmp_path, config, ddp, "--max-steps", "12")
    assert checkpoint.load(ddp)[1]["progress"]["global_step"] == 12
    torchrun(tmp_path, config, ddp, "--resume", "--max-steps", str(STEPS))
    single_process(config, tmp_path / "single")
    assert compare(tmp_path / "single", ddp) <= RTOL


def test_vqvae_ddp_matches_one_process(data, tmp_path):
    """VQ-VAE: EMA statistics all-reduced, k-means init and restarts over the gathered batch."""
    config = {**VQVAE, "data": str(data)}
    torchrun(tmp_path, config, tmp_path / "ddp")
    single_process(config, tmp_path / "single")
    history = checkpoint.load(tmp_path / "single")[1]["history"]
    assert any(row["dead_codes"] > 0 for row in history)  # restarts did happen
    assert compare(tmp_path / "single", tmp_path / "ddp") <= RTOL
