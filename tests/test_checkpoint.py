"""Checkpoints (safetensors + JSON, verified, atomic) and exact resume of an interrupted run."""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.conftest import blob_images, write_npz
from vaeinfer.training import checkpoint
from vaeinfer.training import loop as loop_mod
from vaeinfer.training.checkpoint import CheckpointError
from vaeinfer.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def resume_config(tmp_path_factory) -> TrainConfig:
    """A config that uses every source of randomness: dynamic binarization, KL warm-up, cosine lr,
    3 epochs of 4 steps (30 training images, batches of 8, the last one short)."""
    data = write_npz(tmp_path_factory.mktemp("resume") / "data.npz", blob_images(40, (1, 12, 10), seed=5))
    return TrainConfig(data=str(data), arch="conv-vae", model_args={"latent_dim": 4, "channels": [4, 8], "blocks": 1},
                       binarize="dynamic", kl_warmup_epochs=1.5, lr_schedule="cosine", epochs=3, batch_size=8,
                       val_fraction=0.25, seed=3, threads=1, checkpoint_every=3)


@pytest.fixture(scope="module")
def straight_run(resume_config, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    train(resume_config, run, progress_bar=False)
    return run


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, ma = checkpoint.load(a)
    tb, mb = checkpoint.load(b)
    assert sorted(ta) == sorted(tb)
    assert any(k.startswith("model.") for k in ta) and any(k.startswith("optim.") for k in ta) and "rng.train" in ta
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key
    assert ma["progress"]["global_step"] == mb["progress"]["global_step"] == 12
    assert ma["weights"]["sha256"] == mb["weights"]["sha256"]

    def strip(history):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert strip(ma["history"]) == strip(mb["history"])  # the same losses and validation metrics, every epoch
    assert ma["optimizer"] == mb["optimizer"]


@pytest.mark.parametrize("stop", [5, 8], ids=["mid-epoch", "epoch-end"])
def test_resume_after_max_steps_is_bit_identical(resume_config, straight_run, tmp_path, stop):
    run = tmp_path / "run"
    train(replace(resume_config, max_steps=stop), run, progress_bar=False)
    assert checkpoint.load(run)[1]["progress"]["global_step"] == stop
    # the total budget of the straight run; the saved max_steps would otherwise stop it again at once
    train(replace(resume_config, max_steps=12), run, resume=True, progress_bar=False)
    _assert_same_checkpoint(straight_run, run)


def test_resume_after_crash_is_bit_identical(resume_config, straight_run, tmp_path, monkeypatch):
    """A run killed at step 8 resumes from its step-6 checkpoint and ends bit-identical."""
    run = tmp_path / "run"
    real = loop_mod.learning_rate

    def crash_at_step_8(config, step, total):
        if step == 7:  # the 8th optimizer step
            raise KeyboardInterrupt
        return real(config, step, total)

    monkeypatch.setattr(loop_mod, "learning_rate", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train(resume_config, run, progress_bar=False)
    monkeypatch.undo()
    assert checkpoint.load(run)[1]["progress"]["global_step"] == 6
    train(resume_config, run, resume=True, progress_bar=False)
    _assert_same_checkpoint(straight_run, run)


def test_resume_of_finished_run_changes_nothing(straight_run, resume_config, tmp_path):
    run = Path(shutil.copytree(straight_run, tmp_path / "run"))
    before = checkpoint.load(run)[1]["weights"]
    train(resume_config, run, resume=True, progress_bar=False)
    assert checkpoint.load(run)[1]["weights"] == before


def test_same_seed_same_weights(mlp, tmp_path):
    """Training is deterministic: the same config trains the very same weights."""
    train(mlp.case.config(mlp.data), tmp_path / "again", progress_bar=False)
    assert checkpoint.load(tmp_path / "again")[1]["weights"]["sha256"] == checkpoint.load(mlp.run)[1]["weights"]["sha256"]


# ---- the files ------------------------------------------------------------------------------------------


def test_checkpoint_is_safetensors_and_json(straight_run, monkeypatch):
    files = sorted(p.name for p in straight_run.iterdir())
    weights = [f for f in files if f.endswith(".safetensors")]
    assert weights == ["checkpoint-00000012.safetensors"]  # older ones are removed
    assert set(files) <= {"checkpoint.json", *weights, "metrics.jsonl", "loss_curve.png", "samples.png"}
    meta = json.loads((straight_run / "checkpoint.json").read_text())
    assert meta["format"] == "vaeinfer-checkpoint" and meta["weights"]["file"] == weights[0]
    assert meta["config"]["arch"] == "conv-vae" and meta["model_args"]["channels"] == [4, 8]
    with safe_open(str(straight_run / weights[0]), framework="pt") as f:
        assert "rng.train" in f.keys()
    for line in (straight_run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)

    # nothing on the load path unpickles: loading and resuming work with pickle and torch.load disabled
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint must never be unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    tensors, _ = checkpoint.load(straight_run)
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_sha256_mismatch_is_detected(mlp, tmp_path):
    run = Path(shutil.copytree(mlp.run, tmp_path / "run"))
    meta = json.loads((run / "checkpoint.json").read_text())
    _flip_last_byte(run / meta["weights"]["file"])
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint.load(run)
    checkpoint.load(run, verify=False)  # the bytes still parse; only the hash tells
    from vaeinfer.export import export_checkpoint

    with pytest.raises(CheckpointError, match="sha256"):
        export_checkpoint(run, tmp_path / "bundle")
    with pytest.raises(CheckpointError, match="sha256"):
        train(mlp.case.config(mlp.data), run, resume=True, progress_bar=False)


@pytest.mark.parametrize("damage", ["missing-weights", "bad-json", "wrong-format", "no-checkpoint"])
def test_broken_checkpoints_are_refused(mlp, tmp_path, damage):
    run = Path(shutil.copytree(mlp.run, tmp_path / "run"))
    meta = json.loads((run / "checkpoint.json").read_text())
    if damage == "missing-weights":
        (run / meta["weights"]["file"]).unlink()
    elif damage == "bad-json":
        (run / "checkpoint.json").write_text("{not json")
    elif damage == "wrong-format":
        (run / "checkpoint.json").write_text(json.dumps({**meta, "version": 99}))
    else:
        (run / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError):
        checkpoint.load(run)


def _tiny_tensors(value: float) -> dict:
    return {"model.w": torch.full((3, 4), value), "rng.train": torch.arange(5, dtype=torch.uint8)}


def test_atomic_save_crash_while_writing_weights(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, _tiny_tensors(1.0), {"progress": {"global_step": 1}}, step=1)

    def half_written(tensors, filename):
        Path(filename).write_bytes(b"\x00" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path, _tiny_tensors(2.0), {"progress": {"global_step": 2}}, step=2)
    monkeypatch.undo()
    tensors, meta = checkpoint.load(tmp_path)
    assert meta["progress"]["global_step"] == 1 and torch.equal(tensors["model.w"], torch.full((3, 4), 1.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000001.safetensors", "checkpoint.json"]


def test_atomic_save_crash_before_json(tmp_path, monkeypatch):
    """Weights written, JSON not yet replaced: the old checkpoint is still whole and loads."""
    checkpoint.save(tmp_path, _tiny_tensors(1.0), {"progress": {"global_step": 1}}, step=1)
    monkeypatch.setattr(checkpoint, "atomic_write_text", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        checkpoint.save(tmp_path, _tiny_tensors(2.0), {"progress": {"global_step": 2}}, step=2)
    monkeypatch.undo()
    tensors, meta = checkpoint.load(tmp_path)
    assert meta["progress"]["global_step"] == 1 and torch.equal(tensors["model.w"], torch.full((3, 4), 1.0))
    # the next save completes and removes the orphaned weights
    checkpoint.save(tmp_path, _tiny_tensors(3.0), {"progress": {"global_step": 3}}, step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000003.safetensors", "checkpoint.json"]
    assert torch.equal(checkpoint.load(tmp_path)[0]["model.w"], torch.full((3, 4), 3.0))


def test_optimizer_state_round_trip():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
    tensors, meta = checkpoint.optimizer_tensors(opt)
    meta = json.loads(json.dumps(meta))  # it must survive JSON
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    checkpoint.restore_optimizer(fresh, tensors, meta)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"] == 0.01
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k])


def test_train_data_facts_and_samples(mlp):
    meta = json.loads((mlp.run / "checkpoint.json").read_text())
    assert meta["data"] == {"source": "data.npz", "train_images": 36, "val_images": 12, "binarize": "none"}
    assert (mlp.run / "samples.png").is_file() and (mlp.run / "loss_curve.png").is_file()
    assert np.isfinite(meta["history"][-1]["val_elbo"])
