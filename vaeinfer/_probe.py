"""`vaeinfer.load(..., isolate=True)`: open an untrusted bundle in a child process first.

The parent reads, verifies and scans the graphs (`Bundle.pin`), then pipes exactly those bytes
to `python -m vaeinfer._probe`, which creates every onnxruntime session and runs one tiny batch
through each graph. Only if the child exits cleanly does the parent create its own sessions,
from the same bytes in memory (so nothing on disk can change between the probe and the load).
A crash inside onnxruntime's parser or kernels (a segfault, an abort) then kills the child, not
the app, and surfaces as a BundleError; so does a child that runs past `TIMEOUT` seconds.

Protocol on stdin: one JSON line {"manifest", "precision", "device", "backend", "auto", "sizes": {role: bytes}},
then the graphs' bytes in that order. Exit status 0: all sessions made and run; 3: a vaeinfer
error (its class and message on stderr's last line); anything else: a failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from vaeinfer import errors
from vaeinfer.errors import BundleError

TIMEOUT = 120.0  # seconds for the child to create every session and run one batch
_TYPED = 3
_TAG = "vaeinfer-probe-error:"


def command() -> list[str]:
    """The child's command line (tests replace it to simulate a crash)."""
    return [sys.executable, "-m", "vaeinfer._probe"]


def probe(bundle, precision: str, device) -> None:
    """Open `bundle`'s pinned graphs of `precision` in a child process on `device` (a
    vaeinfer.backends.Device, or a device string); BundleError if it dies."""
    from vaeinfer.backends import parse_device

    device = parse_device(device)
    roles = list(bundle.manifest.specs())
    blobs = [bundle.pinned[precision, role] for role in roles]
    header = {"manifest": bundle.manifest.raw, "precision": precision, "device": str(device),
              "backend": device.backend, "auto": device.auto,
              "sizes": {role: len(b) for role, b in zip(roles, blobs)}}
    payload = json.dumps(header).encode() + b"\n" + b"".join(blobs)
    where = f"{bundle.path}: the isolated probe"
    # run from the directory that holds this vaeinfer, so the child imports the same package
    cwd = str(Path(__file__).resolve().parent.parent)
    try:
        done = subprocess.run(command(), input=payload, capture_output=True, timeout=TIMEOUT, cwd=cwd,
                              env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    except subprocess.TimeoutExpired:
        raise BundleError(f"{where} did not finish within {TIMEOUT:g} s (killed); refusing the bundle") from None
    except OSError as e:
        raise BundleError(f"{where} could not start: {e}") from None
    if done.returncode == 0:
        return
    lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
    fatal = [line for line in lines if line.startswith("Fatal Python error")]  # faulthandler's summary
    tail = (fatal or lines or [""])[-1].strip()
    if done.returncode == _TYPED and tail.startswith(_TAG):
        name, _, message = tail[len(_TAG):].strip().partition(": ")
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, errors.VaeinferError):
            raise cls(message)
    if done.returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-done.returncode).name}"
        except ValueError:
            how = f"was killed by signal {-done.returncode}"
    else:
        how = f"exited with status {done.returncode}"
    raise BundleError(f"{where} {how} while onnxruntime opened and ran the graphs; refusing the bundle"
                      + (f" (last output: {tail[:300]})" if tail else ""))


def _tiny_feeds(spec, manifest) -> dict[str, np.ndarray]:
    from vaeinfer import kinds
    from vaeinfer.spec import example_inputs

    arrays = example_inputs(spec, 1, 0, kinds.get(manifest.kind).int_limits(manifest), value_range=manifest.value_range)
    return {t.name: a for t, a in zip(spec.inputs, arrays)}


def _child() -> None:
    from vaeinfer import manifest as manifest_mod
    from vaeinfer.errors import BackendError
    from vaeinfer.backends import Device, fallback
    from vaeinfer.runtime import Graph

    stream = sys.stdin.buffer
    header = json.loads(stream.readline())
    manifest = manifest_mod.parse(header["manifest"])
    specs = manifest.specs()
    device = Device(header["backend"], int(header["device"].partition(":")[2] or 0), header["auto"])
    for role, size in header["sizes"].items():
        data = stream.read(size)
        if len(data) != size:
            raise BundleError(f"probe: expected {size} bytes of {role}, got {len(data)}")
        what = f"{manifest.name}/{role}"
        options = dict(threads=1, what=what, precision=header["precision"], spec=specs[role])
        try:
            runner = device.entry.make_runner(data, device, **options)
        except BackendError:
            if not device.auto:
                raise
            device = fallback()
            runner = device.entry.make_runner(data, device, **options)
        Graph(runner, specs[role], what, device)  # the signature check
        try:
            runner.run([t.name for t in specs[role].outputs], _tiny_feeds(specs[role], manifest))
        except Exception as e:  # the backend's own exception types
            raise BundleError(f"{what}: {device.entry.engine} failed to run one batch of valid input: {str(e)[:300]}") from None


def main() -> int:
    try:
        _child()
    except errors.VaeinferError as e:
        print(f"{_TAG} {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return _TYPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
