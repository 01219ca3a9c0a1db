"""The spatial-vae kind with the project's own modules: registry entry, manifest checks, dynamic
H/W, likelihoods and score, and fp16 made safe where a graph overflows."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import vaeinfer
from vaeinfer.export.graphs import ExportError
from vaeinfer.export import EXPORTERS
from vaeinfer.export.spatial_vae import export_run, export_spatial_vae, smooth_images
from vaeinfer.export.variants import FP16_SAFE, add_variants, make_fp16
from vaeinfer import kinds, manifest
from vaeinfer.errors import BundleError, InputError


class Encoder(nn.Module):
    def __init__(self, c=3, z=2, stochastic=True):
        super().__init__()
        self.stochastic = stochastic
        self.net = nn.Sequential(nn.Conv2d(c, 8, 3, 2, 1), nn.SiLU(), nn.Conv2d(8, 2 * z if stochastic else z, 3, 2, 1))

    def forward(self, x):
        h = self.net(x)
        return tuple(h.chunk(2, dim=1)) if self.stochastic else h


class Decoder(nn.Module):
    """`gain` scales a hidden activation up, squares it and takes the root back down: intermediate
    values of about gain**2 (fp16 overflows above 65504), from a small constant that the exporter
    cannot fold into one the fp16 converter would clamp."""

    def __init__(self, c=3, z=2, gain=1.0):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(z, 8, 4, 2, 1), nn.SiLU(), nn.ConvTranspose2d(8, 8, 4, 2, 1))
        self.out = nn.Conv2d(8, c, 3, 1, 1)
        self.gain = gain

    def forward(self, z):
        h = self.up(z) * self.gain
        h = torch.sqrt(h * h + 1.0) / self.gain  # |h| ~ gain: h * h ~ gain ** 2
        return torch.sigmoid(self.out(h))


def _export(path, gain=1.0, stochastic=True, likelihood=None, channels=3):
    torch.manual_seed(0)
    return export_spatial_vae(Encoder(channels, stochastic=stochastic), Decoder(channels, gain=gain), path,
                              channels=channels, latent_channels=2, downsample=4, height=16, width=16,
                              value_range=(0.0, 1.0), stochastic=stochastic,
                              likelihood=likelihood or {"kind": "laplace", "scale": 0.1},
                              sizes=((16, 16), (24, 32)), batches=(1, 2))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("sp") / "b")


def test_registry_entry(bundle):
    kind = kinds.get("spatial-vae")
    assert kind.runtime_class().__name__ == "SpatialVAE" and EXPORTERS["spatial-vae"].export_run is export_run
    m = manifest.parse(json.loads((bundle / "manifest.json").read_text()))
    assert m.latent["multiple_of"] == 4 and m.latent["min_size"] == 4
    spec = m.specs()["decoder"]
    assert spec.inputs[0].shape == ("batch", 2, "latent_height", "latent_width")
    assert spec.outputs[0].shape == ("batch", 3, "height", "width")


def test_graph_axes_are_dynamic_and_named(bundle):
    model = onnx.load(str(bundle / "encoder.onnx"))
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*model.graph.input, *model.graph.output)]
    assert dims == [["batch", 3, "height", "width"], ["batch", 2, "latent_height", "latent_width"],
                    ["batch", 2, "latent_height", "latent_width"]]


def test_any_multiple_of_the_downsampling(bundle):
    vae = vaeinfer.load(bundle, device="cpu")
    for h, w in ((4, 4), (20, 36), (64, 8)):
        x = smooth_images(2, 3, h, w, value_range=(0, 1))
        post = vae.encode(x)
        assert post.mean.shape == (2, 2, h // 4, w // 4) and vae.decode(post).shape == (2, 3, h, w)
    with pytest.raises(InputError, match="multiples of 4"):
        vae.encode(np.zeros((1, 3, 18, 16), np.float32))
    with pytest.raises(InputError, match="NaN"):
        vae.decode(np.full((1, 2, 4, 4), np.nan, np.float32))


def test_laplace_score(bundle):
    vae = vaeinfer.load(bundle, device="cpu")
    x = smooth_images(3, 3, 16, 16, value_range=(0, 1))
    s = vae.score(x, samples=8, seed=0)
    assert s.nll.shape == (3,) and np.all(np.isfinite(s.nll)) and np.all(s.elbo >= s.nll - 1e-6)
    np.testing.assert_array_equal(s.nll, vae.score(x, samples=8, seed=0).nll)
    # the recon term is the Laplace log-density of x around the decoded mean
    post = vae.encode(x)
    params = vae.decode_params(post.mean)
    lpx = (-np.abs(x - params) / 0.1 - np.log(0.2)).reshape(3, -1).sum(axis=1)
    assert np.all(np.abs(-s.recon - lpx) < 0.2 * np.abs(lpx))


def test_deterministic_encoder(tmp_path):
    vae = vaeinfer.load(_export(tmp_path / "d", stochastic=False, likelihood={"kind": "gaussian"}), device="cpu")
    post = vae.encode(smooth_images(1, 3, 16, 16, value_range=(0, 1)))
    assert post.logvar is None and np.array_equal(post.sample(seed=1), post.mean) and not post.std.any()
    with pytest.raises(InputError, match="score needs"):
        vae.score(smooth_images(1, 3, 16, 16, value_range=(0, 1)))


def test_four_channel_images(tmp_path):
    vae = vaeinfer.load(_export(tmp_path / "rgba", channels=4), device="cpu")
    assert vae.sample(2, seed=0).shape == (2, 4, 16, 16)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["latent"].pop("stochastic"), "latent.stochastic"),
    (lambda m: m["latent"].update(scaling_factor=0), "scaling_factor"),
    (lambda m: m["image"].update(multiple_of=6), "multiple of latent.downsample"),
    (lambda m: m["image"].update(height=18), "multiples of 4"),
    (lambda m: m["image"].update(channels=2), "image.channels"),
    (lambda m: m["likelihood"].update(kind="bernoulli"), "takes likelihood.kind"),
    (lambda m: m["graphs"]["decoder"]["inputs"][0].update(shape=["batch", 2, 4, 4]), "imply"),
])
def test_manifest_refuses(bundle, change, message):
    data = json.loads((bundle / "manifest.json").read_text())
    bad = copy.deepcopy(data)
    change(bad)
    with pytest.raises(BundleError, match=message):
        manifest.parse(bad)


def test_laplace_only_for_spatial():
    data = json.loads((vaeinfer.load("mnist-vae").bundle.path / "manifest.json").read_text())
    data["likelihood"] = {"kind": "laplace", "scale": 0.1}
    with pytest.raises(BundleError, match="takes likelihood.kind"):
        manifest.parse(data)


def _output_types(data: bytes) -> dict:
    model = onnx.shape_inference.infer_shapes(onnx.load_from_string(data))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output)}
    return {n.name: types.get(n.output[0]) for n in model.graph.node}


def test_fp16_keeps_overflowing_nodes_in_fp32(tmp_path):
    """A decoder whose hidden activations reach ~1e6: the fp16 variant keeps the nodes that write
    them in fp32 (pure fp16 computes them in fp16 and overflows on a GPU; onnxruntime's CPU
    provider runs fp16 ops it has no kernel for in fp32, so on CPU pure fp16 can look finite),
    and stays close to fp32."""
    path = _export(tmp_path / "hot", gain=1e3)
    data = (path / "decoder.onnx").read_bytes()
    z = {"z": np.random.default_rng(0).standard_normal((2, 2, 4, 6)).astype(np.float32)}
    fp32 = ort.InferenceSession(data).run(None, z)[0]
    report = {}
    safe = make_fp16(data, [z], report)
    hot = report["fp32_overflow"]
    assert hot and all(v["max_abs"] > FP16_SAFE for v in hot.values())
    assert {v["op"] for v in hot.values()} >= {"Mul"}  # h * h
    naive_types, safe_types = _output_types(make_fp16(data)), _output_types(safe)
    for node in hot:
        assert naive_types[node] == onnx.TensorProto.FLOAT16 and safe_types[node] == onnx.TensorProto.FLOAT
    # everything else is still fp16
    assert sum(t == onnx.TensorProto.FLOAT16 for t in safe_types.values()) > len(safe_types) // 2
    out = ort.InferenceSession(safe).run(None, z)[0]
    assert np.isfinite(out).all() and np.abs(out - fp32).max() < 1e-2
    # through add_variants, validated by the runtime, recorded in the manifest
    calib = smooth_images(8, 3, 16, 16, value_range=(0, 1))
    add_variants(path, ["fp16"], calib, calib, nll_images=0, speed_batch=2, calibration_batch=4)
    m = json.loads((path / "manifest.json").read_text())
    assert m["variants"]["fp16"]["fp16_safety"]["decoder"]["fp32_overflow"]
    out = vaeinfer.load(path, device="cpu", precision="fp16").decode(vaeinfer.load(path, device="cpu").encode(calib))
    assert np.isfinite(out).all()


def test_export_refuses_bad_sizes(tmp_path):
    with pytest.raises(ExportError, match="multiples of 4"):
        export_spatial_vae(Encoder(), Decoder(), tmp_path / "x", channels=3, latent_channels=2, downsample=4,
                           height=18, width=16)


def test_manifests_match_schema(bundle, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from pathlib import Path

    schema = json.loads((Path(vaeinfer.__file__).parent / "manifest.schema.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    validator.validate(json.loads((bundle / "manifest.json").read_text()))
    no_scale = _export(tmp_path / "d", stochastic=False, likelihood={"kind": "gaussian"})
    validator.validate(json.loads((no_scale / "manifest.json").read_text()))
    bad = json.loads((bundle / "manifest.json").read_text())
    bad["latent"]["stochastic"] = "yes"
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)


def test_trained_spatial_run_exports(tmp_path):
    """`vaeinfer train --arch conv-vae --latent spatial` on an RGB folder, then `vaeinfer export`."""
    from click.testing import CliRunner
    from PIL import Image

    from vaeinfer.cli import main

    folder = tmp_path / "rgb"
    folder.mkdir()
    for i, img in enumerate(smooth_images(12, 3, 16, 16, seed=4, value_range=(0, 1))):
        Image.fromarray((img.transpose(1, 2, 0) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--data", str(folder), "--arch", "conv-vae", "--latent", "spatial",
                                  "--downsample", "4", "--latent-channels", "2", "--conv-channels", "8,8",
                                  "--likelihood", "laplace", "--epochs", "1", "--batch-size", "4", "--quiet",
                                  "--out", str(run)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["export", str(run), "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    vae = vaeinfer.load(tmp_path / "b", device="cpu")
    assert vae.info.value_range == (-1.0, 1.0) and vae.info.likelihood == {"kind": "laplace", "scale": 0.1}
    x = smooth_images(2, 3, 24, 32, seed=5)  # any multiple of 4, in [-1, 1]
    assert vae.reconstruct(x).shape == x.shape and np.isfinite(vae.score(x, samples=2).nll).all()
