"""The model kinds a bundle can hold, one registry entry each.

A `Kind` owns everything that differs between kinds: its manifest's latent slot, its graph specs
(and so its input/output names), the bounds of its integer inputs (for example inputs), its
runtime class and its export module. The runtime (`vaeinfer.load`, `manifest.parse`), export and
the CLI look a kind up here instead of comparing kind strings.

Adding a kind: one module here that calls `register(Kind(...))` (and its import below), one
runtime module (the class `runtime` names) and one export module (`export_module`, with
`export_run(model, meta, run_dir, out_dir, name, training)`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from vaeinfer.errors import BundleError

REGISTRY: dict[str, "Kind"] = {}


@dataclass(frozen=True)
class Kind:
    name: str  # the manifest's `kind`
    runtime: str  # "module:Class" of the runtime class, imported on first use (keeps `load` light)
    export_module: str  # module with `export_run(...)`, imported by export only (it needs torch)
    parse_latent: Callable[[dict], dict]  # manifest `latent` -> normalised dict; BundleError if bad
    graphs: Callable[[object], dict]  # Manifest -> {role: GraphSpec}
    int_limits: Callable[[object], dict]  # Manifest -> {int64 input name: exclusive upper bound}
    latent_keys: tuple[str, ...]  # names of the decoder's input among `encode`'s results (npz keys, columns), in order
    # (Manifest, encoder outputs, labels | None, rng) -> {role: feeds} of the other graphs, as real
    # images drive them (export's variant calibration and checks)
    feeds_from_encoder: Callable[..., dict]
    sample_options: tuple[str, ...] = ()  # keyword options of the runtime's `sample` beyond the common ones
    scorable: bool = False  # has `score` (an ELBO): a Gaussian latent with an encoder posterior
    prior_slot: bool = False  # the manifest may carry `prior` (and a prior graph)
    latent_prior_slot: bool = False  # the manifest may carry `latent_prior` (a learned mixture, vaeinfer.latent_prior)
    channels: tuple[int, ...] = (1, 3)  # the image channel counts the kind takes
    likelihoods: tuple[str, ...] = ("bernoulli", "gaussian")
    scale_optional: bool = False  # a Gaussian/Laplace likelihood may state no scale (then: no score)
    # (manifest image slot, (C, H, W), parsed latent) -> more facts merged into the parsed latent
    parse_image: Callable[[dict, tuple, dict], dict] | None = None

    def runtime_class(self) -> type:
        module, _, cls = self.runtime.partition(":")
        return getattr(importlib.import_module(module), cls)


def register(kind: Kind) -> Kind:
    REGISTRY[kind.name] = kind
    return kind


def get(name: str) -> Kind:
    """The registered kind called `name`; BundleError naming the known kinds otherwise."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise BundleError(f"manifest: expected kind in {names()}, got {name!r:.40}")
    return REGISTRY[name]


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


from vaeinfer.kinds import spatial_vae, vae, vqvae  # noqa: E402,F401  (each registers itself)
