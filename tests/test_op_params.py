"""The op parameters shared by the CLI and the server (vaeinfer.op_params) name the runtime
methods' keywords, with their defaults, and are the CLI's options."""

from __future__ import annotations

import inspect

import pytest

from vaeinfer.cli import main
from vaeinfer.op_params import INTERPOLATE, SAMPLE, SCORE
from vaeinfer.spatial_vae import SpatialVAE
from vaeinfer.vae import VAE
from vaeinfer.vqvae import VQVAE


def _keywords(method_name: str) -> dict[str, inspect.Parameter]:
    out = {}
    for cls in (VAE, VQVAE, SpatialVAE):
        method = getattr(cls, method_name, None)
        if method is not None:
            out.update(inspect.signature(method).parameters)
    return out


@pytest.mark.parametrize("table, method", [(SAMPLE, "sample"), (SCORE, "score"), (INTERPOLATE, "interpolate")])
def test_params_are_runtime_keywords_with_their_defaults(table, method):
    keywords = _keywords(method)
    for p in table.values():
        assert p.name in keywords, (method, p.name)
        default = keywords[p.name].default
        if default not in (inspect.Parameter.empty, None):  # the runtime's own default, where it has one
            assert p.default == default, (method, p.name)


@pytest.mark.parametrize("table, command", [(SAMPLE, "sample"), (SCORE, "score")])
def test_cli_options_are_the_table(table, command):
    params = {p.name: p for p in main.commands[command].params}
    for p in table.values():
        option = params[p.name]
        assert (option.default, option.help, option.type.min) == (p.default, p.help, p.min)
