"""Learned priors p(z) for VAEs: a VampPrior and a mixture of Gaussians.

Both are diagonal Gaussian mixtures, which is also how they are exported (`mixture` gives
log-weights (K,), means (K, Z), logvars (K, Z)):

- `VampPrior` (Tomczak & Welling 2018): p(z) = mean_k q(z | u_k), K learned pseudo-inputs u_k
  passed through the VAE's own encoder (so the prior moves with the encoder);
- `MoGPrior`: K learned diagonal Gaussians with learned weights.

The encoder is passed to each call rather than held, so that its weights are stored once in
the VAE's state dict (safetensors refuses tensors that share memory under two names).
"""

from __future__ import annotations

import math

import torch
from torch import nn

PRIORS = ("normal", "vamp", "mog")
LOG_2PI = math.log(2 * math.pi)


def mixture_log_prob(z: torch.Tensor, log_weights: torch.Tensor, means: torch.Tensor, logvars: torch.Tensor):
    """log sum_k w_k N(z; m_k, diag(exp(logvar_k))) for z of shape (..., Z) -> (...)."""
    diff = z.unsqueeze(-2) - means  # (..., K, Z)
    log_n = -0.5 * (diff.pow(2) * torch.exp(-logvars) + logvars + LOG_2PI).sum(-1)
    return torch.logsumexp(log_n + log_weights, dim=-1)


class MixturePrior(nn.Module):
    """A diagonal Gaussian mixture prior; subclasses say how its components are made."""

    def mixture(self, encoder: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor, encoder: nn.Module) -> torch.Tensor:
        return mixture_log_prob(z, *self.mixture(encoder))

    @torch.no_grad()
    def sample(self, n: int, encoder: nn.Module, generator: torch.Generator | None = None) -> torch.Tensor:
        log_w, means, logvars = self.mixture(encoder)
        k = torch.multinomial(log_w.exp(), n, replacement=True, generator=generator)
        eps = torch.randn((n, means.shape[1]), generator=generator, device=means.device)
        return means[k] + torch.exp(0.5 * logvars[k]) * eps


class VampPrior(MixturePrior):
    """Pseudo-inputs in pixel space, clipped to [0, 1] (the paper's hard-tanh), equal weights."""

    source = "vamp"

    def __init__(self, components: int, image_shape):
        super().__init__()
        self.pseudo_inputs = nn.Parameter(torch.rand((components, *image_shape)))

    def mixture(self, encoder):
        means, logvars = encoder(self.pseudo_inputs.clamp(0.0, 1.0))
        k = means.shape[0]
        return torch.full((k,), -math.log(k), device=means.device, dtype=means.dtype), means, logvars

    @torch.no_grad()
    def init_from_images(self, images: torch.Tensor, generator: torch.Generator) -> None:
        """Start the pseudo-inputs at random training images (more useful than noise)."""
        index = torch.randint(0, len(images), (len(self.pseudo_inputs),), generator=generator)
        self.pseudo_inputs.copy_(images[index].to(self.pseudo_inputs))


class MoGPrior(MixturePrior):
    """Means drawn from N(0, I), unit variances and equal weights at the start."""

    source = "mog"

    def __init__(self, components: int, latent_dim: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(components))
        self.means = nn.Parameter(torch.randn(components, latent_dim))
        self.logvars = nn.Parameter(torch.zeros(components, latent_dim))

    def mixture(self, encoder=None):
        return torch.log_softmax(self.logits, dim=0), self.means, self.logvars


def build_prior(kind: str, components: int, image_shape, latent_dim: int) -> MixturePrior | None:
    """The prior module for `kind` ("normal": None, the closed-form standard normal)."""
    if kind not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {kind!r}")
    if kind == "normal":
        return None
    if components < 1:
        raise ValueError(f"a {kind} prior needs at least 1 component, got {components}")
    return VampPrior(components, image_shape) if kind == "vamp" else MoGPrior(components, latent_dim)


def warm_start(model: nn.Module, init_from: str | None, images: torch.Tensor, seed: int) -> None:
    """Before a fresh run's first step: load the model weights of `init_from` (a run folder or
    checkpoint JSON; its optimizer and progress are ignored). Its prior comes along when it is
    the same kind and size as this model's (fine-tuning a VampPrior model, e.g. with IWAE, keeps
    its pseudo-inputs); otherwise a VampPrior's pseudo-inputs start at random training images."""
    prior = getattr(model, "prior", None)
    prior_loaded = False
    if init_from:
        from vaeinfer.training import checkpoint

        tensors, _ = checkpoint.load(init_from)
        source = checkpoint.model_tensors(tensors)
        own = model.state_dict()
        prior_keys = {k for k in own if k.startswith("prior.")}
        source_prior = {k for k in source if k.startswith("prior.")}
        prior_loaded = bool(prior_keys) and prior_keys == source_prior and all(
            source[k].shape == own[k].shape for k in prior_keys)
        weights = {k: v for k, v in source.items() if prior_loaded or not k.startswith("prior.")}
        try:
            missing, unexpected = model.load_state_dict(weights, strict=False)
        except RuntimeError as e:  # a tensor of another shape
            raise ValueError(f"--init-from {init_from}: its weights do not fit this model ({e})") from None
        missing = [k for k in missing if not k.startswith("prior.")]
        if missing or unexpected:
            raise ValueError(f"--init-from {init_from}: its weights do not fit this model "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    if isinstance(prior, VampPrior) and not prior_loaded:
        prior.init_from_images(images, torch.Generator().manual_seed(seed + 11))


def export_mixture(model: nn.Module) -> dict | None:
    """The model's prior as float64 numpy arrays (log_weights, means, logvars), or None for N(0, I).
    A VampPrior's pseudo-input posteriors are computed here, once."""
    prior = getattr(model, "prior", None)
    if prior is None:
        return None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        log_w, means, logvars = prior.mixture(model.encoder)
    model.train(was_training)
    log_w, means, logvars = (t.detach().double().cpu().numpy() for t in (log_w, means, logvars))
    return {"source": prior.source, "log_weights": log_w,
            "means": means, "logvars": logvars}
