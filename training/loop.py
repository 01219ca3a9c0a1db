"""The one training loop that `vaeinfer.training.train` (the models) and `vaeinfer.training.pixelcnn_prior` (a VQ-VAE's
prior) share: epochs of seeded-permutation batches, the learning-rate schedule, the optimizer
step, the progress bar, per-epoch summary rows (validation included), checkpoints, the step
budget, metrics.jsonl and the loss-curve PNG.

A trainer brings what differs: its step (the loss of one batch, by row index), its validation,
how it saves a checkpoint, and extra per-epoch row fields. The loop's state is the `progress`
dict saved in each checkpoint; with the trainer's own RNG state saved beside it, a resumed run
continues exactly as if it had never stopped.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from vaeinfer._fs import atomic_write_text


def new_progress() -> dict:
    """The progress of a run that has not taken a step yet."""
    return {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "done": False, "sums": {}, "seconds": 0.0}


def learning_rate(config, step: int, total_steps: int) -> float:
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


def run_loop(config, *, rows: int, progress: dict, history: list[dict], optimizer: torch.optim.Optimizer,
             step: Callable[[torch.Tensor, int], tuple[torch.Tensor, dict[str, float]]],
             evaluate: Callable[[], dict[str, float]], save: Callable[[], None], metrics_path: Path,
             curve_path: Path, row_fields: Callable[[int], dict] = lambda global_step: {},
             is_main: bool = True, barrier: Callable[[], None] = lambda: None, progress_bar: bool = True) -> None:
    """Train until `config.epochs` epochs or `config.max_steps` steps are done.

    `config` gives epochs, batch_size, seed, lr, lr_schedule, checkpoint_every and max_steps.
    `step(index, global_step)` returns one batch's loss (the loop runs backward and the
    optimizer step) and its metrics, per row; `index` holds the batch's row numbers among the
    `rows` training rows. `evaluate()` gives the validation metrics of an epoch's summary row,
    `row_fields(global_step)` fields placed after "step". `save()` writes the checkpoint that
    holds `progress` and `history`; then the loop rewrites `metrics_path` (the history, one JSON
    row a line) and at the end plots `curve_path`. Under several processes only `is_main` saves
    and prints; `barrier` lets the others wait for each checkpoint.
    """
    progress["done"] = config.max_steps is not None and progress["global_step"] >= config.max_steps
    steps_per_epoch = math.ceil(rows / config.batch_size)
    total_steps = steps_per_epoch * config.epochs

    def checkpoint_now():
        if is_main:
            save()
            atomic_write_text(metrics_path, "".join(json.dumps(row) + "\n" for row in history))
        barrier()

    bar = tqdm(total=total_steps, initial=progress["global_step"], disable=not (progress_bar and is_main), unit="step")
    while progress["epoch"] < config.epochs and not progress["done"]:
        epoch = progress["epoch"]
        order = epoch_order(config.seed, epoch, rows)
        started = time.perf_counter()
        for batch in range(progress["step_in_epoch"], steps_per_epoch):
            index = order[batch * config.batch_size:(batch + 1) * config.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, progress["global_step"], total_steps)
            loss, metrics = step(index, progress["global_step"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            record_step(progress, batch, metrics, len(index))
            bar.update(1)
            name = next(iter(metrics))
            bar.set_postfix(epoch=epoch, **{name: f"{metrics[name]:.3f}"})
            save_now, stop = checkpoint_due(progress, config)
            if save_now:
                progress["seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                progress["done"] = stop
                checkpoint_now()
                if stop:
                    break
        if progress["done"] and progress["step_in_epoch"] < steps_per_epoch:
            break  # stopped mid-epoch; a step budget that ends an epoch still gets its summary row
        progress["seconds"] += time.perf_counter() - started
        row = {"epoch": epoch + 1, "step": progress["global_step"], **row_fields(progress["global_step"]),
               "lr": optimizer.param_groups[0]["lr"], **{k: v / rows for k, v in progress["sums"].items()},
               **evaluate(), "seconds": round(progress["seconds"], 2)}
        history.append(row)
        if is_main:
            bar.write(json.dumps(row))
        progress.update(epoch=epoch + 1, step_in_epoch=0, sums={}, seconds=0.0)
        checkpoint_now()
    bar.close()
    if is_main and history:
        from vaeinfer.training.plots import plot_history

        plot_history(history, curve_path)


__all__ = ["run_loop", "new_progress", "learning_rate", "epoch_order", "record_step", "checkpoint_due"]
