"""The backend registry: capabilities, names, errors, TensorRT options, and a backend that is not
onnxruntime (onnx's numpy reference evaluator) running a bundle end to end as one module would."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import vaeinfer
from vaeinfer import backends, session
from vaeinfer.backends import Backend, Device, Port, Runner, parse_device
from vaeinfer.bundle import open_bundle
from vaeinfer.errors import BackendError, UnknownBackendError

HERE = Path(__file__).resolve().parent.parent / "vaeinfer"


def test_registry_lists_backends_with_capabilities():
    assert backends.names()[:3] == ("cpu", "cuda", "tensorrt")
    cpu, cuda, trt = (backends.get(n) for n in ("cpu", "cuda", "tensorrt"))
    assert cpu.device == "cpu" and cpu.host_memory and cpu.host_threads and cpu.io_binding and not cpu.graph_capture
    assert cuda.device == "cuda" and not cuda.host_memory and cuda.io_binding and cuda.graph_capture and cuda.indexed
    assert trt.device == "cuda" and trt.io_binding and not trt.graph_capture and trt.max_batch
    assert cpu.precisions == cuda.precisions == ("fp32", "fp16", "int8") and trt.precisions == ("fp32", "fp16")
    assert "vaeinfer[cpu]" in cpu.install_hint and "vaeinfer[gpu]" in cuda.install_hint and "tensorrt" in trt.install_hint
    assert cpu.default and cuda.default and not trt.default  # a bare device string never picks TensorRT
    assert trt.auto is None and cuda.auto < cpu.auto  # "auto": CUDA first, then CPU, never TensorRT
    assert "cpu" in backends.available()
    assert ("cuda" in backends.available()) == ("CUDAExecutionProvider" in ort.get_available_providers())


def test_device_strings_and_backends():
    assert parse_device("cpu") == Device("cpu") and str(Device("cpu")) == "cpu"
    assert parse_device("CUDA:2") == Device("cuda", 2) and str(Device("cuda", 2)) == "cuda:2"
    assert parse_device("cuda:1", "tensorrt") == Device("tensorrt", 1) and str(Device("tensorrt", 1)) == "cuda:1"
    assert parse_device("auto", "tensorrt") == Device("tensorrt", 0)  # a named backend: no fallback
    assert parse_device(Device("cuda", 3)) == Device("cuda", 3)
    with pytest.raises(ValueError, match="runs on device 'cuda'"):
        parse_device("cpu", "tensorrt")
    with pytest.raises(ValueError, match="device must be"):
        parse_device("cpu:1")


def test_unknown_backend_is_a_typed_error_naming_the_known_ones(mlp):
    for call in (lambda: backends.get("directml"), lambda: vaeinfer.load(mlp.bundle, backend="directml"),
                 lambda: vaeinfer.load(mlp.bundle, backend="directml", isolate=True)):
        with pytest.raises(UnknownBackendError, match=r"'cpu', 'cuda', 'tensorrt', 'openvino'.*'directml'") as e:
            call()
        assert isinstance(e.value, BackendError) and isinstance(e.value, ValueError)


@pytest.mark.skipif("TensorrtExecutionProvider" in ort.get_available_providers(), reason="TensorRT is available here")
@pytest.mark.parametrize("name", ["cuda", "tensorrt"])
def test_unavailable_backend_says_how_to_install(mlp, name):
    if name in backends.available():
        pytest.skip(f"{name} is available here")
    entry = backends.get(name)
    with pytest.raises(BackendError) as e:
        vaeinfer.load(mlp.bundle, device="cuda", backend=name)
    assert entry.install_hint in str(e.value) and entry.title in str(e.value)


def test_tensorrt_provider_options(tmp_path, monkeypatch):
    from vaeinfer.backends import onnxruntime_cuda
    from vaeinfer.backends import onnxruntime_tensorrt as trt
    from vaeinfer.kinds.vae import vae_graphs

    decoder = vae_graphs((1, 28, 28), 16)["decoder"]
    opts = trt.provider_options(1, "fp16", tmp_path, decoder)
    assert opts["device_id"] == "1" and opts["trt_fp16_enable"] == "1"
    assert opts["trt_engine_cache_enable"] == "1" and opts["trt_engine_cache_path"] == str(tmp_path)
    assert opts["trt_timing_cache_enable"] == "1"
    assert opts["trt_profile_min_shapes"] == "z:1x16" and opts["trt_profile_max_shapes"] == f"z:{trt.MAX_BATCH}x16"
    assert opts["trt_profile_opt_shapes"] == f"z:{trt.OPT_BATCH}x16"
    assert trt.provider_options(0, "fp32", tmp_path)["trt_fp16_enable"] == "0"  # fp32 keeps the 1e-4 promise
    assert all(isinstance(v, str) for v in opts.values())
    assert trt.profile_shapes(vae_graphs((1, 28, 28), 16)["encoder"])["trt_profile_max_shapes"] == f"x:{trt.MAX_BATCH}x1x28x28"

    # the session asked for: TensorRT first, CUDA then CPU behind it, one engine cache per graph's sha256
    monkeypatch.setenv("VAEINFER_TENSORRT_CACHE", str(tmp_path))
    asked = {}
    monkeypatch.setattr(session, "create_session", lambda *a: asked.setdefault("args", a) and _Session(trt.PROVIDER))
    runner = backends.get("tensorrt").make_runner(b"graph", Device("tensorrt", 2), threads=None, what="g",
                                                    precision="fp16", spec=decoder)
    _, _, _, _, providers, uncaptured = asked["args"]
    (provider, options), cuda, cpu = providers
    assert provider == trt.PROVIDER and uncaptured is None and runner.binding == ("cuda", 2)
    assert cuda == (onnxruntime_cuda.PROVIDER, onnxruntime_cuda.provider_options(2)) and cpu == "CPUExecutionProvider"
    assert options == trt.provider_options(2, "fp16", trt.engine_cache(b"graph"), decoder)
    assert Path(options["trt_engine_cache_path"]).parent == tmp_path
    assert re.fullmatch(r"[0-9a-f]{32}", Path(options["trt_engine_cache_path"]).name)
    assert session.providers_for(Device("tensorrt", 2))[1:] == [cuda, cpu]


class _Session:
    def __init__(self, provider):
        self.provider = provider

    def get_providers(self):
        return [self.provider, "CPUExecutionProvider"]

    def run(self, names, feeds, options=None):
        return []


def test_runtime_names_no_backend():
    """Outside vaeinfer/backends/ and session.py (the onnxruntime layer), nothing names a provider
    or compares a device/backend name: the runtime asks capabilities."""
    banned = re.compile(r"CUDAExecutionProvider|CPUExecutionProvider|Tensorrt|==\s*[\"'](cpu|cuda)[\"']"
                        r"|[\"'](cpu|cuda)[\"']\s*==|\.kind\s*==\s*[\"']c")
    found = []
    for path in sorted(HERE.rglob("*.py")):
        rel = path.relative_to(HERE).as_posix()
        if rel.startswith("backends/") or rel == "session.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if banned.search(line):
                found.append(f"vaeinfer/{rel}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


# --- a backend that is not onnxruntime: one module's worth of code, registered by the test


class ReferenceRunner:
    """onnx's numpy reference evaluator behind the Runner protocol: no IO binding, no capture."""

    providers = ("onnx.reference",)
    graph_capture = False
    errors = (RuntimeError, ValueError, TypeError)

    def __init__(self, graph: bytes):
        import onnx
        from onnx.reference import ReferenceEvaluator

        model = onnx.load_from_string(graph)
        self._ports = {side: [self._port(v) for v in getattr(model.graph, side)] for side in ("input", "output")}
        self._evaluator = ReferenceEvaluator(model)

    @staticmethod
    def _port(value) -> Port:
        import onnx

        t = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
        return Port(value.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name, dims)

    def inputs(self):
        return self._ports["input"]

    def outputs(self):
        return self._ports["output"]

    def run(self, names, feeds):
        return [np.asarray(a) for a in self._evaluator.run(names, feeds)]


def _make_reference_runner(graph, device, *, threads, what, precision="fp32", spec=None, capture=False):
    return ReferenceRunner(graph)


@pytest.fixture
def reference_backend():
    pytest.importorskip("onnx.reference")
    entry = backends.register(Backend(
        name="onnx-reference", device="cpu", title="onnx's reference evaluator", engine="onnx.reference",
        install_hint="pip install onnx", is_available=lambda: True, make_runner=_make_reference_runner,
        host_memory=True, precisions=("fp32",)))
    yield entry
    del backends.REGISTRY[entry.name]


def test_a_new_backend_runs_a_bundle_end_to_end(reference_backend, mlp):
    ref = vaeinfer.load(mlp.bundle, device="cpu", backend="onnx-reference")
    cpu = vaeinfer.load(mlp.bundle, device="cpu", threads=1)
    assert ref.info.backend == "onnx-reference" and ref.info.device == "cpu"
    assert ref.info.providers == ("onnx.reference",) and cpu.info.backend == "cpu"
    x = mlp.images[:5]
    np.testing.assert_allclose(ref.encode(x).mean, cpu.encode(x).mean, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ref.sample(7, seed=2), cpu.sample(7, seed=2), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ref.sample(9, seed=1, batch_size=4), cpu.sample(9, seed=1), rtol=0, atol=1e-5)
    z = np.zeros((3, ref.latent_dim), np.float32)
    np.testing.assert_allclose(ref.run_graph("decoder", {"z": z})[0], cpu.decode_params(z), rtol=0, atol=1e-5)
    # capabilities it does not declare are refused, never faked
    with pytest.raises(ValueError, match="IO binding"):
        ref.run_graph("decoder", {"z": z}, keep_on_device=True)
    with pytest.raises(ValueError, match="IO binding"):
        vaeinfer.load(mlp.bundle, device="cpu", backend="onnx-reference", io_binding=True)
    with pytest.raises(ValueError, match="cuda_graph"):
        vaeinfer.load(mlp.bundle, device="cpu", backend="onnx-reference", cuda_graph=True)


def test_a_new_backend_checks_the_graph_signature(reference_backend, mlp, monkeypatch):
    """The runtime's signature check works from the runner's ports, whatever the backend."""
    from vaeinfer.errors import BundleError

    monkeypatch.setattr(ReferenceRunner, "outputs", lambda self: [Port("params", "int64", ("batch", 240))])
    with pytest.raises(BundleError, match="outputs"):
        vaeinfer.load(mlp.bundle, device="cpu", backend="onnx-reference")


def test_precisions_a_backend_does_not_run(reference_backend, mlp):
    import dataclasses

    backends.register(dataclasses.replace(reference_backend, name="fp16-only", precisions=("fp16",)))
    try:
        with pytest.raises(BackendError, match=r"runs precisions \('fp16',\), not 'fp32'"):
            vaeinfer.load(mlp.bundle, device="cpu", backend="fp16-only")
    finally:
        del backends.REGISTRY["fp16-only"]


def test_runners_are_runners(mlp):
    m = vaeinfer.load(mlp.bundle, device="cpu", threads=1)
    assert all(isinstance(g.runner, Runner) for g in m._graphs.values())


def test_sessions_keep_no_copy_of_the_graph_bytes(mlp):
    """onnxruntime's Python session would hold the bytes it was made from (for its provider
    fallback) beside its own weights: every graph in memory twice."""
    data = open_bundle(mlp.bundle).read_graph("decoder")
    before = sys.getrefcount(data)
    runner = backends.get("cpu").make_runner(data, Device("cpu"), threads=1, what="decoder")
    assert sys.getrefcount(data) == before
    z = np.zeros((1, *runner.inputs()[0].shape[1:]), np.float32)
    assert runner.run([runner.outputs()[0].name], {runner.inputs()[0].name: z})[0].shape[0] == 1
