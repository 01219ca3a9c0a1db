"""The execution backends a model can run on, one registry entry each.

A `Backend` declares what it can do (where its outputs live, IO binding, graph capture, the
precisions it runs, the extra that installs it) and makes a `Runner` for one verified graph. The
runtime (`vaeinfer.runtime`) asks these capabilities and never compares backend names.

A device string names a device family and an index ("auto", "cpu", "cuda", "cuda:N"); a backend
runs on one family. Without `backend=`, a device string picks its family's default backend and
"auto" tries the backends that declare `auto` rank, lowest first. `parse_device` turns both into
a `Device`: the backend's name, the device index and whether "auto" chose it.

Adding a backend: one module here that calls `register(Backend(...))` (and its import below),
and the pip extra its `install_hint` names.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from vaeinfer.errors import BackendError, UnknownBackendError

REGISTRY: dict[str, Backend] = {}


@dataclass(frozen=True)
class Port:
    """One input or output of a runner's graph, as the backend reads it from the graph."""

    name: str
    dtype: str  # "float32" | "int64" (vaeinfer.spec.DTYPES); anything else as the backend names it
    shape: tuple  # ints for fixed axes, anything else (a name, None) for a dynamic one


@runtime_checkable
class Runner(Protocol):
    """One graph, loaded by a backend on one device; `run` must be safe to call from many threads.

    Only a backend that declares `io_binding` has `run_bound` and `bucket`, and only one that
    declares `graph_capture` sets `graph_capture` True (when the graph really was captured).
    """

    providers: tuple[str, ...]  # what the backend bound, in priority order (`info.providers`)
    graph_capture: bool  # this graph replays captured device graphs for bucket runs
    errors: tuple[type, ...]  # the exception types its calls raise (the runtime turns them into typed errors)

    def inputs(self) -> list[Port]: ...

    def outputs(self) -> list[Port]: ...

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs `names`, in that order, for host arrays `feeds`; backend exceptions pass through."""

    # io_binding backends only:
    # run_bound(names, feeds, keep_on_device) -> list: feeds may be host arrays or the backend's
    #     device values; outputs as host arrays, or left on the device (keep_on_device=True)
    # bucket(size, inputs, outputs, graph_id) -> Bucket: preallocated buffers for `size` rows;
    #     `Bucket.run(feeds)` fills them from host arrays of exactly `size` rows and returns the
    #     outputs as host arrays (views of the buffers when the backend has `host_memory`);
    #     graph_id (1, 2, ...) names its captured graph, None when not capturing


@dataclass(frozen=True)
class Backend:
    name: str  # what `backend=` and `info.backend` say: "cpu", "cuda", "tensorrt"
    device: str  # the device family it runs on, as device strings name it: "cpu" | "cuda"
    title: str  # what it is, for messages: "onnxruntime's CUDA provider"
    engine: str  # the library that runs the graphs, for messages: "onnxruntime"
    install_hint: str  # how to get it, e.g. "install 'vaeinfer[gpu]' (onnxruntime-gpu) without onnxruntime"
    is_available: Callable[[], bool]  # cheap: can this process make runners (no graph loaded)
    # (graph bytes, Device, *, threads, what, precision, spec, capture, arena) -> Runner; BackendError if
    # it cannot run here, BundleError if the graph is refused; capture: try graph capture (if declared);
    # arena=False: give host memory back after each run and peak at what is alive at once (no
    # arena, no memory pattern: a run's peak is the same on every call), "shared": one host arena
    # for all such runners (a backend without a host arena ignores it); weights (backends with
    # `shared_weights` only): {initializer name: host array} to run on instead of the graph's own
    make_runner: Callable[..., Runner]
    indexed: bool = False  # device strings carry an index ("cuda:1")
    default: bool = False  # the backend a bare device string of its family picks
    auto: int | None = None  # "auto" tries available backends by this rank, lowest first; None: never
    host_memory: bool = False  # outputs live in host memory: no device -> host copy, buffers are views
    host_threads: bool = False  # runs on the host's cores: parallel single-threaded chunks may pay off
    io_binding: bool = False  # runners have `run_bound` and `bucket` (bound inputs, preallocated outputs)
    graph_capture: bool = False  # can replay captured graphs for fixed batch buckets (`cuda_graph=`)
    precisions: tuple[str, ...] = ("fp32",)  # the bundle precisions it runs
    max_batch: int | None = None  # the most rows one call may take (larger batches run in chunks)
    # runs a graph on host arrays given for some of its initializers, without copying them: graphs
    # that hold the same weights (`vaeinfer.runtime.shared_weights`) keep one copy between them
    shared_weights: bool = False

    def unavailable(self, device: Device | str, detail: str = "") -> BackendError:
        """The error for asking for this backend where it cannot run (`detail`: what was found instead)."""
        return BackendError(f"device {device} asked for {self.title} (backend {self.name!r}), but this process "
                            f"has none{f' ({detail})' if detail else ''}; {self.install_hint}, or use device='cpu'")


def register(backend: Backend) -> Backend:
    REGISTRY[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    """The registered backend called `name`; UnknownBackendError naming the known ones otherwise."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise UnknownBackendError(f"backend must be one of {names()}, got {name!r:.40}")
    return REGISTRY[name]


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def available() -> tuple[str, ...]:
    """The registered backends that can run in this process."""
    return tuple(b.name for b in REGISTRY.values() if b.is_available())


@dataclass(frozen=True)
class Device:
    """Where a model runs, parsed once from the user's strings (`parse_device`) and passed around."""

    backend: str  # a registered backend's name
    index: int = 0
    auto: bool = False  # chosen by "auto": fall back to the CPU backend instead of raising

    @property
    def entry(self) -> Backend:
        return get(self.backend)

    def __str__(self):
        entry = self.entry
        return f"{entry.device}:{self.index}" if entry.indexed else entry.device


def _families() -> dict[str, bool]:
    """device family -> whether its device strings carry an index."""
    return {b.device: b.indexed for b in REGISTRY.values()}


def parse_device(device: str | Device, backend: str | None = None) -> Device:
    """The `Device` for "auto", a family ("cpu", "cuda") or "family:N", run by `backend` (default:
    the family's default backend; for "auto", the available backend of lowest `auto` rank).
    A Device is returned as it is. ValueError for a bad string, UnknownBackendError for a bad name."""
    if isinstance(device, Device):
        return device
    entry = None if backend is None else get(backend)
    families = _families()
    indexed = [f for f, i in families.items() if i]
    m = re.fullmatch(rf"(auto|{'|'.join(map(re.escape, families))})(?::(\d+))?", str(device).strip().lower())
    if not m or (m[2] is not None and m[1] not in indexed):
        named = ", ".join(f"'{f}' or '{f}:N'" if i else f"'{f}'" for f, i in families.items())
        raise ValueError(f"device must be 'auto', {named}, got {device!r}")
    family, index = m[1], int(m[2] or 0)
    if entry is not None:  # a named backend: never replaced by another
        if family not in ("auto", entry.device):
            raise ValueError(f"backend {entry.name!r} runs on device '{entry.device}', got device {device!r}")
        return Device(entry.name, index)
    if family == "auto":
        ranked = sorted((b for b in REGISTRY.values() if b.auto is not None), key=lambda b: b.auto)
        first = next((b for b in ranked if b.is_available()), ranked[-1])
        return Device(first.name, 0, auto=first is not ranked[-1])  # the last has no fallback
    return Device(next(b.name for b in REGISTRY.values() if b.device == family and b.default), index)


def for_precision(device: Device, precision: str) -> Device:
    """`device` if its backend runs `precision`; else the first registered backend of the same
    device family that runs it and is available here (bf16 on "cpu": OpenVINO). BackendError
    naming the candidates and how to install them when none is."""
    if precision in device.entry.precisions:
        return device
    family = device.entry.device
    candidates = [b for b in REGISTRY.values() if b.device == family and precision in b.precisions]
    for b in candidates:
        if b.is_available():
            return Device(b.name, device.index)
    hints = "; ".join(f"{b.title} (backend {b.name!r}): {b.install_hint}" for b in candidates)
    raise BackendError(f"precision {precision!r} on device '{family}' needs " + (hints or "a backend that runs it; none is registered"))


def fallback() -> Device:
    """Where "auto" goes when its first choice fails to start: the last-ranked auto backend."""
    return Device(max((b for b in REGISTRY.values() if b.auto is not None), key=lambda b: b.auto).name)


from vaeinfer.backends import onnxruntime_cpu, onnxruntime_cuda, onnxruntime_tensorrt, openvino  # noqa: E402,F401  (each registers itself)
