"""onnxruntime on the CPU: the backend every install has (`device="cpu"`, and "auto"'s fallback)."""

from __future__ import annotations

from vaeinfer import session
from vaeinfer.backends import Backend, register

PROVIDER = "CPUExecutionProvider"


def make_runner(graph: bytes, device, *, threads, what, precision="fp32", spec=None, capture=False):
    return session.make_runner(graph, device, threads=threads, what=what, provider=PROVIDER)


BACKEND = register(Backend(
    name="cpu", device="cpu", title="onnxruntime's CPU provider", engine="onnxruntime",
    install_hint="install 'vaeinfer[cpu]' (onnxruntime)",
    is_available=lambda: session.has_provider(PROVIDER), make_runner=make_runner,
    default=True, auto=100, host_memory=True, host_threads=True, io_binding=True,
    precisions=("fp32", "fp16", "int8"),
))
