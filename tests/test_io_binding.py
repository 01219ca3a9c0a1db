"""IO binding, fixed batch buckets (the CUDA-graph code path) and the CUDA provider options,
all tested on the CPU provider: the same code runs on CUDA with a different device string."""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest

import vaeinfer
from vaeinfer.errors import BackendError
from vaeinfer.backends import Device, parse_device
from vaeinfer.backends.onnxruntime_cuda import PROVIDER as CUDA
from vaeinfer.backends.onnxruntime_cuda import provider_options as cuda_provider_options
from vaeinfer.runtime import CUDA_GRAPH_BUCKETS, Graph, _buckets


@pytest.fixture(scope="module")
def model(conv):
    return vaeinfer.load(conv.bundle, device="cpu", threads=1)


def _z(model, n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, model.latent_dim), dtype=np.float32)


def _graph(model, role="decoder", **kwargs) -> Graph:
    g = model._graphs[role]
    return Graph(g.runner, g.spec, g.what, g.device, **kwargs)


def test_io_binding_matches_run(model, conv):
    plain = model._graphs["decoder"]
    bound = _graph(model, io_binding=True)
    z = _z(model, 37)
    np.testing.assert_array_equal(bound.run({"z": z})[0], plain.run({"z": z})[0])
    np.testing.assert_array_equal(bound.run({"z": z}, batch_size=8)[0], plain.run({"z": z})[0])
    x = conv.images[:5]
    enc_plain, enc_bound = model._graphs["encoder"], _graph(model, "encoder", io_binding=True)
    for a, b in zip(enc_plain.run({"x": x}), enc_bound.run({"x": x})):
        np.testing.assert_array_equal(a, b)


def test_load_with_io_binding_gives_identical_results(conv):
    a = vaeinfer.load(conv.bundle, device="cpu", threads=1)
    b = vaeinfer.load(conv.bundle, device="cpu", threads=1, io_binding=True)
    assert b._graphs["decoder"].io_binding and not a._graphs["decoder"].io_binding
    np.testing.assert_array_equal(a.sample(9, seed=3), b.sample(9, seed=3))
    np.testing.assert_array_equal(a.encode(conv.images[:4]).mean, b.encode(conv.images[:4]).mean)


def test_keep_on_device_returns_ort_values(model):
    z = _z(model, 6)
    (out,) = model.run_graph("decoder", {"z": z}, keep_on_device=True)
    assert isinstance(out, ort.OrtValue)
    assert out.device_name().lower() == "cpu" and out.shape() == [6, *model.info.image_shape]
    np.testing.assert_array_equal(out.numpy(), model.decode_params(z))
    # an OrtValue output can be fed on to another run without leaving the device
    (again,) = model.run_graph("decoder", {"z": ort.OrtValue.ortvalue_from_numpy(z)})
    np.testing.assert_array_equal(again, model.decode_params(z))


def test_run_graph_unknown_role(model):
    with pytest.raises(ValueError, match="prior"):
        model.run_graph("prior", {})


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 19])
def test_buckets_pad_and_match(model, n):
    g = _graph(model, buckets=(1, 4, 8))
    z = _z(model, n, seed=n)
    np.testing.assert_allclose(g.run({"z": z})[0], model.decode_params(z), rtol=0, atol=1e-5)


def test_bucket_results_are_not_views_of_reused_buffers(model):
    g = _graph(model, buckets=(4,))
    z1, z2 = _z(model, 3, seed=1), _z(model, 3, seed=2)
    first = g.run({"z": z1})[0]
    kept = first.copy()
    g.run({"z": z2})
    np.testing.assert_array_equal(first, kept)


def test_buckets_are_thread_safe(model):
    g = _graph(model, buckets=(2, 8))
    inputs = [_z(model, 1 + i % 7, seed=i) for i in range(24)]
    expected = [model.decode_params(z) for z in inputs]
    results, errors = [None] * len(inputs), []

    def work(i):
        try:
            results[i] = g.run({"z": inputs[i]})[0]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_buckets_are_not_cuda_graphs_on_cpu(model):
    g = _graph(model, buckets=(1, 2))
    assert g.buckets == (1, 2) and not g.cuda_graph
    assert model.info.cuda_graph == ()


def test_bucket_argument():
    assert _buckets(False) == () and _buckets(None) == ()
    assert _buckets(True) == CUDA_GRAPH_BUCKETS
    assert _buckets([64, 1, 8, 8]) == (1, 8, 64)
    for bad in ([0, 4], [], "x", 3.5):
        with pytest.raises(ValueError):
            _buckets(bad)


def test_cuda_graph_needs_cuda(conv):
    with pytest.raises(ValueError, match="cuda_graph"):
        vaeinfer.load(conv.bundle, device="cpu", cuda_graph=True)


def test_cuda_provider_options():
    opts = cuda_provider_options(1)
    assert opts["device_id"] == "1"
    assert opts["cudnn_conv_algo_search"] == "HEURISTIC"  # no multi-second stall on a new batch size
    assert opts["use_tf32"] == "0"  # images within 1e-4 of the CPU's
    assert "enable_cuda_graph" not in opts
    assert cuda_provider_options(0, capture=True)["enable_cuda_graph"] == "1"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in opts.items())


def test_cuda_runner_binds_provider_then_cpu(monkeypatch):
    """The CUDA backend asks onnxruntime for [(CUDA, its options), CPU] and binds outputs on cuda:N."""
    from vaeinfer import session

    asked = {}
    monkeypatch.setattr(session, "create_session", lambda *a: asked.setdefault("args", a) and _FakeSession())
    runner = Device("cuda", 3).entry.make_runner(b"", Device("cuda", 3), threads=None, what="g", capture=True)
    _, device, _, _, providers, uncaptured = asked["args"]
    assert providers == [(CUDA, cuda_provider_options(3, capture=True)), "CPUExecutionProvider"]
    assert uncaptured == [(CUDA, cuda_provider_options(3)), "CPUExecutionProvider"]  # if capture fails
    assert device == Device("cuda", 3) and runner.binding == ("cuda", 3)


class _FakeSession:
    def get_providers(self):
        return [CUDA, "CPUExecutionProvider"]

    def run(self, names, feeds, options=None):
        return []


def test_cpu_runner_binds_host_memory(model):
    assert model._graphs["decoder"].runner.binding == ("cpu", 0)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_without_provider_is_a_typed_error(conv):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(BackendError, match="CUDA"):
            vaeinfer.load(conv.bundle, device=device)
    with pytest.raises(BackendError):
        vaeinfer.load(conv.bundle, device="cuda", cuda_graph=True)
    m = vaeinfer.load(conv.bundle, device="auto", cuda_graph=True)  # auto falls back, buckets dropped
    assert m.info.device == "cpu" and m.info.cuda_graph == ()
    assert parse_device("auto") == Device("cpu")


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs a CUDA provider")
def test_cuda_graph_buckets_on_gpu(conv):
    cpu = vaeinfer.load(conv.bundle, device="cpu")
    gpu = vaeinfer.load(conv.bundle, device="cuda", cuda_graph=[1, 4, 16])
    assert gpu.info.providers[0] == CUDA
    z = np.random.default_rng(0).standard_normal((11, cpu.latent_dim), dtype=np.float32)
    for n in (1, 3, 11, 11, 16):
        np.testing.assert_allclose(gpu.decode(z[:n]), cpu.decode(z[:n]), rtol=0, atol=1e-4)
    (out,) = gpu.run_graph("decoder", {"z": z}, keep_on_device=True)
    assert out.device_name().lower() == "cuda"
    np.testing.assert_allclose(out.numpy(), cpu.decode_params(z), rtol=0, atol=1e-4)


def test_fast_run_is_the_binding_and_equal(model):
    from vaeinfer.session import fast_run as _fast_run

    g = model._graphs["decoder"]
    assert _fast_run(g.session) == g.session._sess.run  # the C++ binding, not the Python wrapper
    z = _z(model, 5)
    np.testing.assert_array_equal(g.runner.run(["params"], {"z": z})[0],
                                  g.session.run(["params"], {"z": z})[0])

    class Other:  # anything else that runs like a session keeps its own run
        def run(self, names, feeds, options=None):
            return []

    other = Other()
    assert _fast_run(other) == other.run


def test_run_bound_on_a_cuda_graph_session_skips_capture(model):
    """An IO-bound call outside the buckets must not replay a captured graph (its buffers are
    not the bucket's): it runs with annotation -1. On CPU the option is inert; check it is set."""
    from vaeinfer.session import OrtRunner

    g = _graph(model)
    session = g.session
    session.captured = True  # as on a CUDA session created with enable_cuda_graph
    try:
        runner = OrtRunner(session)
    finally:
        del session.captured
    g = Graph(runner, g.spec, g.what, g.device, buckets=(2,), io_binding=True)
    assert g.cuda_graph
    assert runner._uncaptured.get_run_config_entry("gpu_graph_id") == "-1"
    z = _z(model, 3)
    np.testing.assert_array_equal(g.run_bound({"z": z})[0], model.decode_params(z))
    _, (_, bucket) = g._bucket(2)
    assert bucket.options.get_run_config_entry("gpu_graph_id") == "1"


# --- large batches on CPU: one multi-threaded call, or parallel chunks on single-threaded sessions


@pytest.fixture(scope="module")
def two_threads(conv):
    return vaeinfer.load(conv.bundle, device="cpu", threads=2)


def test_parallel_chunks_are_bit_identical(two_threads):
    from vaeinfer.runtime import PARALLEL_CHUNK, PARALLEL_MIN_CHUNKS

    g = two_threads._graphs["decoder"]
    n = PARALLEL_CHUNK * PARALLEL_MIN_CHUNKS * 2 + 5
    z = _z(two_threads, n, seed=7)
    results = {}
    for mode in ("intra", "chunks"):
        g.mode = mode
        done = []
        results[mode] = two_threads.decode_params(z, progress=done.append)
        assert done == sorted(done) and done[-1] == n
    g.mode = None
    np.testing.assert_array_equal(results["intra"], results["chunks"])
    single = vaeinfer.load(two_threads.info.path, device="cpu", threads=1)
    np.testing.assert_array_equal(results["chunks"], single.decode_params(z))


def test_mode_is_chosen_by_timing(conv):
    from vaeinfer.runtime import _TRIALS, PARALLEL_CHUNK, PARALLEL_MIN_CHUNKS

    m = vaeinfer.load(conv.bundle, device="cpu", threads=2)
    g = m._graphs["decoder"]
    z = _z(m, PARALLEL_CHUNK * PARALLEL_MIN_CHUNKS * 2, seed=1)
    assert g.mode is None
    m.decode_params(z[:8])  # small batches are not trials
    assert g._trials == {"intra": [], "chunks": []}
    for _ in range(2 * _TRIALS):
        m.decode_params(z)
    assert g.mode in ("intra", "chunks")
    assert [len(t) for t in g._trials.values()] == [_TRIALS, _TRIALS]


def test_single_thread_has_no_parallel_mode(model):
    assert model._graphs["decoder"].mode == "intra" and model._graphs["decoder"]._serial_factory is None


def test_parallel_chunks_from_many_threads(two_threads):
    g = two_threads._graphs["decoder"]
    g.mode = "chunks"
    inputs = [_z(two_threads, 70 + i, seed=i) for i in range(6)]
    expected = [vaeinfer.load(two_threads.info.path, device="cpu", threads=1).decode_params(z) for z in inputs[:1]]
    results, errors = [None] * len(inputs), []

    def work(i):
        try:
            results[i] = two_threads.decode_params(inputs[i])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    g.mode = None
    assert not errors
    np.testing.assert_array_equal(results[0], expected[0])
    assert [len(r) for r in results] == [70 + i for i in range(6)]
