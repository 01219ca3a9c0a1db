"""A gated PixelCNN (van den Oord et al. 2016) over a VQ-VAE's code grid: the learned prior.

Each gated layer has a vertical stack, which sees the rows above the current position, and a
horizontal stack, which sees the current row to the left of it and gets the vertical stack's
features through a 1x1 conv. Causality comes from kernel shapes and one-sided zero padding,
not from masked weights, so the exported graph is plain Pad + Conv: there is nothing to mask at
run time and no blind spot (the vertical stack's receptive field grows to both sides).

``forward(codes, label=None) -> logits``: codes (N, h, w) int64, label (N,) int64 when
``num_classes > 0`` (its embedding is a bias in every gated unit), logits (N, K, h, w) float32.
The logits at (i, j) depend only on the codes before (i, j) in raster order, so sampling fills
the grid one position at a time (`sample`); the runtime does the same with numpy noise.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer over (vertical, horizontal) feature maps of `channels` each.

    The first layer reads the code embeddings themselves, so its kernels stop one row (vertical)
    or one column (horizontal) short of the current position and it has no residual connection:
    otherwise position (i, j) would see its own code. Later layers may include the current row /
    column, because the features there already only see what came before.
    """

    def __init__(self, channels: int, kernel: int, first: bool, num_classes: int):
        super().__init__()
        k = kernel // 2
        self.first = first
        reach = k if first else k + 1
        self.v_pad = nn.ZeroPad2d((k, k, k, 0))  # left, right, top, bottom: nothing from below
        self.v_conv = nn.Conv2d(channels, 2 * channels, (reach, kernel))
        self.h_pad = nn.ZeroPad2d((k, 0, 0, 0))  # nothing from the right
        self.h_conv = nn.Conv2d(channels, 2 * channels, (1, reach))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.label_bias = nn.Embedding(num_classes, 2 * channels) if num_classes else None

    def forward(self, v, h, label=None):
        v_pre, h_pre = self.v_conv(self.v_pad(v)), self.h_conv(self.h_pad(h))
        if self.first:
            # the short kernels give one extra row / column at the end, belonging to no position
            v_pre, h_pre = v_pre[:, :, :-1], h_pre[:, :, :, :-1]
        h_pre = h_pre + self.v_to_h(v_pre)
        if self.label_bias is not None:
            bias = self.label_bias(label)[:, :, None, None]
            v_pre, h_pre = v_pre + bias, h_pre + bias
        h_new = self.h_out(_gate(h_pre))
        return _gate(v_pre), h_new if self.first else h + h_new


class GatedPixelCNN(nn.Module):
    """An autoregressive prior p(codes) = prod_ij p(c_ij | c_<ij [, label]) over a code grid.

    Args:
        codebook_size: K, the number of codes (the VQ-VAE's).
        grid: (h, w) of the code grid; stored for sampling and export (the convs take any size).
        channels: the width of both stacks.
        layers: gated layers (the first is the causal "A" layer); with `kernel` 3 the receptive
            field grows by one row and one column per layer.
        kernel: the odd kernel width of the vertical stack.
        num_classes: > 0 for a class-conditional prior taking labels in [0, num_classes).
    """

    def __init__(self, codebook_size: int, grid, channels: int = 64, layers: int = 8, kernel: int = 3,
                 num_classes: int = 0):
        super().__init__()
        if kernel < 3 or kernel % 2 == 0:
            raise ValueError(f"kernel must be odd and >= 3, got {kernel}")
        if layers < 1 or num_classes < 0:
            raise ValueError(f"expected layers >= 1 and num_classes >= 0, got {layers} and {num_classes}")
        self.codebook_size, self.grid = codebook_size, tuple(grid)
        self.channels, self.num_layers, self.kernel, self.num_classes = channels, layers, kernel, num_classes
        self.embed = nn.Embedding(codebook_size, channels)
        self.layers = nn.ModuleList(GatedLayer(channels, kernel, i == 0, num_classes) for i in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(),
                                  nn.Conv2d(channels, codebook_size, 1))

    @property
    def config(self) -> dict:
        """The constructor arguments, as JSON data (saved in the prior checkpoint)."""
        return {"codebook_size": self.codebook_size, "grid": list(self.grid), "channels": self.channels,
                "layers": self.num_layers, "kernel": self.kernel, "num_classes": self.num_classes}

    def forward(self, codes: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, K, h, w) for codes (N, h, w) int64 [and label (N,) int64]."""
        if (label is None) != (self.num_classes == 0):
            raise ValueError(f"this prior has num_classes={self.num_classes}: expected "
                             f"{'a label (N,) int64' if self.num_classes else 'no label'}, got "
                             f"{'none' if label is None else 'a label'}")
        v = h = self.embed(codes).permute(0, 3, 1, 2)
        for layer in self.layers:
            v, h = layer(v, h, label)
        return self.head(h)

    @torch.no_grad()
    def sample(self, n: int, label: torch.Tensor | None = None, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """n code grids (n, h, w) int64, drawn position by position in raster order."""
        device = self.embed.weight.device
        codes = torch.zeros((n, *self.grid), dtype=torch.int64, device=device)
        for i in range(self.grid[0]):
            for j in range(self.grid[1]):
                probs = F.softmax(self(codes, label)[:, :, i, j] / temperature, dim=1)
                codes[:, i, j] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return codes


__all__ = ["GatedPixelCNN"]
