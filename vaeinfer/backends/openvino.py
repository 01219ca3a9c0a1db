"""OpenVINO on the CPU (`backend="openvino"`, the extra `vaeinfer[openvino]`).

It compiles the bundle's verified ONNX bytes in memory (`Core.read_model(bytes)`: no file is read
by path) for OpenVINO's CPU plugin, which uses the CPU's matrix units where onnxruntime's CPU
provider does not: bf16 on AMX (Intel Xeon 4th gen+) and AVX-512 BF16 (AMD Zen 4+), int8 on AMX
and VNNI.

Precisions:
- fp32: the fp32 graph with inference precision f32 (OpenVINO would otherwise default to bf16
  on such CPUs); outputs agree with onnxruntime's to float rounding.
- bf16: the fp32 graph with inference precision bf16 (weights and activations rounded to bf16,
  accumulation in fp32); only where the CPU plugin lists the "BF16" capability.
- int8: the bundle's int8 (QDQ) graphs, which OpenVINO runs as int8 kernels.

One compiled model serves many threads: each calling thread gets its own infer request (a
request is not thread-safe; the compiled model is). `threads` sets INFERENCE_NUM_THREADS; one
stream, latency hint, as one onnxruntime session with that many intra-op threads.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

from vaeinfer.backends import Backend, Port, register
from vaeinfer.errors import BackendError, BundleError

INSTALL_HINT = "install 'vaeinfer[openvino]' (the openvino package)"
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the QDQ graph's float parts in f32
_DTYPES = {"f32": "float32", "i64": "int64"}


@functools.lru_cache(maxsize=1)
def _core():
    import openvino

    return openvino.Core()


def is_available() -> bool:
    try:
        return "CPU" in _core().available_devices
    except Exception:  # ImportError, or a plugin that fails to start: not available here
        return False


def capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU plugin can do here ("FP32", "BF16", "INT8", ...); () without OpenVINO."""
    if not is_available():
        return ()
    return tuple(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__


def _port(port) -> Port:
    kind = port.get_element_type().get_type_name()
    return Port(port.get_any_name(), _DTYPES.get(kind, kind),
                tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape()))


class OpenVINORunner:
    """A `vaeinfer.backends.Runner` over an OpenVINO compiled model."""

    graph_capture = False

    def __init__(self, graph: bytes, *, threads: int | None, what: str, precision: str):
        if precision == "bf16" and "BF16" not in capabilities():
            raise BackendError(f"{what}: bf16 needs a CPU with AMX or AVX-512 BF16 (OpenVINO's CPU plugin lists "
                               f"{list(capabilities())}); use precision 'fp32' or 'int8'")
        core = _core()
        try:
            model = core.read_model(graph, b"")
        except RuntimeError as e:
            raise BundleError(f"{what}: OpenVINO cannot read the graph: {str(e).strip()[:300]}") from None
        config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as e:
            raise BackendError(f"{what}: OpenVINO cannot compile the graph for the CPU: {str(e).strip()[:300]}") from None
        self.providers = (f"OpenVINO {version().split('-')[0]} CPU ({HINTS[precision]})",)
        self.errors = (RuntimeError,)
        # the graph's own signature, as read: compiling may forget a static axis (the int8 step
        # graphs of a video VAE come out of the CPU plugin's low-precision passes as all dynamic)
        self._inputs = [_port(p) for p in model.inputs]
        self._outputs = [_port(p) for p in model.outputs]
        self._index = {p.get_any_name(): i for i, p in enumerate(self.compiled.outputs)}
        self._local = threading.local()

    def inputs(self) -> list[Port]:
        return self._inputs

    def outputs(self) -> list[Port]:
        return self._outputs

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()}, share_inputs=True)
        # copies: the request's output buffers are overwritten by its next call
        return [request.get_output_tensor(self._index[n]).data.copy() for n in names]


def make_runner(graph: bytes, device, *, threads, what, precision="fp32", spec=None, capture=False, arena=True):
    return OpenVINORunner(graph, threads=threads, what=what, precision=precision)


BACKEND = register(Backend(
    name="openvino", device="cpu", title="OpenVINO's CPU plugin", engine="openvino", install_hint=INSTALL_HINT,
    is_available=is_available, make_runner=make_runner, host_memory=True, host_threads=False,
    precisions=("fp32", "bf16", "int8"),
))
