"""vaeinfer.manifold: the inverse normal CDF, the 2-D manifold grid and traversals, and their CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import vaeinfer
from vaeinfer.cli import main
from vaeinfer.manifold import manifold, norm_ppf, traverse


def test_norm_ppf_inverts_the_normal_cdf_in_the_centre_and_the_tails():
    p = np.array([1e-12, 1e-6, 0.001, 0.02, 0.02425, 0.03, 0.2, 0.5, 0.8, 0.97, 0.999, 1 - 1e-9])
    z = norm_ppf(p)
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in z])
    np.testing.assert_allclose(cdf, p, rtol=1e-7)
    np.testing.assert_allclose(norm_ppf(1 - p[1:-1]), -z[1:-1], atol=1e-8)  # symmetric
    assert norm_ppf(0.5) == 0 and abs(norm_ppf(0.975) - 1.959963985) < 1e-8
    for bad in (0.0, 1.0, -0.1, np.nan):
        with pytest.raises(vaeinfer.InputError):
            norm_ppf([0.5, bad])


@pytest.fixture(scope="module")
def model(mlp):
    return vaeinfer.load(mlp.bundle, device="cpu", threads=1)


def test_manifold_decodes_the_inverse_cdf_grid(model):
    grid = manifold(model, dims=(1, 3), size=4)
    assert grid.shape == (16, *model.info.image_shape)
    values = norm_ppf((np.arange(4) + 0.5) / 4)
    z = np.zeros((16, model.latent_dim), np.float32)
    row, col = 2, 1  # row 2 from the top, column 1 from the left
    z[row * 4 + col, 1], z[row * 4 + col, 3] = values[col], values[3 - row]
    np.testing.assert_allclose(grid[row * 4 + col], model.decode(z[row * 4 + col:row * 4 + col + 1])[0], atol=1e-6)
    assert not np.allclose(grid[0], grid[15])  # the corners differ: the grid moves through the latent


def test_manifold_around_an_image_holds_the_other_dims_at_its_posterior_mean(model, mlp):
    x = mlp.images[:1]
    mean = model.encode(x).mean[0]
    grid = manifold(model, dims=(0, 2), size=3, around=x)
    z = mean.copy()
    z[0], z[2] = norm_ppf(1 / 6), norm_ppf(5 / 6)  # top-left cell
    np.testing.assert_allclose(grid[0], model.decode(z[None])[0], atol=1e-6)
    with pytest.raises(vaeinfer.InputError, match="one image"):
        manifold(model, around=mlp.images[:2])


@pytest.mark.parametrize("kwargs, match", [
    ({"dims": (0,)}, "expected 2"), ({"dims": (0, 0)}, "distinct"), ({"dims": (0, 9)}, "distinct"),
    ({"size": 1}, "grid size"), ({"size": 2.5}, "grid size"),
])
def test_manifold_refuses_bad_arguments(model, kwargs, match):
    with pytest.raises(vaeinfer.InputError, match=match):
        manifold(model, **kwargs)


def test_traverse_varies_one_dimension_per_row(model, mlp):
    x = mlp.images[3:4]
    strips = traverse(model, x, dims=[2, 0], span=2.0, steps=5)
    assert strips.shape == (2, 5, *model.info.image_shape)
    mean = model.encode(x).mean[0]
    z = mean.copy()
    z[0] = -1.0  # row 1 varies dim 0; step 1 of 5 over [-2, 2]
    np.testing.assert_allclose(strips[1, 1], model.decode(z[None])[0], atol=1e-6)
    assert traverse(model, x).shape[:2] == (model.latent_dim, 9)
    for kwargs in ({"dims": [5]}, {"steps": 1}, {"span": 0.0}, {"span": float("nan")}, {"dims": []}):
        with pytest.raises(vaeinfer.InputError):
            traverse(model, x, **kwargs)


def test_manifold_and_traverse_refuse_a_vq_model(zoo):
    class Fake:  # the kind check comes first, before anything touches the graphs
        info = type("I", (), {"kind": "vqvae", "name": "vq"})()

    with pytest.raises(vaeinfer.InputError, match="needs a VAE"):
        manifold(Fake())
    with pytest.raises(vaeinfer.InputError, match="needs a VAE"):
        traverse(Fake(), None)


def test_cli_manifold_on_the_bundled_2d_model(tmp_path):
    assert "mnist-vae-2d" in vaeinfer.available_models()
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(main, ["manifold", "-m", "mnist-vae-2d", "-o", str(out), "--size", "5"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        assert im.size == (5 * 30 + 2, 5 * 30 + 2)
        a = np.asarray(im)
    assert a.std() > 20  # digits, not a blank canvas


def test_cli_traverse_and_manifold_around(mlp, tmp_path):
    x = tmp_path / "x.png"
    c, h, w = mlp.case.shape
    Image.fromarray((mlp.images[0, 0] * 255).astype(np.uint8)).save(x)
    result = CliRunner().invoke(main, ["traverse", "-m", str(mlp.bundle), str(x), "-o", str(tmp_path / "t.npz"),
                                       "--dims", "0,2", "--steps", "4", "--range", "2"])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "t.npz") as z:
        assert z["images"].shape == (8, c, h, w)
    result = CliRunner().invoke(main, ["manifold", "-m", str(mlp.bundle), "--around", str(x), "--dims", "1 3",
                                       "--size", "3", "-o", str(tmp_path / "m.png")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["manifold", "-m", str(mlp.bundle), "--dims", "0", "-o", str(tmp_path / "m.png")])
    assert result.exit_code != 0 and "expected 2 latent dimensions" in result.output
