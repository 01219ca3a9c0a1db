"""The OpenVINO backend (backend="openvino") and the bf16 precision: every committed bundle and an
imported diffusers VAE through the Python API, the CLI and the server; thread safety; bf16's
export validation in the manifest. Skips where OpenVINO (or, for bf16, a CPU with AMX or AVX-512
BF16) is missing, and says so."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
from click.testing import CliRunner

import vaeinfer
from vaeinfer import manifest as manifest_mod
from vaeinfer.backends import openvino as ov_backend
from vaeinfer.errors import BackendError, BundleError

pytestmark = pytest.mark.skipif(not ov_backend.is_available(),
                                reason="OpenVINO is not installed: pip install 'vaeinfer[openvino]'")
HAS_BF16 = "BF16" in ov_backend.capabilities()
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has neither AMX nor AVX-512 BF16 "
                                                     "(OpenVINO's CPU plugin lists no BF16)")
MODELS = vaeinfer.available_models()


def _decode_inputs(model, n=8, seed=0):
    from vaeinfer.bench import graph_inputs

    return graph_inputs(model, "decoder", n, seed)[0]


@pytest.mark.parametrize("name", MODELS)
def test_fp32_matches_onnxruntime_on_every_bundled_model(name):
    ref = vaeinfer.load(name, device="cpu", threads=2)
    ov = vaeinfer.load(name, device="cpu", threads=2, backend="openvino")
    assert ov.info.backend == "openvino" and ov.info.providers[0].startswith("OpenVINO")
    z = _decode_inputs(ref)
    np.testing.assert_allclose(ov.decode(z), ref.decode(z), atol=1e-4)
    x = ref.decode(z)
    a, b = ref.encode(x), ov.encode(x)
    for field in ("mean", "codes"):
        if hasattr(a, field):
            np.testing.assert_allclose(getattr(b, field), getattr(a, field), atol=1e-4)
    np.testing.assert_array_equal(ov.sample(8, seed=3), ov.sample(8, seed=3))  # seeded: bit-identical


@pytest.mark.parametrize("name", [n for n in MODELS if "int8" in vaeinfer.open_bundle(n).manifest.variants])
def test_int8_runs_the_bundles_qdq_graphs(name):
    ref = vaeinfer.load(name, device="cpu", threads=2)
    ov = vaeinfer.load(name, device="cpu", threads=2, backend="openvino", precision="int8")
    z = _decode_inputs(ref)
    got = ov.decode(z)
    assert np.isfinite(got).all() and float(np.mean(np.abs(got - ref.decode(z)))) < 0.05


@needs_bf16
@pytest.mark.parametrize("name", MODELS)
def test_bf16_runs_every_bundled_model_within_its_error(name):
    ref = vaeinfer.load(name, device="cpu", threads=2)
    bf = vaeinfer.load(name, device="cpu", threads=2, precision="bf16")  # no backend named: the one that has bf16
    assert bf.info.backend == "openvino" and bf.info.precision == "bf16" and "(bf16)" in bf.info.providers[0]
    z = _decode_inputs(ref)
    err = float(np.mean(np.abs(bf.decode(z) - ref.decode(z))))
    assert 0 < err < 0.02  # really bf16 (not fp32), and close


def _nearest_exact_upsample_graph(c=4) -> bytes:
    """conv 1x1, width x2 by a gather at int((arange(2w) + 0.5) * (w / 2w)) (as torch.onnx writes
    a nearest-exact upsample: float maths on the input's shape), conv 1x1."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((c, c, 1, 1)).astype(np.float32), n) for n in ("w1", "w2")]
    consts = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
              (("zero", 0.0), ("one", 1.0), ("two", 2.0), ("half", 0.5))] + \
        [numpy_helper.from_array(np.array([3], np.int64), "axis")]
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [helper.make_node("Conv", ["x", "w1"], ["y"]),
             helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "axis"], ["w_1"]),
             helper.make_node("Cast", ["w_1"], ["wf_1"], to=f32),
             helper.make_node("Squeeze", ["wf_1"], ["w"]),
             helper.make_node("Mul", ["w", "two"], ["out_w"]),
             helper.make_node("Range", ["zero", "out_w", "one"], ["i"]),
             helper.make_node("Add", ["i", "half"], ["centres"]),
             helper.make_node("Div", ["w", "out_w"], ["scale"]),
             helper.make_node("Mul", ["centres", "scale"], ["source"]),
             helper.make_node("Cast", ["source"], ["index"], to=i64),
             helper.make_node("Gather", ["y", "index"], ["up"], axis=3),
             helper.make_node("Conv", ["up", "w2"], ["out"])]
    graph = helper.make_graph(nodes, "nearest_exact_x2", [helper.make_tensor_value_info("x", f32, [1, c, "h", "w"])],
                              [helper.make_tensor_value_info("out", f32, [1, c, "h", "w2"])], weights + consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@needs_bf16
def test_bf16_keeps_index_arithmetic_f32():
    """In bf16 (8 significant bits) the gather index (i + 0.5) * 0.5 of a nearest-exact upsample is
    one too large for every odd column past 128 and out of bounds at the last (a 200 wide output
    here: wrong pixels, and NaN/Inf where the read lands on garbage, as on a Wan decoder at
    256x256). The backend keeps that shape maths f32 (and only that); the pixels stay bf16."""
    graph = _nearest_exact_upsample_graph()
    x = np.random.default_rng(1).standard_normal((1, 4, 3, 100)).astype(np.float32)
    fp32 = ov_backend.OpenVINORunner(graph, threads=2, what="t", precision="fp32")
    bf16 = ov_backend.OpenVINORunner(graph, threads=2, what="t", precision="bf16")
    want, got = fp32.run(["out"], {"x": x})[0], bf16.run(["out"], {"x": x})[0]
    assert want.shape == (1, 4, 3, 200) and np.isfinite(got).all()
    err = np.abs(got - want) / np.abs(want).max()
    assert 0 < err.mean() < 2e-3 and err.max() < 0.02  # bf16 rounding only: no column taken from a wrong pixel
    assert fp32.kept_f32 == 0 and bf16.kept_f32 == 8  # Cast, Squeeze, Mul, Range, Add, Div, Mul, Cast


def test_bf16_on_onnxruntime_is_an_error_naming_the_backend_that_has_it():
    with pytest.raises(BackendError, match="runs precisions.*not 'bf16'"):
        vaeinfer.load("mnist-vae", device="cpu", backend="cpu", precision="bf16")


def test_one_loaded_model_serves_many_threads():
    model = vaeinfer.load("mnist-vae", device="cpu", threads=1, backend="openvino")
    inputs = [_decode_inputs(model, 16, seed) for seed in range(8)]
    want = [model.decode(z) for z in inputs]
    got = [None] * len(inputs)

    def work(i):
        for _ in range(5):
            got[i] = model.decode(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_bad_inputs_are_refused_before_the_backend():
    model = vaeinfer.load("mnist-vae", device="cpu", backend="openvino")
    with pytest.raises(vaeinfer.InputError):
        model.decode(np.zeros((2, 3), np.float32))
    with pytest.raises(vaeinfer.InputError):
        model.decode(np.full((2, model.latent_dim), np.nan, np.float32))


def test_an_imported_diffusers_vae(tmp_path, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    from vaeinfer.export.diffusers import from_diffusers

    torch.manual_seed(0)
    module = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                     up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                                     latent_channels=4, sample_size=32).eval()
    module.save_pretrained(tmp_path / "src")
    bundle = from_diffusers(tmp_path / "src", tmp_path / "bundle", sizes=((16, 16), (24, 32)),
                            precisions=("bf16",) if HAS_BF16 else ())
    ref = vaeinfer.load(bundle, device="cpu")
    z = np.random.default_rng(0).standard_normal((2, 4, 8, 12)).astype(np.float32)
    for precision in ("fp32", "bf16") if HAS_BF16 else ("fp32",):
        got = vaeinfer.load(bundle, device="cpu", backend="openvino", precision=precision).decode(z)
        assert got.shape == (2, 3, 16, 24)
        assert float(np.mean(np.abs(got - ref.decode(z)))) < (1e-4 if precision == "fp32" else 0.02)
    # precision="auto" measures a latent-diffusion VAE on inputs like a pipeline's: its decoder on
    # unscaled N(0, 1) latents (z / scaling_factor), its encoder on smooth photo-like images
    from vaeinfer import kinds

    m = ref.manifest
    feeds = kinds.get(m.kind).example_feeds(m, m.specs()["decoder"], 64, 0)
    assert feeds["z"].std() == pytest.approx(1 / m.latent["scaling_factor"], rel=0.05)
    x = kinds.get(m.kind).example_feeds(m, m.specs()["encoder"], 2, 0)["x"]
    assert x.shape == (2, 3, 32, 32) and -1 <= x.min() < x.max() <= 1
    monkeypatch.setenv("VAEINFER_CACHE_DIR", str(tmp_path / "cache"))
    auto = vaeinfer.load(bundle, device="cpu", precision="auto")
    assert set(auto.info.auto) == {"encoder", "decoder"} and auto.decode(z).shape == (2, 3, 16, 24)
    if HAS_BF16:
        entry = json.loads((bundle / "manifest.json").read_text())["variants"]["bf16"]
        assert entry["computed_from"] == "fp32" and "graphs" not in entry
        assert entry["speedup"]["backend"] == "openvino" and "reconstruction" in entry["error"]


def test_cli_sample_and_info(tmp_path):
    from vaeinfer.cli import main

    out = tmp_path / "s.png"
    precision = "bf16" if HAS_BF16 else "fp32"
    r = CliRunner().invoke(main, ["sample", "--device", "cpu", "--backend", "openvino", "--precision", precision,
                                  "-n", "4", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 0
    r = CliRunner().invoke(main, ["info", "-m", "mnist-vae", "--device", "cpu", "--backend", "openvino"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["backend"] == "openvino"
    r = CliRunner().invoke(main, ["info", "--backends"])
    assert "openvino: OpenVINO's CPU plugin on cpu" in r.output and "available" in r.output


def test_server_runs_on_openvino():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from vaeinfer.serve import ServeConfig, create_app

    app = create_app(ServeConfig(models=("mnist-vae",), device="cpu", backend="openvino", max_batch=4))
    model = app.state.served["mnist-vae"].model
    assert model.info.backend == "openvino"
    with TestClient(app) as client:
        r = client.post("/v1/models/mnist-vae/sample", json={"n": 2, "seed": 1})
        assert r.status_code == 200, r.text


def test_bf16_manifest_entry_is_checked(tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(vaeinfer.open_bundle("mnist-vae").path, bundle)
    data = json.loads((bundle / "manifest.json").read_text())
    data["variants"]["bf16"] = {"computed_from": "fp32", "error": {}}
    assert manifest_mod.parse(data).files("bf16") == manifest_mod.parse(data).files("fp32")
    for bad in ({"computed_from": "fp16"}, {"computed_from": "fp32", "graphs": data["variants"]["int8"]["graphs"]},
                {"graphs": data["variants"]["int8"]["graphs"]}):
        data["variants"]["bf16"] = bad
        with pytest.raises(BundleError, match="variants.bf16"):
            manifest_mod.parse(data)
