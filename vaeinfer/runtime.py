"""What every loaded model shares: a backend runner per graph, signature checks, chunked runs, info.

A loaded model holds no mutable state after construction, and a runner's `run` is thread-safe
(`vaeinfer.backends.Runner`), so one model serves concurrent calls from many threads. Which fast
paths a graph takes (IO binding, fixed buckets, graph capture, parallel chunks) follows from its
backend's declared capabilities, never from its name.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vaeinfer import backends
from vaeinfer import likelihood as lik
from vaeinfer.bundle import Bundle
from vaeinfer.inputs import all_finite
from vaeinfer.errors import BackendError, BundleError, InputError, OutputError, VaeinferError
from vaeinfer import precisions
from vaeinfer.results import ModelInfo
from vaeinfer.backends import Device, fallback, parse_device
from vaeinfer.spec import GraphSpec, example_inputs, is_fixed

# Batch sizes that get a captured device graph each when `cuda_graph=True` (a call is padded up to
# the next bucket; larger calls run in chunks of the largest one).
CUDA_GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

DEFAULT_BATCH = 512  # rows per backend call when the caller gives no batch_size
# CPU, several threads, a large batch: calls of PARALLEL_CHUNK rows on single-threaded sessions,
# one per worker thread, can beat one multi-threaded call on the whole batch (small calls stay in
# cache; no per-operator synchronisation; the operators onnxruntime runs on one thread, such as
# the int8 graphs' layout transposes, no longer serialise). Which is faster is measured per graph
# on its first large calls (both give bit-identical results).
PARALLEL_CHUNK = 16
PARALLEL_MIN_CHUNKS = 2  # per worker: batches smaller than this run as one multi-threaded call
_TRIALS = 4  # large calls timed per mode before choosing (the first two of each warm up)
MODE_TRIAL_CALLS = 2 * _TRIALS  # large calls after which every graph has chosen its execution mode
_MARGIN = 0.93  # chunks must take at most this fraction of the single call's time to be chosen


class Graph:
    """One backend runner (`vaeinfer.backends.Runner`) plus the spec it must honour.

    Three ways to run a chunk, all returning the same values:
    - `runner.run` (the default on host-memory backends: the least per-call overhead there);
    - IO binding (`run_bound`, backends with `io_binding`): inputs bound from host arrays,
      outputs allocated by the backend on its device and, with keep_on_device=True, left there;
    - fixed batch buckets (`buckets`, backends with `io_binding`): preallocated device buffers per
      bucket size, a call padded up to the next bucket. This is what graph capture needs (fixed
      shapes, fixed addresses); each bucket replays its own captured graph.
    """

    def __init__(self, runner, spec: GraphSpec, what: str, device: Device | None = None,
                 buckets: tuple[int, ...] = (), io_binding: bool = False, workers: int = 1, serial=None):
        self.runner, self.spec, self.what = runner, spec, what
        self.device = device or fallback()
        backend = self.device.entry
        self._host_memory, self._max_batch = backend.host_memory, backend.max_batch
        self._errors, self._engine = runner.errors, backend.engine
        self._check_signature()
        self._output_names = [t.name for t in spec.outputs]
        self._float_outputs = [i for i, t in enumerate(spec.outputs) if t.dtype == "float32"]
        # built once, not per call: what each checked float output is called in errors
        self._finite_checks = tuple((i, f"{what} output {self._output_names[i]}") for i in self._float_outputs)
        self._trailing = [tuple(t.shape[1:]) for t in spec.outputs]
        # every axis but the batch fixed: one tuple comparison per output checks its shape
        self._fixed_trailing = self._trailing if all(map(is_fixed, (d for t in self._trailing for d in t))) else None
        self._run = runner.run
        self.io_binding = bool(io_binding)
        self.buckets = tuple(sorted({int(b) for b in buckets}))
        if any(b < 1 for b in self.buckets):
            raise ValueError(f"batch buckets must be positive, got {buckets}")
        if (self.io_binding or self.buckets) and not backend.io_binding:
            raise ValueError(f"{what}: io_binding and batch buckets need a backend with IO binding; "
                             f"{backend.title} (backend {backend.name!r}) has none")
        self.cuda_graph = bool(runner.graph_capture) and bool(self.buckets)
        self._bucket_state: dict[int, tuple] = {}
        self._bucket_locks = {b: threading.Lock() for b in self.buckets}
        self._state_lock = threading.Lock()
        # parallel chunks (CPU): `serial()` makes a single-threaded session of the same graph
        self.workers = max(1, int(workers))
        self._serial_factory = serial if self.workers > 1 and not self.buckets and not self.io_binding else None
        self._serial_run = None
        self.mode: str | None = None if self._serial_factory else "intra"  # "intra" | "chunks", chosen by timing
        self._trials: dict[str, list[float]] = {"intra": [], "chunks": []}

    @property
    def session(self):
        """The backend's own session object, where it has one (onnxruntime: the InferenceSession)."""
        return getattr(self.runner, "session", None)

    def _check_signature(self) -> None:
        """The graph's own inputs/outputs must be exactly the ones the manifest promises."""
        for side, actual, expected in (("inputs", self.runner.inputs(), self.spec.inputs),
                                       ("outputs", self.runner.outputs(), self.spec.outputs)):
            got = [(a.name, a.dtype, len(a.shape)) for a in actual]
            want = [(t.name, t.dtype, len(t.shape)) for t in expected]
            if got != want:
                raise BundleError(f"{self.what}: the graph's {side} are {got}, the manifest promises {want}")
            for a, t in zip(actual, expected):
                # a symbolic spec axis ("height") must be dynamic in the graph too; a fixed one equal
                fits = all(d == s if is_fixed(s) else not isinstance(d, int) for d, s in zip(a.shape[1:], t.shape[1:]))
                if not fits or isinstance(a.shape[0], int):
                    raise BundleError(f"{self.what}: {side[:-1]} {a.name} has shape {a.shape}, "
                                      f"the manifest promises {list(t.shape)} with a dynamic batch axis")

    def run(self, feeds: dict[str, np.ndarray], batch_size: int | None = None, progress=None) -> list[np.ndarray]:
        """Run over the batch axis in chunks of `batch_size`; non-finite float outputs raise.

        `progress`, if given, is called with the number of rows done after each chunk.
        """
        n = len(next(iter(feeds.values())))
        step = batch_size or DEFAULT_BATCH
        if self.buckets:
            step = min(step, self.buckets[-1])
        if self._max_batch:
            step = min(step, self._max_batch)
        if self._serial_factory is not None and n >= PARALLEL_CHUNK * PARALLEL_MIN_CHUNKS * self.workers:
            outs = self._run_large(feeds, n, step, progress)
        elif n <= step and progress is None:
            outs = self._chunk(feeds)
        else:
            outs = self._sequential(feeds, n, step, progress)
        for i, what in self._finite_checks:
            check_finite(outs[i], what)
        return outs

    def _sequential(self, feeds: dict[str, np.ndarray], n: int, step: int, progress=None) -> list[np.ndarray]:
        parts = []
        for i in range(0, n, step):
            parts.append(self._chunk({k: v[i:i + step] for k, v in feeds.items()}))
            if progress is not None:
                progress(min(n, i + step))
        return [np.concatenate(p) for p in zip(*parts)] if len(parts) > 1 else parts[0]

    def _run_large(self, feeds: dict[str, np.ndarray], n: int, step: int, progress) -> list[np.ndarray]:
        """A large batch on CPU: the mode chosen for this graph, or a timed trial of one of them."""
        mode = self.mode
        if mode is None:
            with self._state_lock:
                # one mode after the other, not alternating: the multi-threaded session's idle
                # workers keep spinning for a moment after its run and would slow the next call
                mode = self.mode or ("intra" if len(self._trials["intra"]) < _TRIALS else "chunks")
        t0 = time.perf_counter()
        if mode == "chunks":
            outs = self._parallel_chunks(feeds, n, min(step, PARALLEL_CHUNK), progress)
        else:
            outs = self._sequential(feeds, n, step, progress)
        if self.mode is None:
            self._record(mode, (time.perf_counter() - t0) / n)
        return outs

    def trial_timings(self) -> dict[str, tuple[float, ...]]:
        """Seconds per row of each timed trial call, per execution mode ("intra", "chunks")."""
        with self._state_lock:
            return {mode: tuple(t) for mode, t in self._trials.items()}

    def _record(self, mode: str, seconds_per_row: float) -> None:
        with self._state_lock:
            if self.mode is not None:
                return
            self._trials[mode].append(seconds_per_row)
            if all(len(t) >= _TRIALS for t in self._trials.values()):
                # parallel chunks only when clearly faster: on a near tie, one call is simpler
                intra, chunks = (min(self._trials[m][2:]) for m in ("intra", "chunks"))
                self.mode = "chunks" if chunks < _MARGIN * intra else "intra"

    def _parallel_chunks(self, feeds: dict[str, np.ndarray], n: int, size: int, progress) -> list[np.ndarray]:
        if self._serial_run is None:
            with self._state_lock:
                if self._serial_run is None:
                    self._serial_run = self._serial_factory().run
        run, starts = self._serial_run, range(0, n, size)
        futures = [_pool(self.workers).submit(self._chunk, {k: v[i:i + size] for k, v in feeds.items()}, run)
                   for i in starts]
        parts = []
        for i, future in zip(starts, futures):
            parts.append(future.result())
            if progress is not None:
                progress(min(n, i + size))
        return [np.concatenate(p) for p in zip(*parts)]

    def _chunk(self, feeds: dict[str, np.ndarray], run=None) -> list[np.ndarray]:
        try:
            if run is not None:
                outs = run(self._output_names, feeds)
            elif self.buckets:
                outs = self._run_bucket(feeds)
            elif self.io_binding:
                outs = self.runner.run_bound(self._output_names, feeds, False)
            else:
                outs = self._run(self._output_names, feeds)
        except VaeinferError:
            raise
        except self._errors as e:  # never let the backend's own exception types reach the app
            raise run_error(self.what, e, self._engine) from None
        self._check_shapes(outs, len(next(iter(feeds.values()))))
        return outs

    def _check_shapes(self, outs: list[np.ndarray], rows: int) -> None:
        """A graph may declare one output shape and produce another: refuse what the spec does not promise."""
        fixed = self._fixed_trailing
        if fixed is not None:  # a plain loop: a generator in all() costs more than the comparisons
            for out, trailing in zip(outs, fixed):
                if out.shape != (rows, *trailing):
                    break
            else:
                return
        for out, trailing, t in zip(outs, self._trailing, self.spec.outputs):
            if out.shape[0] != rows or any(d != s for d, s in zip(out.shape[1:], trailing) if is_fixed(s)) \
                    or len(out.shape) != len(trailing) + 1:
                raise BundleError(f"{self.what}: output {t.name} came out with shape {out.shape} for {rows} rows; "
                                  f"the manifest promises {(rows, *t.shape[1:])}")

    def run_bound(self, feeds: dict[str, np.ndarray], keep_on_device: bool = False) -> list:
        """One call through IO binding, without chunking.

        keep_on_device=False: numpy arrays, checked for NaN/Inf like `run`. keep_on_device=True:
        the backend's device values (onnxruntime: OrtValues, in CUDA memory on a CUDA model), for
        passing on to another graph without a round trip through the host; they are not checked
        here (that would need the copy this avoids): `check_finite(v.numpy(), ...)` does it.
        A backend without IO binding runs host feeds through `run`, and refuses keep_on_device.
        """
        backend = self.device.entry
        if keep_on_device and not backend.io_binding:
            raise ValueError(f"{self.what}: keep_on_device needs a backend with IO binding; "
                             f"{backend.title} (backend {backend.name!r}) has none")
        try:
            if backend.io_binding:
                outs = self.runner.run_bound(self._output_names, feeds, keep_on_device)
            else:
                outs = self._run(self._output_names, feeds)
        except VaeinferError:
            raise
        except self._errors as e:  # raw feeds, not validated: a shape/dtype/name the backend refuses is the caller's
            if type(e).__name__ == "InvalidArgument" or "invalid" in str(e).lower():
                raise InputError(f"{self.what}: {self._engine} refused the feeds: {' '.join(str(e).split())[:500]}") from None
            raise run_error(self.what, e, self._engine) from None
        if not keep_on_device:
            for i, what in self._finite_checks:
                check_finite(outs[i], what)
        return outs

    def _bucket(self, rows: int) -> tuple:
        """(size, (lock, the runner's Bucket)) of the smallest bucket that holds `rows`; made on
        first use, then reused, so that addresses stay fixed."""
        size = next(b for b in self.buckets if b >= rows)
        state = self._bucket_state.get(size)
        if state is None:
            with self._state_lock:
                state = self._bucket_state.get(size)
                if state is None:
                    # one captured graph per bucket; ids are the bucket's index + 1 (0 is the default graph)
                    graph_id = self.buckets.index(size) + 1 if self.cuda_graph else None
                    bucket = self.runner.bucket(size, self.spec.inputs, self.spec.outputs, graph_id)
                    state = self._bucket_state[size] = (self._bucket_locks[size], bucket)
        return size, state

    def _run_bucket(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        rows = len(next(iter(feeds.values())))
        size, (lock, bucket) = self._bucket(rows)
        with lock:  # the bucket's buffers are shared: one call at a time per bucket
            if rows < size:  # pad with copies of the first row: valid input for any graph
                feeds = {k: np.concatenate([v, np.repeat(v[:1], size - rows, axis=0)]) for k, v in feeds.items()}
            outs = bucket.run(feeds)
            # in host memory the outputs are views of the bucket's buffers (the next call
            # overwrites them): copy; a device backend's are already fresh host copies
            return [v[:rows].copy() for v in outs] if self._host_memory else [v[:rows] for v in outs]


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """One shared pool per worker count: concurrent large calls queue on the same threads
    instead of oversubscribing the cores."""
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="vaeinfer")
        return pool


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's pool threads
    os.register_at_fork(after_in_child=_POOLS.clear)


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_error(what: str, e: BaseException, engine: str = "onnxruntime") -> Exception:
    """A typed error for a backend failing to run a graph on input that passed validation:
    out of memory is the backend's (BackendError), anything else the graph's (BundleError)."""
    text = " ".join(str(e).split())[:500]
    lowered = text.lower()
    # not just "alloc": onnxruntime's messages name std::allocator in template signatures
    if isinstance(e, MemoryError) or any(k in lowered for k in ("bad_alloc", "failed to allocate", "out of memory")):
        return BackendError(f"{what}: out of memory while running the graph: {text or type(e).__name__}")
    return BundleError(f"{what}: {engine} failed to run the graph on a valid input: {type(e).__name__}: {text}")


_SMALL = 1 << 16  # elements: below, one isfinite pass is cheapest (no errstate context to enter)


def check_finite(a: np.ndarray, what: str) -> None:
    """Refuse NaN/Inf. Small arrays: one isfinite pass. Large ones: one reduction (a sum is finite
    iff every term is, barring overflow); only a non-finite sum pays for the exact check."""
    if a.size <= _SMALL:
        ok = all_finite(a)
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # the sum may overflow or meet inf - inf: no warnings
            ok = np.isfinite(a.sum()) or all_finite(a)
    if not ok:
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        raise OutputError(f"{what}: {bad} of {a.size} values are NaN/Inf; expected finite values "
                          "(the input may be far outside what the model was trained on)")


class Model:
    """A loaded bundle: one `Graph` per role it loaded (`roles`: every role of the bundle unless
    `vaeinfer.load(roles=...)` named some), all on one device, run by one backend."""

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int | None = None,
                 precision: str = "fp32", verify: bool = True, cuda_graph=False, io_binding: bool | None = None,
                 backend: str | None = None, max_error: float | None = None, roles=None):
        self.bundle, self.manifest = bundle, bundle.manifest
        self.roles = load_roles(self.manifest, roles)
        dev = parse_device(device, backend)
        if precision == precisions.AUTO:
            self._load_auto(dev, backend, threads, verify, cuda_graph, io_binding, max_error)
            return
        precisions.get(precision)  # UnknownPrecision (a ValueError) naming the known ones
        if max_error is not None:
            raise ValueError(f"max_error is the error budget of precision='auto'; got it with precision {precision!r}")
        if backend is None:  # a precision the device's default backend lacks (bf16): a backend that has it
            dev = backends.for_precision(dev, precision)
        buckets = _buckets(cuda_graph)
        if buckets and not dev.entry.graph_capture:
            if str(device).strip().lower() != "auto":
                capture = [b.name for b in backends.REGISTRY.values() if b.graph_capture]
                raise ValueError(f"cuda_graph needs a backend that captures graphs ({capture}); "
                                 f"got device {str(device)!r}, backend {dev.backend!r}")
            buckets = ()  # "auto" on a machine without one: no graphs to capture, no padding
        graph_bytes = {}
        for role in self.manifest.specs():  # every graph read and checked, loaded or not
            data = bundle.read_graph(role, precision, verify)
            if role in self.roles:
                graph_bytes[role] = data
        del data
        try:
            graphs = self._sessions(graph_bytes, dev, threads, precision, buckets, io_binding)
        except BackendError:
            if not dev.auto:
                raise
            dev = fallback()
            graphs = self._sessions(graph_bytes, dev, threads, precision, (), io_binding)
        self._graphs = Graphs(graphs, self.manifest)
        m = self.manifest
        self.info = ModelInfo(
            name=m.name, kind=m.kind, format_version=m.format_version, image_shape=m.image,
            value_range=m.value_range, latent=dict(m.latent), likelihood=dict(m.likelihood), device=str(dev),
            backend=dev.backend, providers=next(iter(self._graphs.values())).runner.providers, precision=precision,
            precisions=(precisions.REFERENCE, *sorted(m.variants)), threads=threads, has_prior="prior" in m.specs(),
            num_classes=None if m.prior is None else m.prior["num_classes"],
            files={f.file: f.sha256 for f in m.files(precision).values()}, path=str(bundle.path),
            cuda_graph=next(iter(self._graphs.values())).buckets
            if all(g.cuda_graph for g in self._graphs.values()) else (),
            roles=self.roles,
        )

    def _sessions(self, graph_bytes: dict[str, bytes], device: Device, threads, precision: str = "fp32",
                  buckets=(), io_binding: bool | None = None) -> dict[str, Graph]:
        from vaeinfer import kinds

        specs = self.manifest.specs()
        weights = {}
        if device.entry.shared_weights:  # one copy of the weights that graphs running together hold alike
            groups = [(role, *others) for role, others in kinds.get(self.manifest.kind).companions.items()]
            weights = shared_weights(graph_bytes, groups)
        return {role: self._graph(role, specs[role], data, device, threads, precision, buckets, io_binding,
                                  weights.get(role))
                for role, data in graph_bytes.items()}

    def _graph(self, role: str, spec: GraphSpec, data: bytes, device: Device, threads, precision: str,
               buckets=(), io_binding: bool | None = None, weights: dict | None = None) -> Graph:
        backend = device.entry
        if precision not in backend.precisions:
            raise BackendError(f"{backend.title} (backend {backend.name!r}) runs precisions {backend.precisions}, "
                               f"not {precision!r}")
        # by default, IO binding where outputs live on the device (on the host, plain runs cost less)
        bound = backend.io_binding and not backend.host_memory if io_binding is None else bool(io_binding)
        workers = (threads or usable_cpus()) if backend.host_threads else 1
        what = f"{self.manifest.name}/{role}"
        role_buckets = buckets if spec.batch_buckets else ()
        arena = {} if self.host_arena is True else {"arena": self.host_arena}
        if weights:
            arena["weights"] = weights
        runner = backend.make_runner(data, device, threads=threads, what=what, precision=precision, spec=spec,
                                     capture=bool(role_buckets), **arena)

        def serial():
            return backend.make_runner(data, device, threads=1, what=what, precision=precision, spec=spec, **arena)

        # `serial` holds the graph's bytes for as long as the Graph lives: only where chunks may run
        return Graph(runner, spec, what, device, role_buckets, bound, workers, serial if self.parallel_chunks else None)

    def _load_auto(self, dev: Device, backend: str | None, threads, verify: bool, cuda_graph, io_binding,
                   max_error) -> None:
        """precision="auto": per graph, the paths chosen by `vaeinfer.auto_precision` (cached)."""
        from vaeinfer import auto_precision as auto, kinds

        if _buckets(cuda_graph):
            raise ValueError("cuda_graph and precision='auto' do not go together: auto chooses per batch size "
                             "among backends that may not capture graphs")
        budget = auto.check_max_error(auto.DEFAULT_MAX_ERROR if max_error is None else max_error)
        m, kind = self.manifest, kinds.get(self.manifest.kind)
        family = dev.entry.device
        entries = [dev.entry] if backend is not None else [
            b for b in backends.REGISTRY.values() if b.device == family and (b.name == dev.backend or b.is_available())]
        paths = {f"{b.name}/{p}": (Device(b.name, dev.index), p) for b in entries for p in b.precisions
                 if precisions.get(p).graphs == precisions.REFERENCE or p in m.variants}
        reference = f"{dev.backend}/{precisions.REFERENCE}"
        self._graphs, decisions, data = {}, {}, {}

        def graph_bytes(role, p):
            if (role, p) not in data:
                data[role, p] = self.bundle.read_graph(role, p, verify)
            return data[role, p]

        for role, spec in m.specs().items():
            if role not in self.roles:  # not loaded: its files are read and checked all the same
                for p in sorted({p for _, p in paths.values()}):
                    if role in m.files(p):
                        graph_bytes(role, p)
                        del data[role, p]
                continue
            if not spec.variants:  # e.g. a VQ prior's cached step graphs: fp32 on the reference backend
                self._graphs[role] = self._graph(role, spec, graph_bytes(role, precisions.REFERENCE), dev, threads,
                                                   precisions.REFERENCE, (), io_binding)
                continue
            digests = {label: m.files(p)[role].sha256 for label, (_, p) in paths.items()}
            key = auto.cache_key(role, digests, _versions(entries), threads, budget)
            decision = auto.load_cached(key, paths)
            wanted = sorted(set(decision.choice.values())) if decision else list(paths)
            graphs = {}
            for label in wanted:
                where, p = paths[label]
                try:
                    graphs[label] = self._graph(role, spec, graph_bytes(role, p), where, threads, p, (), io_binding)
                except BackendError:
                    if decision is not None or label == reference:
                        raise  # the cached choice or the reference cannot run: an error, not a quiet swap
            if decision is None:
                def feeds_for(rows, spec=spec):
                    if kind.example_feeds is not None:
                        return kind.example_feeds(m, spec, rows, 0)
                    arrays = example_inputs(spec, rows, 0, kind.int_limits(m), None, m.value_range)
                    return {t.name: a for t, a in zip(spec.inputs, arrays)}

                def warmup(label, feeds, graphs=graphs):
                    rows = len(next(iter(feeds.values())))
                    for _ in range(1 if rows == 1 else MODE_TRIAL_CALLS + 1):  # let it settle its execution mode
                        graphs[label].run(feeds)

                runs = {label: (lambda feeds, g=g: g.run(feeds)) for label, g in graphs.items()}
                decision = auto.measure(runs, reference, feeds_for, budget, role, warmup)
                auto.save(key, decision)
            chosen = {label: graphs[label] for label in sorted(set(decision.choice.values()))}
            self._graphs[role] = ChoosingGraph(chosen, decision)
            decisions[role] = decision
        self._graphs = Graphs(self._graphs, m)
        first = next(iter(self._graphs.values()))
        used = sorted({label for d in decisions.values() for label in d.choice.values()})
        self.info = ModelInfo(
            name=m.name, kind=m.kind, format_version=m.format_version, image_shape=m.image,
            value_range=m.value_range, latent=dict(m.latent), likelihood=dict(m.likelihood), device=str(dev),
            backend="+".join(sorted({label.split("/")[0] for label in used})) or dev.backend,
            providers=first.runner.providers, precision=precisions.AUTO,
            precisions=(precisions.REFERENCE, *sorted(m.variants)), threads=threads, has_prior="prior" in m.specs(),
            num_classes=None if m.prior is None else m.prior["num_classes"],
            files={f.file: f.sha256 for p in {paths[label][1] for label in used} | {precisions.REFERENCE}
                   for f in m.files(p).values()},
            path=str(self.bundle.path),
            auto={role: {"choice": {str(b): label for b, label in d.choice.items()}, "errors": d.errors, "peaks": d.peaks,
                         "max_error": d.max_error, "why": d.why(), "cached": d.cached} for role, d in decisions.items()},
            roles=self.roles,
        )

    can_sample = True  # whether `sample` can run (a kind may need a graph the bundle lacks)
    # the host memory arena of its graphs (make_runner's `arena`): True keeps each graph's working
    # memory between calls (fastest); False gives it back after each call and plans no memory
    # pattern, so every call peaks alike (a kind whose calls must not add up, e.g. a video
    # decoder's steps)
    host_arena: bool | str = True
    # whether a large CPU batch may run as parallel single-threaded chunks (`Graph`), for which
    # each graph keeps its bytes to make its single-threaded session on first use. False: one
    # call per batch, no bytes kept (a kind whose graphs are large and whose calls must not add
    # up: parallel chunks would hold several chunks' working memory at once)
    parallel_chunks: bool = True

    def graph(self, role: str) -> Graph:
        """The runtime graph for a role ("encoder", "decoder", "prior"): `run`, `mode`, `trial_timings`."""
        if role not in self.manifest.specs():
            raise ValueError(f"{self.info.name} has graphs {sorted(self.manifest.specs())}, not {role!r}")
        return self._graphs[role]  # ValueError if loaded without it (roles=)

    def execution_modes(self) -> dict[str, str | None]:
        """How each graph runs large CPU batches: "intra" (one multi-threaded call), "chunks"
        (parallel single-threaded chunks), or None while still timing both (see `MODE_TRIAL_CALLS`)."""
        return {role: g.mode for role, g in self._graphs.items()}

    def execution_trials(self) -> dict[str, dict[str, tuple[float, ...]]]:
        """Per graph, the seconds per row of the trial calls that chose its execution mode."""
        return {role: g.trial_timings() for role, g in self._graphs.items()}

    def run_graph(self, role: str, feeds: dict, keep_on_device: bool = False) -> list:
        """Run one of the bundle's graphs ("encoder", "decoder", "prior") on raw feeds through IO
        binding; with keep_on_device=True the outputs stay on the model's device as the backend's
        values (onnxruntime: OrtValues; see `Graph.run_bound`). Feeds are the graph's inputs by name
        (the manifest's `graphs.<role>.inputs`), float32/int64 arrays or such values; they are not
        validated here."""
        return self.graph(role).run_bound(feeds, keep_on_device)

    def _images_from_params(self, params: np.ndarray) -> np.ndarray:
        return lik.mean(params, self.manifest.likelihood, self.manifest.value_range)

    def __repr__(self):
        return f"<vaeinfer {self.info.kind} {self.info.name!r} on {self.info.device} ({self.info.precision})>"


# TensorProto data types whose raw bytes a graph may share with another: float, float16, uint8, int8
_SHARED_DTYPES = {1: "<f4", 10: "<f2", 2: "u1", 3: "i1"}
SHARED_MIN_BYTES = 1 << 16  # smaller initializers stay each graph's own (shape constants and the like)


def shared_weights(graph_bytes: dict[str, bytes], groups) -> dict[str, dict[str, np.ndarray]]:
    """role -> {initializer name: array}: the large initializers that graphs of one group (roles
    whose graphs run together, `Kind.companions`) hold alike, with the same name, type, shape and
    bytes, as one array each, for a backend with `shared_weights` to run every such graph on
    instead of a copy per graph. A video VAE's first-step graphs hold all of their step graphs'
    weights: 272 of the Wan 2.1 decoder's 279 MiB."""
    from vaeinfer import onnx_scan

    out: dict[str, dict[str, np.ndarray]] = {}
    for group in groups:
        roles = [r for r in group if r in graph_bytes]
        found: dict[tuple, list] = {}
        for role in roles if len(roles) > 1 else ():
            for t in onnx_scan.initializers(graph_bytes[role]):
                dtype = _SHARED_DTYPES.get(t.data_type)
                size = t.end - t.start
                if dtype and size >= SHARED_MIN_BYTES and size == int(np.prod(t.dims)) * np.dtype(dtype).itemsize:
                    found.setdefault((t.name, dtype, t.dims), []).append((role, t))
        for (name, dtype, dims), places in found.items():
            alike: list[tuple[np.ndarray, list[str]]] = []  # distinct contents under this name, and their roles
            for role, t in places:
                raw = np.frombuffer(graph_bytes[role], np.uint8, t.end - t.start, t.start)
                same = next((holders for first, holders in alike if np.array_equal(first, raw)), None)
                if same is None:
                    alike.append((raw, [role]))
                else:
                    same.append(role)
            for raw, holders in alike:
                if len(holders) > 1:
                    array = raw.view(dtype).reshape(dims).copy()  # the graph bytes go after loading
                    for role in holders:
                        out.setdefault(role, {})[name] = array
    return out


def load_roles(manifest, roles) -> tuple[str, ...]:
    """The roles whose graphs `vaeinfer.load(roles=...)` loads, in the bundle's order: every one
    for None; else the roles named (a string or several) and their kind's companions
    (`Kind.companions`: a video decoder's first-step graph, a VQ prior's cached graphs)."""
    specs = manifest.specs()
    if roles is None:
        return tuple(specs)
    asked = (roles,) if isinstance(roles, str) else tuple(roles)
    unknown = [r for r in asked if r not in specs]
    if unknown or not asked:
        raise ValueError(f"roles: expected some of {manifest.name}'s graphs {list(specs)} (or None for all), "
                         f"got {list(asked) if not unknown else unknown}")
    from vaeinfer import kinds

    wanted = set(asked)
    for role, companions in kinds.get(manifest.kind).companions.items():
        group = {role, *companions}
        if wanted & group:
            wanted |= group
    return tuple(r for r in specs if r in wanted)


class Graphs(dict):
    """role -> Graph for the roles a model loaded. A role of the bundle that was not loaded
    (`vaeinfer.load(roles=...)`) raises ValueError saying how to load it; any other KeyError."""

    def __init__(self, graphs: dict, manifest):
        super().__init__(graphs)
        self._manifest = manifest

    def __missing__(self, role):
        m = self._manifest
        if role not in m.specs():
            raise KeyError(role)
        from vaeinfer import kinds

        main = next((r for r, others in kinds.get(m.kind).companions.items() if role in others), role)
        raise ValueError(f"{m.name}: its {role} graph is not loaded (this model was loaded with roles={tuple(self)}); "
                         f"load it with roles including {main!r}, or roles=None for every graph")


class ChoosingGraph:
    """precision="auto"'s graph: each call runs on the path its decision chose for that many rows
    (`vaeinfer.auto_precision.Decision.path_for`); everything else is the batch-1 path's."""

    def __init__(self, graphs: dict[str, Graph], decision):
        self.graphs, self.decision = graphs, decision

    def run(self, feeds: dict[str, np.ndarray], batch_size: int | None = None, progress=None) -> list[np.ndarray]:
        rows = min(len(next(iter(feeds.values()))), batch_size or DEFAULT_BATCH)
        return self.graphs[self.decision.path_for(rows)].run(feeds, batch_size, progress)

    def __getattr__(self, name):
        return getattr(self.graphs[self.decision.choice[1]], name)


def _versions(entries) -> dict[str, str]:
    """backend name -> its engine's version (part of precision="auto"'s cache key)."""
    import importlib

    out = {}
    for b in entries:
        try:
            out[b.name] = getattr(importlib.import_module(b.engine), "__version__", "?")
        except ImportError:
            out[b.name] = "missing"
    return out


def _buckets(cuda_graph) -> tuple[int, ...]:
    """load()'s cuda_graph argument -> the batch buckets: False/None none, True the defaults."""
    if cuda_graph is None or cuda_graph is False:
        return ()
    if cuda_graph is True:
        return CUDA_GRAPH_BUCKETS
    try:
        sizes = tuple(sorted({int(b) for b in cuda_graph}))
    except (TypeError, ValueError):
        raise ValueError(f"cuda_graph must be True/False or batch sizes, got {cuda_graph!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"cuda_graph batch sizes must be positive, got {cuda_graph!r}")
    return sizes
