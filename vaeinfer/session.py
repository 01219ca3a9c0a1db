"""onnxruntime, shared by the onnxruntime backends (vaeinfer/backends/onnxruntime_*.py): session
options, session creation and the `OrtRunner` the runtime calls.

A backend module says which provider it binds and with which options; everything else is here.
onnxruntime itself would fall back to CPU silently when the asked provider fails to start, which
is why the bound providers are checked after creation: an explicit device that cannot be honoured
raises BackendError.
"""

from __future__ import annotations

import numpy as np

from vaeinfer.errors import BackendError, BundleError
from vaeinfer.spec import ORT_TYPES

CPU = "CPUExecutionProvider"
_DTYPES = {v: k for k, v in ORT_TYPES.items()}  # "tensor(float)" -> "float32"
_NUMPY = {"float32": np.float32, "int64": np.int64}


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError("onnxruntime is not installed: pip install 'vaeinfer[cpu]' "
                           "(or 'vaeinfer[gpu]' for CUDA; never both)") from e
    return onnxruntime


def has_provider(name: str) -> bool:
    """Whether this onnxruntime offers the provider `name` (False without onnxruntime)."""
    try:
        return name in _ort().get_available_providers()
    except BackendError:
        return False


_SHARED_ARENA = False


def _shared_arena(ort) -> None:
    """One host arena for every session made with arena="shared", growing by what is asked (not
    by powers of two): many sessions run one after the other then hold the largest run's memory
    once, instead of each its own (vaeinfer.exact_tiling's stage graphs within a budget)."""
    global _SHARED_ARENA
    if not _SHARED_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
        _SHARED_ARENA = True


def session_options(threads: int | None, arena: bool | str = True):
    ort = _ort()
    opts = ort.SessionOptions()
    # arena=False: host memory goes back after each run instead of staying in the session's arena;
    # arena="shared": the process's one shared arena (see _shared_arena)
    opts.enable_cpu_mem_arena = bool(arena)
    if arena is not True:
        # memory that must stay bounded: no memory pattern. From a shape's second run on,
        # onnxruntime would put all of a run's intermediate tensors in one block laid out by its
        # first run, with gaps between them. Without an arena (video steps): on a Wan 2.1 decoder
        # step (256x256) that block held 0.7 GiB more than the tensors alive at once, so every
        # step after the first peaked 17% higher (allocated tensor by tensor, a step peaks at what
        # is alive at once, at ~5% more CPU time: freshly mapped pages). In the shared arena
        # (exact tiling's stages): the blocks its first run freed could not serve that one block,
        # so the arena grew again (the attention graph's 2 x 256 MiB by another 512 MiB).
        opts.enable_mem_pattern = False
    if arena == "shared":
        _shared_arena(ort)
        opts.add_session_config_entry("session.use_env_allocators", "1")
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


def create_session(model: bytes, device, threads: int | None, what: str, providers: list,
                   uncaptured: list | None = None, arena: bool | str = True, weights: dict | None = None):
    """An InferenceSession for ONNX bytes with `providers` (onnxruntime's list: names or (name,
    options) pairs, the one that must bind first), or BackendError / BundleError saying why not.
    `device` (a vaeinfer Device) names the backend in messages. `uncaptured`, given when
    `providers` turn graph capture on: the list to retry with when the graph cannot be captured
    (some node not on the provider); `session.captured` (an attribute set here) says which.
    `weights`: {initializer name: host array} the session runs on instead of its own copies
    (onnxruntime's add_initializer: the arrays are used in place, and kept alive by the session).
    """
    ort = _ort()
    entry = device.entry
    provider = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if provider not in ort.get_available_providers():
        raise entry.unavailable(device, f"this onnxruntime has {ort.get_available_providers()}")
    opts = session_options(threads, arena)
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (weights or {}).values()]
    for name, value in zip(weights or {}, values):
        opts.add_initializer(name, value)
    try:
        session = ort.InferenceSession(model, sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for a bad model
        if uncaptured is not None and "graph" in str(e).lower():
            return create_session(model, device, threads, what, uncaptured, arena=arena, weights=weights)
        if provider != CPU and any(k in str(e) for k in (provider.removesuffix("ExecutionProvider"), "CUDA")):
            raise BackendError(f"{what}: {entry.title} failed to start on {device}: {e}") from None
        raise BundleError(f"{what}: onnxruntime cannot load this graph: {str(e)[:500]}") from None
    if session.get_providers()[0] != provider:
        raise BackendError(f"{what}: asked for {device} ({entry.title}) but onnxruntime bound "
                           f"{session.get_providers()} (is a CUDA driver and cuDNN 9 visible to this process?)")
    session.captured = uncaptured is not None
    session.shared_weights = values  # must outlive the session (each keeps its array alive)
    # onnxruntime's Python session keeps the bytes it was made from for as long as it lives, to
    # re-create itself on another provider (its fallback, which vaeinfer refuses: a failing
    # provider raises): a second copy of every weight, 1 GiB for a Wan 2.1 VAE's four graphs
    session.disable_fallback()
    if getattr(session, "_model_bytes", None) is not None:
        session._model_bytes = None
    return session


def fast_run(session):
    """The session's run(output_names, feeds, run_options). For an onnxruntime InferenceSession,
    its C++ binding's own run: the Python wrapper's per-call checks (feed names, OrtValue
    ownership, a silent fallback to CPU when the CUDA provider fails) are redundant after
    vaeinfer's validation or against its rules, and cost about 6 us a call."""
    inner = getattr(session, "_sess", None) if type(session).__module__.startswith("onnxruntime") else None
    run = getattr(inner, "run", None)
    return run if callable(run) else session.run


_ORT_ERRORS: tuple = ()


def ort_errors() -> tuple:
    """onnxruntime's exception classes (plain Exception subclasses), plus RuntimeError (what its
    IO binding raises) and MemoryError."""
    global _ORT_ERRORS
    if not _ORT_ERRORS:
        state = vars(_ort().capi.onnxruntime_pybind11_state).values()
        _ORT_ERRORS = (MemoryError, RuntimeError, *(v for v in state if isinstance(v, type) and issubclass(v, Exception)))
    return _ORT_ERRORS


class OrtRunner:
    """A `vaeinfer.backends.Runner` over an onnxruntime InferenceSession (IO binding included).

    binding: the (device_type, device_id) that IO binding and OrtValues take ("cpu", 0; "cuda", N).
    """

    def __init__(self, session, binding: tuple[str, int] = ("cpu", 0)):
        self.session, self.binding = session, binding
        self.providers = tuple(session.get_providers())
        self.graph_capture = bool(getattr(session, "captured", False))
        self.errors = ort_errors()
        self._uncaptured = self.run_options(-1) if self.graph_capture else None
        run = fast_run(session)
        self.run = lambda names, feeds: run(names, feeds, None)

    def inputs(self):
        return _ports(self.session.get_inputs())

    def outputs(self):
        return _ports(self.session.get_outputs())

    def run_options(self, graph_id: int | None = None):
        """Run options; with graph capture, `graph_id` names the captured graph (-1: run uncaptured)."""
        options = _ort().RunOptions()
        if self.graph_capture and graph_id is not None:
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return options

    def run_bound(self, names: list[str], feeds: dict, keep_on_device: bool) -> list:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if hasattr(value, "data_ptr"):  # an OrtValue, e.g. the device output of another graph
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in names:
            binding.bind_output(name, *self.binding)
        binding.synchronize_inputs()
        # not a bucket's fixed buffers: never replay a captured graph (annotation -1)
        self.session.run_with_iobinding(binding, self._uncaptured)
        if keep_on_device:
            return binding.get_outputs()
        return binding.copy_outputs_to_cpu()

    def bucket(self, size: int, inputs, outputs, graph_id: int | None) -> OrtBucket:
        return OrtBucket(self, size, inputs, outputs, graph_id)


class OrtBucket:
    """Preallocated OrtValues for `size` rows, bound once, so that addresses stay fixed."""

    def __init__(self, runner: OrtRunner, size: int, inputs, outputs, graph_id: int | None):
        new = _ort().OrtValue.ortvalue_from_shape_and_type
        self.session, self.binding = runner.session, runner.session.io_binding()
        self.inputs = {t.name: new([size, *t.shape[1:]], _NUMPY[t.dtype], *runner.binding) for t in inputs}
        self.outputs = [new([size, *t.shape[1:]], _NUMPY[t.dtype], *runner.binding) for t in outputs]
        for name, v in self.inputs.items():
            self.binding.bind_ortvalue_input(name, v)
        for t, v in zip(outputs, self.outputs):
            self.binding.bind_ortvalue_output(t.name, v)
        self.options = runner.run_options(graph_id)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for name, value in feeds.items():
            self.inputs[name].update_inplace(np.ascontiguousarray(value))
        self.session.run_with_iobinding(self.binding, self.options)
        # a CPU OrtValue's numpy() is a view of the buffer, a CUDA one's a fresh host copy
        return [v.numpy() for v in self.outputs]


def _ports(args) -> list:
    from vaeinfer.backends import Port

    return [Port(a.name, _DTYPES.get(a.type, a.type), tuple(a.shape)) for a in args]


class OrtBackend:
    """An onnxruntime backend's `make_runner`: its `providers(device, capture=, precision=, spec=,
    graph=)` list, and the device type its IO binding binds ("cpu", "cuda"; the index is the device's)."""

    def __init__(self, providers, binding: str):
        self.providers, self.binding = providers, binding

    def __call__(self, graph: bytes, device, *, threads: int | None, what: str, precision: str = "fp32",
                 spec=None, capture: bool = False, arena: bool | str = True, weights: dict | None = None) -> OrtRunner:
        def providers(capture):
            return self.providers(device, capture=capture, precision=precision, spec=spec, graph=graph)

        session = create_session(graph, device, threads, what, providers(capture), providers(False) if capture else None,
                                 **({} if arena is True else {"arena": arena}), **({"weights": weights} if weights else {}))
        return OrtRunner(session, (self.binding, device.index))


def providers_for(device, capture: bool = False) -> list:
    """onnxruntime's providers list for a Device of an onnxruntime backend (for tools that make
    their own sessions, e.g. benchmarks/run.py)."""
    return device.entry.make_runner.providers(device, capture=capture)


from vaeinfer.backends import Device, parse_device  # noqa: E402,F401  (where they lived before vaeinfer.backends)
