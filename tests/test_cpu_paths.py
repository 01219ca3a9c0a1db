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


# --- --device cuda --------------------------------------------------------------------------------

def _has_cuda() -> bool:
    import onnxruntime as ort

    try:
        import torch

        torch_cuda = torch.cuda.is_available()
    except ImportError:
        torch_cuda = False
    return torch_cuda or bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()))


CPU_RUNNERS = ["vaeinfer cpu fp32", "vaeinfer cpu bf16", "vaeinfer cpu int8", "vaeinfer openvino fp32",
               "vaeinfer openvino bf16", "vaeinfer openvino int8", "vaeinfer auto", "onnxruntime fp32", "openvino f32",
               "openvino bf16", "torch eager fp32", "torch bf16 channels-last", "torch.compile fp32", "torch.compile bf16"]
CUDA_RUNNERS = ["vaeinfer cuda fp32", "vaeinfer cuda fp16", "vaeinfer cuda int8", "vaeinfer tensorrt fp32",
                "vaeinfer tensorrt fp16", "vaeinfer auto", "onnxruntime fp32", "torch eager fp32",
                "torch fp16 channels-last", "torch bf16 channels-last", "torch.compile fp32", "torch.compile bf16"]


def test_device_table_names_the_runners_of_each_device():
    from vaeinfer.backends import REGISTRY

    assert set(cpu_paths.DEVICES) == {"cpu", "cuda"}
    # the CPU table as committed (benchmarks/results/cpu_paths.*): every CPU backend x fp32/bf16/int8
    assert cpu_paths.device_backends("cpu")[0] == ["cpu", "openvino"]
    assert cpu_paths.runner_names(["cpu", "openvino"]) == cpu_paths.runner_names(["cpu", "openvino"], "cpu") == CPU_RUNNERS
    assert cpu_paths.peer_names("cpu") == cpu_paths.PEERS
    # the GPU table: the registry's CUDA backends x the precisions each declares, no OpenVINO, fp16 torch too
    backends = cpu_paths.device_backends("cuda")[0]
    assert backends == ["cuda", "tensorrt"] and all(REGISTRY[b].device == "cuda" for b in backends)
    assert cpu_paths.runner_names(backends, "cuda") == CUDA_RUNNERS
    assert [(b, p) for _, b, p in cpu_paths.vaeinfer_cells(backends, "cuda")] == [
        (b, p) for b in backends for p in REGISTRY[b].precisions]
    assert not any("openvino" in n for n in cpu_paths.runner_names(backends, "cuda"))
    cpu, cuda = cpu_paths.DEVICES["cpu"], cpu_paths.DEVICES["cuda"]
    assert (cpu.stem_for(False), cpu.stem_for(True)) == ("cpu_paths", "cpu_paths-quick")
    assert (cuda.stem_for(False), cuda.stem_for(True)) == ("cpu_paths-cuda", "cpu_paths-cuda-quick")
    assert (cpu.baseline, cuda.baseline) == (cpu_paths.BASELINE, "vaeinfer cuda fp32")
    assert cpu.variants == ("int8",) and set(cuda.variants) == {"int8", "fp16"}
    assert cpu.matmul == ("fp32", "bf16") and cuda.matmul == ("fp32", "fp16", "bf16") and cuda.tf32 is False
    assert (cpu.on_gpu, cuda.on_gpu) == (False, True)


def test_verdict_against_the_gpu_rates_and_baseline():
    rates = {"fp32_gflops": 50e3, "fp16_gflops": 400e3, "bf16_gflops": 400e3, "tf32": False}
    row = {"row": "made-up", "gflop": 100.0, "cells": {
        "vaeinfer cuda fp32": _cell(10, 1e-7), "vaeinfer auto": _cell(4, 1e-3, precision="fp16"),
        "torch fp16 channels-last": _cell(5, 1e-3), "onnxruntime fp32": _cell(9, 1e-7)}}
    cpu_paths.summarize(row, rates, "vaeinfer cuda fp32")
    assert row["cells"]["vaeinfer auto"]["vs_vaeinfer_fp32"] == pytest.approx(2.5)
    assert row["fastest"]["of_fp16_matmul"] == pytest.approx(100.0 / 4e-3 / 400e3)
    assert row["fastest_peer"]["cell"] == "torch fp16 channels-last" and row["verdict"]["met"] is True
    assert "of the fp32 / " in cpu_paths.footer(row)[0] and "of the fp16 / " in cpu_paths.footer(row)[0]


@pytest.mark.skipif(_has_cuda(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cpu_paths.main(["--device", "cuda", "--rows", "mnist-vae-b1", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA here" in err and "CUDA provider" in err and "torch" in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing half-run


def test_device_cuda_plumbing_with_torch_on_the_cpu(tmp_path, monkeypatch):
    """The cuda table end to end where there is no GPU: PyTorch's cells stand in on the CPU, the
    vaeinfer and onnxruntime CUDA cells say why they cannot run."""
    import dataclasses

    monkeypatch.setitem(cpu_paths.DEVICES, "cuda", dataclasses.replace(cpu_paths.DEVICES["cuda"], torch_device="cpu",
                                                                       matmul_n=(64, 64)))
    if not _has_cuda():
        monkeypatch.setattr(cpu_paths, "unusable", lambda device, torch: None)
        monkeypatch.setattr(cpu_paths, "torch_unready", lambda device, torch: None)
    report = cpu_paths.main(["--device", "cuda", "--quick", "--no-compile", "--rows", "mnist-vae-b1", "--rounds", "1",
                             "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu_paths-cuda-quick.json", "cpu_paths-cuda-quick.md"]
    saved = json.loads((tmp_path / "cpu_paths-cuda-quick.json").read_text())
    assert saved["device"] == "cuda" and saved["runners"] == CUDA_RUNNERS == report["runners"]
    assert set(saved["matmul"]) >= {"fp32_gflops", "fp16_gflops", "bf16_gflops"}
    (row,) = saved["rows"]
    assert set(row["cells"]) == set(CUDA_RUNNERS)
    for name in ("torch eager fp32", "torch fp16 channels-last", "torch bf16 channels-last"):
        assert row["cells"][name]["p50_ms"] > 0, (name, row["cells"][name])
    if not _has_cuda():
        assert row["reference"] == "torch eager fp32"
        for name in CUDA_RUNNERS[:7]:  # vaeinfer's CUDA / TensorRT cells, auto and raw onnxruntime CUDA
            why = row["cells"][name]["na"]
            assert "CUDA" in why or "TensorRT" in why, (name, why)
    md = (tmp_path / "cpu_paths-cuda-quick.md").read_text()
    assert md.startswith("# CUDA paths side by side") and "relative to `vaeinfer cuda fp32`" in md
    assert "openvino" not in md.split("## ")[1]
