"""Training a VQ-VAE's learned prior: a `GatedPixelCNN` over the code grids of the run's data.

`train_prior(run_dir, config)` loads the VQ-VAE checkpoint of `run_dir`, re-reads that run's data
with the same train/validation split, encodes every image to its code grid once, then trains the
PixelCNN with Adam on cross-entropy. It writes beside the VQ-VAE: the checkpoint named "prior"
(prior.json + prior-<step>.safetensors, holding the PixelCNN's constructor arguments),
prior_metrics.jsonl (validation NLL in bits per code), prior_loss_curve.png and prior_samples.png.

Determinism and resume as in `training.train`: the data order of epoch e is a permutation seeded
with (seed, e), the initial weights come from `seed`, and a step draws no other random numbers,
so the optimizer state and the progress in each checkpoint are all that an exact resume needs.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from vaeinfer.training import checkpoint
from vaeinfer.training.checkpoint import CheckpointError
from vaeinfer.training.data import DataError, load_data, split
from vaeinfer.training.likelihood import Likelihood
from vaeinfer.training.models import build_model
from vaeinfer.training.pixelcnn import GatedPixelCNN
from vaeinfer.training.loop import new_progress, run_loop
from vaeinfer.training.config import JsonConfig, TrainConfig

NAME = "prior"  # the checkpoint's name in the run folder


@dataclass
class PriorConfig(JsonConfig):
    """Everything a prior run needs; saved in prior.json, so it can be resumed or reproduced."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine"
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    layers: int = 8
    channels: int = 64
    kernel: int = 3
    conditional: bool | None = None  # class-conditional; None: when the data has labels
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: at the end of each epoch
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in total

    def __post_init__(self):
        self.check_schedule()


def load_vqvae(run_dir: str | Path, device: str = "cpu"):
    """(the VQ-VAE of run_dir's checkpoint in eval mode, that checkpoint's meta)."""
    tensors, meta = checkpoint.load(run_dir)
    model = build_model(meta["arch"], meta["image_shape"], Likelihood.from_json(meta["likelihood"]), **meta["model_args"])
    if not getattr(model, "encodes_to_codes", False):
        raise CheckpointError(f"{run_dir}: a prior needs a VQ-VAE checkpoint (kind 'vqvae'), got kind {meta.get('kind')!r}")
    model.load_state_dict(checkpoint.model_tensors(tensors))
    return model.to(device).eval(), meta


@torch.no_grad()
def encode_codes(vqvae, images: np.ndarray, device: str = "cpu", batch_size: int = 512) -> torch.Tensor:
    """Code grids (N, h, w) int64, on the CPU, of float32 images (N, C, H, W) in [0, 1].

    The images are encoded as they are, never binarized: the prior must model the codes that
    encoding an image gives at inference.
    """
    encoder = vqvae.eval().encoder
    grids = [encoder(torch.from_numpy(images[s:s + batch_size]).to(device))[0].cpu()
             for s in range(0, len(images), batch_size)]
    return torch.cat(grids) if grids else torch.zeros((0, *vqvae.grid), dtype=torch.int64)


def _run_data(meta: dict, conditional: bool | None):
    """(train split, validation split, num_classes (0: unconditional), data facts) of the VQ-VAE's run."""
    run = TrainConfig.from_json(meta["config"])
    data = load_data(run.data, run.image_size, run.channels)
    if list(data.images.shape[1:]) != list(meta["image_shape"]):
        raise DataError(f"{run.data}: the VQ-VAE was trained on images {meta['image_shape']}, "
                        f"the data now gives {list(data.images.shape[1:])}")
    if conditional is None:
        conditional = data.labels is not None
    if conditional and data.labels is None:
        raise DataError(f"{run.data}: a class-conditional prior needs labels; this data has none")
    num_classes = 0
    if conditional:
        if data.labels.min() < 0:
            raise DataError(f"{run.data}: labels must be >= 0, got {int(data.labels.min())}")
        num_classes = int(data.labels.max()) + 1
    train_set, val_set = split(data, run.val_fraction, run.seed)
    facts = {"source": run.label or Path(run.data).name, "train_images": len(train_set), "val_images": len(val_set)}
    return train_set, val_set, num_classes, facts


def _labels(data, num_classes: int) -> torch.Tensor | None:
    return torch.from_numpy(data.labels) if num_classes else None


def _batch(codes, labels, index, device):
    return codes[index].to(device), None if labels is None else labels[index].to(device)


@torch.no_grad()
def evaluate(prior: GatedPixelCNN, codes: torch.Tensor, labels: torch.Tensor | None, device: str) -> dict[str, float]:
    """Validation NLL in bits per code (the mean over every position of every grid)."""
    if len(codes) == 0:
        return {}
    prior.eval()
    total = 0.0
    for start in range(0, len(codes), 512):
        c, y = _batch(codes, labels, slice(start, start + 512), device)
        total += float(F.cross_entropy(prior(c, y), c, reduction="sum"))
    prior.train()
    return {"val_bits_per_code": total / codes.numel() / math.log(2)}


def _save(run_dir, prior, optimizer, config, vq_meta, facts, progress, history):
    tensors = {f"model.{k}": v for k, v in prior.state_dict().items()}
    opt_tensors, opt_meta = checkpoint.optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    meta = {
        "kind": "pixelcnn-prior",
        "arch": "gated-pixelcnn",
        "model_args": prior.config,
        # the codes it models: a prior is only valid for the very VQ-VAE weights that made them
        "vqvae": {"weights_sha256": vq_meta["weights"]["sha256"], "global_step": vq_meta["progress"]["global_step"]},
        "config": asdict(config),
        "data": facts,
        "progress": progress,
        "history": history,
        "optimizer": opt_meta,
    }
    checkpoint.save(run_dir, tensors, meta, progress["global_step"], name=NAME)


def train_prior(run_dir: str | Path, config: PriorConfig | None = None, resume: bool = False,
                progress_bar: bool = True) -> Path:
    """Train the prior of the VQ-VAE in `run_dir`; returns the prior checkpoint's JSON path.

    With `resume`, continue from the prior checkpoint in `run_dir` (its saved config wins, but
    for `device` and a given `max_steps`).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every rank would write the same files; the prior is small enough for one process
        raise ValueError("train-prior runs in one process; start it without torchrun")
    run_dir = Path(run_dir)
    config = config or PriorConfig()
    saved = checkpoint.load(run_dir, name=NAME) if resume and checkpoint.exists(run_dir, NAME) else None
    if saved is not None:
        overrides = {"device": config.device, "max_steps": config.max_steps}  # as in training.train
        config = PriorConfig.from_json(saved[1]["config"] | overrides)
    if config.threads:
        torch.set_num_threads(config.threads)
    vqvae, vq_meta = load_vqvae(run_dir, config.device)
    train_set, val_set, num_classes, facts = _run_data(vq_meta, config.conditional)
    config = replace(config, conditional=num_classes > 0)  # saved resolved
    codes, val_codes = encode_codes(vqvae, train_set.images, config.device), encode_codes(vqvae, val_set.images, config.device)
    labels, val_labels = _labels(train_set, num_classes), _labels(val_set, num_classes)

    torch.manual_seed(config.seed)
    prior = GatedPixelCNN(vqvae.codebook_size, vqvae.grid, channels=config.channels, layers=config.layers,
                          kernel=config.kernel, num_classes=num_classes).to(config.device)
    optimizer = torch.optim.Adam(prior.parameters(), lr=config.lr)
    progress, history = new_progress(), []
    if saved is not None:
        tensors, meta = saved
        if meta["vqvae"]["weights_sha256"] != vq_meta["weights"]["sha256"]:
            raise CheckpointError(f"{run_dir}: the prior was trained on the codes of VQ-VAE weights "
                                  f"{meta['vqvae']['weights_sha256'][:12]}, but checkpoint.json now holds "
                                  f"{vq_meta['weights']['sha256'][:12]}; train the prior afresh (resume=False)")
        prior.load_state_dict(checkpoint.model_tensors(tensors))
        checkpoint.restore_optimizer(optimizer, tensors, meta["optimizer"])
        progress, history = meta["progress"], meta["history"]
    prior.train()

    def step(index, global_step):
        c, y = _batch(codes, labels, index, config.device)
        loss = F.cross_entropy(prior(c, y), c)  # nats per code
        return loss, {"bits_per_code": float(loss.detach()) / math.log(2)}

    run_loop(config, rows=len(codes), progress=progress, history=history, optimizer=optimizer, step=step,
             evaluate=lambda: evaluate(prior, val_codes, val_labels, config.device),
             save=lambda: _save(run_dir, prior, optimizer, config, vq_meta, facts, progress, history),
             metrics_path=run_dir / "prior_metrics.jsonl", curve_path=run_dir / "prior_loss_curve.png",
             progress_bar=progress_bar)
    _finish(run_dir, prior, vqvae, config)
    return checkpoint.resolve(run_dir, NAME)


def _finish(run_dir: Path, prior: GatedPixelCNN, vqvae, config: PriorConfig) -> None:
    """64 samples decoded by the VQ-VAE (one row per class); the loss curve is `run_loop`'s."""
    from vaeinfer.images import save_grid

    prior.eval()
    label = torch.arange(64, device=config.device) // 8 % prior.num_classes if prior.num_classes else None
    codes = prior.sample(64, label, generator=torch.Generator(device=config.device).manual_seed(config.seed))
    with torch.no_grad():
        images = vqvae.likelihood.mean(vqvae.decoder(codes))
    save_grid(np.asarray(images.cpu()), run_dir / "prior_samples.png", nrow=8)


__all__ = ["PriorConfig", "train_prior", "load_vqvae", "encode_codes"]
