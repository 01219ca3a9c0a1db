"""`vaeinfer manifold` and `vaeinfer traverse`: pictures of a VAE's latent space (see vaeinfer.manifold)."""

from __future__ import annotations

import click

from vaeinfer import manifold as latent_pictures
from vaeinfer.cli.common import _check_out, _load, _read_images, _write_images, main, model_option


def _dim_list(text: str | None):
    if text is None:
        return None
    try:
        return [int(p) for p in text.replace(",", " ").split()]
    except ValueError:
        raise click.BadParameter(f"expected latent dimensions like '0 1' or '0,1', got {text!r}") from None


@main.command()
@model_option
@click.option("-o", "--out", default="manifold.png", show_default=True, help="Output .png grid, .npy or .npz.")
@click.option("--dims", default="0 1", show_default=True, help="The two latent dimensions of the grid.")
@click.option("--size", type=click.IntRange(2, 100), default=20, show_default=True, help="Grid rows and columns.")
@click.option("--around", type=click.Path(exists=True, dir_okay=False), default=None,
              help="An image whose posterior mean holds the other dimensions (default: 0).")
def manifold(model, device, threads, precision, out, dims, size, around):
    """The 2-D latent manifold (Kingma & Welling 2013, Fig. 4): decode a grid over the unit square
    mapped through the inverse Gaussian CDF into two latent dimensions."""
    _check_out(out)
    m = _load(model, device, threads, precision)
    x = None if around is None else _read_images(m, (around,))
    _write_images(latent_pictures.manifold(m, _dim_list(dims), size, x), out, nrow=size)


@main.command()
@model_option
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", default="traverse.png", show_default=True, help="Output .png grid, .npy or .npz.")
@click.option("--dims", default=None, help="Latent dimensions to vary, e.g. '0 3 5' (default: all).")
@click.option("--range", "span", type=click.FloatRange(0, 100, min_open=True), default=3.0, show_default=True,
              help="Each dimension goes from -RANGE to RANGE.")
@click.option("--steps", type=click.IntRange(2, 100), default=9, show_default=True)
def traverse(model, device, threads, precision, image, out, dims, span, steps):
    """Vary one latent dimension at a time from IMAGE's posterior mean: one row per dimension."""
    _check_out(out)
    m = _load(model, device, threads, precision)
    strips = latent_pictures.traverse(m, _read_images(m, (image,)), _dim_list(dims), span, steps)
    _write_images(strips.reshape(-1, *strips.shape[2:]), out, nrow=steps)
