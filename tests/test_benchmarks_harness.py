"""benchmarks.harness: the machine description, interleaved timing, the peak RSS of a fresh
process and the results writer that every benchmark shares."""

from __future__ import annotations

import json
import time

import pytest

from benchmarks.harness import machine, memory, report, timing
from benchmarks.harness.cli import int_list


def test_the_machine_description_names_cpu_isa_and_versions():
    m = machine.describe()
    assert isinstance(m["isa"], list) and set(m["isa"]) <= {
        "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8",
        "amx_bf16"}
    assert m["cpu"] and m["cpus_usable"] >= 1 and "numpy" in m["versions"]
    line = machine.summary(m)
    assert m["cpu"] in line and f"Python {m['python']}" in line


def test_interleaved_rotates_the_runners_and_takes_medians():
    order = []
    runners = {name: (lambda name=name: order.append(name)) for name in "abc"}
    t = timing.interleaved(runners, rounds=3, calls=2, warmup=0)
    timed = order[3:]  # after one per-call estimate each
    assert timed == ["a"] * 2 + ["b"] * 2 + ["c"] * 2 + ["b"] * 2 + ["c"] * 2 + ["a"] * 2 + ["c"] * 2 + ["a"] * 2 + ["b"] * 2
    assert set(t.medians) == set("abc") and all(len(t.rounds[k]) == 3 for k in "abc")
    assert len(t.round_medians("a")) == 3 and len(t.seconds("a")) == 6


def test_interleaved_alternating_calls_and_a_slow_runner_is_slower():
    order = []
    runners = {"fast": lambda: order.append("fast"), "slow": lambda: (order.append("slow"), time.sleep(0.002))}
    t = timing.interleaved(runners, rounds=2, calls=3, warmup=0, alternate_calls=True)
    assert order[2:8] == ["fast", "slow", "slow", "fast", "fast", "slow"]  # round 1: the order alternates per call
    assert t.medians["slow"] > t.medians["fast"] + 0.001
    assert timing.stats(t.seconds("slow"), batch=4)["iterations"] == 6


@pytest.mark.parametrize("kwargs", [{}, {"calls": 1, "min_time": 1.0}, {"min_time": 1.0, "alternate_calls": True}])
def test_interleaved_refuses_unclear_settings(kwargs):
    with pytest.raises(ValueError):
        timing.interleaved({"a": lambda: None}, 2, **kwargs)


def test_the_peak_rss_of_a_fresh_process_counts_its_own_allocation():
    run = memory.fresh_process("json.tool", ["--help"])
    assert run["returncode"] == 0 and "usage" in run["stdout"] and run["wall_s"] > 0
    assert 1 < run["peak_rss_mib"] < memory.peak_rss_mib()  # a bare interpreter: less than this test process


def test_the_writer_puts_command_machine_and_date_in_both_files(tmp_path, capsys):
    data = {**report.provenance("benchmarks.speed.overhead", ["--blocks", "2"]), "rows": [1, 2]}
    js, md = report.write("demo", "A demo", data, ["| a |", "|---|"], tmp_path)
    saved = json.loads(js.read_text())
    assert saved["command"] == "python -m benchmarks.speed.overhead --blocks 2" and saved["rows"] == [1, 2]
    assert saved["machine"]["isa"] == data["machine"]["isa"] and saved["date"]
    text = md.read_text()
    assert text.startswith("# A demo\n") and "`python -m benchmarks.speed.overhead --blocks 2`" in text
    assert machine.summary(data["machine"]) in text and data["date"] in text and "| a |" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json", "demo.md"]  # no temporary files left
    assert "# A demo" in capsys.readouterr().out
    with pytest.raises(ValueError, match="provenance"):
        report.write("bad", "t", {"rows": []}, [], tmp_path)


def test_bad_lists_on_the_command_line_are_argparse_errors():
    assert int_list("1,8,64") == [1, 8, 64]
    for bad in ("1,x", "", "0,2"):
        with pytest.raises(Exception) as e:
            int_list(bad)
        assert type(e.value).__name__ == "ArgumentTypeError"


@pytest.mark.parametrize("module", ["benchmarks.speed.overhead", "benchmarks.speed.compare_bundles",
                                    "benchmarks.evaluation.quality_reduced", "benchmarks.stress.soak"])
def test_benchmarks_run_as_modules_with_help(module):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage" in done.stdout, done.stderr
