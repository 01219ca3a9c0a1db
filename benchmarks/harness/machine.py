"""The one description of the machine a benchmark ran on, and how busy the rest of it was."""

from __future__ import annotations

import os
import time
from importlib import metadata

LIBRARIES = ("numpy", "onnxruntime", "onnxruntime-gpu", "openvino", "torch", "diffusers")


def versions() -> dict[str, str]:
    """Installed versions of the libraries the figures depend on (read from their metadata,
    nothing imported); those not installed are left out."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def describe() -> dict:
    """CPU model, cores, ISA features (AVX2, AVX-512 incl. BF16/VNNI, AMX), memory, OS, Python,
    library versions and GPU: `vaeinfer.bench.machine()` (what `vaeinfer bench` reports) plus the
    versions of `LIBRARIES`."""
    from vaeinfer.bench import machine

    return {**machine(), "versions": versions()}


def summary(machine: dict | str) -> str:
    """One line for a report's header, e.g. 'Xeon ..., 2 of 4 cores (avx2, avx512f), 16 GB; Linux 6.1; Python 3.12'
    (a string: a description from before this one, as older results files hold it)."""
    if isinstance(machine, str):
        return machine
    isa = ", ".join(machine.get("isa") or []) or "no AVX2"
    libs = ", ".join(f"{k} {v}" for k, v in (machine.get("versions") or {}).items())
    gpu = f"; GPU {machine['gpu']}" if machine.get("gpu") else ""
    return (f"{machine.get('cpu')}, {machine.get('cpus_usable')} of {machine.get('cpu_count')} cores ({isa}), "
            f"{machine.get('memory_gb')} GB; {machine.get('os')}; Python {machine.get('python')}"
            + (f"; {libs}" if libs else "") + gpu)


def cpu_seconds() -> tuple[float, float, float]:
    """(wall clock, CPU seconds all processes used, CPU seconds this process and its children used)."""
    import resource

    with open("/proc/stat") as f:
        fields = [float(v) for v in f.readline().split()[1:]]
    busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = sum(getattr(resource.getrusage(who), k) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for k in ("ru_utime", "ru_stime"))
    return time.perf_counter(), busy, own


def others_since(before) -> dict:
    """How much CPU other processes took since `before` (a cpu_seconds() reading): a benchmark
    is only as good as the machine was quiet."""
    wall, busy, own = (b - a for a, b in zip(before, cpu_seconds()))
    other = max(0.0, busy - own)
    return {"wall_s": wall, "cpu_s": other, "cpu_fraction": other / (wall * (os.cpu_count() or 1))}
