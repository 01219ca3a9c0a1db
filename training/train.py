"""The training loop: one visible function, `train`, for every architecture.

Determinism and resume: the data order of epoch e is a permutation drawn from a generator seeded
with (seed, e); all other randomness (reparameterisation noise, dynamic binarization, quantizer
restarts) comes from one generator whose state is saved in each checkpoint together with the
optimizer state and the step within the epoch. Resuming from any checkpoint therefore continues
exactly as if the run had never stopped (a test checks bit-identical weights).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training import checkpoint, distributed
from training.data import DEFAULT_DATA, load_data, split
from training.likelihood import Likelihood
from training.models import build_model, kl_weight
from vaeinfer._fs import atomic_write_text


class JsonConfig:
    """A dataclass config that reads itself from JSON (unknown keys from newer versions ignored)
    and checks the schedule fields every config here has."""

    @classmethod
    def from_json(cls, data: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def check_schedule(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")


@dataclass
class TrainConfig(JsonConfig):
    """Everything a run needs; saved in its checkpoint, so a run can be resumed or reproduced."""

    data: str = DEFAULT_DATA
    arch: str = "conv-vae"
    image_size: list[int] | None = None  # [H, W]; default: the data's own
    channels: int | None = None  # 1 or 3; default: the data's own
    model_args: dict = field(default_factory=dict)  # the architecture's constructor arguments
    likelihood: str = "bernoulli"
    gaussian_scale: float = 0.1
    binarize: str = "none"  # "dynamic": each step draws a binary image from the pixel intensities
    beta: float = 1.0  # KL weight (beta-VAE)
    kl_warmup_epochs: float = 0.0
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine"
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: at the end of each epoch
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in total
    label: str | None = None  # a name for the dataset in the bundle's training facts

    def __post_init__(self):
        if self.binarize not in ("none", "dynamic"):
            raise ValueError(f"binarize must be 'none' or 'dynamic', got {self.binarize!r}")
        self.check_schedule()

    def likelihood_obj(self) -> Likelihood:
        return Likelihood(self.likelihood, self.gaussian_scale if self.likelihood == "gaussian" else None)


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return config.lr


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def record_step(progress: dict, step: int, metrics: dict[str, float], rows: int) -> None:
    """Add one optimizer step's metrics (weighted by its rows) to the epoch sums and advance."""
    for k, v in metrics.items():
        progress["sums"][k] = progress["sums"].get(k, 0.0) + v * rows
    progress["step_in_epoch"] = step + 1
    progress["global_step"] += 1


def checkpoint_due(progress: dict, config) -> tuple[bool, bool]:
    """(save a checkpoint now, stop now): every `checkpoint_every` steps, and at the step budget."""
    at_limit = config.max_steps is not None and progress["global_step"] >= config.max_steps
    every = bool(config.checkpoint_every) and progress["global_step"] % config.checkpoint_every == 0
    return at_limit or every, at_limit


def prepare_batch(x: torch.Tensor, config: TrainConfig, generator: torch.Generator):
    """(encoder input, decoder target); dynamic binarization draws both from the intensities."""
    if config.binarize == "dynamic":
        x = torch.bernoulli(x, generator=generator)
    return x, x


@torch.no_grad()
def evaluate(model, images: torch.Tensor, config: TrainConfig) -> dict[str, float]:
    """Validation metrics (beta = 1, so `loss` is the negative ELBO for a VAE), seeded, batched."""
    if len(images) == 0:
        return {}
    model.eval()
    gen = torch.Generator(device=config.device).manual_seed(config.seed + 7)
    sums: dict[str, float] = {}
    for start in range(0, len(images), 512):
        x = images[start:start + 512].to(config.device)
        x, target = prepare_batch(x, config, gen)
        for k, v in model.loss(x, target, beta=1.0, generator=gen).items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(x)
    model.train()
    out = {f"val_{k}": v / len(images) for k, v in sums.items()}
    if getattr(model, "kind", "vae") == "vae":
        out["val_elbo"] = -out.pop("val_loss")  # the ELBO itself, nats per image (higher is better)
    return out


def _model_and_state(config: TrainConfig, image_shape, run_dir: Path, resume: bool):
    """A fresh model (seeded init) or the one in run_dir's checkpoint, with optimizer and progress."""
    torch.manual_seed(config.seed)
    model = build_model(config.arch, image_shape, config.likelihood_obj(), **config.model_args).to(config.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator(device=config.device).manual_seed(config.seed + 1)
    progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "done": False, "sums": {}, "seconds": 0.0}
    history: list[dict] = []
    if resume and checkpoint.exists(run_dir):
        tensors, meta = checkpoint.load(run_dir)
        model.load_state_dict(checkpoint.model_tensors(tensors))
        checkpoint.restore_optimizer(optimizer, tensors, meta["optimizer"])
        generator.set_state(tensors["rng.train"])
        progress, history = meta["progress"], meta["history"]
    return model, optimizer, generator, progress, history


def save_checkpoint(run_dir, model, optimizer, generator, config, image_shape, progress, history, data_facts):
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = checkpoint.optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.train"] = generator.get_state()
    meta = {
        "kind": getattr(model, "kind", "vae"),
        "arch": config.arch,
        "model_args": config.model_args,
        "image_shape": list(image_shape),
        "likelihood": config.likelihood_obj().to_json(),
        "config": asdict(config),
        "data": data_facts,
        "progress": progress,
        "history": history,
        "optimizer": opt_meta,
    }
    checkpoint.save(run_dir, tensors, meta, progress["global_step"])
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))


def train(config: TrainConfig, run_dir: str | Path, resume: bool = False, progress_bar: bool = True) -> Path:
    """Train `config` into `run_dir` (checkpoint, metrics.jsonl, loss_curve.png, samples.png).

    With `resume`, continue from the checkpoint in `run_dir`: its saved config wins, except for
    `device` and `max_steps` (a step budget says how far to go, not what to train; None runs to
    the last epoch).
    Returns the checkpoint JSON path.
    """
    run_dir = Path(run_dir)
    if resume and checkpoint.exists(run_dir):
        overrides = {"device": config.device, "max_steps": config.max_steps}
        config = TrainConfig.from_json(checkpoint.load(run_dir)[1]["config"] | overrides)
    ctx = distributed.setup(config.device)  # several processes under torchrun; see training.distributed
    if ctx.enabled:
        config = replace(config, device=ctx.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    data = load_data(config.data, config.image_size, config.channels)
    train_set, val_set = split(data, config.val_fraction, config.seed)
    image_shape = data.images.shape[1:]
    data_facts = {"source": config.label or Path(config.data).name, "train_images": len(train_set),
                  "val_images": len(val_set), "binarize": config.binarize}
    images = torch.from_numpy(train_set.images)
    val_images = torch.from_numpy(val_set.images)

    model, optimizer, generator, progress, history = _model_and_state(config, image_shape, run_dir, resume)
    loss_fn = ctx.loss_fn(model)  # model.loss, or its data-parallel form that takes the global batch
    progress["done"] = config.max_steps is not None and progress["global_step"] >= config.max_steps
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(config.kl_warmup_epochs * steps_per_epoch)
    model.train()

    def checkpoint_now():
        if ctx.is_main:
            save_checkpoint(run_dir, model, optimizer, generator, config, image_shape, progress, history, data_facts)
        ctx.barrier()

    bar = tqdm(total=total_steps, initial=progress["global_step"], disable=not (progress_bar and ctx.is_main), unit="step")
    while progress["epoch"] < config.epochs and not progress["done"]:
        epoch = progress["epoch"]
        order = epoch_order(config.seed, epoch, len(images))
        started = time.perf_counter()
        for step in range(progress["step_in_epoch"], steps_per_epoch):
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            x, target = prepare_batch(images[index].to(config.device), config, generator)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, progress["global_step"], total_steps)
            beta = kl_weight(progress["global_step"], warmup_steps, config.beta)
            losses = loss_fn(x, target, beta=beta, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            record_step(progress, step, {k: float(v.detach()) for k, v in losses.items()}, len(index))
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{float(losses['loss'].detach()):.2f}")
            save, stop = checkpoint_due(progress, config)
            if save:
                progress["seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                progress["done"] = stop
                checkpoint_now()
                if stop:
                    break
        if progress["done"] and progress["step_in_epoch"] < steps_per_epoch:
            break  # stopped mid-epoch; a step budget that ends an epoch still gets its summary row
        progress["seconds"] += time.perf_counter() - started
        row = {"epoch": epoch + 1, "step": progress["global_step"],
               "beta": kl_weight(progress["global_step"], warmup_steps, config.beta),
               "lr": optimizer.param_groups[0]["lr"], **{k: v / len(images) for k, v in progress["sums"].items()}, **(evaluate(model, val_images, config) if ctx.is_main else {}),
               "seconds": round(progress["seconds"], 2)}
        history.append(row)
        if ctx.is_main:
            bar.write(json.dumps(row))
        progress.update(epoch=epoch + 1, step_in_epoch=0, sums={}, seconds=0.0)
        checkpoint_now()
    bar.close()
    if ctx.is_main:
        finish(run_dir, model, history, config, val_images if len(val_images) else images)
    ctx.barrier()
    ctx.teardown()
    return checkpoint.resolve(run_dir)


def finish(run_dir: Path, model, history: list[dict], config: TrainConfig, images: torch.Tensor | None = None) -> None:
    """The loss-curve PNG and a sample grid, written at the end of a run.

    A model that cannot sample (a VQ-VAE before its prior is trained) but can `reconstruct`
    gets a grid instead: up to 32 of `images` in the top half, their reconstructions below.
    """
    from training.plots import plot_history
    from vaeinfer.images import save_grid

    if history:
        plot_history(history, run_dir / "loss_curve.png")
    if hasattr(model, "sample"):
        model.eval()
        samples = model.sample(64, generator=torch.Generator(device=config.device).manual_seed(config.seed))
        if samples is not None:
            save_grid(np.asarray(samples.cpu()), run_dir / "samples.png")
    elif hasattr(model, "reconstruct") and images is not None and len(images):
        model.eval()
        n = min(32, len(images))
        nrow = min(8, n)
        x = images[: n - n % nrow].to(config.device)  # whole rows, so each reconstruction sits under its image
        save_grid(np.asarray(torch.cat([x, model.reconstruct(x)]).cpu()), run_dir / "reconstructions.png", nrow=nrow)
