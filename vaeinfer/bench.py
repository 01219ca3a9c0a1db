"""`vaeinfer bench`: latency, throughput, first-call time, session creation time and peak memory
of a bundle's operations, measured with numpy and onnxruntime only (no torch).

    from vaeinfer.bench import bench, format_table
    report = bench("mnist-vae", batches=(1, 8, 64, 256), ops=("encode", "decode", "sample"))
    print(format_table(report))

Each (op, batch) is timed over repeated calls of the public API (`encode`, `decode`, `sample`),
so every runtime check (input validation, the non-finite output check) is included. The first
call of each batch size is timed apart (onnxruntime plans and allocates for a new shape then).
Peak memory is the process's peak resident set size during the measurement (Linux: VmHWM,
reset before each measurement; elsewhere the process-lifetime peak, ru_maxrss).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

OPS = ("encode", "decode", "sample")
DEFAULT_BATCHES = (1, 8, 64, 256)


@dataclass
class Timing:
    """Latency statistics of one (op, batch): milliseconds per call, images per second."""

    op: str
    batch: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput: float  # images per second at the median latency
    first_call_ms: float
    peak_rss_mb: float | None


def timings(fn, *, min_time: float = 1.0, min_iters: int = 10, max_iters: int = 10_000,
            warmup: int = 3) -> np.ndarray:
    """Seconds per call of `fn()` over enough calls to fill `min_time` (at least `min_iters`),
    after up to `warmup` untimed calls (fewer for slow calls: at most about a second of them)."""
    t0 = time.perf_counter()
    fn()
    guess = max(time.perf_counter() - t0, 1e-7)
    for _ in range(min(warmup, int(1.0 / guess))):
        fn()
    n = int(min(max_iters, max(min_iters, min_time / guess)))
    out = np.empty(n)
    clock = time.perf_counter
    for i in range(n):
        start = clock()
        fn()
        out[i] = clock() - start
    return out


def summarize(op: str, batch: int, seconds: np.ndarray, first_call_s: float, peak_rss_mb: float | None) -> Timing:
    ms = seconds * 1e3
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return Timing(op=op, batch=batch, iterations=len(ms), p50_ms=p50, p90_ms=p90, p99_ms=p99,
                  mean_ms=float(ms.mean()), min_ms=float(ms.min()), throughput=batch / (p50 / 1e3),
                  first_call_ms=first_call_s * 1e3, peak_rss_mb=peak_rss_mb)


# --- memory ---------------------------------------------------------------------------------

def _status_kb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark (Linux >= 4.0: write 5 to clear_refs). False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """Peak resident set size since the last reset (Linux), else since the process started."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere
    except (ImportError, OSError):
        return None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


# --- the machine ----------------------------------------------------------------------------

def machine() -> dict:
    """What the figures were measured on: CPU model, cores, ISA features, memory, versions, date."""
    import onnxruntime as ort

    cpu, flags = cpu_model_and_flags()
    mem = _meminfo_gb()
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": sorted(flags & {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
                               "amx_tile", "amx_int8", "amx_bf16"}),
        "memory_gb": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "gpu": gpu_name(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return info


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and its ISA flags (from /proc/cpuinfo; platform's names elsewhere)."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and cpu in ("", platform.machine(), platform.processor()):
                    cpu = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return cpu, flags


def _meminfo_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(float(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name (nvidia-smi), or None."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    line = out.stdout.strip().splitlines()
    return line[0].strip() if out.returncode == 0 and line else None


# --- the benchmark --------------------------------------------------------------------------

def graph_inputs(model, role: str, batch: int, seed: int = 0) -> list[np.ndarray]:
    """Seeded inputs of `batch` rows for one graph of a loaded model (see `vaeinfer.spec.example_inputs`)."""
    from vaeinfer import kinds
    from vaeinfer.spec import example_inputs as for_spec

    m = model.manifest
    return for_spec(m.specs()[role], batch, seed, kinds.get(m.kind).int_limits(m), value_range=m.value_range)


def example_inputs(model, op: str, batch: int, seed: int = 0):
    """A seeded input of `batch` rows for an op of a loaded model (None for sample)."""
    if op in ("encode", "decode"):
        return graph_inputs(model, "encoder" if op == "encode" else "decoder", batch, seed)[0]
    if op == "sample":
        return None
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def call_for(model, op: str, batch: int, seed: int = 0):
    """A no-argument function that runs `op` on `batch` rows through the public API."""
    data = example_inputs(model, op, batch, seed)
    if op == "encode":
        return lambda: model.encode(data, batch_size=batch)
    if op == "decode":
        return lambda: model.decode(data, batch_size=batch)
    return lambda: model.sample(batch, seed=seed, batch_size=batch)


def session_creation_ms(model, device: str, threads: int | None) -> dict[str, float]:
    """Milliseconds to create each graph's runner (onnxruntime: its session) from its (verified) bytes."""
    from vaeinfer.backends import parse_device

    out = {}
    dev = parse_device(device, model.info.backend)
    for role, spec in model.manifest.specs().items():
        data = model.bundle.read_graph(role, model.info.precision)
        t0 = time.perf_counter()
        dev.entry.make_runner(data, dev, threads=threads, what=role, precision=model.info.precision, spec=spec)
        out[role] = (time.perf_counter() - t0) * 1e3
    return out


def bench(model: str = "mnist-vae", batches=DEFAULT_BATCHES, ops=OPS, device: str = "cpu",
          threads: int | None = None, precision: str = "fp32", min_time: float = 1.0, min_iters: int = 10,
          cuda_graph=False, seed: int = 0, progress=None, backend: str | None = None,
          max_error: float | None = None) -> dict:
    """Benchmark `ops` of a bundle at each batch size; returns a JSON-able report.

    progress(op, batch), if given, is called before each measurement.
    """
    import vaeinfer

    batches = [int(b) for b in batches]
    ops = list(ops)
    for op in ops:
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if not batches or min(batches) < 1:
        raise ValueError(f"batch sizes must be positive, got {batches}")
    rss0 = rss_mb()
    t0 = time.perf_counter()
    m = vaeinfer.load(model, device=device, threads=threads, precision=precision, cuda_graph=cuda_graph,
                      backend=backend, max_error=max_error)
    load_ms = (time.perf_counter() - t0) * 1e3
    rss_loaded = rss_mb()
    results = []
    for op in ops:
        if op == "sample" and not m.can_sample:
            continue
        for b in batches:
            if progress is not None:
                progress(op, b)
            fn = call_for(m, op, b, seed)
            tracked = reset_peak_rss()
            t = time.perf_counter()
            fn()
            first = time.perf_counter() - t
            seconds = timings(fn, min_time=min_time, min_iters=min_iters)
            results.append(asdict(summarize(op, b, seconds, first, peak_rss_mb() if tracked else None)))
    return {
        "model": m.info.name,
        "kind": m.info.kind,
        "bundle": m.info.path,
        "device": m.info.device,
        "providers": list(m.info.providers),
        "precision": m.info.precision,
        "threads": threads,
        "cuda_graph": list(m.info.cuda_graph),
        "load_ms": load_ms,
        "session_creation_ms": session_creation_ms(m, m.info.device, threads),
        "rss_mb": {"before_load": rss0, "after_load": rss_loaded},
        "results": results,
        "machine": machine(),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
    }


def format_table(report: dict) -> str:
    """The report as a plain-text table (one row per op and batch)."""
    head = (f"{report['model']} on {report['device']} ({report['providers'][0]}, {report['precision']}, "
            f"threads {report['threads'] or 'default'}): load {report['load_ms']:.0f} ms, sessions "
            + ", ".join(f"{k} {v:.0f} ms" for k, v in report["session_creation_ms"].items()))
    cols = ("op", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s", "first ms", "peak MB")
    rows = [cols]
    for r in report["results"]:
        rows.append((r["op"], str(r["batch"]), f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}",
                     f"{r['throughput']:,.0f}", f"{r['first_call_ms']:.2f}",
                     "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = [head, ""]
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
