"""Fuzzing the bundle loader at a small size (the long run is benchmarks.stress.fuzz; its figures are
in benchmarks/results/fuzz.md): mutated manifests and mutated/truncated graphs, re-signed,
loaded with and without hash verification in worker processes, must each end in success or a
typed vaeinfer error; a crash, a hang or another exception type fails the test."""

from __future__ import annotations

from pathlib import Path

import pytest

import vaeinfer
from benchmarks.stress import fuzz as fuzz_module

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [ROOT / "tests" / "data" / "fuzz-seeds" / name for name in ("vae", "vq")]
TYPED = {"ok", "BundleError", "InputError", "OutputError", "BackendError"}


@pytest.fixture(scope="module")
def fuzz():
    return fuzz_module


def test_seeds_are_valid_bundles(fuzz):
    """The committed seeds (regenerate: python -m benchmarks.stress.fuzz --write-seeds tests/data/fuzz-seeds) still load."""
    for seed in SEEDS:
        fuzz._exercise(vaeinfer.load(seed, device="cpu", threads=1))


def test_fuzz_small(fuzz):
    result = fuzz.run_campaign(SEEDS, attempts=1000, seed=12345, workers=1, timeout=30.0)
    assert result["attempts"] == 1000
    assert result["crashes"] == 0 and result["hangs"] == 0 and result["unexpected"] == 0, result["incidents"]
    assert set(result["outcomes"]) <= TYPED, result["outcomes"]
    # the campaign reaches every layer: manifests, the protobuf scan, onnxruntime, and successful runs
    stages = result["bundle_errors_by_stage"]
    for stage in ("manifest", "protobuf scan: malformed", "onnxruntime refused to load", "graph signature vs manifest"):
        assert stages.get(stage, 0) > 0, stages
    assert result["outcomes"].get("ok", 0) > 0
    assert set(result["by_verify"]) == {"verify", "no-verify"}


def test_attempts_are_reproducible(fuzz):
    seeds = [fuzz.Seed(p) for p in SEEDS]
    for index in (0, 7, 123):
        a, b = fuzz.make_attempt(seeds, 5, index), fuzz.make_attempt(seeds, 5, index)
        assert a["files"] == b["files"] and a["family"] == b["family"]


def test_harness_counts_crashes_and_hangs(fuzz, monkeypatch):
    """A worker that dies or stops answering is counted (and replaced), not fatal to the campaign."""
    monkeypatch.setenv("VAEINFER_FUZZ_SELFTEST", "crash:2,hang:4")
    result = fuzz.run_campaign(SEEDS, attempts=7, seed=0, workers=1, timeout=3.0)
    assert result["attempts"] == 7 and result["crashes"] == 1 and result["hangs"] == 1
    kinds = {i["index"]: (i["outcome"], i.get("how")) for i in result["incidents"]}
    assert kinds == {2: ("crash", "SIGABRT"), 4: ("hang", None)}
