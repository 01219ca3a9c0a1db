"""The VQ-VAE (van den Oord et al. 2017): a convolutional encoder to a grid of D-vectors, a
`VectorQuantizer`, and a convolutional decoder that gives the same likelihood parameters as the VAE.

Importing this module registers the architecture "vqvae" in `training.models.ARCHITECTURES`.
For export the model offers two plain modules, like the VAE's `encoder` and `decoder`:

- ``encoder(x) -> (codes, z_q)``: x (N, C, H, W) float32 in [0, 1]; codes (N, h, w) int64,
  z_q (N, D, h, w) float32 (the chosen codes' vectors);
- ``decoder(codes) -> params``: codes (N, h, w) int64; params (N, C, H, W) float32 are the
  likelihood's parameters. The codebook lookup is inside the decoder, so
  ``decoder(encoder(x)[0])`` is the model's own reconstruction.

Both are views made on access over the model's registered parts (`encoder_net`, `quantizer`,
`decoder_net`), so that the shared codebook is stored once in the state dict (safetensors refuses
tensors that share memory).
"""

from __future__ import annotations

import torch
from torch import nn

from vaeinfer.kinds.vqvae import KIND
from vaeinfer.training.likelihood import Likelihood
from vaeinfer.training.models import ARCHITECTURES, ResBlock, _act, _down_size, upsampling
from vaeinfer.training.quantizer import Quantized, VectorQuantizer


class VQEncoderNet(nn.Module):
    """Stride-2 3x3 convolutions (one per entry of `channels`), residual blocks, a 1x1 conv to D."""

    def __init__(self, image_shape, code_dim, channels, blocks, activation):
        super().__init__()
        c_in = image_shape[0]
        layers = []
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), _act(activation)]
            c_in = c
        layers += [ResBlock(c_in, activation) for _ in range(blocks)]
        layers += [_act(activation), nn.Conv2d(c_in, code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class VQDecoderNet(nn.Module):
    """A 3x3 conv from D, residual blocks, (nearest 2x upsample + 3x3 conv) stages, a crop to H, W.

    The same upsampling choice as `training.models.ConvDecoder`, for the same reasons.
    """

    def __init__(self, image_shape, code_dim, channels, blocks, activation):
        super().__init__()
        c_out, self.height, self.width = image_shape
        widths = list(reversed(channels))
        layers = [nn.Conv2d(code_dim, widths[0], 3, padding=1)]
        layers += [ResBlock(widths[0], activation) for _ in range(blocks)]
        layers.append(_act(activation))
        self.net = nn.Sequential(*layers, *upsampling(widths, c_out, activation))

    def forward(self, z_q):
        return self.net(z_q)[:, :, : self.height, : self.width]


class VQEncoder(nn.Module):
    """Export view: x (N, C, H, W) float32 -> (codes (N, h, w) int64, z_q (N, D, h, w) float32)."""

    def __init__(self, net: VQEncoderNet, quantizer: VectorQuantizer):
        super().__init__()
        self.net, self.quantizer = net, quantizer

    def forward(self, x):
        codes = self.quantizer.nearest(self.net(x))
        return codes, self.quantizer.lookup(codes)


class VQDecoder(nn.Module):
    """Export view: codes (N, h, w) int64 -> likelihood parameters (N, C, H, W) float32."""

    def __init__(self, quantizer: VectorQuantizer, net: VQDecoderNet):
        super().__init__()
        self.quantizer, self.net = quantizer, net

    def forward(self, codes):
        return self.net(self.quantizer.lookup(codes))


class VQVAE(nn.Module):
    """Encoder net, vector quantizer and decoder net, with the likelihood of `training.likelihood`.

    See `build_vqvae` for the constructor arguments saved in checkpoints.
    """

    kind = KIND.name  # the bundle kind it exports to
    draws_eps = False  # no reparameterisation noise
    loss_is_negative_elbo = False  # recon + VQ loss
    encodes_to_codes = True  # the encoder gives code grids, which a learned prior (vaeinfer.training.pixelcnn_prior) models

    def __init__(self, image_shape, likelihood: Likelihood, codebook_size=512, code_dim=64, channels=(64, 128),
                 blocks=2, activation="relu", commitment=0.25, ema=True, decay=0.99, dead_code_threshold=100,
                 restart_dead_codes=True, kmeans_init=False):
        super().__init__()
        image_shape = tuple(image_shape)
        if len(image_shape) != 3 or image_shape[0] not in (1, 3):
            raise ValueError(f"expected image_shape (C, H, W) with C 1 or 3, got {image_shape}")
        if not channels:
            raise ValueError("channels must name at least one downsampling stage, got an empty list")
        self.image_shape, self.likelihood = image_shape, likelihood
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.grid = (_down_size(image_shape[1], len(channels)), _down_size(image_shape[2], len(channels)))
        self.encoder_net = VQEncoderNet(image_shape, code_dim, channels, blocks, activation)
        self.quantizer = VectorQuantizer(codebook_size, code_dim, commitment=commitment, ema=ema, decay=decay,
                                         dead_code_threshold=dead_code_threshold,
                                         restart_dead_codes=restart_dead_codes, kmeans_init=kmeans_init)
        self.decoder_net = VQDecoderNet(image_shape, code_dim, channels, blocks, activation)

    @property
    def encoder(self) -> VQEncoder:
        """The export view x -> (codes, z_q); shares this model's weights."""
        return VQEncoder(self.encoder_net, self.quantizer)

    @property
    def decoder(self) -> VQDecoder:
        """The export view codes -> likelihood parameters; shares this model's weights."""
        return VQDecoder(self.quantizer, self.decoder_net)

    def forward(self, x, generator: torch.Generator | None = None) -> tuple[torch.Tensor, Quantized]:
        """The training path: (likelihood params (N, C, H, W), the quantizer's `Quantized`).

        In training mode the quantizer updates its codebook (EMA, restarts); in eval mode the
        params equal ``decoder(encoder(x)[0])`` exactly.
        """
        q = self.quantizer(self.encoder_net(x), generator)
        return self.decoder_net(q.z_q), q

    def loss(self, x, target, beta: float = 1.0, generator: torch.Generator | None = None):
        """Per-batch means: loss = recon + vq_loss, recon = -log p(target|z_q) in nats per image.

        `beta` is accepted for the training loop's sake and ignored (a VQ-VAE has no KL term).
        Also returns the codebook's health: perplexity, usage (fraction of codes used), dead_codes.
        """
        params, q = self(x, generator)
        recon = -self.likelihood.log_prob(target, params).mean()
        return {"loss": recon + q.loss, "recon": recon, "vq_loss": q.loss, "perplexity": q.perplexity,
                "usage": q.usage, "dead_codes": q.dead_codes}

    @torch.no_grad()
    def reconstruct(self, x):
        """Reconstructions of x as likelihood means in [0, 1], through the export views."""
        return self.likelihood.mean(self.decoder(self.encoder(x)[0]))


def build_vqvae(image_shape, likelihood: Likelihood, **args) -> VQVAE:
    """`VQVAE` from JSON constructor arguments: codebook_size (K), code_dim (D), channels (one
    stride-2 stage each: 2 stages make 28x28 a 7x7 grid), blocks, activation, commitment, ema,
    decay, dead_code_threshold, restart_dead_codes, kmeans_init."""
    return VQVAE(image_shape, likelihood, **args)


ARCHITECTURES["vqvae"] = build_vqvae

__all__ = ["VQVAE", "VQEncoder", "VQDecoder", "build_vqvae"]
