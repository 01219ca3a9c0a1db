"""A kind is its own modules: no kind-specific branch elsewhere, and a new kind registered from
outside the package loads and samples through `vaeinfer.load`."""

from __future__ import annotations

import ast
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

import vaeinfer
from vaeinfer import kinds

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vaeinfer", "export", "training")
# A kind's own modules, where its name and its latent's names belong: the kind module, the runtime
# module, the export module and the training module of each kind, and the helpers only one kind
# uses (a VQ-VAE's PixelCNN prior: its sampler, its cached export graphs and its training).
KIND_MODULES = {
    "vae": ("vaeinfer/kinds/vae.py", "vaeinfer/vae.py", "export/vae.py", "training/models.py"),
    "spatial-vae": ("vaeinfer/kinds/spatial_vae.py", "vaeinfer/spatial_vae.py", "export/spatial_vae.py",
                    "training/spatial_vae.py"),
    "video-vae": ("vaeinfer/kinds/video_vae.py", "vaeinfer/video_vae.py", "export/video_vae.py"),
    "vqvae": ("vaeinfer/kinds/vqvae.py", "vaeinfer/vqvae.py", "export/vqvae.py", "training/vqvae.py",
              "vaeinfer/prior_sampling.py", "export/prior_step.py", "training/pixelcnn.py",
              "training/pixelcnn_prior.py", "training/pixelcnn_step.py"),
}
# names that only one kind's modules should spell: the kind names, and a VQ-VAE's latent
FORBIDDEN = {*kinds.names(), "codes"}
# Justified exceptions, (file, string): not a kind branch.
ALLOWED = {
    ("export/diffusers.py", "vae"),  # the "vae" subfolder of a diffusers pipeline folder, not the kind
    ("training/__init__.py", "vqvae"),  # the training architecture of that name (TRAIN_ARCHS), not the kind
    ("vaeinfer/inputs.py", "codes"),  # the error label of inputs.codes, kept with the other input checks
}


def _offences(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    out = []
    for node in ast.walk(ast.parse(path.read_text(), rel)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in FORBIDDEN \
                and (rel, node.value) not in ALLOWED:
            out.append(f"{rel}:{node.lineno}: {node.value!r}")
        # a graph role picked by its name, or an encoder told apart by its first output's name
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith" \
                and any(isinstance(a, ast.Constant) and a.value == "prior" for a in node.args):
            out.append(f"{rel}:{node.lineno}: startswith('prior')")
        if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value == "mean"
                                                 for c in (node.left, *node.comparators)):
            out.append(f"{rel}:{node.lineno}: == 'mean'")
    return out


def test_no_kind_branch_outside_the_kinds_own_modules():
    assert set(KIND_MODULES) == set(kinds.names())
    own = {m for modules in KIND_MODULES.values() for m in modules}
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
             if p.relative_to(ROOT).as_posix() not in own]
    assert len(files) > 50
    offences = [o for p in files for o in _offences(p)]
    assert not offences, "kind-specific code outside the kinds' modules (move the fact onto the Kind):\n" + \
        "\n".join(offences)


def test_every_kind_has_an_exporter_and_every_train_arch_a_builder():
    pytest.importorskip("torch")
    from vaeinfer.export import EXPORTERS
    from vaeinfer.training import TRAIN_ARCHS
    from vaeinfer.training.models import ARCHITECTURES

    assert set(EXPORTERS) == set(kinds.names())
    assert set(TRAIN_ARCHS) <= set(ARCHITECTURES)


class ToyVAE(kinds.get("vae").runtime_class()):
    """The runtime of the toy kind: a VAE's, under another class."""


@pytest.fixture
def toy_kind(monkeypatch):
    """A kind "toy-vae" registered from here: the VAE's graphs and facts under another name and
    runtime class, with no manifold capability; removed again after the test."""
    monkeypatch.setattr(kinds, "REGISTRY", dict(kinds.REGISTRY))
    return kinds.register(dataclasses.replace(kinds.get("vae"), name="toy-vae", runtime_class=lambda: ToyVAE,
                                              manifold=False))


def test_a_new_kind_is_its_own_modules(toy_kind, tmp_path):
    import json

    bundle = tmp_path / "toy"
    shutil.copytree(vaeinfer.open_bundle("mnist-vae").path, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["kind"] = toy_kind.name
    (bundle / "manifest.json").write_text(json.dumps(manifest))

    model = vaeinfer.load(bundle, device="cpu", threads=1)
    assert type(model) is ToyVAE and model.info.kind == "toy-vae"
    images = model.sample(3, seed=0)
    assert images.shape == (3, 1, 28, 28) and np.isfinite(images).all()
    reference = vaeinfer.load("mnist-vae", device="cpu", threads=1)
    assert np.array_equal(images, reference.sample(3, seed=0))  # the same graphs, the same images

    from vaeinfer import manifold
    from vaeinfer.errors import InputError

    with pytest.raises(InputError, match="needs a VAE"):  # a capability of the Kind, not of its name
        manifold.manifold(model)
