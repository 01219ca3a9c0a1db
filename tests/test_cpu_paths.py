"""benchmarks.speed.cpu_paths: a smoke run on tiny configs, and the verdict logic on made-up rows."""

from __future__ import annotations

import importlib.util
import json
import numbers

import pytest

from benchmarks.speed import cpu_paths

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu_paths")
    argv = ["--quick", "--no-compile", "--rounds", "1", "--out", str(out)]
    if not HAS_DIFFUSERS:  # the SD / TAESD rows build diffusers modules
        argv += ["--rows", "mnist-vae-b1"]
    report = cpu_paths.main(argv)
    return out, report, argv


def test_quick_run_has_every_runner_in_every_row(quick_run):
    out, _, _ = quick_run
    saved = json.loads((out / "cpu_paths-quick.json").read_text())
    expected = ({"sd-dec-256", "taesd-dec-512"} if HAS_DIFFUSERS else set()) | {"mnist-vae-b1"}
    assert {r["row"] for r in saved["rows"]} == expected
    assert saved["runners"] == cpu_paths.runner_names(saved["backends"])
    assert saved["matmul"]["fp32_gflops"] > 0 and saved["matmul"]["bf16_gflops"] > 0
    assert "isa" in saved["machine"]
    for row in saved["rows"]:
        assert set(row["cells"]) == set(saved["runners"]), row["row"]
        for name, cell in row["cells"].items():
            if "na" in cell:
                assert isinstance(cell["na"], str) and cell["na"], (row["row"], name)
                continue
            assert isinstance(cell["p50_ms"], numbers.Real) and cell["p50_ms"] > 0, (row["row"], name)
            for k in ("mean_abs", "max_abs", "rel_mean", "rel_max"):
                assert isinstance(cell["error"][k], numbers.Real), (row["row"], name, k)
        # the fp32 paths are there and agree with the reference
        for name in (cpu_paths.BASELINE, "onnxruntime fp32", "torch eager fp32"):
            assert row["cells"][name]["error"]["rel_max"] < 1e-4, (row["row"], name)
        assert row["cells"]["torch.compile fp32"]["na"] == "--no-compile"
        assert row["fastest"]["cell"] in row["cells"]
        assert "verdict" in row and "auto" in row


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")
def test_quick_run_times_openvino(quick_run):
    _, report, _ = quick_run
    for row in report["rows"]:
        assert "p50_ms" in row["cells"]["openvino f32"], row["cells"]["openvino f32"]


def test_markdown_names_the_command(quick_run):
    out, report, _ = quick_run
    md = (out / "cpu_paths-quick.md").read_text()
    assert "python -m benchmarks.speed.cpu_paths --quick --no-compile --rounds 1" in md
    assert report["command"] in md
    for row in report["rows"]:
        assert f"**{row['row']}**" in md


def test_unknown_row_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cpu_paths.main(["--rows", "no-such-row"])
    assert e.value.code == 2
    assert "no-such-row" in capsys.readouterr().err


def _cell(ms, err, **info):
    return {"p50_ms": ms, "error": {"rel_max": err}, "info": info}


def test_verdict_compares_auto_with_the_fastest_peer_at_equal_or_smaller_error():
    rates = {"fp32_gflops": 100.0, "bf16_gflops": 400.0}
    row = {"row": "made-up", "gflop": 10.0, "cells": {
        cpu_paths.BASELINE: _cell(100, 1e-7),
        "vaeinfer auto": _cell(50, 4e-3, precision="bf16", auto={"chose": "bf16"}),
        "torch eager fp32": _cell(120, 0.0),
        "openvino bf16": _cell(40, 8e-3),  # faster, but less accurate than auto: not its rival
        "onnxruntime fp32": _cell(90, 1e-7),
        "torch.compile fp32": {"na": "--no-compile"}}}
    cpu_paths.summarize(row, rates)
    assert row["fastest"]["cell"] == "openvino bf16"
    assert row["fastest"]["gflops"] == pytest.approx(250.0)
    assert row["fastest"]["of_fp32_matmul"] == pytest.approx(2.5)
    assert row["fastest_peer"]["cell"] == "openvino bf16"
    assert row["verdict"]["met"] is True and row["verdict"]["rival"] == "onnxruntime fp32"
    assert row["cells"]["vaeinfer auto"]["vs_vaeinfer_fp32"] == pytest.approx(2.0)

    row["cells"]["onnxruntime fp32"]["p50_ms"] = 45
    cpu_paths.summarize(row, rates)
    assert row["verdict"]["met"] is False

    row["cells"]["vaeinfer auto"] = {"na": "vaeinfer.load: no max_error"}
    cpu_paths.summarize(row, rates)
    assert row["verdict"]["met"] is None
    assert "n/a" in cpu_paths.footer(row)[0]
