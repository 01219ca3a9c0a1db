"""`vaeinfer bench` machinery: report structure, table, JSON, CLI. Tiny models, tiny time budgets;
no assertions on the figures themselves (those live in benchmarks/)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from vaeinfer import bench
from vaeinfer.cli import main

QUICK = dict(min_time=0.0, min_iters=3)


def test_report(conv):
    report = bench.bench(conv.bundle, batches=(1, 3), ops=("encode", "decode", "sample"), threads=1, **QUICK)
    assert report["device"] == "cpu" and report["providers"][0] == "CPUExecutionProvider"
    assert set(report["session_creation_ms"]) == {"encoder", "decoder"}
    assert report["load_ms"] > 0
    rows = report["results"]
    assert [(r["op"], r["batch"]) for r in rows] == [(op, b) for op in ("encode", "decode", "sample") for b in (1, 3)]
    for r in rows:
        assert r["iterations"] >= 3
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["throughput"] == pytest.approx(r["batch"] / r["p50_ms"] * 1e3)
        assert r["first_call_ms"] > 0
        assert r["peak_rss_mb"] is None or r["peak_rss_mb"] > 0
    machine = report["machine"]
    for key in ("cpu", "cpu_count", "onnxruntime", "numpy", "python", "date"):
        assert machine[key]
    json.dumps(report)  # JSON-able as it is
    table = bench.format_table(report)
    assert "p99 ms" in table and "images/s" in table and table.count("\n") >= 8


def test_bad_arguments(conv):
    with pytest.raises(ValueError, match="op"):
        bench.bench(conv.bundle, ops=("train",), **QUICK)
    with pytest.raises(ValueError, match="batch"):
        bench.bench(conv.bundle, batches=(0,), **QUICK)


def test_timings_and_summary():
    calls = []
    seconds = bench.timings(lambda: calls.append(1), min_time=0.0, min_iters=7, warmup=2)
    assert len(seconds) == 7 and len(calls) == 1 + 2 + 7
    t = bench.summarize("decode", 4, np.array([0.001, 0.002, 0.003, 0.004]), 0.01, None)
    assert t.p50_ms == pytest.approx(2.5) and t.throughput == pytest.approx(4 / 0.0025)
    assert t.first_call_ms == pytest.approx(10.0)


def test_peak_memory_reading():
    if bench.reset_peak_rss():
        before = bench.peak_rss_mb()
        block = np.ones(64 << 18)  # 128 MiB, touched
        assert bench.peak_rss_mb() >= before + 100
        del block
    assert bench.peak_rss_mb() > 0


def test_cli_bench(conv, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "-m", str(conv.bundle), "--device", "cpu", "--threads", "1",
                                       "--batch", "1,2", "--op", "decode,sample", "--min-time", "0",
                                       "--min-iters", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "decode" in result.output and "p50 ms" in result.output
    report = json.loads(out.read_text())
    assert [(r["op"], r["batch"]) for r in report["results"]] == [("decode", 1), ("decode", 2), ("sample", 1),
                                                                  ("sample", 2)]


@pytest.mark.parametrize("args", [["--batch", "1,x"], ["--batch", "0"], ["--op", "train"]])
def test_cli_bench_bad_flags(conv, args):
    result = CliRunner().invoke(main, ["bench", "-m", str(conv.bundle), *args])
    assert result.exit_code != 0


def test_cuda_bench_without_cuda_is_a_typed_error(conv, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    result = CliRunner().invoke(main, ["bench", "-m", str(conv.bundle), "--device", "cuda", "--min-time", "0",
                                       "-o", str(tmp_path / "b.json")])
    assert result.exit_code == 1 and "CUDA" in result.output


def test_bench_imports_no_torch():
    code = "import sys, vaeinfer.bench, vaeinfer.cli; sys.exit(int(any(m in sys.modules for m in ('torch', 'onnx'))))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
