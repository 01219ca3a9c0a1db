"""The page of `vaeinfer serve` in headless Chromium (Debian's chromium driven by Playwright,
never a downloaded browser): it samples a grid, follows a drag over the latent plane, and shows
an uploaded digit's reconstruction, score and an interpolation to a second upload. Skips where
/usr/bin/chromium or playwright is missing. benchmarks.stress.serve_browser makes the committed
screenshot (benchmarks/results/serve-page.png) with the same steps."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

from benchmarks.stress import serve_browser as browser

pytest.importorskip("fastapi")
pytest.importorskip("playwright")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.access(browser.CHROMIUM, os.X_OK), reason=f"no {browser.CHROMIUM}")]


def test_page_samples_drags_and_uploads(tmp_path):
    import vaeinfer
    from PIL import Image

    port = browser.free_port()
    proc = browser.start_server(port, "-m", "mnist-vqvae", model="mnist-vae")
    try:
        seen = browser.drive(f"http://127.0.0.1:{port}/", tmp_path, tmp_path / "page.png")
    finally:
        browser.stop_server(proc)
    assert seen["errors"] == [] and seen["status"] == "", seen
    x, y = (float(v) for v in seen["z"].strip("[]").split(","))
    assert x > 2 and y > 2  # the drag ended in the upper right quadrant
    grid, point, recon, interp = seen["sizes"]
    assert grid == [4 * 30 + 2] * 2 and point == [32, 32] and recon == [32, 32] and interp == [8 * 30 + 2, 32]
    # the score shown is the runtime's score of the uploaded digit (the page sends it unchanged)
    with Image.open(io.BytesIO(browser.digit_png(1))) as im:
        digit = np.asarray(im)[None, None]
    nll = vaeinfer.load("mnist-vae").score(digit).nll[0]
    assert seen["score"].startswith(f"nll {nll:.2f} nats"), (seen["score"], nll)
    assert (tmp_path / "page.png").stat().st_size > 10_000
