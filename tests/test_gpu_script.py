"""benchmarks/gpu.sh parses, and its dry run lists every step and finds the files they need."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu.sh"


def test_gpu_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, timeout=30, check=False).returncode == 0


def _dry_run() -> str:
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_gpu_script_dry_run_prints_the_steps_within_8_minutes():
    out = _dry_run()
    for step in ("onnxruntime-gpu", "CUDAExecutionProvider", "tests/test_io_binding.py", "-m benchmarks.speed.peers --device cuda",
                 "-m benchmarks.speed.cpu_paths --device cuda"):
        assert step in out, step
    limits = [int(line.split("(limit ")[1].split("s)")[0]) for line in out.splitlines() if "(limit " in line]
    assert len(limits) == 6 and sum(limits) < 8 * 60
    # the header's total is the steps' total
    assert f"limits add up to {sum(limits)} s" in " ".join(SCRIPT.read_text().replace("#", " ").split())


def test_gpu_script_runs_the_cuda_side_by_side_table_last():
    out = _dry_run()
    commands = [line.strip() for line in out.splitlines() if line.startswith("   ")]
    paths = commands[-1]
    assert paths.startswith("bash -c PYTHONPATH=$PWD .gpu-venv/bin/python -m benchmarks.speed.cpu_paths --device cuda"), paths
    rows = paths.split("--rows ")[1].split()[0].split(",")
    assert sorted(rows) == ["mnist-vae-b256", "sd-dec-512", "taesd-dec-512"] and rows[-1] == "sd-dec-512"  # cheapest first
    assert "--no-compile" in paths and "--workdir .gpu-work" in paths
    from benchmarks.speed.cpu_paths import ROWS

    assert set(rows) <= {r.name for r in ROWS}
    done = out.splitlines()[-1]
    assert "cpu_paths-cuda.md" in done and "cpu_paths-cuda.json" in done


def test_gpu_script_dry_run_refuses_a_missing_wheel(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path / "none.whl")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode != 0 and "missing" in done.stdout
