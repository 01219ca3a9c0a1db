"""Vector quantization (van den Oord et al. 2017): nearest-codebook lookup with a straight-through
gradient, an EMA or gradient-trained codebook, dead-code restarts and optional k-means init.

Two paths, kept apart on purpose:

- ``nearest(z)`` and ``lookup(codes)`` are pure functions of the codebook (no state changes, no
  Python branches on tensor values); the exported encoder and decoder are built from them only.
- ``forward(z, generator)`` is the training path: it quantizes with a straight-through gradient,
  computes the losses and codebook-health metrics and, in training mode only, updates the
  codebook statistics (EMA, dead-code restarts, k-means init).

All codebook state is registered buffers (or the codebook parameter without EMA), so it lands in
the state dict and the safetensors checkpoint, and a resumed run continues bit-identically.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from vaeinfer.training import distributed


class Quantized(NamedTuple):
    """What `VectorQuantizer.forward` returns for z (N, D, h, w)."""

    z_q: torch.Tensor  # (N, D, h, w) float: the chosen codes' vectors, with a straight-through gradient to z
    codes: torch.Tensor  # (N, h, w) int64 indices into the codebook
    loss: torch.Tensor  # scalar: codebook + commitment loss, summed over the grid, mean over images
    perplexity: torch.Tensor  # scalar: exp(entropy) of the batch's code histogram (K = all used evenly)
    usage: torch.Tensor  # scalar: fraction of the K codes used at least once in this batch
    dead_codes: torch.Tensor  # scalar: codes unused for `dead_code_threshold` training steps (before restart)


class VectorQuantizer(nn.Module):
    """A codebook of K vectors of size D; maps each D-vector of z (N, D, h, w) to its nearest code.

    Args:
        codebook_size: K, the number of codes.
        code_dim: D, the size of each code vector (the encoder's output channels).
        commitment: weight of the commitment loss ||z - sg[e]||^2 that keeps the encoder close
            to its codes.
        ema: update the codebook by exponential moving averages of the cluster sizes and sums
            (Laplace-smoothed) instead of by gradient; then only the commitment loss trains the
            encoder and the codebook is a buffer, not a parameter.
        decay: the EMA decay.
        eps: the Laplace smoothing constant of the EMA cluster sizes.
        dead_code_threshold: a code not chosen for this many training steps is dead.
        restart_dead_codes: re-seed dead codes from random encoder outputs of the current batch.
        kmeans_init: initialise the codebook by k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that k-means.
    """

    def __init__(self, codebook_size: int, code_dim: int, commitment: float = 0.25, ema: bool = True,
                 decay: float = 0.99, eps: float = 1e-5, dead_code_threshold: int = 100,
                 restart_dead_codes: bool = True, kmeans_init: bool = False, kmeans_iters: int = 10):
        super().__init__()
        if codebook_size < 2 or code_dim < 1:
            raise ValueError(f"expected codebook_size >= 2 and code_dim >= 1, got {codebook_size} and {code_dim}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        if dead_code_threshold < 1:
            raise ValueError(f"dead_code_threshold must be >= 1 training steps, got {dead_code_threshold}")
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.commitment, self.ema, self.decay, self.eps = commitment, ema, decay, eps
        self.dead_code_threshold, self.restart_dead_codes = dead_code_threshold, restart_dead_codes
        self.kmeans_iters = kmeans_iters
        # the reference implementation's init: small, so that early codes sit among the encoder outputs
        codebook = torch.empty(codebook_size, code_dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if ema:
            self.register_buffer("codebook", codebook)
            # sizes start at 1 with sums equal to the codes (not at 0): an unused code then keeps
            # its vector instead of being divided by the smoothing epsilon on the first update
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_sum", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.int64))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices (N, h, w) int64 of the codes nearest to z (N, D, h, w) in squared L2 distance.

        Computed as ||e||^2 - 2 z.e by one matmul and an argmin over the code axis (no cdist, no
        reshape to (N*h*w, D)), which exports to ONNX as MatMul + ArgMin. The ||z||^2 term of the
        distance is the same for every code, so it cannot change the argmin; leaving it out saves
        an op and the rounding error that adding a large constant would bring to close calls.
        Exact ties go to the lowest index: torch.argmin returns the first minimum, and so does
        ONNX ArgMin (select_last_index=0). Near ties may be decided differently by another
        backend, whose float rounding differs.
        """
        z = z.permute(0, 2, 3, 1)  # (N, h, w, D)
        scores = self.codebook.pow(2).sum(dim=1) - 2.0 * torch.matmul(z, self.codebook.t())  # (N, h, w, K)
        return scores.argmin(dim=-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors (N, D, h, w) for indices (N, h, w) int64: an embedding lookup (ONNX Gather)."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None) -> Quantized:
        """Quantize z (N, D, h, w) for training; see `Quantized`.

        In training mode this also updates the codebook statistics (k-means init on the first
        batch, EMA, dead-code restarts drawn with `generator`); in eval mode it changes nothing.
        """
        if z.dim() != 4 or z.shape[1] != self.code_dim:
            raise ValueError(f"expected z of shape (N, {self.code_dim}, h, w), got {tuple(z.shape)}")
        if self.training and not bool(self.initialized):
            self._kmeans_init(z.detach(), generator)
        with torch.no_grad():
            codes = self.nearest(z)
        e = self.lookup(codes)
        # summed over D, h, w (the paper's squared norms), like recon is summed over pixels
        commit = (z - e.detach()).pow(2).flatten(1).sum(dim=1).mean()
        loss = self.commitment * commit
        if not self.ema:
            loss = loss + (e - z.detach()).pow(2).flatten(1).sum(dim=1).mean()
        # straight-through: the value is exactly e (z - z is exactly 0), the gradient goes to z
        z_q = e.detach() + (z - z.detach())

        with torch.no_grad():
            onehot = F.one_hot(codes.flatten(), self.codebook_size).to(z.dtype)  # (M, K)
            counts = onehot.sum(dim=0)
            if self.training:
                # data-parallel training: every rank updates with the global batch's statistics
                # (a no-op in one process; see training.distributed)
                distributed.all_reduce_sum_(counts)
            probs = counts / counts.sum()
            perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
            usage = (counts > 0).to(z.dtype).mean()
            if self.training:
                dead = self._update(counts, onehot, z.detach(), generator)
            else:
                dead = self.unused_steps >= self.dead_code_threshold
        return Quantized(z_q, codes, loss, perplexity, usage, dead.sum().to(z.dtype))

    def _update(self, counts, onehot, z, generator) -> torch.Tensor:
        """One training step's codebook update; returns the mask of codes dead before restarts."""
        self.unused_steps.copy_(torch.where(counts > 0, torch.zeros_like(self.unused_steps), self.unused_steps + 1))
        dead = self.unused_steps >= self.dead_code_threshold
        flat_z = z.permute(0, 2, 3, 1).reshape(-1, self.code_dim)
        if self.ema:
            # a one-hot matmul rather than index_add_: deterministic on CUDA too
            self._ema_update(counts, distributed.all_reduce_sum_(onehot.t() @ flat_z))
        if self.restart_dead_codes:
            self._restart(dead, flat_z, generator)
        return dead

    def _ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        # Laplace smoothing: no code's size reaches 0, so no division by zero for unused codes
        n = self.cluster_size.sum()
        size = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.codebook.copy_(self.embed_sum / size.unsqueeze(1))

    def _restart(self, dead: torch.Tensor, flat_z: torch.Tensor, generator: torch.Generator | None) -> None:
        """Re-seed dead codes with random rows of flat_z (M, D), drawn with `generator`."""
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        flat_z = distributed.all_gather_rows(flat_z)  # all ranks' rows, in the global batch's order
        rows = torch.randint(0, len(flat_z), (n_dead,), generator=generator, device=flat_z.device)
        fresh = flat_z[rows]
        index = dead.nonzero().squeeze(1)
        self.codebook.data[index] = fresh
        if self.ema:
            # a size of 1 with a sum equal to the new vector keeps the EMA consistent with it
            self.cluster_size[index] = 1.0
            self.embed_sum[index] = fresh
        self.unused_steps[index] = 0

    def _kmeans_init(self, z: torch.Tensor, generator: torch.Generator | None) -> None:
        """Lloyd's k-means on the batch's vectors, seeded with K of them drawn with `generator`."""
        flat_z = distributed.all_gather_rows(z.permute(0, 2, 3, 1).reshape(-1, self.code_dim))
        # with replacement only when the batch holds fewer vectors than codes
        if len(flat_z) >= self.codebook_size:
            rows = torch.randperm(len(flat_z), generator=generator, device=flat_z.device)[: self.codebook_size]
        else:
            rows = torch.randint(0, len(flat_z), (self.codebook_size,), generator=generator, device=flat_z.device)
        centers = flat_z[rows].clone()
        counts = torch.ones(self.codebook_size, device=flat_z.device, dtype=flat_z.dtype)
        for _ in range(self.kmeans_iters):
            scores = centers.pow(2).sum(dim=1) - 2.0 * flat_z @ centers.t()
            onehot = F.one_hot(scores.argmin(dim=1), self.codebook_size).to(flat_z.dtype)
            counts = onehot.sum(dim=0)
            means = (onehot.t() @ flat_z) / counts.clamp_min(1.0).unsqueeze(1)
            centers = torch.where((counts > 0).unsqueeze(1), means, centers)  # an empty cluster keeps its center
        self.codebook.data.copy_(centers)
        if self.ema:
            size = counts.clamp_min(1.0)
            self.cluster_size.copy_(size)
            self.embed_sum.copy_(centers * size.unsqueeze(1))
        self.initialized.fill_(True)

    def extra_repr(self) -> str:
        return (f"codebook_size={self.codebook_size}, code_dim={self.code_dim}, commitment={self.commitment}, "
                f"ema={self.ema}, decay={self.decay}, dead_code_threshold={self.dead_code_threshold}")


__all__ = ["VectorQuantizer", "Quantized"]
