"""The loss-curve figure: one linear-scale panel per metric, validation beside training."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from PIL import Image

from vaeinfer.training.plots import panels, plot_history


def _history(epochs: int) -> list[dict]:
    return [{"epoch": e, "step": 10 * e, "lr": 1e-3, "beta": 1.0, "seconds": 1.0, "loss": 90.0 - e,
             "recon": 60.0 - e, "kl": 30.0, "val_recon": 61.0 - e, "val_kl": 29.0, "val_elbo": -91.0 + e,
             "val_iwae": -87.0 + e} for e in range(1, epochs + 1)]


def test_validation_metrics_share_the_training_metrics_panel():
    assert panels(_history(3)) == {"loss": ["loss"], "recon": ["recon", "val_recon"], "kl": ["kl", "val_kl"],
                                   "val_elbo": ["val_elbo"], "val_iwae": ["val_iwae"]}


def test_training_comes_first_whatever_the_order_of_the_row():
    row = {"epoch": 1, "val_vq_loss": 1.0, "vq_loss": 2.0, "val_elbo": -90.0}
    assert panels([row]) == {"vq_loss": ["vq_loss", "val_vq_loss"], "val_elbo": ["val_elbo"]}


def test_bookkeeping_fields_are_not_plotted():
    assert not {"epoch", "step", "lr", "beta", "seconds"} & {k for keys in panels(_history(1)).values() for k in keys}


@pytest.mark.parametrize("epochs", [1, 4])
def test_plot_writes_a_png_with_a_panel_grid(tmp_path, epochs):
    path = tmp_path / "loss_curve.png"
    plot_history(_history(epochs), path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > height  # 5 panels: a 3 x 2 grid
    assert [p.name for p in tmp_path.iterdir()] == ["loss_curve.png"]  # written atomically, nothing left over
