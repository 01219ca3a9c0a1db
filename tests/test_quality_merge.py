"""benchmarks.evaluation.quality --merge: parts run as separate processes become one results table."""

from __future__ import annotations

import json

import pytest

from benchmarks.evaluation import quality


def _part(command, vae=None, samples=None, quick=False):
    part = {"command": command, "date": "2026-12-02T22:00:00+00:00", "machine": "test, 2 cores", "quick": quick,
            "protocol": "p", "references": [], "vae": vae or {}, "vq": {}, "images": ["a.png"],
            "sample_count": 1000 if samples else 0}
    if samples:
        part["samples"], part["classifier"] = samples, {"trained_on": "MNIST train", "held_out_accuracy": 0.98}
    return part


def test_merge_combines_the_parts_of_one_model(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    entry = {"images": 1000, "samples": 5000, "nll": 83.1, "neg_elbo": 88.0, "recon": 60.0, "nll_sem": 0.6}
    full = {**entry, "images": 10000, "samples": 500, "nll": 83.4, "nll_sem": 0.2}
    check = {"images": 20, "samples": 100, "max_abs_diff_nats": 2e-5, "mean_torch_nll": 1.0, "mean_onnx_nll": 1.0}
    parts = {"k5000": _part("python q.py --k-full 0", {"m": {"subset": entry, "torch_check": check}}),
             "k500": _part("python q.py --k-subset 0", {"m": {"full": full, "torch_check": None}}),
             "samples": _part("python q.py --k-subset 0 --k-full 0",
                              samples={"m": {"T1": {"confident": 0.8, "entropy": 0.99}}})}
    for stem, part in parts.items():
        (tmp_path / f"{stem}.json").write_text(json.dumps(part))
    merged = quality.merge(list(parts))
    assert merged["vae"]["m"] == {"subset": entry, "full": full, "torch_check": check}  # None never overwrites
    assert merged["samples"]["m"]["T1"]["confident"] == 0.8 and merged["images"] == ["a.png"]
    text = "\n".join(quality.markdown(merged))
    assert "**83.10** ± 0.60 | K=5000, 1000 test images" in text and "**83.40** ± 0.20 | K=500, 10000" in text
    assert merged["command"].startswith("python q.py --k-full 0 && python q.py --k-subset 0") and "| m | 1 | 0.800 | 0.990 |" in text
    (tmp_path / "quick.json").write_text(json.dumps(_part("python q.py --quick", quick=True)))
    with pytest.raises(SystemExit, match="quick and full"):
        quality.merge(["k5000", "quick"])
