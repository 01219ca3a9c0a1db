"""The model kinds a bundle can hold, one registry entry each.

A `Kind` owns everything that differs between kinds: its manifest's latent and prior slots, its
graph specs (and so its input/output names and roles), the bounds of its integer inputs (for
example inputs), its capabilities and its runtime class. The runtime (`vaeinfer.load`,
`manifest.parse`), export, the CLI and the server look a kind up here instead of comparing kind
strings (tests/test_kind_registry.py greps for such comparisons).

Adding a kind, each part registered where it is defined:
- a module here that calls `register(Kind(...))` (and its import below);
- its runtime module, the class that the Kind's `runtime_class()` returns;
- its export module, which calls `vaeinfer.export.register(kind name, export_run, variant_errors)`
  (and its import at the end of export/__init__.py);
- to train it (optional): its training module adds its builders to `training.models.ARCHITECTURES`
  (and its import at the end of training/models.py; `vaeinfer train --arch` offers the names in
  `training.TRAIN_ARCHS`);
- manifest.schema.json, the same contract for other tools, lists the kind and its latent slot;
- tests/test_kind_registry.py's KIND_MODULES names the new modules.

The runtime class is reached through a function of the kind module that imports it
(`runtime_class`) rather than registered by the runtime module itself: a runtime module imports
onnxruntime, and `import vaeinfer` (which imports this registry to parse manifests) must not;
a function holds a real import, not a module-name string, and runs on the first `load` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from vaeinfer.errors import BundleError

REGISTRY: dict[str, "Kind"] = {}


@dataclass(frozen=True)
class Kind:
    name: str  # the manifest's `kind`
    runtime_class: Callable[[], type]  # () -> the runtime class, imported on first use (see above)
    parse_latent: Callable[[dict], dict]  # manifest `latent` -> normalised dict; BundleError if bad
    graphs: Callable[[object], dict]  # Manifest -> {role: GraphSpec}; its roles are the graphs a bundle must have
    int_limits: Callable[[object], dict]  # Manifest -> {int64 input name: exclusive upper bound}
    latent_keys: tuple[str, ...]  # names of the decoder's input among `encode`'s results (npz keys, columns), in order
    # (Manifest, encoder outputs, labels | None, rng) -> {role: feeds} of the other graphs, as real
    # images drive them (export's variant calibration and checks)
    feeds_from_encoder: Callable[..., dict]
    sample_options: tuple[str, ...] = ()  # keyword options of the runtime's `sample` beyond the common ones
    scorable: bool = False  # has `score` (an ELBO): a Gaussian latent with an encoder posterior
    manifold: bool = False  # a flat continuous latent (N, Z): `manifold` / `traverse` walk its dimensions
    # the manifest's `prior` slot -> its normalised dict (BundleError if bad); None: the kind has no prior slot
    parse_prior: Callable[[dict], dict] | None = None
    latent_prior_slot: bool = False  # the manifest may carry `latent_prior` (a learned mixture, vaeinfer.latent_prior)
    channels: tuple[int, ...] = (1, 3)  # the image channel counts the kind takes
    likelihoods: tuple[str, ...] = ("bernoulli", "gaussian")
    scale_optional: bool = False  # a Gaussian/Laplace likelihood may state no scale (then: no score)
    # (manifest image slot, (C, H, W), parsed latent) -> more facts merged into the parsed latent
    parse_image: Callable[[dict, tuple, dict], dict] | None = None
    # (Manifest, GraphSpec, rows, seed) -> {input name: array}: seeded inputs like the ones the graph
    # meets in use (precision="auto" measures its errors on them); None: spec.example_inputs
    example_feeds: Callable[..., dict] | None = None
    # role -> the roles whose graphs run with it (`vaeinfer.load(roles=...)` loads them together):
    # a video VAE's decoder with its first step's graph, a VQ-VAE's prior with its cached graphs
    companions: dict = field(default_factory=dict)


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


from vaeinfer.kinds import spatial_vae, vae, video_vae, vqvae  # noqa: E402,F401  (each registers itself)
