"""onnxruntime on the CPU: the backend every install has (`device="cpu"`, and "auto"'s fallback)."""

from __future__ import annotations

from vaeinfer import session
from vaeinfer.backends import Backend, register

PROVIDER = session.CPU


def providers(device, capture=False, **_) -> list:
    return [PROVIDER]


BACKEND = register(Backend(
    name="cpu", device="cpu", title="onnxruntime's CPU provider", engine="onnxruntime",
    install_hint="install 'vaeinfer[cpu]' (onnxruntime)",
    is_available=lambda: session.has_provider(PROVIDER), make_runner=session.OrtBackend(providers, "cpu"),
    default=True, auto=100, host_memory=True, host_threads=True, io_binding=True,
    precisions=("fp32", "fp16", "int8"), shared_weights=True,
))
