"""manifest.json: the contract between the torch side and the runtime.

`parse` checks a manifest's structure by hand (the runtime carries no jsonschema dependency;
`manifest.schema.json` beside this file is the same contract for other tools, and the tests keep
the two in agreement) and returns a frozen `Manifest`.

Versioning: `format_version` is "MAJOR.MINOR". A reader refuses an unknown MAJOR and reads any
MINOR of a MAJOR it knows (a newer MINOR only adds optional fields).
  1.0: kinds "vae" and "vqvae", graph shapes of fixed sizes after the batch axis.
  1.1: kinds come from the registry (vaeinfer.kinds); a graph's shape may name symbolic axes
       (e.g. "height") besides "batch". Every 1.0 bundle is a valid 1.1 bundle.
  1.2: a VQ-VAE's optional cached prior graphs (prior.cache, graphs.prior_row / prior_step;
       vaeinfer.prior_sampling). Without them a bundle samples through the full prior graph.
  1.3: a spatial VAE's optional exact-tiling stage graphs (the `exact_tiling` slot); kind
       "video-vae", whose step graphs may be split at the mid-block (latent.decoder_hidden and
       the other split fields, all or none: vaeinfer.kinds.video_vae) so that frames run in tiles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vaeinfer import exact_tiling, latent_prior, precisions
from vaeinfer.errors import BundleError
from vaeinfer import kinds
from vaeinfer.manifest_fields import finite as _finite, get as _get, positive as _positive
from vaeinfer.spec import GraphSpec

FORMAT = "vaeinfer-bundle"
FORMAT_VERSION = "1.3"
SUPPORTED_MAJOR = 1
LIKELIHOODS = ("bernoulli", "gaussian", "laplace")  # laplace: spatial-vae only (see vaeinfer.kinds)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FILE = re.compile(r"^[A-Za-z0-9_.-]+\.onnx$")


@dataclass(frozen=True)
class GraphFile:
    file: str
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    kind: str
    format_version: str
    image: tuple[int, int, int]  # (C, H, W)
    value_range: tuple[float, float]
    latent: dict  # parsed by the kind (vaeinfer.kinds): VAE {"dim"}; VQ {"grid", "codebook_size", "code_dim"}; ...
    likelihood: dict  # {"kind", "scale"?}
    graphs: dict[str, GraphFile]
    variants: dict[str, dict[str, GraphFile]]  # precision -> role -> file ({} for a computed precision)
    prior: dict | None  # parsed by the kind (Kind.parse_prior), for a kind with a prior slot; else None
    raw: dict = field(repr=False, compare=False)
    # vaeinfer.exact_tiling.parse_slot's result (spatial-vae, format 1.3), or None
    exact_tiling: dict | None = field(default=None, compare=False)

    def specs(self) -> dict[str, GraphSpec]:
        return kinds.get(self.kind).graphs(self)

    def files(self, precision: str = precisions.REFERENCE) -> dict[str, GraphFile]:
        """The graph files for a precision: a stored variant's own graphs over the fp32 ones; a
        computed precision's (bf16) are the graphs it is computed from."""
        row = precisions.get(precision)
        if row.computed_from is not None:
            return self.files(row.computed_from)
        if precision == precisions.REFERENCE:
            return {**self.stage_files(), **self.graphs}
        if precision not in self.variants:
            have = ", ".join([precisions.REFERENCE, *sorted(self.variants)])
            raise BundleError(f"bundle {self.name!r} has no {precision} variant; it has: {have}")
        return {**self.stage_files(), **self.graphs, **self.variants[precision]}

    def stage_files(self) -> dict[str, GraphFile]:
        """The exact tiling's stage graphs (fp32 in every precision), by their role names."""
        slot = self.exact_tiling or {}
        return {s.graph: GraphFile(s.file, s.sha256) for d in ("decoder", "encoder") if d in slot
                for s in slot[d].steps if s.graph is not None}


def _graph_file(data: dict, where: str) -> GraphFile:
    name, digest = _get(data, "file", str, where), _get(data, "sha256", str, where)
    if not _FILE.match(name):
        raise BundleError(f"manifest: expected {where}.file to be a plain '<name>.onnx' file name "
                          f"inside the bundle (letters, digits, '._-'), got {name!r}")
    if not _SHA256.match(digest):
        raise BundleError(f"manifest: expected {where}.sha256 to be 64 lowercase hex digits, got {digest!r:.80}")
    return GraphFile(name, digest)


def parse_version(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"([0-9]{1,9})\.([0-9]{1,9})", text)  # ASCII digits, bounded: int() of 5000 digits raises
    if not m:
        raise BundleError(f"manifest: expected format_version 'MAJOR.MINOR', got {text!r:.40}")
    return int(m[1]), int(m[2])


def parse(data: dict) -> Manifest:
    """Validate a manifest's structure and return it; every problem is a BundleError."""
    if not isinstance(data, dict):
        raise BundleError(f"manifest: expected a JSON object, got {type(data).__name__}")
    if _get(data, "format", str, "") != FORMAT:
        raise BundleError(f"manifest: expected format {FORMAT!r}, got {data['format']!r:.40}")
    version = _get(data, "format_version", str, "")
    major, _ = parse_version(version)
    if major != SUPPORTED_MAJOR:
        raise BundleError(f"manifest: format_version {version} has major {major}; this vaeinfer reads "
                          f"major {SUPPORTED_MAJOR} only (upgrade vaeinfer, or re-export the model)")
    kind = _get(data, "kind", str, "")
    entry = kinds.get(kind)
    image = _get(data, "image", dict, "")
    shape = tuple(_positive(image, k, "image", 4096) for k in ("channels", "height", "width"))
    if shape[0] not in entry.channels:
        raise BundleError(f"manifest: expected image.channels in {entry.channels} for a {kind} bundle, got {shape[0]}")
    lo_hi = _get(image, "range", list, "image")
    if len(lo_hi) != 2 or not all(_finite(v) for v in lo_hi) \
            or not lo_hi[0] < lo_hi[1]:
        raise BundleError(f"manifest: expected image.range [low, high] with low < high, got {lo_hi!r:.60}")
    latent_in = _get(data, "latent", dict, "")
    latent = entry.parse_latent(latent_in)
    if entry.parse_image is not None:
        latent = {**latent, **entry.parse_image(image, shape, latent)}
    lik = _get(data, "likelihood", dict, "")
    lik_kind = _get(lik, "kind", str, "likelihood")
    if lik_kind not in LIKELIHOODS:
        raise BundleError(f"manifest: expected likelihood.kind in {LIKELIHOODS}, got {lik_kind!r:.40}")
    if lik_kind not in entry.likelihoods:
        raise BundleError(f"manifest: a {kind} bundle takes likelihood.kind in {entry.likelihoods}, got {lik_kind!r}")
    likelihood = {"kind": lik_kind}
    if lik_kind in ("gaussian", "laplace") and not (entry.scale_optional and "scale" not in lik):
        scale = _get(lik, "scale", (int, float), "likelihood")
        if not (_finite(scale) and scale > 0):
            raise BundleError(f"manifest: expected a positive likelihood.scale, got {scale}")
        likelihood["scale"] = float(scale)

    prior = data.get("prior")
    if prior is not None:
        if entry.parse_prior is None:
            raise BundleError(f"manifest: a {kind} bundle cannot have a prior")
        prior = entry.parse_prior(prior)
    name = _get(data, "name", str, "")
    value_range = (float(lo_hi[0]), float(lo_hi[1]))
    # the graphs the kind's facts imply (its roles), before the manifest's graph files are read
    roles = tuple(Manifest(name=name, kind=kind, format_version=version, image=shape, value_range=value_range,
                           latent=latent, likelihood=likelihood, graphs={}, variants={}, prior=prior,
                           raw=data).specs())
    graphs_in = _get(data, "graphs", dict, "")
    if set(graphs_in) != set(roles):
        raise BundleError(f"manifest: expected graphs {sorted(roles)}, got {sorted(graphs_in)}")
    graphs = {role: _graph_file(graphs_in[role], f"graphs.{role}") for role in roles}
    variants = {}
    for precision, entry in _get(data, "variants", dict, "").items() if "variants" in data else ():
        if precision not in precisions.variant_names():
            raise BundleError(f"manifest: expected variants keyed by {precisions.variant_names()}, got {precision!r:.40}")
        row = precisions.get(precision)
        if not row.stored:  # a computed precision (bf16): its export validation only, no files
            source = _get(entry, "computed_from", str, f"variants.{precision}")
            if source != row.computed_from or "graphs" in entry:
                raise BundleError(f"manifest: expected variants.{precision} to be computed_from "
                                  f"{row.computed_from!r} with no graphs of its own, got {source!r:.40}")
            variants[precision] = {}
            continue
        files = _get(entry, "graphs", dict, f"variants.{precision}")
        if not files or not set(files) <= set(roles):
            raise BundleError(f"manifest: variants.{precision}.graphs must name some of {list(roles)}, got {sorted(files)}")
        variants[precision] = {role: _graph_file(files[role], f"variants.{precision}.graphs.{role}") for role in files}

    latent_prior.parse_slot(data.get(latent_prior.SLOT), kind)
    exact = exact_tiling.parse_slot(data.get(exact_tiling.SLOT))
    if exact is not None:
        clash = {g for d in exact_tiling.DIRECTIONS if d in exact for g in exact[d].graphs()} & set(roles)
        if clash:
            raise BundleError(f"manifest: exact_tiling's stage graphs may not reuse the roles {sorted(clash)}")
    manifest = Manifest(name=name, kind=kind, format_version=version, image=shape,
                        value_range=value_range, latent=latent, likelihood=likelihood,
                        graphs=graphs, variants=variants, prior=prior, raw=data, exact_tiling=exact)
    _check_io(data, manifest)
    return manifest


def _check_io(data: dict, manifest: Manifest) -> None:
    """The inputs/outputs that the manifest lists for each graph are the ones its facts imply."""
    for role, spec in manifest.specs().items():
        listed = {k: data["graphs"][role].get(k) for k in ("inputs", "outputs")}
        if listed != spec.io_json():
            raise BundleError(f"manifest: graphs.{role} lists inputs/outputs {listed}, "
                              f"but its image/latent facts imply {spec.io_json()}")
