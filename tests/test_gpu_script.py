"""benchmarks/gpu.sh parses, and its dry run lists every step and finds the files they need."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu.sh"


def test_gpu_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, timeout=30).returncode == 0


def test_gpu_script_dry_run_prints_the_steps_within_8_minutes():
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for step in ("onnxruntime-gpu", "CUDAExecutionProvider", "tests/test_io_binding.py", "-m benchmarks.speed.peers --device cuda"):
        assert step in done.stdout, step
    limits = [int(line.split("(limit ")[1].split("s)")[0]) for line in done.stdout.splitlines() if "(limit " in line]
    assert len(limits) == 5 and sum(limits) < 8 * 60


def test_gpu_script_dry_run_refuses_a_missing_wheel(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path / "none.whl")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "missing" in done.stdout
