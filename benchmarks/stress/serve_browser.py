"""The page of `vaeinfer serve` in headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright; no browser download): sample a grid, drag the latent point, upload two images
(reconstruction, score, interpolation), then a screenshot.

    python -m benchmarks.stress.serve_browser       # writes benchmarks/results/serve-page.png

tests/test_serve_browser.py runs `drive` with its own checks.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

from benchmarks.harness.cli import description
from benchmarks.harness.report import RESULTS
from benchmarks.speed.serve_load import free_port, start_server, stop_server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def digit_png(seed: int) -> bytes:
    import vaeinfer
    from PIL import Image

    x = vaeinfer.load("mnist-vae").sample(1, seed=seed)[0, 0]
    buf = io.BytesIO()
    Image.fromarray((x * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def drive(url: str, folder: Path, screenshot: Path | None = None) -> dict:
    """Use the page like a person would; returns what it showed (image sources, texts)."""
    from playwright.sync_api import sync_playwright

    a, b = folder / "a.png", folder / "b.png"
    a.write_bytes(digit_png(1))
    b.write_bytes(digit_png(2))
    seen = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        page.wait_for_function("document.getElementById('grid').dataset.done")
        page.fill("#seed", "7")
        before = page.get_attribute("#grid", "data-done")
        page.click("#sample")
        page.wait_for_function(f"document.getElementById('grid').dataset.done !== '{before}'")
        box = page.locator("#plane").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        for k in range(1, 11):  # a drag towards the upper right: z = (+2.4, +2.4) at the end
            page.mouse.move(box["x"] + box["width"] * (0.5 + 0.04 * k), box["y"] + box["height"] * (0.5 - 0.04 * k))
        page.mouse.up()
        page.wait_for_function("JSON.parse(document.getElementById('point').dataset.z || '[0,0]')[0] > 2")
        seen["z"] = page.get_attribute("#point", "data-z")
        page.set_input_files("#file-a", str(a))
        page.wait_for_function("document.getElementById('recon').dataset.done")
        page.wait_for_function("document.getElementById('score').textContent.startsWith('nll')")
        page.set_input_files("#file-b", str(b))
        page.wait_for_function("document.getElementById('interp').dataset.done")
        page.wait_for_function("document.getElementById('interp').naturalWidth > 0")
        seen["score"] = page.text_content("#score")
        seen["status"] = page.text_content("#status")
        seen["sizes"] = page.evaluate("['grid','point','recon','interp'].map(i => [document.getElementById(i).naturalWidth,"
                                      " document.getElementById(i).naturalHeight])")
        seen["errors"] = errors
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return seen


def main(argv=None) -> int:
    import tempfile

    argparse.ArgumentParser(description=description(__doc__)).parse_args(argv)
    port = free_port()
    proc = start_server(port, model="mnist-vae")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = RESULTS / "serve-page.png"
            seen = drive(f"http://127.0.0.1:{port}/", Path(tmp), out)
        print(seen, f"\nwrote {out}")
    finally:
        stop_server(proc)
    return 0 if not seen["errors"] and not seen["status"] else 1


if __name__ == "__main__":
    sys.exit(main())
