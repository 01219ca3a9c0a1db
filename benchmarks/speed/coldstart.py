"""Cold start and installed size of the runtime, against PyTorch.

    python -m benchmarks.speed.coldstart          # prints JSON; benchmarks.speed.peers includes it

- cold start: wall time of whole processes, each started fresh (median of `repeats`):
  `vaeinfer sample -n 16` (import, load the bundled model, sample, write a PNG), against
  `python -c "import torch"` (importing PyTorch alone), `import onnxruntime`, and an empty
  interpreter. The OS page cache is warm after the first run (as for any app started twice).
- installed size: the bytes of every file that the runtime's dependency closure installs
  (vaeinfer's base + cpu extra: numpy, click, pillow, onnxruntime and what they require),
  summed from each installed distribution's RECORD, against torch's closure. Measured on the
  installed distributions of this environment, so no download is needed.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

RUNTIME_ROOTS = ("numpy", "click", "pillow", "onnxruntime")
TORCH_ROOTS = ("torch",)


def _wall(cmd: list[str], repeats: int, env=None, cwd=None) -> dict:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return {"command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
            "median_s": statistics.median(times), "min_s": min(times), "runs": repeats}


def cold_start(repeats: int = 5, threads: int | None = None) -> dict:
    py = sys.executable
    cli = str(Path(py).with_name("vaeinfer"))
    cli_cmd = [cli] if Path(cli).exists() else [py, "-m", "vaeinfer.cli"]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = {
            "python -c pass": _wall([py, "-c", "pass"], repeats, env),
            "import onnxruntime": _wall([py, "-c", "import onnxruntime"], repeats, env),
            "import torch": _wall([py, "-c", "import torch"], repeats, env),
            "vaeinfer sample -n 16": _wall([*cli_cmd, "sample", "-n", "16", "--device", "cpu", "-o", "s.png"],
                                           repeats, env, cwd=tmp),
        }
    return out


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requires(dist: metadata.Distribution) -> list[str]:
    """Names a distribution requires unconditionally (no extras; markers true here)."""
    from packaging.requirements import Requirement

    names = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None:
            try:
                if not req.marker.evaluate({"extra": ""}):
                    continue
            except Exception:  # noqa: BLE001
                continue
        names.append(req.name)
    return names


def _dist_size(dist: metadata.Distribution) -> int:
    total = 0
    for f in dist.files or []:
        try:
            total += (Path(dist.locate_file(f))).stat().st_size
        except OSError:
            pass
    return total


def closure(roots) -> dict:
    """{distribution: bytes} for roots and everything they require, as installed here."""
    installed = {_canonical(d.metadata["Name"]): d for d in metadata.distributions()}
    seen, stack = {}, [_canonical(r) for r in roots]
    while stack:
        name = stack.pop()
        if name in seen or name not in installed:
            continue
        dist = installed[name]
        seen[name] = _dist_size(dist)
        stack.extend(_canonical(r) for r in _requires(dist))
    return dict(sorted(seen.items(), key=lambda kv: -kv[1]))


def installed_size() -> dict:
    out = {}
    for label, roots in (("runtime (numpy, click, pillow, onnxruntime)", RUNTIME_ROOTS), ("torch", TORCH_ROOTS)):
        dists = closure(roots)
        out[label] = {"total_mb": sum(dists.values()) / 1e6, "distributions": {k: v / 1e6 for k, v in dists.items()}}
    return out


def main(argv=None) -> dict:
    import argparse

    from benchmarks.harness.cli import description

    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--repeats", type=int, default=5, help="fresh processes per command")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the processes")
    args = ap.parse_args(argv)
    result = {"cold_start": cold_start(args.repeats, args.threads), "installed_size": installed_size()}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
