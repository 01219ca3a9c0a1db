"""Crashes and interruptions: training killed with SIGKILL at seeded random moments and resumed
ends bit-identical to an uninterrupted run; checkpoints are never half written; an export killed
at random moments leaves either the complete old or the complete new bundle, never a mix."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import vaeinfer
from tests.conftest import blob_images, write_npz

ROOT = Path(__file__).resolve().parents[1]
TRAIN = """
import json, sys
from vaeinfer.training.train import TrainConfig, train
train(TrainConfig.from_json(json.loads(sys.argv[1])), sys.argv[2], resume=sys.argv[3] == "1", progress_bar=False)
"""
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict:
    """Every source of randomness (dynamic binarization, reparameterisation noise, epoch order),
    a checkpoint after every step: 4 epochs of 9 steps (36 training images, batches of 4)."""
    data = write_npz(tmp_path_factory.mktemp("crash") / "data.npz", blob_images(48, (1, 12, 10), seed=11))
    return {"data": str(data), "arch": "mlp-vae", "model_args": {"latent_dim": 3, "hidden": [16]},
            "binarize": "dynamic", "lr_schedule": "cosine", "epochs": 4, "batch_size": 4, "val_fraction": 0.25,
            "seed": 7, "threads": 1, "checkpoint_every": 1}


def _start(config: dict, run: Path, resume: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TRAIN, json.dumps(config), str(run), "1" if resume else "0"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _step(run: Path) -> int:
    try:
        return json.loads((run / "checkpoint.json").read_text())["progress"]["global_step"]
    except (FileNotFoundError, ValueError, KeyError):  # not written yet (it is replaced atomically)
        return 0


def _kill_after(proc: subprocess.Popen, run: Path, step: int, delay: float, timeout: float = 120.0) -> bool:
    """SIGKILL once the run's checkpoint has reached `step`, `delay` seconds later: a moment inside
    a later step, or inside the writing of its checkpoint. False if the run ended first."""
    start = time.monotonic()
    while _step(run) < step:
        if proc.poll() is not None:
            return False
        if time.monotonic() - start > timeout:
            proc.kill()
            raise AssertionError(f"no checkpoint of step {step} within {timeout} s")
        time.sleep(0.002)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return True


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]


def _tensors(run: Path) -> tuple[dict, dict]:
    from vaeinfer.training import checkpoint

    tensors, meta = checkpoint.load(run)  # verifies the weights' sha256
    return tensors, meta


@pytest.fixture(scope="module")
def straight(config, tmp_path_factory):
    """The uninterrupted run (in this process: same code, one thread, same bits), and how long it took."""
    from vaeinfer.training.train import TrainConfig, train

    run = tmp_path_factory.mktemp("straight") / "run"
    start = time.monotonic()
    train(TrainConfig.from_json(config), run, progress_bar=False)
    return run, time.monotonic() - start


def test_sigkill_and_resume_is_bit_identical(config, straight, tmp_path):
    import torch

    run, seconds = straight
    steps = 36  # 4 epochs of 9
    rng = np.random.default_rng(2024)
    targets = [int(rng.integers(1, steps // 2)), int(rng.integers(steps // 2, steps - 8))]
    per_step = seconds / steps
    run_b = tmp_path / "run"
    proc = _start(config, run_b, resume=False)
    kills, steps_at_kill = 0, []
    for target in targets:  # killed twice, at seeded moments: after checkpoint `target`, a random part of a step later
        if _kill_after(proc, run_b, target, float(rng.uniform(0, 1.5)) * per_step):
            kills += 1
        _, meta = _tensors(run_b)  # whatever moment it died at, the checkpoint on disk is complete and verifies
        steps_at_kill.append(meta["progress"]["global_step"])
        proc = _start(config, run_b, resume=True)
    _finish(proc)
    print(f"killed {kills} times, the checkpoints then at steps {steps_at_kill} of {steps}")
    assert kills == 2 and steps_at_kill[0] < steps_at_kill[1] < steps, "a kill came too late to prove anything"

    expected, meta_a = _tensors(run)
    got, meta_b = _tensors(run_b)
    assert sorted(expected) == sorted(got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs after kill+resume at steps {steps_at_kill}"
    assert meta_a["progress"]["global_step"] == meta_b["progress"]["global_step"]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(meta_a["history"]) == drop(meta_b["history"])


# ---- export -------------------------------------------------------------------------------------------------


def _bundle_files(folder: Path) -> tuple[dict, dict]:
    manifest = json.loads((folder / "manifest.json").read_text())
    files = {p.name: p.read_bytes() for p in folder.glob("*.onnx")}
    return manifest, files


def _digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kill_during_export_never_mixes_old_and_new(mlp, tmp_path):
    """A child rewrites the bundle over and over, alternating two different exports; it is killed
    at random moments. Each time, the folder must be exactly one complete export, which loads."""
    from vaeinfer.export.writer import write_bundle

    versions = [_bundle_files(mlp.bundle), _bundle_files(ROOT / "tests" / "data" / "fuzz-seeds" / "vae")]
    out = tmp_path / "bundle"
    write_bundle(out, *versions[0])
    expected = []
    for manifest, files in versions:
        write_bundle(tmp_path / "reference", manifest, files)
        expected.append(_digests(tmp_path / "reference"))
    assert expected[0] != expected[1]
    rng = np.random.default_rng(7)
    leftovers = 0
    for attempt in range(30):
        pid = os.fork()
        if pid == 0:  # the child: only file work, then killed; never returns into pytest
            try:
                i = attempt
                while True:
                    write_bundle(out, *versions[i % 2])
                    i += 1
            finally:
                os._exit(0)
        time.sleep(float(rng.uniform(0.0, 0.03)))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert out.is_dir(), f"kill {attempt}: no bundle folder at all"
        assert _digests(out) in expected, f"kill {attempt}: a mix of two exports: {sorted(_digests(out))}"
        vaeinfer.load(out, device="cpu")  # and it verifies
        leftovers = len(list(tmp_path.glob(".bundle.*")))
    print(f"{leftovers} of 30 kills landed inside a write (a temporary folder left behind)")
    assert leftovers > 0, "no kill landed inside a write: the test proves nothing"
