"""The one peak-memory reader: the peak resident set size (VmHWM) of a fresh process.

VmHWM (Linux, /proc/self/status) starts anew at exec; getrusage's ru_maxrss survives it and would
report the parent's peak (a torch-sized one, say), so a figure comes from a process of its own:

    from benchmarks.harness import memory
    run = memory.fresh_process("vaeinfer.cli", ["sample", "-n", "16", "-o", "s.png"])
    run["peak_rss_mib"], run["wall_s"]

runs `python -m vaeinfer.cli sample ...` in a new interpreter through this module's `__main__`,
which reads VmHWM as the module finishes. A module that wants readings of its own (after loading,
say) calls `peak_rss_mib()` itself and prints them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PEAK_FILE = "VAEINFER_BENCH_PEAK_FILE"  # where the wrapped process writes its peak (JSON)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux only)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def fresh_process(module: str, args: list[str], *, env: dict | None = None, cwd: str | Path | None = None,
                  timeout: float | None = None) -> dict:
    """`python -m MODULE ARGS` in a fresh interpreter (this checkout importable, whatever `cwd`):
    {"returncode", "wall_s", "peak_rss_mib", "stdout", "stderr"}."""
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak.json"
        env = {**(os.environ if env is None else env), PEAK_FILE: str(peak_file),
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        cmd = [sys.executable, "-m", __spec__.name, module, *args]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
        wall = time.perf_counter() - t0
        peak = json.loads(peak_file.read_text())["peak_rss_mib"] if peak_file.exists() else None
    return {"returncode": done.returncode, "wall_s": wall, "peak_rss_mib": peak, "stdout": done.stdout,
            "stderr": done.stderr}


def last_json_line(run: dict) -> dict:
    """The last stdout line of a `fresh_process` run, as JSON; RuntimeError with its stderr if it failed."""
    if run["returncode"] != 0:
        raise RuntimeError(f"exit {run['returncode']}: {run['stderr'].strip()[-1000:]}")
    return json.loads(run["stdout"].strip().splitlines()[-1])


def _main() -> int:
    import runpy

    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        Path(os.environ[PEAK_FILE]).write_text(json.dumps({"peak_rss_mib": peak_rss_mib()}))
    return code


if __name__ == "__main__":
    sys.exit(_main())
