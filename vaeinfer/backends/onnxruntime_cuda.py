"""onnxruntime's CUDA provider (`device="cuda"` / "cuda:N"; "auto"'s first choice)."""

from __future__ import annotations

from vaeinfer import session
from vaeinfer.backends import Backend, register

PROVIDER = "CUDAExecutionProvider"


def provider_options(index: int, capture: bool = False) -> dict[str, str]:
    """CUDA provider options: the one place where they are chosen.

    - cudnn_conv_algo_search HEURISTIC: EXHAUSTIVE (onnxruntime's default) benchmarks every
      algorithm the first time each input shape is seen, a multi-second stall on every new
      batch size; the heuristic choice costs nothing and is within a few percent here.
    - use_tf32 0: TF32 convolutions/matmuls would break the promise that VAE images agree
      within 1e-4 across providers.
    - enable_cuda_graph: replay captured CUDA graphs (fixed shapes, IO-bound buffers; see
      `Graph` in runtime.py); only when asked, since it needs every node on the CUDA provider.
    Values are strings: onnxruntime parses provider options from text.
    """
    opts = {
        "device_id": str(int(index)),
        "cudnn_conv_algo_search": "HEURISTIC",
        "do_copy_in_default_stream": "1",
        "arena_extend_strategy": "kSameAsRequested",
        "use_tf32": "0",
    }
    if capture:
        opts["enable_cuda_graph"] = "1"
    return opts


def providers(device, capture=False, **_) -> list:
    return [(PROVIDER, provider_options(device.index, capture)), session.CPU]


BACKEND = register(Backend(
    name="cuda", device="cuda", title="onnxruntime's CUDA provider", engine="onnxruntime",
    install_hint="install 'vaeinfer[gpu]' (onnxruntime-gpu) without onnxruntime",
    is_available=lambda: session.has_provider(PROVIDER), make_runner=session.OrtBackend(providers, "cuda"),
    indexed=True, default=True, auto=0, io_binding=True, graph_capture=True,
    precisions=("fp32", "fp16", "int8"),
))
