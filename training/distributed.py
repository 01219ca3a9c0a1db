"""Data-parallel training under `torchrun`: DistributedDataParallel, with results that match one process.

    torchrun --nproc-per-node 2 -m vaeinfer.cli train --data data.npz --out runs/x ...

`setup()` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK) and joins the process
group (gloo on CPU, nccl on CUDA, one GPU per process); without torchrun it returns a
one-process `Context` whose hooks do nothing, so `training.train` runs exactly as before.

Same global batch, same parameters. Every rank walks the same seeded per-epoch permutation as
one process would (`training.loop.epoch_order`) and takes a contiguous slice of each global
batch: rank r gets rows ``[r*B//W, (r+1)*B//W)``. This is what torch's `DistributedSampler`
does for an epoch, done per global batch instead, because DistributedSampler pads the last
batch with repeated samples and strides over the whole epoch, which changes which images meet in
a step. Then:

- each rank's loss (a mean over its b_r rows) is weighted by b_r * W / B, so DDP's gradient
  average over W ranks is exactly the gradient of the global batch mean, uneven last batch and
  empty slices (B < W) included;
- every rank draws the step's noise (dynamic binarization, reparameterisation eps) for the
  whole global batch from the shared generator and keeps its own rows, so the generators of all
  ranks stay in the same state as the one-process run's, and every image gets the noise it
  would get there;
- the VQ-VAE's quantizer all-reduces its per-batch code counts and sums before the EMA update
  and gathers the batch's encoder outputs (`all_gather_rows`, in rank order, so the global
  batch's row order) for dead-code restarts and k-means init (see `training.quantizer`);
- BatchNorm layers are converted to SyncBatchNorm (no model here has one; PyTorch syncs them
  on GPUs only, so a BatchNorm model on CPU ranks gets a warning).

Rank 0 alone writes checkpoints, metrics, plots and the progress bar; the others wait at a
barrier. The logged training metrics are the global batch's (all-reduced), so metrics.jsonl
reads the same as a one-process run's.

Every rank holds the whole (in-memory) dataset and computes on its slice: this scales the
compute of a step across processes and machines, not the memory of the dataset.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` in place over all ranks (nothing to do in one process); returns it."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The concatenation, in rank order, of every rank's `tensor` (rows may differ in number).

    With contiguous shards that is the global batch in its one-process row order.
    """
    if not active():
        return tensor
    world = dist.get_world_size()
    count = torch.tensor([len(tensor)], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    longest = max(counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of a global batch of n that `rank` of `world_size` computes."""
    return n * rank // world_size, n * (rank + 1) // world_size


class _LossModule(nn.Module):
    """Makes `model.loss` the forward, so that it runs through DDP (which syncs gradients only
    for calls of its own forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, target, beta, generator, eps=None, options=None):
        kwargs = {"eps": eps} if eps is not None else {}
        return self.model.loss(x, target, beta=beta, generator=generator, **kwargs, **(options or {}))


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank, world size, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    owns_group: bool = False  # setup() initialised the process group (and teardown() ends it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def teardown(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def loss_fn(self, model: nn.Module):
        """A callable with `model.loss`'s signature, run data-parallel when there are several ranks.

        One process: `model.loss` itself. Several: the call takes the *global* batch, computes
        this rank's slice through DDP, and returns the global batch's means (all-reduced);
        `loss` carries the gradient of this rank's weighted share (see the module docstring).
        """
        if not self.enabled:
            return model.loss
        return _ShardedLoss(model, self)


class _ShardedLoss:
    def __init__(self, model: nn.Module, ctx: Context):
        self.model, self.ctx = model, ctx
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            if ctx.device.startswith("cuda"):
                # converts in place below the root and keeps the same parameter objects,
                # so the optimizer built on `model` still holds them
                nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                warnings.warn("this model has BatchNorm layers, which PyTorch synchronizes across ranks only on "
                              "GPUs: on CPU ranks each normalizes over its own slice, so results differ from "
                              "one-process training", stacklevel=3)
        device_ids = [torch.device(ctx.device).index] if ctx.device.startswith("cuda") else None
        self.ddp = nn.parallel.DistributedDataParallel(_LossModule(model), device_ids=device_ids)
        self.draws_eps = getattr(model, "draws_eps", False)

    def __call__(self, x, target, beta, generator=None, **options):
        n = len(x)
        start, stop = shard_bounds(n, self.ctx.rank, self.ctx.world_size)
        eps = None
        if self.draws_eps:
            # the whole global batch's noise, in the order one process draws it; keep our rows
            samples = options.get("samples", 1)
            shape = (n, samples, *self.model.latent_shape) if samples > 1 else (n, *self.model.latent_shape)
            eps = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
            eps = eps[start:stop]
        local = self.ddp(x[start:stop], target[start:stop], beta, generator, eps, options)
        rows = stop - start
        weight = rows * self.ctx.world_size / n
        # an empty slice's means are NaN (0/0); its share of the loss and metrics is zero
        loss = local["loss"].nan_to_num(0.0) * weight if rows == 0 else local["loss"] * weight
        names = list(local)
        shares = torch.stack([local[k].detach().nan_to_num(0.0) * (rows / n) for k in names])
        dist.all_reduce(shares, op=dist.ReduceOp.SUM)
        out = {k: shares[i] for i, k in enumerate(names)}
        # the value of the global mean, the gradient of this rank's weighted share
        out["loss"] = loss + (out["loss"] - loss).detach()
        return out


def setup(device: str = "cpu", timeout_s: float = 1800.0) -> Context:
    """The `Context` of this process: under torchrun, join (or reuse) the process group.

    `device` is the configured one; under torchrun "cuda" or "cuda:N" becomes this process's
    own GPU, cuda:LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not active():
        return Context(device=device)
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = device.startswith("cuda")
    if on_cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    owns = False
    if not dist.is_initialized():
        from datetime import timedelta

        dist.init_process_group("nccl" if on_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        owns = True
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device,
                   owns_group=owns)


__all__ = ["Context", "setup", "active", "all_reduce_sum_", "all_gather_rows", "shard_bounds"]
