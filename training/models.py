"""VAE architectures: an MLP VAE and a convolutional VAE, for any image size and 1 or 3 channels.

Every model is a `VAE` made of two plain modules, which is also the interface that
`export` accepts for a user's own models:

- ``encoder(x) -> (mean, logvar)``: x is (N, C, H, W) float32 in [0, 1], mean and logvar (N, Z);
- ``decoder(z) -> params``: z is (N, Z), params (N, C, H, W) are the likelihood's parameters
  (Bernoulli logits, or the Gaussian mean whose fixed scale is stored beside the model).

The constructor arguments of each architecture are plain JSON data, saved in the checkpoint, so
that `build_model(arch, args)` rebuilds the very same network for export.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vaeinfer.kinds.vae import KIND
from vaeinfer.training.likelihood import Likelihood
from vaeinfer.training.latent_prior import LOG_2PI, build_prior

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "elu": nn.ELU, "silu": nn.SiLU}


def _act(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


class MLPEncoder(nn.Module):
    def __init__(self, image_shape, latent_dim, hidden, activation):
        super().__init__()
        layers, width = [nn.Flatten()], math.prod(image_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), _act(activation)]
            width = h
        layers.append(nn.Linear(width, 2 * latent_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        mean, logvar = self.net(x).chunk(2, dim=1)
        return mean, logvar


class MLPDecoder(nn.Module):
    def __init__(self, image_shape, latent_dim, hidden, activation):
        super().__init__()
        layers, width = [], latent_dim
        for h in reversed(hidden):
            layers += [nn.Linear(width, h), _act(activation)]
            width = h
        layers += [nn.Linear(width, math.prod(image_shape)), nn.Unflatten(1, tuple(image_shape))]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class ResBlock(nn.Module):
    """Pre-activation residual block; keeps resolution and width."""

    def __init__(self, width, activation):
        super().__init__()
        self.body = nn.Sequential(
            _act(activation), nn.Conv2d(width, width, 3, padding=1), _act(activation), nn.Conv2d(width, width, 1)
        )

    def forward(self, x):
        return x + self.body(x)


def _down_size(n: int, times: int) -> int:
    for _ in range(times):
        n = (n + 1) // 2  # a stride-2 3x3 conv with padding 1
    return n


class ConvEncoder(nn.Module):
    """Stride-2 3x3 convolutions down to (H/2^k, W/2^k), residual blocks, then a linear head."""

    def __init__(self, image_shape, latent_dim, channels, blocks, activation):
        super().__init__()
        c_in, h, w = image_shape
        layers = []
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), _act(activation)]
            c_in = c
        layers += [ResBlock(c_in, activation) for _ in range(blocks)]
        if blocks:
            layers.append(_act(activation))
        self.features = nn.Sequential(*layers)
        hk, wk = _down_size(h, len(channels)), _down_size(w, len(channels))
        self.head = nn.Linear(c_in * hk * wk, 2 * latent_dim)

    def forward(self, x):
        mean, logvar = self.head(self.features(x).flatten(1)).chunk(2, dim=1)
        return mean, logvar


class ConvDecoder(nn.Module):
    """Linear to a small grid, residual blocks, then (nearest 2x upsample + 3x3 conv) stages.

    Upsample + conv rather than transposed convolution: it runs at about twice the fraction of
    the matmul peak in onnxruntime on CPU and has no checkerboard artefacts. A final crop
    makes any H, W (not only multiples of 2^k) exact.
    """

    def __init__(self, image_shape, latent_dim, channels, blocks, activation):
        super().__init__()
        c_out, self.height, self.width = image_shape
        widths = list(reversed(channels))
        hk, wk = _down_size(self.height, len(channels)), _down_size(self.width, len(channels))
        self.grid = (widths[0], hk, wk)
        self.fc = nn.Sequential(nn.Linear(latent_dim, math.prod(self.grid)), _act(activation))
        layers = [ResBlock(widths[0], activation) for _ in range(blocks)]
        if blocks:
            layers.append(_act(activation))
        self.net = nn.Sequential(*layers, *upsampling(widths, c_out, activation))

    def forward(self, z):
        x = self.net(self.fc(z).unflatten(1, self.grid))
        return x[:, :, : self.height, : self.width]


def upsampling(widths, c_out: int, activation: str) -> list[nn.Module]:
    """(nearest 2x upsample + 3x3 conv + activation) per width, then a 3x3 conv to c_out channels."""
    layers = []
    for i, c in enumerate(widths):
        nxt = widths[i + 1] if i + 1 < len(widths) else widths[-1]
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, nxt, 3, padding=1), _act(activation)]
    return layers + [nn.Conv2d(widths[-1], c_out, 3, padding=1)]


class VAE(nn.Module):
    """An encoder/decoder pair plus its likelihood; `loss` is the (beta-weighted) negative ELBO."""

    kind = KIND.name  # the bundle kind it exports to
    draws_eps = True  # `loss` takes the reparameterisation noise as `eps` (data-parallel training draws it)
    loss_is_negative_elbo = True  # at beta = 1 (validation reports the ELBO)
    supports_iwae = True  # `loss` takes samples=K (the importance-weighted bound)
    autocast_dtype: torch.dtype | None = None  # set by training's bf16 mode: the networks' dtype in `loss`

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: Likelihood, image_shape,
                 prior: str = "normal", prior_components: int = 0):
        super().__init__()
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim_of(encoder, self.image_shape)
        self.prior = build_prior(prior, prior_components, self.image_shape, self.latent_dim)  # None: N(0, I)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One image's latent: (latent_dim,) here, (c, h, w) for `vaeinfer.training.spatial_vae.SpatialVAE`."""
        return (self.latent_dim,)

    def loss(self, x, target, beta: float, generator: torch.Generator | None = None, eps: torch.Tensor | None = None,
             samples: int = 1):
        """Per-batch means of loss, recon (-log p(x|z)) and kl, in nats per image.

        `x` is what the encoder sees and `target` what the decoder must explain (they differ
        with dynamic binarization). `eps`, the reparameterisation noise (N, *latent), or
        (N, samples, *latent) with several samples, is drawn from `generator` when not given
        (data-parallel training passes each rank its rows of the global batch's noise). The KL
        is summed over every latent axis (a spatial latent's c, h and w too).

        `samples` = K > 1 trains on the importance-weighted bound (IWAE, Burda et al. 2015):
        loss = -log mean_k exp(log p(x|z_k) - beta * (log q(z_k|x) - log p(z_k))), which is the
        negative K-sample IWAE bound at beta = 1 (tighter than the ELBO, and what `score`
        estimates with many more samples); recon and kl are then means over the K samples.
        """
        if samples > 1:
            return self._iwae_loss(x, target, beta, generator, eps, samples)
        mean, logvar = self._encode(x)
        if eps is None:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * eps
        recon = -self.likelihood.log_prob(target, self._decode(z))
        prior = getattr(self, "prior", None)  # subclasses such as SpatialVAE have none
        if prior is None:
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)
        else:  # no closed form: the single-sample estimate log q(z|x) - log p(z)
            log_q = -0.5 * (eps.pow(2) + logvar + LOG_2PI).sum(dim=1)
            kl = log_q - prior.log_prob(z, self._encode)
        return {"loss": (recon + beta * kl).mean(), "recon": recon.mean(), "kl": kl.mean()}

    def _networks(self, module: nn.Module, x: torch.Tensor):
        """module(x), under bf16 autocast in training's bf16 mode, with float32 outputs: only the
        convolutions and matmuls run in bf16; every likelihood, KL and prior term stays float32."""
        if self.autocast_dtype is None:
            return module(x)
        with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
            out = module(x)
        return tuple(t.float() for t in out) if isinstance(out, tuple) else out.float()

    def _encode(self, x):
        return self._networks(self.encoder, x)

    def _decode(self, z):
        return self._networks(self.decoder, z)

    def _iwae_loss(self, x, target, beta, generator, eps, samples: int):
        mean, logvar = self._encode(x)
        n, k = mean.shape[0], samples
        if eps is None:
            eps = torch.randn((n, k, *mean.shape[1:]), generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps  # (N, K, *latent)
        flat = z.flatten(0, 1)
        recon = -self.likelihood.log_prob(target.repeat_interleave(k, dim=0), self._decode(flat)).view(n, k)
        log_q = -0.5 * (eps.pow(2) + logvar.unsqueeze(1) + LOG_2PI).flatten(2).sum(dim=2)
        prior = getattr(self, "prior", None)
        if prior is None:
            log_p = -0.5 * (z.pow(2) + LOG_2PI).flatten(2).sum(dim=2)
        else:
            log_p = prior.log_prob(flat, self._encode).view(n, k)
        kl = log_q - log_p
        bound = torch.logsumexp(-recon - beta * kl, dim=1) - math.log(k)
        return {"loss": -bound.mean(), "recon": recon.mean(), "kl": kl.mean()}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None):
        """n images from the prior, as likelihood means in [0, 1]."""
        if self.prior is not None:
            z = self.prior.sample(n, self.encoder, generator)
        else:
            z = torch.randn((n, self.latent_dim), generator=generator, device=next(self.parameters()).device)
        return self.likelihood.mean(self.decoder(z))


def build_mlp_vae(image_shape, latent_dim=32, hidden=(512, 256), activation="relu"):
    return MLPEncoder(image_shape, latent_dim, hidden, activation), MLPDecoder(image_shape, latent_dim, hidden, activation)


def build_conv_vae(image_shape, latent_dim=32, channels=(32, 64), blocks=0, activation="relu"):
    return (
        ConvEncoder(image_shape, latent_dim, channels, blocks, activation),
        ConvDecoder(image_shape, latent_dim, channels, blocks, activation),
    )


def _vae(builder):
    def build(image_shape, likelihood, prior="normal", prior_components=0, **args):
        encoder, decoder = builder(tuple(image_shape), **args)
        return VAE(encoder, decoder, likelihood, image_shape, prior, prior_components)

    return build


# arch name -> build(image_shape, likelihood, **constructor_args) -> a module with .loss();
# each architecture module adds its own when imported (see the imports at the end).
ARCHITECTURES = {"mlp-vae": _vae(build_mlp_vae), "conv-vae": _vae(build_conv_vae)}


def build_model(arch: str, image_shape, likelihood: Likelihood, **args) -> nn.Module:
    """Rebuild a model from its architecture name and JSON constructor arguments."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](tuple(image_shape), likelihood, **args)


def latent_dim_of(encoder: nn.Module, image_shape) -> int:
    """The latent size a user's encoder produces, found by running it once on zeros."""
    with torch.no_grad():
        out = encoder(torch.zeros((2, *image_shape)))
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(torch.is_tensor(t) and t.ndim == 2 for t in out)):
        got = type(out).__name__ if not isinstance(out, (tuple, list)) else f"{len(out)} outputs"
        raise ValueError(f"the encoder must return (mean, logvar), each of shape (N, latent); got {got}")
    return int(out[0].shape[1])


def kl_weight(step: int, warmup_steps: int, beta: float) -> float:
    """Linear KL warm-up from 0 to beta over `warmup_steps` optimizer steps."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


__all__ = ["VAE", "build_model", "ARCHITECTURES", "latent_dim_of", "kl_weight"]


from vaeinfer.training import spatial_vae, vqvae  # noqa: F401  (each registers its architectures)
