"""onnxruntime sessions behind one small factory: device -> providers, options, creation.

`device="auto"` picks CUDA only when a session really binds the CUDA provider; an explicit
"cuda" / "cuda:N" that cannot be honoured raises BackendError. onnxruntime itself would fall back
to CPU silently, which is why the bound providers are checked after creation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from vaeinfer.errors import BackendError, BundleError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError("onnxruntime is not installed: pip install 'vaeinfer[cpu]' "
                           "(or 'vaeinfer[gpu]' for CUDA; never both)") from e
    return onnxruntime


@dataclass(frozen=True)
class Device:
    """Where a model runs, parsed once from the user's string (`parse_device`) and passed around."""

    kind: str  # a key of PROVIDERS: "cpu" | "cuda"
    index: int = 0
    auto: bool = False  # chosen by "auto": fall back to CPU instead of raising

    def __str__(self):
        return "cpu" if self.kind == "cpu" else f"{self.kind}:{self.index}"

    @property
    def provider(self) -> "Provider":
        return PROVIDERS[self.kind]


def parse_device(device: str | Device) -> Device:
    """The `Device` for "auto", "cpu", "cuda" or "cuda:N" (a Device is returned as it is)."""
    if isinstance(device, Device):
        return device
    accelerators = [k for k in PROVIDERS if k != "cpu"]
    m = re.fullmatch(rf"(auto|cpu|{'|'.join(accelerators)})(?::(\d+))?", str(device).strip().lower())
    if not m or (m[2] is not None and m[1] not in accelerators):
        named = ", ".join(f"'{k}' or '{k}:N'" for k in accelerators)
        raise ValueError(f"device must be 'auto', 'cpu', {named}, got {device!r}")
    if m[1] == "auto":
        available = _ort().get_available_providers()
        first = next((k for k in accelerators if PROVIDERS[k].name in available), None)
        return Device(first, 0, auto=True) if first else Device("cpu")
    return Device(m[1], int(m[2] or 0))


# Batch sizes that get a captured CUDA graph each when `cuda_graph=True` (a call is padded up to
# the next bucket; larger calls run in chunks of the largest one).
CUDA_GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def cuda_provider_options(index: int, cuda_graph: bool = False) -> dict[str, str]:
    """CUDA provider options: the one place where they are chosen.

    - cudnn_conv_algo_search HEURISTIC: EXHAUSTIVE (onnxruntime's default) benchmarks every
      algorithm the first time each input shape is seen, a multi-second stall on every new
      batch size; the heuristic choice costs nothing and is within a few percent here.
    - use_tf32 0: TF32 convolutions/matmuls would break the promise that VAE images agree
      within 1e-4 across providers.
    - enable_cuda_graph: replay captured CUDA graphs (fixed shapes, IO-bound buffers; see
      `Graph` in runtime.py); only when asked, since it needs every node on the CUDA provider.
    Values are strings: onnxruntime parses provider options from text.
    """
    opts = {
        "device_id": str(int(index)),
        "cudnn_conv_algo_search": "HEURISTIC",
        "do_copy_in_default_stream": "1",
        "arena_extend_strategy": "kSameAsRequested",
        "use_tf32": "0",
    }
    if cuda_graph:
        opts["enable_cuda_graph"] = "1"
    return opts


@dataclass(frozen=True)
class Provider:
    """One execution provider: what a device kind needs from onnxruntime."""

    name: str  # onnxruntime's provider name
    options: Callable[[int, bool], dict] | None  # (device index, cuda_graph) -> provider options
    binding: str  # IO binding / OrtValue device type


# device kind -> provider; a new execution provider is one entry here ("auto" tries them in order)
PROVIDERS = {
    "cpu": Provider(CPU, None, "cpu"),
    "cuda": Provider(CUDA, cuda_provider_options, "cuda"),
}


def providers_for(device: Device, cuda_graph: bool = False) -> list:
    p = device.provider
    if p.options is None:
        return [p.name]
    return [(p.name, p.options(device.index, cuda_graph)), CPU]


def ort_device(device: Device) -> tuple[str, int]:
    """(device_type, device_id) as onnxruntime's IO binding and OrtValue take them."""
    return device.provider.binding, 0 if device.kind == "cpu" else device.index


def session_options(threads: int | None):
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        opts.intra_op_num_threads = threads
    # fatal only: onnxruntime would write warnings, and each error it also raises (which vaeinfer
    # turns into a typed exception carrying the message), to the app's stderr
    opts.log_severity_level = 4
    return opts


def create_session(model: bytes, device: Device, threads: int | None, what: str, cuda_graph: bool = False):
    """An InferenceSession for ONNX bytes on `device`, or BackendError / BundleError saying why not.

    With cuda_graph=True on CUDA, a graph that cannot be captured (some node not on the CUDA
    provider) is created without it; `session.cuda_graph` (an attribute set here) says which.
    """
    ort = _ort()
    if device.provider.name not in ort.get_available_providers():
        raise BackendError(f"device {device} asked for, but this onnxruntime has no CUDA provider "
                           f"(available: {ort.get_available_providers()}); install 'vaeinfer[gpu]' "
                           "(onnxruntime-gpu) without onnxruntime, or use device='cpu'")
    cuda_graph = bool(cuda_graph) and device.kind == "cuda"
    try:
        session = ort.InferenceSession(model, sess_options=session_options(threads),
                                       providers=providers_for(device, cuda_graph))
    except Exception as e:  # onnxruntime raises its own exception types for a bad model
        if cuda_graph and "graph" in str(e).lower():
            return create_session(model, device, threads, what, cuda_graph=False)
        if device.kind == "cuda" and "CUDA" in str(e):
            raise BackendError(f"{what}: the CUDA provider failed to start on cuda:{device.index}: {e}") from None
        raise BundleError(f"{what}: onnxruntime cannot load this graph: {str(e)[:500]}") from None
    if session.get_providers()[0] != device.provider.name:
        raise BackendError(f"{what}: asked for {device} but onnxruntime bound {session.get_providers()} "
                           "(is a CUDA driver and cuDNN 9 visible to this process?)")
    session.cuda_graph = cuda_graph
    return session
