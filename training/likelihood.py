"""Observation models p(x|z): Bernoulli (decoder gives logits), Gaussian (decoder gives the mean) and
Laplace (decoder gives the location: an L1 reconstruction loss with a proper density).

The same formulas, in numpy, live in `vaeinfer.likelihood`, so that scores computed by the
runtime from the exported decoder equal the ones computed here (a test checks it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

KINDS = ("bernoulli", "gaussian", "laplace")
SCALED = ("gaussian", "laplace")


@dataclass(frozen=True)
class Likelihood:
    kind: str = "bernoulli"
    scale: float | None = None  # the Gaussian's fixed standard deviation, the Laplace's fixed scale b

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"likelihood must be one of {KINDS}, got {self.kind!r}")
        if self.kind in SCALED and not (self.scale and self.scale > 0):
            raise ValueError(f"a {self.kind} likelihood needs a positive scale, got {self.scale!r}")
        if self.kind == "bernoulli" and self.scale is not None:
            raise ValueError("a bernoulli likelihood takes no scale")

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over pixels, one value per image (nats)."""
        if self.kind == "bernoulli":
            # from the logits, never from clipped probabilities
            lp = -F.binary_cross_entropy_with_logits(params, x, reduction="none")
        elif self.kind == "laplace":
            lp = -(x - params).abs() / self.scale - math.log(2 * self.scale)
        else:
            lp = -0.5 * ((x - params) / self.scale) ** 2 - math.log(self.scale) - 0.5 * math.log(2 * math.pi)
        return lp.flatten(1).sum(dim=1)

    def mean(self, params: torch.Tensor, value_range=(0.0, 1.0)) -> torch.Tensor:
        """The image shown for decoder output `params`: E[x|z] (the Gaussian's mean, the Laplace's
        location), clipped to the value range."""
        return torch.sigmoid(params) if self.kind == "bernoulli" else params.clamp(*value_range)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict) -> "Likelihood":
        return cls(kind=data["kind"], scale=data.get("scale"))
