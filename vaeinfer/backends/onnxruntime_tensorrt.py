"""onnxruntime's TensorRT provider: TensorRT engines for the graph, CUDA then CPU for what TensorRT
does not take. Only when asked: `vaeinfer.load(..., device="cuda", backend="tensorrt")`.

Engines are built on first load (seconds to minutes) and cached on disk, one folder per graph's
sha256 under `cache_root()` (onnxruntime's own engine key does not cover the weights). fp16
engines only for the bundle's fp16 variant: an fp32 bundle keeps the 1e-4 promise.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from vaeinfer import session
from vaeinfer.backends import Backend, onnxruntime_cuda, register

PROVIDER = "TensorrtExecutionProvider"
MAX_BATCH = 512  # the optimisation profile's largest batch (the runtime never calls with more)
OPT_BATCH = 64  # the batch the engine is tuned for


def cache_root() -> Path:
    """$VAEINFER_TENSORRT_CACHE, else ~/.cache/vaeinfer/tensorrt."""
    return Path(os.environ.get("VAEINFER_TENSORRT_CACHE") or Path.home() / ".cache" / "vaeinfer" / "tensorrt")


def profile_shapes(spec) -> dict[str, str] | None:
    """trt_profile_{min,opt,max}_shapes for the batch axis, "x:1x1x28x28,..." ("x:512x..."); None
    when some other axis is dynamic too (a spatial VAE: TensorRT then profiles the shapes it sees)."""
    if spec is None or any(not isinstance(d, int) for t in spec.inputs for d in t.shape[1:]):
        return None
    def shapes(batch):
        return ",".join(f"{t.name}:{'x'.join(map(str, (batch, *t.shape[1:])))}" for t in spec.inputs)
    return {"trt_profile_min_shapes": shapes(1), "trt_profile_opt_shapes": shapes(OPT_BATCH),
            "trt_profile_max_shapes": shapes(MAX_BATCH)}


def provider_options(index: int, precision: str, cache: Path, spec=None) -> dict[str, str]:
    opts = {
        "device_id": str(int(index)),
        "trt_fp16_enable": "1" if precision == "fp16" else "0",
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(cache),
    }
    return {**opts, **(profile_shapes(spec) or {})}


def engine_cache(graph: bytes) -> Path:
    """The graph's engine cache folder: its sha256 under `cache_root()`."""
    return cache_root() / hashlib.sha256(graph).hexdigest()[:32]


def providers(device, capture=False, precision="fp32", spec=None, graph: bytes = b"", **_) -> list:
    """TensorRT first (its engine cache folder made here), CUDA then CPU for the nodes TensorRT
    does not take."""
    cache = engine_cache(graph)
    if session.has_provider(PROVIDER):
        cache.mkdir(parents=True, exist_ok=True)
    return [(PROVIDER, provider_options(device.index, precision, cache, spec)),
            (onnxruntime_cuda.PROVIDER, onnxruntime_cuda.provider_options(device.index)), session.CPU]


BACKEND = register(Backend(
    name="tensorrt", device="cuda", title="onnxruntime's TensorRT provider", engine="onnxruntime",
    install_hint="install 'vaeinfer[gpu]' (onnxruntime-gpu) without onnxruntime, and TensorRT 10 "
                 "(pip install tensorrt-cu12)",
    is_available=lambda: session.has_provider(PROVIDER), make_runner=session.OrtBackend(providers, "cuda"),
    indexed=True, io_binding=True, max_batch=MAX_BATCH, precisions=("fp32", "fp16"),
))
