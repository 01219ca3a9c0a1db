"""A convolutional VAE with a spatial latent (N, c, H / f, W / f), like latent-diffusion autoencoders.

Importing this module registers the architecture "spatial-conv-vae" in
`training.models.ARCHITECTURES` (`vaeinfer train --arch conv-vae --latent spatial`). The model
is fully convolutional, so the trained weights run at any H, W that are multiples of f, and it
offers the same two plain modules as the other VAEs, which export/spatial_vae.py exports (kind
"spatial-vae"):

- ``encoder(x) -> (mean, logvar)``: x (N, C, H, W) float32 in [-1, 1]; mean and logvar
  (N, latent_channels, H / f, W / f);
- ``decoder(z) -> params``: z (N, latent_channels, h, w); params (N, C, f h, f w) are the
  likelihood's parameters (the Gaussian's mean or the Laplace's location, in [-1, 1] units).

Value range: the training data comes in [0, 1] (training.data); this model works in [-1, 1]
(x' = 2 x - 1, as the diffusers autoencoders do), so a likelihood's fixed scale is in [-1, 1]
units too (a scale of 0.1 here is 0.05 of [0, 1] units). `value_range` says so and goes into
the checkpoint. `loss`, `sample` and `reconstruct` take and give [0, 1] images, as the
training loop and its sample grids expect.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vaeinfer.kinds.spatial_vae import KIND
from vaeinfer.training.likelihood import Likelihood
from vaeinfer.training.models import ARCHITECTURES, VAE, ResBlock, _act, upsampling

DOWNSAMPLES = (2, 4, 8, 16)


class SpatialEncoder(nn.Module):
    """A 3x3 stem conv, one stride-2 3x3 conv per width, residual blocks, a 1x1 conv to 2c."""

    def __init__(self, in_channels, latent_channels, widths, blocks, activation):
        super().__init__()
        layers = [nn.Conv2d(in_channels, widths[0], 3, padding=1), _act(activation)]
        c_in = widths[0]
        for c in widths:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), _act(activation)]
            c_in = c
        layers += [ResBlock(c_in, activation) for _ in range(blocks)]
        layers += [_act(activation), nn.Conv2d(c_in, 2 * latent_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        mean, logvar = self.net(x).chunk(2, dim=1)
        # the bounds diffusers' DiagonalGaussianDistribution uses: exp() stays finite in fp32
        return mean, logvar.clamp(-30.0, 20.0)


class SpatialDecoder(nn.Module):
    """A 3x3 conv from c, residual blocks, then `training.models.upsampling`'s (nearest 2x + 3x3
    conv) stages back to full resolution: no crop, every size is f times the latent's."""

    def __init__(self, out_channels, latent_channels, widths, blocks, activation):
        super().__init__()
        widths = list(reversed(widths))
        layers = [nn.Conv2d(latent_channels, widths[0], 3, padding=1)]
        layers += [ResBlock(widths[0], activation) for _ in range(blocks)]
        layers.append(_act(activation))
        self.net = nn.Sequential(*layers, *upsampling(widths, out_channels, activation))

    def forward(self, z):
        return self.net(z)


class SpatialVAE(VAE):
    """`VAE` with a spatial latent; see the module docstring for the interface and value range.
    The loss (negative ELBO, KL summed over c, h, w) is the VAE's."""

    kind = KIND.name  # the bundle kind it exports to
    value_range = (-1.0, 1.0)

    def __init__(self, image_shape, likelihood: Likelihood, downsample: int = 8, latent_channels: int = 4,
                 channels=None, blocks: int = 1, activation: str = "silu"):
        nn.Module.__init__(self)
        image_shape = tuple(image_shape)
        if downsample not in DOWNSAMPLES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLES}, got {downsample!r}")
        stages = int(math.log2(downsample))
        channels = list(channels) if channels else [min(32 * 2 ** i, 256) for i in range(stages)]
        if len(channels) != stages:
            raise ValueError(f"downsample {downsample} takes {stages} stride-2 stages, so {stages} channel widths; "
                             f"got {channels}")
        if len(image_shape) != 3 or image_shape[0] not in (1, 3):
            raise ValueError(f"expected image_shape (C, H, W) with C 1 or 3, got {image_shape}")
        if image_shape[1] % downsample or image_shape[2] % downsample:
            raise ValueError(f"image height and width must be multiples of downsample {downsample}, got "
                             f"{image_shape[1]}x{image_shape[2]} (pass --image-size to resize)")
        if likelihood.kind == "bernoulli":
            raise ValueError("a spatial VAE works in [-1, 1]: use a gaussian or laplace likelihood, not bernoulli")
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {latent_channels!r}")
        self.image_shape, self.likelihood = image_shape, likelihood
        self.downsample, self.latent_channels = downsample, latent_channels
        self.encoder = SpatialEncoder(image_shape[0], latent_channels, channels, blocks, activation)
        self.decoder = SpatialDecoder(image_shape[0], latent_channels, channels, blocks, activation)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """One image's latent at the training size: (c, H / f, W / f)."""
        return (self.latent_channels, self.image_shape[1] // self.downsample, self.image_shape[2] // self.downsample)

    def loss(self, x, target, beta: float, generator: torch.Generator | None = None, eps: torch.Tensor | None = None,
             samples: int = 1):
        """`VAE.loss` of [0, 1] images, seen by the model in [-1, 1]."""
        return super().loss(2 * x - 1, 2 * target - 1, beta, generator, eps, samples)

    def _to_unit(self, params):
        return (self.likelihood.mean(params, self.value_range) + 1) / 2

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None):
        """n images from the prior at the training size, in [0, 1]."""
        z = torch.randn((n, *self.latent_shape), generator=generator, device=next(self.parameters()).device)
        return self._to_unit(self.decoder(z))

    @torch.no_grad()
    def reconstruct(self, x):
        """decode(encode(x).mean) of [0, 1] images, in [0, 1]."""
        return self._to_unit(self.decoder(self.encoder(2 * x - 1)[0]))


def build_spatial_vae(image_shape, likelihood: Likelihood, **args) -> SpatialVAE:
    """`SpatialVAE` from JSON constructor arguments: downsample (f: 2, 4, 8 or 16), latent_channels
    (c), channels (one width per stride-2 stage, log2 f of them; default 32, 64, 128, ...),
    blocks (residual blocks at the latent resolution), activation."""
    return SpatialVAE(image_shape, likelihood, **args)


ARCHITECTURES["spatial-conv-vae"] = build_spatial_vae

__all__ = ["SpatialVAE", "SpatialEncoder", "SpatialDecoder", "build_spatial_vae"]
