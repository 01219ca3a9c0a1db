"""Bundles written before the current manifest MINOR still load and run, byte for byte as committed.

The bundled models were re-written since (format 1.2: unused initializers stripped, cached prior
graphs added), so their 1.0 versions are taken from git history, commit OLD, exactly as committed
then; the fuzz seeds are still the 1.0 bundles in the working tree.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import vaeinfer
from vaeinfer.manifest import FORMAT_VERSION, parse_version

ROOT = Path(__file__).resolve().parents[1]
OLD = "23cf5d1"  # the last commit before manifest 1.1
FROM_HISTORY = ["vaeinfer/models/mnist-vae", "vaeinfer/models/mnist-vqvae"]
IN_TREE = ["tests/data/fuzz-seeds/vae", "tests/data/fuzz-seeds/vq"]


def _git(*args, **kw):
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, **kw).stdout


def _checkout_old(rel: str, dest: Path) -> Path:
    """The bundle folder `rel` as committed at OLD, written under dest (skip without git history)."""
    try:
        names = _git("ls-tree", "-r", "--name-only", OLD, rel, text=True).split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no git history with commit {OLD} here")
    if not names:
        pytest.skip(f"commit {OLD} has no {rel}")
    out = dest / Path(rel).name
    for name in names:
        target = out / Path(name).relative_to(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_git("show", f"{OLD}:{name}"))
    return out


def _load_and_run(bundle: Path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert parse_version(manifest["format_version"]) < parse_version(FORMAT_VERSION)
    for precision in ("fp32", *manifest.get("variants", {})):
        m = vaeinfer.load(bundle, device="cpu", precision=precision)
        assert m.info.format_version == manifest["format_version"]
        x = np.random.default_rng(0).random((3, *m.info.image_shape), dtype=np.float32)
        rec = m.reconstruct(x)
        assert rec.shape == x.shape and np.isfinite(rec).all()
        if m.can_sample:
            images = m.sample(3, seed=0)
            assert images.shape == (3, *m.info.image_shape) and np.isfinite(images).all()


@pytest.mark.parametrize("rel", FROM_HISTORY)
def test_bundled_model_as_committed_before_the_bump_loads_and_runs(rel, tmp_path):
    _load_and_run(_checkout_old(rel, tmp_path))


@pytest.mark.parametrize("rel", IN_TREE)
def test_older_bundle_in_tree_loads_and_runs(rel):
    _load_and_run(ROOT / rel)
