"""The scalar parameters of the runtime ops that both `vaeinfer` commands and `vaeinfer serve`
take, declared once: name (the runtime method's keyword and the request field), type, default,
bounds and help. The CLI builds its options from them (vaeinfer.cli.common.op_options); the
server its defaults for n, samples and steps (vaeinfer.serve.app); the values themselves are checked by
the runtime methods (vaeinfer.inputs), for the Python API and the server alike, and the CLI's
option types apply the same bounds before a model loads. tests/test_op_params.py keeps the
defaults equal to the runtime methods' own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    name: str  # the runtime method's keyword argument, and the request body / query field
    type: type  # int or float
    default: object = None
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # min itself is refused
    help: str | None = None
    flags: tuple[str, ...] = ()  # the CLI's flags when not just --name-with-dashes (e.g. ("-n", "--num"))


def _table(*params: Param) -> dict[str, Param]:
    return {p.name: p for p in params}


SAMPLE = _table(
    Param("n", int, 16, min=1, help="How many images.", flags=("-n", "--num")),
    Param("seed", int, 0, min=0, help="Seed of the host-side noise: the same seed gives the same images."),
    Param("temperature", float, 1.0, min=0, min_open=True,
          help="Scale of the prior noise (VAE) or of the prior's logits (VQ-VAE: 1/temperature)."),
    Param("top_k", int, min=1, help="VQ-VAE: sample among the k likeliest codes."),
    Param("top_p", float, min=0, max=1, min_open=True, help="VQ-VAE: nucleus sampling over the codes."),
    Param("label", int, min=0, help="VQ-VAE with a class-conditional prior: the class."),
    Param("height", int, min=1, help="Spatial VAE: image height (default: native)."),
    Param("width", int, min=1, help="Spatial VAE: image width (default: native)."),
)
SCORE = _table(
    Param("samples", int, 100, min=1, help="Importance samples per image (IWAE bound; larger is tighter and slower).",
          flags=("-k", "--samples")),
    Param("seed", int, 0, min=0),
)
INTERPOLATE = _table(
    Param("steps", int, 8, min=1),
)
