"""benchmarks.speed.compare_bundles: a retrained bundle timed against the one it replaces."""

from __future__ import annotations

import pytest

from benchmarks.speed import compare_bundles as compare_bundles_module

SEED_VAE = "tests/data/fuzz-seeds/vae"


@pytest.fixture(scope="module")
def compare_bundles():
    return compare_bundles_module


def test_both_bundles_are_timed_on_every_op_and_batch(compare_bundles, capsys):
    report = compare_bundles.main([SEED_VAE, SEED_VAE, "--batches", "1,3", "--min-time", "0.02", "--threads", "1"])
    rows = report["rows"]
    assert [(r["op"], r["batch"]) for r in rows] == [("encode", 1), ("encode", 3), ("decode", 1), ("decode", 3)]
    for r in rows:
        assert r["old"]["iterations"] >= 10 and r["new"]["iterations"] >= 10
        assert r["old"]["mode"] in (None, "intra", "chunks") and r["new"]["mode"] in (None, "intra", "chunks")
        assert r["ratio"] == pytest.approx(r["new"]["p50_ms"] / r["old"]["p50_ms"])
    table = capsys.readouterr().out
    assert "| decode | 3 |" in table and report["command"] in table


def test_a_ratio_over_ten_percent_is_called_a_regression(compare_bundles):
    row = {"op": "decode", "batch": 256, "old": {"p50_ms": 10.0}, "new": {"p50_ms": 11.5}, "ratio": 1.15}
    report = {"old": "a", "new": "b", "precision": "fp32", "rows": [row]}
    assert "1.150 (regression)" in "\n".join(compare_bundles.markdown(report))
    row.update(new={"p50_ms": 10.5}, ratio=1.05)
    assert "(regression)" not in "\n".join(compare_bundles.markdown(report))


def test_a_precision_variant_is_compared(compare_bundles):
    report = compare_bundles.main(["mnist-vae", "mnist-vae", "--batches", "2", "--ops", "decode", "--min-time", "0.01",
                                   "--threads", "1", "--precision", "int8"])
    assert report["precision"] == "int8" and len(report["rows"]) == 1


def test_an_unknown_op_is_refused(compare_bundles):
    with pytest.raises(SystemExit):
        compare_bundles.main([SEED_VAE, SEED_VAE, "--ops", "sample"])
