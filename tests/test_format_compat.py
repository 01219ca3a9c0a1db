"""Bundles written before the current manifest MINOR still load and run, byte for byte as committed."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import vaeinfer
from vaeinfer.manifest import FORMAT_VERSION, parse_version

ROOT = Path(__file__).resolve().parents[1]
OLD = "23cf5d1"  # the last commit before manifest 1.1
BUNDLES = [ROOT / "vaeinfer/models/mnist-vae", ROOT / "vaeinfer/models/mnist-vqvae",
           ROOT / "tests/data/fuzz-seeds/vae", ROOT / "tests/data/fuzz-seeds/vq"]


def _committed(path: Path) -> dict[str, str]:
    """sha256 of every file of `path` at commit OLD (None where git or the commit is absent)."""
    rel = path.relative_to(ROOT).as_posix()
    try:
        names = subprocess.run(["git", "ls-tree", "-r", "--name-only", OLD, rel], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split()
        return {n: hashlib.sha256(subprocess.run(["git", "show", f"{OLD}:{n}"], cwd=ROOT, check=True,
                                                 capture_output=True).stdout).hexdigest() for n in names}
    except (OSError, subprocess.CalledProcessError):
        return {}


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_older_bundle_loads_and_runs(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert parse_version(manifest["format_version"]) < parse_version(FORMAT_VERSION)
    old = _committed(bundle)
    if old:  # the files on disk are the ones committed before the bump, unchanged
        now = {p.relative_to(ROOT).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in bundle.rglob("*") if p.is_file()}
        assert {k: v for k, v in now.items() if k in old} == old and set(old) <= set(now)
    for precision in ("fp32", *manifest.get("variants", {})):
        m = vaeinfer.load(bundle, device="cpu", precision=precision)
        assert m.info.format_version == manifest["format_version"]
        images = m.sample(3, seed=0) if m.info.kind == "vae" or m.info.has_prior else None
        x = np.random.default_rng(0).random((3, *m.info.image_shape), dtype=np.float32)
        rec = m.reconstruct(x)
        assert rec.shape == x.shape and np.isfinite(rec).all()
        if images is not None:
            assert images.shape == (3, *m.info.image_shape) and np.isfinite(images).all()
