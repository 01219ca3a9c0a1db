"""The training loop: one visible function, `train`, for every architecture.

Determinism and resume: the data order of epoch e is a permutation drawn from a generator seeded
with (seed, e); all other randomness (reparameterisation noise, dynamic binarization, quantizer
restarts) comes from one generator whose state is saved in each checkpoint together with the
optimizer state and the step within the epoch. Resuming from any checkpoint therefore continues
exactly as if the run had never stopped (a test checks bit-identical weights).
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from vaeinfer.training import checkpoint, distributed, latent_prior
from vaeinfer.training.config import TrainConfig
from vaeinfer.training.data import load_data, split
from vaeinfer.training.loop import new_progress, run_loop
from vaeinfer.training.models import build_model, kl_weight


def prepare_batch(x: torch.Tensor, config: TrainConfig, generator: torch.Generator):
    """(encoder input, decoder target); dynamic binarization draws both from the intensities."""
    if config.binarize == "dynamic":
        x = torch.bernoulli(x, generator=generator)
    return x, x


def loss_options(config: TrainConfig) -> dict:
    """Keyword arguments of the model's loss that come from the config (only those that differ
    from the default, so that models without them still train)."""
    return {"samples": config.iwae_samples} if config.iwae_samples > 1 else {}


@torch.no_grad()
def evaluate(model, images: torch.Tensor, config: TrainConfig) -> dict[str, float]:
    """Validation metrics (beta = 1, so `loss` is the negative ELBO for a VAE), seeded, batched.
    An IWAE run (iwae_samples = K > 1) also reports `val_iwae`, the K-sample bound it trains on."""
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
        if loss_options(config):
            bound = -float(model.loss(x, target, beta=1.0, generator=gen, **loss_options(config))["loss"])
            sums["iwae"] = sums.get("iwae", 0.0) + bound * len(x)
    model.train()
    out = {f"val_{k}": v / len(images) for k, v in sums.items()}
    if getattr(model, "loss_is_negative_elbo", False):
        out["val_elbo"] = -out.pop("val_loss")  # the ELBO itself, nats per image (higher is better)
    return out


def set_precision(model, config: TrainConfig) -> None:
    """bf16 mode: the VAE runs its encoder and decoder under bf16 autocast (AMX on recent Xeons,
    tensor cores on GPUs; about 4x faster than fp32 for the bundled conv VAE on this project's
    CPU together with the channels-last layout), the optimizer keeps float32 weights, and the
    likelihood, KL and prior terms stay float32. Checkpoints and exports are float32 as always."""
    if config.precision == "fp32":
        return
    if not hasattr(model, "autocast_dtype"):
        raise ValueError(f"precision 'bf16' applies to VAEs; {config.arch} trains in fp32")
    model.autocast_dtype = torch.bfloat16
    model.to(memory_format=torch.channels_last)


def _model_and_state(config: TrainConfig, image_shape, run_dir: Path, resume: bool):
    """A fresh model (seeded init) or the one in run_dir's checkpoint, with optimizer and progress."""
    torch.manual_seed(config.seed)
    model = build_model(config.arch, image_shape, config.likelihood_obj(), **config.model_args).to(config.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator(device=config.device).manual_seed(config.seed + 1)
    progress, history = new_progress(), []
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
        "kind": model.kind,
        "arch": config.arch,
        "model_args": config.model_args,
        "image_shape": list(image_shape),
        "value_range": list(getattr(model, "value_range", (0.0, 1.0))),  # what the exported graphs take and give
        "likelihood": config.likelihood_obj().to_json(),
        "config": asdict(config),
        "data": data_facts,
        "progress": progress,
        "history": history,
        "optimizer": opt_meta,
    }
    checkpoint.save(run_dir, tensors, meta, progress["global_step"])


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
    if config.iwae_samples > 1 and not getattr(model, "supports_iwae", False):
        raise ValueError(f"iwae_samples applies to VAEs (an importance-weighted bound needs a continuous "
                         f"posterior); {config.arch} trains on its own loss: use iwae_samples=1")
    set_precision(model, config)
    if progress["global_step"] == 0:
        latent_prior.warm_start(model, config.init_from, images, config.seed)
    loss_fn = ctx.loss_fn(model)  # model.loss, or its data-parallel form that takes the global batch
    warmup_steps = int(config.kl_warmup_epochs * math.ceil(len(images) / config.batch_size))
    model.train()

    def step(index, global_step):
        x, target = prepare_batch(images[index].to(config.device), config, generator)
        losses = loss_fn(x, target, beta=kl_weight(global_step, warmup_steps, config.beta), generator=generator,
                         **loss_options(config))
        return losses["loss"], {k: float(v.detach()) for k, v in losses.items()}

    run_loop(config, rows=len(images), progress=progress, history=history, optimizer=optimizer, step=step,
             evaluate=lambda: evaluate(model, val_images, config) if ctx.is_main else {},
             save=lambda: save_checkpoint(run_dir, model, optimizer, generator, config, image_shape, progress,
                                          history, data_facts),
             metrics_path=run_dir / "metrics.jsonl", curve_path=run_dir / "loss_curve.png",
             row_fields=lambda global_step: {"beta": kl_weight(global_step, warmup_steps, config.beta)},
             is_main=ctx.is_main, barrier=ctx.barrier, progress_bar=progress_bar)
    if ctx.is_main:
        finish(run_dir, model, config, val_images if len(val_images) else images)
    ctx.barrier()
    ctx.teardown()
    return checkpoint.resolve(run_dir)


def finish(run_dir: Path, model, config: TrainConfig, images: torch.Tensor | None = None) -> None:
    """The sample grid written at the end of a run (the loss curve is `run_loop`'s).

    A model that cannot sample (a VQ-VAE before its prior is trained) but can `reconstruct`
    gets a grid instead: up to 32 of `images` in the top half, their reconstructions below.
    """
    from vaeinfer.images import save_grid

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
