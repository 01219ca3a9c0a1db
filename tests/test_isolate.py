"""`vaeinfer.load(..., isolate=True)`: an untrusted bundle is opened in a child process first, so
that a crash or a hang inside onnxruntime kills the child, not the app."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import vaeinfer
from vaeinfer import BundleError, _probe


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_isolated_load_matches_plain_load(mlp):
    a = vaeinfer.load(mlp.bundle, device="cpu", threads=1, isolate=True)
    b = vaeinfer.load(mlp.bundle, device="cpu", threads=1)
    assert np.array_equal(a.sample(4, seed=3), b.sample(4, seed=3))


def test_bundled_model_isolated():
    vae = vaeinfer.load("mnist-vae", device="cpu", threads=1, isolate=True)
    assert vae.sample(2, seed=0).shape == (2, 1, 28, 28)


@pytest.mark.parametrize("code, signal", [
    ("import os; os.abort()", "SIGABRT"),
    # the real probe runs to the end (sessions made, one batch run), then the child segfaults
    ("import ctypes, vaeinfer._probe as p; p.main(); ctypes.string_at(0)", "SIGSEGV"),
])
def test_crashing_child_becomes_bundle_error(mlp, monkeypatch, code, signal):
    monkeypatch.setattr(_probe, "command", lambda: _child(code))
    with pytest.raises(BundleError, match=f"killed by {signal}.*refusing the bundle"):
        vaeinfer.load(mlp.bundle, device="cpu", isolate=True)
    assert vaeinfer.load(mlp.bundle, device="cpu").sample(1, seed=0).shape[0] == 1  # and this process lives on


def test_failing_child_becomes_bundle_error(mlp, monkeypatch):
    monkeypatch.setattr(_probe, "command", lambda: _child("import sys; print('boom', file=sys.stderr); sys.exit(7)"))
    with pytest.raises(BundleError, match="exited with status 7.*boom"):
        vaeinfer.load(mlp.bundle, device="cpu", isolate=True)


def test_hanging_child_is_killed(mlp, monkeypatch):
    monkeypatch.setattr(_probe, "command", lambda: _child("import time; time.sleep(600)"))
    monkeypatch.setattr(_probe, "TIMEOUT", 1.0)
    with pytest.raises(BundleError, match="did not finish within 1 s"):
        vaeinfer.load(mlp.bundle, device="cpu", isolate=True)


def test_typed_error_in_child_keeps_its_type(mlp, monkeypatch):
    code = "import sys; print('vaeinfer-probe-error: BackendError: no CUDA here', file=sys.stderr); sys.exit(3)"
    monkeypatch.setattr(_probe, "command", lambda: _child(code))
    with pytest.raises(vaeinfer.BackendError, match="no CUDA here"):
        vaeinfer.load(mlp.bundle, device="cpu", isolate=True)


def test_probed_bytes_are_the_loaded_bytes(bundle_copy, monkeypatch):
    """Files changed on disk after the probe are never read: the model runs the bytes the child ran."""
    probe = _probe.probe

    def probe_then_tamper(bundle, precision, device):
        probe(bundle, precision, device)
        for name in ("encoder.onnx", "decoder.onnx"):
            (bundle_copy / name).write_bytes(b"swapped after the probe")

    monkeypatch.setattr(_probe, "probe", probe_then_tamper)
    vae = vaeinfer.load(bundle_copy, device="cpu", isolate=True)
    assert vae.decode(vae.encode(np.zeros((1, 1, 20, 12), np.float32))).shape == (1, 1, 20, 12)


def test_bad_device_is_the_callers_error(mlp):
    with pytest.raises(ValueError, match="device must be"):
        vaeinfer.load(mlp.bundle, device="tpu", isolate=True)
