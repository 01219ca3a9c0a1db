"""Cached incremental evaluation of a `GatedPixelCNN` (Ramachandran et al. 2017, "Fast generation
for convolutional autoregressive models"): sampling computes each layer's activations once per
position instead of re-running the whole grid for every code.

Two pure functions of explicit tensors (no state inside, so each exports as a plain graph):

- `PriorRow`, once per row i: the vertical stack at row i for every layer, from the codes of the
  k rows above (k = kernel // 2) and each layer's cached vertical input of those rows. Returns
  the per-layer context the horizontal stack needs at every column of row i (v_to_h of the
  vertical pre-activation plus the label bias) and the cache shifted by one row.
- `PriorStep`, once per position (i, j): the horizontal stack at (i, j) only, from the codes of
  the k positions to the left, each layer's cached horizontal input of those positions and row
  i's context at column j. Returns the logits of code (i, j) and the cache shifted by one column.

Code value `codebook_size` means "outside the grid" (the full model's zero padding): its
embedding is the zero vector. A zero cache is the padding of the layers above the first.
The logits equal `GatedPixelCNN.forward(codes)[:, :, i, j]` up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vaeinfer.training.pixelcnn import GatedPixelCNN


def _padded_table(prior: GatedPixelCNN) -> torch.Tensor:
    """The code embeddings plus one zero row for the padding code K."""
    return torch.cat([prior.embed.weight, prior.embed.weight.new_zeros(1, prior.channels)])


def _window_weight(conv: nn.Conv2d) -> torch.Tensor:
    """A conv evaluated at one output position as a matmul over its receptive field, flattened
    (row, column, channel)-major: one GEMM over the whole batch (onnxruntime's Conv would loop
    over the batch's images, each a tiny 1 x W output), with channels last so that the windows
    are contiguous slices."""
    return conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1)


def _label_bias(layer, label):
    return None if layer.label_bias is None else layer.label_bias(label)


class PriorRow(nn.Module):
    """(above (N, k, W) int64, v_cache (N, L-1, W, k, C)[, label (N,)]) ->
    (context (N, W, L, 2C), next_v_cache (N, L-1, W, k, C))."""

    def __init__(self, prior: GatedPixelCNN):
        super().__init__()
        if prior.num_layers < 2:
            raise ValueError("the cached evaluation needs a prior with >= 2 layers")
        self.prior = prior

    def forward(self, above, v_cache, label=None):
        p = self.prior
        k, width = p.kernel // 2, above.shape[2]
        x = F.embedding(above, _padded_table(p)).permute(0, 2, 1, 3)  # (N, W, k, C): rows i-k .. i-1
        columns = torch.arange(width)[:, None] + torch.arange(p.kernel)  # (W, kernel) into the padded row
        contexts, caches, v = [], [], None
        for index, layer in enumerate(p.layers):
            if index > 0:  # rows i-k .. i of the previous layer's vertical output
                x = torch.cat([v_cache[:, index - 1], v[:, :, None]], dim=2)
                caches.append(x[:, :, 1:])
            padded = F.pad(x, (0, 0, 0, 0, k, k))  # zero columns left and right
            # the kernel-wide window of every column in one Gather: (N, W, kernel, rows, C), as a
            # 2-D (N * W, features) matrix, so that each linear below is one Gemm with its bias
            windows = padded[:, columns].reshape(-1, p.kernel * x.shape[2] * p.channels)
            weight = layer.v_conv.weight.permute(0, 3, 2, 1).reshape(2 * p.channels, -1)  # (2C, kernel, rows, C)
            v_pre = F.linear(windows, weight, layer.v_conv.bias)  # (N * W, 2C)
            context = F.linear(v_pre, _window_weight(layer.v_to_h), layer.v_to_h.bias)
            v_pre, context = v_pre.reshape(-1, width, 2 * p.channels), context.reshape(-1, width, 2 * p.channels)
            bias = _label_bias(layer, label)
            if bias is not None:
                v_pre, context = v_pre + bias[:, None], context + bias[:, None]
            contexts.append(context)
            a, b = v_pre.chunk(2, dim=2)
            v = torch.tanh(a) * torch.sigmoid(b)  # (N, W, C)
        return torch.stack(contexts, 2), torch.stack(caches, 1)


class PriorStep(nn.Module):
    """(left (N, k) int64, h_cache (N, L-1, k, C), context (N, L, 2C)) ->
    (logits (N, K), next_h_cache (N, L-1, k, C))."""

    def __init__(self, prior: GatedPixelCNN):
        super().__init__()
        if prior.num_layers < 2:
            raise ValueError("the cached evaluation needs a prior with >= 2 layers")
        self.prior = prior

    def forward(self, left, h_cache, context):
        p = self.prior
        x = F.embedding(left, _padded_table(p))  # (N, k, C): columns j-k .. j-1
        caches, h = [], None
        for index, layer in enumerate(p.layers):
            if index > 0:  # columns j-k .. j of the previous layer's horizontal output
                x = torch.cat([h_cache[:, index - 1], h[:, None]], dim=1)
                caches.append(x[:, 1:])
            h_pre = F.linear(x.flatten(1), _window_weight(layer.h_conv), layer.h_conv.bias) + context[:, index]
            a, b = h_pre.chunk(2, dim=1)
            h_new = F.linear(torch.tanh(a) * torch.sigmoid(b), _window_weight(layer.h_out), layer.h_out.bias)
            h = h_new if index == 0 else h + h_new
        _, conv1, _, conv2 = p.head
        out = F.linear(F.relu(h), _window_weight(conv1), conv1.bias)
        logits = F.linear(F.relu(out), _window_weight(conv2), conv2.bias)
        return logits, torch.stack(caches, 1)


@torch.no_grad()
def cached_logits_sweep(prior: GatedPixelCNN, codes: torch.Tensor, label=None) -> torch.Tensor:
    """Logits (N, K, h, w) of given codes through the cached path, in raster order (a test aid:
    equals `prior(codes, label)` up to rounding)."""
    row, step = PriorRow(prior), PriorStep(prior)
    n, (h, w), k, c, layers = len(codes), prior.grid, prior.kernel // 2, prior.channels, prior.num_layers
    pad = prior.codebook_size
    out = torch.zeros((n, prior.codebook_size, h, w))
    v_cache = torch.zeros((n, layers - 1, w, k, c))
    padded = F.pad(codes, (k, 0, k, 0), value=pad)  # k padding rows on top, k columns on the left
    for i in range(h):
        context, v_cache = row(padded[:, i:i + k, k:], v_cache, label)
        h_cache = torch.zeros((n, layers - 1, k, c))
        for j in range(w):
            out[:, :, i, j], h_cache = step(padded[:, i + k, j:j + k], h_cache, context[:, j])
    return out


__all__ = ["PriorRow", "PriorStep", "cached_logits_sweep"]
