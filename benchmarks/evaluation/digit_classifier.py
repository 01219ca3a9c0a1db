"""A small digit classifier for judging samples: trained on the MNIST *training* set only, cached.

    from benchmarks.evaluation.digit_classifier import load_or_train, sample_quality
    clf = load_or_train(data_dir)                   # trains once (~1 min), then loads from runs/
    sample_quality(clf, images)                     # {"confident": ..., "entropy": ...}

The classifier (two conv layers, ~0.1M parameters) sees grey-level intensities in [0, 1], as
both real digits and a VAE's samples (Bernoulli means) are. 5,000 training images are held out
to report its accuracy; the test set is never seen here. The cache key is the recipe, so a
changed recipe retrains.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "runs" / "digit-classifier"
RECIPE = {"arch": "conv32-conv64-fc128", "epochs": 2, "batch_size": 128, "lr": 1e-3, "seed": 0, "held_out": 5000}
CONFIDENT = 0.9


def build() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def _key() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]


def _training_set(data_dir: Path):
    from vaeinfer.training.data import read_idx, to_nchw

    images = to_nchw(read_idx(next(data_dir.glob("train-images-idx3-ubyte*"))), "train")
    labels = read_idx(next(data_dir.glob("train-labels-idx1-ubyte*"))).astype(np.int64)
    return torch.from_numpy(images), torch.from_numpy(labels)


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Class probabilities (N, 10), float64."""
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    return np.concatenate([torch.softmax(model(x[i:i + batch]), 1).double().numpy() for i in range(0, len(x), batch)])


def load_or_train(data_dir: Path, cache: Path = CACHE) -> tuple[nn.Module, dict]:
    """(classifier, facts): from the cache when its recipe matches, else trained and cached."""
    folder = cache / _key()
    model = build()
    if (folder / "facts.json").is_file():
        model.load_state_dict(load_file(str(folder / "classifier.safetensors")))
        return model, json.loads((folder / "facts.json").read_text())
    torch.manual_seed(RECIPE["seed"])
    images, labels = _training_set(Path(data_dir))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(RECIPE["seed"]))
    held, train = order[:RECIPE["held_out"]], order[RECIPE["held_out"]:]
    optimizer = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"])
    gen = torch.Generator().manual_seed(RECIPE["seed"] + 1)
    for _ in range(RECIPE["epochs"]):
        model.train()
        perm = train[torch.randperm(len(train), generator=gen)]
        for i in range(0, len(perm), RECIPE["batch_size"]):
            idx = perm[i:i + RECIPE["batch_size"]]
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    probs = predict(model, images[held].numpy())
    facts = {"recipe": RECIPE, "trained_on": f"MNIST train, {len(train)} images",
             "held_out_accuracy": float((probs.argmax(1) == labels[held].numpy()).mean()),
             "held_out_images": len(held)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "classifier.safetensors"))
    (folder / "facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    return model, facts


def sample_quality(model: nn.Module, images: np.ndarray) -> dict:
    """Share of images classified with probability >= 0.9, and the entropy of the predicted-class
    histogram divided by log(10) (1: every class equally often; 0: one class only)."""
    probs = predict(model, images)
    counts = np.bincount(probs.argmax(1), minlength=10)
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum() / np.log(10))
    return {"images": len(images), "confident": float((probs.max(1) >= CONFIDENT).mean()), "entropy": entropy,
            "class_counts": counts.tolist()}
