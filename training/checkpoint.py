"""Checkpoints: safetensors weights + a JSON file, no pickle anywhere.

A run folder holds `<name>.json` and the weights file it names (`<name>-<step>.safetensors`);
the model's checkpoint is named `checkpoint`, a VQ-VAE's prior `prior`. The JSON
records the weights' sha256. The weights are written first under a new name, then the JSON is
atomically replaced, then older weights files are removed: a crash at any moment leaves a
complete, consistent checkpoint (the old or the new one).

The safetensors file holds the model's tensors under `model.*`, the optimizer's per-parameter
state under `optim.<index>.<key>` and RNG states under `rng.<name>`; everything else (constructor
arguments, training config, progress, optimizer hyper-parameters, metrics) is JSON.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vaeinfer._fs import atomic_path, atomic_write_text

FORMAT = "vaeinfer-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or of an unknown format."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimizer's state dict into tensors (for safetensors) and JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save(run_dir: str | Path, tensors: dict[str, torch.Tensor], meta: dict, step: int, name: str = "checkpoint") -> Path:
    """Write checkpoint `name` atomically; returns the JSON path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = run_dir / f"{name}-{step:08d}.safetensors"
    with atomic_path(weights) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    meta = {"format": FORMAT, "version": VERSION, **meta,
            "weights": {"file": weights.name, "sha256": sha256_file(weights)},
            "torch_version": torch.__version__}
    atomic_write_text(run_dir / f"{name}.json", json.dumps(meta, indent=2, sort_keys=True))
    for old in run_dir.glob(f"{name}-*.safetensors"):
        if old.name != weights.name:
            old.unlink(missing_ok=True)
    return run_dir / f"{name}.json"


def resolve(path: str | Path, name: str = "checkpoint") -> Path:
    """A run folder or a checkpoint JSON -> the checkpoint JSON path."""
    path = Path(path)
    json_path = path / f"{name}.json" if path.is_dir() else path
    if not json_path.is_file():
        raise CheckpointError(f"{path}: expected a run folder holding {name}.json, or that JSON file itself")
    return json_path


def exists(run_dir: str | Path, name: str = "checkpoint") -> bool:
    return (Path(run_dir) / f"{name}.json").is_file()


def load(path: str | Path, verify: bool = True, name: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint (run folder or JSON path) -> (tensors, meta). Verifies the sha256."""
    json_path = resolve(path, name)
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{json_path}: not readable JSON ({e})") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{json_path}: expected format {FORMAT} v{VERSION}, "
                              f"got {meta.get('format')!r} v{meta.get('version')!r}")
    weights = json_path.parent / Path(meta["weights"]["file"]).name
    if not weights.is_file():
        raise CheckpointError(f"{json_path}: its weights file {weights.name} is missing")
    if verify and sha256_file(weights) != meta["weights"]["sha256"]:
        raise CheckpointError(f"{weights}: sha256 differs from the one recorded in {json_path.name}")
    return load_file(str(weights)), meta


def model_tensors(tensors: dict) -> dict:
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
